import { api, apiVm, el, flash, header, liveEvents, vmUrl } from "./api.js";
import { actions, cpuControl, eventLine, ramControl, stateBadge, vmName } from "./vmcontrols.js";

const body = document.querySelector("#vms tbody");
const rows = new Map(); // name -> <tr>
const pending = new Map(); // name -> timer: one refresh per VM per burst of events

function render(vm) {
  const name = vmName(vm);
  const row = el("tr", { "data-vm": name },
    el("td", {}, el("a", { href: vmUrl(name) }, name)),
    el("td", {}, stateBadge(vm)),
    el("td", {}, cpuControl(vm)),
    el("td", {}, ramControl(vm)),
    el("td", {}, actions(vm)));
  const old = rows.get(name);
  if (old) old.replaceWith(row);
  else {
    const after = [...rows.keys()].filter((n) => n > name).sort()[0];
    body.insertBefore(row, after ? rows.get(after) : null);
  }
  rows.set(name, row);
  document.getElementById("count").textContent = `(${rows.size})`;
}

async function refresh(name) {
  try {
    render(await api("GET", apiVm(name)));
  } catch (err) {
    if (err.status === 404 || err.status === 403) {
      rows.get(name)?.remove();
      rows.delete(name);
      document.getElementById("count").textContent = `(${rows.size})`;
    }
  }
}

function onEvent(event) {
  const list = document.getElementById("events");
  list.prepend(eventLine(event));
  while (list.children.length > 50) list.lastChild.remove();
  if (!event.vm) return;
  clearTimeout(pending.get(event.vm));
  pending.set(event.vm, setTimeout(() => refresh(event.vm), 150));
}

async function main() {
  await header("vms");
  liveEvents("/v1/events", onEvent); // before the list: no change falls between the two
  const list = await api("GET", "/v1/vms");
  for (const vm of list.items.sort((a, b) => (vmName(a) < vmName(b) ? -1 : 1))) render(vm);
  document.body.dataset.ready = "true";
}

main().catch((err) => {
  if (err.status !== 401) flash(err.message);
});
