// The overview: every queue and topic, updated in place from each snapshot.  The table is
// built once (and again only when topics are added or removed); each second only the cells
// whose text changed are written, and only sparklines on screen are redrawn.

import { LineChart, drawSparkline, sparklineCanvas } from "./charts.js";
import { DASH, fmtDuration, fmtInt, fmtMs, fmtRate, h, topicHref } from "./dom.js";
import { CAPACITY } from "./history.js";

const COLUMNS = [
  { key: "name", label: "Queue / topic", sort: "asc" },
  { key: "ready", label: "Ready", fmt: fmtInt, title: "Jobs waiting to be delivered" },
  { key: "delayed", label: "Delayed", fmt: fmtInt, title: "Jobs scheduled for later" },
  { key: "leased", label: "Leased", fmt: fmtInt, title: "Jobs being delivered now" },
  { key: "dead", label: "Dead", fmt: fmtInt, title: "Dead letters kept" },
  { key: "in", label: "In/s", fmt: fmtRate, title: "Jobs pushed per second" },
  { key: "out", label: "Out/s", fmt: fmtRate, title: "Attempts finished per second" },
  { key: "trend", label: "Out/s, 2 min", title: "Attempts finished per second, last 2 minutes" },
  { key: "p95", label: "p95", fmt: fmtMs, title: "95th percentile delivery time" },
  { key: "failed", label: "Failed", fmt: fmtInt, title: "Failed attempts, total (retried + dead)" },
  { key: "deadTotal", label: "Died", fmt: fmtInt, title: "Jobs dead-lettered, total" },
  { key: "circuit", label: "Circuit", title: "Circuit breaker to the backend" },
  { key: "state", label: "State", title: "Paused or delivering (in flight / concurrency)" },
];
const INDEX = Object.fromEntries(COLUMNS.map((c, i) => [c.key, i]));
const CIRCUIT_RANK = { closed: 0, "half-open": 1, open: 2 };
const SUMMED = ["ready", "delayed", "leased", "dead", "in", "out", "failed", "deadTotal"];
// A topic (or queue) the stats list with "configured": false: a reload removed it, its jobs
// are still in the store, and nothing delivers them.
const UNCONFIGURED = "not configured";
const UNCONFIGURED_TITLE =
  "Not in the configuration (removed by a reload?): its jobs wait in the store, undelivered," +
  " until it is configured again";

function unconfiguredBadge() {
  return h("span", { class: "badge unconfigured", title: UNCONFIGURED_TITLE }, UNCONFIGURED);
}

function topicValues(t) {
  return {
    ready: t.depth.ready,
    delayed: t.depth.delayed,
    leased: t.depth.leased,
    dead: t.depth.dead,
    in: t.rates.in_per_second,
    out: t.rates.out_per_second,
    p95: t.duration_ms.p95,
    failed: t.totals.failed,
    deadTotal: t.totals.dead,
    circuit: t.circuit.state,
    paused: t.paused,
    inFlight: t.in_flight,
    concurrency: t.concurrency,
    configured: t.configured !== false,
  };
}

function signature(snapshot) {
  // A topic a reload removes (or adds back) keeps its name: its "not configured" badge is
  // built with the row, so the change rebuilds the table.
  const parts = [];
  for (const q of snapshot.queues) {
    parts.push(q.configured === false ? `${q.name}\u0001` : q.name);
    for (const t of q.topics) parts.push(t.configured === false ? `${t.topic}\u0001` : t.topic);
    parts.push("");
  }
  return parts.join("\u0000");
}

/** One table row and what it shows, so a tick writes only what changed. */
class Row {
  constructor(tr, cells, spark) {
    this.tr = tr;
    this.cells = cells;
    this.texts = new Array(cells.length).fill(null);
    this.classes = new Array(cells.length).fill(null);
    this.spark = spark;
    this.onScreen = false;
    this.sparkStale = true;
    this.values = null;
  }

  text(column, text) {
    const i = INDEX[column];
    if (this.texts[i] !== text) {
      this.texts[i] = text;
      this.cells[i].firstChild.nodeValue = text;
    }
  }

  cls(column, name) {
    const i = INDEX[column];
    if (this.classes[i] !== name) {
      this.classes[i] = name;
      this.cells[i].className = name;
    }
  }
}

