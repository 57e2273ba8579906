// The dashboard's pages besides the session list: one session, alerts, failures with
// charts, and subscriptions. Each page reads the API when shown and follows the change
// stream (`onChange`) while it is shown. All text goes in by textContent.

import {
  $,
  AuthError,
  api,
  badge,
  cell,
  clip,
  el,
  errorText,
  formatCost,
  formatDuration,
  formatTime,
  numberFormat,
  plural,
  sessionLink,
  table,
  tokens,
} from "./common.js";
import { histogram, timeBars } from "./charts.js";

const OUTCOME_TYPES = [
  "session.ready",
  "session.ready_timeout",
  "turn.completed",
  "turn.failed",
  "turn.stalled",
];
const SESSION_CHANGE_TYPES = [
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
const PAGE = 1000;
const ALERT_WIDTHS = [15, 20, 22, 18, 25];
const MAX_PAGES = 20;

async function allChanges(key, types) {
  const items = [];
  let after = 0;
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const params = new URLSearchParams({ after: String(after), limit: String(PAGE) });
    params.set("type", types.join(","));
    const answer = await api(key, `/v1/changes?${params}`);
    items.push(...answer.items);
    if (answer.next_after === null) break;
    after = answer.next_after;
  }
  return items;
}

async function allPages(key, path) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const params = new URLSearchParams({ limit: "200" });
    if (cursor) params.set("cursor", cursor);
    const answer = await api(key, `${path}?${params}`);
    items.push(...answer.items);
    cursor = answer.next_cursor;
    if (!cursor) break;
  }
  return items;
}

// -- alerts, from the change log -------------------------------------------------------

// Each alert change with what ended it: a `session.ready` after a ready timeout, the
// turn's end after a stall.
export function deriveAlerts(changes) {
  const alerts = [];
  const open = new Map(); // key -> alert
  for (const change of changes) {
    const turnKey = `turn ${change.session_id} ${change.turn_id}`;
    const readyKey = `ready ${change.session_id}`;
    if (change.type === "session.ready_timeout" || change.type === "turn.stalled") {
      const key = change.type === "turn.stalled" ? turnKey : readyKey;
      const alert = { change, resolvedBy: null };
      alerts.push(alert);
      open.set(key, alert);
    } else if (change.type === "session.ready" && open.has(readyKey)) {
      open.get(readyKey).resolvedBy = change;
      open.delete(readyKey);
    } else if ((change.type === "turn.completed" || change.type === "turn.failed") && open.has(turnKey)) {
      open.get(turnKey).resolvedBy = change;
      open.delete(turnKey);
    }
  }
  return alerts.reverse(); // newest first
}

function alertWhat(change) {
  if (change.type === "turn.stalled") return `${change.turn_id} still running`;
  const session = change.session || {};
  const missing = [];
  if (!session.worker_ready) missing.push("worker not ready");
  return `not ready${missing.length ? `: ${missing.join(", ")}` : ""}`;
}

// -- why a session is (not) ready ------------------------------------------------------

const STEP_TYPES = {
  created: ["agent.chat.session.created"],
  runtime: ["agent.runtime.reused", "agent.runtime.started"],
  scope: ["agent.scope.activated"],
  worker: ["agent.worker.ready"],
};

function timeline(session, events) {
  const first = (types) => events.find((e) => types.includes(e.type)) || null;
  const last = (types) => [...events].reverse().find((e) => types.includes(e.type)) || null;
  const runtime = last(STEP_TYPES.runtime);
  return [
    { step: "Created", at: session.created_at, done: true, note: "" },
    {
      step: "Runtime",
      at: runtime ? runtime.occurred_at : null,
      done: runtime !== null,
      note: runtime ? (runtime.type.endsWith("reused") ? "reused" : "started") : "no runtime event yet",
    },
    {
      step: "Scope",
      at: last(STEP_TYPES.scope)?.occurred_at || null,
      done: session.scope_activated,
      note: session.scope_activated ? "activated" : "not activated",
    },
    {
      step: "Worker",
      at: last(STEP_TYPES.worker)?.occurred_at || null,
      done: session.worker_ready,
      note: session.worker_ready
        ? "ready"
        : first(STEP_TYPES.worker)
          ? "a runtime or scope event came after the last worker-ready"
          : "no worker-ready event yet",
    },
    {
      step: "Ready",
      at: session.ready_at,
      done: session.readiness === "ready",
      note:
        session.readiness === "ready"
          ? `after ${formatDuration(session.time_to_ready_ms)}`
          : "provisioning",
    },
  ];
}

