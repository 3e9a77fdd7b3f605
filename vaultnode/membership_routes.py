"""`/v1/sys/members`: list, add and remove cluster members (root token only; docs/api.md).

Owns these routes' handlers and the JSON shapes they answer. Every change goes through
`Replica.propose_membership` on the leader (`PaxosReplicator.change_membership`); a follower
forwards the request to the leader's API address (from the replicated configuration) over
HTTPS verified against the cluster CA, once: a forwarded request that reaches a node which is
not the leader any more answers 503 `unavailable` rather than hopping again. A change is
answered once chosen; it is in force `CONFIG_WINDOW_SLOTS` (α = 64) slots later, which the
leader fills with no-ops if nothing else comes (docs/membership.md).

Operator policy on top of the core's rules: a voter is never removed from a configuration of
two voters or fewer (409 `too_few_voters`: with two voters each is needed, so the one left
would stop at the first fault; with one the cluster would have none).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import httpx

from consensus.membership import (
    Member,
    Membership,
    MembershipChangeInProgress,
    MembershipChangeRefused,
    with_member,
    without_member,
)
from vaultnode.config import ConfigError, parse_address
from vaultnode.http_server import Response
from vaultnode.identity import INCARNATION_MAX, format_incarnation
from vaultnode.paxos_replicator import PROPOSAL_TIMEOUT_S, TICK_S, PaxosReplicator
from vaultnode.replicator import NotLeader
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec

if TYPE_CHECKING:
    from vaultnode.api import VaultApi

MEMBERS_PATH = "/v1/sys/members"
# Set on a request a follower forwards to its leader: the leader never forwards it again.
FORWARDED_HEADER = "x-vault-forwarded-by"
# The leader answers a change once chosen (at most the proposal timeout); then some slack.
FORWARD_TIMEOUT_S = PROPOSAL_TIMEOUT_S + 5.0
_MEMBER_FIELDS = {"id", "incarnation", "peer_addr", "api_addr", "promote"}
_INCARNATION_HEX_DIGITS = 16


@dataclass(frozen=True)
class LeaderForwarding:
    """How a follower reaches the leader's API: the scheme every node serves and the TLS
    verification (the cluster CA) for HTTPS."""

    scheme: str
    verify: bool | ssl.SSLContext


class MembershipRoutes:
    def __init__(
        self, api: VaultApi, replicator: PaxosReplicator, cluster_id: str,
        forwarding: LeaderForwarding | None,
    ) -> None:
        self.api = api
        self.replicator = replicator
        self.cluster_id = cluster_id
        self.forwarding = forwarding

    def routes(self) -> list[RouteSpec]:
        # The leader answers from its own state and a follower forwards to it, so no read
        # point is needed; AT_APPLY (not LOCAL) so that every call is audited and a removed
        # or superseded node refuses it like any other request.
        at_apply, root = Consistency.AT_APPLY, Access.ROOT
        return [
            RouteSpec("GET", MEMBERS_PATH, self._list, at_apply, root),
            RouteSpec("POST", MEMBERS_PATH, self._add, at_apply, root),
            RouteSpec("DELETE", MEMBERS_PATH + "/", self._remove, at_apply, root, "{id}"),
        ]

    # ---- handlers ---------------------------------------------------------------------
    async def _list(self, call: Call, _: str) -> Response:
        forwarded = await self._forward_unless_leader(call)
        if forwarded is not None:
            return forwarded
        call.outcome = "ok"
        return Response.json(200, self.members_view())

    async def _add(self, call: Call, _: str) -> Response:
        member = self._member_from_body(call)  # a bad body is refused here, not at the leader
        forwarded = await self._forward_unless_leader(call)
        if forwarded is not None:
            return forwarded
        if self.replicator.transport is None:
            raise ApiError(
                409, "membership_change_refused",
                "this node runs no peer transport (its config has no [[peers]] or no peer "
                "TLS): no other node could reach it; a vault that can grow is made by vault "
                "operator init",
            )
        latest = self.replicator.replica.membership
        existing = latest.member(member.node_id)
        if existing is not None and replace(existing, voter=False) == member:
            # The same add again (a client retrying after a lost answer): it took effect, so
            # answer as then, with the current configuration (promotion may have followed).
            call.outcome = "ok"
            return Response.json(200, {
                "member": self._row(existing, latest),
                "join": self._join(self.replicator.replica.membership_chosen_at),
            })
        if existing is not None:
            raise ApiError(
                409, "member_exists",
                f"node {member.node_id} is already a member; remove it first to add it again "
                "(under a new incarnation)",
            )
        chosen_at = await self._change(lambda current: with_member(current, member))
        call.outcome = "ok"
        call.fields["member"] = member.node_id
        return Response.json(200, {
            "member": self._row(member, self.replicator.replica.membership),
            "join": self._join(chosen_at),
        })

    async def _remove(self, call: Call, rest: str) -> Response:
        if not rest.isdigit() or not 0 < int(rest) < 2**63:
            raise ApiError(400, "invalid_request", "the member id is a positive integer")
        node_id = int(rest)
        forwarded = await self._forward_unless_leader(call)
        if forwarded is not None:
            return forwarded
        latest = self.replicator.replica.membership
        member = latest.member(node_id)
        if member is None:
            raise ApiError(404, "member_not_found", f"node {node_id} is not a member")
        if member.voter and len(latest.voter_ids) <= 2:
            raise ApiError(
                409, "too_few_voters",
                f"node {node_id} is one of {len(latest.voter_ids)} voters: removing it would "
                "leave a cluster that stops at the first fault (or none at all); add and "
                "promote another member first",
            )
        await self._change(lambda current: without_member(current, node_id))
        call.outcome = "ok"
        call.fields["member"] = node_id
        return Response.json(200, {"removed": node_id})

    # ---- the leader's view ------------------------------------------------------------
    def members_view(self) -> dict[str, Any]:
        replica = self.replicator.replica
        latest = replica.membership
        return {
            "leader_id": replica.leader_id,
            "change_in_progress": self._change_in_progress(),
            "promote_lag_slots_max": self.replicator.promote_lag_slots_max,
            "members": [self._row(member, latest) for member in latest.members],
        }

    def _change_in_progress(self) -> bool:
        """Whether the latest chosen change is not in force yet (a proposal of another one
        would be refused as `membership_change_in_progress`)."""
        replica = self.replicator.replica
        return replica.membership_in_force != replica.membership

    def _row(self, member: Member, latest: Membership) -> dict[str, Any]:
        replica = self.replicator.replica
        progress = replica.peer_progress().get(member.node_id)
        last_contact_ms: int | None = None
        match_index: int | None = None
        lag: int | None = None
        if member.node_id == replica.node_id and replica.leader_id == replica.node_id:
            last_contact_ms, match_index, lag = 0, replica.chosen_through, 0
        elif progress is not None:
            last_contact_ms = round(progress.ticks_since_heard * TICK_S * 1000)
            match_index = progress.match_index
            lag = max(0, replica.chosen_through - progress.match_index)
        current = latest.member(member.node_id) or member
        return {
            "id": current.node_id,
            "incarnation": format_incarnation(current.incarnation),
            "voter": current.voter,
            "peer_addr": current.peer_addr.decode("utf-8", errors="replace"),
            "api_addr": current.api_addr.decode("utf-8", errors="replace"),
            "auto_promote": current.auto_promote,
            "last_contact_ms": last_contact_ms,
            "match_index": match_index,
            "lag": lag,
        }

    def _join(self, chosen_at: int) -> dict[str, Any]:
        """What a new member's node config needs: the configuration chosen at `config_slot`,
        the new member included, which becomes its `[[peers]]` field for field (incarnation
        as an integer), with `join = true` and `join_config_slot`. It must be exact: the node
        applies later changes to it, and a change applies only to the configuration it was
        made from."""
        latest = self.replicator.replica.membership
        return {
            "cluster_id": self.cluster_id,
            "config_slot": chosen_at,
            "peers": [
                {
                    "id": m.node_id,
                    "incarnation": format_incarnation(m.incarnation),
                    "peer_addr": m.peer_addr.decode("utf-8", errors="replace"),
                    "http_addr": m.api_addr.decode("utf-8", errors="replace"),
                    "voter": m.voter,
                    "auto_promote": m.auto_promote,
                }
                for m in latest.members
            ],
        }

    async def _change(self, change: Any) -> int:
        try:
            return await self.replicator.change_membership(change)
        except MembershipChangeInProgress:
            raise ApiError(
                409, "membership_change_in_progress",
                "another membership change is not in force yet (α = 64 slots after it was "
                "chosen); retry shortly",
            ) from None
        except MembershipChangeRefused as exc:
            raise ApiError(409, "membership_change_refused", str(exc)) from None

    # ---- input ------------------------------------------------------------------------
    def _member_from_body(self, call: Call) -> Member:
        try:
            body = json.loads(call.request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid_request", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_request", "the body is a JSON object")
        unknown = sorted(set(body) - _MEMBER_FIELDS)
        if unknown:
            raise ApiError(400, "invalid_request", f"unknown field {unknown[0]!r}")
        node_id = body.get("id")
        if type(node_id) is not int or not 0 < node_id < 2**63:
            raise ApiError(400, "invalid_request", "id: a positive integer")
        incarnation = _incarnation(body.get("incarnation"))
        promote = body.get("promote", True)
        if not isinstance(promote, bool):
            raise ApiError(400, "invalid_request", "promote: true or false")
        addresses = {}
        for key in ("peer_addr", "api_addr"):
            try:
                addresses[key] = str(parse_address(key, body.get(key))).encode()
            except ConfigError as exc:
                raise ApiError(400, "invalid_request", str(exc)) from None
        return Member(
            node_id, incarnation, False, addresses["peer_addr"], addresses["api_addr"],
            auto_promote=promote,
        )

    # ---- forwarding -------------------------------------------------------------------
    async def _forward_unless_leader(self, call: Call) -> Response | None:
        """None if this node leads (it answers); else the leader's answer to the same
        request, or 503 `unavailable` when no leader can be reached."""
        self.replicator.check_member()
        replica = self.replicator.replica
        if self.replicator.is_leader():
            return None
        leader = replica.leader_id
        request = call.request
        if leader is None or FORWARDED_HEADER in request.headers or self.forwarding is None:
            raise NotLeader(leader)
        member = replica.membership.member(leader)
        if member is None or not member.api_addr:
            raise NotLeader(leader)
        url = (
            f"{self.forwarding.scheme}://{member.api_addr.decode('utf-8', errors='replace')}"
            f"{request.path}"
        )
        headers = {FORWARDED_HEADER: str(replica.node_id), "content-type": "application/json"}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        try:
            async with httpx.AsyncClient(
                timeout=FORWARD_TIMEOUT_S, verify=self.forwarding.verify
            ) as client:
                answer = await client.request(
                    request.method, url, content=request.body, headers=headers
                )
        except httpx.HTTPError:
            raise NotLeader(leader) from None
        call.outcome = "forwarded"
        call.fields["leader"] = leader
        return Response(
            answer.status_code, answer.content,
            content_type=answer.headers.get("content-type", "application/json"),
        )


def _incarnation(value: object) -> int:
    if (
        not isinstance(value, str)
        or len(value) != _INCARNATION_HEX_DIGITS
        or any(c not in "0123456789abcdef" for c in value)
    ):
        raise ApiError(
            400, "invalid_request",
            "incarnation: the new node's, as 16 lower-case hex digits (its data directory's "
            "identity file, written by vault operator add-node)",
        )
    incarnation = int(value, 16)
    if not 0 < incarnation <= INCARNATION_MAX:
        raise ApiError(400, "invalid_request", "incarnation: out of range (1..2**62-1)")
    return incarnation
