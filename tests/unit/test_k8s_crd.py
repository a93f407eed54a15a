"""The generated VirtualMachine CRD: structural, and VM-Operator's own resources validate
against it unchanged while bad fields are refused.

:func:`openapi_issues` checks an object against the CRD's schema the way the API server (and
kubectl's client-side validation, which refuses unknown fields) does for the keywords the
generated schema uses. The VM-Operator resources below are transcribed from its repository
(mnlipp/VM-Operator @76e81ff: ``example/local-path``, ``example/rook-ceph``, ``dev-example``,
the manager's ``test-resources/basic-vm.yaml`` and the controller page's sample), keeping every
field and value a user's file has.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from corral.cli.main import cli
from corral.errors import SpecError
from corral.k8s.crd import crd_manifest, structural_issues, structural_schema
from corral.spec import parse_document

_CLAIM_SELECTOR = {
    "storageClassName": "",
    "selector": {
        "matchLabels": {
            "app.kubernetes.io/name": "vmrunner",
            "app.kubernetes.io/instance": "test-vm",
            "vmrunner.jdrupes.org/disk": "system",
        }
    },
    "resources": {"requests": {"storage": "40Gi"}},
}


_DEMO_SIZES = {
    "maximumCpus": 4,
    "currentCpus": 2,
    "maximumRam": "8Gi",
    "currentRam": "4Gi",
    "networks": [{"user": {}}],
}


def _vm(namespace: str, vm: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vmoperator.jdrupes.org/v1",
        "kind": "VirtualMachine",
        "metadata": {"namespace": namespace, "name": "test-vm"},
        "spec": {**spec, "vm": vm},
    }


VMOPERATOR_EXAMPLES: dict[str, dict[str, Any]] = {
    "local-path": _vm(
        "vmop-demo",
        {
            **_DEMO_SIZES,
            "disks": [
                {"volumeClaimTemplate": {"metadata": {"name": "system"}, "spec": _CLAIM_SELECTOR}},
                {"cdrom": {"image": ""}},
            ],
            "display": {"spice": {"port": 5910}},
        },
    ),
    "rook-ceph": _vm(
        "vmop-demo",
        {
            **_DEMO_SIZES,
            "disks": [
                {
                    "volumeClaimTemplate": {
                        "metadata": {"name": "system"},
                        "spec": {
                            "storageClassName": "rook-ceph-block",
                            "resources": {"requests": {"storage": "40Gi"}},
                        },
                    }
                },
                {
                    "cdrom": {
                        "image": "https://download.fedoraproject.org/pub/fedora/linux/releases/"
                        "38/Workstation/x86_64/iso/Fedora-Workstation-Live-x86_64-38-1.6.iso"
                    }
                },
            ],
            "display": {"spice": {"port": 5910}},
        },
    ),
    "dev-example": _vm(
        "vmop-dev",
        {
            "bootMenu": True,
            "useTpm": True,
            "maximumRam": "8Gi",
            "currentRam": "4Gi",
            "maximumCpus": 4,
            "currentCpus": 4,
            "networks": [{"user": {}}],
            "disks": [
                {"volumeClaimTemplate": {"metadata": {"name": "system"}, "spec": _CLAIM_SELECTOR}},
                {"cdrom": {"image": ""}},
            ],
            "display": {"spice": {"port": 5810, "generateSecret": True}},
        },
        image={
            "source": "docker-registry.lan.mnl.de/vmoperator/org.jdrupes.vmoperator.runner."
            "qemu-alpine:test",
            "pullPolicy": "Always",
        },
        permissions=[{"user": "admin", "may": ["*"]}],
        resources={"requests": {"cpu": 1, "memory": "2Gi"}},
        runnerTemplate={"update": True},
        guestShutdownStops=True,
        cloudInit={},
        loadBalancerService={},
    ),
    "basic-vm": _vm(
        "vmop-test",
        {
            "maximumRam": "4Gi",
            "currentRam": "2Gi",
            "maximumCpus": 4,
            "currentCpus": 2,
            "powerdownTimeout": 1,
            "networks": [{"user": {}}],
            "disks": [
                {"cdrom": {"image": "https://test.com/test.iso"}, "bootindex": 0},
                {"cdrom": {"image": "image.iso"}},
                {
                    "volumeClaimTemplate": {
                        "metadata": {"name": "system", "annotations": {"use_as": "system-disk"}},
                        "spec": {
                            "storageClassName": "local-path",
                            "resources": {"requests": {"storage": "1Gi"}},
                        },
                    }
                },
                {
                    "volumeClaimTemplate": {
                        "spec": {
                            "storageClassName": "local-path",
                            "resources": {"requests": {"storage": "1Gi"}},
                        }
                    }
                },
            ],
            "display": {"outputs": 2, "spice": {"port": 5812, "usbRedirects": 2}},
        },
        image={
            "repository": "docker-registry.lan.mnl.de",
            "path": "vmoperator/this.will.never.start",
            "version": "0.0.0",
        },
        cloudInit={"metaData": {}},
        resources={"requests": {"cpu": 1, "memory": "2Gi"}},
        loadBalancerService={
            "labels": {"label2": "replaced", "label3": "added"},
            "annotations": {"anno1": "added"},
        },
    ),
}


# the controller page's sample is local-path's, started, with guestShutdownStops spelt out
VMOPERATOR_EXAMPLES["controller-page"] = _vm(
    "vmop-demo",
    {"state": "Running", **VMOPERATOR_EXAMPLES["local-path"]["spec"]["vm"]},
    guestShutdownStops=False,
)

# --- what the API server checks ---------------------------------------------------------

_JSON_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


def openapi_issues(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Why ``value`` does not validate against a structural schema (empty: it does)."""
    where = path or "<root>"
    if value is None or value == "":  # 1.20's go-openapi takes "" for null (measured)
        return [] if schema.get("nullable") else [f"{where}: must be of type string: null"]
    if schema.get("x-kubernetes-int-or-string") and (
        isinstance(value, bool) or not isinstance(value, int | str)
    ):
        return [f"{where}: must be an integer or a string"]
    kind = schema.get("type")
    if kind is not None:
        expected = _JSON_TYPES[kind]
        if not isinstance(value, expected) or (kind != "boolean" and isinstance(value, bool)):
            return [f"{where}: must be of type {kind}"]
    issues: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        issues.append(f"{where}: must be one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            issues.append(f"{where}: must match {schema['pattern']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            issues.append(f"{where}: longer than {schema['maxLength']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            issues.append(f"{where}: less than {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            issues.append(f"{where}: more than {schema['maximum']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                issues.append(f"{where}.{name}: required")
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = f"{path}.{key}"
            if not path and key == "metadata":  # the API server's own, not the CRD's
                continue
            if props is not None and key in props:
                issues += openapi_issues(props[key], item, sub)
            elif isinstance(extra, dict):
                issues += openapi_issues(extra, item, sub)
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                issues.append(f"{sub}: unknown field")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            issues += openapi_issues(schema["items"], item, f"{path}[{i}]")
    return issues


def _schema(group: str = "corral.dev") -> dict[str, Any]:
    version = crd_manifest(group)["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["corral.dev", "vmoperator.jdrupes.org"])
def test_crd_is_structural_and_names_the_resource(group: str) -> None:
    crd = crd_manifest(group)
    version = crd["spec"]["versions"][0]
    assert structural_issues(version["schema"]["openAPIV3Schema"]) == []
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["State", "CPUs", "RAM", "Node", "IP", "Age"]
    names = crd["spec"]["names"]
    assert names["kind"] == "VirtualMachine"
    assert crd["metadata"]["name"] == f"{names['plural']}.{group}"
    if group == "corral.dev":
        assert names["shortNames"] == ["vm"]
    else:  # VM-Operator's own names: its users' kubectl habits and RBAC keep working
        assert (names["plural"], names["singular"], version["name"]) == ("vms", "vm", "v1")
    text = yaml.safe_dump(crd)
    for forbidden in ("$ref", "anyOf", "oneOf", "const:", "$defs", "title:"):
        assert forbidden not in text


def test_structural_checker_catches_what_the_api_server_refuses() -> None:
    assert structural_issues({"properties": {}}) == [
        "<root>: no type",
        "<root>: properties on a non-object",
    ]
    assert ".a: anyOf is not allowed" in structural_issues(
        {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}], "type": "string"}}}
    )
    assert structural_issues({"type": "array"}) == ["<root>: an array without items"]
    bad = {"type": "object", "properties": {"x": {"type": "string"}}, "additionalProperties": {}}
    assert "<root>: properties and additionalProperties together" in structural_issues(bad)


def test_converter_maps_unions_nulls_and_free_forms() -> None:
    converted = structural_schema(
        {
            "$defs": {"Inner": {"type": "object", "properties": {"a": {"type": "integer"}}}},
            "type": "object",
            "properties": {
                "ref": {"anyOf": [{"$ref": "#/$defs/Inner"}, {"type": "null"}]},
                "size": {
                    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}],
                    "title": "Size",
                },
                "free": {
                    "anyOf": [{"type": "object", "additionalProperties": True}, {"type": "boolean"}]
                },
                "kind": {"const": "VirtualMachine", "type": "string"},
            },
        }
    )
    props = converted["properties"]
    assert props["ref"] == {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "nullable": True,
    }
    assert props["size"] == {"x-kubernetes-int-or-string": True, "minimum": 0}
    assert props["free"] == {"x-kubernetes-preserve-unknown-fields": True}
    assert props["kind"] == {"enum": ["VirtualMachine"], "type": "string", "nullable": True}