export function readinessVerdict(session) {
  if (session.readiness === "ready") {
    return `Ready since ${formatTime(session.ready_at)}, ${formatDuration(session.time_to_ready_ms)} after it was created.`;
  }
  const since = Date.now() - Date.parse(session.created_at);
  if (!session.worker_ready) {
    const before = session.runtime_reused === null ? "no runtime yet; " : "";
    return `Not ready: ${before}waiting for the worker (agent.worker.ready) for ${formatDuration(since)} since creation.`;
  }
  return "Not ready: a runtime or scope event is newer than the last worker-ready.";
}

// -- the views ---------------------------------------------------------------------------

export class Views {
  constructor(getKey, onAuthError, notify) {
    this.getKey = getKey;
    this.onAuthError = onAuthError;
    this.notify = notify;
    this.current = null; // {name, arg}
    this.outcomes = null; // outcome changes, for alerts and failures
    this.session = null; // the session page's data
    this.sessions = () => [];
  }

  async guard(work) {
    try {
      return await work();
    } catch (error) {
      if (error instanceof AuthError) {
        if (error.status === 403) this.notify(`Not allowed with this key (403): ${error.message}.`);
        else this.onAuthError(error);
      } else {
        this.notify(error.message, "warning");
      }
      return null;
    }
  }

  // Leave the page shown: its own stream, if any, closes.
  leave() {
    this.current = null;
    if (this.sessionStream) this.sessionStream.close();
    this.sessionStream = null;
    clearTimeout(this.renderTimer);
  }

  async show(name, arg) {
    this.leave();
    this.current = { name, arg };
    if (name === "session") await this.showSession(arg);
    else if (name === "alerts") await this.showAlerts();
    else if (name === "failures") await this.showFailures();
    else if (name === "subscriptions") await this.showSubscriptions();
  }

  onChange(change) {
    if (!this.current) return;
    if (this.outcomes && OUTCOME_TYPES.includes(change.type)) {
      if (!this.outcomes.some((c) => c.id === change.id)) this.outcomes.push(change);
      if (this.current.name === "alerts") this.renderAlerts();
      if (this.current.name === "failures") this.renderFailures();
    }
  }

  // -- one session -------------------------------------------------------------------------

  async showSession(sessionId) {
    const key = this.getKey();
    const base = `/v1/sessions/${encodeURIComponent(sessionId)}`;
    $("session-title").textContent = sessionId;
    $("session-title").title = sessionId;
    const loaded = await this.guard(async () => {
      const [session, turns, events] = await Promise.all([
        api(key, base),
        allPages(key, `${base}/turns`),
        allPages(key, `${base}/events`),
      ]);
      const byId = new Map(turns.map((t) => [t.turn_id, t]));
      return { session, turns: byId, events, changes: [], seen: new Set() };
    });
    if (!loaded || this.current?.name !== "session" || this.current.arg !== sessionId) return;
    this.session = loaded;
    this.renderSession();
    // The session's own stream from its first change: its history, then live.
    const params = new URLSearchParams({ access_token: key, last_event_id: "0" });
    const stream = new EventSource(`${base}/stream?${params}`);
    this.sessionStream = stream;
    const onChange = (event) => {
      if (stream !== this.sessionStream) return;
      let change;
      try {
        change = JSON.parse(event.data);
      } catch {
        return;
      }
      this.sessionChange(change);
    };
    for (const type of SESSION_CHANGE_TYPES) stream.addEventListener(type, onChange);
  }

