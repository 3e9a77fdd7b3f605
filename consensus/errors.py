"""The consensus core's exception hierarchy, named by whose fault a failure is.

Owns: `LocalProtocolError` (the driver misused the API), `RemoteProtocolError` (a peer or the
wire sent something malformed), `CorruptRecordError` (a persisted record does not decode),
`ConfigError` (an impossible configuration), `InvariantViolation` (the core caught itself or a
peer breaking a safety invariant).

Must never: carry command bytes or secret material in a message; errors name slots, ballots and
types only.
"""

from __future__ import annotations


class ConsensusError(Exception):
    """Base of every error raised by `consensus/`."""


class ConfigError(ConsensusError):
    """The cluster configuration or limits are impossible."""


class LocalProtocolError(ConsensusError):
    """The driver broke the API contract (for instance acknowledged records never handed out)."""


class RemoteProtocolError(ConsensusError):
    """Bytes from the network do not decode to a well-formed message."""


class CorruptRecordError(ConsensusError):
    """A persisted record does not decode; recovery must stop rather than guess."""


class InvariantViolation(ConsensusError):
    """A safety invariant of the protocol no longer holds (a chosen value would change, or the
    watermark would cover a slot whose value is unknown). Agreement may already be lost, so
    the node must stop rather than apply, answer or send anything more."""
