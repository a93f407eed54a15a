"""QEMU's own splitting of a comma-separated option string (``a,b=c,,d``).

The host policy uses it to see exactly the options qemu will see in an ``extraArgs`` value;
:mod:`corral.qemu.options` builds such strings and re-exports this for tests.
"""

from __future__ import annotations

__all__ = ["split_options"]


def split_options(text: str) -> list[str]:
    """QEMU's own parsing of an option string: split at single commas, unescape ``,,``.

    Split at single commas; ``,,`` is a literal comma.
    """
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts
