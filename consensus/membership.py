"""Cluster membership as replicated state: members, configurations and the α-window rule.

Owns: `Member` (node id, incarnation, voter or learner, peer and API addresses as opaque
bytes), `Membership` (one configuration and its quorums), `ConfigEntry` (a configuration and
the slot whose chosen command made it), `ConfigHistory` (which configuration is in force for
each slot), the membership command format (`encode_change`, `decode_change`,
`is_membership_command`) and the rule that accepts or ignores a chosen change
(`apply_change`). See docs/membership.md.

The rule (Lamport's α-window, "Paxos Made Simple" §3 and "Reconfiguring a State Machine"):
a change chosen in slot i governs every slot from i + `CONFIG_WINDOW_SLOTS` on. Each slot s
therefore has one configuration C(s), fixed by the values chosen at slots <= s - α, and
every quorum of phase 1 or 2 for slot s is a majority of C(s)'s voters: per slot this is
plain Paxos over one fixed quorum system. A leader proposes in slot s only once it knows
every slot up to s - α chosen, so it always knows C(s).

Must never: read a clock, draw randomness or touch a file. α is a protocol constant, not a
limit: every node of a cluster must use the same one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cached_property

from consensus.config import ClusterConfig, quorum_size
from consensus.errors import ConfigError

CONFIG_WINDOW_SLOTS = 64
"""α: a change chosen in slot i is in force from slot i + α. A leader keeps at most α slots
past its chosen watermark open, so α also bounds its pipeline; 64 is the daemon's
`inflight_slots_max`, so the window only binds while a hole holds the watermark back."""

UNBOUND = 0
"""A member's incarnation before one was bound (a cluster built from a static ClusterConfig
without incarnations, as the daemon still is): any incarnation of that node id is taken for
it. Amnesia is only caught for bound members; see docs/membership.md."""

MEMBERSHIP_COMMAND_PREFIX = b"\x00\xffpaxos-membership\x00"
"""Commands starting with these bytes are configuration changes, interpreted by the core and
never handed to the application (no msgpack or JSON application command starts with 0x00
followed by 0xff)."""


@dataclass(frozen=True, order=True)
class Member:
    node_id: int
    incarnation: int
    voter: bool
    peer_addr: bytes = b""
    api_addr: bytes = b""
    # For the driver: promote this learner automatically once it has caught up. Replicated
    # with the configuration, so that every leader after the one that added it knows.
    auto_promote: bool = False

    @property
    def identity(self) -> tuple[int, int]:
        return (self.node_id, self.incarnation)


@dataclass(frozen=True)
class Membership:
    """One configuration: its members sorted by node id."""

    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        ids = [member.node_id for member in self.members]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"duplicate node ids in {ids}")
        if any(node_id <= 0 for node_id in ids):
            raise ConfigError("node ids must be positive (0 means 'no node' in ballots)")
        if ids != sorted(ids):
            object.__setattr__(self, "members", tuple(sorted(self.members)))
        if not any(member.voter for member in self.members):
            raise ConfigError("a configuration needs at least one voter")

    @classmethod
    def from_cluster_config(
        cls, config: ClusterConfig, incarnations: dict[int, int] | None = None
    ) -> Membership:
        """The initial configuration: every node of `config` a voter, with its incarnation
        from `incarnations` (`UNBOUND` when not given)."""
        bound = incarnations or {}
        return cls(tuple(Member(n, bound.get(n, UNBOUND), True) for n in config.node_ids))

    # Derived once per configuration (it is immutable): the core asks these on every message
    # and tick, and rebuilding them each time was a few % of a node's CPU.
    @cached_property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(member.node_id for member in self.members)

    @cached_property
    def voter_ids(self) -> tuple[int, ...]:
        return tuple(member.node_id for member in self.members if member.voter)

    @cached_property
    def _voter_set(self) -> frozenset[int]:
        return frozenset(self.voter_ids)

    @cached_property
    def _members_by_id(self) -> dict[int, Member]:
        return {member.node_id: member for member in self.members}

    def member(self, node_id: int) -> Member | None:
        return self._members_by_id.get(node_id)

    def admits(self, node_id: int, incarnation: int) -> bool:
        """Whether messages from this identity are a member's (voter or learner)."""
        member = self.member(node_id)
        return member is not None and member.incarnation in (UNBOUND, incarnation)

    def is_voter(self, node_id: int, incarnation: int) -> bool:
        member = self.member(node_id)
        return (
            member is not None
            and member.voter
            and member.incarnation in (UNBOUND, incarnation)
        )

    def is_quorum(self, voters: Iterable[int]) -> bool:
        """Whether `voters` (node ids whose identity was checked on receipt) hold a majority
        of this configuration's voters."""
        voter_ids = self._voter_set
        return len(voter_ids.intersection(voters)) >= quorum_size(len(voter_ids))


@dataclass(frozen=True)
class ConfigEntry:
    """`membership`, made by the change chosen in slot `chosen_at` (0: the initial one), in
    force from slot `chosen_at + CONFIG_WINDOW_SLOTS` (the initial one from slot 1)."""

    chosen_at: int
    membership: Membership


class MembershipChangeRefused(ConfigError):
    """A change that is not exactly one step from the latest configuration."""


