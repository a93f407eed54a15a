"""`make run`: boot the demo VM for real and show that it works.

1. build (or reuse) the tiny test guest from Debian packages (guests/build.py);
2. write the demo VM document (examples/demo-vm.yaml with the guest's paths) to build/demo/;
3. `corral render` it into a qemu argv (host policy, KVM probe, templates: the real path);
4. start qemu, wait for the guest's ready marker on the serial console log, show the facts the
   guest reports, ask it over QMP for an ACPI powerdown, and wait for qemu to exit.

Until the runner lands (issue #3) this drives qemu itself; afterwards it is `corral run`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "CORRAL-GUEST-READY"


def load_guest_builder():  # type: ignore[no-untyped-def]
    path = ROOT / "guests/build.py"
    spec = importlib.util.spec_from_file_location("corral_demo_guest_build", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def qmp(sock_path: Path, command: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply  # type: ignore[no-any-return]


def main() -> int:
    build = load_guest_builder()
    t0 = time.monotonic()
    guest = build.build_tiny()
    print(f"[demo] tiny guest ready in {time.monotonic() - t0:.1f}s: {guest.directory}")

    work = ROOT / "build" / "demo"
    runtime = Path(f"/tmp/corral-demo-{os.getuid()}")
    work.mkdir(parents=True, exist_ok=True)
    runtime.mkdir(mode=0o700, exist_ok=True)
    doc = (ROOT / "examples/demo-vm.yaml").read_text().replace("@GUEST@", str(guest.directory))
    vm_yaml = work / "vm.yaml"
    vm_yaml.write_text(doc)

    corral = [sys.executable, "-m", "corral.cli.main"]
    render = subprocess.run(
        [*corral, "render", "-c", str(vm_yaml), "--data-dir", str(work / "data"),
         "--runtime-dir", str(runtime), "--standalone"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if render.returncode != 0:
        print(render.stderr, file=sys.stderr)
        return 1
    argv = render.stdout.splitlines()
    print("[demo] corral render gave this argv:\n    " + " \\\n    ".join(argv))

    log = runtime / "console.log"
    log.unlink(missing_ok=True)
    (work / "data").mkdir(exist_ok=True)
    t0 = time.monotonic()
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = t0 + 180
        text = ""
        while MARKER not in text:
            if qemu.poll() is not None or time.monotonic() > deadline:
                print(f"[demo] guest did not boot; console:\n{text}", file=sys.stderr)
                return 1
            time.sleep(0.2)
            text = log.read_text(errors="replace") if log.exists() else ""
        print(f"[demo] guest booted in {time.monotonic() - t0:.1f}s; it reports:")
        for line in text.splitlines():
            if line.startswith("CORRAL-FACT"):
                print("    " + line.split(" ", 1)[1])
        t1 = time.monotonic()
        qmp(runtime / "qmp.sock", "system_powerdown")
        code = qemu.wait(timeout=60)
        print(f"[demo] ACPI powerdown -> qemu exited {code} in {time.monotonic() - t1:.1f}s")
        return 0 if code == 0 else 1
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


if __name__ == "__main__":
    sys.exit(main())
