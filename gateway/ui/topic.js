// One topic: live figures and charts, recent failures, the dead-letter browser with bulk
// replay/delete, pause/resume, and a test delivery to the backend.

import { ApiError, get, post, topicPath } from "./api.js";
import { LineChart } from "./charts.js";
import {
  DASH,
  confirmAction,
  excerpt,
  fmtInt,
  fmtMs,
  fmtRate,
  fmtTime,
  h,
  jobHref,
  notify,
  topicHref,
} from "./dom.js";
import { CAPACITY } from "./history.js";

const LIVE_ROWS = 20;
const FAILURE_ROWS = 50;
// How long new dead letters wait before the list is read again: deaths in a burst share it.
const DEAD_RELOAD_DELAY = 500;
// A topic the stats list with "configured": false (removed by a reload, jobs left).
const UNCONFIGURED_INFO =
  "Not configured: removed from the configuration (by a reload?). Its jobs wait in the" +
  " store, undelivered, until a topic of this name is configured again; its dead letters" +
  " can be listed and deleted, not replayed.";
const NO_REPLAY = "Not configured: add the topic back and reload before replaying";
// A topic the stats do not list at all.
const UNKNOWN_INFO =
  "Unknown topic: not in the configuration, and no job of it in the store (removed by a" +
  " reload, or a mistyped address).";

function findTopic(snapshot, queue, topic) {
  for (const q of snapshot.queues) {
    if (q.name !== queue) continue;
    for (const t of q.topics) if (t.topic === topic) return t;
  }
  return null;
}

function plural(count, word) {
  return `${fmtInt(count)} ${word}${count === 1 ? "" : "s"}`;
}

/** Text or a <details> with the whole text when it is long. */
function longText(text, length = 80) {
  if (!text) return DASH;
  if (text.length <= length && !text.includes("\n")) return h("code", null, text);
  return h("details", null, h("summary", null, excerpt(text, length)), h("pre", null, text));
}

function outcomeBadge(outcome) {
  return h("span", { class: `badge outcome-${outcome}` }, outcome);
}

function statusText(status) {
  return status === null || status === undefined ? "no response" : String(status);
}

/** A failure or live attempt as a table row. */
function attemptRow(event) {
  const output = [];
  if (event.body) output.push(h("h4", null, "Body"), h("pre", null, event.body));
  if (event.stderr) output.push(h("h4", null, "stderr"), h("pre", null, event.stderr));
  return h(
    "tr",
    { dataset: { job: event.job_id } },
    h("td", { class: "time" }, fmtTime(event.at)),
    h("td", null, h("a", { href: jobHref(event.job_id), class: "mono" }, event.job_id)),
    h("td", { class: "num" }, String(event.attempt)),
    h("td", null, outcomeBadge(event.outcome)),
    h("td", { class: "num" }, statusText(event.status)),
    h("td", { class: "num" }, fmtMs(event.duration_ms)),
    h("td", { class: "error-text" }, event.error || DASH),
    h(
      "td",
      null,
      output.length ? h("details", null, h("summary", null, "body / stderr"), output) : DASH,
    ),
  );
}

function attemptHead() {
  return h(
    "thead",
    null,
    h(
      "tr",
      null,
      ["When", "Job", "Attempt", "Outcome", "Status", "Duration", "Error", "Output"].map((label) =>
        h("th", { scope: "col" }, label),
      ),
    ),
  );
}

/** Whether a total of the snapshot went further than the live events told since `mark`. */
function missedEvents(total, mark, events) {
  return mark !== null && total - mark.total > events - mark.events;
}

/** datetime-local value -> unix seconds, or undefined when empty. */
function unixSeconds(value) {
  if (!value) return undefined;
  const ms = new Date(value).getTime();
  return Number.isNaN(ms) ? undefined : ms / 1000;
}

export class TopicView {
  constructor(app, queue, topic) {
    this.app = app;
    this.queue = queue;
    this.topic = topic;
    this.path = topicPath(queue, topic);
    this.dead = { filter: {}, cursors: [null], page: 0, selected: new Set(), ids: [] };
    this.disposed = false;
    this.deadEvents = 0; // dead-letter events seen, so a list fetched meanwhile is known stale
    this.deadTimer = null;
    // The live feed samples job events over every topic (so many a second), so this topic's
    // may not come while others are busy.  The snapshot's counters miss none: each list
    // remembers the counter it was read at and the events seen since, to tell when it
    // missed some (`missedEvents`).
    this.failureEvents = 0; // failed attempts the live feed told of
    this.failuresMark = null;
    this.deadMark = null;
    this.unconfigured = false;
    this.unknown = false;
  }

