import uPlot from "/ui/vendor/uplot/dist/uPlot.esm.js";
import { api, bytes, el, flash, header } from "./api.js";

const GiB = 1024 ** 3;
let cpuPlot = null;
let ramPlot = null;

function card(title, value, detail) {
  return el("div", { class: "card stat" }, el("h3", {}, title), el("div", { class: "value" }, value),
    el("div", { class: "muted" }, detail));
}

function plot(target, series, data) {
  const width = Math.max(320, document.querySelector("main").clientWidth - 20);
  return new uPlot({ width, height: 220, series: [{}, ...series], scales: { x: { time: true } } },
    data, target);
}

function columns(samples) {
  const t = samples.map((s) => s.time);
  return {
    cpu: [t, samples.map((s) => s.cpuPercent), samples.map((s) => s.vmCpus)],
    ram: [t, samples.map((s) => s.ramUsed / GiB), samples.map((s) => s.vmRam / GiB)],
  };
}

async function update() {
  const [host, history] = await Promise.all([api("GET", "/v1/host"), api("GET", "/v1/host/history")]);
  const cap = host.capacity || {};
  const last = history.samples[history.samples.length - 1];
  document.getElementById("cards").replaceChildren(
    card("VMs", String(host.vms ?? "–"), last ? `${last.running} running` : ""),
    card("vCPUs in use", `${cap.cpus?.used ?? "–"} / ${cap.cpus?.limit ?? "–"}`,
      `${cap.cpus?.total ?? "–"} host CPUs` + (last ? `, ${last.cpuPercent}% busy` : "")),
    card("RAM in use", `${bytes(cap.ram?.used)} / ${bytes(cap.ram?.limit)}`,
      last ? `host: ${bytes(last.ramUsed)} of ${bytes(last.ramTotal)}` : ""),
  );
  const data = columns(history.samples);
  if (!cpuPlot) {
    cpuPlot = plot(document.getElementById("cpu-graph"), [
      { label: "host CPU %", stroke: "#2a6fdb", width: 2 },
      { label: "VM vCPUs", stroke: "#d9822b", width: 2 },
    ], data.cpu);
    ramPlot = plot(document.getElementById("ram-graph"), [
      { label: "host RAM used (GiB)", stroke: "#2a6fdb", width: 2 },
      { label: "VM RAM (GiB)", stroke: "#d9822b", width: 2 },
    ], data.ram);
  } else {
    cpuPlot.setData(data.cpu);
    ramPlot.setData(data.ram);
  }
  document.body.dataset.ready = "true";
  return history.intervalSeconds;
}

async function main() {
  await header("host");
  const interval = await update();
  setInterval(() => update().catch((err) => flash(err.message)), Math.max(2, interval) * 1000);
}

main().catch((err) => {
  if (err.status !== 401) flash(err.message);
});
