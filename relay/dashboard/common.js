// Helpers shared by the dashboard's views: DOM building, one time format, the API.

export const $ = (id) => document.getElementById(id);

export const numberFormat = new Intl.NumberFormat("en-US");

// The one time format of the page: UTC, to the second ("2026-12-01 22:40:05 UTC").
export function formatTime(iso) {
  if (!iso) return "—";
  const date = typeof iso === "number" ? new Date(iso) : new Date(Date.parse(iso));
  if (Number.isNaN(date.getTime())) return "—";
  return `${date.toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

export function formatDuration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  const minutes = Math.floor(ms / 60000);
  return `${minutes} min ${Math.round((ms % 60000) / 1000)} s`;
}

export function formatCost(micros) {
  if (!micros) return "$0";
  const dollars = micros / 1e6;
  return `$${dollars.toFixed(dollars < 1 ? 4 : 2)}`;
}

export function tokens(usage) {
  if (!usage) return 0;
  return (
    usage.total_tokens ||
    (usage.input_tokens || 0) + (usage.output_tokens || 0) + (usage.reasoning_tokens || 0)
  );
}

export function plural(count, noun) {
  return `${numberFormat.format(count)} ${noun}${count === 1 ? "" : "s"}`;
}

export function errorText(error) {
  if (!error) return "";
  return error.code ? `${error.message || ""} (${error.code})` : error.message || "";
}

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// A cell's text that may be long: cut with an ellipsis, whole in the tooltip.
export function clip(tag, className, text) {
  const node = el(tag, `clip ${className || ""}`.trim(), text);
  node.title = text === null || text === undefined ? "" : String(text);
  return node;
}

export function badge(kind, value) {
  const node = el("span", `badge badge-${value}`, value);
  node.dataset.kind = kind;
  return node;
}

export function cell(...children) {
  const td = document.createElement("td");
  for (const child of children) if (child) td.append(child);
  return td;
}

export function sessionLink(sessionId) {
  const link = el("a", "mono strong clip", sessionId);
  link.href = `#session=${encodeURIComponent(sessionId)}`;
  link.title = sessionId;
  link.dataset.sessionLink = sessionId;
  return link;
}

// A table with fixed column widths (percentages), so long values are cut, not spread.
export function table(headings, rows, className, widths) {
  const node = el("table", className);
  if (widths) {
    const columns = el("colgroup");
    for (const width of widths) {
      const col = el("col");
      col.style.width = `${width}%`;
      columns.append(col);
    }
    node.append(columns);
  }
  const head = el("thead");
  const tr = el("tr");
  for (const heading of headings) {
    const th = el("th", null, heading);
    th.scope = "col";
    tr.append(th);
  }
  head.append(tr);
  const body = el("tbody");
  body.append(...rows);
  node.append(head, body);
  return node;
}

export class AuthError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(key, path, method = "GET", body = undefined) {
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let answer = null;
  try {
    answer = response.status === 204 ? null : await response.json();
  } catch {
    answer = null;
  }
  if (response.status === 401 || response.status === 403) {
    throw new AuthError(response.status, answer?.error?.message || response.statusText);
  }
  if (!response.ok) {
    throw new Error(answer?.error?.message || `${response.status} ${response.statusText}`);
  }
  return answer;
}
