"""QEMU's comma-separated option strings, built so no value can add an option of its own.

QEMU splits ``-device virtio-blk-pci,drive=d0,serial=x`` at every single comma; a literal comma
inside a value is written ``,,``. A path such as ``/vm/a,b`` therefore becomes
``filename=/vm/a,,b`` -- without the doubling, ``b`` would be parsed as one more option (and
``/x,readonly=off`` as a real one). :func:`qopts` is the only way corral writes such strings.

Values cannot carry NUL (argv cannot hold it); the spec refuses it and so does this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from corral.spec.optstring import split_options

__all__ = ["escape", "qopts", "split_options"]

OptionValue = str | int | bool | None


def escape(value: str) -> str:
    """Double every comma; refuse NUL."""
    if "\x00" in value:
        raise ValueError("a qemu option value cannot contain NUL")
    return value.replace(",", ",,")


def _fmt(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return escape(str(value))


def qopts(
    head: str | None = None,
    pairs: Mapping[str, OptionValue] | Iterable[tuple[str, OptionValue]] | None = None,
    /,
    **kwargs: OptionValue,
) -> str:
    """``qopts("virtio-blk-pci", drive="d0", bootindex=None)`` -> ``virtio-blk-pci,drive=d0``.

    ``head`` is the implied first value (a driver or backend name); ``None`` values are left
    out; booleans become ``on``/``off``. Keys containing ``-`` or ``.``, or repeated keys
    (``hostfwd``), come via ``pairs`` (a mapping or a list of pairs).
    Keys are written by corral's templates, never from user input, so they are checked, not
    escaped.
    """
    parts: list[str] = []
    if head is not None:
        if "=" in head:
            raise ValueError(f"the implied option {head!r} cannot contain '='")
        parts.append(_fmt(head))
    items = list(pairs.items() if isinstance(pairs, Mapping) else (pairs or []))
    items.extend(kwargs.items())
    for key, value in items:
        if not key or any(c in key for c in ",=\x00"):
            raise ValueError(f"invalid qemu option key {key!r}")
        if value is None:
            continue
        parts.append(f"{key}={_fmt(value)}")
    return ",".join(parts)
