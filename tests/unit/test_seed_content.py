"""What goes into the cloud-init NoCloud seed (pure: no image is built here)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from corral.host.seed import default_instance_id, seed_digest, seed_files
from corral.spec.models import CloudInit


def _ci(**fields: Any) -> CloudInit:
    return CloudInit.model_validate(fields)


def _meta(ci: CloudInit, name: str = "vm1") -> dict[str, Any]:
    loaded = yaml.safe_load(seed_files(ci, name)["meta-data"])
    assert isinstance(loaded, dict)
    return loaded


def test_meta_data_defaults() -> None:
    meta = _meta(_ci(userData={"packages": ["curl"]}), "web-1")
    assert re.fullmatch(r"iid-[0-9a-f]{16}", meta["instance-id"])
    assert meta["local-hostname"] == "web-1"


def test_meta_data_user_values_win_and_extras_are_kept() -> None:
    ci = _ci(metaData={"instance-id": "mine", "local-hostname": "other", "region": "x"})
    assert _meta(ci) == {"instance-id": "mine", "local-hostname": "other", "region": "x"}


def test_instance_id_is_stable_for_the_same_content() -> None:
    one = _ci(userData={"users": [{"name": "a"}]}, networkConfig={"version": 2})
    two = _ci(userData={"users": [{"name": "a"}]}, networkConfig={"version": 2})
    assert default_instance_id(one, "vm1") == default_instance_id(two, "vm1")
    assert seed_files(one, "vm1") == seed_files(two, "vm1")


@pytest.mark.parametrize(
    "changed",
    [
        {"userData": {"users": [{"name": "b"}]}},
        {"userData": {"users": [{"name": "a"}]}, "metaData": {"zone": "z"}},
        {"userData": {"users": [{"name": "a"}]}, "networkConfig": {"version": 1}},
        {"userData": "#!/bin/sh\necho hi\n"},
    ],
)
def test_instance_id_changes_with_content(changed: dict[str, Any]) -> None:
    base = _ci(userData={"users": [{"name": "a"}]})
    assert default_instance_id(base, "vm1") != default_instance_id(_ci(**changed), "vm1")


def test_instance_id_differs_between_vms() -> None:
    ci = _ci(userData={"packages": ["curl"]})
    assert default_instance_id(ci, "vm1") != default_instance_id(ci, "vm2")


def test_user_data_mapping_becomes_cloud_config() -> None:
    data = {"users": [{"name": "ann", "groups": ["sudo"]}], "packages": ["curl", "jq"]}
    text = seed_files(_ci(userData=data), "vm1")["user-data"].decode()
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text) == data


def test_user_data_long_and_unicode_strings_stay_on_one_line() -> None:
    key = "ssh-ed25519 " + "A" * 300 + " ann@example"
    data = {"ssh_authorized_keys": [key], "final_message": "grüße ✓"}
    text = seed_files(_ci(userData=data), "vm1")["user-data"].decode()
    assert any(line.endswith(key) for line in text.splitlines())
    assert "grüße ✓" in text
    assert yaml.safe_load(text) == data


@pytest.mark.parametrize(
    "text",
    [
        "#!/bin/sh\necho hello\n",
        "#cloud-config\npackages: [curl]\n",
        "#include\nhttps://example.com/config\n",
        "## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n",
        'Content-Type: multipart/mixed; boundary="b"\nMIME-Version: 1.0\n\n--b--\n',
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b--\n',
    ],
)
def test_user_data_string_with_a_known_header_is_kept(text: str) -> None:
    assert seed_files(_ci(userData=text), "vm1")["user-data"] == text.encode()


def test_user_data_string_without_header_is_taken_for_cloud_config() -> None:
    out = seed_files(_ci(userData="packages: [curl]\n"), "vm1")["user-data"].decode()
    assert out == "#cloud-config\npackages: [curl]\n"
    assert yaml.safe_load(out) == {"packages": ["curl"]}


def test_no_user_data_is_an_empty_cloud_config() -> None:
    files = seed_files(_ci(), "vm1")
    assert files["user-data"] == b"#cloud-config\n"
    assert yaml.safe_load(files["user-data"]) is None


def test_network_config_only_when_given() -> None:
    assert set(seed_files(_ci(userData={"a": 1}), "vm1")) == {"meta-data", "user-data"}
    net = {"version": 2, "ethernets": {"eth0": {"dhcp4": True}}}
    files = seed_files(_ci(networkConfig=net), "vm1")
    assert set(files) == {"meta-data", "user-data", "network-config"}
    assert yaml.safe_load(files["network-config"]) == net


def test_seed_digest_follows_content() -> None:
    one = seed_files(_ci(userData={"a": 1}), "vm1")
    assert seed_digest(one) == seed_digest(dict(reversed(list(one.items()))))
    assert seed_digest(one) != seed_digest(seed_files(_ci(userData={"a": 2}), "vm1"))
    assert seed_digest({"a": b"bc"}) != seed_digest({"ab": b"c"})
