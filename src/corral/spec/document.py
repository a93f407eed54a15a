"""Reading VM documents: YAML text -> :class:`VmDocument`, or a :class:`SpecError` that names
every broken field by its path in the document (``spec.vm.disks[1].file.path: ...``).

Relative host paths in a document read from a file are resolved against that file's
directory, so ``corral run -c vms/web.yaml`` means the same wherever it is run from.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from corral.errors import FieldIssue, SpecError
from corral.spec.models import VmDocument

__all__ = [
    "document_json_schema",
    "issues_from_validation",
    "load_document",
    "load_document_file",
    "parse_document",
]

_REASONS = {
    "extra_forbidden": "unknown field",
    "missing": "is required",
}
_PATTERN_HINTS = {
    "name": "must be a DNS-1123 label: lowercase letters, digits and '-', at most 63, "
    "starting and ending with a letter or digit",
    "namespace": "must be a DNS-1123 label",
    "template": "must be a template name: lowercase letters, digits, '-' or '_'",
    "cpuModel": "must be a qemu CPU model name (letters, digits, '.', '_', '-'); "
    "put features in cpuFeatures",
    "rtcBase": "must be utc, localtime or a date like 2006-06-17T16:01:21",
    "bridge": "must be a network interface name (at most 15 characters)",
    "ifname": "must be a network interface name (at most 15 characters)",
    "serial": "must be 1-20 letters, digits, '.', '_' or '-'",
}


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in {"str", "int", "bool", "float", "none"}:
            continue  # a union member tag such as 'dict[str,any]', not a field
        else:
            out += f".{part}" if out else part
    return out


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, list, dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found += [m for m in _models_in(arg) if m not in found]
    return found


def _known_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names (aliases) valid where ``loc`` points, for 'did you mean'."""
    models = [model]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        tagged = [m for m in models if m.__name__ == part]
        if tagged:
            models = tagged
            continue
        inner: list[type[BaseModel]] = []
        for m in models:
            for name, info in m.model_fields.items():
                if part in (name, info.alias):
                    inner += _models_in(info.annotation)
        if not inner:
            return []
        models = inner
    return [info.alias or name for m in models for name, info in m.model_fields.items()]


def _did_you_mean(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> str:
    if model is None or not loc or not isinstance(loc[-1], str):
        return ""
    known = _known_fields(model, loc)
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    if not close and len(loc[-1]) >= 3:
        close = [f for f in known if loc[-1].lower() in f.lower()][:3]
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def issues_from_validation(
    exc: ValidationError, model: type[BaseModel] | None = None
) -> list[FieldIssue]:
    """Pydantic's errors as ``FieldIssue``s with document paths and readable reasons; with
    ``model`` (the validated one), an unknown field gets the nearest known one suggested."""
    issues: list[FieldIssue] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        ctx = err.get("ctx") or {}
        reason = _REASONS.get(kind, err["msg"])
        if kind == "extra_forbidden":
            reason += _did_you_mean(model, loc)
        elif kind == "corral_rule":
            if ctx.get("field"):  # "disks.1.bootindex" -> disks[1].bootindex
                parts = str(ctx["field"]).split(".")
                loc = (*loc, *(int(p) if p.isdigit() else p for p in parts))
            reason = str(ctx["reason"])
        elif kind == "string_pattern_mismatch":
            last = next((p for p in reversed(loc) if isinstance(p, str) and "[" not in p), "")
            reason = _PATTERN_HINTS.get(last, reason)
        elif kind == "value_error":
            reason = reason.removeprefix("Value error, ")
        elif kind in ("literal_error", "enum") and "expected" in ctx:
            reason = f"must be one of {ctx['expected']}"
        if (
            kind not in ("missing", "extra_forbidden")
            and "input" in err
            and _short(err["input"])
            and "cloudInit" not in loc  # passwords and keys: never quoted in errors and events
        ):
            reason = f"{reason} (got {err['input']!r})"
        issue = FieldIssue(_format_loc(loc), reason)
        if issue not in issues:
            issues.append(issue)
    return issues


def _short(value: object) -> bool:
    return isinstance(value, str | int | float) and len(repr(value)) <= 80


def parse_document(data: object, base_dir: Path | None = None) -> VmDocument:
    """Validate already-parsed data (a mapping) as a VM document."""
    if not isinstance(data, Mapping):
        raise SpecError.single("", "a VM document must be a mapping with metadata and spec")
    if base_dir is not None:
        data = _resolve_paths(dict(data), base_dir)
    try:
        return VmDocument.model_validate(data)
    except ValidationError as exc:
        raise SpecError("invalid VM document", issues_from_validation(exc, VmDocument)) from exc


def load_document(text: str, base_dir: Path | None = None, source: str = "<input>") -> VmDocument:
    """Parse YAML (or JSON) text holding one VM document."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: not valid YAML: {problem}") from exc
    if len(docs) != 1:
        raise SpecError(f"{source}: expected exactly one VM document, found {len(docs)}")
    return parse_document(docs[0], base_dir)


def load_document_file(path: str | os.PathLike[str]) -> VmDocument:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read {file}: {exc.strerror}") from exc
    return load_document(text, base_dir=file.resolve().parent, source=str(file))


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATH_KEYS = {
    ("file", "path"),
    ("file", "image"),
    ("device", "path"),
    ("cdrom", "image"),
    ("vm", "kernel"),
    ("vm", "initrd"),
    ("vde", "socket"),
    ("runner", "dataDir"),
    ("runner", "runtimeDir"),
    ("runner", "statusFile"),
    ("runner", "displaySecretFile"),
}


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative paths absolute against ``base``; leaves everything else untouched."""

    def walk(node: object, parent: str) -> object:
        if isinstance(node, Mapping):
            out: dict[object, object] = {}
            for key, value in node.items():
                if (
                    isinstance(value, str)
                    and value
                    and (parent, key) in _PATH_KEYS
                    and not os.path.isabs(value)
                    and not _URL.match(value)
                ):
                    out[key] = str(base / value)
                else:
                    out[key] = walk(value, str(key))
            return out
        if isinstance(node, list):
            return [walk(item, parent) for item in node]
        return node

    result = walk(data, "")
    assert isinstance(result, dict)
    return result


def document_json_schema() -> dict[str, Any]:
    """The JSON schema of a VM document (the basis of the CRD's openAPIV3Schema)."""
    schema = VmDocument.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "corral VirtualMachine"
    # round-trip to guarantee plain JSON types only
    result: dict[str, Any] = json.loads(json.dumps(schema))
    return result
