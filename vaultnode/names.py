"""Validation of user input that becomes state: secret names, values and timestamps.

Owns the rules of docs/semantics.md for names, values and the RFC 3339 timestamp format. Pure
functions; a rejected input raises `InvalidInput` with a stable error code and a message that
never repeats a value.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

NAME_LENGTH_MAX = 256
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class InvalidInput(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_name(name: str) -> str:
    if not 1 <= len(name) <= NAME_LENGTH_MAX:
        raise InvalidInput("invalid_name", f"a name has 1 to {NAME_LENGTH_MAX} characters")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidInput(
                "invalid_name", "a name's '/'-separated segments may not be empty, '.' or '..'"
            )
        if not _SEGMENT.fullmatch(segment):
            raise InvalidInput(
                "invalid_name", "a name's segments may only contain A-Z, a-z, 0-9, '.', '_' and '-'"
            )
    return name


def check_prefix(prefix: str) -> str:
    """A listing prefix: any leading part of a valid name (it may end in '/' or mid-segment)."""
    if len(prefix) > NAME_LENGTH_MAX or not re.fullmatch(r"[A-Za-z0-9._/-]*", prefix):
        raise InvalidInput("invalid_name", "a prefix may only contain name characters and '/'")
    return prefix


def check_value(value: object, value_bytes_max: int) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput("bad_request", "'value' must be a string")
    encoded = value.encode("utf-8", errors="strict") if value.isascii() else _utf8(value)
    if len(encoded) > value_bytes_max:
        raise InvalidInput("payload_too_large", f"a value holds at most {value_bytes_max} bytes")
    return encoded


def _utf8(value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON \ud800 escapes
        raise InvalidInput("bad_request", "'value' is not valid UTF-8") from exc


# The last whole second `format_time` wrote and its text: an answer formats the time of a write
# made an instant before, so consecutive calls mostly fall in one second, and datetime's
# strftime was ~3.7 µs of every write's answer (bench/README.md, "Issue 16, stop 35").
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def format_time(time_us: int | None) -> str | None:
    global _last_second
    if time_us is None:
        return None
    seconds, micros = divmod(time_us, 1_000_000)
    cached = _last_second
    if cached[0] != seconds:
        text = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        cached = _last_second = (seconds, text)
    return f"{cached[1]}.{micros:06d}Z"


def parse_time(text: str) -> int:
    """An RFC 3339 instant (with 'Z' or an offset) to microseconds since the epoch."""
    candidate = text.strip()
    # RFC 3339 allows a lower-case 't' and 'z'; re.ASCII keeps \d from matching other scripts'
    # digits, which int() would otherwise read as a fraction.
    if not re.fullmatch(
        r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,9})?(Z|z|[+-]\d\d:\d\d)",
        candidate,
        flags=re.ASCII,
    ):
        raise InvalidInput("bad_request", "expected an RFC 3339 time such as 2026-11-27T21:26:41Z")
    head, frac, zone = candidate[:19], "", candidate[19:]
    if zone.startswith("."):
        digits = re.match(r"\.(\d+)", zone)
        assert digits is not None
        frac = digits.group(1)
        zone = zone[len(frac) + 1 :]
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        moment = datetime.fromisoformat(head + zone)
    except ValueError as exc:
        raise InvalidInput("bad_request", "expected an RFC 3339 time") from exc
    micros = int((frac + "000000")[:6]) if frac else 0
    return int(moment.timestamp()) * 1_000_000 + micros


# Bounds that keep every number a command carries, or the state derives from one, inside msgpack's
# 64-bit integers and the 4-digit years of RFC 3339 (past them a token was created, then its
# answer, its lookups and every snapshot failed).
VERSION_MAX = 2**63 - 1
INT_DIGITS_MAX = 18  # digits of an integer in a path or query; int() of more may even raise


def single_value(query: dict[str, list[str]], key: str) -> str | None:
    """The one value of query parameter `key`, or None; given twice is bad input."""
    values = query.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidInput("bad_request", f"'{key}' given more than once")
    return values[0]


def positive_int(text: str | None, key: str, minimum: int = 1) -> int:
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses; the length
    # bound keeps int() below its 4300-digit limit (which raises instead of answering 400).
    if (
        text is None
        or not (text.isascii() and text.isdigit() and len(text) <= INT_DIGITS_MAX)
        or int(text) < minimum
    ):
        raise InvalidInput(
            "bad_request", f"'{key}' must be an integer >= {minimum} of at most 18 digits"
        )
    return int(text)