  crumbs() {
    return [{ label: this.queue }, { label: this.topic, href: topicHref(this.queue, this.topic) }];
  }

  title() {
    return `${this.queue}/${this.topic}`;
  }

  mount(root) {
    this.root = root;
    this.badges = {
      circuit: h("span", { class: "badge", id: "topic-circuit" }, DASH),
      state: h("span", { class: "badge", id: "topic-state" }, DASH),
    };
    this.pauseButton = h("button", { type: "button", id: "pause" }, "Pause");
    this.resumeButton = h("button", { type: "button", id: "resume" }, "Resume");
    this.pauseButton.addEventListener("click", () => this.setPaused(true));
    this.resumeButton.addEventListener("click", () => this.setPaused(false));
    this.info = h("p", { class: "muted", id: "topic-info" }, "");
    const header = h(
      "section",
      { class: "page-head" },
      h(
        "div",
        null,
        h("h1", null, h("span", { class: "muted" }, `${this.queue} / `), this.topic),
        this.info,
      ),
      h(
        "div",
        { class: "head-actions" },
        this.badges.circuit,
        this.badges.state,
        this.pauseButton,
        this.resumeButton,
      ),
    );

    this.figures = new Map();
    const group = (title, items) =>
      h(
        "div",
        { class: "figure-group" },
        h("h3", null, title),
        h(
          "dl",
          null,
          items.map(([key, label, hint]) => {
            const value = h("dd", { dataset: { figure: key } }, DASH);
            this.figures.set(key, value);
            return h("div", { title: hint || null }, h("dt", null, label), value);
          }),
        ),
      );
    const figures = h(
      "section",
      { class: "card figures" },
      group("Depth", [
        ["ready", "Ready"],
        ["delayed", "Delayed"],
        ["leased", "Leased"],
        ["dead", "Dead"],
        ["done_kept", "Done (kept)"],
        ["in_flight", "In flight", "Deliveries running now / concurrency"],
      ]),
      group("Totals", [
        ["pushed", "Pushed"],
        ["done", "Done"],
        ["retried", "Retried"],
        ["died", "Died"],
        ["failed", "Failed", "Retried + died"],
        ["expired", "Expired", "Leases that ran out"],
        ["replayed", "Replayed"],
        ["unmatched", "Unmatched", "Pushed but filtered out"],
      ]),
      group("Rates", [
        ["in_s", "In/s"],
        ["out_s", "Out/s"],
        ["in_m", "In/min"],
        ["out_m", "Out/min"],
      ]),
      group("Delivery time", [
        ["p50", "p50"],
        ["p95", "p95"],
        ["p99", "p99"],
        ["samples", "Samples"],
      ]),
      group("Backend", [
        ["errors", "Errors", "Backend errors by kind, since start"],
        ["opened", "Circuit opened", "Times the circuit opened"],
        ["consecutive", "Failing in a row"],
        ["health", "Pool", "php-fpm status (status_path)"],
      ]),
    );

    this.throughput = new LineChart({
      title: "Throughput (jobs/s)",
      series: [
        { key: "in", label: "in", colour: "c-in" },
        { key: "out", label: "out", colour: "c-out" },
      ],
      format: fmtRate,
      span: CAPACITY,
    });
    this.latency = new LineChart({
      title: "Delivery time",
      series: [
        { key: "p50", label: "p50", colour: "c-p50" },
        { key: "p95", label: "p95", colour: "c-p95" },
        { key: "p99", label: "p99", colour: "c-p99" },
      ],
      format: fmtMs,
      span: CAPACITY,
    });

    root.append(
      header,
      figures,
      h("section", { class: "charts two" }, this.throughput.element, this.latency.element),
      this.failuresSection(),
      this.deadSection(),
      this.testSection(),
    );
    if (this.app.snapshot) this.update(this.app.snapshot);
    this.loadFailures();
    this.loadDead();
  }

  unmount() {
    this.disposed = true;
    clearTimeout(this.deadTimer);
    this.throughput.dispose();
    this.latency.dispose();
  }

  // -- live figures ----------------------------------------------------------------------------

