"""Admission: a VM document is checked against this host before anything is written or
started; a refusal names each field and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from corral.errors import CapacityError, Conflict, FieldIssue, NotFound, PolicyError
from corral.host.ports import host_ports, port_busy
from corral.manager.hub import EventHub
from corral.manager.store import VmRecord
from corral.runner.config import check_host
from corral.spec import VmDocument, parse_document

__all__ = ["Admission"]

_RUNNER_FIELDS_OWNED = (
    "data_dir",
    "runtime_dir",
    "status_file",
    "display_secret_file",
    "emulator",
)
"""Runner paths a managed document may not set: under the manager they are the manager's (a
document naming a FIFO, /dev/zero or another VM's files as its display secret or status file
would reach the daemon's own I/O)."""


def _store_name(source: object) -> str | None:
    """A disk's or CD's ``image`` when it names an image in the store (no ``/``: not a path,
    not a URL), else None."""
    image = getattr(source, "image", None)
    return image if isinstance(image, str) and image and "/" not in image else None


class Admission(EventHub):
    """What this host may run: host policy, image-store names, runner-owned fields, host
    ports, and capacity (the backend's offer times the overcommit factors)."""

    def _parse(self, doc: VmDocument | Mapping[str, Any]) -> VmDocument:
        return doc if isinstance(doc, VmDocument) else parse_document(dict(doc))

    def _image_path(self, image: str) -> Path:
        """A disk's ``image``: an absolute path, or the name of an image in the store."""
        return Path(image) if "/" in image else self.images.path(image)

    def _runtime_document(self, doc: VmDocument) -> VmDocument:
        """The document the runner gets: image-store names (a disk's or a CD's ``image``)
        resolved to paths."""
        if not any(_store_name(d.file) or _store_name(d.cdrom) for d in doc.vm.disks):
            return doc
        data = doc.model_dump(mode="json", by_alias=True, exclude_none=True)
        for disk in data["spec"]["vm"]["disks"]:
            for kind in ("file", "cdrom"):
                image = disk.get(kind, {}).get("image")
                if image and "/" not in image:
                    disk[kind]["image"] = str(self.images.path(image))
        return parse_document(data)

    def _admit(self, doc: VmDocument) -> None:
        """Refuse (changing nothing) what this host must not run: policy, limits, files."""
        issues: list[FieldIssue] = []
        if doc.runner is not None:
            for field in _RUNNER_FIELDS_OWNED:
                if getattr(doc.runner, field) is not None:
                    camel = field.split("_")[0] + "".join(p.title() for p in field.split("_")[1:])
                    issues.append(FieldIssue(f"runner.{camel}", "is set by the manager; remove it"))
        for i, disk in enumerate(doc.vm.disks):
            for kind, source in (("file", disk.file), ("cdrom", disk.cdrom)):
                image = _store_name(source)
                if image is None:
                    continue
                try:
                    self.images.get(image)
                except NotFound:
                    issues.append(
                        FieldIssue(
                            f"spec.vm.disks[{i}].{kind}.image",
                            f"no image {image!r} in the image store (corral image list)",
                        )
                    )
        if issues:
            raise PolicyError.of(issues)
        check_host(
            self._runtime_document(doc),
            self.policy,
            forbidden=self._own_dirs(),
            read_only_ok=[str(self.config.images)],
        )
        if doc.vm.state == "Running":
            try:
                self._check_capacity(doc)
            except CapacityError as exc:  # the caller gets the error; the event log keeps it
                self._record_event(doc.name, "StartRefused", {"reason": "Capacity",
                                                              "error": str(exc)})  # fmt: skip
                raise
            if not self._observe(doc.name).active:  # a running VM's own qemu holds them
                self._check_ports(doc)

    def _check_ports(self, doc: VmDocument) -> None:
        """The host ports the VM's qemu would listen on (port forwards, SPICE, VNC) are free,
        and no other VM running or desired Running asks for them: qemu exits at once when
        one is taken, and would again on every retry. :class:`Conflict` naming each field."""
        mine = host_ports(doc)
        if not mine:
            return
        others = [
            (record.name, port)
            for record in self.store.all()
            if record.name != doc.name and self._holds(record)
            for port in host_ports(record.document)
        ]
        issues = []
        for port in mine:
            owner = next((vm for vm, theirs in others if theirs.overlaps(port)), None)
            if owner is not None:
                issues.append(
                    FieldIssue(
                        port.field,
                        f"{port}: VM {owner!r} (running or desired Running) listens on it too",
                    )
                )
            elif (why := port_busy(port)) is not None:
                issues.append(FieldIssue(port.field, f"{port} is taken on this host ({why})"))
        if issues:
            raise Conflict("a host port this VM listens on is taken", issues)

    def _holds(self, record: VmRecord) -> bool:
        """Whether a VM holds its CPUs, RAM and ports: its qemu runs, or it is desired Running
        and not Failed (a Failed VM's qemu is stopped, and nothing starts it on its own)."""
        wanted = record.desired == "Running" and record.name not in self._failed
        return wanted or self._observe(record.name).active

    def _own_dirs(self) -> list[str]:
        """The manager's own files: no document path may point into them (the image store
        only through ``file.image``, other VMs' disks and the store never)."""
        c = self.config
        return sorted({str(c.state_dir), str(c.images), str(c.vms), str(c.run)})

    def capacity(self) -> dict[str, dict[str, int]]:
        """The host's room for VMs: per resource (``cpus``; ``ram`` in bytes) what the backend
        offers, the limit after overcommit, what the VMs that hold it use (running, stopping
        or desired Running, not Failed) and what is still available."""
        offered = self.backend.capacity()
        held = [r.document.vm for r in self.store.all() if self._holds(r)]
        report = {}
        for key, total, factor, used in (
            ("cpus", offered.cpus, self.config.cpu_overcommit, sum(vm.max_cpus for vm in held)),
            ("ram", offered.ram, self.config.ram_overcommit, sum(vm.maximum_ram for vm in held)),
        ):
            limit = int(total * factor)
            report[key] = {
                "total": total, "limit": limit, "used": used, "available": max(limit - used, 0)
            }  # fmt: skip
        return report

    def _check_capacity(self, doc: VmDocument) -> None:
        cpus, ram = doc.vm.max_cpus, doc.vm.maximum_ram
        for record in self.store.all():
            if record.name != doc.name and self._holds(record):
                cpus += record.document.vm.max_cpus
                ram += record.document.vm.maximum_ram
        offered = self.backend.capacity()
        cpu_limit = int(offered.cpus * self.config.cpu_overcommit)
        ram_limit = int(offered.ram * self.config.ram_overcommit)
        issues = []
        if cpus > cpu_limit:
            issues.append(
                FieldIssue(
                    "spec.vm.maximumCpus",
                    f"VMs running, stopping or desired Running would have {cpus} CPUs; "
                    f"this host allows {cpu_limit} "
                    f"({offered.cpus} cores x cpuOvercommit {self.config.cpu_overcommit:g})",
                )
            )
        if ram > ram_limit:
            issues.append(
                FieldIssue(
                    "spec.vm.maximumRam",
                    f"VMs running, stopping or desired Running would have {ram // 2**20} MiB; "
                    "this host allows "
                    f"{ram_limit // 2**20} MiB (ramOvercommit {self.config.ram_overcommit:g})",
                )
            )
        if issues:
            raise CapacityError.of(issues)
