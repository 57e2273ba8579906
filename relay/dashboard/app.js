import {
  $,
  AuthError,
  api,
  badge,
  cell,
  el,
  formatCost,
  formatDuration,
  formatTime,
  numberFormat,
  plural,
  sessionLink,
  tokens,
} from "./common.js";
import { Views } from "./views.js";

// relay's live dashboard: the sessions from `GET /v1/sessions`, kept current by the
// change frames of `GET /v1/stream`. Each change carries the session's full snapshot
// and its `version`; a snapshot replaces the one shown only when its version is newer,
// so the list and the stream may arrive in any order. All text goes in by textContent.

const LIST_LIMIT = 200;
const KEY_STORAGE = "relay.apiKey";
const CHANGE_TYPES = [
  "session.created",
  "session.provisioning",
  "session.ready",
  "session.ready_timeout",
  "turn.started",
  "turn.completed",
  "turn.failed",
  "turn.conflict",
  "turn.stalled",
];
const RETRY_MS = [1000, 3000, 10000, 30000];
const SERVER_TURN_FILTERS = ["idle", "running"]; // the others look at the last turn
const VIEWS = ["sessions", "session", "alerts", "failures", "subscriptions"];

const state = {
  key: null,
  sessions: new Map(), // session_id -> {session, change: {type, at} | null, flash: bool}
  stream: null,
  lastEventId: null,
  retries: 0,
  retryTimer: null,
  listMore: false,
  loading: null,
  view: "sessions",
};

const views = new Views(
  () => state.key,
  (error) => authFailed(error),
  (message, tone) => showNotice(message, tone),
);
views.sessions = () => [...state.sessions.values()].map((entry) => entry.session);

// What the "Turn status" column says: running while a turn runs, else how the last
// turn ended, else idle.
function turnLabel(session) {
  if (session.turn_status === "running") return "running";
  return session.last_turn ? session.last_turn.status : "idle";
}

function showNotice(message, tone = "error") {
  const notice = $("notice");
  notice.textContent = message;
  notice.dataset.tone = tone;
  notice.hidden = !message;
}

function setConnection(kind, text) {
  const node = $("connection");
  node.dataset.state = kind;
  $("connection-text").textContent = text;
}

// -- rendering -------------------------------------------------------------------------

function matchesFilters(session) {
  const readiness = $("filter-readiness").value;
  const turn = $("filter-turn").value;
  const search = $("search").value.trim().toLowerCase();
  const turnMatches = SERVER_TURN_FILTERS.includes(turn)
    ? session.turn_status === turn
    : turnLabel(session) === turn;
  return (
    (!readiness || session.readiness === readiness) &&
    (!turn || turnMatches) &&
    (!search || session.session_id.toLowerCase().includes(search))
  );
}

function renderRow(entry) {
  const s = entry.session;
  const tr = document.createElement("tr");
  tr.dataset.sessionId = s.session_id;
  tr.dataset.readiness = s.readiness;
  tr.dataset.turnStatus = s.turn_status;
  tr.dataset.turn = turnLabel(s);
  tr.dataset.version = String(s.version);
  if (entry.flash) tr.className = "flash";

  const from = s.provider ? `${s.provider} · ` : "";
  const created = el("div", "sub", `${from}created ${formatTime(s.created_at)}`);
  tr.append(cell(sessionLink(s.session_id), created));

  const details = [];
  if (s.runtime_reused !== null) details.push(s.runtime_reused ? "runtime reused" : "new runtime");
  if (s.scope_activated) details.push("scope");
  if (s.worker_ready) details.push("worker");
  tr.append(cell(badge("readiness", s.readiness), el("div", "sub", details.join(" · "))));

  const ttr = cell(el("span", "mono", formatDuration(s.time_to_ready_ms)));
  ttr.className = "num";
  tr.append(ttr);

  const last = s.last_turn;
  let lastLine = null;
  if (last) {
    const parts = [last.turn_id];
    if (last.duration_ms !== null) parts.push(formatDuration(last.duration_ms));
    const tools = last.tool_calls;
    if (tools && tools.count) parts.push(plural(tools.count, "tool call"));
    if (tools && tools.running.length) parts.push(`running ${tools.running.join(", ")}`);
    if (last.error && last.error.message) parts.push(last.error.message);
    lastLine = el("div", "sub", parts.join(" · "));
    lastLine.title = `last turn ${last.turn_id}: ${last.status}: ${parts.join(" · ")}`;
  }
  tr.append(cell(badge("turn", turnLabel(s)), lastLine));

  const counts = s.counts;
  const countLine = el(
    "div",
    "sub",
    counts.turns === 0
      ? "no turns yet"
      : [
          plural(counts.turns, "turn"),
          `${counts.completed} completed`,
          `${counts.failed} failed`,
          plural(counts.conflicts, "conflict"),
        ].join(" · "),
  );
  tr.append(cell(el("div", "mono", s.active_turn_id || "—"), countLine));

  // The snapshot says when the session last moved; which change it was is known only
  // for changes this page has seen.
  const when = entry.change ? entry.change.at : s.last_event_at;
  const changeTime = el("div", entry.change ? "sub" : "when", formatTime(when));
  tr.append(cell(entry.change ? el("div", "mono", entry.change.type) : null, changeTime));

  const usage = s.usage && (tokens(s.usage) || s.usage.cost_micros) ? s.usage : null;
  const usageCell = usage
    ? cell(
        el("div", "mono", `${numberFormat.format(tokens(usage))} tokens`),
        el("div", "sub", formatCost(usage.cost_micros)),
      )
    : cell(el("span", "mono", "—"));
  usageCell.className = "num";
  if (usage) {
    usageCell.title =
      `input ${numberFormat.format(usage.input_tokens)}, ` +
      `output ${numberFormat.format(usage.output_tokens)}, ` +
      `reasoning ${numberFormat.format(usage.reasoning_tokens)}`;
  }
  tr.append(usageCell);
  return tr;
}

