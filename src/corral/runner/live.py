"""Live settings: a new document applied to the running VM over QMP (CPUs hot-plugged or
unplugged, the RAM balloon, CD media), and the display password from its secret; what cannot
be applied live is reported as ``pendingRestart``, a refused document changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any, cast

from corral.errors import CorralError, QemuError
from corral.host.chain import ChainError, open_file
from corral.runner.changes import cdrom_media, pending_restart, read_display_secret
from corral.runner.config import check_host
from corral.runner.core import SupervisorCore, merged, one_line
from corral.runner.status import (
    VmState,
)
from corral.spec import VmDocument
from corral.spec.models import MachineType, is_remote_image

__all__ = ["LiveSettings"]


class LiveSettings(SupervisorCore):
    """The ``apply`` half of the supervisor (see the module docstring)."""

    async def _refresh_live(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        with contextlib.suppress(QemuError):
            self.status.cpus = len(await monitor.query_list("query-cpus-fast"))
        with contextlib.suppress(QemuError):
            balloon = await monitor.query_dict("query-balloon")
            self.status.ram = cast(int, balloon.get("actual"))
        self._publish()

    async def block_stats(self) -> list[dict[str, Any]]:
        """qemu's ``query-blockstats`` (per drive: ``device``/``qdev`` and ``stats`` with
        ``rd_bytes``, ``wr_bytes``, ``rd_operations``, ...); empty unless running."""
        monitor = self._monitor
        if monitor is None or self.state is not VmState.RUNNING:
            return []
        try:
            return [dict(d) for d in await monitor.query_list("query-blockstats")]
        except QemuError:
            return []

    async def live_media(self) -> dict[str, str | None]:
        """{cd device id: image file or None} as qemu reports it."""
        monitor = self._monitor
        if monitor is None:
            return {}
        media: dict[str, str | None] = {}
        for dev in await monitor.query_list("query-block"):
            qdev = str(dev.get("qdev") or "")
            ident = qdev.rsplit("/", 1)[-1] if qdev.startswith("/") else qdev
            if not dev.get("removable"):
                continue
            inserted = cast(dict[str, object] | None, dev.get("inserted"))
            file = str(inserted.get("file")) if inserted else None
            media[ident] = self._fd_media.get(file, file) if file else None
        return media

    async def apply(self, doc: VmDocument) -> list[str]:
        """Make the running VM match ``doc`` where that can be done live; return what waits
        for a restart. A refused document leaves everything as it was (and says why)."""
        try:
            check_host(doc, self.policy, self.paths.emulator)
            pending = pending_restart(self._started_doc or self.doc, doc)
        except CorralError as exc:
            self.refuse_config(exc)
            raise
        async with self._lock:
            self.doc = doc
            self.status.config_error = None
            self.status.pending_restart = merged(pending, self._needs_restart)
            if self.state is not VmState.RUNNING or self._monitor is None:
                self._publish()
                return pending
            failures: list[str] = []
            for step in (self._apply_cpus, self._apply_ram, self._apply_media):
                try:
                    await step(doc)
                except CorralError as exc:
                    failures.append(str(exc))
            try:
                await self._apply_display_secret()
            except CorralError as exc:
                failures.append(str(exc))
            if failures:
                self.status.config_error = "; ".join(failures)
                self._event("ApplyFailed", errors=failures)
            self._event("Applied", pendingRestart=pending)
            await self._refresh_live()
            return pending

    def refuse_config(self, exc: CorralError) -> None:
        """Report a document that could not be used (unreadable, invalid, refused by policy);
        the VM keeps running on the last good one."""
        self.status.config_error = one_line(exc)
        self._event("ConfigRefused", error=self.status.config_error)
        self._publish()

    async def _apply_cpus(self, doc: VmDocument) -> None:
        monitor = self._monitor
        assert monitor is not None
        want = doc.vm.cur_cpus
        slots = await monitor.query_list("query-hotpluggable-cpus")
        plugged = [s for s in slots if s.get("qom-path")]
        if want == len(plugged):
            return
        if doc.vm.machine is MachineType.MICROVM:
            raise QemuError("currentCpus: the microvm machine has no CPU hot-plug")
        if want > len(slots):
            raise QemuError(f"currentCpus: {want} is more than the {len(slots)} CPU slots")
        if want > len(plugged):
            free = sorted((s for s in slots if not s.get("qom-path")), key=_slot_key)
            for slot in free[: want - len(plugged)]:
                props = cast(dict[str, object], slot.get("props") or {})
                dev_id = "cpu-" + "-".join(str(v) for _, v in sorted(props.items()))
                await monitor.execute("device_add", {"driver": slot["type"], "id": dev_id, **props})
            self._want_cpus_online = True
            self._event("CpusPlugged", count=want - len(plugged))
        else:
            removable = sorted(
                (s for s in plugged if str(s.get("qom-path")).startswith("/machine/peripheral/")),
                key=_slot_key,
                reverse=True,
            )
            surplus = len(plugged) - want
            if surplus > len(removable):
                raise QemuError(
                    "currentCpus: only hot-plugged CPUs can be removed; "
                    f"{len(plugged) - len(removable)} were there at start"
                )
            for slot in removable[:surplus]:
                dev_id = str(slot["qom-path"]).rsplit("/", 1)[-1]
                await monitor.execute("device_del", {"id": dev_id})
            self._event("CpusUnplugRequested", count=surplus)

    async def _apply_ram(self, doc: VmDocument) -> None:
        monitor = self._monitor
        assert monitor is not None
        started = self._started_doc or doc
        target = min(doc.vm.cur_ram, started.vm.maximum_ram)
        if self.status.ram == target:
            return
        await monitor.execute("balloon", {"value": target})
        self._event("BalloonTarget", bytes=target)

    async def _apply_media(self, doc: VmDocument) -> None:
        live = await self.live_media()
        for dev, image in cdrom_media(doc).items():
            if dev in live and live[dev] == image and dev not in self.status.cdrom_pending:
                continue
            await self._change_medium(dev, image)

    async def _change_medium(self, dev: str, image: str | None) -> None:
        monitor = self._monitor
        assert monitor is not None
        try:
            if image:
                filename = await self._media_filename(image)
                await monitor.execute(
                    "blockdev-change-medium",
                    {
                        "id": dev,
                        "filename": filename,
                        "format": "raw",
                        "read-only-mode": "read-only",
                    },
                )
            else:
                await monitor.execute("eject", {"id": dev})
        except QemuError as exc:
            text = str(exc)
            if "locked" in text or "not open" in text or "tray" in text.lower():
                self.status.cdrom_pending[dev] = image
                self._event("MediaChangePending", device=dev, image=image, reason=text)
                self._publish()
                return
            raise
        self.status.cdrom_pending.pop(dev, None)
        self.status.cdrom[dev] = image
        self._event("MediaChanged", device=dev, image=image)
        self._publish()

    async def _media_filename(self, image: str) -> str:
        """What qemu opens for a CD inserted live: a URL as it is; a host file opened here
        (qemu runs unprivileged and could not) and passed as ``/dev/fdset/N``."""
        monitor = self._monitor
        assert monitor is not None
        if is_remote_image(image):
            return image
        try:
            fd = open_file(image, block_devices=False)
        except ChainError as exc:
            raise QemuError(f"CD image: {exc}") from exc
        if fd is None:
            raise QemuError(f"CD image {image} does not exist")
        try:
            fdset = await monitor.add_fd(fd, opaque=image[-200:])
        finally:
            os.close(fd)
        name = f"/dev/fdset/{fdset}"
        self._fd_media[name] = image
        return name

    async def _apply_display_secret(self, *, force: bool = False) -> None:
        """The display password and its expiry, from the display secret (never the document).

        With no secret, as VM-Operator does: SPICE with ``generateSecret`` gets a random
        password that expires at once (the display is locked until the user sets one, and
        nobody can read it anywhere); VNC (``password=on``) is locked too. A ``DisplayLocked``
        event says how to get in."""
        monitor = self._monitor
        display = self.doc.vm.display
        if monitor is None or display is None:
            return
        secret = read_display_secret(self.paths.display_secret_file)
        password, expiry = secret.password, secret.expiry
        if password is None:
            expiry = "now"
            if display.spice is not None and display.spice.generate_secret:
                password = secrets.token_urlsafe(16)
        if not force and (secret.password, expiry) == self._secret_applied:
            return
        protocols = [p for p, on in (("spice", display.spice), ("vnc", display.vnc)) if on]
        for protocol in protocols:
            if password is not None:
                pw = password[:8] if protocol == "vnc" else password
                await monitor.execute("set_password", {"protocol": protocol, "password": pw})
            await monitor.execute(
                "expire_password", {"protocol": protocol, "time": expiry or "never"}
            )
        self._secret_applied = (secret.password, expiry)
        if secret.password is None:
            where = self.paths.display_secret_file
            self._event(
                "DisplayLocked",
                protocols=protocols,
                hint="no display password is set: write one to the display secret "
                + (f"({where})" if where else "(corral run --display-secret-file FILE)")
                + "; it applies live",
            )
        else:
            self._event("DisplayPasswordSet", protocols=protocols, expiry=expiry or "never")

    async def display_secret_changed(self) -> None:
        """The secret file changed (it is not part of the document): apply it live."""
        async with self._lock:
            if self.state is VmState.RUNNING:
                await self._apply_display_secret()


def _slot_key(slot: dict[str, object]) -> tuple[int, ...]:
    props = cast(dict[str, int], slot.get("props") or {})
    return tuple(
        int(props.get(k, 0)) for k in ("node-id", "socket-id", "die-id", "core-id", "thread-id")
    )
