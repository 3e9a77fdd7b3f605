"""`vault operator members`, `add-node` and `remove-node`: change who is in the cluster.

Owns the operator side of membership (docs/membership.md, docs/deploy.md "Day two"): listing the
replicated configuration (`GET /v1/sys/members`), adding a node (`POST`), removing one
(`DELETE /v1/sys/members/<id>`), and laying out a new node's files the way `vault operator init`
lays out the first ones (cli/cluster_init.py): its certificate issued from the init directory's
CA, its data directory created with a new identity (vaultnode/identity.py), its root key material
as the cluster's `root_key_source` needs, and a config with `join = true` whose `[[peers]]` is the
starting configuration the cluster answered.

Must never leave anything half-written: the new node's files are built in a temporary directory
beside `--out` and renamed into place only once the cluster has added the member; a refused or
failed POST writes nothing. Never prints key material. Exit codes are cli/main.py's: 1 when the
server or the network said no (with the server's code and what to do), 2 for bad input found
before any request.

Registered by cli/main.py and so never imports it (click's context object is `CliContext`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from cli.client import ClientError, Reply, ServerError
from cli.cluster_init import (
    CREDENTIAL_FILE_NAME,
    InitError,
    peer_entry,
    write_node_key,
    write_private,
)
from cli.policy_commands import EXIT_FAILED, EXIT_USAGE, CliContext
from cli.snapshot_restore import fsync_dir, fsync_tree
from storage.crypto_errors import RootKeyError
from storage.rootkey import load_root_key_file
from vaultnode.config import ConfigError, parse_address
from vaultnode.identity import IdentityError, create_identity, format_incarnation
from vaultnode.tls import issue_node_cert

MEMBERS_PATH = "/v1/sys/members"

# What the operator should do after each refusal the membership routes answer with
# (docs/api.md); the server's own message comes first.
_ADVICE = {
    "member_exists": "that id is already a member: give the new node an id never used in this"
    " cluster (a replaced node never comes back under its old data directory)",
    "membership_change_in_progress": "another membership change is still being applied (a"
    " promotion, or another add or remove): wait until `vault operator members` shows no change"
    " in progress, then run this again",
    "member_not_found": "no member has that id: `vault operator members` lists them",
    "too_few_voters": "a cluster keeps at least two voters: add a node first"
    " (`vault operator add-node`), or replace this one by adding its successor before removing it",
    "node_removed": "the node you asked was removed from the cluster: point VAULT_ADDR at a"
    " current member",
    "node_superseded": "the node you asked has a data directory that is not the member's any"
    " more: point VAULT_ADDR at another member",
}

# The settings every node of a cluster shares, copied from an existing node's config.
_SHARED_SETTINGS = (
    "cluster_id", "root_token_sha256", "root_accessor", "http_plaintext", "kv_v2_mount",
    "log_level", "root_key_source", "root_key_credential", "root_key_check_value",
    "unseal_shares", "unseal_threshold", "unseal_progress_timeout_s",
)


def _exit_with(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(code)


def _refusal(exc: ServerError) -> str:
    advice = _ADVICE.get(exc.code)
    return f"{exc.code}: {exc.message}" + (f"; {advice}" if advice else "")


def _answer(call: Callable[[], Reply]) -> Reply:
    try:
        return call()
    except ServerError as exc:
        _exit_with(_refusal(exc), EXIT_FAILED)
    except ClientError as exc:
        _exit_with(str(exc), EXIT_FAILED)


# ---- vault operator members ------------------------------------------------------------------
@click.command(name="members")
@click.option("--json", "as_json", is_flag=True, help="Print the API's answer as JSON.")
@click.pass_obj
def members(obj: CliContext, as_json: bool) -> None:
    """List the cluster's members: voters and learners, addresses, how far each lags."""
    body = _answer(lambda: obj.client.request("GET", MEMBERS_PATH)).body
    if as_json:
        click.echo(json.dumps(body, indent=2, ensure_ascii=False))
        return
    leader_id = body.get("leader_id")
    rows = []
    for member in body.get("members", []):
        role = "voter" if member.get("voter") else "learner"
        if not member.get("voter") and not member.get("auto_promote", True):
            role += " (no promote)"
        rows.append([
            str(member.get("id")) + (" *" if member.get("id") == leader_id else ""),
            role,
            str(member.get("peer_addr") or "-"),
            str(member.get("api_addr") or "-"),
            _shown(member.get("last_contact_ms"), "ms"),
            _shown(member.get("match_index")),
            _shown(member.get("lag")),
        ])
    headers = ["NODE", "ROLE", "PEER ADDR", "API ADDR", "LAST CONTACT", "MATCH", "LAG"]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    click.echo("* leader" + (
        "; a membership change is in progress" if body.get("change_in_progress") else ""
    ))


