"""Property tests: no value in a document can add a qemu argument or option.

For arbitrary strings (commas, '=', quotes, newlines, YAML and Jinja syntax, unicode...) in
every free-text field that reaches the argv, the rendered argv must have exactly the shape of
the argv rendered with harmless values: same number of arguments, and in every option string
the same keys in the same order, as qemu itself would split it. And each value must arrive
intact, so qemu opens exactly the file the user named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.qemu.argv import FirmwareFiles, RenderContext, render_argv
from corral.qemu.options import split_options
from corral.runner.config import RunnerPaths
from corral.spec import parse_document

TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() != "")
NASTY = st.one_of(
    TEXT,
    st.sampled_from(
        [
            "a,b",
            "x,,y",
            ",",
            "/img,readonly=off",
            "/img,file.driver=nbd,file.host=evil",
            "{{ 7*7 }}",
            "@@corral:0@@",
            '"]\n- -evil',
            "- -device\n- foo",
            "#comment",
            "a\nb",
            "key=value",
            "-hda",
        ]
    ),
)


def _doc(values: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": "inj"},
        "spec": {
            "vm": {
                "firmware": "bios",
                "maximumCpus": 1,
                "maximumRam": "256Mi",
                "kernel": "/k/" + values["kernel"],
                "initrd": "/i/" + values["initrd"],
                "cmdline": values["cmdline"],
                "disks": [
                    {"file": {"path": "/d/" + values["disk"]}},
                    {"cdrom": {"image": "/c/" + values["cdrom"]}},
                    {"device": {"path": "/dev/" + values["device"], "interface": "scsi"}},
                ],
                "networks": [
                    {"vde": {"socket": "/s/" + values["vde"]}},
                    {"bridge": {"name": "br0"}},
                ],
            }
        },
    }


def _render(
    values: dict[str, str], data_dir: str = "/data", runtime_dir: str = "/run"
) -> list[str]:
    doc = parse_document(_doc(values))
    ctx = RenderContext(
        files=RunnerPaths.placed(Path(data_dir), Path(runtime_dir)),
        accelerator="tcg",
        firmware=FirmwareFiles("/fw/code.fd", data_dir + "/vars.fd"),
    )
    return render_argv(doc, ctx)


FIELDS = ("kernel", "initrd", "cmdline", "disk", "cdrom", "device", "vde")
BENIGN = dict.fromkeys(FIELDS, "x")


RAW_FLAGS = ("-append", "-kernel", "-initrd", "-pidfile", "-uuid")


def _shape(argv: list[str]) -> list[object]:
    """Each argument as qemu sees it: an option string's keys, or just 'arg' for a raw one."""
    shape: list[object] = []
    for i, arg in enumerate(argv):
        parts = split_options(arg)
        if i and argv[i - 1] in RAW_FLAGS:
            shape.append("arg")
        elif len(parts) > 1 or "=" in arg:
            shape.append([p.split("=", 1)[0] for p in parts])
        else:
            shape.append("arg")
    return shape


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({f: NASTY for f in FIELDS}))
def test_no_value_changes_the_argv_shape(values: dict[str, str]) -> None:
    baseline = _render(BENIGN)
    argv = _render(values)
    assert len(argv) == len(baseline)
    for got, want in zip(argv, baseline, strict=True):
        if want.startswith("-") and "=" not in want:
            assert got == want, "an option flag moved: an argument was injected"
    # option strings keep their keys (qemu's own split), raw arguments stay raw
    assert _shape(argv) == _shape(baseline)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({f: NASTY for f in FIELDS}))
def test_values_arrive_intact(values: dict[str, str]) -> None:
    argv = _render(values)

    def option_values(key: str) -> list[str]:
        found = []
        for arg in argv:
            for part in split_options(arg):
                k, _, v = part.partition("=")
                if k == key:
                    found.append(v)
        return found

    assert argv[argv.index("-kernel") + 1] == "/k/" + values["kernel"]
    assert argv[argv.index("-initrd") + 1] == "/i/" + values["initrd"]
    assert argv[argv.index("-append") + 1] == values["cmdline"]
    filenames = option_values("filename")
    for expected in ("/d/" + values["disk"], "/c/" + values["cdrom"], "/dev/" + values["device"]):
        assert expected in filenames
    assert option_values("sock") == ["/s/" + values["vde"]]
    assert option_values("helper") == ["/usr/lib/qemu/qemu-bridge-helper"]


@settings(max_examples=100, deadline=None)
@given(NASTY, NASTY)
def test_host_dirs_cannot_inject_either(data_dir: str, runtime_dir: str) -> None:
    baseline = _shape(_render(BENIGN))
    assert _shape(_render(BENIGN, "/" + data_dir, "/" + runtime_dir)) == baseline
