"""The `vault` CLI for named ACL policies (issue 18): the real command against a real node.

`vault policy write|read|list|delete`, `vault token create --policy NAME`, `token capabilities`,
`token lookup|revoke --accessor`, `token accessors` and `vault operator generate-root`, each run
as a subprocess against one module-scoped node; generate-root from key shares gets its own Shamir
node. Exit codes are cli/main.py's: 1 with the server's code and message, 2 for bad input found
before any request. The generate-root case replaces the root token, so it runs last.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main as cli_main
from simulations.harness import Cluster, free_port_block, make_cluster, started_cluster
from storage import shamir
from storage.rootkey import generate_root_key, write_root_key_file
from tests.test_cli import assert_server_error, vault_cli, vault_cli_at_a_terminal
from tests.test_unseal import SHAMIR, unseal, wait_sealed

APP_POLICY = """\
# Read the app's secrets, nothing else.
path "secret/data/pol/app/*" {
  capabilities = ["read"]
}
"""
SHARED_POLICY_JSON = '{"path": {"secret/data/pol/shared/*": {"capabilities": ["read", "list"]}}}'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("cli-policies"), 1)


def ok(finished: subprocess.CompletedProcess[str]) -> str:
    assert finished.returncode == 0, (finished.stdout, finished.stderr)
    return finished.stdout


def fields(stdout: str) -> dict[str, str]:
    """`key: value` lines as a dict."""
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in stdout.splitlines())}


def seed(cluster: Cluster, name: str, value: str) -> None:
    with cluster.client() as client:
        response = client.post(f"/v1/secrets/{name}", json={"value": value})
        assert response.status_code == 201, response.text


def write_policies(cluster: Cluster, tmp_path: Path) -> None:
    policy_file = tmp_path / "app.hcl"
    policy_file.write_text(APP_POLICY)
    ok(vault_cli(cluster, "policy", "write", "pol-app", str(policy_file)))
    ok(vault_cli(cluster, "policy", "write", "pol-shared", "-", stdin_text=SHARED_POLICY_JSON))


def token_with(cluster: Cluster, *policies: str) -> dict[str, str]:
    args = [arg for name in policies for arg in ("--policy", name)]
    return fields(ok(vault_cli(cluster, "token", "create", *args, "--display-name", "pol")))


def test_a_policy_is_written_from_a_file_and_stdin_read_listed_and_deleted(
    cluster: Cluster, tmp_path: Path
) -> None:
    policy_file = tmp_path / "app.hcl"
    policy_file.write_text(APP_POLICY)
    written = ok(vault_cli(cluster, "policy", "write", "pol-app", str(policy_file)))
    assert written == "policy pol-app written\n"
    piped = vault_cli(cluster, "policy", "write", "POL-Shared", "-", stdin_text=SHARED_POLICY_JSON)
    assert ok(piped) == "policy pol-shared written\n"  # lower-cased, as Vault does

    assert ok(vault_cli(cluster, "policy", "read", "pol-app")) == APP_POLICY
    assert ok(vault_cli(cluster, "policy", "read", "pol-shared")) == SHARED_POLICY_JSON + "\n"
    listed = ok(vault_cli(cluster, "policy", "list")).splitlines()
    assert {"pol-app", "pol-shared", "default", "root"} <= set(listed)

    assert ok(vault_cli(cluster, "policy", "delete", "pol-shared")) == "policy pol-shared deleted\n"
    assert "pol-shared" not in ok(vault_cli(cluster, "policy", "list")).splitlines()
    gone = vault_cli(cluster, "policy", "read", "pol-shared")
    assert_server_error(gone, "not_found")
    assert "no policy named 'pol-shared'" in gone.stderr


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param(
            'path "a/*/b" { capabilities = ["read"] }', "only allowed as the last", id="glob"
        ),
        pytest.param("path {", "does not parse", id="syntax"),
        pytest.param('path "a" { capabilities = ["fly"] }', "unknown capability 'fly'", id="cap"),
    ],
)
def test_a_policy_that_does_not_parse_is_refused_with_the_servers_message(
    cluster: Cluster, text: str, reason: str
) -> None:
    refused = vault_cli(cluster, "policy", "write", "pol-bad", "-", stdin_text=text)
    assert_server_error(refused, "bad_request")
    assert "failed to parse policy" in refused.stderr and reason in refused.stderr
    assert_server_error(vault_cli(cluster, "policy", "read", "pol-bad"), "not_found")


def test_a_token_created_with_policies_reads_only_what_they_allow(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_policies(cluster, tmp_path)
    for name in ("pol/app/db", "pol/shared/db", "pol/other/db"):
        seed(cluster, name, f"value of {name}")
    created = token_with(cluster, "pol-app", "pol-shared")
    assert created["policies"] == "default, pol-app, pol-shared"
    assert created["token"].startswith("vlt_") and created["expires"] == "never"
    token = created["token"]

    for name in ("pol/app/db", "pol/shared/db"):
        assert ok(vault_cli(cluster, "get", name, token=token)) == f"value of {name}\n"
    assert_server_error(vault_cli(cluster, "get", "pol/other/db", token=token), "forbidden")
    assert_server_error(vault_cli(cluster, "create", "pol/app/new", "x", token=token), "forbidden")
    # Names and prefix rules together (root only), with a lifetime.
    mixed = vault_cli(
        cluster, "token", "create", "--policy", "pol-app", "--policy", "pol/other/=read",
        "--ttl", "600",
    )
    both = fields(ok(mixed))["token"]
    assert fields(mixed.stdout)["expires"] == "in 600 s"
    for name in ("pol/app/db", "pol/other/db"):
        assert ok(vault_cli(cluster, "get", name, token=both)) == f"value of {name}\n"
    # A name with no policy behind it is Vault's "grants nothing": allowed, but said.
    typo = vault_cli(cluster, "token", "create", "--policy", "pol-ap")
    assert "Warning: there is no policy named 'pol-ap'" in typo.stderr
    typo_token = fields(ok(typo))["token"]
    assert_server_error(vault_cli(cluster, "get", "pol/app/db", token=typo_token), "forbidden")


def test_token_capabilities_for_itself_for_another_token_and_by_accessor(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_policies(cluster, tmp_path)
    created = token_with(cluster, "pol-app")
    token, accessor = created["token"], created["accessor"]
    app, other = "secret/data/pol/app/db", "secret/data/pol/other/db"

    def capabilities(*args: str, as_token: str | None = None, stdin: str | None = None) -> str:
        finished = vault_cli(
            cluster, "token", "capabilities", *args, token=as_token, stdin_text=stdin
        )
        return ok(finished).strip()

    assert capabilities(app, as_token=token) == "read"
    assert capabilities(other, as_token=token) == "deny"
    assert capabilities(app) == "root"
    assert capabilities(token, app) == "read"
    assert capabilities(token, other) == "deny"
    assert capabilities("-", app, stdin=token + "\n") == "read"
    assert capabilities("--accessor", accessor, app) == "read"
    # Asking about another token needs `update` on sys/capabilities, which pol-app lacks.
    refused = vault_cli(cluster, "token", "capabilities", token, app, token=token)
    assert_server_error(refused, "forbidden")
    assert token not in refused.stderr
    bogus = vault_cli(cluster, "token", "capabilities", "vlt_not-a-token", app)
    assert_server_error(bogus, "bad_request")
    assert "vlt_not-a-token" not in bogus.stderr


def test_a_token_looked_up_and_revoked_by_accessor_stops_working(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_policies(cluster, tmp_path)
    seed(cluster, "pol/app/revoked", "v")
    created = token_with(cluster, "pol-app")
    token, accessor = created["token"], created["accessor"]
    assert ok(vault_cli(cluster, "get", "pol/app/revoked", token=token)) == "v\n"
    assert accessor in ok(vault_cli(cluster, "token", "accessors")).splitlines()
    assert_server_error(vault_cli(cluster, "token", "accessors", token=token), "forbidden")
    looked_up = ok(vault_cli(cluster, "token", "lookup", "--accessor", accessor)).splitlines()
    assert looked_up[0] == f"pol ({accessor})"
    assert looked_up[1] == "policies: default, pol-app"

    revoked = ok(vault_cli(cluster, "token", "revoke", "--accessor", accessor))
    assert accessor in revoked
    assert_server_error(vault_cli(cluster, "get", "pol/app/revoked", token=token), "unauthorized")
    assert accessor not in ok(vault_cli(cluster, "token", "accessors")).splitlines()
    again = vault_cli(cluster, "token", "revoke", "--accessor", accessor)
    assert_server_error(again, "bad_request")
    assert "invalid accessor" in again.stderr
    assert_server_error(
        vault_cli(cluster, "token", "lookup", "--accessor", accessor), "bad_request"
    )


def test_a_token_creates_children_only_with_its_own_policies_and_they_die_with_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    write_policies(cluster, tmp_path)
    seed(cluster, "pol/app/child", "c")
    minter_policy = 'path "auth/token/create" { capabilities = ["update"] }'
    ok(vault_cli(cluster, "policy", "write", "pol-minter", "-", stdin_text=minter_policy))
    parent = token_with(cluster, "pol-minter", "pol-app")
    escalate = vault_cli(
        cluster, "token", "create", "--policy", "pol-shared", token=parent["token"]
    )
    assert_server_error(escalate, "forbidden")
    assert "pol-shared" in escalate.stderr
    prefix_rule = vault_cli(cluster, "token", "create", "--policy", "=read", token=parent["token"])
    assert_server_error(prefix_rule, "forbidden")  # the native route is root's alone
    child = fields(
        ok(vault_cli(cluster, "token", "create", "--policy", "pol-app", token=parent["token"]))
    )
    assert child["policies"] == "default, pol-app"
    assert ok(vault_cli(cluster, "get", "pol/app/child", token=child["token"])) == "c\n"

    ok(vault_cli(cluster, "token", "revoke", "--accessor", parent["accessor"]))
    for token in (parent["token"], child["token"]):
        assert_server_error(vault_cli(cluster, "get", "pol/app/child", token=token), "unauthorized")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["policy", "write", "p", "{missing}"], "cannot read", id="missing-file"),
        pytest.param(["policy", "write", "p", "{empty}"], "is empty", id="empty-file"),
        pytest.param(["policy", "write", "p", "{large}"], "larger than", id="too-large"),
        pytest.param(["policy", "write", "a/b", "{empty}"], "policy name", id="bad-name"),
        pytest.param(["policy", "read", "a b"], "policy name", id="bad-read-name"),
        pytest.param(["token", "create", "--policy", "Pol/x"], "policy name", id="bad-token-name"),
        pytest.param(
            ["token", "capabilities", "--accessor", "a", "t", "p"], "not both", id="token-and-acc"
        ),
        pytest.param(["token", "revoke"], "--accessor", id="revoke-without-accessor"),
        pytest.param(
            ["operator", "generate-root", "--root-key-file", "{missing}", "--share-file", "x"],
            "not both",
            id="shares-and-key",
        ),
        pytest.param(
            ["operator", "generate-root", "--root-key-file", "{missing}"],
            "does not exist",
            id="missing-key-file",
        ),
        pytest.param(
            ["operator", "generate-root", "--share-file", "{missing}"],
            "cannot read",
            id="missing-share-file",
        ),
        pytest.param(
            ["operator", "generate-root", "--shares-dir", "{dir}"], "no share-N", id="empty-dir"
        ),
    ],
)
def test_bad_input_exits_2_with_a_message_before_any_request(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "large").write_text("#" * (64 * 1024 + 1))
    (tmp_path / "dir").mkdir()
    files = {name: str(tmp_path / name) for name in ("missing", "empty", "large", "dir")}
    # A dead address: nothing may need the server to refuse these.
    dead = f"127.0.0.1:{free_port_block(1)}"
    result = CliRunner().invoke(
        cli_main,
        ["--addr", dead, "--token", "vlt_unused", *(a.format(**files) for a in args)],
        env={"VAULT_TIMEOUT": "1"},
    )
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Error:" in result.stderr and message in result.stderr, result.stderr
    assert result.stdout == ""


def generate_root(
    cluster: Cluster, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`vault operator generate-root` without a token: the key material is the only proof."""
    no_token = {"VAULT_TOKEN": ""}
    return vault_cli(
        cluster, "operator", "generate-root", *args, stdin_text=stdin, env_overrides=no_token
    )