def _shown(value: object, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


# ---- vault operator remove-node --------------------------------------------------------------
@click.command(name="remove-node")
@click.argument("node_id", metavar="N", type=click.IntRange(min=1))
@click.pass_obj
def remove_node(obj: CliContext, node_id: int) -> None:
    """Remove member N from the cluster (root token). Its data directory never rejoins: stop
    the node and delete its data; to bring the machine back, add it as a new node."""
    reply = _answer(lambda: obj.client.request("DELETE", f"{MEMBERS_PATH}/{node_id}"))
    click.echo(f"removed node {reply.body.get('removed', node_id)} from the cluster")
    click.echo("stop its vaultnode and delete its data directory: it can never vote again under"
               " that identity; `vault operator add-node` brings a machine back as a new member")


# ---- vault operator add-node -----------------------------------------------------------------
@dataclass(frozen=True)
class NewNode:
    node_id: int
    peer_addr: str
    api_addr: str
    host: str
    data_dir: str  # as the config names it: absolute on VMs, else relative to the config


def _address(option: str, value: str) -> str:
    try:
        return str(parse_address(option, value))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _template_settings(ca_dir: Path, template: Path | None) -> tuple[Path, dict[str, Any]]:
    """The cluster-wide settings of an existing node's config: `template`, or the init
    directory's lowest-numbered `nodeN.toml`."""
    if template is None:
        numbered = sorted(
            (int(m.group(1)), path)
            for path in ca_dir.glob("node*.toml")
            if (m := re.fullmatch(r"node(\d+)\.toml", path.name))
        )
        if not numbered:
            _exit_with(f"{ca_dir} holds no nodeN.toml to copy the cluster's settings from;"
                       " give --template CONFIG (any current node's config)", EXIT_USAGE)
        template = numbered[0][1]
    try:
        data = tomllib.loads(template.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _exit_with(f"cannot read {template} as a node config: {exc}", EXIT_USAGE)
    settings = {key: data[key] for key in _SHARED_SETTINGS if key in data}
    if isinstance(data.get("limits"), dict):
        settings["limits"] = data["limits"]
    for required in ("cluster_id", "root_token_sha256", "root_accessor"):
        if required not in settings:
            _exit_with(f"{template} is not a node config: it has no {required}", EXIT_USAGE)
    return template, settings


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the plain values configs hold
    raise ValueError(f"unexpected config value {value!r}")


def _root_key_lines(
    node_dir: Path, node_id: int, settings: dict[str, Any], root_key: bytes | None,
    check_value: str | None, encrypt_here: bool,
) -> str:
    """Give the new node its root key material as the cluster's source says (as init does);
    its config lines."""
    source = settings.get("root_key_source", "file")
    if source != "shamir":
        assert root_key is not None
        return write_node_key(node_dir, node_id, root_key, source, encrypt_here=encrypt_here)
    lines = 'root_key_source = "shamir"\n'
    lines += f"root_key_check_value = {_toml_value(check_value)}\n"
    for key in ("unseal_shares", "unseal_threshold", "unseal_progress_timeout_s"):
        if key in settings:
            lines += f"{key} = {_toml_value(settings[key])}\n"
    return lines


def _node_config(
    node: NewNode, settings: dict[str, Any], join: JoinAnswer, key_lines: str
) -> str:
    """The new node's config: `join = true`, the cluster's shared settings, the starting
    configuration the cluster answered as `[[peers]]`."""
    n = node.node_id
    text = (
        "# vaultnode configuration written by `vault operator add-node`\n"
        f"node_id = {n}\n"
        f"cluster_id = {_toml_value(join.cluster_id)}\n"
        "# A new member: it starts from the cluster's configuration below and learns the rest.\n"
        "join = true\n"
        + ("" if join.config_slot is None else f"join_config_slot = {join.config_slot}\n")
        + f"data_dir = {_toml_value(node.data_dir)}\n"
        f'http_listen = "{node.api_addr}"\n'
        f'peer_listen = "{node.peer_addr}"\n'
        + key_lines
        + f'tls_ca_file = "node{n}/ca.pem"\n'
        f'tls_cert_file = "node{n}/node.pem"\n'
        f'tls_key_file = "node{n}/node.key"\n'
    )
    for key in ("root_token_sha256", "root_accessor", "http_plaintext", "kv_v2_mount", "log_level"):
        if key in settings:
            text += f"{key} = {_toml_value(settings[key])}\n"
    limits = settings.get("limits")
    if limits:
        text += "\n[limits]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in limits.items())
    for peer in join.peers:  # field for field: the node applies later changes to exactly this
        text += peer_entry(
            int(peer["id"]), _incarnation_of(peer), str(peer["peer_addr"]),
            str(peer.get("http_addr") or peer.get("api_addr")), bool(peer.get("voter", True)),
            bool(peer.get("auto_promote", False)),
        )
    return text


def _incarnation_of(peer: dict[str, Any]) -> int:
    value = peer["incarnation"]
    return int(value, 16) if isinstance(value, str) else int(value)


@dataclass(frozen=True)
class JoinAnswer:
    """What the cluster told the new member to start from (POST /v1/sys/members, `join`)."""

    cluster_id: str
    peers: list[dict[str, Any]]
    config_slot: int | None  # the slot that chose that configuration, when the cluster says


def _check_join_answer(body: Any) -> JoinAnswer:
    """The `join` part of a POST answer; KeyError, TypeError or ValueError if it is unusable."""
    join = body["join"]
    peers = list(join["peers"])
    for peer in peers:
        _incarnation_of(peer)
        if not peer.get("peer_addr") or not (peer.get("http_addr") or peer.get("api_addr")):
            raise ValueError(f"peer {peer.get('id')} has no addresses")
    slot = join.get("config_slot")
    if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int) or slot < 0):
        raise ValueError(f"config_slot {slot!r} is not a slot")
    return JoinAnswer(str(join["cluster_id"]), peers, slot)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command(name="add-node")
