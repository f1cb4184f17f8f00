"""The stored envelope: round trips, and every damaged byte detected."""

from __future__ import annotations

import math
import zlib
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perdure.log import (
    CorruptRecordError,
    LogError,
    NewRecord,
    Record,
    UnknownRecordTypeError,
    UnknownRecordVersionError,
)
from perdure.log.codec import (
    CRC_RESIDUE,
    check_stream_name,
    decode_all,
    decode_record,
    encode_entry,
    encode_record,
    encode_records,
    make_record,
    normalize_meta,
    seal,
    unseal,
)

# Values CBOR carries and hands back equal (NaN is not equal to itself, so it is left
# out; tuples come back as lists, so only lists are generated).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
payloads = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
type_names = st.text(min_size=1, max_size=40)
versions = st.integers(min_value=1, max_value=2**40)
timestamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)


def same(a: Any, b: Any) -> bool:
    """Equality that also holds for -0.0 vs 0.0 and is exact for floats."""
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1, a) == math.copysign(1, b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=200)
@given(rtype=type_names, version=versions, timestamp=timestamps, payload=payloads)
def test_record_round_trips(rtype: str, version: int, timestamp: float, payload: Any) -> None:
    value = encode_record(rtype, version, timestamp, payload)
    record = decode_record({rtype: version}, "s", 7, value)
    assert (record.stream, record.seq, record.type, record.version) == ("s", 7, rtype, version)
    assert record.timestamp == timestamp
    assert same(record.payload, payload)
    # The hand-written envelope is the generic sealed CBOR array.
    assert same(unseal(value, 4), [rtype, version, timestamp, payload])


@settings(max_examples=300)
@given(payload=payloads, data=st.data())
def test_any_damaged_byte_is_detected(payload: Any, data: st.DataObject) -> None:
    value = encode_record("t", 1, 1_700_000_000.5, payload)
    position = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
    flip = data.draw(st.integers(min_value=1, max_value=255))
    damaged = bytearray(value)
    damaged[position] ^= flip
    with pytest.raises(CorruptRecordError) as caught:
        decode_record({"t": 1}, "stream/x", 42, bytes(damaged))
    assert (caught.value.stream, caught.value.seq) == ("stream/x", 42)
    assert "checksum" in caught.value.detail


@settings(max_examples=100)
@given(payload=payloads, data=st.data())
def test_truncated_or_extended_values_are_detected(payload: Any, data: st.DataObject) -> None:
    value = encode_record("t", 1, 1.0, payload)
    cut = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
    with pytest.raises(CorruptRecordError):
        decode_record({"t": 1}, "s", 1, value[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(CorruptRecordError):
        decode_record({"t": 1}, "s", 1, value + extra)


def test_checksum_residue_is_the_crc32_constant() -> None:
    import zlib

    value = seal(["anything", 1, [2, 3]])
    assert zlib.crc32(value) == CRC_RESIDUE
    assert unseal(value, 3) == ["anything", 1, [2, 3]]


def test_a_valid_checksum_over_a_wrong_shape_is_corrupt() -> None:
    for items in (["t", 1, 1.0], ["t", "1", 1.0, {}], ["t", 0, 1.0, {}], [1, 1, 1.0, {}]):
        with pytest.raises(CorruptRecordError) as caught:
            decode_record({"t": 1}, "s", 3, seal(list(items)))
        assert caught.value.seq == 3


def test_unknown_type_and_newer_version_are_named() -> None:
    value = encode_record("future.thing", 3, 1.0, {})
    with pytest.raises(UnknownRecordTypeError) as unknown:
        decode_record({"other": 1}, "s", 9, value)
    assert (unknown.value.stream, unknown.value.seq, unknown.value.type) == (
        "s",
        9,
        "future.thing",
    )
    with pytest.raises(UnknownRecordVersionError) as newer:
        decode_record({"future.thing": 2}, "s", 9, value)
    assert (newer.value.version, newer.value.known) == (3, 2)
    # Older versions pass through with their version, for the reader to upcast.
    record = decode_record({"future.thing": 5}, "s", 9, value)
    assert record.version == 3


@given(
    sid=st.integers(min_value=0, max_value=2**32 - 1),
    last=st.integers(min_value=0, max_value=2**63),
    created=timestamps,
    updated=timestamps,
    meta=st.dictionaries(st.text(max_size=10), payloads, max_size=4),
)
def test_index_entries_round_trip(
    sid: int, last: int, created: float, updated: float, meta: dict[str, Any]
) -> None:
    entry = encode_entry(sid, last, created, updated, cbor2.dumps(meta))
    decoded = unseal(entry, 5)
    assert decoded[:4] == [sid, last, created, updated]
    assert same(decoded[4], meta)


def test_make_record_equals_the_constructor() -> None:
    made = make_record("s", 1, "t", 2, 3.5, {"a": [1]})
    assert made == Record("s", 1, "t", 2, 3.5, {"a": [1]})
    assert type(made) is Record
    assert (made.stream, made.seq, made.type, made.payload) == ("s", 1, "t", {"a": [1]})
    with pytest.raises(AttributeError):
        made.seq = 2  # type: ignore[misc]


def test_encode_records_refuses_what_it_could_not_read() -> None:
    known = {"t": 2}
    assert len(encode_records(known, "s", [NewRecord("t", 1), NewRecord("t", 2, 2)], 1.0)) == 2
    for bad in (NewRecord("u", 1), NewRecord("t", 1, 3), NewRecord("t", 1, 0)):
        with pytest.raises(LogError):
            encode_records(known, "s", [bad], 1.0)


@given(st.text(min_size=1, max_size=200))
def test_stream_names_up_to_400_utf8_bytes(name: str) -> None:
    encoded = name.encode("utf-8", "surrogatepass")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(LogError):
            check_stream_name(name)
        return
    if len(encoded) <= 400:
        assert check_stream_name(name) == encoded
    else:
        with pytest.raises(LogError, match="400"):
            check_stream_name(name)


def _outcome(known: dict[str, int], seq: int, value: bytes) -> tuple[str, Any]:
    try:
        return ("ok", decode_record(known, "s", seq, value))
    except LogError as exc:
        return ("error", (type(exc), str(exc)))


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["t", "u", "gone"]),
            st.integers(min_value=1, max_value=3),
            timestamps,
            payloads,
            # a byte to damage (position, xor), or none
            st.none() | st.tuples(st.integers(min_value=0), st.integers(1, 255)),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(min_value=1, max_value=1000),
)
def test_decode_all_is_decode_record_on_each_value(items: list[Any], first_seq: int) -> None:
    """The replay fast path accepts and refuses exactly what decode_record does.

    A chunk decodes to the records before its first bad value, and that value's error is
    the one decode_record raises for it (same type, same message naming stream and seq).
    """
    known = {"t": 1, "u": 2}
    values = []
    for rtype, version, ts, payload, damage in items:
        value = bytearray(seal([rtype, version, ts, payload]))
        if damage is not None:
            at, xor = damage
            value[at % len(value)] ^= xor
        values.append(bytes(value))
    _assert_decode_all_matches_decode_record(known, first_seq, values)


