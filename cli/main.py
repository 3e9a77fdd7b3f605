"""The `vault` command (click): talk to any node of the vault.

Owns argument parsing, output formatting (human tables by default, `--json` for scripts) and exit
codes: 0 success, 1 an error the server or network reported (code and message on stderr), 2 a
usage error. Values may come from an argument, `--from-file FILE` or stdin (`--from-file -`
too), so they need not land in shell history or `ps`; this module never echoes a value it was
given.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from cli.audit_commands import audit
from cli.client import ClientError, Reply, ServerError, VaultClient, node_url
from cli.env_commands import env
from cli.membership_commands import add_node, members, remove_node
from cli.policy_commands import TOKEN_COMMANDS, operator_generate_root, policy
from cli.snapshot_commands import snapshot
from vaultnode.cluster_view import leader_commit_index as _leader_commit_index

# No scheme means https, always; plain HTTP must be written http:// (cli/client.py).
DEFAULT_ADDR = "127.0.0.1:8200"


class Context:
    def __init__(
        self, addr: str, token: str | None, cacert: str | None, deadline_s: float
    ) -> None:
        self.addresses = [a.strip() for a in addr.split(",") if a.strip()]
        self.token = token
        self.cacert = cacert
        self.deadline_s = deadline_s
        self._client: VaultClient | None = None

    @property
    def client(self) -> VaultClient:
        if not self.token:
            # Not the server's verdict: nothing was sent, the invocation lacks a setting.
            raise click.UsageError("no token: set VAULT_TOKEN or pass --token")
        if self._client is None:
            verify: str | bool = self.cacert if self.cacert else True
            self._client = VaultClient(
                self.addresses, self.token, deadline_s=self.deadline_s, verify=verify
            )
        return self._client


pass_ctx = click.make_pass_decorator(Context)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def run(call: Callable[[], Reply]) -> Reply:
    try:
        return call()
    except ServerError as exc:
        extra = ""
        # The message often names the secret already; repeating it only adds noise.
        names = [str(n) for n in exc.details.get("names") or [] if str(n) not in exc.message]
        if names:
            extra = " (" + ", ".join(names) + ")"
        fail(f"{exc.code}: {exc.message}{extra}")
    except ClientError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, ensure_ascii=False))


STDIN = Path("-")  # `-` for a file means standard input, as everywhere on the command line


def read_value(value: str | None, from_file: Path | None) -> str:
    given = [v for v in (value, from_file) if v is not None]
    if len(given) > 1:
        raise click.UsageError("give the value as an argument or with --from-file, not both")
    if value is not None:
        return value
    if from_file is not None and from_file != STDIN:
        try:
            return decode_value(from_file.read_bytes(), str(from_file))
        except OSError as exc:
            fail(f"cannot read {from_file}: {exc.strerror}", 2)
    if from_file is None and sys.stdin.isatty():
        raise click.UsageError("no value: pass it as an argument, with --from-file, or on stdin")
    piped = decode_value(sys.stdin.buffer.read(), "standard input")
    if not piped:
        # An empty pipe is far more often a failed command upstream than a wanted empty secret.
        raise click.UsageError("stdin was empty; to store an empty value, pass '' as VALUE")
    return piped


def decode_value(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The codec's own message quotes the offending byte, which is part of the secret.
        fail(f"cannot read {source}: not UTF-8 (at byte {exc.start})", 2)


def table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        click.echo(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--addr",
    envvar="VAULT_ADDR",
    default=DEFAULT_ADDR,
    show_default=True,
    help="Node address(es), comma-separated; without a scheme an address means https://"
    " (env VAULT_ADDR).",
)
@click.option(
    "--token",
    envvar="VAULT_TOKEN",
    default=None,
    help="Token (env VAULT_TOKEN; prefer it: a command line is visible to ps and in history).",
)
@click.option(
    "--cacert",
    envvar="VAULT_CACERT",
    default=None,
    help="CA certificate to verify HTTPS nodes, e.g. ca.pem from `vault operator init`"
    " (env VAULT_CACERT).",
)
@click.option(
    "--timeout",
    "deadline_s",
    envvar="VAULT_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Give up after this many seconds of trying every node (env VAULT_TIMEOUT).",
)
@click.pass_context
def main(
    ctx: click.Context, addr: str, token: str | None, cacert: str | None, deadline_s: float
) -> None:
    """Store, update and read secrets in a vault cluster."""
    ctx.obj = Context(addr, token, cacert, deadline_s)
    if not ctx.obj.addresses:
        raise click.BadParameter("give at least one node address", param_hint="'--addr'")
    for address in ctx.obj.addresses:
        try:
            node_url(address)
        except ClientError as exc:
            raise click.BadParameter(str(exc), param_hint="'--addr'") from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Show the health of every node given in --addr, and how far each lags the leader."""
    rows = []
    results: list[dict[str, Any]] = []
    worst = 0
    for address in ctx.addresses:
        single: VaultClient | None = None
        try:
            single = VaultClient(
                [address], None, deadline_s=min(2.0, ctx.deadline_s), verify=ctx.cacert or True
            )
            body = single.request("GET", "/health", authenticated=False).body
        except ServerError as exc:
            body = {"status": exc.code}
            worst = 1
        except ClientError as exc:
            body = {"status": "unreachable", "detail": str(exc)}
            click.echo(f"{address}: {exc}", err=True)  # the table has no room for why
            worst = 1
        finally:
            if single is not None:
                single.close()
        results.append({"address": address, **body})
    leader_commit = _leader_commit_index(results)
    for view in results:
        view["lag"] = _lag(view, leader_commit)
        rows.append(
            [
                view["address"],
                str(view.get("node_id", "-")),
                view.get("status", "-"),
                str(view.get("role", "-")),
                str(view.get("leader_id", "-")),
                str(view.get("commit_index", "-")),
                str(view.get("applied_index", "-")),
                str(view["lag"]) if view["lag"] is not None else "-",
            ]
        )
    if as_json:
        emit_json({"nodes": results})
    else:
        table(rows, ["ADDRESS", "NODE", "STATUS", "ROLE", "LEADER", "COMMIT", "APPLIED", "LAG"])
    sys.exit(worst)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def cluster(ctx: Context, as_json: bool) -> None:
    """Show every node as one node sees it (GET /v1/cluster), and the leader changes it saw."""
    body = run(
        lambda: ctx.client.request("GET", "/v1/cluster", authenticated=False)
    ).body
    if as_json:
        emit_json(body)
        return
    rows = [
        [str(view.get(key, "-") if view.get(key) is not None else "-") for key in (
            "node_id", "status", "role", "leader_id", "commit_index", "applied_index", "lag"
        )]
        for view in body.get("nodes", [])
    ]
    table(rows, ["NODE", "STATUS", "ROLE", "LEADER", "COMMIT", "APPLIED", "LAG"])
    changes = body.get("leader_changes", [])
    if changes:
        click.echo(f"leader changes seen by node {body.get('node_id')}, newest first:")
        for change in changes:
            click.echo(f"  {change.get('at')}  leader {change.get('leader_id') or 'none'}")


