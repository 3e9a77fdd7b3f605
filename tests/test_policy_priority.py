# ruff: noqa: E501  (a table reads best one case per line)
"""Policy evaluation (vaultnode/policy.py), table-driven from Vault's documented priority examples.

Pure and fast: each case is (policies as HCL, path, expected capabilities). The rules under test
are Vault's (developer.hashicorp.com/vault/docs/concepts/policies, "Priority matching"): an exact
path wins; otherwise, of the matching patterns, the one whose first wildcard (`+` or `*`) comes
later wins, then one not ending in `*`, then fewer `+` segments, then the longer, then the
lexicographically larger; rules on the same pattern merge and `deny` among them leaves nothing.
"""

from __future__ import annotations

import pytest

from vaultnode.policy import (
    Acl,
    PolicyError,
    acl_permits,
    acl_sees,
    check_policy_name,
    legacy_permits,
    parse_policy,
    priority_key,
)


def rule(pattern: str, *caps: str) -> str:
    quoted = ", ".join(f'"{c}"' for c in caps)
    return f'path "{pattern}" {{ capabilities = [{quoted}] }}\n'


def caps_of(policies: list[str], path: str, listing: bool = False) -> set[str]:
    acl = Acl.build(parse_policy(text) for text in policies)
    return set(acl.capabilities(path, listing=listing))


R, L, C, U, D, S = "read", "list", "create", "update", "delete", "sudo"

