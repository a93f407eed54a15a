"""`make run`: what a new user wants first, for real.

1. build (or reuse) the tiny test guest from Debian packages (guests/build.py);
2. start the manager daemon, `corral serve`, in the background (or reuse the one a previous
   `make run` left running), with its API on build/demo/corral.sock;
3. `corral apply -f` the demo VM document (examples/demo-vm.yaml with the guest's paths) and
   `corral start demo --wait` until it is Running; wait for its guest agent;
4. show `corral list`, what the guest says through `corral exec`, and how to reach its
   console and how to stop everything (`make stop` does it);
5. print the web pages' URL (127.0.0.1, port $CORRAL_WEB_PORT, default 8765) and a login that
   works: user ``admin`` with a password made on the first run and kept in
   build/demo/web-password (mode 0600).

KVM is used if it really boots guests here (a probe), TCG otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "demo"
SOCKET = WORK / "corral.sock"
CORRAL = [sys.executable, "-m", "corral.cli.main"]
WEB_PORT = int(os.environ.get("CORRAL_WEB_PORT", "8765"))
WEB_URL = f"http://127.0.0.1:{WEB_PORT}/"
USERS = WORK / "users.yaml"
PASSWORD = WORK / "web-password"


def load_guest_builder() -> Any:
    path = ROOT / "guests/build.py"
    spec = importlib.util.spec_from_file_location("corral_demo_guest_build", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["CORRAL_SOCKET"] = str(SOCKET)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), e.get("PYTHONPATH")) if p)
    return e


def corral(*args: str, check: bool = True, show: bool = True) -> subprocess.CompletedProcess[str]:
    if show:
        print(f"$ corral {shlex.join(args)}")
    done = subprocess.run([*CORRAL, *args], capture_output=True, text=True, env=env(), check=False)
    if show and done.stdout.strip():
        print("    " + done.stdout.rstrip().replace("\n", "\n    "))
    if check and done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"[demo] corral {args[0]} failed (exit {done.returncode})")
    return done


def daemon_up() -> bool:
    return SOCKET.exists() and corral("list", "-o", "json", check=False, show=False).returncode == 0


def web_login() -> str:
    """The demo's web user ``admin``: its password, made (and its hash stored) on first use."""
    if not PASSWORD.exists() or not USERS.exists():
        import secrets

        password = secrets.token_urlsafe(12)
        done = subprocess.run([*CORRAL, "user", "add", "admin", "--role", "admin", "--file",
                               str(USERS)], input=password + "\n", text=True,
                              capture_output=True, env=env(), check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"[demo] corral user add failed: {done.stderr}")
        fd = os.open(PASSWORD, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
    return PASSWORD.read_text().strip()


def start_daemon(guest_dir: Path) -> None:
    if daemon_up():
        print(f"[demo] reusing the corral daemon on {SOCKET}")
        return
    state = WORK / "state"
    # VM sockets must stay below 108 bytes whatever the checkout's path: runtime files in /tmp
    config = WORK / "corral.yaml"
    config.write_text(f"runDir: /tmp/corral-demo-{os.getuid()}/run\n")
    # the pages listen on TCP: documents may name host files only inside the guest's directory
    policy = WORK / "host.yaml"
    policy.write_text(f"imagePaths: [{json.dumps(str(guest_dir))}]\n")
    web_login()
    log = (WORK / "serve.log").open("ab")
    proc = subprocess.Popen(
        [*CORRAL, "serve", "--state-dir", str(state), "--config", str(config),
         "--socket", str(SOCKET), "--policy", str(policy), "--users", str(USERS),
         "--listen", f"127.0.0.1:{WEB_PORT}", "--service", "api", "--service", "web"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env(), start_new_session=True,
    )  # fmt: skip
    (WORK / "serve.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 60
    while not daemon_up():
        if proc.poll() is not None or time.monotonic() > deadline:
            print((WORK / "serve.log").read_text()[-3000:], file=sys.stderr)
            raise SystemExit("[demo] corral serve did not come up")
        time.sleep(0.2)
    print(f"[demo] corral serve running (pid {proc.pid}), API on {SOCKET}, log {WORK}/serve.log")


def main() -> int:
    t0 = time.monotonic()
    guest = load_guest_builder().build_tiny()
    print(f"[demo] tiny guest ready in {time.monotonic() - t0:.1f}s: {guest.directory}")
    WORK.mkdir(parents=True, exist_ok=True)
    doc = (ROOT / "examples/demo-vm.yaml").read_text().replace("@GUEST@", str(guest.directory))
    vm_yaml = WORK / "vm.yaml"
    vm_yaml.write_text(doc)

    start_daemon(guest.directory)
    corral("apply", "-f", str(vm_yaml))
    t1 = time.monotonic()
    corral("start", "demo", "--wait", "--timeout", "300")
    deadline = time.monotonic() + 300
    while corral("exec", "demo", "--", "true", check=False, show=False).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit("[demo] the guest agent did not answer within 300 s")
        time.sleep(0.5)
    print(f"[demo] demo is Running and its guest agent answers, {time.monotonic() - t1:.1f}s "
          "after the start")  # fmt: skip
    corral("list")
    corral("exec", "demo", "--", "/bin/sh", "-c", "uname -sr; cat /sys/devices/system/cpu/online")
    status = json.loads(corral("show", "demo", "-o", "json", show=False).stdout)["status"]
    print(f"[demo] qemu pid {status['pid']}, accelerator {status.get('accelerator')}")
    print(
        f"""
Try it (the daemon keeps running):
    export CORRAL_SOCKET={SOCKET}
    . .venv/bin/activate
    corral console demo                 # serial console; Ctrl-] leaves
    corral exec demo -- ps              # a command in the guest
    corral set demo --cpus 3            # CPU hot-plug, live; corral show demo
    corral events demo --follow         # what happens, as it happens
The web pages (VM list, consoles, host graph):
    {WEB_URL}
    user: admin   password: {web_login()}   (kept in {PASSWORD})
Stop everything:
    make stop                           # powers the VM down, then stops the daemon
"""
    )
    return 0


def stop() -> int:
    if daemon_up():
        corral("host", "shutdown", check=False)
    pidfile = WORK / "serve.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pidfile.unlink()
            return 0
        # SIGTERM only asks: report success once the daemon is really gone
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            print(f"[demo] corral serve (pid {pid}) is still running 30 s after SIGTERM; "
                  f"see {WORK}/serve.log", file=sys.stderr)  # fmt: skip
            return 1
        print(f"[demo] stopped corral serve (pid {pid})")
        pidfile.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(stop() if sys.argv[1:] == ["stop"] else main())