def _lag(view: dict[str, Any], leader_commit: int | None) -> int | None:
    """Log entries the leader has committed that this node has not applied yet."""
    applied = view.get("applied_index")
    if leader_commit is None or not isinstance(applied, int):
        return None
    # Nodes are asked one after another: one asked after the leader may have applied entries
    # committed since, which is no lag at all.
    return max(0, leader_commit - applied)


class ValueCommand(click.Command):
    """A command taking a secret VALUE: its usage errors must not quote the command line.

    Click repeats stray arguments and unknown options in its errors; here those are most likely
    pieces of the value (an unquoted value with spaces, a value starting with '-').
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption:
            raise click.UsageError(
                "unknown option; put '--' before a value that starts with '-'", ctx
            ) from None
        except click.UsageError as exc:
            if type(exc) is not click.UsageError:  # subclasses name a parameter, not the value
                raise
            raise click.UsageError(
                "too many arguments; quote a value with spaces, or use --from-file or stdin", ctx
            ) from None


def _write_command(verb: str) -> Callable[..., Any]:
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        function = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(function)
        function = click.option(
            "--from-file",
            type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
            help="Read the value from this file ('-' for standard input).",
        )(function)
        function = click.argument("value", required=False)(function)
        function = click.argument("name")(function)
        return function

    return decorate


@main.command(cls=ValueCommand)
@_write_command("create")
@pass_ctx
def create(
    ctx: Context, name: str, value: str | None, from_file: Path | None, as_json: bool
) -> None:
    """Create secret NAME (version 1). The value comes from VALUE, --from-file or stdin."""
    secret = read_value(value, from_file)
    reply = run(
        lambda: ctx.client.request("POST", f"/v1/secrets/{name}", json_body={"value": secret})
    )
    _print_written(reply, as_json, "created")


@main.command(cls=ValueCommand)
@_write_command("update")
@click.option(
    "--expected-version",
    type=click.IntRange(min=1),
    default=None,
    help="Fail with version_conflict unless the current version is this one.",
)
@pass_ctx
def update(
    ctx: Context,
    name: str,
    value: str | None,
    from_file: Path | None,
    as_json: bool,
    expected_version: int | None,
) -> None:
    """Add a new version to secret NAME."""
    body: dict[str, Any] = {"value": read_value(value, from_file)}
    if expected_version is not None:
        body["expected_version"] = expected_version
    reply = run(lambda: ctx.client.request("PUT", f"/v1/secrets/{name}", json_body=body))
    _print_written(reply, as_json, "updated")


def _print_written(reply: Reply, as_json: bool, verb: str) -> None:
    if as_json:
        emit_json(reply.body)
        return
    body = reply.body
    note = " (replayed)" if reply.replayed else ""
    click.echo(
        f"{verb} {body['name']} version {body['version']} at {body['valid_from']}"
        f" (index {body['index']}){note}"
    )


def _present(**params: Any) -> dict[str, Any]:
    """Query parameters that were given (None means the option was not)."""
    return {key: value for key, value in params.items() if value is not None}


@main.command()
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), default=None)
@click.option("--at", "at", default=None, help="RFC 3339 time: the version valid then.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with metadata).")
@pass_ctx
def get(ctx: Context, name: str, version: int | None, at: str | None, as_json: bool) -> None:
    """Print the value of NAME (current, --version N or --at TIME)."""
    if version is not None and at is not None:
        raise click.UsageError("give --version or --at, not both")
    params = _present(version=version, at=at)
    reply = run(lambda: ctx.client.request("GET", f"/v1/secrets/{name}", params=params))
    if as_json:
        emit_json(reply.body)
    else:
        click.echo(reply.body["value"])


@main.command()
@click.argument("name")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--after-version", type=click.IntRange(min=0), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def history(
    ctx: Context, name: str, limit: int | None, after_version: int | None, as_json: bool
) -> None:
    """List the versions of NAME with their validity intervals."""
    params = _present(limit=limit, after_version=after_version)
    reply = run(lambda: ctx.client.request("GET", f"/v1/history/{name}", params=params))
    if as_json:
        emit_json(reply.body)
        return
    rows = [
        [
            str(v["version"]),
            v["valid_from"],
            v["valid_to"] or "(current)",
            str(v["index"]),
            v["created_by"].get("display_name") or v["created_by"]["accessor"],
            _version_state(v),
        ]
        for v in reply.body["versions"]
    ]
    table(rows, ["VERSION", "VALID FROM", "VALID TO", "INDEX", "CREATED BY", "STATE"])


def _version_state(version: dict[str, Any]) -> str:
    if version.get("destroyed"):
        return "destroyed"
    if version.get("deletion_time"):
        return f"deleted {version['deletion_time']}"
    return ""


def _change_versions(ctx: Context, action: str, name: str, versions: tuple[int, ...]) -> None:
    if action == "delete" and not versions:
        reply = run(lambda: ctx.client.request("DELETE", f"/v1/secrets/{name}"))
    else:
        if not versions:
            raise click.UsageError(f"name the versions to {action} with --version N")
        body = {"versions": list(versions)}
        reply = run(lambda: ctx.client.request("POST", f"/v1/{action}/{name}", json_body=body))
    changed = ", ".join(str(v) for v in reply.body["versions"]) or "none (already so)"
    past = {"delete": "deleted", "undelete": "undeleted", "destroy": "destroyed"}[action]
    click.echo(f"{past} {name} versions: {changed}")


_VERSIONS_OPTION = click.option(
    "--version", "versions", type=click.IntRange(min=1), multiple=True, help="Repeatable."
)


@main.command()
@click.argument("name")
@_VERSIONS_OPTION
@pass_ctx
def delete(ctx: Context, name: str, versions: tuple[int, ...]) -> None:
    """Soft-delete versions of NAME (the current one by default); undelete reverses it."""
    _change_versions(ctx, "delete", name, versions)


@main.command()
@click.argument("name")
@_VERSIONS_OPTION
@pass_ctx
def undelete(ctx: Context, name: str, versions: tuple[int, ...]) -> None:
    """Make soft-deleted versions of NAME readable again."""
    _change_versions(ctx, "undelete", name, versions)


@main.command()
@click.argument("name")
@_VERSIONS_OPTION
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def destroy(ctx: Context, name: str, versions: tuple[int, ...], yes: bool) -> None:
    """Destroy versions of NAME for good: their data keys are dropped on every node."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"destroy {name} versions {list(versions)} for good?", abort=True)
    _change_versions(ctx, "destroy", name, versions)


