"""``corral.host.images.ImageStore`` against a real HTTP server, real files and qemu-img.

A ``http.server`` on 127.0.0.1 in a thread serves generated images (with and without a
Content-Length, a trickling one for cancellation, a 404 and a 500). Every failure test also
checks that the store directory holds nothing afterwards: no temporary file, no sidecar, no
image.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.errors import Conflict, Forbidden, HostError, NotFound, SpecError
from corral.host import ImageRecord, ImageStore, find_tool, run_tool

MiB = 1024**2


def _payload(size: int, seed: bytes) -> bytes:
    """Deterministic, incompressible-looking bytes with a run of zeros in the middle."""
    out = bytearray(b"corral test image\n")
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    data = bytes(out[:size])
    middle = size // 2
    zeros = min(MiB, size // 4)
    return data[:middle] + bytes(zeros) + data[middle + zeros :]


BIG = _payload(3 * MiB + 12345, b"big")
SMALL = _payload(392 * 512, b"small")  # qemu-img rounds a raw size up to 512
OTHER = _payload(150_000, b"other")


@dataclass
class Server:
    base: str
    files: dict[str, bytes]


def _handler(files: dict[str, bytes], closing: threading.Event) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            kind, _, name = self.path.lstrip("/").partition("/")
            try:
                if kind == "redirect":
                    self.send_response(302)
                    self.send_header("Location", name.replace("~", "/"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif kind == "truncated":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(SMALL) + 1000))
                    self.end_headers()
                    self.wfile.write(SMALL)
                    self.close_connection = True
                elif kind == "error500":
                    self.send_error(500)
                elif kind == "slow":
                    self._slow()
                elif name not in files or kind not in ("files", "nolength"):
                    self.send_error(404)
                else:
                    body = files[name]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    if kind == "files":
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _slow(self) -> None:
            chunk = b"\x01" * 65536
            self.send_response(200)
            self.send_header("Content-Length", str(256 * MiB))
            self.end_headers()
            while not closing.is_set():
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(0.01)

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    files = {"big.img": BIG, "small.img": SMALL, "other.img": OTHER}
    closing = threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(files, closing))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield Server(base=f"http://{host!s}:{port}", files=files)
    finally:
        closing.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def store(root: Path) -> ImageStore:
    return ImageStore(root)


def assert_empty(root: Path) -> None:
    """Nothing at all in the store dir (it may not even exist yet)."""
    if root.exists():
        assert sorted(os.listdir(root)) == []


def digest(algorithm: str, data: bytes) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def issue_locs(exc: SpecError) -> list[str]:
    return [issue.loc for issue in exc.issues]


# --- importing ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "md5"])
async def test_import_from_url_with_checksum(
    server: Server, store: ImageStore, root: Path, algorithm: str
) -> None:
    url = f"{server.base}/files/small.img"
    record = await store.import_image("small", url, checksum=digest(algorithm, SMALL))

    assert record.name == "small"
    assert record.path == root / "small"
    assert record.format == "raw"
    assert record.virtual_size == len(SMALL)
    assert 0 < record.actual_size <= len(SMALL) + MiB
    assert record.sha256 == hashlib.sha256(SMALL).hexdigest()
    assert record.source == url
    assert record.created.endswith("+00:00")
    assert record.path.read_bytes() == SMALL
    assert stat.S_IMODE(record.path.stat().st_mode) == 0o444
    assert sorted(os.listdir(root)) == [".small.json", "small"]

    assert store.get("small") == record
    assert store.list() == [record]
    assert store.path("small") == root / "small"
    assert record.to_json() == {
        "name": "small",
        "path": str(root / "small"),
        "format": "raw",
        "virtualSize": len(SMALL),
        "actualSize": record.actual_size,
        "sha256": record.sha256,
        "created": record.created,
        "source": url,
    }
    json.dumps(record.to_json())


async def test_progress_reports_increasing_counts_and_total(
    server: Server, store: ImageStore
) -> None:
    calls: list[tuple[int, int | None]] = []
    record = await store.import_image(
        "big",
        f"{server.base}/files/big.img",
        checksum=digest("sha256", BIG),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert record.path.read_bytes() == BIG
    assert record.actual_size < len(BIG)  # the zero run became a hole
    assert calls[0] == (0, len(BIG))
    assert calls[-1] == (len(BIG), len(BIG))
    assert len(calls) >= 3
    done = [c[0] for c in calls]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert {c[1] for c in calls} == {len(BIG)}


async def test_progress_without_content_length(server: Server, store: ImageStore) -> None:
    calls: list[tuple[int, int | None]] = []
    record = await store.import_image(
        "nolength",
        f"{server.base}/nolength/small.img",
        progress=lambda done, total: calls.append((done, total)),
    )
    assert record.sha256 == hashlib.sha256(SMALL).hexdigest()
    assert calls[0] == (0, None)
    assert calls[-1] == (len(SMALL), None)


async def test_import_from_local_path(store: ImageStore, tmp_path: Path) -> None:
    source = tmp_path / "local.img"
    source.write_bytes(BIG)
    calls: list[tuple[int, int | None]] = []
    record = await store.import_image(
        "local",
        str(source),
        checksum=digest("md5", BIG),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert record.source == str(source)
    assert record.path.read_bytes() == BIG
    assert record.sha256 == hashlib.sha256(BIG).hexdigest()
    assert calls[0] == (0, len(BIG)) and calls[-1] == (len(BIG), len(BIG))
    assert source.read_bytes() == BIG


async def test_qcow2_is_recorded_with_format_and_virtual_size(
    store: ImageStore, tmp_path: Path
) -> None:
    find_tool("qemu-img")
    source = tmp_path / "base.qcow2"
    await run_tool(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(source), str(64 * MiB)],
        what="create a test qcow2",
    )
    record = await store.import_image("base.qcow2", str(source))
    assert record.format == "qcow2"
    assert record.virtual_size == 64 * MiB
    assert record.actual_size > 0
    assert record.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert store.get("base.qcow2") == record


@pytest.mark.parametrize("extra", ["backing", "data_file"])
async def test_images_that_name_other_files_are_refused(
    store: ImageStore, root: Path, tmp_path: Path, extra: str
) -> None:
    other = tmp_path / "other.raw"
    await run_tool(["qemu-img", "create", "-q", "-f", "raw", str(other), "1M"], what="raw")
    source = tmp_path / "evil.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if extra == "backing":
        argv += ["-b", str(other), "-F", "raw", str(source)]
    else:
        argv += ["-o", f"data_file={other}", str(source), "1M"]
    await run_tool(argv, what="create a test qcow2")
    with pytest.raises(SpecError) as caught:
        await store.import_image("evil", str(source))
    assert issue_locs(caught.value) == ["source"]
    assert_empty(root)


# --- failures leave nothing ------------------------------------------------------------


async def test_checksum_mismatch_leaves_nothing(
    server: Server, store: ImageStore, root: Path
) -> None:
    wrong = digest("sha256", b"something else")
    right = digest("sha256", SMALL)
    with pytest.raises(SpecError) as caught:
        await store.import_image("small", f"{server.base}/files/small.img", checksum=wrong)
    assert issue_locs(caught.value) == ["checksum"]
    assert wrong in str(caught.value) and right in str(caught.value)
    assert root.is_dir()
    assert_empty(root)
    with pytest.raises(NotFound):
        store.get("small")


async def test_http_404_leaves_nothing(server: Server, store: ImageStore, root: Path) -> None:
    with pytest.raises(SpecError) as caught:
        await store.import_image("missing", f"{server.base}/files/nope.img")
    assert issue_locs(caught.value) == ["source"]
    assert "404" in str(caught.value)
    assert_empty(root)


async def test_http_500_truncation_and_unreachable_are_host_errors(
    server: Server, store: ImageStore, root: Path
) -> None:
    with pytest.raises(HostError, match="500"):
        await store.import_image("broken", f"{server.base}/error500/x")
    with pytest.raises(HostError, match="cannot read"):
        await store.import_image("short", f"{server.base}/truncated/x")
    closed = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    with pytest.raises(HostError):
        await store.import_image("unreachable", f"http://127.0.0.1:{port}/x.img")
    assert_empty(root)


async def test_redirects_are_followed_within_the_origin_only(
    server: Server, store: ImageStore, root: Path
) -> None:
    """Issue 9 (SSRF): a redirect is followed to the same scheme, host and port only; any
    other target (another host name for the same address, https, ftp, file) is refused with
    an error that names it."""
    record = await store.import_image("moved", f"{server.base}/redirect/~files~small.img")
    assert record.sha256 == hashlib.sha256(SMALL).hexdigest()
    record = await store.import_image(
        "moved-abs", f"{server.base}/redirect/{server.base.replace('/', '~')}~files~small.img"
    )
    assert record.sha256 == hashlib.sha256(SMALL).hexdigest()
    port = server.base.rsplit(":", 1)[1]
    for target in (
        f"http://localhost:{port}/files/small.img",
        f"https://127.0.0.1:{port}/files/small.img",
        "ftp://127.0.0.1/x.img",
        "file:///etc/passwd",
    ):
        with pytest.raises(SpecError) as caught:
            await store.import_image(
                "elsewhere", f"{server.base}/redirect/{target.replace('/', '~')}"
            )
        assert issue_locs(caught.value) == ["source"]
        assert f"to {target}," in str(caught.value)
    assert sorted(os.listdir(root)) == [".moved-abs.json", ".moved.json", "moved", "moved-abs"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """The 'internal' service a redirect must not reach: it serves anything, and says so."""

    seen: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(SMALL)))
        self.end_headers()
        self.wfile.write(SMALL)


async def test_redirect_to_another_loopback_port_is_not_followed(
    server: Server, store: ImageStore, root: Path
) -> None:
    """Issue 9: two real servers on 127.0.0.1; the import URL on the first redirects to the
    second (another port). The second never gets a request; nothing is stored."""
    _Recorder.seen = []
    internal = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=internal.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        target = f"http://127.0.0.1:{internal.server_address[1]}/secret/metadata"
        url = f"{server.base}/redirect/{target.replace('/', '~')}"
        with pytest.raises(SpecError) as caught:
            await store.import_image("ssrf", url)
        assert issue_locs(caught.value) == ["source"]
        assert target in str(caught.value) and "another scheme, host or port" in str(caught.value)
        assert _Recorder.seen == []
        assert_empty(root)
        # The same URL imported directly (the user's explicit choice) works.
        record = await store.import_image("direct", target)
        assert record.sha256 == hashlib.sha256(SMALL).hexdigest()
        assert _Recorder.seen == ["/secret/metadata"]
    finally:
        internal.shutdown()
        internal.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    "source",
    ["file:///etc/passwd", "FILE:///etc/passwd", "file:/etc/passwd", "ftp://127.0.0.1/x.img",
     "gopher://127.0.0.1/x", "data:,hello", "jar:file:///x!/y"],
)  # fmt: skip
async def test_non_http_schemes_are_refused(store: ImageStore, root: Path, source: str) -> None:
    """Issue 9: only http and https are fetched; ``file:`` in any spelling is no way around
    the host-path rules."""
    with pytest.raises(SpecError) as caught:
        await store.import_image("x", source)
    assert issue_locs(caught.value) == ["source"]
    assert_empty(root)


async def test_local_roots_bound_the_file_actually_opened(
    store: ImageStore, root: Path, tmp_path: Path
) -> None:
    """Issue 9: with ``local_roots`` (the daemon's imagePaths) only a file inside is read:
    not one outside, not through a symlink inside, not through ``..`` after a ``x://``."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.img").write_bytes(SMALL)
    outside = tmp_path / "outside.img"
    outside.write_bytes(OTHER)
    (allowed / "link.img").symlink_to(outside)
    roots = [str(allowed)]
    record = await store.import_image("ok", str(allowed / "ok.img"), local_roots=roots)
    assert record.path.read_bytes() == SMALL
    for source in (
        str(outside),
        str(allowed / "link.img"),
        f"{allowed}/x://../../outside.img",
        "/etc/passwd",
    ):
        with pytest.raises(Forbidden) as caught:
            await store.import_image("escape", source, local_roots=roots)
        assert [i.loc for i in caught.value.issues] == ["source"]
    with pytest.raises(Forbidden):
        await store.import_image("none", str(allowed / "ok.img"), local_roots=[])
    assert sorted(os.listdir(root)) == [".ok.json", "ok"]


async def test_a_fifo_source_is_refused_at_once(store: ImageStore, tmp_path: Path) -> None:
    """A FIFO (or a device) never stalls an import: it is not a regular file."""
    fifo = tmp_path / "fifo.img"
    os.mkfifo(fifo)
    try:
        with pytest.raises(SpecError, match="not a regular file"):
            await asyncio.wait_for(store.import_image("fifo", str(fifo)), 10)
    finally:  # unblock a reader stuck in open(), should there be one
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert_empty(tmp_path / "images")


# --- uploads (import_stream) -----------------------------------------------------------


async def _stream(data: bytes, piece: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), piece):
        yield data[start : start + piece]
        await asyncio.sleep(0)


