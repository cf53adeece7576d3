// Small DOM helpers and number/time formatting.  Text always goes in as text nodes, never as
// HTML: payloads, bodies and stderr are whatever a producer or backend sent.

/**
 * Build an element: h("a", {href: "#/", class: "x", onclick: fn}, "text", child, [more]).
 * Never sets a style attribute (the page's CSP forbids inline styles; use classes).
 */
export function h(tag, props, ...children) {
  const element = document.createElement(tag);
  if (props) {
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") element.className = value;
      else if (name === "dataset") Object.assign(element.dataset, value);
      else if (name.startsWith("on") && typeof value === "function") {
        element.addEventListener(name.slice(2), value);
      } else if (name === "value" || name === "checked" || name === "textContent") {
        element[name] = value;
      } else element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else if (child instanceof Node) element.append(child);
    else element.append(document.createTextNode(String(child)));
  }
}

export function clear(element) {
  element.replaceChildren();
}

// -- formatting ------------------------------------------------------------------------------

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const twoDigits = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });
const oneDigit = new Intl.NumberFormat("en-US", { maximumFractionDigits: 1 });

export const DASH = "–";

export function fmtInt(value) {
  return value === null || value === undefined ? DASH : integer.format(value);
}

/** Jobs per second: two decimals when small, whole numbers when large. */
export function fmtRate(value) {
  if (value === null || value === undefined) return DASH;
  if (value === 0) return "0";
  return Math.abs(value) >= 100 ? integer.format(value) : twoDigits.format(value);
}

export function fmtMs(value) {
  if (value === null || value === undefined) return DASH;
  if (value >= 1000) return `${twoDigits.format(value / 1000)} s`;
  return `${value >= 100 ? integer.format(value) : oneDigit.format(value)} ms`;
}

function pad(number) {
  return String(number).padStart(2, "0");
}

/** Unix seconds as local "YYYY-MM-DD HH:MM:SS". */
export function fmtTime(seconds) {
  if (seconds === null || seconds === undefined) return DASH;
  const d = new Date(seconds * 1000);
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return DASH;
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function excerpt(text, length = 160) {
  if (!text) return "";
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > length ? `${flat.slice(0, length)}…` : flat;
}

// -- links -----------------------------------------------------------------------------------

export function topicHref(queue, topic) {
  return `#/topic/${encodeURIComponent(queue)}/${encodeURIComponent(topic)}`;
}

export function jobHref(id) {
  return `#/job/${encodeURIComponent(id)}`;
}

// -- notices ---------------------------------------------------------------------------------

/** A message at the top of the page; errors stay until closed, the rest fade after a while. */
export function notify(message, kind = "info") {
  const host = document.getElementById("notices");
  const close = h("button", { type: "button", class: "quiet", "aria-label": "Dismiss" }, "×");
  const notice = h(
    "div",
    { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" },
    h("span", null, message),
    close,
  );
  close.addEventListener("click", () => notice.remove());
  host.append(notice);
  while (host.children.length > 4) host.firstElementChild.remove();
  if (kind !== "error") setTimeout(() => notice.remove(), 8000);
  return notice;
}

export function clearNotices() {
  clear(document.getElementById("notices"));
}

// -- confirmation ----------------------------------------------------------------------------

/** Ask in a modal dialog; resolves true when the operator confirms. */
export function confirmAction({ title, message, confirm = "Confirm", danger = false }) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-message").textContent = message;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = confirm;
  ok.classList.toggle("danger", danger);
  ok.classList.toggle("primary", !danger);
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    // Enter, pressed out of habit, must not delete for good: it cancels such an action.
    (danger ? document.getElementById("confirm-cancel") : ok).focus();
  });
}
