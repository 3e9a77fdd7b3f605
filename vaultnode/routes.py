"""The route table's vocabulary: a request being served (`Call`), and per route its handler,
consistency rule and the access it needs (`RouteSpec`).

This module owns what a route declares; vaultnode/api.py owns the table and the dispatcher that
applies each declaration before the handler runs. Adding a route is one `RouteSpec` plus its
handler (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vaultnode.auth import CAPABILITIES, Principal
from vaultnode.http_server import Request, Response


@dataclass
class Call:
    """One request being served: what the log line about it will say."""

    request: Request
    request_id: str
    started: float
    principal: Principal | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    route: str = "unmatched"  # RouteSpec.label: for events, audit and metrics (never a name)
    consistency: Consistency | None = None  # the matched route's
    outcome: str | None = None
    # A follower confirmed its state is current (a read point from the leader) before serving.
    caught_up: bool = False
    # Set on a `consistency=stale` read served within the bound: the bound, for the answer.
    stale_bound_ms: int | None = None


Route = Callable[[Call, str], Awaitable[Response]]


class Consistency(StrEnum):
    """How current this node's state must be before a route's handler runs on it."""

    # Answered from whatever this node has applied, with no read point: health, metrics, seal.
    LOCAL = "local"
    # Decided on this node's state: a follower first gets a read point from the leader (a GET
    # with `?consistency=stale` is served within the staleness bound instead).
    READ_POINT = "read_point"
    # A write whose outcome, token liveness included, is decided when it is applied: a follower
    # needs a read point only if the token is unknown here (it may be news not yet applied).
    AT_APPLY = "at_apply"


class Access(StrEnum):
    """Who may call a route, checked by the dispatcher before the handler runs. A route whose
    path ends in a secret name may instead name the capability it needs on that name
    (`create`, `update`, `read`, `history`, `delete`, `undelete`, `destroy`: vaultnode/auth.py)."""

    PUBLIC = "public"  # no token
    TOKEN = "token"  # any valid token; the handler checks what it touches (lists, batches, KV v2)
    ROOT = "root"  # the root token


# `undelete` is not a native policy capability (a native rule's `delete` covers it) but ACL
# policies grant it apart, as Vault does (vaultnode/policy.py).
NAME_CAPABILITIES = (frozenset(CAPABILITIES) - {"list"}) | {"undelete"}


@dataclass(frozen=True)
class RouteSpec:
    """One entry of the route table. A path ending in `/` is a prefix: the rest of the request
    path is the handler's argument (a secret name unless `rest_label` says otherwise)."""

    method: str
    path: str
    handler: Route
    consistency: Consistency
    access: str  # an Access value or one of NAME_CAPABILITIES
    rest_label: str = "{name}"

    @property
    def exact(self) -> bool:
        return not self.path.endswith("/")

    @property
    def label(self) -> str:
        """The route as events, audit lines and metrics name it: never a secret's name."""
        return self.path if self.exact else self.path + self.rest_label


class ApiError(Exception):
    """A refusal with its HTTP status and stable error code (docs/api.md)."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
