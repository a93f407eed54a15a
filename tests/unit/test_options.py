"""qemu's comma-separated option strings: escaping, building, and splitting like qemu does."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.qemu.options import escape, qopts, split_options

# Any text argv can carry: everything but NUL (and lone surrogates, which cannot be encoded).
ARGV_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
    max_size=40,
)
COMMA_HEAVY = st.text(alphabet=st.sampled_from([",", "=", "a", " ", "\n", "\\", '"']), max_size=20)
VALUES = st.one_of(ARGV_TEXT, COMMA_HEAVY)
KEYS = st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True)


# --- escape --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("", ""),
        ("plain", "plain"),
        ("/vm/a,b", "/vm/a,,b"),
        (",", ",,"),
        (",,", ",,,,"),
        ("/x,readonly=off", "/x,,readonly=off"),
        ("a=b", "a=b"),
        ("ünï cödé\n", "ünï cödé\n"),
    ],
)
def test_escape_doubles_commas(value: str, escaped: str) -> None:
    assert escape(value) == escaped


def test_escape_refuses_nul() -> None:
    with pytest.raises(ValueError, match="cannot contain NUL"):
        escape("a\x00b")


# --- qopts ---------------------------------------------------------------------------------


def test_qopts_head_and_keywords() -> None:
    assert qopts("virtio-blk-pci", drive="d0", bootindex=None) == "virtio-blk-pci,drive=d0"
    assert qopts("virtio-blk-pci", drive="d0", bootindex=2) == (
        "virtio-blk-pci,drive=d0,bootindex=2"
    )


def test_qopts_without_head() -> None:
    assert qopts(None, {"driver": "file", "filename": "/a"}) == "driver=file,filename=/a"
    assert qopts(id="x") == "id=x"
    assert qopts() == ""


def test_qopts_booleans_become_on_off() -> None:
    assert qopts("spice", {"disable-ticketing": False, "seamless-migration": True}) == (
        "spice,disable-ticketing=off,seamless-migration=on"
    )


def test_qopts_integers_are_written_as_is() -> None:
    assert qopts(None, {"size": 268435456, "zero": 0, "neg": -1}) == (
        "size=268435456,zero=0,neg=-1"
    )


def test_qopts_none_leaves_the_option_out() -> None:
    assert qopts("x", {"a": None, "b": "1", "c": None}) == "x,b=1"
    assert qopts(None, {"a": None}) == ""


def test_qopts_mapping_keeps_order_and_kwargs_come_last() -> None:
    assert qopts("dev", {"z": 1, "a": 2}, m=3, b=4) == "dev,z=1,a=2,m=3,b=4"


def test_qopts_pairs_allow_repeated_and_dotted_keys() -> None:
    pairs = [
        ("id", "net0"),
        ("hostfwd", "tcp:127.0.0.1:2222-:22"),
        ("hostfwd", "udp:0.0.0.0:5353-:53"),
        ("cache.direct", True),
    ]
    text = qopts("user", pairs)
    assert text == (
        "user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:0.0.0.0:5353-:53,cache.direct=on"
    )
    assert split_options(text)[2:4] == [
        "hostfwd=tcp:127.0.0.1:2222-:22",
        "hostfwd=udp:0.0.0.0:5353-:53",
    ]


def test_qopts_escapes_values_and_head() -> None:
    text = qopts("file,x", {"filename": "/vm/a,b", "serial": ",readonly=on"})
    assert text == "file,,x,filename=/vm/a,,b,serial=,,readonly=on"
    assert split_options(text) == ["file,x", "filename=/vm/a,b", "serial=,readonly=on"]


def test_qopts_empty_string_value_is_kept() -> None:
    assert qopts(None, {"password-secret": ""}) == "password-secret="


@pytest.mark.parametrize("key", ["", "a,b", "a=b", "a\x00"])
def test_qopts_refuses_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match="invalid qemu option key"):
        qopts("x", {key: "v"})


def test_qopts_refuses_equals_in_the_head() -> None:
    with pytest.raises(ValueError, match="cannot contain '='"):
        qopts("id=evil", {"a": 1})


def test_qopts_refuses_nul_in_values() -> None:
    with pytest.raises(ValueError, match="NUL"):
        qopts("x", {"filename": "/a\x00b"})
    with pytest.raises(ValueError, match="NUL"):
        qopts("x\x00")


# --- split_options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", [""]),
        ("a", ["a"]),
        ("a,b", ["a", "b"]),
        ("a,,b", ["a,b"]),
        ("a,,,b", ["a,", "b"]),
        ("a,,,,b", ["a,,b"]),
        ("a,", ["a", ""]),
        (",a", ["", "a"]),
        (",,", [","]),
        (",,,", [",", ""]),
        ("k=v,,w,x=y", ["k=v,w", "x=y"]),
    ],
)
def test_split_options_like_qemu(text: str, parts: list[str]) -> None:
    assert split_options(text) == parts


@given(VALUES)
def test_escaped_value_is_one_option(value: str) -> None:
    assert split_options(escape(value)) == [value]


@given(
    VALUES,
    st.lists(VALUES.filter(lambda s: s != "" and not s.startswith(",")), max_size=8),
)
def test_split_of_joined_escaped_values_round_trips(first: str, rest: list[str]) -> None:
    """After a separator, a part must not be empty or start with a comma: ``,`` + ``,,`` reads
    as an escaped comma and then a separator. That ambiguity is qemu's syntax; qopts avoids it
    because every part after the head starts with a key, and keys cannot hold a comma."""
    values = [first, *rest]
    assert split_options(",".join(escape(v) for v in values)) == values


@pytest.mark.parametrize(
    ("values", "seen"),
    [(["", "", ""], [","]), (["a", ","], ["a,", ""]), (["a", "", "b"], ["a,b"])],
)
def test_qemu_syntax_is_ambiguous_for_empty_or_comma_led_parts(
    values: list[str], seen: list[str]
) -> None:
    assert split_options(",".join(escape(v) for v in values)) == seen


@given(
    st.one_of(st.none(), VALUES.filter(lambda s: "=" not in s)),
    st.lists(st.tuples(KEYS, VALUES), max_size=8),
)
def test_split_of_qopts_round_trips(head: str | None, pairs: list[tuple[str, str]]) -> None:
    """For arbitrary values, qemu sees exactly the head and the key=value pairs given:
    no value can add, drop or rename an option."""
    text = qopts(head, pairs)
    expected = ([] if head is None else [head]) + [f"{k}={v}" for k, v in pairs]
    if not expected:
        assert text == ""
        return
    parts = split_options(text)
    assert parts == expected
    assert [p.partition("=")[0] for p in parts[(head is not None) :]] == [k for k, _ in pairs]


@given(st.lists(st.tuples(KEYS, st.one_of(st.none(), st.booleans(), st.integers(), VALUES))))
def test_qopts_keys_survive_any_value_types(
    pairs: list[tuple[str, str | int | bool | None]],
) -> None:
    text = qopts("head", pairs)
    parts = split_options(text)
    kept = [(k, v) for k, v in pairs if v is not None]
    assert parts[0] == "head"
    assert [p.partition("=")[0] for p in parts[1:]] == [k for k, _ in kept]
    for part, (_, value) in zip(parts[1:], kept, strict=True):
        got = part.partition("=")[2]
        if isinstance(value, bool):
            assert got == ("on" if value else "off")
        else:
            assert got == str(value)