@main.command(name="list")
@click.argument("prefix", required=False, default="")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def list_secrets(ctx: Context, prefix: str, as_json: bool) -> None:
    """List secret names (no values) under PREFIX."""
    reply = run(lambda: ctx.client.request("GET", "/v1/secrets", params={"prefix": prefix}))
    if as_json:
        emit_json(reply.body)
        return
    rows = [[s["name"], str(s["current_version"]), s["updated_at"]] for s in reply.body["secrets"]]
    table(rows, ["NAME", "VERSION", "UPDATED"])


@main.group()
def token() -> None:
    """Create and inspect tokens."""


@token.command(name="revoke-self")
@pass_ctx
def token_revoke_self(ctx: Context) -> None:
    """Revoke the token in use."""
    run(lambda: ctx.client.request("DELETE", "/v1/tokens/self"))
    click.echo("revoked")


@main.group()
def operator() -> None:
    """Initialise a cluster, change its members and manage its keys."""


@operator.command(name="init")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--base-port", type=int, default=8200, show_default=True)
@click.option(
    "--hosts",
    default=None,
    metavar="HOST,HOST,...",
    help="One address per node (its machine's IP or DNS name) for certificates and configs;"
    " each node then uses --base-port and the port after it. Default: all on 127.0.0.1.",
)
@click.option(
    "--data-dir",
    default=None,
    help="Absolute data directory for every node, e.g. /var/lib/vault/data on VMs.",
)
@click.option(
    "--plaintext-http",
    is_flag=True,
    help="Serve clients plain HTTP instead of HTTPS: local development only.",
)
@click.option(
    "--root-key-source",
    type=click.Choice(["file", "systemd-credential", "shamir"]),
    default=None,
    help="How nodes get the root key (docs/encryption.md). Default: shamir when --key-shares"
    " is given, else file (development only).",
)
@click.option("--key-shares", type=click.IntRange(2, 255), default=None, help="Shamir shares.")
@click.option(
    "--key-threshold", type=click.IntRange(2, 255), default=None, help="Shares that unseal."
)
@click.option(
    "--shares-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Write one 0600 file per share (share-1, ...) here instead of printing them.",
)
def operator_init(
    nodes: int,
    out_dir: Path,
    base_port: int,
    hosts: str | None,
    data_dir: str | None,
    plaintext_http: bool,
    root_key_source: str | None,
    key_shares: int | None,
    key_threshold: int | None,
    shares_dir: Path | None,
) -> None:
    """Write configs, keys, certificates and the root token for a new cluster."""
    from cli.cluster_init import InitError, init_cluster

    if root_key_source is None:
        root_key_source = "shamir" if key_shares is not None else "file"
    if root_key_source != "shamir" and (key_shares or key_threshold or shares_dir):
        fail("--key-shares, --key-threshold and --shares-dir need --root-key-source shamir", 2)
    shares_wanted = key_shares or 5
    threshold_wanted = key_threshold or min(3, shares_wanted)
    if shares_dir is not None and shares_dir.exists() and any(shares_dir.iterdir()):
        fail(f"{shares_dir} is not empty; refusing to overwrite key shares", 2)

    host_list = [h.strip() for h in hosts.split(",")] if hosts is not None else None
    try:
        result = init_cluster(
            out_dir,
            nodes,
            base_port,
            plaintext_http=plaintext_http,
            hosts=host_list,
            data_dir=data_dir,
            root_key_source=root_key_source,
            key_shares=shares_wanted,
            key_threshold=threshold_wanted,
        )
    except (InitError, OSError) as exc:
        fail(str(exc), 2 if isinstance(exc, InitError) else 1)
        return
    click.echo(f"initialised {nodes}-node cluster in {result.out_dir}")
    if result.key_shares:
        _hand_out_shares(result.key_shares, threshold_wanted, shares_dir)
    elif root_key_source == "systemd-credential" and host_list is None:
        click.echo("root key: nodeN/root-key.cred, encrypted by systemd-creds with this host's key")
    elif root_key_source == "systemd-credential":
        click.echo("root key: nodeN/root.key, to pipe into `systemd-creds encrypt` on each VM and"
                   " delete here (docs/deploy.md, step 3)")
    for path, url in zip(result.config_paths, result.urls, strict=True):
        click.echo(f"  vaultnode --config {path}    # serves {url}")
    if data_dir is not None:
        click.echo(f"copy each nodeN/data (its identity) to {data_dir} on node N before starting"
                   " it (docs/deploy.md, step 3)")
    click.echo(f"ca.key stays here: keep it off the nodes; `vault operator add-node --ca-dir"
               f" {result.out_dir}` issues new nodes' certificates with it")
    click.echo(f"root token written to {result.token_path} (mode 0600)")
    click.echo(f"  export VAULT_ADDR={','.join(result.urls)}")
    if result.scheme == "https":
        click.echo(f"  export VAULT_CACERT={result.ca_path}    # clients verify nodes with it")
    else:
        click.echo("clients are served plain HTTP (--plaintext-http): for local development only")


