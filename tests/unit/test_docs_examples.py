"""The YAML examples in the docs are real: every VM document validates, every policy loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from corral.manager import ManagerConfig
from corral.spec import HostPolicy, parse_document

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def _yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for md in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        for i, text in enumerate(_BLOCK.findall(md.read_text())):
            blocks.append((f"{md.name}#{i}", text))
    return blocks


BLOCKS = _yaml_blocks()


def test_docs_have_examples() -> None:
    names = {name.split("#")[0] for name, _ in BLOCKS}
    assert {"vm-document.md", "policy.md"} <= names


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_yaml_example_is_valid(where: str, text: str) -> None:
    data = yaml.safe_load(text)
    if isinstance(data, list):  # a users file (docs/api.md): the fields corral reads
        assert data, where
        for entry in data:
            assert set(entry) == {"name", "passwordHash", "roles"}, where
            assert str(entry["passwordHash"]).startswith("$2b$"), where
        return
    assert isinstance(data, dict), where
    if "containers" in data:  # a pod spec fragment (docs/runner-image.md): the image it runs
        assert all({"name", "image"} <= set(c) for c in data["containers"]), where
        return
    if set(data) == {"spec"} and "vm" not in data["spec"]:  # a fragment of a document's spec
        data = {"metadata": {"name": "fragment"}, "spec": {**data["spec"], "vm": {}}}
    if text.startswith("# manager config"):
        config = ManagerConfig.model_validate({**data, "stateDir": "/var/lib/corral"})
        assert config.workers >= 1
    elif "metadata" in data:
        doc = parse_document(data)
        assert doc.name == data["metadata"]["name"]
    else:
        policy = HostPolicy.model_validate(data)
        assert policy.image_paths, where


def test_demo_vm_document_is_valid() -> None:
    text = (ROOT / "examples/demo-vm.yaml").read_text().replace("@GUEST@", "/guest")
    doc = parse_document(yaml.safe_load(text))
    assert doc.vm.state == "Running"
    assert doc.vm.kernel == "/guest/vmlinuz"
