// What every dashboard page shares: the live feed from the coordinator, building
// elements (always as text, never as HTML), and formatting figures.

let clockOffset = 0; // the browser's clock minus the coordinator's, in seconds

/** Seconds since the epoch on the coordinator's clock. */
export function serverNow() {
  return Date.now() / 1000 - clockOffset;
}

/** Follow the page's live feed: `onData(snapshot)` at every new snapshot. */
export function subscribe(view, params, onData) {
  const query = new URLSearchParams({ view, ...params });
  const status = document.getElementById("live");
  const source = new EventSource(`/api/events?${query}`);
  source.addEventListener("snapshot", (event) => {
    const message = JSON.parse(event.data);
    clockOffset = Date.now() / 1000 - message.now;
    status.textContent = "live";
    status.className = "ok";
    onData(message.data);
    tickAges();
  });
  source.addEventListener("logout", () => {
    source.close();
    location.assign("/login");
  });
  source.addEventListener("error", () => {
    status.textContent = "reconnecting";
    status.className = "down";
    if (source.readyState === EventSource.CLOSED) location.assign("/login");
  });
  window.addEventListener("pagehide", () => source.close());
  setInterval(tickAges, 1000);
}

/** An element with attributes and children (strings become text nodes). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** A table cell; numbers right-aligned. */
export function td(value, numeric = false) {
  return el("td", { class: numeric ? "num" : undefined }, value ?? "");
}

/**
 * Make `parent`'s children `children`, changing only what differs. A row that is
 * still there keeps its elements, so a click that starts on a link just as a
 * snapshot arrives still ends on it (replacing the rows would lose the click), and
 * a selection or hover survives the refresh. Rows that name a job, a worker or an
 * event (`data-job`, `data-worker`, `data-seq`) are matched by that name, others by
 * position.
 */
export function fill(parent, children) {
  const wanted = children.map((c) => (c instanceof Node ? c : document.createTextNode(String(c))));
  const current = [...parent.childNodes];
  const byKey = new Map();
  for (const node of current) {
    const key = keyOf(node);
    if (key !== null && !byKey.has(key)) byKey.set(key, node);
  }
  const used = new Set();
  const result = wanted.map((node, i) => {
    const key = keyOf(node);
    let match = key !== null ? byKey.get(key) : current[i];
    if (match && key === null && keyOf(match) !== null) match = undefined;
    if (!match || used.has(match) || !sameKind(match, node)) return node;
    used.add(match);
    morph(match, node);
    return match;
  });
  result.forEach((node, i) => {
    if (parent.childNodes[i] !== node) parent.insertBefore(node, parent.childNodes[i] ?? null);
  });
  while (parent.childNodes.length > result.length) parent.lastChild.remove();
}

function keyOf(node) {
  if (node.nodeType !== Node.ELEMENT_NODE || !node.dataset) return null;
  const { job, worker, seq } = node.dataset;
  if (seq !== undefined) return `seq:${seq}`;
  if (job !== undefined) return `job:${job}`;
  if (worker !== undefined) return `worker:${worker}`;
  return null;
}

function sameKind(a, b) {
  return a.nodeType === b.nodeType && a.nodeName === b.nodeName && a.namespaceURI === b.namespaceURI;
}

/** Turn `node` into a copy of `model` in place. */
function morph(node, model) {
  if (node.nodeType !== Node.ELEMENT_NODE) {
    if (node.nodeValue !== model.nodeValue) node.nodeValue = model.nodeValue;
    return;
  }
  for (const { name } of [...node.attributes]) {
    if (!model.hasAttribute(name)) node.removeAttribute(name);
  }
  for (const { name, value } of [...model.attributes]) {
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }
  fill(node, [...model.childNodes]);
}

/** Show `empty` (an element) when there is nothing to show. */
export function showEmpty(id, isEmpty) {
  const node = document.getElementById(id);
  if (node) node.hidden = !isEmpty;
}

/** An element whose text is kept as the age of wall-clock time `at`. */
export function ageCell(at, tag = "td") {
  const node = el(tag, { class: tag === "td" ? "num" : undefined });
  node.dataset.at = String(at);
  node.textContent = formatAge(serverNow() - at);
  return node;
}

function tickAges() {
  const now = serverNow();
  for (const node of document.querySelectorAll("[data-at]")) {
    node.textContent = formatAge(now - Number(node.dataset.at));
  }
}

export function formatAge(seconds) {
  const s = Math.max(0, seconds);
  if (s < 10) return `${s.toFixed(1)} s ago`;
  if (s < 120) return `${Math.round(s)} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function formatBytes(n) {
  if (n === undefined || n === null) return "";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = Number(n);
  let unit = 0;
  while (Math.abs(value) >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatNumber(x, digits = 3) {
  if (x === undefined || x === null || Number.isNaN(x)) return "";
  const v = Number(x);
  if (v !== 0 && (Math.abs(v) >= 1e6 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

export function formatSeconds(s) {
  if (!s) return "";
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}

export function formatClock(at) {
  return new Date(at * 1000).toLocaleTimeString([], { hour12: false });
}

export function stateBadge(state) {
  return el("span", { class: `state state-${state}` }, state);
}

// Stage colours: distinct, readable with black text.
export const STAGE_COLOURS = [
  "#7aa6d6", "#f5a65b", "#e87b7d", "#8fd0ca", "#87c27a", "#f1d56b", "#c49ac0", "#ffb3bd",
  "#b99a86", "#c8c2bd", "#6fb1e0", "#d6e685",
];

export function stageColour(stage) {
  return stage === null || stage === undefined ? "#d5d9df" : STAGE_COLOURS[stage % STAGE_COLOURS.length];
}

/** One line of a timeline: time, kind, text. */
export function eventItem(event) {
  return el(
    "li",
    { dataset: { kind: event.kind, seq: event.seq } },
    el("time", {}, formatClock(event.at)),
    el("span", { class: `kind kind-${event.kind}` }, event.kind),
    event.text,
  );
}
