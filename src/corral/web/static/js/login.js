import { api, flash, setCsrf } from "./api.js";

// Only a page of ours may be the target after login (no open redirect).
function nextPage() {
  const next = new URLSearchParams(location.search).get("next") || "/ui/vms";
  return /^\/ui\/[^/\\]?/.test(next) && !next.startsWith("//") ? next : "/ui/vms";
}

document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const username = document.getElementById("username").value;
  const password = document.getElementById("password").value;
  try {
    const session = await api("POST", "/v1/session", { username, password }, { quiet401: true });
    setCsrf(session.csrfToken);
    location.assign(nextPage());
  } catch (err) {
    flash(err.status === 401 ? "Wrong user name or password." : err.message);
  }
});