async def test_import_stream_is_verified_and_published_like_an_import(
    store: ImageStore, root: Path
) -> None:
    calls: list[tuple[int, int | None]] = []
    record = await store.import_stream(
        "up", _stream(BIG), total=len(BIG), source="upload:big.img",
        checksum=digest("sha512", BIG), progress=lambda d, t: calls.append((d, t)),
    )  # fmt: skip
    assert record.path.read_bytes() == BIG
    assert record.sha256 == hashlib.sha256(BIG).hexdigest()
    assert record.source == "upload:big.img" and record.format == "raw"
    assert record.actual_size < len(BIG)  # the zero run became a hole
    assert stat.S_IMODE(record.path.stat().st_mode) == 0o444
    assert store.get("up") == record
    assert calls[0] == (0, len(BIG)) and calls[-1] == (len(BIG), len(BIG))
    unsized = await store.import_stream("unsized", _stream(SMALL))
    assert unsized.source == "upload" and unsized.path.read_bytes() == SMALL
    assert sorted(os.listdir(root)) == [".unsized.json", ".up.json", "unsized", "up"]


async def test_import_stream_failures_leave_nothing(
    store: ImageStore, root: Path, tmp_path: Path
) -> None:
    with pytest.raises(SpecError) as caught:
        await store.import_stream("x", _stream(SMALL), checksum=digest("sha256", b"other"))
    assert issue_locs(caught.value) == ["checksum"]
    with pytest.raises(SpecError) as caught:
        await store.import_stream("x", _stream(SMALL), total=len(SMALL) + 1)
    assert issue_locs(caught.value) == ["body"]
    with pytest.raises(SpecError) as caught:
        await store.import_stream("x", _stream(SMALL), total=len(SMALL) - 1)
    assert issue_locs(caught.value) == ["body"]

    other = tmp_path / "other.raw"
    await run_tool(["qemu-img", "create", "-q", "-f", "raw", str(other), "1M"], what="raw")
    evil = tmp_path / "evil.qcow2"
    await run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(other), "-F", "raw",
                    str(evil)], what="create a qcow2 with a backing file")  # fmt: skip
    with pytest.raises(SpecError, match="backing file") as caught:
        await store.import_stream("evil", _stream(evil.read_bytes()))
    assert issue_locs(caught.value) == ["source"]

    async def broken() -> AsyncIterator[bytes]:
        yield SMALL[:1000]
        raise ConnectionResetError("the client left")

    with pytest.raises(ConnectionResetError):
        await store.import_stream("x", broken())
    assert_empty(root)