function numberCells(tr) {
  return COLUMNS.slice(1).map((column) => {
    const dataset = { col: column.key };
    const td =
      column.key === "trend" ? h("td", { class: "trend", dataset }) : h("td", { dataset }, "");
    if (column.key === "circuit" || column.key === "state") td.replaceChildren(h("span", null, ""));
    tr.append(td);
    return td;
  });
}

export class OverviewView {
  constructor(app) {
    this.app = app;
    this.signature = null;
    this.topicRows = new Map(); // "queue\0topic" -> Row
    this.queueRows = new Map(); // queue -> {row, tbody, topics: [Row]}
    this.bySpark = new WeakMap(); // canvas -> Row
    this.filterText = "";
    this.problemsOnly = false;
    this.sort = { key: "name", direction: 1 };
    this.order = null; // the row order on screen; null: as built (config order)
  }

  crumbs() {
    return [];
  }

  mount(root) {
    const card = (label, title) => {
      const value = h("strong", null, DASH);
      return [value, h("div", { class: "stat", title }, h("span", null, label), value)];
    };
    const cards = {};
    const summary = h("section", { class: "stats-row", "aria-label": "Totals" });
    for (const [key, label, title] of [
      ["queues", "Queues", ""],
      ["topics", "Topics", ""],
      ["ready", "Ready", "Jobs waiting, all topics"],
      ["delayed", "Delayed", "Jobs scheduled for later, all topics"],
      ["leased", "Leased", "Jobs being delivered now"],
      ["dead", "Dead", "Dead letters kept, all topics"],
      ["in", "In/s", "Jobs pushed per second, all topics"],
      ["out", "Out/s", "Attempts finished per second, all topics"],
      ["paused", "Paused", "Topics paused"],
      ["open", "Circuits open", "Topics whose backend circuit is open or half-open"],
      ["uptime", "Uptime", "Time since the daemon started"],
    ]) {
      const [value, element] = card(label, title);
      cards[key] = value;
      summary.append(element);
    }
    this.cards = cards;

    this.chart = new LineChart({
      title: "Throughput, all topics (jobs/s)",
      series: [
        { key: "in", label: "in", colour: "c-in" },
        { key: "out", label: "out", colour: "c-out" },
      ],
      format: fmtRate,
      span: CAPACITY,
    });
    this.chart.element.classList.add("wide");

    const filter = h("input", {
      type: "search",
      id: "topic-filter",
      placeholder: "filter queues and topics",
      autocomplete: "off",
      spellcheck: "false",
    });
    filter.addEventListener("input", () => {
      this.filterText = filter.value.trim().toLowerCase();
      this.applyFilter();
    });
    const problems = h("input", { type: "checkbox", id: "problems-only" });
    problems.addEventListener("change", () => {
      this.problemsOnly = problems.checked;
      this.applyFilter();
    });
    this.shown = h("span", { class: "muted", id: "topic-count" });
    const controls = h(
      "div",
      { class: "toolbar" },
      h("label", { class: "visually-hidden", for: "topic-filter" }, "Filter"),
      filter,
      h(
        "label",
        { class: "check", title: "Dead letters, a circuit not closed, paused, or not configured" },
        problems,
        " needs attention only",
      ),
      this.shown,
    );

    this.headers = COLUMNS.map((column) => {
      const th = h("th", { scope: "col", title: column.title, class: column.fmt ? "num" : "" });
      if (column.key === "trend" || column.key === "circuit" || column.key === "state") {
        th.textContent = column.label;
      } else {
        const button = h("button", { type: "button", class: "sort" }, column.label);
        button.addEventListener("click", () => this.sortBy(column.key));
        th.append(button);
      }
      return th;
    });
    this.table = h(
      "table",
      { class: "topics", id: "topics" },
      h("thead", null, h("tr", null, this.headers)),
    );
    this.waiting = h("p", { class: "muted" }, "Waiting for the first snapshot…");
    this.empty = h("p", { class: "muted", hidden: true }, "No queues are configured.");

    this.observer = new IntersectionObserver(
      (entries) => {
        for (const entry of entries) {
          const row = this.bySpark.get(entry.target);
          if (!row) continue;
          row.onScreen = entry.isIntersecting;
          if (row.onScreen && row.sparkStale) this.drawSpark(row);
        }
      },
      { rootMargin: "200px 0px" },
    );

    root.append(
      h("h1", { class: "visually-hidden" }, "Overview"),
      summary,
      h("section", { class: "charts" }, this.chart.element),
      h(
        "section",
        { class: "card table-card" },
        controls,
        this.waiting,
        this.empty,
        this.table,
      ),
    );
    this.markSorted();
    if (this.app.snapshot) this.update(this.app.snapshot);
  }

