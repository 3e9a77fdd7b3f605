"""The shared msgpack codec: every message and record type round-trips, writes the bytes peers
and logs already hold, and malformed input raises the error that says whose fault it is."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.codec import (
    decode_membership,
    decode_message,
    decode_record,
    decode_stored_snapshot,
    encode_membership,
    encode_message,
    encode_record,
    encode_stored_snapshot,
    stored_snapshot_data_span,
)
from consensus.errors import ConsensusError, CorruptRecordError, RemoteProtocolError
from consensus.membership import ConfigEntry, Member, Membership
from consensus.messages import (
    MESSAGE_TYPES,
    Accept,
    Accepted,
    AcceptedEntry,
    Ballot,
    CatchUpRequest,
    ChosenEntry,
    Commit,
    Forward,
    ForwardRefused,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Learn,
    Message,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    ReadIndexReply,
    ReadIndexRequest,
    Reject,
    Relay,
)
from consensus.records import (
    RECORD_TYPES,
    AcceptRecord,
    IdentityRecord,
    LearnRecord,
    MembershipRecord,
    PromiseRecord,
    Record,
    WatermarkRecord,
    recover,
)

B = Ballot(3, 2)
MESSAGES: list[Message] = [
    PreVote(1, 2, B, 4),
    PreVoteReply(2, 1, B, True),
    Prepare(1, 2, B, 5),
    Promise(2, 1, B, (AcceptedEntry(5, Ballot(1, 1), (b"a", b""), False),), 4, 0, 5, -1),
    Accept(1, 2, B, 7, (b"x",), 6),
    Accepted(2, 1, B, 7),
    Reject(2, 1, B, Ballot(9, 3)),
    Heartbeat(1, 2, B, 6, 11, 1 << 62, 7, (1 << 62) + 3),
    HeartbeatAck(2, 1, B, 11, 6, (1 << 63) - 1),
    CatchUpRequest(2, 1, B, 3, 2, 4096),
    Learn(1, 2, B, (ChosenEntry(3, ()),)),
    InstallSnapshot(1, 2, B, 10, b"\x00state", 4096, 8192),
    Forward(2, 1, B, (b"c1", b"c2"), 1 << 62, 9),
    ForwardRefused(1, 2, B, (b"c1",), True, 1 << 62, 9),
    Commit(1, 2, B, 9),
    ReadIndexRequest(2, 1, B, 4, (1 << 63) - 1),
    ReadIndexReply(1, 2, B, 4, 9, True, (1 << 63) - 1),
    Relay(
        3, 2, B, 3, 1, (Forward(3, 1, B, (b"c1",)),), (ReadIndexRequest(3, 1, B, 4, 7),),
        (HeartbeatAck(3, 1, B, 11, 6, 5),),
    ),
]
RECORDS: list[Record] = [
    PromiseRecord(B),
    AcceptRecord(1, B, (b"a",)),
    LearnRecord(2, ()),
    WatermarkRecord(2),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips(record: Record) -> None:
    assert decode_record(encode_record(record)) == record


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([99, 1]),
        msgpack.packb([1, 1, 2, [3, 2]]),  # PreVote missing a field
        msgpack.packb([6, 2, 1, [3, 2], True]),  # Accepted with a bool slot
        msgpack.packb({"tag": 1}),
    ],
)
def test_malformed_message_is_the_remote_side_fault(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(data)


def test_torn_record_is_reported_as_corruption() -> None:
    data = encode_record(AcceptRecord(1, B, (b"value",)))
    with pytest.raises(CorruptRecordError):
        decode_record(data[:-3])


def test_recover_replays_promise_accepts_learns_and_watermark() -> None:
    state = recover(
        [
            AcceptRecord(1, Ballot(1, 1), (b"a",)),
            AcceptRecord(2, Ballot(1, 1), (b"b",)),
            LearnRecord(3, (b"c",)),
            PromiseRecord(Ballot(4, 2)),
            WatermarkRecord(2),
        ]
    )
    assert state.promised == Ballot(4, 2)
    assert state.chosen == {1: (b"a",), 2: (b"b",), 3: (b"c",)}
    assert state.chosen_through == 3


def test_recover_ignores_slots_covered_by_the_snapshot() -> None:
    state = recover([AcceptRecord(1, Ballot(1, 1), (b"a",)), WatermarkRecord(1)], snapshot_slot=5)
    assert state.accepted == {} and state.chosen_through == 5


def test_recover_stops_a_watermark_at_the_first_slot_without_a_value() -> None:
    # After compaction an old watermark may outlive the accept records it summarised.
    state = recover([AcceptRecord(2, Ballot(1, 1), (b"b",)), WatermarkRecord(2)], snapshot_slot=0)
    assert state.chosen_through == 0 and state.chosen == {}


# Every field differs from its neighbours, so that swapping two fields changes the bytes.
MEMBERSHIP = Membership(
    (Member(1, 11, True, b"10.0.0.1:7001", b"10.0.0.1:8201"), Member(2, 12, False, b"", b"", True))
)
CONFIGS = (ConfigEntry(0, MEMBERSHIP), ConfigEntry(130, Membership((Member(3, 13, True),))))

# What the codec wrote before it was made faster (commit 401de2f): peers and logs hold these.
GOLDEN_MESSAGES: list[tuple[Message, str]] = [
    (PreVote(1, 2, B, 4, 5), "960101029203020405"),
    (PreVoteReply(2, 1, B, True, 6), "96020201920302c306"),
    (Prepare(1, 2, B, 5, 7), "960301029203020507"),
    (
        Promise(
            2, 1, B,
            (
                AcceptedEntry(5, Ballot(1, 1), (b"a", b""), False),
                AcceptedEntry(6, Ballot(2, 1), (), True),
            ),
            4, 3, 5, -1, 8,
        ),
        "9a04020192030292940592010192c40161c400c2940692020190c3040305ff08",
    ),
    (Accept(1, 2, B, 7, (b"x", b"yz"), 6, 9), "980501029203020792c40178c402797a0609"),
    (Accepted(2, 1, B, 7, 10), "96060201920302070a"),
    (Reject(2, 1, B, Ballot(9, 3), 11), "960702019203029209030b"),
    (
        Heartbeat(1, 2, B, 6, 12, 1 << 62, 7, (1 << 62) + 3, (1 << 64) - 1),
        "9a080102920302060ccf400000000000000007cf4000000000000003cfffffffffffffffff",
    ),
    (HeartbeatAck(2, 1, B, 13, 6, (1 << 63) - 1, 14), "980902019203020d06cf7fffffffffffffff0e"),
    (CatchUpRequest(2, 1, B, 3, 2, 4096, 15), "980a02019203020302cd10000f"),
    (
        Learn(1, 2, B, (ChosenEntry(3, ()), ChosenEntry(4, (b"c",))), 16),
        "960b010292030292920390920491c4016310",
    ),
    (
        InstallSnapshot(1, 2, B, 10, b"\x00state", 4096, 8192, CONFIGS, 17),
        "9a0c01029203020ac406007374617465cd1000cd2000929200919296010bc3c40d31302e302e302e313a"
        "37303031c40d31302e302e302e313a38323031c296020cc2c400c400c392cc82919196030dc3c400c400"
        "c211",
    ),
    (
        Forward(2, 1, B, (b"c1", b"c2"), 1 << 62, 9, 18),
        "980d020192030292c4026331c4026332cf40000000000000000912",
    ),
    (
        ForwardRefused(1, 2, B, (b"c1",), True, 1 << 62, 9, 19),
        "990e010292030291c4026331c3cf40000000000000000913",
    ),
    (Commit(1, 2, B, 9, 20), "960f01029203020914"),
    (ReadIndexRequest(2, 1, B, 4, (1 << 63) - 1, 21), "9710020192030204cf7fffffffffffffff15"),
    (
        ReadIndexReply(1, 2, B, 4, 9, True, (1 << 63) - 1, 22),
        "991101029203020409c3cf7fffffffffffffff16",
    ),
    (
        Relay(
            3, 2, B, 3, 1,
            (Forward(3, 1, B, (b"c1",), 5, 6, 7),),
            (ReadIndexRequest(3, 1, B, 4, 7, 8),),
            (HeartbeatAck(3, 1, B, 11, 6, 5, 9),),
            23,
        ),
        "9a12030292030203019197030192030291c402633105060791960301920302040708919703019203020b"
        "06050917",
    ),
]
GOLDEN_RECORDS: list[tuple[Record, str]] = [
    (PromiseRecord(B), "9201920302"),
    (AcceptRecord(1, B, (b"a", b"bc")), "94020192030292c40161c4026263"),
    (LearnRecord(2, (b"d",)), "93030291c40164"),
    (WatermarkRecord(2), "920402"),
    (
        MembershipRecord(129, CONFIGS),
        "9305cc81929200919296010bc3c40d31302e302e302e313a37303031c40d31302e302e302e313a383230"
        "31c296020cc2c400c400c392cc82919196030dc3c400c400c2",
    ),
    (IdentityRecord((1 << 64) - 1), "9206cfffffffffffffffff"),
]
GOLDEN_MEMBERSHIP = (
    "919296010bc3c40d31302e302e302e313a37303031c40d31302e302e302e313a38323031c296020cc2c4"
    "00c400c3"
)
GOLDEN_STORED_SNAPSHOT = (
    "92c403617070c4439305cc81929200919296010bc3c40d31302e302e302e313a37303031c40d31302e30"
    "2e302e313a38323031c296020cc2c400c400c392cc82919196030dc3c400c400c2"
)


def test_every_message_and_record_type_has_golden_bytes() -> None:
    assert [type(message) for message, _ in GOLDEN_MESSAGES] == list(MESSAGE_TYPES)
    assert [type(record) for record, _ in GOLDEN_RECORDS] == list(RECORD_TYPES)


@pytest.mark.parametrize(("message", "golden_hex"), GOLDEN_MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_encodes_to_the_bytes_peers_send_and_decodes_back(
    message: Message, golden_hex: str
) -> None:
    assert encode_message(message).hex() == golden_hex
    assert decode_message(bytes.fromhex(golden_hex)) == message


@pytest.mark.parametrize(("record", "golden_hex"), GOLDEN_RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_encodes_to_the_bytes_logs_hold_and_decodes_back(
    record: Record, golden_hex: str
) -> None:
    assert encode_record(record).hex() == golden_hex
    assert decode_record(bytes.fromhex(golden_hex)) == record


def test_a_configuration_and_a_stored_snapshot_keep_their_bytes() -> None:
    assert encode_membership(MEMBERSHIP).hex() == GOLDEN_MEMBERSHIP
    assert decode_membership(bytes.fromhex(GOLDEN_MEMBERSHIP)) == MEMBERSHIP
    assert encode_stored_snapshot(129, b"app", CONFIGS).hex() == GOLDEN_STORED_SNAPSHOT
    assert decode_stored_snapshot(bytes.fromhex(GOLDEN_STORED_SNAPSHOT)) == (b"app", CONFIGS)


@pytest.mark.parametrize("data_size", [0, 1, 255, 256, 65535, 65536, 70_000])
def test_the_span_of_a_stored_snapshot_is_where_its_application_bytes_lie(data_size: int) -> None:
    # bin 8, bin 16 and bin 32 at their boundaries: where the driver reads the image from
    data = bytes(i % 251 for i in range(data_size))
    payload = encode_stored_snapshot(129, data, CONFIGS)
    offset, size = stored_snapshot_data_span(payload)
    assert payload[offset : offset + size] == data == decode_stored_snapshot(payload)[0]


def test_an_image_stored_alone_spans_the_whole_payload() -> None:
    image = msgpack.packb({"secrets": {}})
    assert stored_snapshot_data_span(image) == (0, len(image))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_span_refuses_exactly_what_stored_snapshot_decoding_refuses(
    data: st.DataObject,
) -> None:
    payload = bytearray(encode_stored_snapshot(129, data.draw(st.binary(max_size=300)), CONFIGS))
    damage = data.draw(st.sampled_from(["truncate", "flip", "append"]))
    if damage == "truncate":
        del payload[data.draw(st.integers(0, len(payload) - 1)) :]
    elif damage == "flip":
        payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        payload += data.draw(st.binary(min_size=1, max_size=4))
    damaged = bytes(payload)
    try:
        decoded: bytes | None = decode_stored_snapshot(damaged)[0]
    except CorruptRecordError:
        decoded = None
    try:
        offset, size = stored_snapshot_data_span(damaged)
    except CorruptRecordError:
        assert decoded is None
    else:
        assert damaged[offset : offset + size] == decoded


def test_an_encode_that_fails_halfway_leaves_nothing_for_the_next_one() -> None:
    # The codec keeps one msgpack Packer per thread: a failed pack must not leave bytes in it.
    with pytest.raises(OverflowError):
        encode_message(Heartbeat(1, 2, B, 6, 12, 1 << 62, 7, (1 << 62) + 3, 1 << 64))
    message, golden_hex = GOLDEN_MESSAGES[7]
    assert encode_message(message).hex() == golden_hex


def _wire_fields(value: Any) -> Any:
    """The wire form the module docstring states, spelt out slowly: a dataclass is the array of
    its fields in declaration order, a tuple an array, anything else itself."""
    if dataclasses.is_dataclass(value):
        return [_wire_fields(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple):
        return [_wire_fields(item) for item in value]
    return value


def _required_fields(cls: type[Any]) -> int:
    fields = dataclasses.fields(cls)
    return sum(
        1 for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def test_an_older_peers_message_without_its_trailing_defaults_decodes_and_one_short_fails() -> None:
    # A peer of protocol version 4 sends no sender_incarnation: an Accept of seven elements.
    assert decode_message(bytes.fromhex("970501029203020791c4017806")) == Accept(
        1, 2, B, 7, (b"x",), 6
    )
    for message, _ in GOLDEN_MESSAGES:
        cls, wire = type(message), _wire_fields(message)
        tag = MESSAGE_TYPES.index(cls) + 1
        values = [getattr(message, f.name) for f in dataclasses.fields(message)]
        for count in range(_required_fields(cls), len(wire) + 1):
            shortened = msgpack.packb([tag, *wire[:count]])
            assert decode_message(shortened) == cls(*values[:count])
        with pytest.raises(RemoteProtocolError):
            decode_message(msgpack.packb([tag, *wire[: _required_fields(cls) - 1]]))


_WIRE_INT = st.integers(-(1 << 63), (1 << 64) - 1)  # what a msgpack integer holds
_MEMBERS = st.lists(
    st.builds(
        Member,
        st.integers(1, (1 << 64) - 1),
        _WIRE_INT,
        st.booleans(),
        st.binary(max_size=8),
        st.binary(max_size=8),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda member: member.node_id,
)
_MEMBERSHIPS = _MEMBERS.filter(lambda members: any(m.voter for m in members)).map(
    lambda members: Membership(tuple(members))
)


def _values_of(annotation: Any) -> st.SearchStrategy[Any]:
    """Any value of a field's annotation that a peer could send (a Membership a valid one)."""
    if annotation is int:
        return _WIRE_INT
    if annotation is bool:
        return st.booleans()
    if annotation is bytes:
        return st.binary(max_size=24)
    if typing.get_origin(annotation) is tuple:
        return st.lists(_values_of(typing.get_args(annotation)[0]), max_size=3).map(tuple)
    if annotation is Membership:
        return _MEMBERSHIPS
    hints = typing.get_type_hints(annotation)
    fields = dataclasses.fields(annotation)
    return st.builds(annotation, *(_values_of(hints[f.name]) for f in fields))