# (id, policies, path, expected capabilities)
CASES: list[tuple[str, list[str], str, set[str]]] = [
    # -- deny by default, exact paths
    ("empty-policy", [""], "secret/data/a", set()),
    ("exact-match", [rule("secret/data/a", R)], "secret/data/a", {R}),
    ("exact-no-prefix-match", [rule("secret/data/a", R)], "secret/data/ab", set()),
    ("exact-no-child-match", [rule("secret/data/a", R)], "secret/data/a/b", set()),
    ("exact-not-parent", [rule("secret/data/a/b", R)], "secret/data/a", set()),
    ("exact-trailing-slash-distinct", [rule("secret/data/a/", R)], "secret/data/a", set()),
    # -- `*` as a prefix glob
    ("glob-matches-child", [rule("secret/data/*", R)], "secret/data/a", {R}),
    ("glob-matches-deep", [rule("secret/data/*", R)], "secret/data/a/b/c", {R}),
    ("glob-matches-empty-rest", [rule("secret/data/*", R)], "secret/data/", {R}),
    ("glob-not-parent", [rule("secret/data/*", R)], "secret/data", set()),
    ("glob-mid-segment", [rule("secret/data/app*", R)], "secret/data/apple", {R}),
    ("glob-mid-segment-deep", [rule("secret/data/app*", R)], "secret/data/app/db", {R}),
    ("glob-mid-segment-miss", [rule("secret/data/app*", R)], "secret/data/ap", set()),
    ("glob-everything", [rule("*", R)], "anything/at/all", {R}),
    # -- `+` as exactly one segment
    ("plus-one-segment", [rule("secret/+/a", R)], "secret/data/a", {R}),
    ("plus-other-segment", [rule("secret/+/a", R)], "secret/metadata/a", {R}),
    ("plus-not-two-segments", [rule("secret/+/a", R)], "secret/x/y/a", set()),
    ("plus-not-zero-segments", [rule("secret/+/a", R)], "secret/a", set()),
    ("plus-last", [rule("secret/data/+", R)], "secret/data/a", {R}),
    ("plus-last-not-deeper", [rule("secret/data/+", R)], "secret/data/a/b", set()),
    ("plus-then-glob", [rule("secret/+/team/*", R)], "secret/data/team/x/y", {R}),
    ("plus-then-glob-miss", [rule("secret/+/team/*", R)], "secret/data/other/x", set()),
    ("two-plus", [rule("secret/+/+/db", R)], "secret/data/app/db", {R}),
    ("two-plus-miss", [rule("secret/+/+/db", R)], "secret/data/db", set()),
    ("plus-literal-in-segment", [rule("secret/data/a+b", R)], "secret/data/a+b", {R}),
    ("plus-literal-not-wildcard", [rule("secret/data/a+b", R)], "secret/data/axb", set()),
    # -- exact beats every wildcard
    ("exact-beats-glob", [rule("secret/data/*", R), rule("secret/data/a", U)], "secret/data/a", {U}),
    ("exact-beats-plus", [rule("secret/+/a", R), rule("secret/data/a", U)], "secret/data/a", {U}),
    ("exact-beats-glob-deny", [rule("secret/*", "deny"), rule("secret/data/a", R)], "secret/data/a", {R}),
    ("exact-deny-beats-glob", [rule("secret/*", R), rule("secret/data/a", "deny")], "secret/data/a", set()),
    ("glob-elsewhere-after-exact", [rule("secret/*", R), rule("secret/data/a", "deny")], "secret/data/b", {R}),
    # -- rule 1: the first wildcard later wins
    ("later-glob-wins", [rule("secret/*", R), rule("secret/data/*", U)], "secret/data/a", {U}),
    ("later-glob-wins-reversed", [rule("secret/data/*", U), rule("secret/*", R)], "secret/data/a", {U}),
    ("later-plus-beats-earlier-glob", [rule("secret/*", R), rule("secret/data/+", U)], "secret/data/a", {U}),
    ("later-glob-beats-earlier-plus", [rule("secret/+/a*", R), rule("secret/data/*", U)], "secret/data/ab", {U}),
    ("docs-example-secret-star-vs-plus", [rule("secret/*", R), rule("secret/+/+/foo/*", U)], "secret/a/b/foo/c", {R}),
    ("first-wildcard-position", [rule("a/+/c/*", R), rule("a/b/+/*", U)], "a/b/c/d", {U}),
    # -- rule 2: not ending in `*` wins when the first wildcard ties
    ("no-glob-beats-glob", [rule("secret/+/a", U), rule("secret/+/*", R)], "secret/data/a", {U}),
    ("no-glob-beats-glob-reversed", [rule("secret/+/*", R), rule("secret/+/a", U)], "secret/data/a", {U}),
    ("plus-last-beats-glob-same-place", [rule("secret/data/+", U), rule("secret/data/*", R)], "secret/data/a", {U}),
    # -- rule 3: fewer `+` segments wins
    ("fewer-plus-wins", [rule("secret/+/+/*", R), rule("secret/+/a/*", U)], "secret/data/a/b", {U}),
    ("fewer-plus-wins-no-glob", [rule("a/+/+/d", R), rule("a/+/c/d", U)], "a/b/c/d", {U}),
    # -- rule 4: the longer wins
    ("longer-glob-wins", [rule("secret/data/a*", R), rule("secret/data/ab*", U)], "secret/data/abc", {U}),
    ("longer-glob-wins-reversed", [rule("secret/data/ab*", U), rule("secret/data/a*", R)], "secret/data/abc", {U}),
    ("longer-plus-pattern-wins", [rule("a/+/c*", R), rule("a/+/cd*", U)], "a/b/cde", {U}),
    # -- rule 5: lexicographically larger wins
    ("lexicographic-larger-wins", [rule("a/+/x/*", R), rule("a/+/y/*", U)], "a/b/x/1", {R}),
    ("lexicographic-tiebreak", [rule("a/+/+/y", R), rule("a/+/x/+", U)], "a/1/x/y", {U}),
    ("lexicographic-tiebreak-reversed", [rule("a/+/x/+", U), rule("a/+/+/y", R)], "a/1/x/y", {U}),
    # -- the highest-priority rule alone decides (no union across patterns)
    ("no-union-across-patterns", [rule("secret/*", R), rule("secret/data/*", U)], "secret/data/x", {U}),
    ("narrow-grants-less", [rule("secret/*", R, U, D), rule("secret/data/ro/*", R)], "secret/data/ro/x", {R}),
    # -- merging rules on the same pattern
    ("merge-same-pattern", [rule("secret/data/*", R), rule("secret/data/*", U)], "secret/data/a", {R, U}),
    ("merge-same-exact", [rule("secret/data/a", R), rule("secret/data/a", L)], "secret/data/a", {R, L}),
    ("deny-in-merge-wins", [rule("secret/data/*", R, U), rule("secret/data/*", "deny")], "secret/data/a", set()),
    ("deny-with-sudo", [rule("sys/*", S, "deny")], "sys/x", set()),
    ("deny-exact-merge", [rule("secret/data/a", R), rule("secret/data/a", "deny")], "secret/data/a", set()),
    ("deny-glob-only-where-highest", [rule("secret/data/*", "deny"), rule("secret/data/ok/*", R)], "secret/data/ok/x", {R}),
    ("deny-glob-covers-rest", [rule("secret/data/*", "deny"), rule("secret/data/ok/*", R)], "secret/data/no/x", set()),
    ("deny-plus", [rule("secret/+/a", "deny"), rule("secret/*", R)], "secret/data/a", set()),
    # -- LIST on a folder: the rule without the trailing slash grants it too
    ("list-exact-no-slash", [rule("secret/metadata/app", L)], "secret/metadata/app/", {L}),
    ("list-glob-no-slash", [rule("secret/+/app", L)], "secret/metadata/app/", {L}),
    ("list-exact-with-slash", [rule("secret/metadata/app/", L)], "secret/metadata/app/", {L}),
    # -- capabilities are kept as written (sudo, patch)
    ("sudo-kept", [rule("sys/policies/acl/*", C, U, S)], "sys/policies/acl/x", {C, U, S}),
    ("patch-kept", [rule("secret/data/*", "patch")], "secret/data/a", {"patch"}),
    ("case-insensitive-caps", ['path "a" { capabilities = ["READ"] }'], "a", {R}),
]


