"""RandomChunks: the random public values (record ids, request ids) handed out from a block drawn
for many are each handed out once, at full size, and never twice across a fork."""

from __future__ import annotations

import os
import re

from storage.random_chunks import RandomChunks
from vaultnode import api


def test_values_stay_unique_and_full_size_across_many_refills() -> None:
    chunks = RandomChunks(16, chunks_per_draw=7)  # 3000 values: over 400 refills
    values = [chunks.take() for _ in range(3000)]
    assert len(set(values)) == len(values)
    assert {len(value) for value in values} == {16}


def test_a_forked_child_never_hands_out_the_value_its_parent_hands_out_next() -> None:
    chunks = RandomChunks(12)
    chunks.take()  # the block now holds values the child would inherit
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, chunks.take())
        os._exit(0)
    os.close(write_end)
    parents_next = chunks.take()
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        childs = pipe.read()
    assert len(childs) == 12 and childs != parents_next


def test_request_ids_are_32_hex_digits_and_distinct() -> None:
    ids = [api._request_ids.take().hex() for _ in range(600)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)
