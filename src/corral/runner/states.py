"""State guards for the supervisor's lifecycle methods (after qemu.qmp's ``Runstate`` and
``@require``): a method says in which states it may run, and a call in any other state fails
with one error that names the VM, its state and what was asked, before the method body runs.

The guard does not lock: a method that must check and act atomically takes the supervisor's
lock first and calls a guarded ``_locked`` method inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from corral.errors import QemuError
from corral.runner.status import VmState

__all__ = ["Guarded", "check_state", "require"]

P = ParamSpec("P")
R = TypeVar("R")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class Guarded(Protocol):
    @property
    def state(self) -> VmState: ...
    @property
    def doc(self) -> _Named: ...


S = TypeVar("S", bound=Guarded)


def check_state(obj: Guarded, states: Collection[VmState], action: str) -> None:
    """Raise :class:`~corral.errors.QemuError` unless ``obj`` is in one of ``states``."""
    if obj.state not in states:
        allowed = " or ".join(s.value for s in states)
        raise QemuError(
            f"VM {obj.doc.name} is {obj.state.value}; cannot {action} (it must be {allowed})"
        )


def require(
    *states: VmState, action: str
) -> Callable[
    [Callable[Concatenate[S, P], Awaitable[R]]],
    Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
]:
    """Guard an async method: it runs only in ``states`` (see :func:`check_state`)."""

    def decorate(
        method: Callable[Concatenate[S, P], Awaitable[R]],
    ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
        @functools.wraps(method)
        async def guarded(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
            check_state(self, states, action)
            return await method(self, *args, **kwargs)

        guarded.__dict__["required_states"] = frozenset(states)
        return guarded

    return decorate