  update(snapshot) {
    const t = findTopic(snapshot, this.queue, this.topic);
    const series = this.app.history.topic(this.queue, this.topic);
    if (series) {
      const times = this.app.history.times;
      this.throughput.draw(times, series);
      this.latency.draw(times, series);
    }
    if (!t) {
      this.showUnknown();
      return;
    }
    if (this.unknown) {
      this.unknown = false;
      this.showSelection();
    }
    this.stats = t;
    // Lists read before the first snapshot count from it.
    this.failuresMark ??= this.mark("failed", this.failureEvents);
    this.deadMark ??= this.mark("dead", this.deadEvents);
    if (missedEvents(t.totals.failed, this.failuresMark, this.failureEvents)) {
      this.loadFailures();
    }
    if (missedEvents(t.totals.dead, this.deadMark, this.deadEvents)) this.newDeadLetters();
    const set = (key, text) => {
      const element = this.figures.get(key);
      if (element.textContent !== text) element.textContent = text;
    };
    for (const key of ["ready", "delayed", "leased", "dead", "done_kept"]) {
      set(key, fmtInt(t.depth[key]));
    }
    this.figures.get("dead").classList.toggle("bad", t.depth.dead > 0);
    const configured = t.configured !== false;
    set("in_flight", configured ? `${fmtInt(t.in_flight)} / ${fmtInt(t.concurrency)}` : DASH);
    for (const key of ["pushed", "done", "retried", "failed", "expired", "replayed", "unmatched"]) {
      set(key, fmtInt(t.totals[key]));
    }
    set("died", fmtInt(t.totals.dead));
    set("in_s", fmtRate(t.rates.in_per_second));
    set("out_s", fmtRate(t.rates.out_per_second));
    set("in_m", fmtRate(t.rates.in_per_minute));
    set("out_m", fmtRate(t.rates.out_per_minute));
    set("p50", fmtMs(t.duration_ms.p50));
    set("p95", fmtMs(t.duration_ms.p95));
    set("p99", fmtMs(t.duration_ms.p99));
    set("samples", fmtInt(t.duration_ms.samples));
    const errors = Object.entries(t.backend_errors || {});
    set("errors", errors.length ? errors.map(([k, v]) => `${k}: ${fmtInt(v)}`).join(", ") : "none");
    set("opened", fmtInt(t.circuit.opened_total));
    set("consecutive", fmtInt(t.circuit.consecutive_failures));
    const health = t.backend_health;
    set(
      "health",
      health
        ? Object.entries(health)
            .filter(([, v]) => typeof v !== "object")
            .slice(0, 6)
            .map(([k, v]) => `${k}: ${v}`)
            .join(", ")
        : DASH,
    );
    const rate = t.rate_limit === null ? "no rate limit" : `at most ${fmtRate(t.rate_limit)}/s`;
    const info = configured
      ? `${t.kind} backend ${t.backend} · concurrency ${t.concurrency} · ${rate}`
      : UNCONFIGURED_INFO;
    if (this.info.textContent !== info) this.info.textContent = info;
    this.info.classList.toggle("form-error", !configured);
    if (configured !== !this.unconfigured) {
      this.unconfigured = !configured;
      this.showSelection(); // replay: not while nothing would deliver the jobs
      this.testCard.hidden = !configured;
    }
    if (configured) this.showState(t.paused, t.circuit.state);
    else this.showUnconfigured();
    this.deadCount.textContent = `${plural(t.depth.dead, "dead letter")} kept`;
  }

  /** Figures of a topic that is gone would pass for its state now: shown as unknown. */
  showUnknown() {
    if (this.unknown) return;
    this.unknown = true;
    this.stats = null;
    for (const element of this.figures.values()) element.textContent = DASH;
    this.figures.get("dead").classList.remove("bad");
    this.info.textContent = UNKNOWN_INFO;
    this.info.classList.add("form-error");
    this.showUnconfigured();
    this.badges.state.textContent = "unknown";
    // Nothing to replay to or test; `update` brings them back if the topic comes back.
    this.unconfigured = true;
    this.showSelection();
    this.testCard.hidden = true;
    this.deadCount.textContent = "";
  }

  showState(paused, circuit) {
    const state = this.badges.state;
    state.textContent = paused ? "paused" : "running";
    state.className = `badge ${paused ? "paused" : "running"}`;
    if (circuit) {
      this.badges.circuit.textContent = `circuit ${circuit}`;
      this.badges.circuit.className = `badge circuit-${circuit}`;
    }
    this.pauseButton.disabled = paused;
    this.resumeButton.disabled = !paused;
  }

