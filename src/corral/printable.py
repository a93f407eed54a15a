"""Text that others wrote, made safe to print on a terminal.

A guest writes its serial console, and qemu's stderr repeats what a document and a guest
gave it. Printed as is, such text drives the terminal of whoever reads it: escape sequences
clear the screen, retitle the window, rewrite what was printed before (a lone carriage
return), set the clipboard (OSC 52) or, on some terminals, answer back as if typed. So every
control character but newline and tab is shown instead of obeyed:

* C0 controls and DEL in caret notation, as ``cat -v`` shows them (``ESC [2J`` becomes
  ``^[[2J``), carriage returns dropped (a serial console ends lines with ``\\r\\n``);
* C1 controls (``U+0080``-``U+009F``: ``U+009B`` is a one-character CSI on some terminals) and
  the Unicode bidirectional overrides (which reorder what is shown) as ``\\xNN``/``\\uNNNN``;
* bytes that are not UTF-8 as U+FFFD.

Each character is mapped on its own, so text can be made printable piece by piece
(:class:`PrintableDecoder` keeps only a split UTF-8 sequence between pieces), and the result
is printable again unchanged. Who wants the bytes as written asks for them explicitly
(``corral logs --raw``, ``GET /v1/vms/{name}/logs?raw=true``).
"""

from __future__ import annotations

import codecs

__all__ = ["PrintableDecoder", "printable"]


def _table() -> dict[int, str]:
    table: dict[int, str] = {}
    for code in range(0x20):
        table[code] = "^" + chr(code + 0x40)
    del table[ord("\n")], table[ord("\t")]
    table[ord("\r")] = ""
    table[0x7F] = "^?"
    for code in range(0x80, 0xA0):
        table[code] = f"\\x{code:02x}"
    for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)):
        table[code] = f"\\u{code:04x}"
    return table


_TABLE = _table()


def printable(text: str) -> str:
    """``text`` with every control character shown, not obeyed (newlines and tabs kept)."""
    return text.translate(_TABLE)


class PrintableDecoder:
    """Bytes (a log, a stream) to printable text, a piece at a time: a UTF-8 sequence split
    between two pieces is decoded whole."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes, *, final: bool = False) -> str:
        return printable(self._decoder.decode(data, final))
