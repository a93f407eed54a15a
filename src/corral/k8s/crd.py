"""The ``VirtualMachine`` CRD, generated from the VM document's JSON schema.

Kubernetes wants a *structural* OpenAPI v3 schema (every node typed, no ``$ref``, no
``anyOf`` of types, free forms marked ``x-kubernetes-preserve-unknown-fields``, int-or-string
marked ``x-kubernetes-int-or-string``); pydantic emits JSON Schema with ``$ref``, ``anyOf``
with ``null`` and ``const``. :func:`structural_schema` converts one into the other, and
:func:`structural_issues` checks the result the way the API server does (the unit tests run
it on every generated CRD). Defaults are left out on purpose: the runner applies them, and a
stored object stays what the user wrote.

Two groups are served: ``corral.dev/v1alpha1`` (kind ``VirtualMachine``, plural
``virtualmachines``, short name ``vm``) and, for users migrating from VM-Operator,
``vmoperator.jdrupes.org/v1`` with VM-Operator's own names (plural ``vms``, singular ``vm``), so
its resources apply unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

from corral.errors import SpecError

__all__ = [
    "GROUPS",
    "CrdNames",
    "crd_manifest",
    "names_for",
    "structural_issues",
    "structural_schema",
]


class CrdNames:
    """Group, version and names of the served ``VirtualMachine`` resource."""

    def __init__(
        self, group: str, version: str, plural: str, singular: str, short: list[str]
    ) -> None:
        self.group = group
        self.version = version
        self.plural = plural
        self.singular = singular
        self.short = short
        self.kind = "VirtualMachine"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


GROUPS: dict[str, CrdNames] = {
    "corral.dev": CrdNames("corral.dev", "v1alpha1", "virtualmachines", "virtualmachine", ["vm"]),
    "vmoperator.jdrupes.org": CrdNames("vmoperator.jdrupes.org", "v1", "vms", "vm", []),
}


def names_for(group: str) -> CrdNames:
    try:
        return GROUPS[group]
    except KeyError:
        raise SpecError.single(
            "group", f"{group!r} is not served; use one of {', '.join(GROUPS)}"
        ) from None


_DROP = {"title", "default", "$schema", "$defs", "examples"}
_FREE = "x-kubernetes-preserve-unknown-fields"
_INT_OR_STRING = "x-kubernetes-int-or-string"
_VALUE_KEYS = ("pattern", "minimum", "maximum", "minLength", "maxLength", "enum")


def structural_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema (pydantic's, with ``$defs``) as a structural OpenAPI v3 schema."""
    defs: dict[str, Any] = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            extra = {k: v for k, v in node.items() if k != "$ref"}
            node = {**target, **extra}
        return node

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        node = resolve(node)
        out: dict[str, Any] = {}
        if "anyOf" in node or "oneOf" in node:
            members = [resolve(m) for m in node.get("anyOf", node.get("oneOf", []))]
            nullable = any(m.get("type") == "null" for m in members)
            members = [m for m in members if m.get("type") != "null"]
            types = {m.get("type") for m in members}
            rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
            if len(members) == 1:
                out = convert({**members[0], **rest})
            elif types == {"integer", "string"}:
                out = {_INT_OR_STRING: True}
                for member in members:  # value checks apply only to values of their type
                    out.update({k: member[k] for k in _VALUE_KEYS if k in member})
            else:  # a mapping or a string/boolean: a free form the document's model checks
                out = {_FREE: True}
            if "description" in rest:
                out["description"] = rest["description"]
            if nullable:
                out["nullable"] = True
            return out
        for key, value in node.items():
            if key in _DROP:
                continue
            if key == "const":
                out["enum"] = [value]
            elif key == "properties":
                out["properties"] = {k: convert(v) for k, v in value.items()}
            elif key == "items":
                out["items"] = convert(value)
            elif key == "additionalProperties":
                if value is True:
                    out[_FREE] = True
                elif isinstance(value, dict):
                    out["additionalProperties"] = convert(value)
                # False: pruning drops unknown fields; kubectl's validation refuses them
            elif key == "type" and value == "null":
                out["nullable"] = True
            else:
                out[key] = copy.deepcopy(value)
        if (
            out.get("type") == "object"
            and "properties" not in out
            and ("additionalProperties" not in out)
        ):
            out[_FREE] = True
        if out.get("type") == "string":
            # Kubernetes 1.20's validator (go-openapi) takes "" for null and refuses it in a
            # field that is not nullable ("must be of type string: null"), so VM-Operator's
            # `cdrom: {image: ""}` (an empty drive) would never apply; an explicit null is
            # then refused by the document's own model (the operator reports it)
            out["nullable"] = True
        return out

    return convert(schema)


