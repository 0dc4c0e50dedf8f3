// The jobs page: every job with its state, progress and pace, live.
import { el, fill, formatClock, formatNumber, showEmpty, stateBadge, subscribe, td } from "/static/live.js";

export function jobRow(j) {
  const plan = j.stages ? `${j.stages} x ${j.replicas}` : "";
  return el(
    "tr",
    { dataset: { job: j.id, state: j.state } },
    el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(j.id)}` }, j.name), " ", el("span", { class: "muted" }, j.id)),
    td(j.model),
    el("td", {}, stateBadge(j.state)),
    el("td", {}, el("progress", { max: 1, value: j.progress }), ` ${Math.round(j.progress * 100)}%`),
    td(`${j.steps_done} / ${j.steps}`, true),
    td(formatNumber(j.loss, 4), true),
    td(j.samples_per_s ? formatNumber(j.samples_per_s) : "", true),
    td(plan, true),
    td(j.epoch, true),
    td(j.recoveries, true),
    td(formatClock(j.created_at)),
  );
}

if (document.body.dataset.page === "jobs") {
  subscribe("jobs", {}, (data) => {
    fill(document.querySelector("#jobs tbody"), data.jobs.map(jobRow));
    showEmpty("no-jobs", data.jobs.length === 0);
  });
}
