import { api, apiVm, el, flash, header, liveEvents, pastEvents } from "./api.js";
import { actions, cpuControl, eventLine, ramControl, state, stateBadge } from "./vmcontrols.js";

const name = decodeURIComponent(location.pathname.split("/")[3] || "");
let vm = null;
let consoleAllowed = null; // null: unknown yet
let rfb = null;
let spice = null;
let serial = null;

function wsUrl(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
}

function renderSummary() {
  document.getElementById("name").textContent = name;
  document.title = "corral — " + name;
  document.getElementById("state").replaceChildren(stateBadge(vm));
  const status = vm.status || {};
  const ips = (status.ips || []).join(", ") || "–";
  document.getElementById("summary").replaceChildren(
    el("div", { class: "row" }, el("b", {}, "CPUs "), cpuControl(vm)),
    el("div", { class: "row" }, el("b", {}, "RAM "), ramControl(vm)),
    el("div", { class: "row" }, actions(vm)),
    el("div", { class: "row muted" }, "IPs: ", ips, " · restarts: ", String(status.restarts ?? 0)),
  );
  renderConsoleButtons();
}

async function renderMedia(images) {
  const drives = (vm.spec.vm.disks || []).filter((d) => d.cdrom);
  const box = document.getElementById("media");
  box.hidden = !drives.length;
  if (!drives.length) return;
  const status = vm.status || {};
  const rows = drives.map((drive, i) => {
    const driveName = drive.name || `cdrom${i}`;
    const current = (status.cdrom || {})[driveName] ?? drive.cdrom.image ?? "";
    const select = el("select", { "aria-label": "image for " + driveName, class: "cd-image" },
      el("option", { value: "" }, "(empty)"),
      images.map((img) => el("option", {
        value: img.name, selected: img.name === current || img.path === current,
      }, img.name)));
    const change = el("button", { type: "button", class: "cd-change" }, "Change");
    change.addEventListener("click", async () => {
      try {
        await api("POST", apiVm(name, "/media"), { drive: drive.name || null, image: select.value || null });
        flash(`${driveName}: ${select.value || "ejected"}`, "info");
      } catch (err) {
        flash(`${driveName}: ${err.message}`);
      }
    });
    return el("div", { class: "row" }, el("b", {}, "CD ", driveName, " "), el("span", { class: "muted" }, current || "(empty)"), " ", select, change);
  });
  box.replaceChildren(el("h2", {}, "CD-ROM"), ...rows);
}

function renderConsoleButtons() {
  const box = document.getElementById("console-buttons");
  const note = document.getElementById("console-note");
  if (consoleAllowed === false) {
    box.replaceChildren();
    note.textContent = "You may not open this VM's consoles (no accessConsole permission).";
    return;
  }
  const running = state(vm) === "Running";
  const display = vm.spec.vm.display || {};
  const buttons = [
    el("button", { type: "button", id: "open-serial", disabled: !running, onclick: openSerial }, "Serial console"),
  ];
  if (display.vnc) {
    buttons.push(el("button", { type: "button", id: "open-vnc", disabled: !running, onclick: openVnc }, "VNC console"));
  }
  if (display.spice) {
    buttons.push(el("button", { type: "button", id: "open-spice", disabled: !running, onclick: openSpice }, "SPICE console"));
    buttons.push(el("button", { type: "button", id: "download-vv", disabled: !running, onclick: downloadVv }, "SPICE .vv file"));
  }
  box.replaceChildren(...buttons);
  note.textContent = running ? "" : "The consoles open while the VM runs.";
}

async function openVnc() {
  const { default: RFB } = await import("/ui/vendor/novnc/core/rfb.js");
  if (rfb) rfb.disconnect();
  const target = document.getElementById("vnc");
  target.hidden = false;
  target.replaceChildren();
  let password;
  try {
    password = (await api("POST", apiVm(name, "/display?expiry=10"))).password;
  } catch (err) {
    return flash("VNC: " + err.message);
  }
  rfb = new RFB(target, wsUrl(apiVm(name, "/vnc")), { credentials: { password } });
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => (target.dataset.connected = "true"));
  rfb.addEventListener("disconnect", (e) => {
    delete target.dataset.connected;
    if (!e.detail.clean) flash("VNC: disconnected");
  });
  rfb.addEventListener("securityfailure", (e) => flash("VNC: " + (e.detail.reason || "refused")));
}

