// The job page: the comparison report, learning curves, final-result spread, HPO cost and the trials, from the API;
// kept live from the job's server-sent events while it runs.

import { PALETTE, TERMINAL, api, badge, clock, fmt, h, params, rgba, seconds, when } from "./common.js";

const Plotly = window.Plotly;
const root = document.querySelector("#job");
const jobId = root.dataset.jobId;
const base = `/v1/jobs/${encodeURIComponent(jobId)}`;

const el = {
  state: document.querySelector("#job-state"),
  cancel: document.querySelector("#cancel"),
  facts: document.querySelector("#facts"),
  live: document.querySelector("#live"),
  error: document.querySelector("#job-error"),
  report: document.querySelector("#report"),
  hpo: document.querySelector("#hpo"),
  curves: document.querySelector("#curves"),
  spread: document.querySelector("#spread"),
  trials: document.querySelector("#trials"),
  count: document.querySelector("#trial-count"),
  studies: document.querySelector("#studies"),
  fOptimizer: document.querySelector("#f-optimizer"),
  fPhase: document.querySelector("#f-phase"),
  fState: document.querySelector("#f-state"),
};

let job = null;
let report = null;
let trials = [];
let source = null;
const sort = { key: "optimizer", dir: "ascending" };

// ---- the job ---------------------------------------------------------------------------------------------------

function colour(optimizer) {
  const i = job.optimizers.indexOf(optimizer);
  return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
}

function fact(term, ...value) {
  return h("div", {}, h("dt", {}, term), h("dd", {}, ...value));
}

function renderHead() {
  el.state.className = `badge state-${job.state}`;
  el.state.textContent = job.state;
  el.cancel.hidden = !["queued", "running"].includes(job.state);
  const spec = job.spec;
  const perOptimizer = Object.entries(job.progress).map(([name, p]) => `${name} ${p.done}/${p.total}`).join(" · ");
  el.facts.replaceChildren(
    fact("Workload", job.workload),
    fact("Metric", report ? `${report.metric} (${report.direction})` : spec.metric ?? "workload default"),
    fact("Epochs × seeds", `${spec.epochs} × ${Array.isArray(spec.seeds) ? spec.seeds.length : spec.seeds}`),
    fact("Trials done", h("progress", { max: job.trials_total || 1, value: job.trials_done, "aria-hidden": "true" }),
      `${job.trials_done}/${job.trials_total}`, h("div", { class: "small muted" }, perOptimizer)),
    fact("Created", when(job.created_at)),
    fact("Started", when(job.started_at)),
    fact("Finished", when(job.finished_at)),
    ...(job.upload ? [uploadFact(job.upload)] : []),
  );
  el.error.hidden = !job.error;
  el.error.textContent = job.error ? `This job failed: ${job.error}` : "";
}

/** The uploaded workload pack a job runs: its digest, and its files while the server keeps it. */
function uploadFact(upload) {
  const digest = h("code", { class: "digest", title: upload.digest }, upload.digest.slice(0, 19));
  if (!upload.files) return fact("Uploaded code", digest, h("div", { class: "small muted" }, "no longer stored"));
  const size = upload.size === null ? "" : `, ${(upload.size / 1024).toFixed(1)} KiB packed`;
  return fact("Uploaded code", digest, h("details", { class: "small" },
    h("summary", {}, `${upload.files.length} files${size}`),
    h("ul", { class: "files" }, upload.files.map((f) => h("li", {}, h("code", {}, f.path), ` ${f.size} B`)))));
}

el.cancel.addEventListener("click", async () => {
  if (!confirm(`Cancel job ${job.name || job.id}? Its running trials stop within seconds.`)) return;
  el.cancel.disabled = true;
  try {
    job = await api(`${base}/cancel`, { method: "POST" });
    renderHead();
    el.live.textContent = job.state === "cancelling" ? "Cancelling: stopping the running trials…" : "Cancelled.";
  } catch (error) {
    el.live.textContent = `Could not cancel: ${error.message}`;
  } finally {
    el.cancel.disabled = false;
  }
});