@pytest.mark.parametrize("example", sorted(VMOPERATOR_EXAMPLES))
def test_vmoperator_examples_validate_unchanged(example: str) -> None:
    resource = VMOPERATOR_EXAMPLES[example]
    assert openapi_issues(_schema("vmoperator.jdrupes.org"), resource) == []
    assert parse_document(resource).name == "test-vm"  # and the runner reads them as they are


def test_vmoperator_template_example_validates_once_rendered() -> None:
    """dev-example's test-vm.tpl.yaml, rendered for number 1 as its script does."""
    resource = VMOPERATOR_EXAMPLES["dev-example"] | {
        "metadata": {
            "namespace": "vmop-dev",
            "name": "test-vm01",
            "annotations": {"argocd.argoproj.io/sync-wave": "20"},
        }
    }
    resource["spec"] = dict(resource["spec"]) | {"pools": ["test-vms"]}
    resource["spec"]["vm"] = dict(resource["spec"]["vm"]) | {"display": {"spice": {"port": 5911}}}
    assert openapi_issues(_schema("vmoperator.jdrupes.org"), resource) == []


@pytest.mark.parametrize(
    ("vm_patch", "expected"),
    [
        ({"currentCpus": "lots"}, ".spec.vm.currentCpus: must be of type integer"),
        ({"currentCpus": 0}, ".spec.vm.currentCpus: less than 1"),
        ({"state": "Paused"}, ".spec.vm.state: must be one of ['Running', 'Stopped']"),
        ({"maximumRam": True}, ".spec.vm.maximumRam: must be an integer or a string"),
        ({"maximumRam": "8 gigs"}, ".spec.vm.maximumRam: must match"),
        ({"cpus": 2}, ".spec.vm.cpus: unknown field"),
        ({"disks": [{"cdrom": {}}]}, ".spec.vm.disks[0].cdrom.image: required"),
        ({"networks": [{"user": {"portForwards": [{"hostPort": 0, "guestPort": 22}]}}]},
         ".spec.vm.networks[0].user.portForwards[0].hostPort: less than 1"),
    ],
)  # fmt: skip
def test_bad_fields_are_refused(vm_patch: dict[str, Any], expected: str) -> None:
    resource = VMOPERATOR_EXAMPLES["local-path"]
    bad = {**resource, "spec": {"vm": {**resource["spec"]["vm"], **vm_patch}}}
    issues = openapi_issues(_schema(), bad)
    assert any(issue.startswith(expected) for issue in issues), issues


def test_free_forms_stay_free_where_the_document_allows_them() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    for name in ("image", "resources", "affinity", "runnerTemplate", "loadBalancerService"):
        assert spec[name].get("x-kubernetes-preserve-unknown-fields") is True, name
    claim = spec["vm"]["properties"]["disks"]["items"]["properties"]["volumeClaimTemplate"]
    assert claim["x-kubernetes-preserve-unknown-fields"] is True


def test_operator_crd_command_prints_the_crd() -> None:
    out = CliRunner().invoke(cli, ["operator", "crd", "--group", "vmoperator.jdrupes.org"])
    assert out.exit_code == 0, out.output
    crd = yaml.safe_load(out.output)
    assert crd["metadata"]["name"] == "vms.vmoperator.jdrupes.org"
    bad = CliRunner().invoke(cli, ["operator", "crd", "--group", "example.com"])
    assert bad.exit_code == 2 and "example.com" in bad.output


def test_unknown_group_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"example\.com"):
        crd_manifest("example.com")
