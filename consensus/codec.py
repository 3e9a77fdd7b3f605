"""The msgpack codec for messages and records, shared by the real transport and the simulator.

Owns: `encode_message`/`decode_message` and `encode_record`/`decode_record`. The wire form of a
dataclass is a msgpack array `[tag, field, ...]` in field order; nested dataclasses are arrays of
their fields. Decoding checks every type, so malformed bytes raise instead of reaching the core.

Must never: use pickle or anything that executes input, or accept a value whose type differs from
the annotation. Adding a field or a type is a wire change: append, never reorder.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from consensus import membership as membership_module
from consensus import messages as messages_module
from consensus import records as records_module
from consensus.errors import CorruptRecordError, RemoteProtocolError
from consensus.messages import MESSAGE_TYPES, Message
from consensus.records import RECORD_TYPES, Record

_Decoder = Callable[[Any], Any]
_T = TypeVar("_T")


class _WireShapeError(ValueError):
    pass


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _to_wire(value: Any) -> Any:
    field_names = _FIELD_NAMES.get(type(value))
    if field_names is not None:
        return [_to_wire(getattr(value, name)) for name in field_names]
    if type(value) is tuple:
        return [_to_wire(item) for item in value]
    return value


def _scalar_decoder(expected: type) -> _Decoder:
    def decode(value: Any) -> Any:
        # bool is an int in Python; a field typed int must not silently take True.
        if type(value) is not expected:
            raise _WireShapeError(f"expected {expected.__name__}, got {type(value).__name__}")
        return value

    return decode


def _tuple_decoder(item: _Decoder) -> _Decoder:
    def decode(value: Any) -> Any:
        if not isinstance(value, list):
            raise _WireShapeError(f"expected array, got {type(value).__name__}")
        return tuple(item(element) for element in value)

    return decode


def _dataclass_decoder(cls: type[Any], namespace: dict[str, Any]) -> _Decoder:
    # Field order is the wire order; remembered per type because encoding is on the hot path.
    _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    hints = typing.get_type_hints(cls, namespace)
    fields = dataclasses.fields(cls)
    field_decoders = [_decoder_for(hints[f.name], namespace) for f in fields]
    # Trailing fields with defaults were appended later: an older peer or log omits them.
    required = sum(
        1 for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )

    def decode(value: Any) -> Any:
        if not isinstance(value, list) or not required <= len(value) <= len(field_decoders):
            raise _WireShapeError(f"{cls.__name__} needs {len(field_decoders)} fields")
        return cls(*(dec(item) for dec, item in zip(field_decoders, value, strict=False)))

    return decode


def _decoder_for(annotation: Any, namespace: dict[str, Any]) -> _Decoder:
    if annotation in (int, bool, bytes):
        return _scalar_decoder(annotation)
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only homogeneous tuples are encodable, not {annotation}")
        return _tuple_decoder(_decoder_for(args[0], namespace))
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _dataclass_decoder(annotation, namespace)
    raise TypeError(f"no wire form for {annotation!r}")


def _build_table(types: tuple[type[Any], ...], namespace: dict[str, Any]) -> dict[int, _Decoder]:
    return {tag: _dataclass_decoder(cls, namespace) for tag, cls in enumerate(types, start=1)}


_NAMESPACE = {**vars(membership_module), **vars(messages_module), **vars(records_module)}
_MESSAGE_DECODERS = _build_table(MESSAGE_TYPES, _NAMESPACE)
_MESSAGE_TAGS = {cls: tag for tag, cls in enumerate(MESSAGE_TYPES, start=1)}
_RECORD_DECODERS = _build_table(RECORD_TYPES, _NAMESPACE)
_RECORD_TAGS = {cls: tag for tag, cls in enumerate(RECORD_TYPES, start=1)}


def _encode(value: Any, tags: dict[type[Any], int]) -> bytes:
    tag = tags[type(value)]
    packed: bytes = msgpack.packb([tag, *_to_wire(value)], use_bin_type=True)
    return packed


def _decode(data: bytes, decoders: dict[int, _Decoder]) -> Any:
    unpacked = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(unpacked, list) or not unpacked or type(unpacked[0]) is not int:
        raise _WireShapeError("expected [tag, fields...]")
    decoder = decoders.get(unpacked[0])
    if decoder is None:
        raise _WireShapeError(f"unknown tag {unpacked[0]}")
    return decoder(unpacked[1:])


def encode_message(message: Message) -> bytes:
    return _encode(message, _MESSAGE_TAGS)


def decode_message(data: bytes) -> Message:
    """Raises `RemoteProtocolError` for anything that is not a well-formed message."""
    try:
        message: Message = _decode(data, _MESSAGE_DECODERS)
    except (_WireShapeError, ValueError, TypeError, msgpack.UnpackException) as error:
        raise RemoteProtocolError(f"malformed message ({len(data)} bytes): {error}") from error
    return message


def encode_record(record: Record) -> bytes:
    return _encode(record, _RECORD_TAGS)


def decode_record(data: bytes) -> Record:
    """Raises `CorruptRecordError` for anything that is not a well-formed record."""
    try:
        record: Record = _decode(data, _RECORD_DECODERS)
    except (_WireShapeError, ValueError, TypeError, msgpack.UnpackException) as error:
        raise CorruptRecordError(f"malformed record ({len(data)} bytes): {error}") from error
    return record


_MEMBERSHIP_DECODER = _dataclass_decoder(membership_module.Membership, _NAMESPACE)


def encode_membership(membership: membership_module.Membership) -> bytes:
    """A configuration as the body of a membership command (`consensus.membership`)."""
    packed: bytes = msgpack.packb(_to_wire(membership), use_bin_type=True)
    return packed


def decode_membership(data: bytes) -> membership_module.Membership:
    """Raises `RemoteProtocolError` for bytes that are not a well-formed configuration (and
    `ConfigError` for a malformed one: duplicate ids, no voter)."""
    try:
        unpacked = msgpack.unpackb(data, raw=False, strict_map_key=True)
        membership: membership_module.Membership = _MEMBERSHIP_DECODER(unpacked)
    except (_WireShapeError, ValueError, TypeError, msgpack.UnpackException) as error:
        message = f"malformed configuration ({len(data)} bytes): {error}"
        raise RemoteProtocolError(message) from error
    return membership


def encode_stored_snapshot(
    slot: int, data: bytes, configs: tuple[membership_module.ConfigEntry, ...]
) -> bytes:
    """A snapshot file's payload: the application's bytes and the configurations in force
    above `slot` (`Snapshot.configs`), which a driver must keep with them
    (docs/membership.md, "What the driver must persist"): a msgpack array of the two."""
    restated = encode_record(records_module.MembershipRecord(slot, configs))
    packed: bytes = msgpack.packb([data, restated], use_bin_type=True)
    return packed


def decode_stored_snapshot(
    payload: bytes,
) -> tuple[bytes, tuple[membership_module.ConfigEntry, ...]]:
    """The application's bytes and configurations of a payload `encode_stored_snapshot`
    made. A payload that is not a two-element array is an application image stored alone
    (an application whose images are never such arrays, e.g. msgpack maps, may store them
    so: `vault operator snapshot restore` does): no configurations, the initial one rules.
    Raises `CorruptRecordError` for a damaged one."""
    if payload[:1] != b"\x92":  # msgpack fixarray of two
        return payload, ()
    try:
        data, restated = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise CorruptRecordError(f"malformed stored snapshot: {error}") from error
    record = decode_record(restated) if isinstance(restated, bytes) else None
    if not isinstance(data, bytes) or not isinstance(record, records_module.MembershipRecord):
        raise CorruptRecordError("malformed stored snapshot: expected [bytes, MembershipRecord]")
    return data, record.entries