  showUnconfigured() {
    this.badges.state.textContent = "not configured";
    this.badges.state.className = "badge unconfigured";
    this.badges.circuit.textContent = "no circuit";
    this.badges.circuit.className = "badge";
    this.pauseButton.disabled = true;
    this.resumeButton.disabled = true;
  }

  async setPaused(paused) {
    const button = paused ? this.pauseButton : this.resumeButton;
    button.disabled = true;
    try {
      const answer = await post(`${this.path}/${paused ? "pause" : "resume"}`, {});
      this.showState(answer.paused, null);
      notify(
        answer.paused
          ? `Paused ${this.title()}: pushes are still accepted, no new delivery starts.`
          : `Resumed ${this.title()}: delivering again.`,
      );
    } catch (error) {
      button.disabled = false;
      if (error instanceof ApiError && error.status !== 401) {
        const verb = paused ? "pause" : "resume";
        notify(`Could not ${verb} ${this.title()}: ${error.message}`, "error");
      } else if (!(error instanceof ApiError)) throw error;
    }
  }

  /** What a list read now reflects: a total of the snapshot and the live events so far. */
  mark(total, events) {
    return this.stats ? { total: this.stats.totals[total], events } : null;
  }

  // -- attempts and failures -------------------------------------------------------------------

  failuresSection() {
    this.failures = h("tbody", { id: "failures-body" });
    this.failuresEmpty = h("p", { class: "muted" }, "No failed attempt since the daemon started.");
    this.liveRows = h("tbody", { id: "live-attempts" });
    this.liveEmpty = h("p", { class: "muted" }, "Attempts appear here as they finish.");
    const refresh = h("button", { type: "button", class: "quiet" }, "Refresh");
    refresh.addEventListener("click", () => this.loadFailures());
    return h(
      "section",
      { class: "card" },
      h("div", { class: "section-head" }, h("h2", null, "Recent failures"), refresh),
      this.failuresEmpty,
      h(
        "div",
        { class: "scroll" },
        (this.failuresTable = h(
          "table",
          { class: "attempts", id: "failures", hidden: true },
          attemptHead(),
          this.failures,
        )),
      ),
      h(
        "h2",
        { class: "subhead" },
        "Latest attempts ",
        h("span", { class: "muted small" }, "(live)"),
      ),
      this.liveEmpty,
      h(
        "div",
        { class: "scroll" },
        (this.liveTable = h(
          "table",
          { class: "attempts", id: "live", hidden: true },
          attemptHead(),
          this.liveRows,
        )),
      ),
    );
  }

  async loadFailures() {
    this.failuresMark = this.mark("failed", this.failureEvents);
    try {
      const answer = await get(this.path);
      if (this.disposed) return;
      const rows = (answer.recent_failures || []).slice(0, FAILURE_ROWS).map(attemptRow);
      this.failures.replaceChildren(...rows);
      this.failuresEmpty.hidden = rows.length > 0;
      this.failuresTable.hidden = rows.length === 0;
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (error.status === 401 || this.disposed) return;
      this.failuresEmpty.hidden = false;
      this.failuresEmpty.textContent = `Could not read this topic: ${error.message}`;
      this.failuresEmpty.classList.add("form-error");
      if (error.status === 404) {
        this.info.textContent = error.message;
        this.info.classList.add("form-error");
      }
    }
  }

  onEvent(event) {
    if (event.type !== "attempt" || event.queue !== this.queue || event.topic !== this.topic) {
      return;
    }
    this.liveRows.prepend(attemptRow(event));
    while (this.liveRows.children.length > LIVE_ROWS) this.liveRows.lastElementChild.remove();
    this.liveEmpty.hidden = true;
    this.liveTable.hidden = false;
    if (event.outcome !== "done") {
      this.failureEvents += 1;
      this.failures.prepend(attemptRow(event));
      while (this.failures.children.length > FAILURE_ROWS) this.failures.lastElementChild.remove();
      this.failuresEmpty.hidden = true;
      this.failuresTable.hidden = false;
    }
    if (event.outcome === "dead") {
      this.deadEvents += 1;
      this.newDeadLetters();
    }
  }

  /** Keep the first page current, unless the operator is in the middle of choosing. */
  newDeadLetters() {
    // Throttled, not debounced: jobs dying faster than the delay would put the reload off
    // for as long as they keep dying.  One reload serves every death until it runs.
    if (this.deadTimer !== null) return;
    this.deadTimer = setTimeout(() => {
      this.deadTimer = null;
      // Asked now, not when scheduled: the operator may have started choosing meanwhile.
      if (this.dead.page === 0 && this.dead.selected.size === 0) this.loadDead(0);
      else this.deadStale.hidden = false;
    }, DEAD_RELOAD_DELAY);
  }