async function openSpice() {
  const { SpiceMainConn } = await import("/ui/vendor/spice-html5/src/main.js");
  if (spice) spice.stop();
  const target = document.getElementById("spice");
  target.hidden = false;
  target.replaceChildren(el("div", { id: "spice-screen" }));
  let password;
  try {
    password = (await api("POST", apiVm(name, "/display?expiry=10"))).password;
  } catch (err) {
    return flash("SPICE: " + err.message);
  }
  spice = new SpiceMainConn({
    uri: wsUrl(apiVm(name, "/spice")), screen_id: "spice-screen", password,
    onerror: (e) => flash("SPICE: " + (e && e.message ? e.message : "disconnected")),
    onsuccess: () => (target.dataset.connected = "true"),
  });
}

async function openSerial() {
  const [{ Terminal }, { FitAddon }] = await Promise.all([
    import("/ui/vendor/xterm/lib/xterm.mjs"),
    import("/ui/vendor/xterm-fit/lib/addon-fit.mjs"),
  ]);
  if (serial) serial.close();
  const box = document.getElementById("serial");
  box.hidden = false;
  box.replaceChildren();
  const term = new Terminal({ convertEol: false, cursorBlink: true, fontSize: 14, scrollback: 2000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  const ws = new WebSocket(wsUrl(apiVm(name, "/console")));
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  ws.onopen = () => {
    box.dataset.connected = "true";
    term.focus();
    ws.send(encoder.encode("\r"));
  };
  ws.onmessage = (m) => term.write(typeof m.data === "string" ? m.data : new Uint8Array(m.data));
  ws.onclose = (e) => {
    delete box.dataset.connected;
    term.write("\r\n[console closed" + (e.reason ? ": " + e.reason : "") + "]\r\n");
  };
  term.onData((data) => ws.readyState === WebSocket.OPEN && ws.send(encoder.encode(data)));
  serial = ws;
  window.corralTerminal = term; // for the page's tests: the terminal's text buffer
}

async function downloadVv() {
  try {
    const response = await api("POST", apiVm(name, "/display.vv"), undefined, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const a = el("a", { href: url, download: name + ".vv" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    flash("SPICE: open the .vv file with remote-viewer within seconds (the password expires).", "info");
  } catch (err) {
    flash("SPICE: " + err.message);
  }
}

async function probeConsole() {
  // a read the consoles' permission (accessConsole) also guards: no console offered without it
  try {
    await api("GET", apiVm(name, "/logs?source=console&tail=1"), undefined, { raw: true });
    consoleAllowed = true;
  } catch (err) {
    consoleAllowed = err.status !== 403;
  }
}

let timer = null;
async function refresh() {
  vm = await api("GET", apiVm(name));
  renderSummary();
}

async function main() {
  await header("vms");
  const events = document.getElementById("events");
  liveEvents(apiVm(name, "/events"), (event) => {
    events.prepend(eventLine(event));
    clearTimeout(timer);
    timer = setTimeout(() => refresh().catch((err) => flash(err.message)), 150);
  });
  const [doc, history, images] = await Promise.all([
    api("GET", apiVm(name)),
    pastEvents(apiVm(name, "/events")).catch(() => null),
    api("GET", "/v1/images").catch(() => ({ items: [] })),
    probeConsole(),
  ]);
  vm = doc;
  renderSummary();
  renderMedia(images.items || []);
  if (history && Array.isArray(history)) {
    for (const event of history.slice(-30)) events.prepend(eventLine(event));
  }
  document.body.dataset.ready = "true";
}

main().catch((err) => {
  if (err.status !== 401) flash(err.message);
});