  unmount() {
    this.observer.disconnect();
    this.chart.dispose();
  }

  update(snapshot) {
    const started = performance.now();
    const sig = signature(snapshot);
    if (sig !== this.signature) {
      this.build(snapshot);
      this.signature = sig;
    }
    this.fill(snapshot);
    const history = this.app.history;
    this.chart.draw(history.times, history.total);
    this.table.dataset.generatedAt = String(snapshot.generated_at);
    if (!this.table.dataset.ready) {
      this.table.dataset.ready = "true";
      this.waiting.hidden = true;
      if (window.__busgateRendered === undefined) window.__busgateRendered = performance.now();
    }
    window.__busgateTickMs = performance.now() - started;
  }

  build(snapshot) {
    for (const { tbody } of this.queueRows.values()) tbody.remove();
    for (const row of this.topicRows.values()) if (row.spark) this.observer.unobserve(row.spark);
    for (const { row } of this.queueRows.values()) this.observer.unobserve(row.spark);
    this.topicRows.clear();
    this.queueRows.clear();
    this.order = null;
    const fragment = document.createDocumentFragment();
    for (const queue of snapshot.queues) {
      const tbody = h("tbody", { class: "queue" });
      const queueTr = h("tr", { class: "queue-row" });
      const name = h("th", { scope: "rowgroup", class: "name" }, h("strong", null, queue.name));
      const count = h("span", { class: "muted" }, "");
      name.append(" ", count);
      if (queue.configured === false) name.append(" ", unconfiguredBadge());
      queueTr.append(name);
      const queueCells = [name, ...numberCells(queueTr)];
      const queueSpark = sparklineCanvas(`${queue.name}: attempts per second, last 2 minutes`);
      queueCells[INDEX.trend].append(queueSpark);
      const queueRow = new Row(queueTr, queueCells, queueSpark);
      queueRow.count = count;
      queueRow.queue = queue.name;
      this.bySpark.set(queueSpark, queueRow);
      this.observer.observe(queueSpark);
      tbody.append(queueTr);
      const entry = { row: queueRow, tbody, topics: [] };
      for (const t of queue.topics) {
        const tr = h("tr", { class: "topic-row", dataset: { queue: t.queue, topic: t.topic } });
        const link = h("a", { href: topicHref(t.queue, t.topic), title: t.backend }, t.topic);
        const nameCell = h("th", { scope: "row", class: "name" }, link);
        if (t.configured === false) {
          tr.classList.add("unconfigured");
          nameCell.append(" ", unconfiguredBadge());
        }
        tr.append(nameCell);
        const cells = [nameCell, ...numberCells(tr)];
        const spark = sparklineCanvas(`${t.queue}/${t.topic}: attempts per second`);
        cells[INDEX.trend].append(spark);
        const row = new Row(tr, cells, spark);
        row.queue = t.queue;
        row.topic = t.topic;
        row.search = `${t.queue}/${t.topic}`.toLowerCase();
        this.bySpark.set(spark, row);
        this.observer.observe(spark);
        tbody.append(tr);
        entry.topics.push(row);
        this.topicRows.set(`${t.queue}\u0000${t.topic}`, row);
      }
      const topics = queue.topics.length;
      queueRow.count.textContent = `${topics} topic${topics === 1 ? "" : "s"}`;
      this.queueRows.set(queue.name, entry);
      fragment.append(tbody);
    }
    this.table.append(fragment);
    this.empty.hidden = snapshot.queues.length > 0;
    this.table.dataset.rows = String(this.topicRows.size);
  }

