// The admin API over fetch: bearer token from this tab's sessionStorage, errors in words.

const TOKEN_KEY = "busgate.admin-token";

/** An answer other than 2xx, with the daemon's own explanation ({"error": "..."}). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

let unauthorizedHandler = () => {};

/** Called with the daemon's message whenever it answers 401: the token is no good. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** "/v1/queues/{q}/topics/{t}" with both names escaped. */
export function topicPath(queue, topic) {
  return `/v1/queues/${encodeURIComponent(queue)}/topics/${encodeURIComponent(topic)}`;
}

/**
 * One call to the admin API: resolves to the parsed JSON, rejects with an ApiError whose
 * message is the daemon's explanation.  ``body`` (any JSON value) makes it a JSON request.
 */
export async function request(method, path, body, { token = getToken() } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, `the daemon did not answer (${error.message || "network error"})`);
  }
  const text = await response.text();
  let document = null;
  if (text) {
    try {
      document = JSON.parse(text);
    } catch {
      document = null;
    }
  }
  if (!response.ok) {
    const said = document && typeof document.error === "string" ? document.error : "";
    const message = said || `HTTP ${response.status} ${response.statusText}`.trim();
    if (response.status === 401) unauthorizedHandler(message);
    throw new ApiError(response.status, message);
  }
  return document;
}

export const get = (path, options) => request("GET", path, undefined, options);
export const post = (path, body = {}) => request("POST", path, body);
