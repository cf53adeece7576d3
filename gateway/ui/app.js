// The dashboard: sign-in with the admin token, a hash router over three pages, and the live
// feed that keeps them current.

import { ApiError, clearToken, get, getToken, onUnauthorized, setToken } from "./api.js";
import { clearNotices, h, jobHref, notify } from "./dom.js";
import { History } from "./history.js";
import { JobView } from "./job.js";
import { LiveFeed } from "./live.js";
import { OverviewView } from "./overview.js";
import { TopicView } from "./topic.js";

const app = {
  snapshot: null,
  history: new History(),
  view: null,
  live: null,
  signedIn: false,
};

const $ = (id) => document.getElementById(id);

// -- live data -------------------------------------------------------------------------------

function takeSnapshot(snapshot) {
  showStore(snapshot.store);
  if (!app.history.add(snapshot)) return;
  app.snapshot = snapshot;
  if (app.view && app.view.update) app.view.update(snapshot);
}

/** A banner while the stats cannot be read from the store: the figures shown are older. */
function showStore(store) {
  const banner = $("store-down");
  banner.hidden = !store || store.ok;
  if (banner.hidden) return;
  const since = new Date(store.since * 1000).toLocaleTimeString();
  banner.textContent =
    `The store is not answering (since ${since}): ${store.error}. ` +
    "The figures below are from before that.";
}

function onLiveMessage(message) {
  if (message.type === "stats") {
    const { type: _type, ...snapshot } = message;
    takeSnapshot(snapshot);
  } else if (message.type === "attempt" && app.view && app.view.onEvent) {
    app.view.onEvent(message);
  }
}

const LIVE_LABELS = {
  live: "live",
  connecting: "connecting…",
  retrying: "reconnecting",
  off: "offline",
};

function onLiveState(state, detail) {
  const element = $("live-state");
  element.dataset.state = state;
  element.textContent = state === "retrying" && detail ? detail : LIVE_LABELS[state];
  element.title =
    state === "live" ? "Live: figures update every second" : detail || LIVE_LABELS[state];
}

// -- pages -----------------------------------------------------------------------------------

class NotFoundView {
  constructor(hash) {
    this.hash = hash;
  }

  crumbs() {
    return [{ label: "not found" }];
  }

  mount(root) {
    root.append(
      h(
        "section",
        { class: "card" },
        h("h1", null, "No such page"),
        h(
          "p",
          null,
          `Nothing lives at ${this.hash}. `,
          h("a", { href: "#/" }, "Back to the overview"),
        ),
      ),
    );
  }
}

function viewFor(hash) {
  const path = hash.replace(/^#/, "") || "/";
  const parts = path.split("/").filter(Boolean);
  try {
    const decoded = parts.map(decodeURIComponent);
    if (decoded.length === 0) return new OverviewView(app);
    if (decoded[0] === "topic" && decoded.length === 3) {
      return new TopicView(app, decoded[1], decoded[2]);
    }
    if (decoded[0] === "job" && decoded.length === 2) return new JobView(app, decoded[1]);
  } catch {
    // a malformed escape: not a page of ours
  }
  return new NotFoundView(hash);
}

function route() {
  if (!app.signedIn) return;
  if (app.view && app.view.unmount) app.view.unmount();
  const root = $("view");
  root.replaceChildren();
  const view = viewFor(location.hash);
  app.view = view;
  const crumbs = $("crumbs");
  crumbs.replaceChildren(h("a", { href: "#/" }, "Overview"));
  for (const crumb of view.crumbs()) {
    crumbs.append(
      h("span", { class: "sep", "aria-hidden": "true" }, "›"),
      crumb.href ? h("a", { href: crumb.href }, crumb.label) : h("span", null, crumb.label),
    );
  }
  document.title = view.title ? `${view.title()} · busgate` : "busgate";
  view.mount(root);
  window.scrollTo(0, 0);
}

// -- signing in and out ----------------------------------------------------------------------

function showLogin(message) {
  app.signedIn = false;
  if (app.live) app.live.stop();
  if (app.view && app.view.unmount) app.view.unmount();
  app.view = null;
  $("view").hidden = true;
  $("view").replaceChildren();
  $("find-job").hidden = true;
  $("sign-out").hidden = true;
  $("crumbs").replaceChildren();
  $("login").hidden = false;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  const input = $("login-token");
  input.value = "";
  input.focus();
}

function start(snapshot) {
  app.signedIn = true;
  $("login").hidden = true;
  $("view").hidden = false;
  $("find-job").hidden = false;
  $("sign-out").hidden = false;
  if (snapshot) takeSnapshot(snapshot);
  route();
  app.live.start(getToken());
}

async function resume() {
  // A token from earlier in this tab: show the page at once, fill it when stats arrive.
  start(null);
  try {
    takeSnapshot(await get("/v1/stats"));
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status !== 401) {
      // the live feed retries on its own; say why nothing shows yet
      notify(`Could not read the stats: ${error.message}`, "error");
    }
  }
}

async function signIn(event) {
  event.preventDefault();
  const token = $("login-token").value.trim();
  const error = $("login-error");
  const button = event.target.querySelector("button[type=submit]");
  if (!token) return;
  button.disabled = true;
  try {
    const snapshot = await get("/v1/stats", { token });
    setToken(token);
    clearNotices();
    start(snapshot);
  } catch (failure) {
    if (!(failure instanceof ApiError)) throw failure;
    error.hidden = false;
    error.textContent =
      failure.status === 401
        ? `The daemon refused this token: ${failure.message}`
        : `Could not sign in: ${failure.message}`;
  } finally {
    button.disabled = false;
  }
}

function tokenRefused(message) {
  const hadToken = getToken() !== null;
  clearToken();
  if (hadToken) {
    showLogin(`The daemon refused the admin token (${message}). Enter it again.`);
  }
}

function init() {
  // Sticky table headers sit just below the sticky page header, whatever its height.
  const bar = document.querySelector("header.bar");
  new ResizeObserver(() => {
    document.documentElement.style.setProperty("--bar-height", `${bar.offsetHeight}px`);
  }).observe(bar);
  app.live = new LiveFeed({
    onMessage: onLiveMessage,
    onState: onLiveState,
    onAuthRefused: (reason) => tokenRefused(reason),
  });
  onUnauthorized(tokenRefused);
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => {
    clearToken();
    clearNotices();
    showLogin("");
  });
  $("find-job").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("find-job-id");
    const id = input.value.trim();
    if (!id) return;
    input.value = "";
    location.hash = jobHref(id);
  });
  window.addEventListener("hashchange", route);
  if (getToken()) resume();
  else showLogin("");
}

init();
