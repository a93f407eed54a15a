"""Fixtures for the integration tests: the project's real test guests (built by
``guests/build.py`` and cached in ``$CORRAL_CACHE_DIR``, default ``~/.cache/corral/guests``),
short per-test directories for unix sockets, and ``corral render`` as a subprocess.

The building blocks live in :mod:`tests.integration.harness` so tests can also use them
directly (types, ``RenderedVm``); the fixtures here are the usual way in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import VmDirs, build_guest, render_argv


@pytest.fixture(scope="session")
def tiny_guest() -> Any:
    """The busybox + Debian cloud kernel guest (``kernel``, ``initrd``, ``cmdline``, ...)."""
    return build_guest("tiny")


@pytest.fixture(scope="session")
def debian_guest() -> Any:
    """The debootstrapped Debian guest (``kernel``, ``initrd``, ``disk``, ``cmdline``, ...)."""
    return build_guest("debian")


@pytest.fixture
def vm_dirs() -> Iterator[VmDirs]:
    """A short private root under /tmp with ``data`` and ``run`` dirs, removed afterwards."""
    dirs = VmDirs.create()
    try:
        yield dirs
    finally:
        dirs.remove()


@pytest.fixture
def short_dir(vm_dirs: VmDirs) -> Path:
    """A short scratch directory under /tmp (unix socket paths must stay below 108 bytes)."""
    return vm_dirs.root


@pytest.fixture
def render_vm(vm_dirs: VmDirs) -> Callable[..., list[str]]:
    """``render_vm(doc, dirs=vm_dirs, policy=None, accel="tcg", standalone=True)``: write the
    document, run ``corral render --json`` as a subprocess and return the argv it printed."""

    def render(doc: dict[str, Any], dirs: VmDirs | None = None, **kwargs: Any) -> list[str]:
        return render_argv(doc, dirs or vm_dirs, **kwargs)

    return render
