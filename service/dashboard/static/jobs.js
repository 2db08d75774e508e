// The jobs list: a page of GET /v1/jobs at a time (the API's cursor), filtered by state, refreshed while jobs run.

import { TERMINAL, api, badge, h, when } from "./common.js";

const PAGE_SIZE = 20;
const REFRESH_MS = 5000;

const table = document.querySelector("#jobs tbody");
const filter = document.querySelector("#state-filter");
const newer = document.querySelector("#newer");
const older = document.querySelector("#older");
const label = document.querySelector("#page-label");

// Cursors of the pages before this one; the current page's own cursor; the next page's.
const previous = [];
let cursor = null;
let nextCursor = null;
let timer = null;

filter.value = new URLSearchParams(location.search).get("state") ?? "";

function row(job) {
  const link = h("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id);
  return h("tr", { dataset: { jobId: job.id } },
    h("th", { scope: "row" }, link, h("span", { class: "job-id" }, job.id)),
    h("td", {}, badge(job.state)),
    h("td", {}, job.workload),
    h("td", { class: "wrap" }, job.optimizers.join(", ")),
    h("td", { class: "progress" },
      h("progress", { max: job.trials_total || 1, value: job.trials_done, "aria-hidden": "true" }),
      `${job.trials_done}/${job.trials_total}`),
    h("td", {}, h("time", { datetime: job.created_at }, when(job.created_at))),
  );
}

async function load() {
  clearTimeout(timer);
  const query = new URLSearchParams({ limit: PAGE_SIZE });
  if (filter.value) query.append("state", filter.value);
  if (cursor) query.set("cursor", cursor);
  let page;
  try {
    page = await api(`/v1/jobs?${query}`);
  } catch (error) {
    const message = `Could not load jobs: ${error.message}`;
    table.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "empty" }, message)));
    return;
  }
  nextCursor = page.next_cursor;
  if (page.jobs.length) {
    table.replaceChildren(...page.jobs.map(row));
  } else {
    const hint = filter.value ? `No ${filter.value} jobs.` : "No jobs yet: submit one with koala submit job.yaml.";
    table.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "empty" }, hint)));
  }
  newer.disabled = previous.length === 0;
  older.disabled = !nextCursor;
  label.textContent = `Page ${previous.length + 1}`;
  if (page.jobs.some((job) => !TERMINAL.has(job.state))) timer = setTimeout(load, REFRESH_MS);
}

filter.addEventListener("change", () => {
  previous.length = 0;
  cursor = null;
  const url = new URL(location.href);
  if (filter.value) url.searchParams.set("state", filter.value);
  else url.searchParams.delete("state");
  history.replaceState(null, "", url);
  load();
});

older.addEventListener("click", () => {
  if (!nextCursor) return;
  previous.push(cursor);
  cursor = nextCursor;
  load();
});

newer.addEventListener("click", () => {
  if (!previous.length) return;
  cursor = previous.pop();
  load();
});

load();