async def test_import_stream_cancellation_leaves_nothing(store: ImageStore, root: Path) -> None:
    started = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"\x01" * 65536
            started.set()
            await asyncio.sleep(0.001)

    task = asyncio.create_task(store.import_stream("slow", endless()))
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.2)
    assert any(name.endswith(".tmp") for name in os.listdir(root))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_empty(root)


async def test_missing_local_file_is_a_spec_error(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        await store.import_image("x", str(tmp_path / "nope.img"))
    assert issue_locs(caught.value) == ["source"]
    with pytest.raises(SpecError) as caught:
        await store.import_image("x", str(tmp_path))
    assert issue_locs(caught.value) == ["source"]
    with pytest.raises(SpecError) as caught:
        await store.import_image("x", "ftp://example.org/x.img")
    assert issue_locs(caught.value) == ["source"]
    assert_empty(tmp_path / "images")


async def test_cancellation_leaves_nothing(server: Server, store: ImageStore, root: Path) -> None:
    started = asyncio.Event()

    def progress(done: int, total: int | None) -> None:
        if done > 0:
            started.set()

    task = asyncio.create_task(
        store.import_image("slow", f"{server.base}/slow/x", progress=progress)
    )
    await asyncio.wait_for(started.wait(), 10)
    assert any(name.endswith(".tmp") for name in os.listdir(root))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_empty(root)


async def test_failing_progress_callback_aborts_the_import(
    server: Server, store: ImageStore, root: Path
) -> None:
    def progress(done: int, total: int | None) -> None:
        if done > 0:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        await store.import_image("big", f"{server.base}/files/big.img", progress=progress)
    assert_empty(root)


# --- names, checksums, conflicts -------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", ".hidden", "..", "a/b", "../x", "a b", "x" * 129, "naïve", "a\n", "-" + "\0"]
)
async def test_bad_names_are_spec_errors(
    server: Server, store: ImageStore, root: Path, name: str
) -> None:
    with pytest.raises(SpecError) as caught:
        await store.import_image(name, f"{server.base}/files/small.img")
    assert issue_locs(caught.value) == ["name"]
    with pytest.raises(SpecError):
        store.get(name)
    with pytest.raises(SpecError):
        await store.delete(name)
    assert not root.exists()