// ---- the report ------------------------------------------------------------------------------------------------

function ranked() {
  const order = new Map(report.ranking.map((name, i) => [name, i]));
  const rank = (row) => order.get(row.optimizer) ?? order.size;
  return [...report.optimizers].sort((a, b) => rank(a) - rank(b));
}

function renderReport() {
  if (!report) {
    el.report.replaceChildren(h("p", { class: "muted" }, "No trial has been recorded yet."));
    return;
  }
  const better = report.direction === "maximize" ? "higher is better" : "lower is better";
  const target = report.target === null ? "" : `; target ${fmt(report.target)}`;
  const heads = ["Rank", "Optimizer", "Mode", "Hyperparameters", "Final mean", "Std", "Min", "Max", "Seeds",
    "Trials", "Compute (s)", "Tuning (s)", ...(report.target === null ? [] : ["Reached target"])];
  const numeric = new Set(["Rank", "Final mean", "Std", "Min", "Max", "Seeds", "Compute (s)", "Tuning (s)"]);
  const rows = ranked().map((row) => {
    const rank = report.ranking.indexOf(row.optimizer);
    const trialCounts = Object.entries(row.trials).map(([s, n]) => `${s.toLowerCase()} ${n}`).join(", ");
    const cell = (field, text) => h("td", { class: "num", dataset: { field } }, text);
    const reach = row.target
      ? `${row.target.reached}/${row.target.of}` +
        (row.target.epochs_mean === null ? "" : ` in ${row.target.epochs_mean.toFixed(1)} epochs`)
      : "–";
    return h("tr", { dataset: { optimizer: row.optimizer }, class: rank === 0 ? "best" : null },
      cell("rank", rank < 0 ? "–" : rank + 1),
      h("th", { scope: "row" },
        h("span", { class: "swatch", style: `color:${colour(row.optimizer)}`, "aria-hidden": "true" }, "● "),
        row.optimizer),
      h("td", { dataset: { field: "mode" } }, row.mode),
      h("td", { class: "params", dataset: { field: "hyperparams" } }, params(row.hyperparams)),
      cell("final_mean", fmt(row.final_mean)),
      cell("final_std", fmt(row.final_std)),
      cell("final_min", fmt(row.final_min)),
      cell("final_max", fmt(row.final_max)),
      cell("seeds", row.seeds),
      h("td", { dataset: { field: "trials" } }, trialCounts),
      cell("compute_seconds", row.compute_seconds.toFixed(1)),
      cell("tuning_seconds", row.tuning_seconds.toFixed(1)),
      report.target === null ? null : h("td", { dataset: { field: "target" } }, reach),
    );
  });
  const table = h("table", { class: "data", id: "report-table" },
    h("caption", {}, `Final ${report.metric} over seeds (${better}${target}), best first`),
    h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col", class: numeric.has(t) ? "num" : null }, t)))),
    h("tbody", {}, rows),
  );
  el.report.replaceChildren(h("div", { class: "table-wrap" }, table));
}

function renderHpo() {
  const costs = report?.hpo_cost ?? [];
  if (!costs.length) {
    const why = report ? "This job has no tuned baseline, or no untuned KOALA result yet." : "No results yet.";
    el.hpo.replaceChildren(h("p", { class: "muted" }, why));
    return;
  }
  el.hpo.replaceChildren(...costs.map((cost) => {
    const koala = `${cost.koala_optimizer} (${fmt(cost.koala_result)})`;
    const perRun = `One ${cost.koala_optimizer} run takes ${seconds(cost.koala_seconds_per_run)}.`;
    if (cost.matched) {
      return h("article", { class: "card", dataset: { optimizer: cost.optimizer } },
        h("h3", {}, `${cost.optimizer} vs ${cost.koala_optimizer}`),
        h("div", { class: "figure", dataset: { field: "ratio" } },
          cost.ratio === null ? "–" : `${cost.ratio.toFixed(1)}×`),
        h("p", {}, `Matched ${koala} after ${cost.tuning_trials_to_match} tuning trials ` +
          `(${seconds(cost.tuning_seconds_to_match)} of tuning).`),
        h("p", {}, perRun));
    }
    const bound = cost.ratio_lower_bound === null ? "–" : `> ${cost.ratio_lower_bound.toFixed(1)}×`;
    return h("article", { class: "card", dataset: { optimizer: cost.optimizer } },
      h("h3", {}, `${cost.optimizer} vs ${cost.koala_optimizer}`),
      h("div", { class: "figure", dataset: { field: "ratio_lower_bound" } }, bound),
      h("p", {}, `No tuning trial matched ${koala}: the ratio is at least all of its tuning compute.`),
      h("p", {}, perRun));
  }));
}

