// What the list and a VM's page both show: its state, CPU and RAM controls within the maxima,
// and the lifecycle buttons. Every value comes from the VM document; nothing is parsed as HTML.
import { api, apiVm, bytes, el, flash, parseSize } from "./api.js";

export function vmName(vm) {
  return vm.metadata.name;
}

export function state(vm) {
  return (vm.status && vm.status.state) || "Stopped";
}

function ramBytes(value) {
  if (typeof value === "number") return value;
  if (typeof value === "string") return parseSize(value);
  return null;
}

export async function act(name, action) {
  try {
    await api("POST", apiVm(name, "/" + action));
  } catch (err) {
    flash(`${action} ${name}: ${err.message}`);
  }
}

async function patchVm(name, vmPatch) {
  try {
    await api("PATCH", apiVm(name), { spec: { vm: vmPatch } });
    flash(`${name}: changed`, "info");
  } catch (err) {
    flash(`${name}: ${err.message}`);
  }
}

export function stateBadge(vm) {
  const s = state(vm);
  return el("span", { class: "state " + s.toLowerCase(), "data-state": s }, s);
}

export function cpuControl(vm) {
  const spec = vm.spec.vm;
  const name = vmName(vm);
  const max = spec.maximumCpus || 1;
  const current = spec.currentCpus || max;
  const seen = vm.status && vm.status.cpus;
  const input = el("input", {
    type: "number", min: 1, max, value: current, class: "cpus", "aria-label": "CPUs of " + name,
  });
  const set = el("button", { type: "button", class: "set-cpus" }, "Set");
  set.addEventListener("click", () => {
    const n = Number(input.value);
    if (!Number.isInteger(n) || n < 1 || n > max) return flash(`CPUs: 1 to ${max}`);
    patchVm(name, { currentCpus: n });
  });
  return el("span", { class: "control" }, input, set,
    el("span", { class: "muted seen" }, `${seen ?? "–"} / ${max}`));
}

export function ramControl(vm) {
  const spec = vm.spec.vm;
  const name = vmName(vm);
  const max = ramBytes(spec.maximumRam);
  const current = ramBytes(spec.currentRam) ?? max;
  const input = el("input", {
    type: "text", value: bytes(current).replace(" ", ""), size: 7, class: "ram",
    "aria-label": "RAM of " + name, title: "e.g. 512Mi, up to " + bytes(max),
  });
  const set = el("button", { type: "button", class: "set-ram" }, "Set");
  set.addEventListener("click", () => {
    const n = parseSize(input.value.replace("iB", "i"));
    if (n === null || n <= 0 || (max && n > max)) return flash(`RAM: up to ${bytes(max)}`);
    patchVm(name, { currentRam: n });
  });
  return el("span", { class: "control" }, input, set,
    el("span", { class: "muted seen" }, `${bytes(vm.status && vm.status.ram)} / ${bytes(max)}`));
}

export function actions(vm) {
  const name = vmName(vm);
  const s = state(vm);
  const running = s === "Running" || s === "Starting";
  const button = (action, label, enabled) =>
    el("button", {
      type: "button", class: "act-" + action, disabled: !enabled,
      onclick: () => act(name, action),
    }, label);
  return el("span", { class: "actions" },
    button("start", "Start", !running),
    button("stop", "Stop", running),
    button("restart", "Restart", running),
    button("reset", "Reset", s === "Running"));
}

export function eventLine(event) {
  const when = new Date(event.time).toLocaleTimeString();
  const extra = Object.entries(event)
    .filter(([k]) => !["id", "vm", "time", "event", "ts", "t"].includes(k))
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(" ");
  return el("li", {}, el("time", {}, when), " ", el("b", {}, event.vm || "host"), " ",
    event.event, " ", el("span", { class: "muted" }, extra));
}