def _hand_out_shares(shares: list[str], threshold: int, shares_dir: Path | None) -> None:
    """Print the shares once, or write one 0600 file per operator; the whole key is kept nowhere."""
    from cli.cluster_init import write_private

    click.echo(
        f"the root key is split into {len(shares)} shares; any {threshold} unseal a node"
        " (vault operator unseal); nothing stores the whole key"
    )
    if shares_dir is None:
        for number, share in enumerate(shares, start=1):
            click.echo(f"  unseal key share {number}: {share}")
        click.echo("give each share to a different operator; they are not shown again")
        return
    try:
        shares_dir.mkdir(parents=True, exist_ok=True)
        for number, share in enumerate(shares, start=1):
            write_private(shares_dir / f"share-{number}", share + "\n")
    except OSError as exc:
        fail(f"cannot write key shares to {shares_dir}: {exc.strerror or exc}")
    click.echo(f"wrote shares {shares_dir}/share-1 .. share-{len(shares)} (mode 0600),"
               " one per operator: move each to its operator and delete it here")


def _node_clients(ctx: Context) -> list[VaultClient]:
    """One client per address: unsealing and sealing are per node, never forwarded."""
    verify: str | bool = ctx.cacert if ctx.cacert else True
    return [
        VaultClient([address], ctx.token, deadline_s=ctx.deadline_s, verify=verify)
        for address in ctx.addresses
    ]