  fill(snapshot) {
    const totals = { ready: 0, delayed: 0, leased: 0, dead: 0, in: 0, out: 0 };
    let paused = 0;
    let open = 0;
    for (const queue of snapshot.queues) {
      const entry = this.queueRows.get(queue.name);
      const sum = { ready: 0, delayed: 0, leased: 0, dead: 0, in: 0, out: 0, failed: 0 };
      sum.deadTotal = 0;
      let p95 = null;
      let worst = "closed";
      let queuePaused = 0;
      let notClosed = 0;
      let unconfigured = 0;
      for (const t of queue.topics) {
        const row = this.topicRows.get(`${t.queue}\u0000${t.topic}`);
        const v = topicValues(t);
        row.values = v;
        this.fillRow(row, v);
        for (const key of SUMMED) sum[key] += v[key];
        if (v.p95 !== null && (p95 === null || v.p95 > p95)) p95 = v.p95;
        if (CIRCUIT_RANK[v.circuit] > CIRCUIT_RANK[worst]) worst = v.circuit;
        if (v.circuit !== "closed") notClosed += 1;
        if (v.paused) queuePaused += 1;
        if (!v.configured) unconfigured += 1;
      }
      const q = entry.row;
      for (const key of SUMMED) q.text(key, COLUMNS[INDEX[key]].fmt(sum[key]));
      q.cls("dead", sum.dead > 0 ? "num bad" : "num");
      for (const key of ["ready", "delayed", "leased", "in", "out", "p95", "failed"]) {
        q.cls(key, "num");
      }
      q.cls("deadTotal", "num");
      q.text("p95", fmtMs(p95));
      q.values = { ...sum, p95, name: queue.name };
      const circuitBadge = q.cells[INDEX.circuit].firstChild;
      const circuitText = notClosed ? `${notClosed} ${worst}` : "closed";
      if (circuitBadge.textContent !== circuitText) circuitBadge.textContent = circuitText;
      if (circuitBadge.className !== `badge circuit-${worst}`) {
        circuitBadge.className = `badge circuit-${worst}`;
      }
      const stateBadge = q.cells[INDEX.state].firstChild;
      const all = queue.topics.length;
      let stateText = `${queuePaused} paused`;
      if (queuePaused === 0) stateText = "running";
      else if (queuePaused === all) stateText = "paused";
      let stateClass = queuePaused ? "badge paused" : "badge running";
      if (unconfigured) {
        // Stranded jobs come first: nothing will deliver them, whatever else is paused.
        stateText = unconfigured === all ? UNCONFIGURED : `${unconfigured} ${UNCONFIGURED}`;
        stateClass = "badge unconfigured";
      }
      if (stateBadge.textContent !== stateText) stateBadge.textContent = stateText;
      if (stateBadge.className !== stateClass) stateBadge.className = stateClass;
      q.problem = sum.dead > 0 || notClosed > 0 || queuePaused > 0 || unconfigured > 0;
      if (q.onScreen) this.drawSpark(q);
      else q.sparkStale = true;
      for (const key of Object.keys(totals)) totals[key] += sum[key];
      paused += queuePaused;
      open += notClosed;
    }
    const c = this.cards;
    const set = (element, text) => {
      if (element.textContent !== text) element.textContent = text;
    };
    set(c.queues, fmtInt(snapshot.queues.length));
    set(c.topics, fmtInt(this.topicRows.size));
    for (const key of ["ready", "delayed", "leased", "dead"]) set(c[key], fmtInt(totals[key]));
    set(c.in, fmtRate(totals.in));
    set(c.out, fmtRate(totals.out));
    set(c.paused, fmtInt(paused));
    set(c.open, fmtInt(open));
    set(c.uptime, fmtDuration(snapshot.uptime));
    c.dead.parentElement.classList.toggle("bad", totals.dead > 0);
    c.open.parentElement.classList.toggle("bad", open > 0);
    c.paused.parentElement.classList.toggle("warn", paused > 0);
    if (this.problemsOnly || this.sort.key !== "name" || this.order === null) this.applyFilter();
  }