function render() {
  const entries = [...state.sessions.values()]
    .filter((entry) => matchesFilters(entry.session))
    .sort(
      (a, b) =>
        (b.session.last_event_at || "").localeCompare(a.session.last_event_at || "") ||
        a.session.session_id.localeCompare(b.session.session_id),
    );
  $("rows").replaceChildren(...entries.map(renderRow));
  for (const entry of state.sessions.values()) entry.flash = false;

  const total = state.sessions.size;
  const empty = $("empty");
  empty.hidden = entries.length > 0;
  empty.textContent = total
    ? "No session matches these filters."
    : "No sessions yet. They appear here as soon as the relay ingests their first event.";

  const all = [...state.sessions.values()].map((entry) => entry.session);
  const ready = all.filter((s) => s.readiness === "ready").length;
  const running = all.filter((s) => s.turn_status === "running").length;
  const summary = $("summary");
  summary.replaceChildren(
    el("strong", null, numberFormat.format(total)),
    ` session${total === 1 ? "" : "s"} · `,
    el("strong", null, numberFormat.format(ready)),
    " ready · ",
    el("strong", null, numberFormat.format(total - ready)),
    " provisioning · ",
    el("strong", null, numberFormat.format(running)),
    " running",
  );
  const more = $("more");
  more.hidden = !state.listMore;
  more.textContent = `Showing the ${LIST_LIMIT} most recently active sessions that match; newer activity appears live.`;
}

function apply(session, change, flash) {
  const known = state.sessions.get(session.session_id);
  if (known && known.session.version >= session.version) return false;
  state.sessions.set(session.session_id, {
    session,
    change: change || (known ? known.change : null),
    flash,
  });
  return true;
}

// -- the API ---------------------------------------------------------------------------

function getJSON(path) {
  return api(state.key, path);
}

function authFailed(error) {
  stopStream();
  sessionStorage.removeItem(KEY_STORAGE);
  if (error.status === 403) {
    showNotice(`This API key may not read sessions (403): ${error.message}.`);
  } else {
    showNotice("The relay did not accept this API key (401). Enter a valid key.");
  }
  setConnection("error", error.status === 403 ? "Forbidden" : "Unauthorized");
  askForKey();
}

async function loadSessions() {
  const params = new URLSearchParams({ limit: String(LIST_LIMIT) });
  const readiness = $("filter-readiness").value;
  const turn = $("filter-turn").value;
  if (readiness) params.set("readiness", readiness);
  if (SERVER_TURN_FILTERS.includes(turn)) params.set("turn_status", turn);
  try {
    const page = await getJSON(`/v1/sessions?${params}`);
    for (const session of page.items) apply(session, null, false);
    state.listMore = page.next_cursor !== null;
    if ($("notice").dataset.tone === "warning") showNotice("");
    render();
  } catch (error) {
    if (error instanceof AuthError) authFailed(error);
    else showNotice(`Could not load sessions: ${error.message}`, "warning");
  }
}

// -- the stream ------------------------------------------------------------------------

function stopStream() {
  clearTimeout(state.retryTimer);
  if (state.stream) state.stream.close();
  state.stream = null;
}

function onChange(event) {
  state.lastEventId = event.lastEventId || state.lastEventId;
  let change;
  try {
    change = JSON.parse(event.data);
  } catch {
    return;
  }
  if (!change || !change.session) return;
  if (apply(change.session, { type: change.type, at: change.occurred_at }, true)) render();
  views.onChange(change);
}

