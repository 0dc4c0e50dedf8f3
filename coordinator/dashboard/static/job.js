// A job's page: its figures and curves, its plan (placements, cut links, the DAG) and its
// timeline, live.
import { curve } from "/static/charts.js";
import { drawDag, stageLegend } from "/static/dag.js";
import {
  el, eventItem, fill, formatBytes, formatNumber, formatSeconds, showEmpty, stateBadge, subscribe, td,
} from "/static/live.js";

const jobId = decodeURIComponent(location.pathname.split("/").pop());
const lossCurve = curve(document.getElementById("loss-chart"), { xLabel: "step", yLabel: "loss", colour: "#2b6cb0" });
const validationCurve = curve(document.getElementById("validation-chart"), {
  xLabel: "step", yLabel: "validation loss", colour: "#c05621", points: true,
});
const paceCurve = curve(document.getElementById("pace-chart"), {
  xLabel: "time", yLabel: "samples/s", colour: "#2f855a", time: true,
});
let dagEpoch = null;

function figure(label, value) {
  return el("div", { class: "figure" }, el("b", {}, value === "" || value === undefined || value === null ? "-" : value), el("span", {}, label));
}

function summary(j) {
  const items = [
    el("div", { class: "figure" }, el("b", {}, stateBadge(j.state)), el("span", {}, "state")),
    figure("steps done", `${j.steps_done} / ${j.steps}`),
    figure("loss", formatNumber(j.loss, 4)),
    figure("samples/s", j.samples_per_s ? formatNumber(j.samples_per_s) : ""),
    figure("step time (smoothed)", formatSeconds(j.step_seconds)),
    figure("epoch (plans so far)", j.epoch),
    figure("last checkpoint", j.last_checkpoint ? `step ${j.last_checkpoint}` : "none"),
    figure("re-plans", j.recoveries),
  ];
  if (j.error) items.push(figure(j.state === "failed" ? "error" : "last trouble (recovered)", j.error));
  return items;
}

function stepTime(report) {
  if (!report) return [];
  return [
    figure("predicted", formatSeconds(report.predicted_step_s) || "not estimated"),
    figure("calibrated", formatSeconds(report.calibrated_step_s) || "not calibrated yet"),
    figure(`measured (${report.steps_measured} steps)`, formatSeconds(report.measured_step_s) || "not measured yet"),
  ];
}

function placementRow(p) {
  return el("tr", { dataset: { stage: p.stage, replica: p.replica } },
    td(p.stage, true), td(p.replica, true), td(p.worker), td(p.nodes, true),
    td(p.params.toLocaleString(), true), td(formatNumber(p.flops / 1e9), true));
}

function linkRow(l) {
  return el("tr", {},
    td(`stage ${l.src_stage} -> ${l.dst_stage}`), td(l.codec), td(formatNumber(l.kept), true), td(l.values),
    td(formatBytes(l.dense_bytes), true), td(formatBytes(l.wire_bytes), true),
    td(l.compression ? `${formatNumber(l.compression)} x` : "", true),
    td(l.measured_bytes_per_step === null ? "" : formatBytes(l.measured_bytes_per_step), true));
}

async function loadDag(epoch) {
  dagEpoch = epoch;
  let answer;
  try {
    answer = await fetch(`/api/jobs/${encodeURIComponent(jobId)}/dag`, { credentials: "same-origin" });
  } catch {
    answer = null; // the coordinator is unreachable: the live feed says so
  }
  if (!answer || !answer.ok) {
    dagEpoch = null; // try again with the next snapshot
    return;
  }
  const layout = (await answer.json()).data;
  fill(document.getElementById("stage-legend"), stageLegend(layout));
  const note = document.getElementById("dag-note");
  note.textContent = layout.note;
  note.hidden = !layout.note;
  fill(document.getElementById("dag"), [drawDag(layout)]);
}

subscribe("job", { job: jobId }, (data) => {
  if (data.gone) {
    const gone = document.getElementById("gone");
    gone.textContent = data.gone;
    gone.hidden = false;
    return;
  }
  const j = data.job;
  document.getElementById("title").textContent = `Job ${j.name} (${j.id})`;
  document.title = `Archipelago: job ${j.name}`;
  fill(document.getElementById("summary"), summary(j));
  lossCurve(data.curves.loss);
  validationCurve(data.curves.validation);
  paceCurve(data.curves.samples_per_s);
  fill(document.getElementById("events"), [...data.events].reverse().map(eventItem));
  // Checkpoints and their validation come every few steps; shown on request, they would
  // otherwise push the re-plans out of sight.
  const routine = document.getElementById("routine");
  routine.onchange = () =>
    document.getElementById("events").classList.toggle("hide-routine", !routine.checked);
  showEmpty("no-events", data.events.length === 0);
  const plan = data.plan;
  if (!plan) {
    document.getElementById("plan-line").textContent = "Not planned yet: the job waits for workers.";
    return;
  }
  const stages = new Set(plan.placements.map((p) => p.stage)).size;
  const replicas = new Set(plan.placements.map((p) => p.replica)).size;
  document.getElementById("plan-line").textContent =
    `Plan ${plan.epoch} by the ${plan.planner} planner, from step ${plan.start_step}: ` +
    `${stages} stage${stages > 1 ? "s" : ""} x ${replicas} replica${replicas > 1 ? "s" : ""}.`;
  fill(document.getElementById("steptime"), stepTime(plan.report));
  fill(document.querySelector("#placements tbody"), plan.placements.map(placementRow));
  fill(document.querySelector("#links tbody"), plan.links.map(linkRow));
  showEmpty("no-links", plan.links.length === 0);
  if (dagEpoch !== plan.epoch) loadDag(plan.epoch);
});