  fillRow(row, v) {
    row.text("ready", fmtInt(v.ready));
    row.text("delayed", fmtInt(v.delayed));
    row.text("leased", fmtInt(v.leased));
    row.text("dead", fmtInt(v.dead));
    row.text("in", fmtRate(v.in));
    row.text("out", fmtRate(v.out));
    row.text("p95", fmtMs(v.p95));
    row.text("failed", fmtInt(v.failed));
    row.text("deadTotal", fmtInt(v.deadTotal));
    for (const key of ["ready", "delayed", "leased", "in", "out", "p95", "failed", "deadTotal"]) {
      row.cls(key, "num");
    }
    row.cls("dead", v.dead > 0 ? "num bad" : "num");
    const circuit = row.cells[INDEX.circuit].firstChild;
    const circuitState = v.configured ? v.circuit : DASH; // no backend, no circuit
    if (row.circuit !== circuitState) {
      row.circuit = circuitState;
      circuit.textContent = circuitState;
      circuit.className = v.configured ? `badge circuit-${v.circuit}` : "";
    }
    const state = row.cells[INDEX.state].firstChild;
    let stateText = v.paused ? "paused" : "running";
    if (!v.configured) stateText = UNCONFIGURED;
    if (row.state !== stateText) {
      row.state = stateText;
      state.textContent = stateText;
      state.className = v.configured ? `badge ${stateText}` : "badge unconfigured";
    }
    const busy = v.configured ? `${v.inFlight} in flight of ${v.concurrency}` : UNCONFIGURED_TITLE;
    if (row.busy !== busy) {
      row.busy = busy;
      state.title = busy;
    }
    row.problem = v.dead > 0 || v.circuit !== "closed" || v.paused || !v.configured;
    if (row.onScreen) this.drawSpark(row);
    else row.sparkStale = true;
  }

  drawSpark(row) {
    row.sparkStale = false;
    const history = this.app.history;
    let values;
    if (row.topic !== undefined) {
      const series = history.topic(row.queue, row.topic);
      values = series ? series.out : [];
    } else {
      const entry = this.queueRows.get(row.queue);
      values = new Array(history.times.length).fill(0);
      for (const topicRow of entry ? entry.topics : []) {
        const series = history.topic(topicRow.queue, topicRow.topic);
        if (!series) continue;
        series.out.forEach((v, i) => {
          values[i] += v || 0;
        });
      }
    }
    drawSparkline(row.spark, values, history.capacity, "c-out");
  }

  sortBy(key) {
    if (this.sort.key === key) this.sort.direction = -this.sort.direction;
    else this.sort = { key, direction: key === "name" ? 1 : -1 };
    this.markSorted();
    this.applyFilter();
  }

  markSorted() {
    COLUMNS.forEach((column, i) => {
      const th = this.headers[i];
      if (column.key === this.sort.key) {
        th.setAttribute("aria-sort", this.sort.direction > 0 ? "ascending" : "descending");
      } else th.removeAttribute("aria-sort");
    });
  }

  /** Show the rows the filter keeps, in the chosen order; moves DOM nodes only on change. */
  applyFilter() {
    const text = this.filterText;
    let shown = 0;
    const { key, direction } = this.sort;
    const compare = (a, b) => {
      if (key === "name") {
        const x = a.topic ?? a.queue;
        const y = b.topic ?? b.queue;
        return direction * (x < y ? -1 : x > y ? 1 : 0);
      }
      const x = a.values?.[key] ?? -1;
      const y = b.values?.[key] ?? -1;
      return direction * (x - y) || (a.topic ?? a.queue).localeCompare(b.topic ?? b.queue);
    };
    const orderOf = (groups) =>
      groups
        .map((g) => `${g.row.queue}\u0001${g.sorted.map((r) => r.topic).join("\u0001")}`)
        .join("\u0000");
    const groups = [...this.queueRows.values()];
    for (const group of groups) group.sorted = group.topics;
    // As built is configuration order (files, then topics as written), not by name.
    const built = this.order ?? orderOf(groups);
    groups.sort((a, b) => compare(a.row, b.row));
    for (const group of groups) group.sorted = [...group.topics].sort(compare);
    const order = orderOf(groups);
    const reorder = order !== built;
    this.order = order;
    for (const group of groups) {
      let visible = 0;
      const queueMatches = text !== "" && group.row.queue.toLowerCase().includes(text);
      for (const row of group.sorted) {
        const keep =
          (text === "" || queueMatches || row.search.includes(text)) &&
          (!this.problemsOnly || row.problem);
        if (row.tr.hidden === keep) row.tr.hidden = !keep;
        if (keep) visible += 1;
        if (reorder) group.tbody.append(row.tr);
      }
      const hideGroup = visible === 0 && (text !== "" || this.problemsOnly);
      if (group.tbody.hidden !== hideGroup) group.tbody.hidden = hideGroup;
      if (reorder) this.table.append(group.tbody);
      shown += visible;
    }
    const label = `${fmtInt(shown)} of ${fmtInt(this.topicRows.size)} topics`;
    if (this.shown.textContent !== label) this.shown.textContent = label;
  }
}
