// The plan drawn as a DAG: boxes where the server laid them out (layer: row, order: column),
// coloured by stage; edges crossing between stages dashed and labelled with their codec.
import { el, stageColour } from "/static/live.js";

const SVG = "http://www.w3.org/2000/svg";
const BOX_W = 140;
const BOX_H = 22;
const COL = 158;
const ROW = 46;
const PAD = 12;

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

export function stageLegend(layout) {
  return layout.stages.map((s) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = stageColour(s.stage);
    return el("span", { dataset: { stage: s.stage } }, swatch, `stage ${s.stage}${s.worker ? ` on ${s.worker}` : ""}`);
  });
}

export function drawDag(layout) {
  const columns = Math.max(1, ...layout.nodes.map((n) => n.order + 1));
  const width = PAD * 2 + (columns - 1) * COL + BOX_W;
  const height = PAD * 2 + Math.max(0, layout.layers - 1) * ROW + BOX_H;
  const root = svg("svg", { class: "dag", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  root.append(svg("title"));
  root.firstChild.textContent = `The plan's DAG: ${layout.operators} operators`;
  const at = new Map(layout.nodes.map((n) => [n.id, { x: PAD + n.order * COL, y: PAD + n.layer * ROW }]));
  const workerOf = new Map(layout.stages.map((s) => [s.stage, s.worker]));
  const edges = svg("g");
  const labels = svg("g");
  const labelled = new Set();
  for (const e of layout.edges) {
    const a = at.get(e.src);
    const b = at.get(e.dst);
    const x1 = a.x + BOX_W / 2;
    const y1 = a.y + BOX_H;
    const x2 = b.x + BOX_W / 2;
    const y2 = b.y;
    const bend = Math.max(12, (y2 - y1) / 2);
    edges.append(svg("path", {
      class: e.cut ? "edge cut" : "edge",
      d: `M${x1},${y1} C${x1},${y1 + bend} ${x2},${y2 - bend} ${x2},${y2}`,
    }));
    // One label per source box and codec, just below the box: edges leaving one box
    // start together, and a label there never lands on another box.
    const key = `${e.src}:${e.codec}`;
    if (e.cut && !labelled.has(key)) {
      labelled.add(key);
      const label = svg("text", { class: "codec", x: x1 + 5, y: y1 + 13 });
      label.textContent = e.codec;
      labels.append(label);
    }
  }
  const boxes = svg("g");
  for (const n of layout.nodes) {
    const { x, y } = at.get(n.id);
    const group = svg("g", { "data-node": n.id });
    const rect = svg("rect", {
      x, y, width: BOX_W, height: BOX_H, rx: 4, fill: stageColour(n.stage), "data-stage": n.stage ?? "none",
    });
    const tip = svg("title");
    const where = n.stage === null ? "input or parameter" : `stage ${n.stage}${workerOf.get(n.stage) ? ` on ${workerOf.get(n.stage)}` : ""}`;
    tip.textContent = `${n.count} operator${n.count > 1 ? "s" : ""} (${where}): ${n.title}`;
    rect.append(tip);
    const text = svg("text", { x: x + 5, y: y + 15 });
    text.textContent = n.label;
    group.append(rect, text);
    boxes.append(group);
  }
  root.append(edges, boxes, labels);
  return root;
}