@click.option("--id", "node_id", type=click.IntRange(min=1), required=True,
              help="The new member's id: not a current member's (a new id keeps logs unambiguous).")
@click.option("--peer-addr", required=True, metavar="HOST:PORT",
              help="Where the other nodes reach it (its peer_listen).")
@click.option("--api-addr", required=True, metavar="HOST:PORT",
              help="Where clients reach it (its http_listen).")
@click.option("--ca-dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              required=True,
              help="The directory `vault operator init` wrote: its ca.pem and ca.key issue the"
              " node's certificate; its nodeN.toml give the cluster's shared settings.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Where to write nodeN.toml and nodeN/.")
@click.option("--no-promote", is_flag=True,
              help="Keep it a learner (it gets the log but never votes) instead of promoting it"
              " to voter once it has caught up.")
@click.option("--data-dir", default=None,
              help="Absolute data directory the config names (VMs); nodeN/data is copied there.")
@click.option("--root-key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The cluster's current root key (file and systemd-credential clusters).")
@click.option("--key-check-value", default=None, metavar="HEX",
              help="Shamir clusters: the root key's check value, if rotated since init"
              " (`vault operator snapshot inspect` prints it); default: the template's.")
@click.option("--template", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="A node config to copy the shared settings from (default: the"
              " lowest nodeN.toml in --ca-dir).")
