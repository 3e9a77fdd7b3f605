"""The msgpack codec for messages and records, shared by the real transport and the simulator.

Owns: `encode_message`/`decode_message` and `encode_record`/`decode_record`. The wire form of a
dataclass is a msgpack array `[tag, field, ...]` in field order; nested dataclasses are arrays of
their fields. Decoding checks every type, so malformed bytes raise instead of reaching the core.

Must never: use pickle or anything that executes input, or accept a value whose type differs from
the annotation. Adding a field or a type is a wire change: append, never reorder.

How: the codec runs several times per write on every node, so each type's encoder and decoder
is made once, at import, from its annotations (closures; no generated source). An encoder reads a
dataclass's fields with one `operator.attrgetter` and converts only the nested dataclasses among
them (msgpack packs a tuple as an array). A decoder compares the exact types of an array's
elements with those its type expects at that length in one step, then decodes only the elements
that are arrays.
"""

from __future__ import annotations

import dataclasses
import threading
import typing
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import msgpack

from consensus import membership as membership_module
from consensus import messages as messages_module
from consensus import records as records_module
from consensus.errors import ConfigError, CorruptRecordError, RemoteProtocolError
from consensus.messages import MESSAGE_TYPES, Message
from consensus.records import RECORD_TYPES, Record

_Encoder = Callable[[Any], Any]
"""A value to what msgpack packs for it: tuples and lists of scalars (and of such arrays)."""
_Decoder = Callable[[Any], Any]

_SCALARS = (int, bool, bytes)


class _WireShapeError(ValueError):
    pass


def _fields_getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    if len(names) == 1:  # attrgetter of one name returns the bare value, not a 1-tuple
        only = attrgetter(names[0])
        return lambda value: (only(value),)
    return attrgetter(*names)


def _dataclass_encoder(cls: type[Any], namespace: dict[str, Any]) -> _Encoder:
    names = tuple(f.name for f in dataclasses.fields(cls))
    hints = typing.get_type_hints(cls, namespace)
    fields_of = _fields_getter(names)
    nested = [
        (index, encode_field)
        for index, name in enumerate(names)
        if (encode_field := _encoder_for(hints[name], namespace)) is not None
    ]
    if not nested:
        return fields_of  # only scalars and tuples of them: already the wire form

    def encode(value: Any) -> Any:
        wire = list(fields_of(value))
        for index, encode_field in nested:
            wire[index] = encode_field(wire[index])
        return wire

    return encode


def _encoder_for(annotation: Any, namespace: dict[str, Any]) -> _Encoder | None:
    """None for values msgpack packs as they are: scalars, and tuples of them (as arrays)."""
    if annotation in _SCALARS:
        return None
    if typing.get_origin(annotation) is tuple:
        encode_item = _encoder_for(typing.get_args(annotation)[0], namespace)
        if encode_item is None:
            return None
        return lambda items: [encode_item(item) for item in items]
    return _dataclass_encoder(annotation, namespace)


_per_thread = threading.local()


def _pack(wire: Any) -> bytes:
    # msgpack.packb makes a Packer per call, a third of an encode: keep one per thread. Packing
    # tuples, lists and scalars runs no Python code, so nothing can re-enter a Packer mid-pack.
    try:
        packer = _per_thread.packer
    except AttributeError:
        packer = _per_thread.packer = msgpack.Packer(use_bin_type=True)
    packed: bytes = packer.pack(wire)
    return packed


def _scalar_tuple_decoder(expected: type) -> _Decoder:
    def decode(value: Any) -> Any:
        if type(value) is not list:
            raise _WireShapeError(f"expected array, got {type(value).__name__}")
        for item in value:
            # bool is an int in Python; a field typed int must not silently take True.
            if type(item) is not expected:
                raise _WireShapeError(f"expected {expected.__name__}, got {type(item).__name__}")
        return tuple(value)

    return decode


def _tuple_decoder(item: _Decoder) -> _Decoder:
    def decode(value: Any) -> Any:
        if type(value) is not list:
            raise _WireShapeError(f"expected array, got {type(value).__name__}")
        return tuple(map(item, value))

    return decode