  // -- dead letters ----------------------------------------------------------------------------

  deadSection() {
    const field = (id, label, input) =>
      h("div", { class: "field" }, h("label", { for: id }, label), input);
    const inputs = {
      status: h("input", { id: "dead-status", type: "number", min: 0, max: 999, step: 1 }),
      error: h("input", { id: "dead-error", type: "search", placeholder: "substring" }),
      since: h("input", { id: "dead-since", type: "datetime-local", step: 1 }),
      until: h("input", { id: "dead-until", type: "datetime-local", step: 1 }),
      attribute: h("input", {
        id: "dead-attribute",
        type: "search",
        placeholder: "name:value",
        spellcheck: "false",
      }),
      limit: h(
        "select",
        { id: "dead-limit" },
        [25, 50, 100, 200, 500].map((n) =>
          h("option", { value: n, selected: n === 50 }, String(n)),
        ),
      ),
    };
    this.deadInputs = inputs;
    const form = h(
      "form",
      { class: "filters", id: "dead-filters" },
      field("dead-status", "Status", inputs.status),
      field("dead-error", "Error contains", inputs.error),
      field("dead-since", "Died since", inputs.since),
      field("dead-until", "Died before", inputs.until),
      field("dead-attribute", "Attribute", inputs.attribute),
      field("dead-limit", "Per page", inputs.limit),
      h(
        "div",
        { class: "field buttons" },
        h("button", { type: "submit", class: "primary", id: "dead-apply" }, "Apply filter"),
        h("button", { type: "reset", id: "dead-clear" }, "Clear"),
      ),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.dead.filter = this.readFilter();
      this.loadDead(0, true);
    });
    form.addEventListener("reset", () => {
      setTimeout(() => {
        this.dead.filter = {};
        this.loadDead(0, true);
      });
    });

    const button = (id, label, cls, handler) => {
      const element = h("button", { type: "button", id, class: cls }, label);
      element.addEventListener("click", handler);
      return element;
    };
    this.replaySelected = button("dead-replay-selected", "Replay selected", "primary", () =>
      this.actOnSelected("replay"),
    );
    this.deleteSelected = button("dead-delete-selected", "Delete selected", "danger", () =>
      this.actOnSelected("delete"),
    );
    this.replayMatching = button("dead-replay-filter", "Replay all matching filter", "", () =>
      this.actOnFilter("replay"),
    );
    this.deleteMatching = button(
      "dead-delete-filter",
      "Delete all matching filter",
      "danger",
      () => this.actOnFilter("delete"),
    );
    this.selectionText = h("span", { class: "muted", id: "dead-selection" }, "");

    this.selectAll = h("input", {
      type: "checkbox",
      "aria-label": "Select every job on this page",
    });
    this.selectAll.addEventListener("change", () => {
      for (const box of this.deadRows.querySelectorAll("input[type=checkbox]")) {
        box.checked = this.selectAll.checked;
        this.select(box.value, box.checked);
      }
    });
    this.deadRows = h("tbody", { id: "dead-body" });
    this.deadEmpty = h("p", { class: "muted", id: "dead-empty", hidden: true }, "");
    this.deadCount = h("span", { class: "muted", id: "dead-count" }, "");
    this.deadStale = h(
      "p",
      { class: "hint", hidden: true },
      "New dead letters arrived. ",
      button("dead-reload", "Reload the list", "link", () => this.loadDead(this.dead.page)),
    );
    this.prevButton = button("dead-prev", "← Previous page", "", () =>
      this.loadDead(this.dead.page - 1),
    );
    this.nextButton = button("dead-next", "Next page →", "", () =>
      this.loadDead(this.dead.page + 1),
    );
    this.pageText = h("span", { class: "muted", id: "dead-page" }, "");

