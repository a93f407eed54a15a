"""The manager: desired state for many VMs on one host (``corral serve``).

Imports ``runner``, ``host`` and ``spec``; never ``api``, ``cli`` or ``k8s``. The backend
classes are imported on first use (a daemon loads only the backend it runs).
"""

from typing import TYPE_CHECKING

from corral.manager.backends import BACKENDS, Backend, Capability, Capacity, Observed
from corral.manager.config import ManagerConfig, load_manager_config
from corral.manager.manager import Manager, ManagerState, json_merge_patch
from corral.manager.retained import RetainedDisk, RetainedDisks, RetainedSet
from corral.manager.store import Store, StoredEvent, VmRecord
from corral.manager.waits import WaitTarget

if TYPE_CHECKING:
    from corral.manager.backends.embedded import EmbeddedBackend
    from corral.manager.backends.systemd import SystemdBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "Capability",
    "Capacity",
    "EmbeddedBackend",
    "Manager",
    "ManagerConfig",
    "ManagerState",
    "Observed",
    "RetainedDisk",
    "RetainedDisks",
    "RetainedSet",
    "Store",
    "StoredEvent",
    "SystemdBackend",
    "VmRecord",
    "WaitTarget",
    "json_merge_patch",
    "load_manager_config",
]


def __getattr__(name: str) -> object:
    if name == "EmbeddedBackend":
        from corral.manager.backends.embedded import EmbeddedBackend

        return EmbeddedBackend
    if name == "SystemdBackend":
        from corral.manager.backends.systemd import SystemdBackend

        return SystemdBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
