"""A real RabbitMQ broker for the message API's tests: Debian's ``rabbitmq-server``, started on
127.0.0.1 as its own node (name, AMQP port and a TLS one with a fresh self-signed certificate,
distribution port, data and log dirs, config and Erlang cookie under one temp dir), with its
own ``epmd`` on a free port so it never meets the host's broker or another test run's. It
fails (never skips) saying what to install when it cannot start, with the tail of the
broker's log.

:class:`Broker` can be stopped and started again on the same data dir and port (a broker
restart mid-stream), and :func:`rabbitmq` is the module-scoped fixture over it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
INSTALL = "apt-get install --no-install-recommends rabbitmq-server (make deps)"
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts_amqp(port: int) -> bool:
    """Whether the broker answers the AMQP 0-9-1 header with its Connection.Start (it only
    listens once the node has booted, so a TCP connect alone would do, but this is sure)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            s.settimeout(2)
            return s.recv(8)[:1] == b"\x01"  # a method frame
    except OSError:
        return False


class Broker:
    """One RabbitMQ node under ``root``; ``url`` is its AMQP URL (guest, from loopback)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"corraltest{os.getpid()}x{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self.tls_port = free_port()
        self.cert = root / "broker.crt"
        (root / "home").mkdir(mode=0o700)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(root / "broker.key"), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        (root / "broker.key").chmod(0o644)  # the broker reads it as itself
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {self.cert}\n"
            f"ssl_options.certfile = {self.cert}\n"
            f"ssl_options.keyfile = {root / 'broker.key'}\n"
            "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
            "log.console = false\nlog.file.level = info\n"
            "disk_free_limit.absolute = 1MB\n"
            "max_message_size = 1048576\n"  # docs/amqp.md's advice: no daemon buffers more
        )
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def tls_url(self) -> str:
        """The same broker over TLS (its certificate: :attr:`cert`, for 127.0.0.1)."""
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.root / "home"),  # the Erlang cookie goes here
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.root / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.root / "rabbitmq.pid"),
        )
        return env

    def log(self) -> str:
        parts = []
        for path in [*sorted((self.root / "log").glob("*.log")), self.root / "server.out"]:
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def start(self) -> None:
        if not RABBITMQ_SERVER.exists() or shutil.which("epmd") is None:
            pytest.fail(f"RabbitMQ is not installed: {INSTALL}", pytrace=False)
        env = self._env()
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )  # fmt: skip
        with (self.root / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_SERVER)], cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts_amqp(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"rabbitmq-server did not start on 127.0.0.1:{self.port} within "
                    f"{START_TIMEOUT:.0f}s ({INSTALL}); its log:\n{self.log()}",
                    pytrace=False,
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the node (SIGTERM: a clean shutdown, messages of durable queues kept)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _accepts_amqp(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self.stop()
        epmd, self.epmd = self.epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.kill()
            epmd.wait(timeout=10)


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[Broker]:
    """A fresh broker for a test module, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="crmq-", dir="/tmp"))
    broker = Broker(root)
    try:
        broker.start()
        yield broker
    finally:
        broker.close()
        shutil.rmtree(root, ignore_errors=True)