def _assert_decode_all_matches_decode_record(
    known: dict[str, int], first_seq: int, values: list[bytes]
) -> None:
    records, error = decode_all(known, "s", first_seq, values)
    expected: list[Record] = []
    expected_error = None
    for i, value in enumerate(values):
        kind, got = _outcome(known, first_seq + i, value)
        if kind == "error":
            expected_error = got
            break
        expected.append(got)
    assert len(records) == len(expected)
    for got, want in zip(records, expected, strict=True):
        assert (got.stream, got.seq, got.type, got.version) == (
            want.stream,
            want.seq,
            want.type,
            want.version,
        )
        assert same(got.timestamp, want.timestamp) and same(got.payload, want.payload)
    if expected_error is None:
        assert error is None
    else:
        assert error is not None and (type(error), str(error)) == expected_error


# Envelopes whose checksum is right but whose shape is not a record's: a writer with a
# bug could seal any of these. Each item is (what the envelope holds, its CBOR bytes).
odd_envelopes = st.sampled_from(
    [
        ["t", 1, 1.5, {}],  # a good one, for contrast
        ["u", 2, 1.5, [1]],
        ["t", True, 1.5, {}],  # bool equals 1 but is not a version
        ["t", 1.0, 1.5, {}],  # neither is a float
        ["t", 0, 1.5, {}],
        ["t", -1, 1.5, {}],
        ["u", 3, 1.5, {}],  # newer than the reader knows
        ["gone", 1, 1.5, {}],
        [1, 1, 1.5, {}],
        [["t"], 1, 1.5, {}],  # unhashable type
        [b"t", 1, 1.5, {}],
        ["t", 1, 2, {}],  # an int timestamp
        ["t", 1, None, {}],
        ["t", 1, 1.5],  # too short
        ["t", 1, 1.5, {}, 9],  # too long
    ]
)


@settings(max_examples=200)
@given(st.lists(odd_envelopes, min_size=1, max_size=6), st.integers(1, 1000), st.booleans())
def test_decode_all_refuses_sealed_envelopes_of_the_wrong_shape_as_decode_record_does(
    envelopes: list[list[Any]], first_seq: int, as_map: bool
) -> None:
    """The fast path's shortcuts on the envelope's shape never accept what decode_record
    refuses, even when the checksum (which proves only that the bytes are intact) is good.
    """
    values = [seal(list(items)) for items in envelopes]
    if as_map:  # a sealed map of five entries (not an array) in front of the rest
        values.insert(0, _sealed_map())
    _assert_decode_all_matches_decode_record({"t": 1, "u": 2}, first_seq, values)


def _sealed_map() -> bytes:
    """A value with a good checksum that decodes to a map, not an envelope array."""
    head = cbor2.dumps({"t": 1, 1: 2, 1.5: 3, "p": 4, "c": b"\x00\x00\x00\x00"})[:-4]
    return head + zlib.crc32(head).to_bytes(4, "little")


def test_meta_sequences_come_back_as_lists_and_plain_values_are_kept_as_given() -> None:
    # Tuples become lists, as a CBOR round trip would make them, but without one: the
    # writer caches the meta of every stream in use, and a round trip would give each entry
    # fresh copies of every key and string value (hundreds of bytes per execution).
    agent = "".join(["ag", "ent-name"])  # not interned: identity shows if it is copied
    meta = normalize_meta("s", {"agent": agent, "waiting_on": (), "confirmations": ("c-1",)})
    assert meta == {"agent": agent, "waiting_on": [], "confirmations": ["c-1"]}
    assert type(meta["waiting_on"]) is list and type(meta["confirmations"]) is list
    assert meta["agent"] is agent
    # Nested sequences still take the round trip: lists all the way down.
    assert normalize_meta("s", {"x": ((1, 2), [3])}) == {"x": [[1, 2], [3]]}