@click.pass_obj
def add_node(
    obj: CliContext, node_id: int, peer_addr: str, api_addr: str, ca_dir: Path, out_dir: Path,
    no_promote: bool, data_dir: str | None, root_key_file: Path | None,
    key_check_value: str | None, template: Path | None,
) -> None:
    """Add node N as a learner and write its config, certificate, key and data directory.

    The cluster promotes it to voter once it has caught up (unless --no-promote). Start it with
    the command printed at the end. Nothing is written if the cluster refuses the member.
    """
    peer_addr = _address("--peer-addr", peer_addr)
    api_addr = _address("--api-addr", api_addr)
    if data_dir is not None and not Path(data_dir).is_absolute():
        raise click.BadParameter("must be an absolute path", param_hint="'--data-dir'")
    _, settings = _template_settings(ca_dir, template)
    source = settings.get("root_key_source", "file")
    root_key: bytes | None = None
    check_value: str | None = None
    if source == "shamir":
        if root_key_file is not None:
            raise click.UsageError("a shamir cluster's nodes hold no key file: drop"
                                   " --root-key-file (the new node is unsealed with the shares)")
        check_value = key_check_value or settings.get("root_key_check_value")
        if not isinstance(check_value, str) or not re.fullmatch(r"[0-9a-f]{32}", check_value):
            raise click.BadParameter("32 hex digits expected", param_hint="'--key-check-value'")
    else:
        if key_check_value is not None:
            raise click.UsageError("--key-check-value is for shamir clusters only")
        if root_key_file is None:
            raise click.UsageError(f"the cluster's nodes read the root key from a {source}:"
                                   " give --root-key-file (the current root key)")
        try:
            root_key = load_root_key_file(root_key_file)
        except RootKeyError as exc:
            _exit_with(str(exc), EXIT_USAGE)
    try:
        ca_cert = (ca_dir / "ca.pem").read_bytes()
        ca_key = (ca_dir / "ca.key").read_bytes()
    except OSError as exc:
        _exit_with(f"--ca-dir {ca_dir}: cannot read the CA ({exc.strerror or exc}); it is the"
                   " directory `vault operator init` wrote, with ca.pem and ca.key", EXIT_USAGE)
    host = peer_addr.rpartition(":")[0]
    node = NewNode(node_id, peer_addr, api_addr, host, data_dir or f"node{node_id}/data")
    config_path = out_dir / f"node{node_id}.toml"
    node_path = out_dir / f"node{node_id}"
    for existing in (config_path, node_path):
        if existing.exists():
            _exit_with(f"{existing} exists; refusing to overwrite it", EXIT_USAGE)
    client = obj.client  # no token: a usage error before anything is written
    out_dir = out_dir.absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".node{node_id}.adding-{secrets.token_hex(4)}"
    added = False
    try:
        staging.mkdir(mode=0o700)
        staged_node = staging / f"node{node_id}"
        staged_node.mkdir()
        incarnation = create_identity(staged_node / "data")
        hosts = sorted({host, api_addr.rpartition(":")[0]})
        cert, key = issue_node_cert(ca_cert, ca_key, node_id, hosts)
        (staged_node / "ca.pem").write_bytes(ca_cert)
        (staged_node / "node.pem").write_bytes(cert)
        write_private(staged_node / "node.key", key.decode())
        key_lines = _root_key_lines(
            staged_node, node_id, settings, root_key, check_value, encrypt_here=_is_loopback(host)
        )
        del root_key
        body = {
            "id": node_id, "incarnation": format_incarnation(incarnation),
            "peer_addr": peer_addr, "api_addr": api_addr, "promote": not no_promote,
        }
        try:
            reply = client.request("POST", MEMBERS_PATH, json_body=body)
        except ServerError as exc:
            unknown = exc.status in (500, 502, 504)
            _exit_with(_refusal(exc) + (_unknown_advice(node_id, incarnation) if unknown else
                                        "; nothing was written"), EXIT_FAILED)
        except ClientError as exc:
            _exit_with(f"{exc}{_unknown_advice(node_id, incarnation)}", EXIT_FAILED)
        try:
            join = _check_join_answer(reply.body)
        except (KeyError, TypeError, ValueError) as exc:
            _exit_with(f"the cluster added node {node_id} but its answer has no usable join"
                       f" configuration ({type(exc).__name__}: {exc}); remove it with `vault"
                       f" operator remove-node {node_id}`", EXIT_FAILED)
        added = True
        staged_config = staging / config_path.name
        staged_config.write_text(_node_config(node, settings, join, key_lines))
        fsync_tree(staging)
        os.rename(staged_node, node_path)
        try:
            os.rename(staged_config, config_path)
        except OSError:
            shutil.rmtree(node_path, ignore_errors=True)
            raise
        fsync_dir(out_dir)
    except (IdentityError, InitError, RootKeyError, OSError) as exc:
        if added:
            _exit_with(f"node {node_id} WAS added to the cluster, but its files could not be"
                       f" written ({exc}): remove it with `vault operator remove-node {node_id}`"
                       " and add it again", EXIT_FAILED)
        _exit_with(f"nothing was added: {exc}", EXIT_FAILED)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _report_added(node, config_path, incarnation, no_promote, settings, source)


def _unknown_advice(node_id: int, incarnation: int) -> str:
    return (
        f"; the outcome is unknown and nothing was written here: if `vault operator members`"
        f" lists node {node_id}, remove it (`vault operator remove-node {node_id}`) before"
        f" adding it again (it was to have incarnation {format_incarnation(incarnation)})"
    )


def _report_added(
    node: NewNode, config_path: Path, incarnation: int, no_promote: bool,
    settings: dict[str, Any], source: str,
) -> None:
    n = node.node_id
    scheme = "http" if settings.get("http_plaintext") else "https"
    promotion = ("it stays a learner (--no-promote)" if no_promote
                 else "the cluster promotes it to voter once it has caught up")
    click.echo(f"added node {n} as a learner (incarnation {format_incarnation(incarnation)});"
               f" {promotion}")
    click.echo(f"wrote {config_path} and {config_path.parent / f'node{n}'}/ (certificate, key,"
               " data directory with its identity)")
    if Path(node.data_dir).is_absolute():
        click.echo(f"copy node{n}/data to {node.data_dir} on its machine before starting it")
    if source == "systemd-credential" and not _is_loopback(node.host):
        click.echo(f"root key: node{n}/root.key, to pipe into `systemd-creds encrypt` on its"
                   " machine and delete here (docs/deploy.md, step 3)")
    elif source == "systemd-credential":
        click.echo(f"root key: node{n}/{CREDENTIAL_FILE_NAME}, encrypted by systemd-creds here")
    elif source == "shamir":
        click.echo("it starts sealed: unseal it with the key shares (vault operator unseal)")
    click.echo(f"  vaultnode --config {config_path}    # serves {scheme}://{node.api_addr}")
