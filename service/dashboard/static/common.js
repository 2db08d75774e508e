// Helpers shared by the dashboard's pages: API calls with the session cookie, formatting and element building.

export const TERMINAL = new Set(["cancelled", "succeeded", "failed"]);

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/** GET (or `options.method`) an API path as JSON; a lapsed session goes back to the login page. */
export async function api(path, options = {}) {
  const response = await fetch(path, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
    ...options,
  });
  if (response.status === 401) {
    const here = location.pathname + location.search;
    location.assign(`/ui/login?next=${encodeURIComponent(here)}`);
    throw new ApiError("signed out", 401);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(body?.detail ?? response.statusText, response.status);
  return body;
}

/** A metric value, as the report table shows it (fixed decimals; "–" when there is none). */
export function fmt(value, digits = 4) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}

export function seconds(value) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(1)} s`;
}

export function when(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleString(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

export function clock(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function params(values) {
  const entries = Object.entries(values ?? {});
  if (!entries.length) return "defaults";
  return entries.map(([k, v]) => `${k}=${typeof v === "number" ? Number(v.toPrecision(4)) : v}`).join(", ");
}

/** Build an element: h("td", {class: "num", dataset: {field: "x"}}, "text", child). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export function badge(state) {
  return h("span", { class: `badge state-${state}` }, state);
}

/** The optimizer colours, in the order of the report, shared by every chart of a page. */
export const PALETTE = ["#1f5fbf", "#e07b00", "#15803d", "#c0262d", "#7c3aed", "#0e7490", "#be185d", "#4d7c0f"];

export function rgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}
