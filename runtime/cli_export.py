"""Records as JSON, and back: the format of ``perdure export`` and ``perdure events --json``.

A record's payload is CBOR in the log; JSON cannot hold everything CBOR can, so the few
values JSON lacks are tagged with a one-key object whose key starts with ``$``:

- ``{"$bytes": "<base64>"}``: a byte string;
- ``{"$float": "nan" | "inf" | "-inf"}``: a float JSON has no literal for;
- ``{"$map": [[key, value], ...]}``: a map with a key that is not a string, or whose
  keys start with ``$`` (so a payload can never be mistaken for a tag);
- ``{"$cbor": "<base64>"}``: any other CBOR value (a tag, a date...), as its encoding.

Every other value is itself. ``from_json_value(to_json_value(v)) == v`` for every value
the log can hold, so an export can be read back into the very records it was made from
(:func:`records_from_export`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping
from typing import Any

import cbor2

from perdure.log.protocol import Record, StreamInfo

__all__ = [
    "EXPORT_FORMAT",
    "ExportFormatError",
    "export_document",
    "from_json_value",
    "record_from_json",
    "record_to_json",
    "records_from_export",
    "to_json_value",
]

#: The ``format`` field of an export document.
EXPORT_FORMAT = "perdure.export/1"

_TAGS = ("$bytes", "$float", "$map", "$cbor")


class ExportFormatError(ValueError):
    """A document is not a perdure export this program can read; says what is wrong."""


def to_json_value(value: Any) -> Any:
    """``value`` (as decoded from CBOR) made JSON-safe, tagging what JSON cannot hold."""
    if value is None or value is True or value is False or type(value) in (str, int):
        return value
    if type(value) is float:
        if math.isnan(value):
            return {"$float": "nan"}
        if math.isinf(value):
            return {"$float": "inf" if value > 0 else "-inf"}
        return value
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, Mapping):
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: to_json_value(v) for k, v in value.items()}
        return {"$map": [[to_json_value(k), to_json_value(v)] for k, v in value.items()]}
    return {"$cbor": base64.b64encode(cbor2.dumps(value)).decode("ascii")}


def from_json_value(value: Any) -> Any:
    """The value :func:`to_json_value` was given."""
    if isinstance(value, list):
        return [from_json_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), *_ = value.items()
        if tag in _TAGS:
            return _untag(tag, inner)
    for key in value:
        if key.startswith("$"):
            raise ExportFormatError(f"unknown tag or stray '$' key {key!r} in {value!r:.80}")
    return {k: from_json_value(v) for k, v in value.items()}


def _untag(tag: str, inner: Any) -> Any:
    try:
        if tag == "$bytes":
            return base64.b64decode(inner, validate=True)
        if tag == "$float":
            return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[inner]
        if tag == "$cbor":
            return cbor2.loads(base64.b64decode(inner, validate=True))
        out: dict[Any, Any] = {}
        for key, item in inner:
            k = from_json_value(key)
            out[_hashable(k)] = from_json_value(item)
        return out
    except ExportFormatError:
        raise
    except Exception as exc:
        raise ExportFormatError(f"malformed {tag} value {inner!r:.80}: {exc}") from None


def _hashable(key: Any) -> Any:
    # CBOR map keys may be arrays; cbor2 reads them back as tuples.
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


def record_to_json(record: Record) -> dict[str, Any]:
    """One record as a JSON object: seq, type, version, timestamp and payload."""
    return {
        "seq": record.seq,
        "type": record.type,
        "version": record.version,
        "timestamp": record.timestamp,
        "payload": to_json_value(record.payload),
    }


def record_from_json(stream: str, item: Mapping[str, Any]) -> Record:
    """The record :func:`record_to_json` made (``stream`` is not part of the object)."""
    try:
        seq, type_, version, timestamp = (
            item["seq"],
            item["type"],
            item["version"],
            item["timestamp"],
        )
        payload = item["payload"]
    except (KeyError, TypeError) as exc:
        raise ExportFormatError(f"record {item!r:.80} lacks field {exc}") from None
    if type(seq) is not int or type(version) is not int or not isinstance(type_, str):
        raise ExportFormatError(f"record {item!r:.80}: seq and version must be integers")
    if not isinstance(timestamp, int | float):
        raise ExportFormatError(f"record seq {seq}: timestamp must be a number")
    return Record(stream, seq, type_, version, float(timestamp), from_json_value(payload))


def export_document(
    execution_id: str, info: StreamInfo, records: Iterable[Record]
) -> dict[str, Any]:
    """The whole history of one execution as one JSON-safe document."""
    return {
        "format": EXPORT_FORMAT,
        "execution_id": execution_id,
        "stream": info.stream,
        "index": {
            "last_seq": info.last_seq,
            "created_at": info.created_at,
            "updated_at": info.updated_at,
            "meta": to_json_value(dict(info.meta)),
        },
        "records": [record_to_json(r) for r in records],
    }


def records_from_export(document: Mapping[str, Any]) -> list[Record]:
    """Rebuild the records of an export document (checks format and seq order)."""
    if not isinstance(document, Mapping) or document.get("format") != EXPORT_FORMAT:
        found = document.get("format") if isinstance(document, Mapping) else type(document)
        raise ExportFormatError(f"not a {EXPORT_FORMAT} document (format {found!r})")
    stream = document.get("stream")
    items = document.get("records")
    if not isinstance(stream, str) or not isinstance(items, list):
        raise ExportFormatError("an export needs a 'stream' name and a 'records' list")
    records = [record_from_json(stream, item) for item in items]
    for i, record in enumerate(records, start=1):
        if record.seq != i:
            raise ExportFormatError(f"{stream!r}: record {i} has seq {record.seq}")
    return records