def root_key_file_of(cluster: Cluster) -> Path:
    config_path = cluster.nodes[0].config_path
    config = tomllib.loads(config_path.read_text())
    return (config_path.parent / str(config["root_key_file"])).resolve()


def test_generate_root_from_the_root_key_file_replaces_the_root_token(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Runs last in this module: it replaces the cluster's root token."""
    old_root = cluster.root_token
    foreign = tmp_path / "foreign.key"
    write_root_key_file(foreign, generate_root_key())
    wrong = vault_cli(cluster, "operator", "generate-root", "--root-key-file", str(foreign))
    assert_server_error(wrong, "forbidden")
    assert ok(vault_cli(cluster, "token", "lookup")).strip()  # nothing changed
    # At a terminal without shares or key file it would prompt for shares: a file node has none.
    at_terminal = vault_cli_at_a_terminal(cluster, "operator", "generate-root")
    assert at_terminal.returncode == 2 and "--root-key-file" in at_terminal.stderr

    key_file = root_key_file_of(cluster)
    generated = generate_root(cluster, "--root-key-file", str(key_file))
    shown = fields(ok(generated))
    new_root = shown["new root token"]
    assert "revoked 1 earlier root token" in generated.stdout
    key_text = key_file.read_text().strip()
    assert key_text.split(":", 1)[1] not in generated.stdout + generated.stderr
    assert_server_error(vault_cli(cluster, "token", "lookup", token=old_root), "unauthorized")
    assert '"root": true' in ok(vault_cli(cluster, "token", "lookup", "--json", token=new_root))
    cluster.root_token = new_root

    # --token-out: the token goes to a new 0600 file, not the terminal; the previous one dies.
    token_file = tmp_path / "root-token"
    to_file = ok(
        vault_cli(
            cluster, "operator", "generate-root", "--root-key-file", str(key_file),
            "--token-out", str(token_file),
        )
    )
    newest = token_file.read_text().strip()
    assert newest not in to_file and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert_server_error(vault_cli(cluster, "token", "lookup", token=new_root), "unauthorized")
    assert "root" in ok(vault_cli(cluster, "policy", "list", token=newest)).splitlines()
    cluster.root_token = newest
    exists = vault_cli(
        cluster, "operator", "generate-root", "--root-key-file", str(key_file),
        "--token-out", str(token_file),
    )
    assert exists.returncode == 2 and "exists" in exists.stderr
    assert ok(vault_cli(cluster, "token", "lookup", token=newest))  # refused before any request


def test_generate_root_from_unseal_key_shares(tmp_path: Path) -> None:
    shamir_cluster = make_cluster(tmp_path / "cluster", 1, init_options=SHAMIR)
    shares = shamir_cluster.key_shares
    node = shamir_cluster.nodes[0]
    try:
        node.start(wait=False)
        wait_sealed(node)
        unseal(node, shares[:3])
        node.wait_healthy()
        shares_dir = tmp_path / "shares"
        shares_dir.mkdir()
        for number, share in enumerate(shares, start=1):
            (shares_dir / f"share-{number}").write_text(share + "\n")
            os.chmod(shares_dir / f"share-{number}", 0o600)
        shown: list[str] = []

        def generate(*args: str, stdin: str | None = None) -> str:
            finished = generate_root(shamir_cluster, *args, stdin=stdin)
            output = finished.stdout + finished.stderr
            assert not [share for share in shares if share in output], "a share was printed"
            new_root = fields(ok(finished))["new root token"]
            shown.append(new_root)
            return new_root

        generate("--shares-dir", str(shares_dir))
        files = [str(shares_dir / f"share-{n}") for n in (5, 2, 4)]
        generate(*(arg for path in files for arg in ("--share-file", path)))
        newest = generate(stdin="\n".join(shares[1:4]) + "\n")
        for old in [shamir_cluster.root_token, *shown[:-1]]:
            assert_server_error(
                vault_cli(shamir_cluster, "token", "lookup", token=old), "unauthorized"
            )
        assert '"root": true' in ok(
            vault_cli(shamir_cluster, "token", "lookup", "--json", token=newest)
        )

        # Shares of another key, and too few shares, are refused by the server; nothing changes.
        foreign = [s.hex() for s in shamir.split(generate_root_key(), 5, 3)][:3]
        for wrong in (foreign, shares[:2]):
            refused = generate_root(shamir_cluster, stdin="\n".join(wrong))
            assert_server_error(refused, "forbidden")
        assert ok(vault_cli(shamir_cluster, "token", "lookup", token=newest))
    finally:
        shamir_cluster.stop_all()