  sessionChange(change) {
    const data = this.session;
    if (data.seen.has(change.id)) return;
    data.seen.add(change.id);
    data.changes.push(change);
    if (change.session && change.session.version > data.session.version) data.session = change.session;
    if (change.turn) {
      const known = data.turns.get(change.turn.turn_id);
      if (!known || known.version < change.turn.version) data.turns.set(change.turn.turn_id, change.turn);
    }
    // A replayed history comes in a burst: draw once it has come.
    clearTimeout(this.renderTimer);
    this.renderTimer = setTimeout(() => {
      if (this.session === data) this.renderSession();
    }, 40);
    // The raw events behind the change: read again, shortly.
    clearTimeout(this.eventsTimer);
    this.eventsTimer = setTimeout(async () => {
      const sessionId = this.current?.arg;
      if (this.current?.name !== "session" || sessionId !== data.session.session_id) return;
      const events = await this.guard(() =>
        allPages(this.getKey(), `/v1/sessions/${encodeURIComponent(sessionId)}/events`),
      );
      if (events && this.session === data) {
        data.events = events;
        this.renderSession();
      }
    }, 300);
  }

  renderSession() {
    const { session, turns, events, changes } = this.session;
    $("session-badges").replaceChildren(
      badge("readiness", session.readiness),
      badge("turn", session.turn_status === "running" ? "running" : session.last_turn?.status || "idle"),
    );
    const verdict = $("session-verdict");
    verdict.textContent = readinessVerdict(session);
    verdict.dataset.readiness = session.readiness;

    const steps = timeline(session, events);
    $("session-timeline").replaceChildren(
      ...steps.map((step) => {
        const item = el("li", step.done ? "done" : "pending");
        item.dataset.step = step.step.toLowerCase();
        item.append(el("strong", null, step.step), el("span", "mono", formatTime(step.at)), el("span", "sub", step.note));
        return item;
      }),
    );

    const counts = session.counts;
    $("session-summary").textContent = [
      plural(counts.turns, "turn"),
      `${counts.completed} completed`,
      `${counts.failed} failed`,
      plural(counts.conflicts, "conflict"),
      `${numberFormat.format(tokens(session.usage))} tokens`,
      formatCost(session.usage?.cost_micros),
    ].join(" · ");

    const ordered = [...turns.values()].sort((a, b) =>
      (b.started_at || b.updated_at || "").localeCompare(a.started_at || a.updated_at || ""),
    );
    const turnRows = ordered.map((turn) => {
      const tr = el("tr");
      tr.dataset.turnId = turn.turn_id;
      tr.dataset.status = turn.status;
      const usage = turn.usage ? `${numberFormat.format(tokens(turn.usage))} tokens · ${formatCost(turn.usage.cost_micros)}` : "—";
      const calls = turn.tool_calls;
      const running = calls?.running?.length ? ` · running: ${calls.running.join(", ")}` : "";
      const tools = calls && calls.count ? `${calls.count}${running}` : "—";
      let error = errorText(turn.error);
      if (turn.status === "conflict") error = `another turn was active: ${turn.active_turn_id || "?"}`;
      tr.append(
        cell(clip("span", "mono", turn.turn_id)),
        cell(badge("turn", turn.status)),
        cell(clip("span", "mono", formatTime(turn.started_at))),
        cell(el("span", "mono", formatDuration(turn.duration_ms))),
        cell(clip("span", "mono", usage)),
        cell(clip("span", "mono", tools)),
        cell(clip("span", turn.status === "failed" ? "error-text" : "sub", error || "—")),
      );
      return tr;
    });
    $("session-turns").replaceChildren(
      turnRows.length
        ? table(["Turn", "Status", "Started", "Duration", "Usage", "Tools", "Error"], turnRows, "fixed turns", [12, 10, 16, 8, 15, 10, 29])
        : el("p", "empty", "No turns yet."),
    );

    const changeRows = [...changes].reverse().slice(0, 200).map((change) => {
      const tr = el("tr");
      tr.dataset.changeType = change.type;
      tr.append(
        cell(el("span", "mono", String(change.id))),
        cell(clip("span", "mono", change.type)),
        cell(clip("span", "mono", formatTime(change.occurred_at))),
        cell(clip("span", "mono", change.turn_id || "—")),
      );
      return tr;
    });
    $("session-changes").replaceChildren(
      table(["Id", "Type", "At", "Turn"], changeRows, "fixed changes", [13, 33, 37, 17]),
    );
    const eventRows = [...events].reverse().slice(0, 200).map((event) => {
      const tr = el("tr");
      tr.append(
        cell(clip("span", "mono", event.type)),
        cell(clip("span", "mono", formatTime(event.occurred_at))),
        cell(clip("span", "mono", event.source)),
        cell(clip("span", "mono", event.id)),
      );
      return tr;
    });
    $("session-events").replaceChildren(table(["Event", "Occurred", "Source", "Id"], eventRows, "fixed events", [36, 37, 12, 15]));
  }

