"""Byte sizes as users write them: ``parse_size``, ``format_size`` and the ``ByteSize`` type.

The unit table is the module's documented contract: a bare letter (``K M G T``) and the IEC
forms (``Ki``/``KiB``) are binary, as in qemu's ``-m 2G``; the SI forms with a ``B``
(``KB MB GB TB``) are decimal. So ``2G`` is 2 GiB and ``2GB`` is 2*10^9 bytes. Units are
case-sensitive and follow the number; near misses (``Mb``, ``4 GB``) are refused with both
readings spelled out.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from corral.spec import ByteSize, format_size, parse_document, parse_size

KI, MI, GI, TI = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512Mi", 512 * MI),
        ("4Gi", 4 * GI),
        ("1073741824", GI),
        ("0", 0),
        ("1K", KI),
        ("1Ki", KI),
        ("1KiB", KI),
        ("3M", 3 * MI),
        ("3MiB", 3 * MI),
        ("2G", 2 * GI),
        ("2GiB", 2 * GI),
        ("1T", TI),
        ("1Ti", TI),
        ("1TiB", TI),
        ("1KB", 1000),
        ("1kB", 1000),
        ("5MB", 5 * 10**6),
        ("2GB", 2 * 10**9),
        ("1TB", 10**12),
        ("7B", 7),
        ("1.5Gi", 3 * GI // 2),
        ("0.5K", 512),
        ("1.0", 1),
        (" 512Mi ", 512 * MI),
        ("\t4Gi\n", 4 * GI),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_bare_letter_is_binary_and_b_suffix_is_decimal() -> None:
    assert parse_size("2G") == 2 * 1024**3 == 2_147_483_648
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("2G") != parse_size("2GB")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (1, 1), (1073741824, GI), (1024.0, 1024), (0.0, 0)],
)
def test_parse_size_accepts_numbers(value: int | float, expected: int) -> None:
    result = parse_size(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, "cannot be negative"),
        (-1.0, "whole, non-negative"),
        ("-1Gi", "is not a size"),
        ("-512", "is not a size"),
        ("12Q", "unknown unit 'Q'"),
        ("4Gx", "unknown unit 'Gx'"),
        ("1PB", "unknown unit 'PB'"),
        ("", "is not a size"),
        ("   ", "is not a size"),
        ("Gi", "is not a size"),
        ("abc", "is not a size"),
        (".5Gi", "is not a size"),
        ("1.5.5", "is not a size"),
        ("1e9", "is not a size"),
        ("1,5Gi", "is not a size"),
        ("4 G i", "is not a size"),
        ("4 GB", "write '4Gi' (binary"),
        ("4Mb", "'Mb' reads as bits"),
        ("4mb", "write '4Mi' (binary"),
        ("1kib", "write '1Ki' (binary"),
        ("4gib", "'gib' is not a unit (they are case-sensitive)"),
        ("4k", "or '4KB' (decimal, 1000 bytes)"),
        ("nan", "is not a size"),
        ("inf", "is not a size"),
        ("1.3K", "not a whole number of bytes"),
        ("0.1", "not a whole number of bytes"),
        (1.5, "whole, non-negative"),
        (float("nan"), "whole, non-negative"),
        (float("inf"), "whole, non-negative"),
        (True, "not a bool"),
        (False, "not a bool"),
        (None, "not None"),
        ([1], "not [1]"),
        ({"size": 1}, "a size must be a string"),
    ],
)
def test_parse_size_refuses_with_a_reason(value: object, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert reason in str(info.value)


def test_unknown_unit_message_lists_the_valid_units() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("12Q")
    message = str(info.value)
    assert "'12Q'" in message
    for unit in ("Ki/Mi/Gi/Ti", "K/M/G/T", "KB/MB/GB/TB"):
        assert unit in message


def test_malformed_size_message_gives_examples() -> None:
    with pytest.raises(ValueError, match=r"'' is not a size \(examples: 512Mi, 4Gi"):
        parse_size("")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1, "1"),
        (KI, "1Ki"),
        (1536, "1536"),
        (MI, "1Mi"),
        (1536 * MI, "1536Mi"),
        (GI, "1Gi"),
        (4 * GI, "4Gi"),
        (3 * TI, "3Ti"),
        (1000, "1KB"),
        (2 * 10**9, "2GB"),
        (256 * 10**6, "256MB"),
        (1024000, "1000Ki"),
    ],
)
def test_format_size_is_the_shortest_exact_form(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=2**62))
def test_format_then_parse_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["", "B", "K", "Ki", "KiB", "KB", "M", "Mi", "MB", "G", "Gi", "GB"]),
)
def test_integer_with_any_unit_is_number_times_factor(number: int, unit: str) -> None:
    factor = {
        "": 1,
        "B": 1,
        "K": KI,
        "Ki": KI,
        "KiB": KI,
        "KB": 1000,
        "M": MI,
        "Mi": MI,
        "MB": 10**6,
        "G": GI,
        "Gi": GI,
        "GB": 10**9,
    }[unit]
    assert parse_size(f"{number}{unit}") == number * factor
    assert format_size(parse_size(f"{number}{unit}")) == format_size(number * factor)


@pytest.mark.parametrize("text", ["256MB", "4Gi", "20GB", "512Mi", "1TB", "3Ti", "1536", "7KB"])
def test_what_the_user_wrote_comes_back(text: str) -> None:
    """``256MB`` used to come back as ``250000Ki``: a size is shown in its own family."""
    assert format_size(parse_size(text)) == text


@pytest.mark.parametrize("text", ["4 GB", "4Mb", "4mb", "2gb", "1gib", "4 Gi"])
def test_ambiguous_spellings_are_refused_in_a_document(text: str) -> None:
    from corral.errors import SpecError

    doc = {"metadata": {"name": "x"}, "spec": {"vm": {"maximumRam": text}}}
    with pytest.raises(SpecError) as info:
        parse_document(doc)
    (issue,) = info.value.issues
    assert issue.loc == "spec.vm.maximumRam"
    assert "(binary" in issue.reason and "(decimal" in issue.reason


def test_memory_that_is_not_whole_mib_says_what_to_write() -> None:
    from corral.errors import SpecError

    doc = {"metadata": {"name": "x"}, "spec": {"vm": {"maximumRam": "2GB"}}}
    with pytest.raises(SpecError, match=r"whole number of MiB.*2GB is 1907.35Mi.*1907Mi or 2Gi"):
        parse_document(doc)


class _Sized(BaseModel):
    size: ByteSize
    limit: ByteSize | None = None


def test_bytesize_in_a_model_parses_and_serializes() -> None:
    model = _Sized.model_validate({"size": "4Gi", "limit": 1024})
    assert model.size == 4 * GI
    assert isinstance(model.size, int)
    assert model.limit == 1024
    assert model.model_dump() == {"size": 4 * GI, "limit": 1024}
    assert model.model_dump(mode="json") == {"size": "4Gi", "limit": "1Ki"}
    assert _Sized.model_validate_json(model.model_dump_json()) == model


def test_bytesize_in_a_model_reports_the_reason() -> None:
    with pytest.raises(ValidationError) as info:
        _Sized.model_validate({"size": "12Q"})
    errors = info.value.errors()
    assert len(errors) == 1
    assert errors[0]["loc"] == ("size",)
    assert "unknown unit 'Q'" in errors[0]["msg"]


def test_bytesize_json_schema_accepts_integers_and_size_strings() -> None:
    schema = _Sized.model_json_schema()["properties"]["size"]
    kinds = {entry["type"] for entry in schema["anyOf"]}
    assert kinds == {"integer", "string"}
    assert "512Mi" in schema["description"]


def test_sizes_in_the_vm_document() -> None:
    doc = parse_document(
        {
            "metadata": {"name": "sized"},
            "spec": {
                "vm": {
                    "maximumRam": "4Gi",
                    "currentRam": "512Mi",
                    "disks": [{"file": {"path": "/d.qcow2", "size": "20G"}}],
                }
            },
        }
    )
    assert doc.vm.maximum_ram == 4 * GI
    assert doc.vm.current_ram == 512 * MI
    disk = doc.vm.disks[0].file
    assert disk is not None
    assert disk.size == 20 * GI
    dumped = doc.model_dump(mode="json", by_alias=True)
    assert dumped["spec"]["vm"]["maximumRam"] == "4Gi"
    assert dumped["spec"]["vm"]["currentRam"] == "512Mi"