def _read_share(share_file: Path | None) -> str:
    if share_file is not None:
        try:
            return share_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read {share_file}: {exc.strerror}")
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    return str(click.prompt("Unseal key share", hide_input=True)).strip()


@operator.command(name="unseal")
@click.option(
    "--share-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="Read the share from this file (default: standard input, or a hidden prompt).",
)
@click.option("--reset", is_flag=True, help="Forget the shares submitted so far.")
@pass_ctx
def operator_unseal(ctx: Context, share_file: Path | None, reset: bool) -> None:
    """Submit one key share to every node in VAULT_ADDR; each node must be unsealed."""
    body: dict[str, Any] = {"reset": True} if reset else {"key": _read_share(share_file)}
    failures = 0
    for client in _node_clients(ctx):
        address = client.addresses[0]
        try:
            reply = client.request("PUT", "/v1/sys/unseal", json_body=body, authenticated=False)
        except ServerError as exc:
            failures += 1
            click.echo(f"{address}: {exc.code}: {exc.message}", err=True)
            continue
        except ClientError as exc:
            failures += 1
            click.echo(f"{address}: {exc}", err=True)
            continue
        finally:
            client.close()
        status = reply.body
        if status.get("sealed"):
            click.echo(f"{address}: sealed, {status['progress']}/{status['t']} shares")
        else:
            click.echo(f"{address}: unsealed")
    if failures:
        sys.exit(1)


@operator.command(name="seal")
@pass_ctx
def operator_seal(ctx: Context) -> None:
    """Seal every node in VAULT_ADDR: each drops its keys until unsealed again (root token)."""
    if not ctx.token:
        raise click.UsageError("no token: set VAULT_TOKEN or pass --token")
    failures = 0
    for client in _node_clients(ctx):
        try:
            client.request("PUT", "/v1/sys/seal")
            click.echo(f"{client.addresses[0]}: sealed")
        except (ServerError, ClientError) as exc:
            failures += 1
            message = f"{exc.code}: {exc.message}" if isinstance(exc, ServerError) else str(exc)
            click.echo(f"{client.addresses[0]}: {message}", err=True)
        finally:
            client.close()
    if failures:
        sys.exit(1)