@pytest.mark.parametrize(
    ("policies", "path", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_priority(policies: list[str], path: str, expected: set[str]) -> None:
    listing = path.endswith("/")
    assert caps_of(policies, path, listing=listing) == expected


def test_the_table_has_at_least_60_cases() -> None:
    assert len(CASES) >= 60
    assert len({case[0] for case in CASES}) == len(CASES)


def test_list_trailing_slash_only_for_list() -> None:
    policy = [rule("secret/metadata/app", R)]
    assert caps_of(policy, "secret/metadata/app/", listing=False) == set()


def test_priority_key_orders_as_documented() -> None:
    ordered = sorted(
        ["secret/*", "secret/+/+/foo/*", "secret/data/*", "secret/data/+", "secret/data/a*"],
        key=priority_key,
        reverse=True,
    )
    # secret/data/a* has its wildcard latest; secret/data/+ ties secret/data/* but ends without *.
    assert ordered[:3] == ["secret/data/a*", "secret/data/+", "secret/data/*"]
    assert ordered[-1] == "secret/+/+/foo/*"


def test_root_acl_holds_everything_but_deny() -> None:
    assert "deny" not in Acl(root=True).capabilities("anything")
    assert "sudo" in Acl(root=True).capabilities("anything")


# ---- the language subset -----------------------------------------------------------------
def test_json_policies_read_like_hcl() -> None:
    text = '{"path": {"secret/data/*": {"capabilities": ["read"]}}}'
    assert caps_of([text], "secret/data/x") == {R}
    listed = '{"path": [{"a/*": {"capabilities": ["list"]}}, {"b": {"capabilities": ["read"]}}]}'
    assert caps_of([listed], "b") == {R}


@pytest.mark.parametrize(
    "text",
    [
        'path "secret/*/x" { capabilities = ["read"] }',  # * not last
        'path "secret/{{identity.entity.id}}/*" { capabilities = ["read"] }',  # templated
        'path "a" { capabilities = ["read"] allowed_parameters = { "x" = [] } }',
        'path "a" { capabilities = ["fly"] }',
        'path "a" { policy = "read" }',
        'path "a" { capabilities = "read" }',
        'user "a" { capabilities = ["read"] }',
        "path {",
        "[1, 2]",
        "x" * (64 * 1024 + 1),
    ],
)
def test_unsupported_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_policy_names_are_lowercased_and_checked() -> None:
    assert check_policy_name("App-Readers") == "app-readers"
    for bad in ("", "a/b", "-x", "a" * 129, "a b"):
        with pytest.raises(PolicyError):
            check_policy_name(bad)


# ---- request to path ---------------------------------------------------------------------
def test_native_names_map_to_kv2_paths() -> None:
    acl = Acl.build([parse_policy(rule("secret/data/app/*", R) + rule("secret/metadata/app/*", L))])
    assert acl_permits(acl, "secret", "read", "app/db")
    assert not acl_permits(acl, "secret", "update", "app/db")
    assert acl_permits(acl, "secret", "list", "app/db")
    assert not acl_permits(acl, "secret", "history", "app/db")  # history is read on metadata/
    assert acl_sees(acl, "secret", "app/db")
    assert not acl_sees(acl, "secret", "other/db")
    assert not acl_permits(acl, "kv", "read", "app/db")  # another mount, other paths


def test_kv2_soft_delete_is_delete_on_data_or_update_on_delete() -> None:
    by_data = Acl.build([parse_policy(rule("secret/data/*", D))])
    by_delete = Acl.build([parse_policy(rule("secret/delete/*", U))])
    assert acl_permits(by_data, "secret", "delete", "x")
    assert acl_permits(by_delete, "secret", "delete", "x")
    assert not acl_permits(by_data, "secret", "destroy", "x")


def test_legacy_prefix_rules_keep_their_meaning() -> None:
    rules = [{"prefix": "app/", "capabilities": ["read", "delete", "destroy", "update"]}]
    assert legacy_permits(rules, "read", "app/db")
    assert legacy_permits(rules, "undelete", "app/db")  # always covered by delete
    assert legacy_permits(rules, "remove", "app/db")  # metadata delete: destroy
    assert legacy_permits(rules, "metadata_write", "app/db")  # metadata write: update
    assert not legacy_permits(rules, "read", "other")
