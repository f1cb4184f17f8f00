"""The stored envelope: how a record, a stream's index entry and a meta value become bytes.

A stored record value is one CBOR array of five items::

    [type, version, timestamp, payload, crc]

where ``crc`` is a 4-byte CBOR byte string holding the CRC-32 (``zlib.crc32``) of every
byte before it, little-endian. The stream and seq are not stored in the value: they are
the record's key. Appending the CRC little-endian gives CRC-32's residue property: the
CRC-32 of the *whole* value is the constant :data:`CRC_RESIDUE` exactly when the value
is intact, so a reader checks one CRC over the bytes it got, with no slicing, and the
whole value stays valid CBOR that any CBOR tool can read. CRC-32 detects every burst
error of up to 32 bits, so any flipped byte is caught.

Decoding checks the checksum first, then the envelope's shape, then the type and version
against the reader's :class:`~perdure.log.protocol.RecordTypes`. Nothing is skipped or
defaulted: each failure is a named error carrying the stream and seq.

Stream index entries (``[id, last_seq, created_at, updated_at, meta, crc]``) are sealed
the same way, so a corrupt index entry is detected too.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from itertools import repeat
from operator import itemgetter
from typing import Any, Final

import cbor2

from .errors import (
    CorruptRecordError,
    LogError,
    UnknownRecordTypeError,
    UnknownRecordVersionError,
)
from .protocol import Fault, NewRecord, Record

__all__ = [
    "CRC_RESIDUE",
    "MAX_INDEXED_FIELD_BYTES",
    "MAX_STREAM_NAME_BYTES",
    "check_after",
    "check_expect",
    "check_indexed_fields",
    "check_stream_name",
    "check_stream_names",
    "check_through",
    "decode_all",
    "decode_record",
    "encode_entry",
    "encode_record",
    "encode_records",
    "make_record",
    "meta_matches",
    "meta_value_key",
    "normalize_meta",
    "record_fault",
    "seal",
    "trim_beyond_error",
    "unseal",
    "where_conditions",
]

#: CRC-32 of any intact sealed value (the CRC-32 residue of the reflected polynomial).
CRC_RESIDUE: Final = 0x2144DF1C

#: Stream names are stored as LMDB keys (at most 511 bytes); 400 leaves room for the
#: secondary index's field and value prefix.
MAX_STREAM_NAME_BYTES: Final = 400

#: Indexed meta keys are part of secondary-index keys, so they are kept short.
MAX_INDEXED_FIELD_BYTES: Final = 64

# A CBOR byte string of length 4 (major type 2, length 4) followed by the placeholder
# the CRC replaces: encoding the array with this as its last item yields the final
# layout, so sealing is one dumps, one crc32 and one concatenation.
_CRC_PLACEHOLDER: Final = b"\x00\x00\x00\x00"

_dumps = cbor2.dumps
_loads = cbor2.loads
_crc32 = zlib.crc32


def seal(items: list[Any]) -> bytes:
    """Encode ``items`` as a CBOR array whose last item is the CRC of what precedes it."""
    items.append(_CRC_PLACEHOLDER)
    try:
        head = _dumps(items)[:-4]
    finally:
        items.pop()
    return head + _crc32(head).to_bytes(4, "little")


def unseal(value: bytes, size: int) -> list[Any]:
    """Check a sealed value's CRC and decode it into its ``size`` items (CRC dropped).

    Raises ``ValueError`` naming what is wrong: callers turn it into the error that
    names their stream and seq.
    """
    if _crc32(value) != CRC_RESIDUE:
        raise ValueError(f"checksum mismatch over {len(value)} stored bytes")
    try:
        items = _loads(value)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise ValueError(f"undecodable CBOR ({exc})") from None
    if type(items) is not list or len(items) != size + 1:
        raise ValueError(f"not a {size}-item envelope")
    items.pop()
    return items


# Records are built with tuple.__new__ directly (Record is a NamedTuple): its generated
# __new__ is a Python function, and this runs once per record on replay.
_tuple_new = tuple.__new__


def make_record(
    stream: str, seq: int, type: str, version: int, timestamp: float, payload: Any
) -> Record:
    """Build a :class:`Record` exactly as ``Record(...)`` would, but faster."""
    return _tuple_new(Record, (stream, seq, type, version, timestamp, payload))


# The envelope around the payload is written by hand: cbor2 spends about a microsecond
# on every container it encodes, and this runs once per record on the caller's thread.
# The bytes are the same CBOR a generic encoder would produce (timestamps as float64).
_f64 = struct.Struct(">d").pack
_CRC_HEAD: Final = b"\x44"  # a 4-byte CBOR byte string follows: the CRC


def _cbor_uint(n: int) -> bytes:
    """CBOR major type 0 (an unsigned integer), shortest form."""
    if n < 24:
        return bytes((n,))
    if n < 0x100:
        return b"\x18" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\x19" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x1a" + n.to_bytes(4, "big")
    return b"\x1b" + n.to_bytes(8, "big")


@lru_cache(maxsize=1024)
def _envelope_head(type: str, version: int) -> bytes:
    """``array(5)``, the type and the version: the same for every record of a type."""
    return b"\x85" + _dumps(type) + _cbor_uint(version)


def _sealed(head: bytes, body: bytes) -> bytes:
    crc = _crc32(_CRC_HEAD, _crc32(body, _crc32(head)))
    return b"".join((head, body, _CRC_HEAD, crc.to_bytes(4, "little")))


def encode_record(type: str, version: int, timestamp: float, payload: Any) -> bytes:
    """The stored value of one record (no stream or seq: those are its key).

    Equal to ``seal([type, version, float(timestamp), payload])``.
    """
    return _sealed(_envelope_head(type, version) + b"\xfb" + _f64(timestamp), _dumps(payload))


def encode_entry(
    sid: int, last_seq: int, created_at: float, updated_at: float, meta_cbor: bytes
) -> bytes:
    """A sealed stream index entry ``[id, last_seq, created_at, updated_at, meta]``.

    ``meta_cbor`` is the meta mapping already CBOR-encoded (stores keep it encoded so an
    append that does not change meta does not encode it again).
    """
    head = (
        b"\x86"
        + _cbor_uint(sid)
        + _cbor_uint(last_seq)
        + b"\xfb"
        + _f64(created_at)
        + b"\xfb"
        + _f64(updated_at)
    )
    return _sealed(head, meta_cbor)


def encode_records(
    known: Mapping[str, int], stream: str, records: Sequence[NewRecord], timestamp: float
) -> list[bytes]:
    """Validate and encode a batch about to be appended; runs on the caller's thread.

    Refuses a record whose type is not registered, or whose version is newer than the
    registered one: a program must not write what it cannot read back.
    """
    values = []
    for i, record in enumerate(records):
        if not isinstance(record, NewRecord):
            raise LogError(
                f"stream {stream!r}: item {i} of the batch is a {record.__class__.__name__}, "
                f"not a NewRecord; wrap it as NewRecord(type, payload, version)"
            )
        rtype = record.type
        version = record.version
        newest = known.get(rtype)
        if newest is None:
            raise LogError(
                f"stream {stream!r}: record {i} has type {rtype!r}, which this log's "
                f"RecordTypes does not know; register it before appending (a program must "
                f"not write what it cannot read back); nothing was written"
            )
        if type(version) is not int or version < 1 or version > newest:
            raise LogError(
                f"stream {stream!r}: record {i} of type {rtype!r} has schema version "
                f"{version!r}, but this log's RecordTypes reads versions 1..{newest}; "
                f"register the newer version first; nothing was written"
            )
        try:
            value = encode_record(rtype, version, timestamp, record.payload)
        except Exception as exc:  # cbor2 raises CBOREncodeError, TypeError, ValueError...
            raise LogError(
                f"stream {stream!r}: record {i} (type {rtype!r}) has a payload CBOR cannot "
                f"encode ({exc}); use dicts, lists, str, bytes, numbers, bools and None; "
                f"nothing was written"
            ) from exc
        if len(value) > _ALWAYS_READABLE_BYTES:
            _check_readable(stream, i, rtype, value)
        values.append(value)
    return values


#: cbor2 encodes containers nested to any depth but decodes at most 400 levels, so a
#: record could be written that no reader could read back. Every level costs at least
#: one byte, so a value this short cannot be too deep; longer ones are decoded once
#: before they are written (a few microseconds per KB, on records that are mostly a
#: model's answers).
_ALWAYS_READABLE_BYTES: Final = 400


def _check_readable(stream: str, i: int, rtype: str, value: bytes) -> None:
    try:
        _loads(value)
    except Exception as exc:
        raise LogError(
            f"stream {stream!r}: record {i} (type {rtype!r}) encodes, but could not be read "
            f"back ({exc}); make the payload flatter (the decoder reads at most 400 nested "
            f"containers); nothing was written"
        ) from exc


def decode_record(known: Mapping[str, int], stream: str, seq: int, value: bytes) -> Record:
    """Verify and decode one stored record value.

    Raises :class:`CorruptRecordError` (checksum or decoding),
    :class:`UnknownRecordTypeError` or :class:`UnknownRecordVersionError`, each naming
    ``stream`` and ``seq``.
    """
    # Inlined rather than calling unseal(): this is the replay hot path.
    if _crc32(value) != CRC_RESIDUE:
        raise CorruptRecordError(stream, seq, f"checksum mismatch over {len(value)} bytes")
    try:
        items = _loads(value)
    except Exception as exc:
        raise CorruptRecordError(stream, seq, f"undecodable CBOR ({exc})") from None
    if type(items) is not list or len(items) != 5:
        raise CorruptRecordError(stream, seq, "not a record envelope")
    rtype, version, timestamp, payload, _ = items
    if type(rtype) is not str or type(version) is not int or version < 1:
        raise CorruptRecordError(stream, seq, "malformed type or version in the envelope")
    if type(timestamp) is not float:
        raise CorruptRecordError(stream, seq, "malformed timestamp in the envelope")
    newest = known.get(rtype)
    if newest is None:
        raise UnknownRecordTypeError(stream, seq, rtype)
    if version > newest:
        raise UnknownRecordVersionError(stream, seq, rtype, version, newest)
    return make_record(stream, seq, rtype, version, timestamp, payload)


def decode_all(
    known: Mapping[str, int], stream: str, first_seq: int, values: list[bytes]
) -> tuple[list[Record], LogError | None]:
    """Decode a whole chunk: the records, and the error that stopped it (if any).

    The records are every one before the first bad value, so a reader can hand them out
    before raising the error that names the bad one. Each value is checked exactly as
    :func:`decode_record` checks it and fails with the same error; this is the same work
    with the per-record interpreter overhead taken out, for replay.
    """
    count = len(values)
    # The common case, a chunk of intact records, is checked and decoded a column at a
    # time: each map() below loops in C, which is a quarter of replay's cost per record
    # when written as one Python loop. Anything that does not fit falls through to the
    # per-value path, which names the first bad value.
    if count and list(map(_crc32, values)).count(CRC_RESIDUE) == count:
        try:
            # 0x85 opens a definite 5-item CBOR array, so everything that decodes from
            # these values is a list of five: that makes the transposition below exact.
            if set(map(_first_byte, values)) == _ARRAY_OF_FIVE:
                types, versions, stamps, payloads, _ = zip(*map(_loads, values), strict=True)
                # Exact types: neither True nor 1.0 may pass as version 1. known[rtype]
                # only finds a str (cbor2 decodes nothing else equal to one); KeyError
                # (unknown type) or TypeError (unhashable) means the per-value path.
                if (
                    set(map(type, versions)) == _INT
                    and set(map(type, stamps)) == _FLOAT
                    and all(0 < v <= known[t] for t, v in set(zip(types, versions, strict=True)))
                ):
                    rows = zip(
                        repeat(stream, count),
                        range(first_seq, first_seq + count),
                        types,
                        versions,
                        stamps,
                        payloads,
                        strict=True,
                    )
                    return list(map(_tuple_new, repeat(Record, count), rows)), None
        except Exception:  # the per-value path names what is wrong
            pass
    return _decode_each(known, stream, first_seq, values)


_first_byte = itemgetter(0)
_ARRAY_OF_FIVE: Final = {0x85}
_INT: Final = {int}
_FLOAT: Final = {float}


def _decode_each(
    known: Mapping[str, int], stream: str, first_seq: int, values: list[bytes]
) -> tuple[list[Record], LogError | None]:
    records: list[Record] = []
    seq = first_seq - 1
    for value in values:
        seq += 1
        try:
            records.append(decode_record(known, stream, seq, value))
        except LogError as error:
            return records, error
    return records, None


def check_stream_name(stream: object) -> bytes:
    """Validate a stream name and return its UTF-8 bytes (the storage key)."""
    if type(stream) is not str:
        raise LogError(f"stream names are str, got {stream.__class__.__name__} {stream!r}")
    try:
        encoded = stream.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LogError(f"stream name {stream!r} is not valid UTF-8 text ({exc})") from None
    if not encoded or len(encoded) > MAX_STREAM_NAME_BYTES:
        raise LogError(
            f"stream name {stream[:80]!r} is {len(encoded)} UTF-8 bytes long; a stream name "
            f"must be 1 to {MAX_STREAM_NAME_BYTES} bytes"
        )
    return encoded


def check_stream_names(streams: object) -> dict[str, bytes]:
    """Validate the names given to ``delete_streams``: each name once, with its key.

    A bare ``str`` is refused: it is a sequence too, and would name one stream per
    character.
    """
    if isinstance(streams, (str, bytes)) or not isinstance(streams, Sequence):
        raise LogError(
            f"delete_streams takes a sequence of stream names, got "
            f"{streams.__class__.__name__} {streams!r}; wrap a single name in a list"
        )
    return {stream: check_stream_name(stream) for stream in streams}


# Values that come back from CBOR exactly as they went in (NaN aside, which compares
# unequal to itself either way).
_PLAIN: Final = frozenset({str, int, float, bool, type(None)})


def normalize_meta(stream: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Validate stream metadata and return it as stores keep it (a CBOR round trip).

    The round trip makes every store hand back the same values (tuples become lists,
    for example), whether or not it keeps its index in CBOR.
    """
    if not isinstance(meta, Mapping):
        raise LogError(f"stream {stream!r}: meta must be a mapping, got {meta!r}")
    plain = True
    for key, value in meta.items():
        if type(key) is not str:
            raise LogError(f"stream {stream!r}: meta keys must be str, got {key!r}")
        kind = type(value)
        if kind is list or kind is tuple:
            plain = plain and all(type(v) in _PLAIN for v in value)
        elif kind not in _PLAIN:
            plain = False
    if plain:
        # What a CBOR round trip would give back, once sequences are lists (the usual
        # case: small scalars): skip the round trip, a cost every append would otherwise
        # pay, and keep the caller's value objects (the round trip would make fresh
        # copies of every string, and the writer caches the meta of every stream in use).
        return {k: list(v) if type(v) in (list, tuple) else v for k, v in meta.items()}
    try:
        return _loads(_dumps(dict(meta)))  # type: ignore[no-any-return]
    except Exception as exc:
        raise LogError(
            f"stream {stream!r}: meta is not CBOR-encodable ({exc}); nothing was written"
        ) from exc