// ---- charts ----------------------------------------------------------------------------------------------------

const PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

function layout(yTitle, extra = {}) {
  return {
    margin: { l: 56, r: 12, t: 36, b: 44 },
    font: { family: "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif", size: 12 },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "#ffffff",
    yaxis: { title: { text: yTitle }, gridcolor: "#e8ecf2", zeroline: false },
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
    ...extra,
  };
}

function plot(node, traces, plotLayout) {
  if (!traces.length) {
    Plotly.purge(node);
    node.replaceChildren(h("p", { class: "empty muted" }, "Nothing to show yet."));
    node.dataset.series = "";
    return;
  }
  if (!node.classList.contains("js-plotly-plot")) node.replaceChildren();
  Plotly.react(node, traces, plotLayout, PLOT_CONFIG);
}

/** Per-epoch metrics of the eval trials still running, so the curves move while a job runs. */
function runningCurves() {
  return trials.filter((t) => t.phase === "eval" && t.state === "running" && Object.keys(t.metrics).length);
}

function renderCurves() {
  const traces = [];
  const series = [];
  const metric = report?.metric ?? job.spec.metric ?? "metric";
  for (const row of report ? ranked() : []) {
    if (!row.curve.length) continue;
    const c = colour(row.optimizer);
    const x = row.curve.map((p) => p.epoch);
    const common = { x, legendgroup: row.optimizer, showlegend: false, hoverinfo: "skip", mode: "lines" };
    traces.push({ ...common, y: row.curve.map((p) => p.mean + p.std), line: { width: 0, color: c },
      meta: { role: "band" } });
    traces.push({ ...common, y: row.curve.map((p) => p.mean - p.std), line: { width: 0, color: c },
      fill: "tonexty", fillcolor: rgba(c, 0.16), meta: { role: "band" } });
    traces.push({
      x, y: row.curve.map((p) => p.mean), customdata: row.curve.map((p) => p.std), name: row.optimizer,
      legendgroup: row.optimizer, mode: x.length > 30 ? "lines" : "lines+markers", line: { color: c, width: 2.2 },
      marker: { size: 5 }, meta: { role: "mean", optimizer: row.optimizer },
      hovertemplate: `${row.optimizer}: %{y:.4f} ± %{customdata:.4f}<extra></extra>`,
    });
    series.push(row.optimizer);
  }
  for (const t of runningCurves()) {
    const epochs = Object.keys(t.metrics).map(Number).sort((a, b) => a - b);
    const hasGroup = series.includes(t.optimizer) || traces.some((tr) => tr.legendgroup === t.optimizer);
    traces.push({
      x: epochs, y: epochs.map((e) => t.metrics[e]), name: `${t.optimizer} (running)`,
      legendgroup: t.optimizer, showlegend: !hasGroup, mode: "lines", line: { color: colour(t.optimizer), dash: "dot" },
      meta: { role: "running", optimizer: t.optimizer },
      hovertemplate: `${t.optimizer} seed ${t.seed} (running): %{y:.4f}<extra></extra>`,
    });
  }
  const last = Math.max(1, ...traces.map((t) => t.x[t.x.length - 1] ?? 1));
  const xaxis = { title: { text: "epoch" }, gridcolor: "#e8ecf2", tickformat: "d" };
  if (last <= 12) Object.assign(xaxis, { tick0: 1, dtick: 1 }); // whole epochs only
  plot(el.curves, traces, layout(metric, { xaxis, hovermode: "x unified" }));
  el.curves.dataset.series = series.join(" ");
}

