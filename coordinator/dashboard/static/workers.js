// The workers page: every worker and the cluster's events, live.
import {
  ageCell, el, eventItem, fill, formatBytes, formatNumber, showEmpty, stateBadge, subscribe, td,
} from "/static/live.js";

function summary(workers) {
  const count = (state) => workers.filter((w) => w.state === state).length;
  const islands = new Set(workers.filter((w) => w.island).map((w) => w.island)).size;
  const figures = [
    ["workers", workers.length], ["idle", count("idle")], ["busy", count("busy")],
    ["lost", count("lost")], ["left", count("left")], ["islands", islands],
  ];
  return figures.map(([label, value]) => el("div", { class: "figure" }, el("b", {}, value), el("span", {}, label)));
}

function row(w) {
  const job = w.job_id ? el("a", { href: `/jobs/${encodeURIComponent(w.job_id)}` }, w.job_name || w.job_id) : "";
  return el(
    "tr",
    { dataset: { worker: w.name, state: w.state } },
    td(w.name),
    el("td", {}, stateBadge(w.state), w.leaving ? " leaving" : ""),
    td(w.island || "", true),
    td(formatNumber(w.gflops), true),
    td(formatBytes(w.memory_bytes), true),
    td(w.device),
    ageCell(w.last_seen_at),
    el("td", {}, job),
    td(w.stage ?? "", true),
    td(w.replica ?? "", true),
    td(w.bytes_sent === undefined || w.bytes_sent === null ? "" : formatBytes(w.bytes_sent), true),
    el("td", { class: "muted" }, w.address),
  );
}

subscribe("workers", {}, (data) => {
  const order = { busy: 0, idle: 1, lost: 2, left: 3 };
  const workers = [...data.workers].sort(
    (a, b) => (order[a.state] ?? 9) - (order[b.state] ?? 9) || a.name.localeCompare(b.name),
  );
  fill(document.getElementById("summary"), summary(workers));
  fill(document.querySelector("#workers tbody"), workers.map(row));
  showEmpty("no-workers", workers.length === 0);
  fill(document.getElementById("events"), [...data.events].reverse().map(eventItem));
  showEmpty("no-events", data.events.length === 0);
});