@operator.command(name="rotate-root")
@click.option(
    "--shares-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
    help="Shamir nodes: write the new shares here (share-1, ..., 0600) instead of printing them.",
)
@click.option(
    "--key-file-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="File or credential nodes: write the new root key to this new 0600 file, for"
    " `systemd-creds encrypt` on each node (docs/deploy.md) or as a development key file.",
)
@pass_ctx
def operator_rotate_root(ctx: Context, shares_dir: Path | None, key_file_out: Path | None) -> None:
    """Re-wrap every key-encryption key under a new root key; the old key material stops working."""
    client = ctx.client
    status = run(lambda: client.request("GET", "/v1/sys/seal-status", authenticated=False)).body
    if status.get("type") == "shamir":
        if shares_dir is not None and shares_dir.exists() and any(shares_dir.iterdir()):
            fail(f"{shares_dir} is not empty; refusing to overwrite key shares", 2)
    elif key_file_out is None:
        raise click.UsageError("the nodes read the root key from a file or credential: give"
                               " --key-file-out PATH for the new key")
    elif key_file_out.exists():
        fail(f"{key_file_out} exists; refusing to overwrite it", 2)
    reply = run(lambda: client.request("POST", "/v1/sys/rotate-root"))
    body = reply.body
    if body.get("outcome_unknown"):
        click.echo("the rotation's outcome is unknown (the node lost its leader meanwhile): keep"
                   " the old AND this new key material until one of them unseals a node", err=True)
    else:
        click.echo(f"root key rotated: {body['rewrapped_keks']} key-encryption keys re-wrapped")
    if body.get("type") == "shamir":
        _hand_out_shares(body["keys"], body["t"], shares_dir)
    else:
        from storage.crypto_errors import RootKeyError
        from storage.rootkey import ROOT_KEY_FILE_PREFIX, write_root_key_file

        assert key_file_out is not None
        new_key = bytes.fromhex(body["root_key"].removeprefix(ROOT_KEY_FILE_PREFIX))
        try:
            write_root_key_file(key_file_out, new_key)
        except RootKeyError as exc:
            fail(f"the root key WAS rotated but the new key could not be saved: {exc}")
        click.echo(f"new root key written to {key_file_out} (mode 0600): install it on every"
                   " node (docs/deploy.md), then delete it here")
    click.echo("nodes other than the one that answered seal (shares) or stop (file, credential)"
               " until given the new key material")


@operator.command(name="rotate")
@pass_ctx
def operator_rotate(ctx: Context) -> None:
    """Add a new key-encryption key; new versions use it."""
    reply = run(lambda: ctx.client.request("POST", "/v1/sys/rotate"))
    click.echo(f"current key is now {reply.body['kek_id']}")


@operator.command(name="rewrap")
@pass_ctx
def operator_rewrap(ctx: Context) -> None:
    """Re-wrap every data key under the newest key-encryption key."""
    reply = run(lambda: ctx.client.request("POST", "/v1/sys/rewrap"))
    body = reply.body
    click.echo(
        f"rewrapped {body['rewrapped']} versions under key {body['kek_id']} "
        f"in {body['batches']} batches; {body['remaining']} remaining"
    )


@operator.command(name="keys")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def operator_keys(ctx: Context, as_json: bool) -> None:
    """List key-encryption keys and how many versions each still wraps."""
    reply = run(lambda: ctx.client.request("GET", "/v1/sys/keys"))
    if as_json:
        emit_json(reply.body)
        return
    current = reply.body["current_kek_id"]
    rows = [
        [
            str(k["kek_id"]) + (" *" if k["kek_id"] == current else ""),
            k["created_at"],
            "retired" if k["retired"] else "active",
            str(k["versions"]),
        ]
        for k in reply.body["keys"]
    ]
    table(rows, ["KEY", "CREATED", "STATE", "VERSIONS"])


@operator.command(name="retire")
@click.argument("kek_id", type=click.IntRange(min=1))
@pass_ctx
def operator_retire(ctx: Context, kek_id: int) -> None:
    """Drop an old key-encryption key once nothing uses it."""
    run(lambda: ctx.client.request("POST", f"/v1/sys/keys/{kek_id}/retire"))
    click.echo(f"key {kek_id} retired")


operator.add_command(snapshot)
for _membership_command in (members, add_node, remove_node):
    operator.add_command(_membership_command)
main.add_command(audit)
main.add_command(env)
main.add_command(policy)
for _command in TOKEN_COMMANDS:
    token.add_command(_command)
operator.add_command(operator_generate_root)


def entry() -> None:
    main(prog_name="vault")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    entry()