function renderSpread() {
  const metric = report?.metric ?? "final value";
  const names = report ? ranked().map((r) => r.optimizer) : job.optimizers;
  const traces = [];
  for (const name of names) {
    const finals = trials.filter((t) => t.optimizer === name && t.phase === "eval" && t.state === "complete" &&
      t.value !== null);
    if (!finals.length) continue;
    traces.push({
      type: "box", name, y: finals.map((t) => t.value), customdata: finals.map((t) => t.seed),
      boxpoints: "all", jitter: 0.35, pointpos: 0, marker: { color: colour(name), size: 7, opacity: 0.85 },
      line: { color: colour(name) }, fillcolor: rgba(colour(name), 0.12), showlegend: false,
      hovertemplate: `${name}, seed %{customdata}: %{y:.4f}<extra></extra>`, meta: { role: "spread" },
    });
  }
  plot(el.spread, traces, layout(metric, { xaxis: { automargin: true } }));
}

// ---- trials ----------------------------------------------------------------------------------------------------

const latest = (t) => {
  const epochs = Object.keys(t.metrics).map(Number);
  return epochs.length ? t.metrics[Math.max(...epochs)] : null;
};

const COLUMNS = [
  { key: "optimizer", label: "Optimizer", value: (t) => t.optimizer },
  { key: "number", label: "#", num: true, value: (t) => t.number },
  { key: "phase", label: "Phase", value: (t) => t.phase },
  { key: "seed", label: "Seed", num: true, value: (t) => t.seed },
  { key: "state", label: "State", value: (t) => t.state },
  { key: "value", label: "Final", num: true, value: (t) => t.value },
  { key: "latest", label: "Latest", num: true, value: latest },
  { key: "epochs_done", label: "Epochs", num: true, value: (t) => t.epochs_done },
  { key: "wall_seconds", label: "Seconds", num: true, value: (t) => t.wall_seconds },
  { key: "params", label: "Hyperparameters", value: (t) => params(t.params) },
  { key: "started_at", label: "Started", value: (t) => t.started_at ?? "" },
];

function header() {
  return h("thead", {}, h("tr", {}, COLUMNS.map((col) => {
    const state = sort.key === col.key ? sort.dir : "none";
    const button = h("button", { type: "button", onclick: () => sortBy(col.key) }, col.label);
    return h("th", { scope: "col", "aria-sort": state, class: col.num ? "num" : null, dataset: { key: col.key } },
      button);
  })));
}

function sortBy(key) {
  sort.dir = sort.key === key && sort.dir === "ascending" ? "descending" : "ascending";
  sort.key = key;
  renderTrials();
  el.trials.querySelector(`th[data-key="${key}"] button`).focus();
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1; // empty values last, either way
  if (b === null || b === undefined) return -1;
  return typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
}

function syncOptions(select, values) {
  const current = select.value;
  const wanted = ["", ...values];
  const have = [...select.options].map((o) => o.value);
  if (wanted.join("|") === have.join("|")) return;
  select.replaceChildren(...wanted.map((v) => h("option", { value: v }, v || "All")));
  select.value = wanted.includes(current) ? current : "";
}