  // -- alerts --------------------------------------------------------------------------------

  async loadOutcomes() {
    const changes = await this.guard(() => allChanges(this.getKey(), OUTCOME_TYPES));
    if (changes) this.outcomes = changes;
    return changes !== null;
  }

  async showAlerts() {
    if (await this.loadOutcomes()) this.renderAlerts();
  }

  renderAlerts() {
    const alerts = deriveAlerts(this.outcomes || []);
    const row = (alert) => {
      const { change, resolvedBy } = alert;
      const tr = el("tr");
      tr.dataset.alert = change.type;
      tr.dataset.sessionId = change.session_id;
      tr.dataset.state = resolvedBy ? "resolved" : "open";
      tr.append(
        cell(clip("span", "mono", change.type)),
        cell(sessionLink(change.session_id)),
        cell(clip("span", null, alertWhat(change))),
        cell(clip("span", "mono", formatTime(change.occurred_at))),
        cell(
          resolvedBy
            ? clip("span", "sub", `${resolvedBy.type} at ${formatTime(resolvedBy.occurred_at)}`)
            : badge("alert", "open"),
        ),
      );
      return tr;
    };
    const open = alerts.filter((a) => !a.resolvedBy);
    const resolved = alerts.filter((a) => a.resolvedBy).slice(0, 50);
    const headings = ["Alert", "Session", "What", "Fired", "Resolved"];
    $("alerts-open").replaceChildren(
      open.length ? table(headings, open.map(row), "fixed alerts", ALERT_WIDTHS) : el("p", "empty", "No open alerts."),
    );
    $("alerts-resolved").replaceChildren(
      resolved.length
        ? table(headings, resolved.map(row), "fixed alerts", ALERT_WIDTHS)
        : el("p", "empty", "Nothing resolved recently."),
    );
  }

  // -- failures and charts -------------------------------------------------------------------

  async showFailures() {
    if (await this.loadOutcomes()) this.renderFailures();
  }

  renderFailures() {
    const changes = this.outcomes || [];
    const failed = changes.filter((c) => c.type === "turn.failed").reverse();
    const rows = failed.slice(0, 200).map((change) => {
      const tr = el("tr");
      tr.dataset.sessionId = change.session_id;
      tr.dataset.turnId = change.turn_id;
      tr.append(
        cell(sessionLink(change.session_id)),
        cell(clip("span", "mono", change.turn_id)),
        cell(clip("span", "mono", formatTime(change.occurred_at))),
        cell(el("span", "mono", formatDuration(change.turn?.duration_ms))),
        cell(clip("span", "error-text", errorText(change.turn?.error) || "no error given")),
      );
      return tr;
    });
    $("failures-count").textContent = `${plural(failed.length, "failed turn")}`;
    $("failures-table").replaceChildren(
      rows.length
        ? table(["Session", "Turn", "Failed at", "Duration", "Error"], rows, "fixed failures", [20, 11, 19, 9, 41])
        : el("p", "empty", "No turn has failed."),
    );
    const ended = changes.filter((c) => c.type === "turn.completed" || c.type === "turn.failed");
    const durations = ended.map((c) => c.turn?.duration_ms).filter((v) => v !== null && v !== undefined);
    const ready = this.sessions()
      .map((s) => s.time_to_ready_ms)
      .filter((v) => v !== null && v !== undefined);
    $("chart-ready").replaceChildren(histogram(ready, "Time to ready", formatDuration));
    $("chart-duration").replaceChildren(histogram(durations, "Turn duration", formatDuration));
    $("chart-turns").replaceChildren(
      timeBars(
        ended.map((c) => ({ at: Date.parse(c.occurred_at), failed: c.type === "turn.failed" })),
        "Turns and failures over time",
        formatTime,
        1180,
      ),
    );
  }

