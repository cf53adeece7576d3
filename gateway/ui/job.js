// One job by id: every topic copy with its payload, attributes, state and attempts, and the
// CLI command that reproduces its delivery.

import { ApiError, get, post, topicPath } from "./api.js";
import { DASH, fmtInt, fmtMs, fmtTime, h, jobHref, notify, topicHref } from "./dom.js";

// The daemon's main file, for `busgate curl … -c PATH`: asked once (GET /v1/config); the
// packaged default until it answers, or if it cannot.
let configPath = "/etc/busgate/busgate.yaml";
let configPathAsked = null;

function askConfigPath() {
  configPathAsked ??= get("/v1/config").then(
    (config) => {
      if (typeof config.path === "string") configPath = config.path;
    },
    () => {
      configPathAsked = null; // asked again on the next job page
    },
  );
  return configPathAsked;
}
const ATTEMPT_COLUMNS = [
  "Attempt",
  "Started",
  "Outcome",
  "Status",
  "Duration",
  "Error",
  "Body",
  "stderr",
];
const SHELL_SAFE = /^[A-Za-z0-9_.:@+=/,-]+$/;

function shellWord(word) {
  return SHELL_SAFE.test(word) ? word : `'${word.replaceAll("'", "'\\''")}'`;
}

/** The CLI line that prints the exact curl / cgi-fcgi command re-delivering this copy. */
export function curlCommand(copy) {
  return [
    "busgate",
    "curl",
    shellWord(copy.id),
    "--topic",
    shellWord(`${copy.queue}/${copy.topic}`),
    "-c",
    shellWord(configPath),
  ].join(" ");
}

async function copyText(input, status) {
  const text = input.value;
  try {
    if (!navigator.clipboard || !window.isSecureContext) throw new Error("no clipboard API");
    await navigator.clipboard.writeText(text);
    status.textContent = "Copied to the clipboard.";
    return;
  } catch {
    // fall back to selecting the text (and the old copy command, where it still works)
  }
  input.focus();
  input.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch {
    copied = false;
  }
  status.textContent = copied
    ? "Copied to the clipboard."
    : "Selected: press Ctrl+C (⌘C on a Mac) to copy.";
}

function detailsOrDash(label, text) {
  if (!text) return DASH;
  return h("details", null, h("summary", null, label), h("pre", null, text));
}

function excerptCell(text) {
  if (!text) return DASH;
  const flat = text.replace(/\s+/g, " ").trim();
  if (flat.length <= 60) return h("code", null, flat);
  return detailsOrDash(`${flat.slice(0, 60)}…`, text);
}

export class JobView {
  constructor(app, id) {
    this.app = app;
    this.id = id;
    this.disposed = false;
    this.reloadTimer = null;
    this.copies = [];
    this.moved = null; // the counters of the topics whose copies may still change
  }

  crumbs() {
    return [{ label: `job ${this.id}`, href: jobHref(this.id) }];
  }

  title() {
    return `job ${this.id}`;
  }

  mount(root) {
    this.body = h("div", { id: "job-copies" }, h("p", { class: "muted" }, "Loading…"));
    root.append(
      h(
        "section",
        { class: "page-head" },
        h("h1", null, h("span", { class: "muted" }, "Job "), h("span", { class: "mono" }, this.id)),
      ),
      this.body,
    );
    this.load();
  }

  unmount() {
    this.disposed = true;
    clearTimeout(this.reloadTimer);
  }

  onEvent(event) {
    if (event.type !== "attempt" || event.job_id !== this.id) return;
    clearTimeout(this.reloadTimer);
    this.reloadTimer = setTimeout(() => this.load(), 300);
  }

  /**
   * The live feed samples job events over every topic, so this job's may not come while
   * other topics are busy.  The snapshot counts every attempt, replay and deletion: when
   * those of a topic holding a copy that is not done yet move, the job is read again.
   */
  update(snapshot) {
    const open = new Set(
      this.copies.filter((c) => c.state !== "done").map((c) => `${c.queue}\u0000${c.topic}`),
    );
    const counters = [];
    for (const q of snapshot.queues) {
      for (const t of q.topics) {
        if (!open.has(`${t.queue}\u0000${t.topic}`)) continue;
        const { done, retried, dead, expired, replayed } = t.totals;
        counters.push(t.queue, t.topic, done, retried, dead, expired, replayed, t.depth.dead);
      }
    }
    const moved = JSON.stringify(counters);
    const changed = this.moved !== null && moved !== this.moved;
    this.moved = moved;
    if (changed && this.reloadTimer === null) {
      this.reloadTimer = setTimeout(() => this.load(), 300);
    }
  }

  async load() {
    this.reloadTimer = null;
    let answer;
    try {
      [answer] = await Promise.all([
        get(`/v1/jobs/${encodeURIComponent(this.id)}`),
        askConfigPath(),
      ]);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (error.status === 401 || this.disposed) return;
      this.body.replaceChildren(
        h("p", { class: "form-error", role: "alert" }, `Could not show this job: ${error.message}`),
      );
      return;
    }
    if (this.disposed) return;
    this.copies = answer.copies;
    this.body.replaceChildren(...answer.copies.map((copy) => this.copySection(copy)));
  }

