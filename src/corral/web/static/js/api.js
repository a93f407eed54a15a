// The pages' one way to the daemon: the REST API with the session cookie, the CSRF header on
// every unsafe request, and problem+json errors turned into Error objects. `el` builds DOM
// nodes from text only (never HTML): whatever a user or a guest wrote is shown, not parsed.

const CSRF_KEY = "corral.csrf";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export function toLogin() {
  const next = location.pathname + location.search;
  location.assign("/ui/login?next=" + encodeURIComponent(next));
}

export async function api(method, path, body, { raw = false, quiet401 = false } = {}) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (method !== "GET" && method !== "HEAD") {
    const csrf = sessionStorage.getItem(CSRF_KEY);
    if (csrf) headers["X-CSRF-Token"] = csrf;
  }
  const response = await fetch(path, init);
  if (response.status === 401 && !quiet401) {
    toLogin();
    throw new ApiError(401, "not logged in");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const problem = await response.json();
      detail = problem.detail || problem.title || detail;
    } catch (_) {
      /* not JSON */
    }
    throw new ApiError(response.status, detail);
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

export function setCsrf(token) {
  if (token) sessionStorage.setItem(CSRF_KEY, token);
  else sessionStorage.removeItem(CSRF_KEY);
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function vmUrl(name) {
  return "/ui/vms/" + encodeURIComponent(name);
}

export function apiVm(name, rest = "") {
  return "/v1/vms/" + encodeURIComponent(name) + rest;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (Number.isInteger(n) ? n : n.toFixed(1)) + " " + units[i];
}

export function parseSize(text) {
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?)?B?\s*$/i.exec(text);
  if (!m) return null;
  const mult = { k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };
  const unit = (m[2] || "").charAt(0).toLowerCase();
  return Math.round(parseFloat(m[1]) * (unit ? mult[unit] : 1));
}

export function flash(message, kind = "error") {
  const box = document.getElementById("flash");
  if (!box) return;
  box.replaceChildren(el("div", { class: "flash " + kind, role: "alert" }, message));
  if (kind !== "error") setTimeout(() => box.replaceChildren(), 4000);
}

// The header with the navigation and who is logged in; resolves to the session (null if the
// daemon has no sessions: a bearer-token deployment), or goes to the login page on 401.
export async function header(active) {
  let session = null;
  try {
    session = await api("GET", "/v1/session");
    if (session && session.csrfToken) setCsrf(session.csrfToken);
  } catch (err) {
    if (err.status === 401) throw err;
  }
  const link = (href, text, key) =>
    el("a", { href, class: key === active ? "active" : null }, text);
  const user = session
    ? el("span", { class: "user" }, session.user, " ",
        el("button", { type: "button", id: "logout", onclick: logout }, "Log out"))
    : null;
  document.getElementById("top").replaceChildren(
    el("nav", {}, el("strong", { class: "brand" }, "corral"), link("/ui/vms", "VMs", "vms"),
      link("/ui/host", "Host", "host"), user),
  );
  return session;
}

async function logout() {
  try {
    await api("DELETE", "/v1/session", undefined, { quiet401: true });
  } finally {
    setCsrf(null);
    location.assign("/ui/login");
  }
}

// Server-sent events, live only: `after` far past the newest id skips the replay of the
// stored history (the pages load the current state themselves); a reconnect resumes after the
// last event seen (Last-Event-ID). Read with fetch, not EventSource: every event kind arrives
// (EventSource needs a listener per named kind) and a lost session is seen (401).
export function liveEvents(path, onEvent) {
  let lastId = null;
  let stopped = false;
  const controller = new AbortController();
  const dispatch = (block) => {
    let data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("id:")) lastId = line.slice(3).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (!data) return;
    try {
      onEvent(JSON.parse(data));
    } catch (_) {
      /* a malformed event: skip it */
    }
  };
  const run = async () => {
    while (!stopped) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch(path + "?follow=true&after=4611686018427387904", {
          headers, credentials: "same-origin", signal: controller.signal,
        });
        if (response.status === 401) return toLogin();
        if (!response.ok) throw new Error(String(response.status));
        document.body.classList.remove("offline");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            dispatch(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
          }
        }
      } catch (_) {
        if (stopped) return;
      }
      document.body.classList.add("offline");
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  };
  run();
  return { close: () => { stopped = true; controller.abort(); } };
}

// The stored events of `path` (an SSE body, read whole), oldest first.
export async function pastEvents(path) {
  const response = await api("GET", path, undefined, { raw: true });
  const text = await response.text();
  const events = [];
  for (const block of text.split("\n\n")) {
    const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("");
    if (!data) continue;
    try {
      events.push(JSON.parse(data));
    } catch (_) {
      /* skip */
    }
  }
  return events;
}
