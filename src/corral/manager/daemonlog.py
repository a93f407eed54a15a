"""The daemon's log: one handler on stderr for corral's own loggers, uvicorn's (``uvicorn.error``,
``uvicorn.access``) and any library's warnings, in one of two formats:

* ``json``: one object per line, ``{"time", "level", "logger", "message", ...fields}`` (a
  record's ``extra={"fields": {...}}`` and uvicorn's access-line parts become fields), what a
  log shipper or ``journalctl -o cat | jq`` reads;
* ``text``: ``TIME LEVEL LOGGER: message key=value ...`` for a person at a terminal.

``auto`` picks text on a terminal and JSON otherwise (a pipe, a file, the journal).

No secrets in the log: the API's bearer tokens (``crl_...``, ``Authorization: Bearer``, the
console's ``?access_token=``) and values of fields or query parameters named like a password,
token or secret, and the password of a ``scheme://user:password@`` URL, are replaced by
``***`` before a record is formatted. Cloud-init data and
display passwords never reach a log call in the first place.

No guest's or qemu's words in the log either: the log (the journal) is readable by more people
than a VM's console log, and a console can show what cloud-init generated (a password). An
event is logged by :func:`event_fields`: its kind, VM and short fields; the text a guest or qemu
wrote (``consoleTail``, ``stderr``, a condition's ``message``, the ``qemu said:`` lines after an
error's first line) only in the event itself (``corral events``). Both formats print only
printable text: JSON escapes every non-ASCII character, text shows control characters
(:mod:`corral.printable`: an ``ESC``, a C1 ``CSI``, a bidi override) instead of sending them to a
terminal.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Literal

from corral.printable import printable

__all__ = ["LEVELS", "LogFormat", "configure_logging", "event_fields", "redact"]

LogFormat = Literal["auto", "json", "text"]
LEVELS = ("debug", "info", "warning", "error")

_STANDARD = frozenset(logging.LogRecord("n", 0, "p", 0, "m", None, None).__dict__) | {
    "message", "asctime", "color_message", "taskName", "fields",
}  # fmt: skip
_SECRET_KEY = re.compile(r"pass(word)?|token|secret|user_?data|authorization|cookie", re.I)
_SECRETS = [
    (re.compile(r"\bcrl_[A-Za-z0-9_-]+"), "crl_***"),
    (re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+"), r"\1 ***"),
    (re.compile(r"(?i)([?&;](?:access_token|token|password|passwd|secret)=)[^&#\s\"']*"),
     r"\1***"),
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]*@"), r"\1***@"),  # URL user:pass@
]  # fmt: skip
_HANDLER_NAME = "corral-daemon"
_GUEST_TEXT = frozenset({"consoleTail", "stderr", "message"})  # what a guest or qemu wrote
_FIELD_CHARS = 200


def redact(text: str) -> str:
    """``text`` with bearer tokens and secret-looking query values replaced by ``***``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def event_fields(data: Mapping[str, object]) -> dict[str, object]:
    """An event's fields as the daemon logs them: without the text a guest or qemu wrote
    (fields named in ``_GUEST_TEXT``, at any depth), a string cut to its first line (an error
    says what failed there; ``qemu said:`` and qemu's lines follow) and ``_FIELD_CHARS``."""
    return {str(k): _short(v) for k, v in data.items() if str(k) not in _GUEST_TEXT}


def _short(value: object) -> object:
    if isinstance(value, str):
        line = value.split("\n", 1)[0]
        cut = line != value or len(line) > _FIELD_CHARS
        return line[:_FIELD_CHARS] + " [...]" if cut else line
    if isinstance(value, Mapping):
        return event_fields(value)
    if isinstance(value, list | tuple):
        return [_short(v) for v in value]
    return value


def _clean(key: str, value: object) -> object:
    if _SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean("", v) for v in value]
    return value


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The record's structured fields: ``extra={"fields": ...}``, other extras, and the parts
    of a uvicorn access line."""
    found: dict[str, object] = {}
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, version, status = record.args
        found.update(client=client, method=method, path=path, httpVersion=version, status=status)
    given = getattr(record, "fields", None)
    if isinstance(given, Mapping):
        found.update({str(k): v for k, v in given.items()})
    found.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
    return {k: _clean(k, v) for k, v in found.items()}


def _time(record: logging.LogRecord) -> str:
    then = datetime.fromtimestamp(record.created, UTC)
    return then.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message(record: logging.LogRecord) -> str:
    try:
        return redact(record.getMessage())
    except (TypeError, ValueError):  # a library's bad format arguments: keep what was meant
        return redact(str(record.msg))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        for key, value in _fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)  # ASCII: no control character reaches a terminal


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={json.dumps(v, default=str, ensure_ascii=False)}"
            for k, v in _fields(record).items()
        )
        text = f"{_time(record)} {record.levelname:<7} {record.name}: {_message(record)}"
        text += f" {fields}" if fields else ""
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info))
        return printable(text)  # for a terminal: controls shown, not obeyed


def configure_logging(
    fmt: LogFormat = "auto", level: str = "info", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr) in ``fmt``: corral's and
    uvicorn's from ``level`` up, other libraries' from warning up. Calling it again replaces
    the handler it installed before."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "text" if _is_tty(out) else "json"
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    for name in ("corral", "uvicorn"):
        logging.getLogger(name).setLevel(numeric)
    logging.captureWarnings(True)
    return handler


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
