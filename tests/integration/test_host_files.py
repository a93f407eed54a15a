"""``corral.host`` against the real tools: qemu-img/qemu-io, mkfs.vfat/mtools, swtpm.

Nothing is mocked and nothing skips: a missing tool fails the test with the ``apt-get
install`` line that fixes it. Times that matter (overlay creation, seed build, swtpm start)
are printed and recorded as test properties.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from corral.errors import Conflict, HostError
from corral.host import (
    Swtpm,
    ensure_disk,
    ensure_overlay,
    ensure_seed,
    ensure_vars,
    find_tool,
    image_info,
    pid_alive,
    process_exe_name,
    read_pidfile,
    run_tool,
    seed_files,
)
from corral.spec.models import CloudInit

REPO = Path(__file__).resolve().parents[2]
RecordProperty = Callable[[str, object], None]
MiB = 1024**2
GiB = 1024**3


def require(*tools: str) -> None:
    """Fail (never skip) with the package to install for each missing tool."""
    problems = []
    for tool in tools:
        try:
            find_tool(tool)
        except HostError as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail("; ".join(problems))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool(*argv: str) -> str:
    return subprocess.run(
        [find_tool(argv[0]), *argv[1:]], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private dir under /tmp: unix socket paths must stay below 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="corral-h-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_raw(path: Path, size: int, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


# --- overlays ------------------------------------------------------------------------------


async def test_overlay_is_created_once_and_the_base_is_never_written(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    base = make_raw(tmp_path / "base.raw", 10 * MiB, os.urandom(256 * 1024))
    base_sum = sha256(base)
    overlay = tmp_path / "vm" / "disk0.qcow2"

    assert await ensure_overlay(base, overlay) is True
    info = await image_info(overlay)
    assert info.format == "qcow2"
    assert info.backing_file == str(base.resolve())
    assert info.backing_format == "raw"
    assert info.virtual_size == 10 * MiB
    assert stat.S_IMODE(overlay.stat().st_mode) == 0o600

    tool("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", str(overlay))
    before = overlay.stat()
    overlay_sum = sha256(overlay)

    assert await ensure_overlay(base, overlay) is False
    assert await ensure_overlay(base, overlay, size=20 * MiB) is False
    after = overlay.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert sha256(overlay) == overlay_sum
    out = tool("qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 64k", str(overlay))
    assert "read 65536/65536" in out
    assert sha256(base) == base_sum
    assert leftovers(overlay.parent) == []


async def test_overlay_on_a_qcow2_base_records_its_format(tmp_path: Path) -> None:
    require("qemu-img")
    base = tmp_path / "base.qcow2"
    tool("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(64 * MiB))
    base_sum = sha256(base)
    overlay = tmp_path / "over.qcow2"
    assert await ensure_overlay(base, overlay, size=128 * MiB) is True
    info = await image_info(overlay)
    assert (info.backing_format, info.virtual_size) == ("qcow2", 128 * MiB)
    assert sha256(base) == base_sum


async def test_overlay_follows_a_symlinked_base_to_the_real_file(tmp_path: Path) -> None:
    require("qemu-img")
    real = make_raw(tmp_path / "debian-12.raw", 4 * MiB)
    link = tmp_path / "debian-current.raw"
    link.symlink_to(real.name)
    overlay = tmp_path / "over.qcow2"
    assert await ensure_overlay(link, overlay)
    assert (await image_info(overlay)).backing_file == str(real)


async def test_overlay_time_does_not_depend_on_the_base_size(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    require("qemu-img")
    small = make_raw(tmp_path / "small.raw", 10 * MiB)
    large = make_raw(tmp_path / "large.raw", 10 * GiB)  # sparse
    assert large.stat().st_blocks * 512 < 10 * MiB

    async def best_of(base: Path, runs: int = 3) -> float:
        times = []
        for i in range(runs):
            overlay = tmp_path / f"{base.stem}-{i}.qcow2"
            start = time.perf_counter()
            assert await ensure_overlay(base, overlay)
            times.append(time.perf_counter() - start)
        return min(times)

    t_small, t_large = await best_of(small), await best_of(large)
    record_property("overlay_create_10MiB_s", round(t_small, 4))
    record_property("overlay_create_10GiB_s", round(t_large, 4))
    print(f"\noverlay creation: 10 MiB base {t_small * 1e3:.1f} ms, 10 GiB {t_large * 1e3:.1f} ms")
    assert t_large < 5 * t_small, (t_small, t_large)
    assert t_small < 5 * t_large, (t_small, t_large)


async def test_overlay_paths_with_comma_and_space(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    directory = tmp_path / "my images, v2"
    directory.mkdir()
    base = make_raw(directory / "base, 1 .raw", 8 * MiB, b"corral" * 100)
    base_sum = sha256(base)
    overlay = tmp_path / "vm data, x" / "root disk,0.qcow2"
    assert await ensure_overlay(base, overlay)
    info = await image_info(overlay)
    assert info.backing_file == str(base)
    assert info.backing_format == "raw"
    # qemu can really open the chain through those names (qemu-io reads via the backing file)
    out = tool("qemu-io", "-f", "qcow2", "-c", "read -P 0x63 0 1", str(overlay))
    assert "read 1/1" in out
    assert sha256(base) == base_sum


async def test_overlay_smaller_than_its_base_is_refused(tmp_path: Path) -> None:
    require("qemu-img")
    base = make_raw(tmp_path / "base.raw", 64 * MiB)
    overlay = tmp_path / "over.qcow2"
    with pytest.raises(HostError) as caught:
        await ensure_overlay(base, overlay, size=32 * MiB)
    message = str(caught.value)
    assert str(base) in message and "smaller" in message
    assert not overlay.exists()
    assert leftovers(tmp_path) == []


async def test_overlay_on_a_missing_base_fails_clearly(tmp_path: Path) -> None:
    require("qemu-img")
    with pytest.raises(HostError, match="does not exist"):
        await ensure_overlay(tmp_path / "nope.raw", tmp_path / "over.qcow2")
    assert not (tmp_path / "over.qcow2").exists()


async def test_concurrent_overlay_creation_makes_exactly_one(tmp_path: Path) -> None:
    require("qemu-img")
    base = make_raw(tmp_path / "base.raw", 16 * MiB)
    overlay = tmp_path / "vm" / "over.qcow2"
    results = await asyncio.gather(*(ensure_overlay(base, overlay) for _ in range(6)))
    assert sorted(results) == [False] * 5 + [True]
    assert (await image_info(overlay)).backing_file == str(base)
    assert leftovers(overlay.parent) == []


async def test_image_info_reads_an_image_a_running_process_holds(tmp_path: Path) -> None:
    require("qemu-img", "qemu-io")
    image = tmp_path / "busy.qcow2"
    assert await ensure_disk(image, 32 * MiB, "qcow2")
    holder = subprocess.Popen(
        [find_tool("qemu-io"), "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not any(  # wait until qemu-io holds the image open (and locked)
            os.path.realpath(f"/proc/{holder.pid}/fd/{fd}") == str(image)
            for fd in os.listdir(f"/proc/{holder.pid}/fd")
        ):
            assert time.monotonic() < deadline, "qemu-io never opened the image"
            await asyncio.sleep(0.02)
        locked = subprocess.run(
            [find_tool("qemu-img"), "info", str(image)], capture_output=True, text=True, check=False
        )
        assert locked.returncode != 0 and "lock" in locked.stderr
        info = await image_info(image)
        assert (info.format, info.virtual_size) == ("qcow2", 32 * MiB)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


async def test_ensure_disk_creates_blank_disks_once(tmp_path: Path) -> None:
    require("qemu-img")
    qcow = tmp_path / "data" / "d.qcow2"
    raw = tmp_path / "data" / "d.raw"
    assert await ensure_disk(qcow, 1 * GiB, "qcow2") is True
    assert await ensure_disk(raw, 1 * GiB, "raw") is True
    assert (await image_info(qcow)).format == "qcow2"
    assert (await image_info(raw)).virtual_size == 1 * GiB
    assert raw.stat().st_blocks * 512 < MiB  # sparse
    existing = tmp_path / "data" / "mine.raw"
    existing.write_bytes(b"guest data")
    for path in (qcow, raw, existing):
        before = path.stat()
        assert await ensure_disk(path, 2 * GiB, "raw") is False
        assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert existing.read_bytes() == b"guest data"
    with pytest.raises(ValueError):
        await ensure_disk(tmp_path / "x.vmdk", MiB, "vmdk")


# --- tools ---------------------------------------------------------------------------------


async def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tempfile.mkdtemp(prefix="corral-nopath-")
    try:
        monkeypatch.setenv("PATH", empty)
        with pytest.raises(HostError, match="apt-get install qemu-utils"):
            await run_tool(["qemu-img", "--version"], what="check qemu-img")
    finally:
        os.rmdir(empty)


async def test_failing_tool_reports_stderr_and_chains_the_cause(tmp_path: Path) -> None:
    require("qemu-img")
    with pytest.raises(HostError) as caught:
        await run_tool(["qemu-img", "info", str(tmp_path / "absent")], what="read absent")
    assert "cannot read absent" in str(caught.value)
    assert "absent" in str(caught.value) and "exited with 1" in str(caught.value)
    assert isinstance(caught.value.__cause__, subprocess.CalledProcessError)


# --- cloud-init seed -----------------------------------------------------------------------


def seed_listing(image: Path) -> set[str]:
    out = tool("mdir", "-b", "-i", str(image), "::")
    return {line.rsplit("/", 1)[-1] for line in out.split()}


def seed_file(image: Path, name: str) -> bytes:
    out = subprocess.run(
        [find_tool("mtype"), "-i", str(image), f"::{name}"],
        capture_output=True,
        check=True,
        timeout=30,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    )
    return out.stdout


async def test_seed_image_is_built_and_rebuilt_only_on_change(
    tmp_path: Path, record_property: RecordProperty
) -> None:
    require("mkfs.vfat", "mcopy", "mdir", "mtype", "mlabel")
    image = tmp_path / "vm" / "cidata.img"
    ci = CloudInit.model_validate(
        {
            "userData": {"users": [{"name": "ann"}], "packages": ["curl"]},
            "networkConfig": {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}},
        }
    )
    start = time.perf_counter()
    assert await ensure_seed(image, ci, "vm1") is True
    elapsed = time.perf_counter() - start
    record_property("seed_build_s", round(elapsed, 4))
    print(f"\nseed build: {elapsed * 1000:.1f} ms")

    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert "CIDATA" in tool("mlabel", "-s", "-i", str(image), "::")
    assert seed_listing(image) == {"meta-data", "user-data", "network-config"}
    expected = seed_files(ci, "vm1")
    for name, content in expected.items():
        assert seed_file(image, name) == content
    first_id = yaml.safe_load(seed_file(image, "meta-data"))["instance-id"]
    assert yaml.safe_load(seed_file(image, "meta-data"))["local-hostname"] == "vm1"

    before = image.stat()
    assert await ensure_seed(image, CloudInit.model_validate(ci.model_dump()), "vm1") is False
    assert image.stat().st_ino == before.st_ino
    assert image.stat().st_mtime_ns == before.st_mtime_ns

    changed = CloudInit.model_validate({"userData": "#!/bin/sh\necho changed\n"})
    assert await ensure_seed(image, changed, "vm1") is True
    assert seed_listing(image) == {"meta-data", "user-data"}
    assert seed_file(image, "user-data") == b"#!/bin/sh\necho changed\n"
    second_id = yaml.safe_load(seed_file(image, "meta-data"))["instance-id"]
    assert second_id != first_id
    assert await ensure_seed(image, changed, "vm1") is False

    assert await ensure_seed(image, ci, "vm1") is True  # back to the first content
    assert yaml.safe_load(seed_file(image, "meta-data"))["instance-id"] == first_id
    assert leftovers(image.parent) == []


async def test_seed_is_rebuilt_when_the_image_is_gone(tmp_path: Path) -> None:
    require("mkfs.vfat", "mcopy")
    image = tmp_path / "cidata.img"
    ci = CloudInit.model_validate({"userData": {"a": 1}})
    assert await ensure_seed(image, ci, "vm1")
    image.unlink()
    assert await ensure_seed(image, ci, "vm1") is True
    assert image.is_file()


async def test_seed_holds_large_user_data(tmp_path: Path) -> None:
    require("mkfs.vfat", "mcopy", "mtype")
    payload = "#!/bin/sh\n" + "".join(f"echo line {i}\n" for i in range(200_000))
    image = tmp_path / "with space, and comma" / "seed.img"
    assert await ensure_seed(image, CloudInit.model_validate({"userData": payload}), "big")
    assert seed_file(image, "user-data") == payload.encode()


# --- OVMF vars -----------------------------------------------------------------------------


def test_vars_are_copied_once_and_never_overwritten(tmp_path: Path) -> None:
    template = tmp_path / "OVMF_VARS.fd"
    template.write_bytes(os.urandom(128 * 1024))
    dest = tmp_path / "vm" / "efivars.fd"
    assert ensure_vars(template, dest) is True
    assert dest.read_bytes() == template.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with open(dest, "r+b") as f:  # the guest adds a boot entry
        f.write(b"BOOT0001")
    guest_vars = dest.read_bytes()
    template.write_bytes(os.urandom(128 * 1024))
    assert ensure_vars(template, dest) is False
    assert dest.read_bytes() == guest_vars
    assert leftovers(dest.parent) == []


def test_vars_from_the_host_ovmf_template(tmp_path: Path) -> None:
    template = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    if not template.is_file():
        pytest.fail(f"{template} missing: apt-get install ovmf")
    dest = tmp_path / "efivars.fd"
    assert ensure_vars(template, dest) is True
    assert sha256(dest) == sha256(template)


def test_vars_missing_template_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="apt-get install ovmf"):
        ensure_vars(tmp_path / "none.fd", tmp_path / "efivars.fd")
    assert not (tmp_path / "efivars.fd").exists()
    assert leftovers(tmp_path) == []


def test_noreplace_rename_fallback_never_clobbers(tmp_path: Path) -> None:
    """The path taken where hard links are unsupported: renameat2(RENAME_NOREPLACE)."""
    from corral.host.atomic import _rename_noreplace

    (tmp_path / "new").write_text("new")
    (tmp_path / "taken").write_text("guest data")
    with pytest.raises(FileExistsError):
        _rename_noreplace(tmp_path / "new", tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "guest data"
    _rename_noreplace(tmp_path / "new", tmp_path / "free")
    assert (tmp_path / "free").read_text() == "new" and not (tmp_path / "new").exists()


# --- processes -----------------------------------------------------------------------------


def test_pid_helpers_see_through_zombies_and_garbage(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
        assert process_exe_name(child.pid) == "sleep"
    finally:
        child.kill()
    deadline = time.monotonic() + 5
    while pid_alive(child.pid):  # a killed, not yet reaped child is a zombie: not alive
        assert time.monotonic() < deadline, "a zombie counted as alive"
        time.sleep(0.01)
    assert Path(f"/proc/{child.pid}").exists()  # still a zombie: nobody reaped it yet
    child.wait()
    assert not pid_alive(0) and not pid_alive(-1)
    pidfile = tmp_path / "pid"
    assert read_pidfile(pidfile) is None
    for text, expected in (("123\n", 123), ("", None), ("abc", None), ("-5", None)):
        pidfile.write_text(text)
        assert read_pidfile(pidfile) == expected


# --- swtpm ---------------------------------------------------------------------------------


def tpm_paths(root: Path, name: str = "vm") -> tuple[Path, Path, Path, Path]:
    return (
        root / name / "tpm",
        root / name / "run" / "swtpm.sock",
        root / name / "run" / "swtpm.pid",
        root / name / "run" / "swtpm.log",
    )


@pytest.fixture
def swtpms() -> Iterator[list[Swtpm]]:
    """Swtpm objects to stop at the end whatever happens (no swtpm outlives its test)."""
    started: list[Swtpm] = []
    yield started
    for tpm in started:
        if tpm.pid is not None and tpm.is_alive():
            os.kill(tpm.pid, signal.SIGKILL)


START_IN_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from corral.host import Swtpm

    async def main():
        paths = [Path(p) for p in sys.argv[1:5]]
        start = time.perf_counter()
        pid = await Swtpm().start(*paths)
        print(pid, time.perf_counter() - start)

    asyncio.run(main())
    """
)