def meta_value_key(value: Any) -> bytes:
    """The canonical CBOR encoding ``where`` filters compare meta values by.

    Two meta values match when their canonical encodings are equal, so ``1``, ``1.0``
    and ``True`` are three different values, in every store.
    """
    return _dumps(value, canonical=True)


def check_expect(stream: str, expect: object) -> None:
    """Validate an append's ``expect``: a seq (int >= 0) or ``ANY`` (None)."""
    if expect is not None and (type(expect) is not int or expect < 0):
        raise LogError(
            f"stream {stream!r}: expect must be the last seq the writer saw (an int >= 0, "
            f"0 for a new stream) or ANY, got {expect!r}"
        )


def check_after(stream: str, after: object) -> None:
    """Validate a ``read``/``wait_for_append`` position: an int >= 0."""
    if type(after) is not int or after < 0:
        raise LogError(f"stream {stream!r}: 'after' must be a seq (an int >= 0), got {after!r}")


def check_through(stream: str, through: object) -> None:
    """Validate a ``trim`` position: an int >= 0."""
    if type(through) is not int or through < 0:
        raise LogError(f"stream {stream!r}: 'through' must be a seq (an int >= 0), got {through!r}")


def trim_beyond_error(stream: str, through: int, last_seq: int) -> LogError:
    """The error of a ``trim`` past the stream's end (the same from every store)."""
    return LogError(
        f"stream {stream!r}: cannot trim through seq {through}, the stream's last seq is "
        f"{last_seq}; nothing was trimmed — trim through at most {last_seq}"
    )