@settings(max_examples=500, deadline=None)
@given(st.one_of(*(_values_of(cls) for cls in MESSAGE_TYPES)))
def test_any_message_is_its_tag_and_fields_in_order_and_decodes_back(message: Message) -> None:
    data = encode_message(message)
    tag = MESSAGE_TYPES.index(type(message)) + 1
    assert data == msgpack.packb([tag, *_wire_fields(message)], use_bin_type=True)
    assert decode_message(data) == message


@settings(max_examples=200, deadline=None)
@given(st.one_of(*(_values_of(cls) for cls in RECORD_TYPES)))
def test_any_record_is_its_tag_and_fields_in_order_and_decodes_back(record: Record) -> None:
    data = encode_record(record)
    tag = RECORD_TYPES.index(type(record)) + 1
    assert data == msgpack.packb([tag, *_wire_fields(record)], use_bin_type=True)
    assert decode_record(data) == record


@settings(max_examples=100, deadline=None)
@given(_MEMBERSHIPS)
def test_any_configuration_round_trips(membership: Membership) -> None:
    assert decode_membership(encode_membership(membership)) == membership


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([6, 2, 1, [3, 2], 7, True]),  # bool where an int is due
        msgpack.packb([6, 2, 1, [True, 2], 7]),  # ... in a nested ballot
        msgpack.packb([2, 2, 1, [3, 2], 1]),  # int where a bool is due
        msgpack.packb([6, 2, 1, [3, 2], 7.0]),  # float where an int is due
        msgpack.packb([5, 1, 2, [3, 2], 7, [1], 6]),  # int where bytes are due
        msgpack.packb([5, 1, 2, [3, 2], 7, ["x"], 6], use_bin_type=True),  # str where bytes
        msgpack.packb([5, 1, 2, [3, 2], 7, b"x", 6], use_bin_type=True),  # bytes for a batch
        msgpack.packb([5, 1, 2, [3, 2], 7, {"x": 1}, 6]),  # map for a batch
        msgpack.packb([6, 2, 1, [3, 2]]),  # too few fields
        msgpack.packb([6, 2, 1, [3, 2], 7, 0, 0]),  # too many fields
        msgpack.packb([6, 2, 1, 3, 7]),  # int where a ballot is due
        msgpack.packb([6, 2, 1, [3], 7]),  # a ballot short of a field
        msgpack.packb([6, 2, 1, [3, 2, 1], 7]),  # a ballot with one too many
        msgpack.packb([6, 2, 1, [3, 2], 7, None]),  # nil where an int is due
        msgpack.packb([11, 1, 2, [3, 2], [[3]]]),  # a chosen entry short of its value
        msgpack.packb([11, 1, 2, [3, 2], [3, []]]),  # an entry not in an array
        msgpack.packb([4, 2, 1, [3, 2], [[5, [1, 1], [], 0]], 4, 0, 5, -1]),  # int for chosen
        msgpack.packb([0, 1]),  # unknown tags
        msgpack.packb([19, 1]),
        msgpack.packb([-1, 1]),
        msgpack.packb([True, 1, 2, [3, 2], 4]),  # a tag must be an int, not a bool
        msgpack.packb(["1", 1, 2, [3, 2], 4]),
        msgpack.packb([]),
        msgpack.packb(1),
        msgpack.packb([6, 2, 1, [3, 2], 7]) + b"\x00",  # trailing bytes
        msgpack.packb([6, 2, 1, [3, 2], 7])[:-1],  # torn
        msgpack.packb({1: 2}),  # a map with a key that is not a string
    ],
)
def test_a_message_of_the_wrong_shape_is_the_remote_side_fault(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(data)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([2, True, [3, 2], []]),  # bool where an int is due
        msgpack.packb([2, 1, [3, 2], [1]]),  # int where bytes are due
        msgpack.packb([1]),  # too few fields
        msgpack.packb([4, 2, 3]),  # too many fields
        msgpack.packb([1, [3]]),  # wrong nested shape
        msgpack.packb([5, 9, [[0, [[1, 0, 1]]]]]),  # int where a member's voter bool is due
        msgpack.packb([7, 1]),  # unknown tag
        b"",
    ],
)
def test_a_record_of_the_wrong_shape_is_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptRecordError):
        decode_record(data)


