"""ACL policies in Vault's language: parsing, path matching, priority and capability evaluation.

Owns the policy language subset of docs/policies.md (HCL via pyhcl, or JSON), Vault's priority
order between overlapping path patterns, the built-in `default` and `root` policies, and the
mapping from a request on a secret name (native or KV v2) to the policy paths it is checked
against. Pure and deterministic: the state machine evaluates policies at apply time with it, so it
must never read a clock, a file or a random source.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hcl.api import isHcl
from hcl.parser import HclParser

CAPABILITIES = ("create", "read", "update", "patch", "delete", "list", "sudo", "deny")
ROOT_POLICY = "root"
DEFAULT_POLICY = "default"
POLICY_TEXT_BYTES_MAX = 64 * 1024
POLICY_PATHS_MAX = 1024
POLICY_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
# Vault's path keys that this subset does not evaluate: refused rather than silently ignored.
_UNSUPPORTED_KEYS = frozenset(
    {
        "allowed_parameters",
        "denied_parameters",
        "required_parameters",
        "min_wrapping_ttl",
        "max_wrapping_ttl",
        "control_group",
        "mfa_methods",
        "policy",
        "subscribe_event_types",
    }
)

# Vault's `default` policy, trimmed to the endpoints this vault has.
DEFAULT_POLICY_TEXT = """\
# Allow tokens to look up, renew and revoke themselves.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
# Allow a token to look up its own capabilities on a path.
path "sys/capabilities-self" {
  capabilities = ["update"]
}
"""

# A native capability on a secret name -> the (policy path kind, Vault capability) pairs any one
# of which grants it; the path is `<mount>/<kind>/<name>` (docs/policies.md, "Request to path").
NATIVE_TO_ACL: dict[str, tuple[tuple[str, str], ...]] = {
    "create": (("data", "create"),),
    "update": (("data", "update"),),
    "read": (("data", "read"),),
    "history": (("metadata", "read"),),
    "list": (("metadata", "list"),),
    "delete": (("data", "delete"), ("delete", "update")),
    "undelete": (("undelete", "update"),),
    "destroy": (("destroy", "update"),),
    "metadata_write": (("metadata", "update"), ("metadata", "create")),
    "remove": (("metadata", "delete"),),
}
# Legacy prefix tokens name the native capabilities of docs/api.md; the newer checks map onto
# the legacy capability that always covered them.
LEGACY_EQUIVALENT = {
    "undelete": "delete",
    "metadata_write": "update",
    "remove": "destroy",
}
_SECRET_PATH_KINDS = ("data", "metadata", "delete", "undelete", "destroy")


class PolicyError(ValueError):
    """A policy document or name that is not in the supported language."""


@dataclass(frozen=True)
class PathRule:
    pattern: str
    capabilities: frozenset[str]


def check_policy_name(name: str) -> str:
    lowered = name.lower()  # Vault lower-cases policy names
    if not POLICY_NAME.fullmatch(lowered):
        raise PolicyError(
            "a policy name is 1 to 128 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return lowered


# One pyhcl parser per thread (a PLY parser keeps its stacks on itself while it parses).
_hcl_parsers = threading.local()


def _parse_hcl(text: str) -> Any:
    """`hcl.loads`, less its cost: pyhcl's wheel carries no pre-built parser table, so each
    `hcl.loads` built the LALR table again, about 0.1 s of CPU for every policy write (on the
    event loop) and every `VaultState()` (it parses the default policy). Built once per thread."""
    isHcl(text)  # raises ValueError for a blank document, as hcl.loads does
    parser = getattr(_hcl_parsers, "parser", None)
    if parser is None:
        parser = _hcl_parsers.parser = HclParser()
    return parser.parse(text)


def parse_policy(text: str) -> list[PathRule]:
    """A policy document (HCL or JSON) as its path rules, in document order."""
    if len(text.encode("utf-8")) > POLICY_TEXT_BYTES_MAX:
        raise PolicyError(f"a policy is at most {POLICY_TEXT_BYTES_MAX} bytes")
    try:
        document = json.loads(text) if text.lstrip().startswith("{") else _parse_hcl(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise PolicyError(f"the policy does not parse: {exc}") from None
    except Exception as exc:  # pyhcl's lexer and parser raise their own exception types
        raise PolicyError(f"the policy does not parse: {type(exc).__name__}") from None
    if not isinstance(document, dict):
        raise PolicyError("a policy is a set of path blocks")
    unknown = sorted(set(document) - {"path", "name"})
    if unknown:
        raise PolicyError(f"unsupported policy key {unknown[0]!r}")
    paths = document.get("path", {})
    if isinstance(paths, list):  # JSON may give the blocks as a list of objects
        merged: dict[str, Any] = {}
        for item in paths:
            if not isinstance(item, dict):
                raise PolicyError("each path block is an object")
            merged.update(item)
        paths = merged
    if not isinstance(paths, dict):
        raise PolicyError('path blocks are written path "PATTERN" { capabilities = [...] }')
    if len(paths) > POLICY_PATHS_MAX:
        raise PolicyError(f"a policy has at most {POLICY_PATHS_MAX} path blocks")
    return [_parse_rule(pattern, body) for pattern, body in paths.items()]


def _parse_rule(pattern: object, body: object) -> PathRule:
    if not isinstance(pattern, str):
        raise PolicyError("a path pattern is a string")
    check_pattern(pattern)
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        raise PolicyError(f"path {pattern!r}: the block must hold 'capabilities'")
    unsupported = sorted(set(body) & _UNSUPPORTED_KEYS)
    if unsupported:
        raise PolicyError(f"path {pattern!r}: {unsupported[0]!r} is not supported")
    unknown = sorted(set(body) - {"capabilities"})
    if unknown:
        raise PolicyError(f"path {pattern!r}: unknown key {unknown[0]!r}")
    capabilities = body.get("capabilities")
    if (
        not isinstance(capabilities, list)
        or not all(isinstance(c, str) for c in capabilities)
    ):
        raise PolicyError(f"path {pattern!r}: 'capabilities' is a list of strings")
    lowered = [c.lower() for c in capabilities]
    bad = [c for c in lowered if c not in CAPABILITIES]
    if bad:
        raise PolicyError(
            f"path {pattern!r}: unknown capability {bad[0]!r} (known: {', '.join(CAPABILITIES)})"
        )
    return PathRule(pattern, frozenset(lowered))


def check_pattern(pattern: str) -> None:
    if "{{" in pattern:
        raise PolicyError(f"path {pattern!r}: templated policy paths are not supported")
    if "*" in pattern[:-1]:
        raise PolicyError(f"path {pattern!r}: '*' is only allowed as the last character")
    if len(pattern) > 1024 or any(ord(c) < 0x20 for c in pattern):
        raise PolicyError("a path pattern is at most 1024 printable characters")


def rules_to_wire(rules: Iterable[PathRule]) -> list[list[Any]]:
    return [[rule.pattern, sorted(rule.capabilities)] for rule in rules]


def rules_from_wire(wire: Iterable[Sequence[Any]]) -> list[PathRule]:
    return [PathRule(pattern, frozenset(caps)) for pattern, caps in wire]


# ---- matching ----------------------------------------------------------------------------
def _is_exact(pattern: str) -> bool:
    return not pattern.endswith("*") and "+" not in pattern.split("/")


def _matcher(pattern: str) -> re.Pattern[str]:
    glob = pattern.endswith("*")
    body = pattern[:-1] if glob else pattern
    parts = [r"[^/]*" if segment == "+" else re.escape(segment) for segment in body.split("/")]
    return re.compile("/".join(parts) + (".*" if glob else ""), re.DOTALL)


def priority_key(pattern: str) -> tuple[int, int, int, int, str]:
    """Larger is higher priority, Vault's order for non-exact patterns: the first wildcard
    (`+` segment or `*`) later; not ending in `*`; fewer `+` segments; longer; then
    lexicographically larger."""
    segments = pattern.split("/")
    positions = []
    offset = 0
    for segment in segments:
        if segment == "+":
            positions.append(offset)
        offset += len(segment) + 1
    if pattern.endswith("*"):
        positions.append(len(pattern) - 1)
    first_wildcard = min(positions) if positions else len(pattern)
    return (
        first_wildcard,
        0 if pattern.endswith("*") else 1,
        -segments.count("+"),
        len(pattern),
        pattern,
    )


@dataclass
class Acl:
    """The merged rules of a token's policies. Rules on the same pattern merge (capabilities
    united; `deny` among them leaves none); for a path, an exact pattern wins, else the matching
    pattern of highest priority alone decides."""

    exact: dict[str, frozenset[str]] = field(default_factory=dict)
    # (priority key, pattern, matcher, capabilities), highest priority first
    wildcards: list[tuple[tuple[int, int, int, int, str], str, re.Pattern[str], frozenset[str]]] = (
        field(default_factory=list)
    )
    root: bool = False

    @classmethod
    def build(cls, policies: Iterable[Iterable[PathRule]], *, root: bool = False) -> Acl:
        merged: dict[str, set[str]] = {}
        for rules in policies:
            for rule in rules:
                merged.setdefault(rule.pattern, set()).update(rule.capabilities)
        acl = cls(root=root)
        for pattern, caps in merged.items():
            final = frozenset() if "deny" in caps else frozenset(caps)
            if _is_exact(pattern):
                acl.exact[pattern] = final
            else:
                acl.wildcards.append((priority_key(pattern), pattern, _matcher(pattern), final))
        acl.wildcards.sort(key=lambda item: item[0], reverse=True)
        return acl

    def capabilities(self, path: str, *, listing: bool = False) -> frozenset[str]:
        if self.root:
            return frozenset(c for c in CAPABILITIES if c != "deny")
        found = self.exact.get(path)
        if found is None and listing and path.endswith("/"):
            # Vault: a LIST of `a/b/` is also granted by a rule on `a/b`.
            found = self.exact.get(path[:-1])
        if found is not None:
            return found
        for _, _pattern, matcher, caps in self.wildcards:
            if matcher.fullmatch(path) or (
                listing and path.endswith("/") and matcher.fullmatch(path[:-1])
            ):
                return caps
        return frozenset()

    def allows(self, path: str, capability: str) -> bool:
        return capability in self.capabilities(path, listing=capability == "list")


def secret_checks(mount: str, capability: str, name: str) -> list[tuple[str, str]]:
    """The (policy path, capability) pairs any one of which grants a native capability on a
    secret name; `list` of a prefix checks `<mount>/metadata/<prefix>`."""
    return [(f"{mount}/{kind}/{name}", cap) for kind, cap in NATIVE_TO_ACL[capability]]


def acl_permits(acl: Acl, mount: str, capability: str, name: str) -> bool:
    return any(acl.allows(path, cap) for path, cap in secret_checks(mount, capability, name))


def acl_sees(acl: Acl, mount: str, name: str) -> bool:
    """Whether the ACL grants any capability on any of a secret's paths (list filtering)."""
    return any(acl.capabilities(f"{mount}/{kind}/{name}") for kind in _SECRET_PATH_KINDS)


def legacy_permits(rules: Sequence[Mapping[str, Any]], capability: str, name: str) -> bool:
    """The pre-policy prefix rules a token may carry: any rule whose prefix starts the name."""
    legacy = LEGACY_EQUIVALENT.get(capability, capability)
    return any(name.startswith(r["prefix"]) and legacy in r["capabilities"] for r in rules)