async def test_longest_name_is_fine(server: Server, store: ImageStore) -> None:
    name = "a" + "-._" * 42 + "z"
    assert len(name) == 128
    record = await store.import_image(name, f"{server.base}/files/small.img")
    assert store.list() == [record]


@pytest.mark.parametrize(
    "checksum",
    [
        "",
        "sha256",
        "sha256:",
        "abc123",
        "sha1:" + "0" * 40,
        "sha256:" + "0" * 63,
        "sha256:" + "g" * 64,
        "md5:" + "0" * 64,
        "sha512:" + "0" * 64,
    ],
)
async def test_malformed_checksums_are_spec_errors(
    server: Server, store: ImageStore, root: Path, checksum: str
) -> None:
    with pytest.raises(SpecError) as caught:
        await store.import_image("small", f"{server.base}/files/small.img", checksum=checksum)
    assert issue_locs(caught.value) == ["checksum"]
    assert not root.exists()


async def test_duplicate_is_a_conflict_unless_replace(
    server: Server, store: ImageStore, root: Path
) -> None:
    first = await store.import_image("img", f"{server.base}/files/small.img")
    with pytest.raises(Conflict):
        await store.import_image("img", f"{server.base}/files/other.img")
    assert store.get("img") == first
    with pytest.raises(Conflict, match="vm-a"):
        await store.import_image(
            "img", f"{server.base}/files/other.img", replace=True, users=["vm-a"]
        )
    second = await store.import_image("img", f"{server.base}/files/other.img", replace=True)
    assert second.sha256 == hashlib.sha256(OTHER).hexdigest()
    assert store.get("img") == second
    assert (root / "img").read_bytes() == OTHER
    assert sorted(os.listdir(root)) == [".img.json", "img"]