def _wire_nodes(value: Any, path: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], Any]]:
    """Every node of `value`'s wire form with its path in it: the value itself for a scalar,
    its class for a dataclass, `tuple` for a homogeneous tuple."""
    if dataclasses.is_dataclass(value):
        yield path, type(value)
        for index, f in enumerate(dataclasses.fields(value)):
            yield from _wire_nodes(getattr(value, f.name), (*path, index))
    elif isinstance(value, tuple):
        yield path, tuple
        for index, item in enumerate(value):
            yield from _wire_nodes(item, (*path, index))
    else:
        yield path, value


def _wire_edited(value: Any, path: tuple[int, ...], edit: Callable[[Any], Any]) -> Any:
    """`_wire_fields(value)` with the node at `path` replaced by `edit` of it."""
    root = [_wire_fields(value)]
    holder, key = root, 0
    for index in path:
        holder, key = holder[key], index
    holder[key] = edit(holder[key])
    return root[0]


def _always(value: Any) -> Callable[[Any], Any]:
    return lambda _: value


def _broken_copies(value: Any) -> Iterator[tuple[str, Any]]:
    """Copies of `_wire_fields(value)` wrong in exactly one place: a scalar of another type, a
    scalar for an array, a dataclass one field short of its required ones or one field long."""
    scalars: list[Any] = [True, 7, b"x", "x", 1.5, None, [], {}]
    for path, node in _wire_nodes(value, ()):
        for other in scalars:
            if type(other) is not type(node) and not (node is tuple and other == []):
                yield f"{other!r} at {path}", _wire_edited(value, path, _always(other))
        if isinstance(node, type) and dataclasses.is_dataclass(node):
            short = itemgetter(slice(_required_fields(node) - 1))
            yield f"one field short at {path}", _wire_edited(value, path, short)
            yield f"one field long at {path}", _wire_edited(value, path, lambda f: [*f, 0])


