"""Byte sizes as users write them (``512Mi``, ``4Gi``, ``2G``, ``2GB``, ``1073741824``).

One rule, the one qemu (``-m 2G``), libvirt and VM-Operator's ``maximumRam: 1G`` use:

- binary (powers of 1024): a bare letter ``K M G T``, and the IEC forms ``Ki Mi Gi Ti`` and
  ``KiB MiB GiB TiB``;
- decimal (powers of 1000): the SI forms with a ``B``, ``kB``/``KB MB GB TB``;
- bytes: a plain number, or ``B``.

Units are case-sensitive and follow the number directly: ``Mb`` (megabits?), ``mb``, ``gib`` or
``4 GB`` are refused with the spellings that mean what the user most likely meant, because a
guess here is a VM with a thousandth or 7% less memory than asked. Fractions are allowed when
the result is a whole number of bytes (``1.5Gi``).

A size is kept as bytes and written back in the shortest exact form of either family, so what
the user wrote comes back (``256MB`` stays ``256MB``, ``4Gi`` stays ``4Gi``) or, for an exotic
spelling, its plain equivalent (``4096M`` -> ``4Gi``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["ByteSize", "format_size", "parse_size"]

_BINARY = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_DECIMAL = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    **{letter: factor for letter, factor in _BINARY.items()},
    **{f"{letter}i": factor for letter, factor in _BINARY.items()},
    **{f"{letter}iB": factor for letter, factor in _BINARY.items()},
    **{f"{letter}B": factor for letter, factor in _DECIMAL.items()},
    "kB": 1000,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(\s*)([A-Za-z]*)\s*$")
_UNIT_HELP = "use Ki/Mi/Gi/Ti or K/M/G/T for binary, KB/MB/GB/TB for decimal"


def _ambiguous(value: str, number: str, unit: str, spaced: bool) -> str | None:
    """Why ``value`` is refused and what to write instead, when it is a near miss."""
    letter = unit[:1].upper()
    if letter not in _BINARY or unit.lower() not in {
        letter.lower() + rest for rest in ("", "i", "ib", "b")
    }:
        return None
    binary, decimal = f"{number}{letter}i", f"{number}{letter}B"
    if spaced and unit in _UNITS:
        why = "a unit follows the number without a space"
    elif unit.endswith("b") and not unit.endswith("ib"):
        why = f"{unit!r} reads as bits; units are case-sensitive"
    else:
        why = f"{unit!r} is not a unit (they are case-sensitive)"
    return (
        f"{value!r} is ambiguous: {why}; write {binary!r} (binary, {letter}i = "
        f"{_BINARY[letter]} bytes) or {decimal!r} (decimal, {_DECIMAL[letter]} bytes)"
    )


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
    number, space, unit = match.groups()
    factor = _UNITS.get(unit)
    if factor is None or (space and unit):
        reason = _ambiguous(value, number, unit, bool(space))
        if reason is not None:
            raise ValueError(reason)
        raise ValueError(f"unknown unit {unit!r} in {value!r} ({_UNIT_HELP})")
    try:
        total = Decimal(number) * factor
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{value!r} is not a size") from exc
    if total != total.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(total)


def format_size(size: int) -> str:
    """The shortest exact form in either family, binary on a tie: ``1073741824`` -> ``1Gi``,
    ``256000000`` -> ``256MB`` (not ``250000Ki``), ``1000`` -> ``1KB``, ``1536`` -> ``1536``."""
    best = str(size)
    if not size:
        return best
    for family, suffix in ((_BINARY, "i"), (_DECIMAL, "B")):
        for letter in ("T", "G", "M", "K"):
            if size % family[letter] == 0:
                text = f"{size // family[letter]}{letter}{suffix}"
                if len(text) < len(best):
                    best = text
                break
    return best


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?[A-Za-z]*\s*$"},
            ],
            "description": "bytes, or a size like 512Mi, 4Gi, 2G (binary), 2GB (decimal)",
        }
    ),
]
"""An ``int`` of bytes in Python, parsed from any accepted form, written back as ``4Gi`` or
``256MB`` (``format_size``)."""