async def test_orphan_file_blocks_its_name_until_deleted(
    server: Server, store: ImageStore, root: Path
) -> None:
    root.mkdir()
    (root / "orphan").write_bytes(b"left by a crash")
    assert store.list() == []
    with pytest.raises(NotFound):
        store.get("orphan")
    with pytest.raises(Conflict, match="without metadata"):
        await store.import_image("orphan", f"{server.base}/files/small.img")
    await store.delete("orphan")
    assert_empty(root)
    await store.import_image("orphan", f"{server.base}/files/small.img")
    assert [r.name for r in store.list()] == ["orphan"]


# --- delete, list, get -----------------------------------------------------------------


async def test_delete_with_users_is_refused(server: Server, store: ImageStore) -> None:
    record = await store.import_image("img", f"{server.base}/files/small.img")
    with pytest.raises(Conflict) as caught:
        await store.delete("img", users=["web-1", "db-2"])
    assert "web-1" in str(caught.value) and "db-2" in str(caught.value)
    assert record.path.read_bytes() == SMALL
    assert store.get("img") == record


async def test_delete_removes_file_and_metadata(
    server: Server, store: ImageStore, root: Path
) -> None:
    await store.import_image("img", f"{server.base}/files/small.img")
    await store.delete("img")
    assert_empty(root)
    with pytest.raises(NotFound):
        store.get("img")
    with pytest.raises(NotFound):
        store.path("img")
    with pytest.raises(NotFound):
        await store.delete("img")
    with pytest.raises(NotFound):
        await store.delete("img", users=["vm"])


async def test_list_is_sorted_and_get_finds_each(server: Server, store: ImageStore) -> None:
    assert store.list() == []
    names = ["zeta", "alpha", "Mid.raw", "beta_2"]
    records: dict[str, ImageRecord] = {}
    for name in names:
        records[name] = await store.import_image(name, f"{server.base}/files/small.img")
    assert [r.name for r in store.list()] == sorted(names)
    for name, record in records.items():
        assert store.get(name) == record
    with pytest.raises(NotFound):
        store.get("nothing")
    reopened = ImageStore(store.root)
    assert reopened.list() == store.list()