def check_indexed_fields(indexed: Sequence[str]) -> tuple[str, ...]:
    """Validate the meta keys a store keeps a secondary index for."""
    if isinstance(indexed, str):
        raise LogError(f"indexed must be a sequence of meta keys, not the string {indexed!r}")
    fields = tuple(dict.fromkeys(indexed))
    for field in fields:
        if (
            type(field) is not str
            or not field
            or len(field.encode("utf-8", "surrogatepass")) > MAX_INDEXED_FIELD_BYTES
        ):
            raise LogError(
                f"indexed meta key {field!r} must be a str of 1 to {MAX_INDEXED_FIELD_BYTES} "
                f"UTF-8 bytes"
            )
    return fields


def where_conditions(where: Mapping[str, Any] | None) -> list[tuple[str, bytes]]:
    """Turn a ``streams(where=...)`` filter into ``(key, canonical value)`` pairs."""
    if not where:
        return []
    if not isinstance(where, Mapping):
        raise LogError(f"where must be a mapping of meta key to value, got {where!r}")
    conditions = []
    for key, value in where.items():
        if type(key) is not str:
            raise LogError(f"where keys are meta keys (str), got {key!r}")
        try:
            conditions.append((key, meta_value_key(value)))
        except Exception as exc:
            raise LogError(f"where[{key!r}] is not CBOR-encodable ({exc})") from exc
    return conditions


_MISSING: Final = object()


def meta_matches(meta: Mapping[str, Any], conditions: list[tuple[str, bytes]]) -> bool:
    """True if ``meta`` has every condition's key with an equal (canonical CBOR) value."""
    for key, wanted in conditions:
        value = meta.get(key, _MISSING)
        if value is _MISSING or meta_value_key(value) != wanted:
            return False
    return True


def record_fault(known: Mapping[str, int], stream: str, seq: int, value: bytes) -> Fault | None:
    """The fault a stored record value has, or None if it decodes cleanly."""
    try:
        decode_record(known, stream, seq, value)
    except CorruptRecordError as exc:
        kind = "checksum" if exc.detail.startswith("checksum") else "decode"
        return Fault(stream, seq, kind, exc.detail)
    except UnknownRecordTypeError as exc:
        return Fault(stream, seq, "unknown_type", f"unknown record type {exc.type!r}")
    except UnknownRecordVersionError as exc:
        return Fault(
            stream,
            seq,
            "unknown_version",
            f"type {exc.type!r} version {exc.version} is newer than the {exc.known} understood",
        )
    return None