function renderTrials() {
  syncOptions(el.fOptimizer, job.optimizers);
  syncOptions(el.fState, [...new Set(trials.map((t) => t.state))].sort());
  const f = { optimizer: el.fOptimizer.value, phase: el.fPhase.value, state: el.fState.value };
  const column = COLUMNS.find((c) => c.key === sort.key);
  const sign = sort.dir === "ascending" ? 1 : -1;
  const shown = trials
    .filter((t) => (!f.optimizer || t.optimizer === f.optimizer) && (!f.phase || t.phase === f.phase) &&
      (!f.state || t.state === f.state))
    .sort((a, b) => {
      const va = column.value(a);
      const vb = column.value(b);
      if (va === null || va === undefined || vb === null || vb === undefined) return compare(va, vb);
      return sign * compare(va, vb) || compare(a.optimizer, b.optimizer) || a.number - b.number;
    });
  const rows = shown.map((t) => h("tr", { dataset: { optimizer: t.optimizer, phase: t.phase, state: t.state } },
    h("th", { scope: "row" }, t.optimizer),
    h("td", { class: "num" }, t.number),
    h("td", {}, t.phase),
    h("td", { class: "num" }, t.seed),
    h("td", { title: t.reason ?? null },
      badge(t.state), t.reason ? h("span", { class: "small muted" }, ` ${t.reason}`) : null),
    h("td", { class: "num" }, fmt(t.value)),
    h("td", { class: "num" }, fmt(latest(t))),
    h("td", { class: "num" }, `${t.epochs_done}/${job.spec.epochs}`),
    h("td", { class: "num" }, t.wall_seconds.toFixed(1)),
    h("td", { class: "params" }, params(t.params)),
    h("td", {}, t.started_at
      ? h("time", { datetime: t.started_at, title: when(t.started_at) }, clock(t.started_at)) : "–"),
  ));
  const none = trials.length ? "No trial matches these filters." : "No trials yet.";
  const body = rows.length ? rows : [h("tr", {}, h("td", { colspan: COLUMNS.length, class: "empty" }, none))];
  el.trials.replaceChildren(
    h("caption", {}, "Every trial of the job; choose a column header to sort"),
    header(),
    h("tbody", {}, body),
  );
  el.count.textContent = `Showing ${shown.length} of ${trials.length} trials`;
}

for (const select of [el.fOptimizer, el.fPhase, el.fState]) select.addEventListener("change", renderTrials);

function renderStudies() {
  el.studies.replaceChildren(...job.optimizers.map((name) => h("li", {},
    h("a", { href: `/ui/jobs/${encodeURIComponent(jobId)}/studies/${encodeURIComponent(name)}` },
      `job-${jobId}/${name}`))));
}

// ---- data and live updates -------------------------------------------------------------------------------------

async function load() {
  const [fresh, freshTrials] = await Promise.all([api(base), api(`${base}/trials`)]);
  // /results needs a recorded trial: asking earlier would only answer 409.
  report = freshTrials.length ? await api(`${base}/results`) : null;
  job = fresh;
  trials = freshTrials;
  renderHead();
  renderReport();
  renderHpo();
  renderCurves();
  renderSpread();
  renderTrials();
  renderStudies();
}

let loading = Promise.resolve();
let pending = null;

/** Reload after trial and state events, at most once a second however many arrive. */
function scheduleLoad() {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    loading = loading.then(load).catch((error) => { el.live.textContent = `Could not refresh: ${error.message}`; });
  }, 1000);
}

let redraw = null;

function onEpoch(data) {
  const t = trials.find((x) => x.optimizer === data.optimizer && x.phase === data.phase && x.seed === data.seed &&
    x.state === "running");
  if (t) {
    t.metrics[data.epoch] = data.value;
    t.epochs_done = Math.max(t.epochs_done, data.epoch);
  }
  const metric = report?.metric ?? "value";
  el.live.textContent = `${data.optimizer} · ${data.phase} · seed ${data.seed}: epoch ${data.epoch}, ` +
    `${metric} ${fmt(data.value)}`;
  if (!redraw) {
    redraw = setTimeout(() => {
      redraw = null;
      renderTrials();
      renderCurves();
    }, 500);
  }
}

function follow() {
  if (TERMINAL.has(job.state)) return;
  source = new EventSource(`${base}/events`);
  source.addEventListener("epoch", (event) => onEpoch(JSON.parse(event.data).data));
  source.addEventListener("trial", () => scheduleLoad());
  source.addEventListener("state", (event) => {
    const state = JSON.parse(event.data).data.state;
    job.state = state;
    renderHead();
    if (TERMINAL.has(state)) {
      source.close(); // the stream ends with the job; reconnecting would only replay it
      el.live.textContent = `The job ${state}.`;
    }
    scheduleLoad();
  });
}

load().then(follow).catch((error) => {
  el.report.replaceChildren(h("p", { class: "alert", role: "alert" }, `Could not load this job: ${error.message}`));
});
