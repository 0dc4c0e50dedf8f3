// Curves drawn with the vendored uPlot (the global `uPlot`, loaded before this module).

const HEIGHT = 220;

/** A curve in `figure` (a <figure> with a .plot child), redrawn by `update([xs, ys])`. */
export function curve(figure, { xLabel, yLabel, colour, time = false, points = false }) {
  const container = figure.querySelector(".plot");
  let plot = null;
  const empty = document.createElement("p");
  empty.className = "empty";
  empty.textContent = "No points yet.";
  container.append(empty);
  const options = () => ({
    width: Math.max(280, container.clientWidth),
    height: HEIGHT,
    legend: { show: false },
    cursor: { drag: { x: true, y: false } },
    scales: { x: { time } },
    axes: [{ label: xLabel, size: 40 }, { label: yLabel, size: 60 }],
    series: [{}, { label: yLabel, stroke: colour, width: 1.6, points: { show: points, size: 6, fill: colour } }],
  });
  window.addEventListener("resize", () => {
    if (plot) plot.setSize({ width: Math.max(280, container.clientWidth), height: HEIGHT });
  });
  return function update(data) {
    figure.dataset.points = String(data[0].length);
    if (data[0].length === 0) return;
    if (plot === null) {
      empty.remove();
      plot = new uPlot(options(), data, container);
    } else {
      plot.setData(data);
    }
  };
}
