"""The daemon's configuration (``corral serve --config FILE``): where things live, how much
runs at once, how crashes are retried, and how far the host may be overcommitted.

Everything defaults to a place under ``--state-dir``, so several daemons can run side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from corral.errors import SpecError
from corral.manager.backends import BACKENDS
from corral.spec.document import issues_from_validation

__all__ = ["ManagerConfig", "load_manager_config"]


class ManagerConfig(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )

    state_dir: Path
    backend: str = Field(default="embedded", description="a name in the backend registry")
    store_path: Path | None = Field(default=None, description="SQLite file (state/corral.db)")
    images_dir: Path | None = Field(default=None, description="image store (state/images)")
    vms_dir: Path | None = Field(default=None, description="per-VM data, disks (state/vms)")
    run_dir: Path | None = Field(default=None, description="sockets, pidfiles (state/run)")
    policy_file: Path | None = Field(default=None, description="host policy (host.yaml)")
    accelerator: Literal["kvm", "tcg"] | None = Field(
        default=None, description="force an accelerator for every VM (default: per VM, auto)"
    )
    workers: int = Field(default=8, ge=1, le=256, description="VMs worked on at once")
    autostart_parallel: int = Field(default=4, ge=1, le=256)
    resync_seconds: float = Field(default=30.0, gt=0)
    backoff_initial_seconds: float = Field(default=1.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)
    backoff_reset_seconds: float = Field(
        default=10.0,
        gt=0,
        description="a VM that ran this long before it crashed restarts after the initial delay",
    )
    cpu_overcommit: float = Field(
        default=4.0, gt=0, description="sum of maximumCpus of running VMs / host cores"
    )
    ram_overcommit: float = Field(
        default=1.0, gt=0, description="sum of maximumRam of running VMs / host memory"
    )
    stop_vms_on_exit: bool = Field(
        default=False,
        description="host-shutdown mode: on SIGTERM stop every VM gracefully before exiting",
    )
    systemd_user: bool = Field(default=False, description="systemd backend: --user units")
    systemd_unit_dir: Path | None = Field(default=None)
    services: tuple[str, ...] = Field(
        default=("api",), description="daemon services to run, by name (corral.services)"
    )
    users: Path | None = Field(
        default=None,
        description="local users for the pages and the TCP API (bcrypt hashes and roles, "
        "mode 0600; corral user add; docs/security.md)",
    )
    amqp: dict[str, Any] | None = Field(
        default=None,
        description="the amqp service's settings (url or urlFile, exchange, queues: "
        "docs/amqp.md); read by that service, not here",
    )

    @field_validator("backend")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"{value!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        return value

    @property
    def store(self) -> Path:
        return self.store_path or self.state_dir / "corral.db"

    @property
    def images(self) -> Path:
        return self.images_dir or self.state_dir / "images"

    @property
    def vms(self) -> Path:
        return self.vms_dir or self.state_dir / "vms"

    @property
    def run(self) -> Path:
        return self.run_dir or self.state_dir / "run"


def load_manager_config(path: Path | None, **overrides: object) -> ManagerConfig:
    """Read ``path`` (YAML, camelCase keys) and apply ``overrides`` (CLI flags) on top."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"cannot read manager config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SpecError(f"manager config {path} must be a mapping")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ManagerConfig.model_validate(data)
    except ValidationError as exc:
        issues = issues_from_validation(exc, ManagerConfig)
        raise SpecError("invalid manager config", issues) from exc
