// The live feed: a WebSocket to /v1/live that logs in with its first message, then receives
// "stats" snapshots every second and "attempt" events.  Reconnects with backoff.

const BACKOFF_FIRST = 1000;
const BACKOFF_MAX = 30000;
const AUTH_TIMEOUT = 5000;

export class LiveFeed {
  /**
   * @param {object} handlers onMessage(message), onState(state, detail), onAuthRefused(reason)
   */
  constructor({ onMessage, onState, onAuthRefused }) {
    this.onMessage = onMessage;
    this.onState = onState;
    this.onAuthRefused = onAuthRefused;
    this.socket = null;
    this.token = null;
    this.backoff = BACKOFF_FIRST;
    this.retryTimer = null;
    this.countdown = null;
    this.authTimer = null;
    this.running = false;
  }

  start(token) {
    this.stop();
    this.token = token;
    this.running = true;
    this.backoff = BACKOFF_FIRST;
    this.connect();
  }

  stop() {
    this.running = false;
    clearTimeout(this.retryTimer);
    clearInterval(this.countdown);
    clearTimeout(this.authTimer);
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      if (socket.readyState === WebSocket.OPEN) socket.close(1000, "dashboard closed");
      else if (socket.readyState === WebSocket.CONNECTING) {
        // Closing while connecting makes the browser log an error; close once it opens.
        socket.onopen = () => socket.close(1000, "dashboard closed");
      }
    }
    this.onState("off");
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${location.host}/v1/live`);
    this.socket = socket;
    let authenticated = false;
    this.onState("connecting");
    socket.onopen = () => {
      socket.send(JSON.stringify({ token: this.token }));
      // The daemon answers a good token with a snapshot straight away.
      this.authTimer = setTimeout(() => {
        if (!authenticated) this.onState("connecting", "waiting for the first snapshot");
      }, AUTH_TIMEOUT);
    };
    socket.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (!authenticated) {
        authenticated = true;
        clearTimeout(this.authTimer);
        this.backoff = BACKOFF_FIRST;
        this.onState("live");
      }
      this.onMessage(message);
    };
    socket.onclose = (event) => {
      clearTimeout(this.authTimer);
      if (this.socket !== socket) return;
      this.socket = null;
      if (!authenticated && event.code === 1008 && /token/i.test(event.reason)) {
        this.running = false;
        this.onState("off");
        this.onAuthRefused(event.reason);
        return;
      }
      if (this.running) this.scheduleReconnect(event.reason);
    };
  }

  scheduleReconnect(reason) {
    const delay = this.backoff;
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX);
    const due = Date.now() + delay;
    const tell = () => {
      const left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      this.onState("retrying", `reconnecting in ${left} s${reason ? ` (${reason})` : ""}`);
    };
    tell();
    clearInterval(this.countdown);
    this.countdown = setInterval(tell, 1000);
    this.retryTimer = setTimeout(() => {
      clearInterval(this.countdown);
      if (this.running) this.connect();
    }, delay);
  }
}