function openStream() {
  stopStream();
  const params = new URLSearchParams({ access_token: state.key });
  // The browser resends Last-Event-ID by itself while this EventSource retries; a new
  // EventSource (after the stream failed for good) resumes from the id seen last.
  if (state.lastEventId) params.set("last_event_id", state.lastEventId);
  const stream = new EventSource(`/v1/stream?${params}`);
  state.stream = stream;
  setConnection(state.retries ? "reconnecting" : "connecting", state.retries ? "Reconnecting" : "Connecting");

  stream.onopen = () => {
    const resumed = state.lastEventId !== null;
    state.retries = 0;
    setConnection("live", "Live");
    // The list is read once the stream is open, so no change falls between the two;
    // a resumed stream replays what it missed instead.
    if (!resumed) loadSessions();
  };
  stream.onerror = () => {
    if (stream !== state.stream) return;
    if (stream.readyState === EventSource.CONNECTING) {
      setConnection("reconnecting", "Reconnecting");
      return;
    }
    // Closed for good: an error status (maybe the key), or not an event stream.
    setConnection("reconnecting", "Reconnecting");
    checkThenRetry();
  };
  for (const type of CHANGE_TYPES) stream.addEventListener(type, onChange);
  stream.addEventListener("stream.reset", () => {
    // History before our last id is gone: start over from the current list.
    state.sessions.clear();
    loadSessions();
  });
}

async function checkThenRetry() {
  try {
    await getJSON("/v1/sessions?limit=1");
  } catch (error) {
    if (error instanceof AuthError) {
      authFailed(error);
      return;
    }
  }
  const delay = RETRY_MS[Math.min(state.retries, RETRY_MS.length - 1)];
  state.retries += 1;
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(openStream, delay);
}

// -- the key ---------------------------------------------------------------------------

function askForKey() {
  for (const view of VIEWS) $(`${view}-panel`).hidden = true;
  $("nav").hidden = true;
  $("change-key").hidden = true;
  $("key-panel").hidden = false;
  $("key-input").value = "";
  $("key-input").focus();
}

function start(key) {
  state.key = key;
  state.sessions.clear();
  state.lastEventId = null;
  state.retries = 0;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key-panel").hidden = true;
  $("change-key").hidden = false;
  $("nav").hidden = false;
  showNotice("");
  render();
  route();
  openStream();
}

// `#session=<id>`, `#alerts`, `#failures`, `#subscriptions`; anything else: the list.
function route() {
  if (!state.key) return;
  const hash = location.hash.replace(/^#/, "");
  let view = "sessions";
  let arg = null;
  if (hash.startsWith("session=")) {
    view = "session";
    arg = decodeURIComponent(hash.slice("session=".length));
  } else if (VIEWS.includes(hash)) {
    view = hash;
  }
  state.view = view;
  for (const name of VIEWS) $(`${name}-panel`).hidden = name !== view;
  for (const link of document.querySelectorAll("#nav a")) {
    const current = link.dataset.view === view || (view === "session" && link.dataset.view === "sessions");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view === "sessions") {
    views.leave();
    render();
  } else {
    views.show(view, arg);
  }
}

// Enter in the search box: a session id not in the list is looked up, and opened.
async function searchExact() {
  const id = $("search").value.trim();
  if (!id) return;
  if (!state.sessions.has(id)) {
    try {
      const session = await getJSON(`/v1/sessions/${encodeURIComponent(id)}`);
      apply(session, null, false);
    } catch (error) {
      if (error instanceof AuthError) authFailed(error);
      else showNotice(`No session ${id}.`, "warning");
      return;
    }
  }
  location.hash = `#session=${encodeURIComponent(id)}`;
}

function init() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("access_token");
  if (fromUrl) {
    // Keep the key out of the address bar and the history once it is stored.
    url.searchParams.delete("access_token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (key) start(key);
  });
  $("change-key").addEventListener("click", () => {
    stopStream();
    sessionStorage.removeItem(KEY_STORAGE);
    setConnection("idle", "Not connected");
    showNotice("");
    askForKey();
  });
  window.addEventListener("hashchange", route);
  $("search").addEventListener("input", render);
  $("search").addEventListener("keydown", (event) => {
    if (event.key === "Enter") searchExact();
  });
  for (const id of ["filter-readiness", "filter-turn"]) {
    $(id).addEventListener("change", () => {
      render();
      if (state.key) loadSessions();
    });
  }
  // Relative times ("12 s ago") move on by themselves.
  setInterval(() => {
    if (state.sessions.size && !$("sessions-panel").hidden) render();
  }, 15000);

  const key = fromUrl || sessionStorage.getItem(KEY_STORAGE);
  if (key) start(key);
  else askForKey();
}

init();
