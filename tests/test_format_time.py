"""`vaultnode.names.format_time`, which keeps the text of the last second it wrote, writes every
time as the RFC 3339 UTC instant it stands for, whatever the order of the calls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from vaultnode.names import format_time, parse_time

# From 1970 to 9999-12-31T23:59:59.999999Z, the last instant RFC 3339's four-digit year holds.
TIME_US_MAX = 253_402_300_799_999_999
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _expected(time_us: int) -> str:
    instant = EPOCH + timedelta(microseconds=time_us)
    return instant.strftime("%Y-%m-%dT%H:%M:%S") + f".{instant.microsecond:06d}Z"


@given(st.lists(st.integers(min_value=0, max_value=TIME_US_MAX), min_size=1, max_size=20))
def test_each_time_is_written_as_its_own_instant_whatever_came_before(times: list[int]) -> None:
    for time_us in times:
        assert format_time(time_us) == _expected(time_us)


@given(st.integers(min_value=0, max_value=TIME_US_MAX - 3_000_000))
def test_times_within_one_second_and_across_its_end_keep_their_own_second(start: int) -> None:
    second_start = start - start % 1_000_000
    for time_us in (second_start, second_start + 999_999, second_start + 1_000_000, start):
        written = format_time(time_us)
        assert written == _expected(time_us)
        assert parse_time(written) == time_us


def test_no_time_is_written_as_none() -> None:
    assert format_time(None) is None
