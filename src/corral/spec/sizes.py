"""Byte sizes as users write them (``512Mi``, ``4Gi``, ``2G``, ``1073741824``).

The units follow qemu and libvirt, because a VM-Operator or qemu user writes ``maximumRam: 1G``
and means one gibibyte: a bare letter (``K M G T``) and the IEC forms (``Ki``/``KiB``...) are
binary; the SI forms with a ``B`` (``KB MB GB TB``) are decimal. A number without a unit is
bytes. Fractions are allowed when the result is a whole number of bytes (``1.5Gi``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["ByteSize", "format_size", "parse_size"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "ki": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "ti": 1024**4,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: object) -> int:
    """Return the size in bytes, or raise ``ValueError`` saying what is wrong."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like '512Mi', not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, float):
        if not value.is_integer() or value < 0:
            raise ValueError("a size in bytes must be a whole, non-negative number")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"a size must be a string like '512Mi' or an integer, not {value!r}")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a size (examples: 512Mi, 4Gi, 2G, 1073741824)")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown unit {unit!r} in {value!r} (use Ki/Mi/Gi/Ti or K/M/G/T for binary, "
            "KB/MB/GB/TB for decimal)"
        )
    try:
        total = Decimal(number) * factor
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{value!r} is not a size") from exc
    if total != total.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(total)


def format_size(size: int) -> str:
    """The shortest exact IEC form: ``1073741824`` -> ``1Gi``; ``1000`` -> ``1000``."""
    for suffix, factor in (("Ti", 1024**4), ("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[A-Za-z]*\s*$"},
            ],
            "description": "bytes, or a size like 512Mi, 4Gi, 2G (binary), 2GB (decimal)",
        }
    ),
]
"""An ``int`` of bytes in Python, parsed from any accepted form, written back as ``4Gi``."""