class MembershipChangeInProgress(MembershipChangeRefused):
    """Another change is queued, in flight, or chosen but not in force yet: ask again later."""


def encode_change(membership: Membership) -> bytes:
    """The command that asks for `membership` to become the configuration."""
    from consensus.codec import encode_membership  # the codec imports this module

    return MEMBERSHIP_COMMAND_PREFIX + encode_membership(membership)


def decode_change(command: bytes) -> Membership | None:
    """The configuration a membership command asks for; None for one that does not decode
    (ignored by every node alike, as a deterministic function of the chosen bytes)."""
    from consensus.codec import decode_membership
    from consensus.errors import RemoteProtocolError

    try:
        return decode_membership(command[len(MEMBERSHIP_COMMAND_PREFIX) :])
    except (RemoteProtocolError, ConfigError):
        return None


def is_membership_command(command: bytes) -> bool:
    return command.startswith(MEMBERSHIP_COMMAND_PREFIX)


def one_step(current: Membership, proposed: Membership) -> str | None:
    """Why `proposed` is not one change from `current` (None when it is): add one learner,
    promote one learner, demote one voter, remove one member, or change one member's
    addresses. A voter is never added directly; nor is the last voter removed."""
    before = {m.node_id: m for m in current.members}
    after = {m.node_id: m for m in proposed.members}
    added = after.keys() - before.keys()
    removed = before.keys() - after.keys()
    changed = {n for n in before.keys() & after.keys() if before[n] != after[n]}
    if len(added) + len(removed) + len(changed) != 1:
        return f"{len(added) + len(removed) + len(changed)} members change, not one"
    if added and after[next(iter(added))].voter:
        return "a new member joins as a learner, then is promoted"
    if changed:
        old, new = before[next(iter(changed))], after[next(iter(changed))]
        if old.incarnation != new.incarnation:
            return "an incarnation is replaced by removing the member and adding it again"
    if not proposed.voter_ids:
        return "the last voter cannot be removed"
    return None


class ConfigHistory:
    """The configurations that govern the slots a replica still deals with: the one in force
    at its lowest slot of interest and every later one, in order. Entries are only appended
    (as changes are chosen) and trimmed below a snapshot."""

    window_slots = CONFIG_WINDOW_SLOTS  # α (a planted bug in consensus/testing.py lowers it)

    def __init__(self, entries: Iterable[ConfigEntry]) -> None:
        self.entries: list[ConfigEntry] = list(entries)
        if not self.entries:
            raise ConfigError("a configuration history needs its initial configuration")

    def first_slot(self, entry: ConfigEntry) -> int:
        """The first slot `entry` governs: α after the slot that chose it (the initial
        configuration from slot 1)."""
        return entry.chosen_at + self.window_slots if entry.chosen_at else 1

    @property
    def latest(self) -> ConfigEntry:
        return self.entries[-1]

    def at(self, slot: int) -> Membership:
        """C(slot). Valid only for slots whose configuration is fixed (the caller knows every
        slot up to slot - α chosen): later changes would otherwise be missing."""
        current = self.entries[0].membership
        for entry in self.entries:
            if self.first_slot(entry) > slot:
                break
            current = entry.membership
        return current

    def between(self, first: int, last: int) -> list[Membership]:
        """The distinct configurations in force over slots [first, last]."""
        found = [self.at(first)]
        for entry in self.entries:
            if first < self.first_slot(entry) <= last and entry.membership != found[-1]:
                found.append(entry.membership)
        return found

    def choose(self, slot: int, command: bytes) -> bool:
        """A membership command was chosen in `slot`: record the change it asks for if it is
        one step from the latest configuration and that one is in force by `slot` (one change
        at a time). True if it was recorded; any other is ignored by every node alike."""
        proposed = decode_change(command)
        latest = self.latest
        if proposed is None or self.first_slot(latest) > slot or slot <= latest.chosen_at:
            return False
        if one_step(latest.membership, proposed) is not None:
            return False
        self.entries.append(ConfigEntry(slot, proposed))
        return True

    def as_of(self, slot: int) -> tuple[ConfigEntry, ...]:
        """The entries a snapshot at `slot` carries: those made by slots <= `slot`, from the
        one in force at slot + 1 on (older ones govern nothing above the snapshot)."""
        made = [entry for entry in self.entries if entry.chosen_at <= slot]
        first = 0
        for index, entry in enumerate(made):
            if self.first_slot(entry) <= slot + 1:
                first = index
        return tuple(made[first:])

    def trim_below(self, slot: int) -> None:
        """Forget the entries that govern no slot above `slot`."""
        first = 0
        for index, entry in enumerate(self.entries):
            if self.first_slot(entry) <= slot + 1:
                first = index
        del self.entries[:first]


def with_member(membership: Membership, member: Member) -> Membership:
    """`membership` with `member` added, or replacing the member of its node id."""
    others = tuple(m for m in membership.members if m.node_id != member.node_id)
    return Membership((*others, member))


def without_member(membership: Membership, node_id: int) -> Membership:
    return Membership(tuple(m for m in membership.members if m.node_id != node_id))


def promoted(membership: Membership, node_id: int) -> Membership:
    member = membership.member(node_id)
    if member is None:
        raise MembershipChangeRefused(f"node {node_id} is not a member")
    return with_member(membership, replace(member, voter=True))
