"""Moved to :mod:`corral.manager.backends.systemd` (a re-export for older importers)."""

from corral.manager.backends.systemd import SystemdBackend
from corral.manager.backends.systemd_unit import (
    STOP_MARGIN,
    UNIT_PREFIX,
    CommandResult,
    CommandRunner,
    default_corral_command,
    exec_line,
    quote_word,
    render_unit,
    run_command,
    unit_name,
)

__all__ = [
    "STOP_MARGIN",
    "UNIT_PREFIX",
    "CommandResult",
    "CommandRunner",
    "SystemdBackend",
    "default_corral_command",
    "exec_line",
    "quote_word",
    "render_unit",
    "run_command",
    "unit_name",
]
