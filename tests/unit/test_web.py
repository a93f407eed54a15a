"""The web service's pure parts: its options, its place among the daemon's services, the
SPICE ``.vv`` file, and the host sampler on this host's real /proc."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.errors import Conflict, SpecError
from corral.manager import Manager, ManagerConfig, VmRecord
from corral.services import build_services
from corral.spec import HostPolicy
from corral.web.proxy import display_address, vv_file
from corral.web.sampler import HostSampler
from corral.web.service import WebService, service_from_config


def test_web_needs_the_api_on_tcp(tmp_path: Path) -> None:
    config = ManagerConfig(state_dir=tmp_path)
    with pytest.raises(SpecError) as err:
        build_services(["web"], config, {"api": {"socket": None}})
    assert err.value.issues[0].loc == "services.web"
    assert "--listen" in err.value.issues[0].reason


def test_web_options_are_checked(tmp_path: Path) -> None:
    config = ManagerConfig(state_dir=tmp_path)
    service = service_from_config(config, {"vvValidity": 30, "sampleSeconds": 5})
    assert isinstance(service, WebService)
    assert (service.settings.vv_validity, service.sample_seconds) == (30, 5)
    assert service_from_config(config, {}).settings.vv_validity == 10  # VM-Operator's default
    for options, loc in (({"vvValidity": 0}, "web.vvValidity"),
                         ({"sampleSeconds": "x"}, "web.sampleSeconds"),
                         ({"colour": 1}, "web.colour")):  # fmt: skip
        with pytest.raises(SpecError) as err:
            service_from_config(config, options)
        assert err.value.issues[0].loc == loc


def test_vv_file_is_remote_viewers_format_and_takes_no_line_breaks() -> None:
    text = vv_file("demo", "127.0.0.1", 5930, "s3cret")
    lines = text.splitlines()
    assert lines[0] == "[virt-viewer]"
    assert {"type=spice", "host=127.0.0.1", "port=5930", "password=s3cret",
            "delete-this-file=1"} <= set(lines)  # fmt: skip
    with pytest.raises(ValueError, match="line break"):
        vv_file("demo", "127.0.0.1", 5930, "x\nhost=evil")


def test_host_sampler_keeps_the_last_window_of_real_samples() -> None:
    sampler = HostSampler(lambda: (3, 2**30, 2), interval=10, window=30)
    for _ in range(5):
        sample = sampler.sample()
    assert len(sampler.samples) == 3  # 30 s of 10 s samples
    assert 0.0 <= sample.cpu_percent <= 100.0
    assert 0 < sample.ram_used < sample.ram_total
    assert (sample.vm_cpus, sample.vm_ram, sample.running) == (3, 2**30, 2)
    assert set(sample.to_json()) == {"time", "cpuPercent", "ramUsed", "ramTotal", "vmCpus",
                                     "vmRam", "running"}  # fmt: skip


def test_pages_have_no_inline_script_and_never_parse_html() -> None:
    """What the CSP forbids (inline script, inline handlers, eval) is not in the pages, and
    the pages never turn a string into markup: every text goes in through textContent."""
    import re

    from corral.web.pages import STATIC

    files = sorted(STATIC.rglob("*.*"))
    assert {f.name for f in files} >= {"index.html", "vm.html", "host.html", "login.html",
                                       "api.js", "vm.js", "app.css"}  # fmt: skip
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".html":
            assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", text) == [], path
            assert re.findall(r"\son[a-z]+\s*=", text) == [], path
            assert re.findall(r"\b(?:src|href)=\"(?:https?:)?//", text) == [], path  # no CDN
        if path.suffix == ".js":
            for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                          "eval(", "new Function"):  # fmt: skip
                assert risky not in text, f"{path.name}: {risky}"


class _Seen:
    """The manager as the proxy reads it, its record with the status a running VM's runner
    reports (the real manager's reconcile loop would overwrite a status set in its store)."""

    def __init__(self, manager: Manager, pid: int | None) -> None:
        self.record = dataclasses.replace(manager.get("v"), status={"state": "Running", "pid": pid})

    def get(self, name: str) -> VmRecord:
        assert name == self.record.name
        return self.record


async def test_display_proxy_goes_only_where_the_vms_qemu_listens(tmp_path: Path) -> None:
    """A user who may change a running VM's document (``"*"``) must not turn the display
    proxy to another VM's display or any host:port: a display change waits for a restart, so
    the proxy goes only to the address the running qemu was started with (its argv; a stand-in
    process with qemu's -spice/-vnc arguments, since no guest runs in a unit test)."""
    spice = "port=5930,addr=127.0.0.1,streaming-video=filter,seamless-migration=on"
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "-spice", spice,
            "-vnc", "127.0.0.1:1,password=on"]  # fmt: skip
    display = {"spice": {"port": 5930}, "vnc": {"port": 5901}}
    vm = {"maximumRam": "256Mi", "state": "Stopped", "display": display}
    doc = {"metadata": {"name": "v"}, "spec": {"vm": vm}}
    qemu = subprocess.Popen(argv)
    try:
        async with Manager(ManagerConfig(state_dir=tmp_path / "s"), policy=HostPolicy()) as m:
            await m.create(doc)
            seen: Any = _Seen(m, qemu.pid)
            assert display_address(seen, "v", "spice") == ("127.0.0.1", 5930)
            assert display_address(seen, "v", "vnc") == ("127.0.0.1", 5901)
            await m.patch("v", {"spec": {"vm": {"display": {"spice": {"port": 22},
                                                            "vnc": {"port": 5902}}}}})  # fmt: skip
            seen = _Seen(m, qemu.pid)
            for protocol in ("spice", "vnc"):
                with pytest.raises(Conflict, match="waits for a restart"):
                    display_address(seen, "v", protocol)
            with pytest.raises(Conflict, match="not where its qemu listens"):
                display_address(_Seen(m, None), "v", "spice")  # type: ignore[arg-type]
    finally:
        qemu.kill()
        qemu.wait()