  copySection(copy) {
    const facts = [
      ["State", h("span", { class: `badge state-${copy.state}` }, copy.state)],
      ["Priority", copy.priority],
      ["Attempt", fmtInt(copy.attempt)],
      ["Enqueued", fmtTime(copy.enqueued_at)],
      ["Runs at", fmtTime(copy.run_at)],
      ["Finished", fmtTime(copy.finished_at)],
      ["Trace id", h("span", { class: "mono" }, copy.trace_id)],
    ];
    const attributes = Object.entries(copy.attributes || {});
    const command = h("input", {
      type: "text",
      class: "mono command",
      readonly: true,
      value: curlCommand(copy),
      "aria-label": "busgate curl command",
      dataset: { copyFor: `${copy.queue}/${copy.topic}` },
    });
    const copyStatus = h("span", { class: "muted copy-status", role: "status" }, "");
    const copyButton = h("button", { type: "button", class: "copy-curl" }, "Copy as curl");
    copyButton.addEventListener("click", () => copyText(command, copyStatus));
    const actions = [copyButton];
    if (copy.state === "dead") {
      const replay = h("button", { type: "button", class: "primary" }, "Replay this job");
      replay.addEventListener("click", async () => {
        replay.disabled = true;
        try {
          const answer = await post(`${topicPath(copy.queue, copy.topic)}/dead/replay`, {
            ids: [copy.id],
          });
          notify(
            answer.replayed
              ? `Replayed ${copy.id} on ${copy.queue}/${copy.topic}.`
              : `${copy.id} is no longer dead on ${copy.queue}/${copy.topic}.`,
          );
          this.load();
        } catch (error) {
          if (!(error instanceof ApiError)) throw error;
          if (error.status === 404) {
            // Replayed or deleted meanwhile (the daemon says which job): show it as it is now.
            notify(`Replay: ${error.message}`, "info");
            this.load();
            return;
          }
          replay.disabled = false;
          if (error.status !== 401) notify(`Replay failed: ${error.message}`, "error");
        }
      });
      actions.push(replay);
    }

    return h(
      "section",
      { class: "card job-copy", dataset: { queue: copy.queue, topic: copy.topic } },
      h(
        "div",
        { class: "section-head" },
        h(
          "h2",
          null,
          h("a", { href: topicHref(copy.queue, copy.topic) }, `${copy.queue} / ${copy.topic}`),
        ),
        h("div", { class: "head-actions" }, actions),
      ),
      h(
        "dl",
        { class: "facts" },
        facts.map(([label, value]) => h("div", null, h("dt", null, label), h("dd", null, value))),
      ),
      h("h3", null, "Payload"),
      copy.payload_encoding === "base64"
        ? h(
            "p",
            { class: "hint" },
            "The payload is not UTF-8 text: it is shown base64-encoded" +
              " (decode it to get the bytes).",
          )
        : null,
      copy.payload
        ? h("pre", { class: "payload" }, copy.payload)
        : h("p", { class: "muted" }, "empty"),
      h("h3", null, "Attributes"),
      attributes.length
        ? h(
            "table",
            { class: "kv" },
            h(
              "tbody",
              null,
              attributes.map(([k, v]) => h("tr", null, h("th", null, k), h("td", null, v))),
            ),
          )
        : h("p", { class: "muted" }, "none"),
      h("h3", null, "Attempts"),
      copy.attempts.length
        ? h(
            "div",
            { class: "scroll" },
            h(
              "table",
              { class: "attempts job-attempts" },
              h(
                "thead",
                null,
                h(
                  "tr",
                  null,
                  ATTEMPT_COLUMNS.map((label) => h("th", { scope: "col" }, label)),
                ),
              ),
              h(
                "tbody",
                null,
                copy.attempts.map((a) =>
                  h(
                    "tr",
                    null,
                    h("td", { class: "num" }, String(a.attempt)),
                    h("td", { class: "time" }, fmtTime(a.started_at)),
                    h("td", null, h("span", { class: `badge outcome-${a.outcome}` }, a.outcome)),
                    h("td", { class: "num" }, a.status === null ? "no response" : String(a.status)),
                    h("td", { class: "num" }, fmtMs(a.duration_ms)),
                    h("td", { class: "error-text" }, a.error || DASH),
                    h("td", null, excerptCell(a.body)),
                    h("td", null, excerptCell(a.stderr)),
                  ),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, "Not tried yet."),
      h("h3", null, "Reproduce"),
      h(
        "p",
        { class: "muted" },
        "Run this on the daemon's host: it prints the exact curl (HTTP) or cgi-fcgi (FastCGI) " +
          "command that delivers this job again, with the same headers and environment.",
      ),
      h("div", { class: "command-row" }, command, copyStatus),
    );
  }
}