    return h(
      "section",
      { class: "card", id: "dead-letters" },
      h("div", { class: "section-head" }, h("h2", null, "Dead letters"), this.deadCount),
      form,
      h(
        "div",
        { class: "toolbar" },
        this.replaySelected,
        this.deleteSelected,
        this.selectionText,
        h("span", { class: "spacer" }),
        this.replayMatching,
        this.deleteMatching,
      ),
      this.deadStale,
      h(
        "div",
        { class: "scroll" },
        h(
          "table",
          { class: "dead", id: "dead-table" },
          h(
            "thead",
            null,
            h(
              "tr",
              null,
              h("th", { class: "check" }, this.selectAll),
              ["Job", "Died", "Attempts", "Status", "Error", "Payload", "Attributes"].map((label) =>
                h("th", { scope: "col" }, label),
              ),
            ),
          ),
          this.deadRows,
        ),
      ),
      this.deadEmpty,
      h("div", { class: "pager" }, this.prevButton, this.pageText, this.nextButton),
    );
  }

  readFilter() {
    const inputs = this.deadInputs;
    const filter = {};
    const status = inputs.status.value.trim();
    if (status !== "") filter.status = Number(status);
    const error = inputs.error.value.trim();
    if (error) filter.error = error;
    const since = unixSeconds(inputs.since.value);
    if (since !== undefined) filter.since = since;
    const until = unixSeconds(inputs.until.value);
    if (until !== undefined) filter.until = until;
    const attribute = inputs.attribute.value.trim();
    if (attribute) filter.attribute = attribute;
    return filter;
  }

  describeFilter(filter) {
    const parts = [];
    if (filter.status !== undefined) parts.push(`status ${filter.status}`);
    if (filter.error) parts.push(`error containing “${filter.error}”`);
    if (filter.since !== undefined) parts.push(`died since ${fmtTime(filter.since)}`);
    if (filter.until !== undefined) parts.push(`died before ${fmtTime(filter.until)}`);
    if (filter.attribute) parts.push(`attribute ${filter.attribute}`);
    return parts.join(", ");
  }

  select(id, on) {
    if (on) this.dead.selected.add(id);
    else this.dead.selected.delete(id);
    this.showSelection();
  }

  showSelection() {
    const count = this.dead.selected.size;
    this.replaySelected.disabled = count === 0 || this.unconfigured;
    this.deleteSelected.disabled = count === 0 || this.unknown;
    this.replayMatching.disabled = this.unconfigured;
    this.deleteMatching.disabled = this.unknown;
    const replayTitle = this.unconfigured ? NO_REPLAY : "";
    this.replaySelected.title = replayTitle;
    this.replayMatching.title = replayTitle;
    this.selectionText.textContent = count ? `${plural(count, "job")} selected` : "";
    const boxes = this.deadRows.querySelectorAll("input[type=checkbox]").length;
    this.selectAll.checked = boxes > 0 && count === boxes;
    this.selectAll.indeterminate = count > 0 && count < boxes;
  }

  async loadDead(page = 0, fresh = false) {
    const dead = this.dead;
    if (fresh) dead.cursors = [null];
    page = Math.max(0, Math.min(page, dead.cursors.length - 1));
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(dead.filter)) params.set(key, String(value));
    params.set("limit", this.deadInputs.limit.value);
    if (dead.cursors[page]) params.set("cursor", dead.cursors[page]);
    this.nextButton.disabled = true;
    this.prevButton.disabled = true;
    const events = this.deadEvents;
    this.deadMark = this.mark("dead", events);
    let answer;
    try {
      answer = await get(`${this.path}/dead?${params}`);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (error.status === 401 || this.disposed) return;
      this.deadEmpty.hidden = false;
      this.deadEmpty.textContent = `Could not list dead letters: ${error.message}`;
      this.deadEmpty.classList.add("form-error");
      this.prevButton.disabled = page === 0;
      return;
    }
    if (this.disposed) return;
    if (answer.jobs.length === 0 && page > 0) {
      // the page emptied (replayed or deleted): show the one before
      dead.cursors.length = page;
      this.loadDead(page - 1);
      return;
    }
    dead.page = page;
    dead.cursors.length = page + 1;
    if (answer.cursor) dead.cursors.push(answer.cursor);
    dead.selected.clear();
    this.deadStale.hidden = true;
    this.deadRows.replaceChildren(...answer.jobs.map((job) => this.deadRow(job)));
    this.deadEmpty.classList.remove("form-error");
    this.deadEmpty.hidden = answer.jobs.length > 0;
    this.deadEmpty.textContent = Object.keys(dead.filter).length
      ? "No dead job matches this filter."
      : "No dead letters: every job was delivered or is still being tried.";
    this.prevButton.disabled = page === 0;
    this.nextButton.disabled = !answer.cursor;
    this.pageText.textContent = `page ${page + 1}`;
    this.showSelection();
    if (this.deadEvents !== events) this.newDeadLetters(); // some died while we fetched
  }

  deadRow(job) {
    const box = h("input", {
      type: "checkbox",
      value: job.id,
      "aria-label": `Select job ${job.id}`,
    });
    box.addEventListener("change", () => this.select(job.id, box.checked));
    const attributes = Object.entries(job.attributes || {});
    const shown =
      job.payload_encoding === "base64"
        ? h("span", null, h("span", { class: "badge" }, "base64"), " ", longText(job.payload, 60))
        : longText(job.payload, 60);
    // The list carries each payload's first KiB: say so, and where the whole one is.
    const payload = job.payload_truncated
      ? h(
          "span",
          null,
          shown,
          " ",
          h(
            "a",
            { href: jobHref(job.id), class: "muted small payload-cut" },
            `(cut: ${fmtInt(job.payload_size)} bytes in all, whole on the job page)`,
          ),
        )
      : shown;
    return h(
      "tr",
      { dataset: { id: job.id } },
      h("td", { class: "check" }, box),
      h("td", null, h("a", { href: jobHref(job.id), class: "mono" }, job.id)),
      h("td", { class: "time" }, fmtTime(job.died_at)),
      h("td", { class: "num" }, String(job.attempt)),
      h("td", { class: "num" }, statusText(job.status)),
      h("td", { class: "error-text" }, job.error || DASH),
      h("td", { class: "payload" }, payload),
      h(
        "td",
        { class: "attrs" },
        attributes.length
          ? attributes.map(([k, v]) =>
              h("span", { class: "attr", title: `${k}=${v}` }, `${k}=${v}`),
            )
          : DASH,
      ),
    );
  }

  async actOnSelected(action) {
    const ids = [...this.dead.selected];
    if (!ids.length) return;
    if (action === "delete") {
      const sure = await confirmAction({
        title: "Delete dead letters",
        message: `Delete ${plural(ids.length, "dead job")} for good? This cannot be undone.`,
        confirm: "Delete",
        danger: true,
      });
      if (!sure) return;
    }
    this.replaySelected.disabled = true;
    this.deleteSelected.disabled = true;
    try {
      const answer = await post(`${this.path}/dead/${action}`, { ids });
      this.dead.selected.clear(); // done with them: let the list follow new dead letters
      const done = action === "replay" ? answer.replayed : answer.deleted;
      const verb = action === "replay" ? "Replayed" : "Deleted";
      // "matched" counts the selected jobs that were still dead: the others were skipped.
      const missed = ids.length - done;
      notify(
        `${verb} ${plural(done, "job")}` +
          (missed > 0 ? ` (${fmtInt(missed)} no longer dead: replayed or deleted already)` : "") +
          ".",
      );
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      const word = action === "replay" ? "Replay" : "Delete";
      // 404: none of them is dead any more (the daemon says so), nothing failed.
      if (error.status === 404) notify(`${word}: ${error.message}`, "info");
      else if (error.status !== 401) notify(`${word} failed: ${error.message}`, "error");
    }
    if (!this.disposed) this.loadDead(this.dead.page);
  }

  async actOnFilter(action) {
    const filter = this.readFilter();
    const word = action === "replay" ? "Replay" : "Delete";
    let matched, confirm;
    try {
      ({ matched, confirm } = await post(`${this.path}/dead/${action}`, { filter, dry_run: true }));
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (error.status !== 401) {
        notify(`${word}: ${error.message}`, error.status === 404 ? "info" : "error");
      }
      return;
    }
    if (matched === 0) {
      notify(`${word}: no dead job matches that filter`, "info");
      return;
    }
    const sure = await confirmAction({
      title: `${word} all matching dead letters`,
      message:
        (Object.keys(filter).length
          ? `${plural(matched, "dead job")} match${matched === 1 ? "es" : ""} ` +
            `${this.describeFilter(filter)}. `
          : `No filter is set: that is every dead job of this topic, ${fmtInt(matched)}. `) +
        (action === "replay"
          ? "Replay them all? They are delivered again from attempt 1."
          : "Delete them all for good? This cannot be undone."),
      confirm: `${word} ${fmtInt(matched)}`,
      danger: action === "delete",
    });
    if (!sure) return;
    try {
      // With the dry run's token the daemon acts on the jobs counted above (or on none, 409,
      // if they changed), not also on those that failed while the dialog was open.
      const answer = await post(`${this.path}/dead/${action}`, { filter, confirm });
      const done = action === "replay" ? answer.replayed : answer.deleted;
      notify(`${action === "replay" ? "Replayed" : "Deleted"} ${plural(done, "job")}.`);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (error.status !== 401) notify(`${word} failed: ${error.message}`, "error");
    }
    if (!this.disposed) {
      this.dead.filter = filter;
      this.loadDead(0, true);
    }
  }

  // -- test delivery ---------------------------------------------------------------------------

  testSection() {
    const payload = h("textarea", { id: "test-payload", rows: 5, spellcheck: "false" });
    payload.value = '{"hello": "world"}';
    const attributes = h("textarea", {
      id: "test-attributes",
      rows: 3,
      spellcheck: "false",
      placeholder: "one name=value per line",
    });
    const send = h(
      "button",
      { type: "submit", class: "primary", id: "test-send" },
      "Send test delivery",
    );
    this.testResult = h("div", { class: "test-result", id: "test-result", hidden: true });
    const form = h(
      "form",
      { class: "test-form", id: "test-form" },
      h(
        "div",
        { class: "field grow" },
        h("label", { for: "test-payload" }, "Payload (sent as UTF-8 text)"),
        payload,
      ),
      h(
        "div",
        { class: "field" },
        h("label", { for: "test-attributes" }, "Attributes"),
        attributes,
      ),
      h("div", { class: "field buttons" }, send),
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      let attrs;
      try {
        attrs = this.parseAttributes(attributes.value);
      } catch (error) {
        this.showTestError(error.message);
        return;
      }
      send.disabled = true;
      send.textContent = "Sending…";
      try {
        const answer = await post(`${this.path}/test-delivery`, {
          payload: payload.value,
          attributes: attrs,
        });
        if (!this.disposed) this.showTestResult(answer);
      } catch (error) {
        if (!(error instanceof ApiError)) throw error;
        if (error.status !== 401) this.showTestError(`The test delivery failed: ${error.message}`);
      } finally {
        send.disabled = false;
        send.textContent = "Send test delivery";
      }
    });
    // Hidden while the topic is not configured: there is no backend to send to.
    this.testCard = h(
      "section",
      { class: "card", id: "test-delivery" },
      h("h2", null, "Test delivery"),
      h(
        "p",
        { class: "muted" },
        "Sends a payload to this topic's backend now, outside the queue: nothing is stored, no " +
          "retry. The backend sees the usual job headers with a test- job id.",
      ),
      form,
      this.testResult,
    );
    return this.testCard;
  }

  parseAttributes(text) {
    const attributes = {};
    text.split("\n").forEach((line, i) => {
      const trimmed = line.trim();
      if (!trimmed) return;
      const at = trimmed.search(/[=:]/);
      if (at <= 0) throw new Error(`Attributes, line ${i + 1}: write name=value`);
      attributes[trimmed.slice(0, at).trim()] = trimmed.slice(at + 1).trim();
    });
    return attributes;
  }

  showTestError(message) {
    this.testResult.hidden = false;
    this.testResult.replaceChildren(h("p", { class: "form-error", role: "alert" }, message));
  }

  showTestResult(answer) {
    const ok = answer.status !== null && answer.status >= 200 && answer.status < 300;
    const headline = h(
      "p",
      { class: "headline" },
      h(
        "span",
        { class: `badge ${ok ? "outcome-done" : "outcome-dead"}`, id: "test-status" },
        answer.status === null ? "no response" : `status ${answer.status}`,
      ),
      ` in ${fmtMs(answer.duration_ms)}`,
      answer.failure ? ` · failure: ${answer.failure}` : "",
      answer.message ? ` · ${answer.message}` : "",
      h("span", { class: "muted" }, ` · job id ${answer.job_id}`),
    );
    const headers = answer.headers || [];
    this.testResult.hidden = false;
    this.testResult.replaceChildren(
      headline,
      h("h4", null, "Headers"),
      headers.length
        ? h(
            "table",
            { class: "kv" },
            h(
              "tbody",
              null,
              headers.map(([k, v]) => h("tr", null, h("th", null, k), h("td", null, v))),
            ),
          )
        : h("p", { class: "muted" }, "none"),
      h("h4", null, "Body"),
      answer.body
        ? h("pre", { id: "test-body" }, answer.body)
        : h("p", { class: "muted" }, "empty"),
      h("h4", null, "stderr"),
      answer.stderr ? h("pre", null, answer.stderr) : h("p", { class: "muted" }, "empty"),
    );
  }
}