async def test_swtpm_survives_the_process_that_started_it(
    short_tmp: Path, swtpms: list[Swtpm], record_property: RecordProperty
) -> None:
    require("swtpm", "swtpm_ioctl")
    state, sock, pidfile, log = tpm_paths(short_tmp)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    starter = subprocess.run(
        [sys.executable, "-c", START_IN_CHILD, str(state), str(sock), str(pidfile), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert starter.returncode == 0, starter.stderr
    pid_text, seconds = starter.stdout.split()
    record_property("swtpm_start_s", round(float(seconds), 4))
    print(f"\nswtpm start: {float(seconds) * 1000:.1f} ms")

    tpm = Swtpm.attach(pidfile, sock)
    assert tpm is not None, f"swtpm died with its starter; log: {log.read_text()}"
    swtpms.append(tpm)
    assert tpm.pid == int(pid_text) == read_pidfile(pidfile)
    assert tpm.is_alive()
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert os.getsid(tpm.pid) != os.getsid(0)  # its own session, not the test's

    # qemu's first act: initialise the TPM. Plain swtpm manufactures its state then (no
    # swtpm_setup), and a control-channel client disconnecting does not trip --terminate.
    tool("swtpm_ioctl", "--unix", str(sock), "-i")
    assert (state / "tpm2-00.permall").is_file()
    assert stat.S_IMODE((state / "tpm2-00.permall").stat().st_mode) == 0o600
    assert "TPMSpecification" in tool("swtpm_ioctl", "--unix", str(sock), "--info", "1")
    await asyncio.sleep(0.1)
    assert tpm.is_alive()

    with pytest.raises(Conflict):
        await Swtpm().start(state, sock, pidfile, log)

    await tpm.stop()
    assert not tpm.is_alive()
    assert not pid_alive(int(pid_text))
    assert not sock.exists() and not pidfile.exists()
    assert Swtpm.attach(pidfile, sock) is None
    await tpm.stop()  # idempotent


async def test_swtpm_restart_keeps_the_tpm_state(short_tmp: Path, swtpms: list[Swtpm]) -> None:
    require("swtpm", "swtpm_ioctl")
    state, sock, pidfile, log = tpm_paths(short_tmp)
    tpm = Swtpm()
    swtpms.append(tpm)
    first = await tpm.start(state, sock, pidfile, log)
    tool("swtpm_ioctl", "--unix", str(sock), "-i")
    permall = (state / "tpm2-00.permall").read_bytes()
    await tpm.stop()
    second = await tpm.start(state, sock, pidfile, log)
    assert second != first and tpm.is_alive()
    tool("swtpm_ioctl", "--unix", str(sock), "-i")
    assert (state / "tpm2-00.permall").read_bytes() == permall  # same seeds, not remade
    await tpm.stop()


async def test_swtpm_attach_refuses_dead_foreign_and_other_vm_pids(
    short_tmp: Path, swtpms: list[Swtpm]
) -> None:
    require("swtpm")
    state, sock, pidfile, log = tpm_paths(short_tmp, "a")
    assert Swtpm.attach(pidfile, sock) is None  # no pidfile

    done = subprocess.Popen(["true"])
    done.wait()
    pidfile.parent.mkdir(parents=True)
    pidfile.write_text(f"{done.pid}\n")
    assert Swtpm.attach(pidfile, sock) is None  # dead pid

    other = subprocess.Popen(["sleep", "30"])
    try:
        pidfile.write_text(f"{other.pid}\n")
        assert Swtpm.attach(pidfile, sock) is None  # alive, but not swtpm
    finally:
        other.kill()
        other.wait()

    a, b = Swtpm(), Swtpm()
    swtpms += [a, b]
    await a.start(state, sock, pidfile, log)
    b_state, b_sock, b_pidfile, b_log = tpm_paths(short_tmp, "b")
    await b.start(b_state, b_sock, b_pidfile, b_log)
    assert Swtpm.attach(pidfile, b_sock) is None  # a swtpm, but another VM's
    found = Swtpm.attach(b_pidfile, b_sock)
    assert found is not None and found.pid == b.pid

    assert a.pid is not None
    os.kill(a.pid, signal.SIGKILL)  # it died on its own (e.g. --terminate after qemu left)
    deadline = time.monotonic() + 5
    while a.is_alive():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await a.stop()  # only cleans up
    assert not sock.exists()
    await found.stop()
    assert not b.is_alive() and not b_sock.exists()


async def test_swtpm_failure_reports_the_log(short_tmp: Path) -> None:
    require("swtpm")
    state, sock, _, log = tpm_paths(short_tmp)
    unwritable = Path(f"/proc/corral-test-{os.getpid()}.pid")  # swtpm cannot create it
    tpm = Swtpm()
    with pytest.raises(HostError) as caught:
        await tpm.start(state, sock, unwritable, log)
    message = str(caught.value)
    assert "swtpm failed to start" in message
    assert f"Could not open pidfile {unwritable}" in message  # the tail of swtpm's log
    assert tpm.pid is None and not sock.exists()

    in_the_way = short_tmp / "file"
    in_the_way.write_text("not a directory")
    with pytest.raises(HostError, match="cannot create directory"):
        await Swtpm().start(in_the_way, sock, short_tmp / "p", log)

    long_sock = short_tmp / ("x" * 120) / "s.sock"
    with pytest.raises(HostError, match="longer than"):
        await Swtpm().start(short_tmp / "st", long_sock, short_tmp / "p", short_tmp / "l")


async def test_swtpm_serves_qemu_and_terminates_with_it(
    short_tmp: Path, swtpms: list[Swtpm]
) -> None:
    """The --terminate choice: qemu initialises the TPM (state appears without swtpm_setup);
    when qemu goes away, so does its swtpm."""
    require("swtpm", "qemu-system-x86_64")
    state, sock, pidfile, log = tpm_paths(short_tmp)
    tpm = Swtpm()
    swtpms.append(tpm)
    await tpm.start(state, sock, pidfile, log)
    argv = [
        find_tool("qemu-system-x86_64"), "-machine", "q35", "-accel", "tcg", "-nodefaults",
        "-display", "none", "-S", "-monitor", "none", "-serial", "none",
        "-chardev", f"socket,id=chrtpm,path={sock}",
        "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0",
    ]  # fmt: skip
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (state / "tpm2-00.permall").exists():
            assert qemu.poll() is None, qemu.communicate()[1]
            assert time.monotonic() < deadline, "qemu never initialised the TPM"
            await asyncio.sleep(0.02)
        assert tpm.is_alive()
    finally:
        qemu.terminate()
        qemu.communicate(timeout=30)
    deadline = time.monotonic() + 5
    while tpm.is_alive():
        assert time.monotonic() < deadline, "swtpm outlived its qemu despite --terminate"
        await asyncio.sleep(0.01)
    await tpm.stop()
    assert not sock.exists()


async def test_swtpm_paths_with_commas_work_through_an_alias(short_tmp: Path) -> None:
    """swtpm's parser has no comma escape: it is given comma-free aliases of the real paths."""
    require("swtpm")
    base = short_tmp / "a,b c"
    state, sock, pidfile, log = base / "s,t", base / "s.sock", base / "p" / "id", base / "log"
    tpm = Swtpm()
    pid = await tpm.start(state, sock, pidfile, log)
    try:
        assert read_pidfile(pidfile) == pid  # the real pidfile, written through the alias
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"):
            for item in arg.split(",")[1:]:  # every comma must start an option of swtpm's
                assert item.split("=")[0] in ("mode", "level", "path"), arg
        again = Swtpm.attach(pidfile, sock)
        assert again is not None and again.pid == pid
        with pytest.raises(HostError, match="file name"):
            await Swtpm().start(state, base / "x,y.sock", pidfile, log)
    finally:
        await tpm.stop()
    assert not tpm.is_alive()