def _dataclass_decoder(cls: type[Any], namespace: dict[str, Any]) -> _Decoder:
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields)
    hints = typing.get_type_hints(cls, namespace)
    # What msgpack hands back for each field: the scalar itself, or a list for the fields that
    # are arrays (nested dataclasses and tuples), which are decoded further.
    wire_types = tuple(hints[name] if hints[name] in _SCALARS else list for name in names)
    arrays = [(index, _decoder_for(hints[name], namespace))
              for index, name in enumerate(names) if wire_types[index] is list]
    # Trailing fields with defaults were appended later: an older peer or log omits them.
    required = sum(
        1 for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    # Per accepted array length: the exact type of each element, and the arrays among them.
    layouts = {
        count: (wire_types[:count], tuple(array for array in arrays if array[0] < count))
        for count in range(required, len(fields) + 1)
    }

    def decode(value: Any) -> Any:
        layout = layouts.get(len(value)) if type(value) is list else None
        # Exact types: bool is an int in Python, and a field typed int must not take True.
        if layout is None or tuple(map(type, value)) != layout[0]:
            raise _WireShapeError(_misfit(cls, value, wire_types, required))
        for index, decode_array in layout[1]:
            value[index] = decode_array(value[index])
        return cls(*value)

    return decode


def _misfit(cls: type[Any], value: Any, wire_types: tuple[type, ...], required: int) -> str:
    """Why `value` is not the wire form of a `cls` (only worked out when decoding fails)."""
    if type(value) is not list or not required <= len(value) <= len(wire_types):
        return f"{cls.__name__} needs {len(wire_types)} fields"
    for f, item, expected in zip(dataclasses.fields(cls), value, wire_types, strict=False):
        if type(item) is not expected:
            got, wanted = type(item).__name__, "array" if expected is list else expected.__name__
            return f"{cls.__name__}.{f.name}: expected {wanted}, got {got}"
    return f"{cls.__name__}: unexpected shape"


def _decoder_for(annotation: Any, namespace: dict[str, Any]) -> _Decoder:
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only homogeneous tuples are encodable, not {annotation}")
        if args[0] in _SCALARS:
            return _scalar_tuple_decoder(args[0])
        return _tuple_decoder(_decoder_for(args[0], namespace))
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _dataclass_decoder(annotation, namespace)
    raise TypeError(f"no wire form for {annotation!r}")


def _build_table(types: tuple[type[Any], ...], namespace: dict[str, Any]) -> dict[int, _Decoder]:
    return {tag: _dataclass_decoder(cls, namespace) for tag, cls in enumerate(types, start=1)}


_NAMESPACE = {**vars(membership_module), **vars(messages_module), **vars(records_module)}
_MESSAGE_DECODERS = _build_table(MESSAGE_TYPES, _NAMESPACE)
_RECORD_DECODERS = _build_table(RECORD_TYPES, _NAMESPACE)
# Per type: its tag and its encoder.
_MESSAGE_ENCODERS = {
    cls: (tag, _dataclass_encoder(cls, _NAMESPACE)) for tag, cls in enumerate(MESSAGE_TYPES, 1)
}
_RECORD_ENCODERS = {
    cls: (tag, _dataclass_encoder(cls, _NAMESPACE)) for tag, cls in enumerate(RECORD_TYPES, 1)
}


def _encode(value: Any, encoders: dict[type[Any], tuple[int, _Encoder]]) -> bytes:
    tag, encode = encoders[type(value)]
    return _pack((tag, *encode(value)))


def _decode(data: bytes, decoders: dict[int, _Decoder]) -> Any:
    unpacked = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(unpacked, list) or not unpacked or type(unpacked[0]) is not int:
        raise _WireShapeError("expected [tag, fields...]")
    decoder = decoders.get(unpacked[0])
    if decoder is None:
        raise _WireShapeError(f"unknown tag {unpacked[0]}")
    return decoder(unpacked[1:])


def encode_message(message: Message) -> bytes:
    return _encode(message, _MESSAGE_ENCODERS)


def decode_message(data: bytes) -> Message:
    """Raises `RemoteProtocolError` for anything that is not a well-formed message."""
    try:
        message: Message = _decode(data, _MESSAGE_DECODERS)
    # ConfigError: a well-shaped configuration that is impossible (duplicate ids, no voter).
    except (_WireShapeError, ConfigError, ValueError, TypeError, msgpack.UnpackException) as error:
        raise RemoteProtocolError(f"malformed message ({len(data)} bytes): {error}") from error
    return message


def encode_record(record: Record) -> bytes:
    return _encode(record, _RECORD_ENCODERS)


def decode_record(data: bytes) -> Record:
    """Raises `CorruptRecordError` for anything that is not a well-formed record."""
    try:
        record: Record = _decode(data, _RECORD_DECODERS)
    except (_WireShapeError, ConfigError, ValueError, TypeError, msgpack.UnpackException) as error:
        raise CorruptRecordError(f"malformed record ({len(data)} bytes): {error}") from error
    return record


_MEMBERSHIP_ENCODER = _dataclass_encoder(membership_module.Membership, _NAMESPACE)
_MEMBERSHIP_DECODER = _dataclass_decoder(membership_module.Membership, _NAMESPACE)


def encode_membership(membership: membership_module.Membership) -> bytes:
    """A configuration as the body of a membership command (`consensus.membership`)."""
    return _pack(_MEMBERSHIP_ENCODER(membership))


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


_BIN_LENGTH_FIELDS = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes of its length


def stored_snapshot_data_span(payload: bytes) -> tuple[int, int]:
    """Where the application's bytes lie in a payload `encode_stored_snapshot` made (offset,
    size), checked as `decode_stored_snapshot` checks it; the whole payload for an image
    stored alone. Copies nothing of those bytes: a driver can then read them straight from
    the snapshot file rather than slicing hundreds of MB out of the payload under the GIL.
    Raises `CorruptRecordError` for a damaged payload."""
    offset, size, _ = _stored_snapshot_layout(payload)
    return offset, size


def decode_stored_snapshot(
    payload: bytes,
) -> tuple[bytes, tuple[membership_module.ConfigEntry, ...]]:
    """The application's bytes and configurations of a payload `encode_stored_snapshot`
    made. A payload that is not a two-element array is an application image stored alone
    (an application whose images are never such arrays, e.g. msgpack maps, may store them
    so: `vault operator snapshot restore` does): no configurations, the initial one rules.
    Raises `CorruptRecordError` for a damaged one."""
    offset, size, configs = _stored_snapshot_layout(payload)
    if offset == 0:  # an image stored alone: no copy of it
        return payload, ()
    return payload[offset : offset + size], configs


def _stored_snapshot_layout(
    payload: bytes,
) -> tuple[int, int, tuple[membership_module.ConfigEntry, ...]]:
    """(offset, size) of the application's bytes in a stored payload, and the configurations
    restated after them (none for an image stored alone)."""
    if payload[:1] != b"\x92":  # msgpack fixarray of two
        return 0, len(payload), ()
    length_size = _BIN_LENGTH_FIELDS.get(payload[1]) if len(payload) > 1 else None
    if length_size is None:
        raise CorruptRecordError("malformed stored snapshot: expected [bytes, MembershipRecord]")
    offset = 2 + length_size
    size = int.from_bytes(payload[2:offset], "big")
    end = offset + size
    if len(payload) <= end:  # the configurations follow the application's bytes
        raise CorruptRecordError("malformed stored snapshot: truncated")
    try:
        restated = msgpack.unpackb(memoryview(payload)[end:], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise CorruptRecordError(f"malformed stored snapshot: {error}") from error
    record = decode_record(restated) if isinstance(restated, bytes) else None
    if not isinstance(record, records_module.MembershipRecord):
        raise CorruptRecordError("malformed stored snapshot: expected [bytes, MembershipRecord]")
    return offset, size, record.entries