def _assert_every_broken_copy_fails(
    value: Any, tag: int | None, decode: Callable[[bytes], Any], error: type[ConsensusError]
) -> None:
    for where, wire in _broken_copies(value):
        if tag is not None and not isinstance(wire, list):
            continue  # the fields after a tag are always an array
        data = msgpack.packb(wire if tag is None else [tag, *wire], use_bin_type=True)
        with pytest.raises(error):
            decode(data)
            pytest.fail(f"{type(value).__name__} decoded with {where}")


@pytest.mark.parametrize(("message", "_"), GOLDEN_MESSAGES, ids=lambda m: type(m).__name__)
def test_a_message_wrong_anywhere_is_refused(message: Message, _: str) -> None:
    tag = MESSAGE_TYPES.index(type(message)) + 1
    _assert_every_broken_copy_fails(message, tag, decode_message, RemoteProtocolError)


@pytest.mark.parametrize(("record", "_"), GOLDEN_RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_wrong_anywhere_is_corrupt(record: Record, _: str) -> None:
    tag = RECORD_TYPES.index(type(record)) + 1
    _assert_every_broken_copy_fails(record, tag, decode_record, CorruptRecordError)


def test_a_configuration_wrong_anywhere_is_the_remote_side_fault() -> None:
    _assert_every_broken_copy_fails(MEMBERSHIP, None, decode_membership, RemoteProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_the_codec_error(data: bytes) -> None:
    try:
        message = decode_message(data)
    except RemoteProtocolError:
        return
    assert decode_message(encode_message(message)) == message


def _with_duplicate_member_ids(wire: Any) -> bool:
    """Give the second member of the first configuration found in `wire` (a decoded msgpack
    tree) the first one's node id, in place; False if there is none."""
    if isinstance(wire, list):
        if (
            len(wire) >= 2
            and all(isinstance(m, list) and m and type(m[0]) is int for m in wire)
            and all(len(m) == len(wire[0]) for m in wire)
            and len(wire[0]) >= 3
            and type(wire[0][2]) is bool
        ):
            wire[1][0] = wire[0][0]
            return True
        return any(_with_duplicate_member_ids(item) for item in wire)
    return False


def test_an_impossible_configuration_is_a_malformed_record_or_message_not_a_config_error() -> None:
    # Well shaped, but two members share an id: Membership refuses it with ConfigError, which
    # the transport would not catch; the codec reports it as its own decoding error.
    record = MembershipRecord(129, CONFIGS)
    wire = msgpack.unpackb(encode_record(record), raw=False)
    assert _with_duplicate_member_ids(wire)
    with pytest.raises(CorruptRecordError):
        decode_record(msgpack.packb(wire, use_bin_type=True))
    snapshot = next(m for m, _ in GOLDEN_MESSAGES if isinstance(m, InstallSnapshot) and m.configs)
    wire = msgpack.unpackb(encode_message(snapshot), raw=False)
    assert _with_duplicate_member_ids(wire)
    with pytest.raises(RemoteProtocolError):
        decode_message(msgpack.packb(wire, use_bin_type=True))
