"""The shared msgpack codec: every message and record type round-trips, and malformed input
raises the error that says whose fault it is."""

from __future__ import annotations

import msgpack
import pytest

from consensus.codec import decode_message, decode_record, encode_message, encode_record
from consensus.errors import CorruptRecordError, RemoteProtocolError
from consensus.messages import (
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
    AcceptRecord,
    LearnRecord,
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
