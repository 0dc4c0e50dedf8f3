// The links page: the measured bandwidth of every directed link as a heatmap, grouped by island.
import { el, fill, formatAge, formatNumber, serverNow, showEmpty, subscribe } from "/static/live.js";

// Colour by bandwidth on a log scale from 1 Mbit/s (pale) to 10 Gbit/s (deep blue).
const LOW = Math.log10(1e6);
const HIGH = Math.log10(1e10);

function colour(bitsPerSecond) {
  const t = Math.min(1, Math.max(0, (Math.log10(Math.max(bitsPerSecond, 1)) - LOW) / (HIGH - LOW)));
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(250, 66)}, ${mix(240, 133)}, ${mix(210, 214)})`;
}

function legend() {
  const items = [el("span", {}, "bandwidth:")];
  for (const bits of [1e6, 1e7, 1e8, 1e9, 1e10]) {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour(bits);
    items.push(swatch, el("span", {}, bits >= 1e9 ? `${bits / 1e9} Gbit/s` : `${bits / 1e6} Mbit/s`));
  }
  return items;
}

function cell(c) {
  if (!c) return el("td", { class: "cell none" }, "-");
  const [, , bandwidth, rtt, measuredAt, error] = c;
  if (error) {
    return el("td", { class: "cell failed", title: `not measured: ${error}` }, "failed",
      el("small", { dataset: { at: measuredAt } }, formatAge(serverNow() - measuredAt)));
  }
  const bits = bandwidth * 8;
  const node = el("td", { class: "cell", title: `${formatNumber(bits / 1e6)} Mbit/s, round trip ${formatNumber(rtt * 1000)} ms` },
    formatNumber(bits / 1e6), el("small", { dataset: { at: measuredAt } }, formatAge(serverNow() - measuredAt)));
  node.style.background = colour(bits);
  return node;
}

function matrix(data) {
  const workers = data.workers;
  const byPair = new Map(data.cells.map((c) => [`${c[0]}:${c[1]}`, c]));
  const islandOf = (w) => (w.island ? `island ${w.island}` : "unmeasured");
  const rows = [];
  // Header: an island row over the destination columns, then the workers' names.
  const islandHeader = [el("th", {}), el("th", {})];
  let i = 0;
  while (i < workers.length) {
    let j = i;
    while (j < workers.length && islandOf(workers[j]) === islandOf(workers[i])) j += 1;
    islandHeader.push(el("th", { class: "island", colspan: j - i }, islandOf(workers[i])));
    i = j;
  }
  rows.push(el("tr", {}, ...islandHeader));
  rows.push(el("tr", {}, el("th", {}), el("th", {}, "from \\ to"), ...workers.map((w) => el("th", {}, w.name))));
  workers.forEach((src, s) => {
    const cells = [];
    // The island's name once, spanning its rows.
    if (s === 0 || islandOf(workers[s - 1]) !== islandOf(src)) {
      let span = 1;
      while (s + span < workers.length && islandOf(workers[s + span]) === islandOf(src)) span += 1;
      cells.push(el("td", { class: "island", rowspan: span }, islandOf(src)));
    }
    cells.push(el("th", {}, src.name));
    workers.forEach((_dst, d) => {
      cells.push(s === d ? el("td", { class: "cell self" }, "") : cell(byPair.get(`${s}:${d}`)));
    });
    rows.push(el("tr", { dataset: { worker: src.name } }, ...cells));
  });
  return rows;
}

fill(document.getElementById("legend"), legend());
subscribe("links", {}, (data) => {
  fill(document.getElementById("matrix"), data.workers.length ? matrix(data) : []);
  showEmpty("no-links", data.cells.length === 0);
  const note = document.getElementById("note");
  note.textContent = data.note;
  note.hidden = !data.note;
});