  // -- subscriptions ---------------------------------------------------------------------------

  async showSubscriptions() {
    const key = this.getKey();
    const data = await this.guard(async () => {
      const list = await api(key, "/v1/subscriptions?limit=100");
      return Promise.all(
        list.items.map(async (sub) => {
          const deliveries = [];
          let after = 0;
          for (let page = 0; page < 5; page += 1) {
            const answer = await api(key, `/v1/subscriptions/${sub.id}/deliveries?after=${after}&limit=500`);
            deliveries.push(...answer.items);
            if (answer.next_after === null) break;
            after = answer.next_after;
          }
          return { sub, deliveries };
        }),
      );
    });
    if (data) this.renderSubscriptions(data);
  }

  async act(path, method, body) {
    const done = await this.guard(() => api(this.getKey(), path, method, body));
    if (done !== null) this.notify("");
    if (this.current?.name === "subscriptions") await this.showSubscriptions();
  }

  renderSubscriptions(data) {
    const cards = data.map(({ sub, deliveries }) => {
      const card = el("article", "card sub-card");
      card.dataset.subscriptionId = sub.id;
      card.dataset.enabled = String(sub.enabled);
      const head = el("div", "sub-head");
      const failedCount = deliveries.filter((d) => d.status === "failed").length;
      const toggle = el("button", "ghost", sub.enabled ? "Pause" : "Enable");
      toggle.dataset.action = sub.enabled ? "pause" : "enable";
      toggle.addEventListener("click", () =>
        sub.enabled
          ? this.act(`/v1/subscriptions/${sub.id}`, "PATCH", { enabled: false })
          : this.act(`/v1/subscriptions/${sub.id}/enable`, "POST"),
      );
      head.append(
        clip("strong", "mono", sub.id),
        badge("enabled", sub.enabled ? "enabled" : "disabled"),
        el("span", "sub", sub.format),
        toggle,
      );
      const facts = el("dl", "facts");
      const fact = (name, value) => {
        const dt = el("dt", null, name);
        const dd = clip("dd", "mono", value);
        facts.append(dt, dd);
      };
      fact("URL", sub.url);
      fact("Why disabled", sub.enabled ? "—" : sub.disabled_reason || "—");
      fact("Failing since", formatTime(sub.failing_since));
      fact("Queue", `${sub.queue_depth} waiting · ${failedCount} failed`);
      fact("Types", sub.types.join(", ") || "all but raw.*");
      const recent = deliveries.slice(-8).reverse().map((d) => {
        const tr = el("tr");
        tr.dataset.deliveryId = String(d.id);
        tr.dataset.status = d.status;
        const last = d.attempts[d.attempts.length - 1];
        const answer = last ? `${last.status_code ?? "no answer"}${last.error ? ` · ${last.error}` : ""}${last.response ? ` · ${last.response}` : ""}` : "not attempted yet";
        const retry = el("button", "ghost", "Retry");
        retry.dataset.action = "retry";
        retry.disabled = d.status === "delivering";
        retry.addEventListener("click", () => this.act(`/v1/deliveries/${d.id}/retry`, "POST"));
        tr.append(
          cell(clip("span", "mono", d.type)),
          cell(badge("delivery", d.status)),
          cell(el("span", "mono", String(d.attempt_count))),
          cell(clip("span", "mono", formatTime(last ? last.at : d.created_at))),
          cell(clip("span", "mono", answer)),
          cell(d.status === "failed" || d.status === "delivered" ? retry : null),
        );
        return tr;
      });
      card.append(
        head,
        facts,
        recent.length
          ? table(["Change", "Status", "Attempts", "Last attempt", "Answer", ""], recent, "fixed deliveries", [16, 11, 8, 19, 36, 10])
          : el("p", "empty", "No deliveries yet."),
      );
      return card;
    });
    $("subscriptions-list").replaceChildren(
      ...(cards.length ? cards : [el("p", "empty", "No subscriptions. Add one with relay subscriptions add URL.")]),
    );
  }
}