def _vm_schema() -> dict[str, Any]:
    from corral.spec import document_json_schema

    doc = structural_schema(document_json_schema())
    return {
        "type": "object",
        "description": "A virtual machine run by corral in a runner pod.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": doc["properties"]["spec"],
            "status": {
                "type": "object",
                "description": "Written by the VM's runner and the operator.",
                _FREE: True,
            },
        },
    }


def printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "CPUs", "type": "integer", "jsonPath": ".status.cpus"},
        {"name": "RAM", "type": "string", "jsonPath": ".status.ram"},
        {"name": "Node", "type": "string", "jsonPath": ".status.node"},
        {"name": "IP", "type": "string", "jsonPath": ".status.ips[0]"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def crd_manifest(group: str = "corral.dev") -> dict[str, Any]:
    """The ``apiextensions.k8s.io/v1`` CRD serving ``VirtualMachine`` in ``group``."""
    names = names_for(group)
    schema = _vm_schema()
    problems = structural_issues(schema)
    if problems:  # a model change the converter does not cover: fail here, not in the cluster
        raise SpecError("the generated CRD schema is not structural: " + "; ".join(problems))
    spec_names: dict[str, Any] = {
        "kind": names.kind,
        "listKind": f"{names.kind}List",
        "plural": names.plural,
        "singular": names.singular,
    }
    if names.short:
        spec_names["shortNames"] = list(names.short)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": names.crd_name,
            "labels": {"app.kubernetes.io/part-of": "corral"},
        },
        "spec": {
            "group": names.group,
            "scope": "Namespaced",
            "names": spec_names,
            "versions": [
                {
                    "name": names.version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(),
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


_ALLOWED = {
    "type", "format", "description", "properties", "additionalProperties", "items", "required",
    "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "nullable", _FREE, _INT_OR_STRING,
}  # fmt: skip
_TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def structural_issues(schema: dict[str, Any], path: str = "") -> list[str]:
    """What makes ``schema`` non-structural (empty: it is structural), as the API server
    checks it (apiextensions v1): every node typed unless int-or-string or free, no
    ``$ref``/``anyOf``/``oneOf``/``allOf``/``not``/``const``, ``properties`` and
    ``additionalProperties`` never together, only keywords the 1.20 API server knows."""
    where = path or "<root>"
    issues: list[str] = []
    for key in schema:
        if key not in _ALLOWED:
            issues.append(f"{where}: {key} is not allowed")
    kind = schema.get("type")
    if kind is None and not (schema.get(_FREE) or schema.get(_INT_OR_STRING)):
        issues.append(f"{where}: no type")
    elif kind is not None and kind not in _TYPES:
        issues.append(f"{where}: unknown type {kind!r}")
    if schema.get(_INT_OR_STRING) and kind is not None:
        issues.append(f"{where}: int-or-string with a type")
    if "properties" in schema and "additionalProperties" in schema:
        issues.append(f"{where}: properties and additionalProperties together")
    if ("properties" in schema or "additionalProperties" in schema) and kind != "object":
        issues.append(f"{where}: properties on a non-object")
    if "items" in schema and kind != "array":
        issues.append(f"{where}: items on a non-array")
    if kind == "array" and "items" not in schema:
        issues.append(f"{where}: an array without items")
    for name, sub in schema.get("properties", {}).items():
        issues += structural_issues(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        issues += structural_issues(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), dict):
        issues += structural_issues(schema["items"], f"{path}[]")
    return issues
