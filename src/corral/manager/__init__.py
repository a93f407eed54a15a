"""The manager: desired state for many VMs on one host (``corral serve``).

Imports ``runner``, ``host`` and ``spec``; never ``api``, ``cli`` or ``k8s``.
"""

from corral.manager.backend import Backend, EmbeddedBackend, Observed
from corral.manager.config import ManagerConfig, load_manager_config
from corral.manager.manager import Manager, ManagerState, json_merge_patch
from corral.manager.retained import RetainedDisk, RetainedDisks, RetainedSet
from corral.manager.store import Store, StoredEvent, VmRecord
from corral.manager.systemd import SystemdBackend
from corral.manager.waits import WaitTarget

__all__ = [
    "Backend",
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
