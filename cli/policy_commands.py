"""`vault policy ...`, the token commands that name policies, `vault operator generate-root`.

Owns the command line of docs/policies.md: writing, reading, listing and deleting named ACL
policies (`/v1/sys/policies/acl`), creating tokens (policy names through Vault's
`/v1/auth/token/create`; prefix rules alone through the native `/v1/tokens`, as before), a
token's capabilities on a path, looking up and revoking tokens by accessor, listing accessors,
and generating a new root token from the root key (`/v1/sys/generate-root`). The exit codes are
cli/main.py's: 1 with `Error: CODE: message` when the server or the network said no (the server's
own message, e.g. its policy parse error), 2 for bad input found before any request.

Must never print or log key material: unseal key shares and the root key are read from files,
standard input or a hidden prompt, sent once and named in no message. The only tokens it prints
are the one a command was asked to create and the new root token.

Registered by cli/main.py and so never imports it: it reaches the node addresses and the HTTP
client through click's context object (cli.main.Context), which only has to offer `CliContext`.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import click

from cli.client import ClientError, Reply, ServerError, VaultClient
from storage.crypto_errors import RootKeyError
from storage.rootkey import ROOT_KEY_FILE_PREFIX, load_root_key_file
from vaultnode.policy import POLICY_TEXT_BYTES_MAX, PolicyError, check_policy_name

EXIT_FAILED = 1  # the server, the network or a file's content said no
EXIT_USAGE = 2  # the command line is wrong; nothing was sent
STDIN = Path("-")
POLICIES_PATH = "/v1/sys/policies/acl"
# What /v1/sys/generate-root takes at most (vaultnode/policy_routes.py).
GENERATE_ROOT_SHARES_MAX = 16
# A share is 33 bytes as hex (66 characters) or base64: a file far larger is not one share.
SHARE_FILE_BYTES_MAX = 4096


class CliContext(Protocol):
    """What these commands need from click's context object (cli.main.Context provides it)."""

    addresses: list[str]
    cacert: str | None
    deadline_s: float

    @property
    def client(self) -> VaultClient: ...


def _exit_with(message: str, code: int) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _answer(call: Callable[[], Reply], *, not_found: str | None = None) -> Reply:
    """The reply, or the server's code and message on stderr and exit 1; `not_found` replaces
    the message of a 404 (Vault's is an empty list)."""
    try:
        return call()
    except ServerError as exc:
        if exc.status == 404 and not_found is not None:
            _exit_with(f"{exc.code}: {not_found}", EXIT_FAILED)
        _exit_with(str(exc), EXIT_FAILED)
    except ClientError as exc:
        _exit_with(str(exc), EXIT_FAILED)


def _emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, ensure_ascii=False))


def _data(reply: Reply) -> Any:
    """Vault's answers carry their payload in `data`."""
    return reply.body["data"]


def _policy_name(name: str) -> str:
    """The name as the server stores it (lower-cased), or a usage error before any request."""
    try:
        return check_policy_name(name)
    except PolicyError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None


# ---- vault policy ----------------------------------------------------------------------------
@click.group()
def policy() -> None:
    """Write, read, list and delete named ACL policies (docs/policies.md)."""


@policy.command(name="write")
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True))
@click.pass_obj
def policy_write(obj: CliContext, name: str, file: Path) -> None:
    """Store policy NAME from FILE (HCL or JSON; '-' for standard input), replacing any
    policy of that name. The server parses it and refuses it whole, with its reason."""
    name = _policy_name(name)
    text = _read_policy_text(file)
    body = {"policy": text}
    _answer(lambda: obj.client.request("PUT", f"{POLICIES_PATH}/{name}", json_body=body))
    click.echo(f"policy {name} written")


def _read_policy_text(path: Path) -> str:
    source = "<stdin>" if path == STDIN else str(path)
    try:
        if path == STDIN:
            raw = sys.stdin.buffer.read(POLICY_TEXT_BYTES_MAX + 1)
        else:
            with path.open("rb") as handle:
                raw = handle.read(POLICY_TEXT_BYTES_MAX + 1)
    except OSError as exc:
        _exit_with(f"cannot read {source}: {exc.strerror or exc}", EXIT_USAGE)
    if len(raw) > POLICY_TEXT_BYTES_MAX:
        _exit_with(
            f"{source} is larger than {POLICY_TEXT_BYTES_MAX} bytes, the most a policy may be",
            EXIT_USAGE,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _exit_with(f"{source} is not UTF-8 text (at byte {exc.start})", EXIT_USAGE)
    if not text.strip():
        # An empty pipe is far more often a failed command upstream than a wanted empty policy.
        _exit_with(f"{source} is empty; a policy holds at least one path block", EXIT_USAGE)
    return text


@policy.command(name="read")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (name and policy).")
@click.pass_obj
def policy_read(obj: CliContext, name: str, as_json: bool) -> None:
    """Print the text of policy NAME as it was written."""
    name = _policy_name(name)
    reply = _answer(
        lambda: obj.client.request("GET", f"{POLICIES_PATH}/{name}"),
        not_found=f"no policy named {name!r}",
    )
    data = _data(reply)
    if as_json:
        _emit_json({"name": data["name"], "policy": data["policy"]})
        return
    text = data["policy"]
    click.echo(text, nl=not text.endswith("\n"))


@policy.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def policy_list(obj: CliContext, as_json: bool) -> None:
    """List the names of the policies (`root` and `default` included)."""
    _print_listing(obj, POLICIES_PATH, as_json)


def _print_listing(obj: CliContext, path: str, as_json: bool) -> None:
    """Vault's LIST of `path` (as GET ?list=true): its keys, one a line."""
    params = {"list": "true"}
    keys = _data(_answer(lambda: obj.client.request("GET", path, params=params)))["keys"]
    if as_json:
        _emit_json({"keys": keys})
        return
    for key in keys:
        click.echo(key)


@policy.command(name="delete")
@click.argument("name")
@click.pass_obj
def policy_delete(obj: CliContext, name: str) -> None:
    """Delete policy NAME: tokens naming it lose what it granted, at once. Deleting a policy
    that does not exist succeeds, as in Vault (a retry must not fail)."""
    name = _policy_name(name)
    _answer(lambda: obj.client.request("DELETE", f"{POLICIES_PATH}/{name}"))
    click.echo(f"policy {name} deleted")


# ---- vault token ... -------------------------------------------------------------------------
@click.command(name="create")
@click.option(
    "--policy",
    "policies",
    multiple=True,
    required=True,
    metavar="NAME | PREFIX=CAP[,CAP]",
    help="An ACL policy name (docs/policies.md), or capabilities (create, update, read, history,"
    " list) under a name prefix. Repeatable.",
)
@click.option("--display-name", default="token", show_default=True)
@click.option("--ttl", type=click.IntRange(min=1), default=None, help="Lifetime in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def token_create(
    obj: CliContext, policies: tuple[str, ...], display_name: str, ttl: int | None, as_json: bool
) -> None:
    """Create a token holding named policies and/or name-prefix rules.

    Prefix rules alone use the native POST /v1/tokens (root only). Any policy name uses
    auth/token/create: root, or a token with `update` on auth/token/create giving policies it
    holds itself."""
    names, rules = _split_policies(policies)
    body: dict[str, Any] = {"display_name": display_name}
    if ttl is not None:
        body["ttl"] = ttl
    if not names:
        body["policies"] = rules
        reply = _answer(lambda: obj.client.request("POST", "/v1/tokens", json_body=body))
        if as_json:
            _emit_json(reply.body)
            return
        click.echo(f"token:    {reply.body['token']}")
        click.echo(f"accessor: {reply.body['accessor']}")
        click.echo(f"expires:  {reply.body['expires_at'] or 'never'}")
        return
    _warn_of_missing_policies(obj, names)
    body["policies"] = [*names, *rules]
    auth = _answer(
        lambda: obj.client.request("POST", "/v1/auth/token/create", json_body=body)
    ).body["auth"]
    if as_json:
        _emit_json(auth)
        return
    lease_s = auth["lease_duration"]
    click.echo(f"token:    {auth['client_token']}")
    click.echo(f"accessor: {auth['accessor']}")
    click.echo(f"policies: {', '.join(auth['policies'])}")
    click.echo(f"expires:  {f'in {lease_s} s' if lease_s else 'never'}")


def _split_policies(policies: tuple[str, ...]) -> tuple[list[str], list[dict[str, Any]]]:
    """Policy names, and `PREFIX=CAP,...` rules as the API's prefix objects (a policy name
    cannot hold '=', so the two never overlap)."""
    from vaultnode.auth import CAPABILITIES

    names: list[str] = []
    rules: list[dict[str, Any]] = []
    for given in policies:
        prefix, sep, caps = given.partition("=")
        if not sep:
            try:
                names.append(check_policy_name(given))
            except PolicyError as exc:
                raise click.UsageError(
                    f"--policy {given!r}: expected a policy name or PREFIX=CAP[,CAP...]; {exc}"
                ) from None
            continue
        capabilities = caps.split(",")
        if not caps:
            raise click.UsageError(f"--policy {given!r}: expected PREFIX=CAP[,CAP...]")
        unknown = [c for c in capabilities if c not in CAPABILITIES]
        if unknown:
            raise click.UsageError(
                f"--policy {given!r}: unknown capability {unknown[0]!r}"
                f" (known: {', '.join(CAPABILITIES)})"
            )
        rules.append({"prefix": prefix, "capabilities": capabilities})
    return names, rules


def _warn_of_missing_policies(obj: CliContext, names: list[str]) -> None:
    """Vault lets a token name a policy not written yet (it grants nothing until it is); say so,
    when the caller may list policies, since it is most often a typo."""
    try:
        reply = obj.client.request("GET", POLICIES_PATH, params={"list": "true"})
    except (ServerError, ClientError):
        return  # not allowed to list, or unreachable: the create itself will say
    existing = set(_data(reply)["keys"])
    for name in names:
        if name not in existing:
            click.echo(
                f"Warning: there is no policy named {name!r}: it grants nothing until written"
                " (vault policy write)",
                err=True,
            )


@click.command(name="lookup")
@click.option(
    "--accessor",
    default=None,
    help="Describe the token with this accessor (needs update on auth/token/lookup-accessor)"
    " instead of the token in use.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def token_lookup(obj: CliContext, accessor: str | None, as_json: bool) -> None:
    """Describe the token in use, or the one with --accessor."""
    if accessor is None:
        reply = _answer(lambda: obj.client.request("GET", "/v1/tokens/self"))
        if as_json:
            _emit_json(reply.body)
        else:
            click.echo(f"{reply.body['display_name']} ({reply.body['accessor']})")
        return
    body = {"accessor": accessor}
    data = _data(
        _answer(
            lambda: obj.client.request("POST", "/v1/auth/token/lookup-accessor", json_body=body)
        )
    )
    if as_json:
        _emit_json(data)
        return
    click.echo(f"{data['display_name']} ({data['accessor']})")
    click.echo(f"policies: {', '.join(data['policies'])}")
    click.echo(f"expires:  {data['expire_time'] or 'never'}")


@click.command(name="revoke")
@click.option("--accessor", required=True, help="The accessor of the token to revoke.")
@click.pass_obj
def token_revoke(obj: CliContext, accessor: str) -> None:
    """Revoke the token with --accessor, and every token created below it (needs update on
    auth/token/revoke-accessor)."""
    body = {"accessor": accessor}
    _answer(lambda: obj.client.request("POST", "/v1/auth/token/revoke-accessor", json_body=body))
    click.echo(f"revoked the token with accessor {accessor} and the tokens it created")


@click.command(name="accessors")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def token_accessors(obj: CliContext, as_json: bool) -> None:
    """List the accessor of every token (needs list and sudo on auth/token/accessors)."""
    _print_listing(obj, "/v1/auth/token/accessors", as_json)


@click.command(name="capabilities")
@click.argument("token_or_path", metavar="[TOKEN]")
@click.argument("path", required=False, metavar="PATH")
@click.option(
    "--accessor", default=None, help="The capabilities of the token with this accessor."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def token_capabilities(
    obj: CliContext, token_or_path: str, path: str | None, accessor: str | None, as_json: bool
) -> None:
    """Print the capabilities a token holds on PATH, a policy path such as secret/data/app/db:
    the token in use (sys/capabilities-self), TOKEN's (sys/capabilities) or --accessor's.

    A TOKEN on the command line is visible to `ps` and kept in the shell history: give '-' to
    read it from standard input instead."""
    token: str | None = token_or_path if path is not None else None
    path = path if path is not None else token_or_path
    body: dict[str, Any] = {"paths": [path]}
    if token is not None and accessor is not None:
        raise click.UsageError("give TOKEN or --accessor, not both")
    if accessor is not None:
        endpoint, body["accessor"] = "/v1/sys/capabilities-accessor", accessor
    elif token is not None:
        endpoint, body["token"] = "/v1/sys/capabilities", _token_argument(token)
    else:
        endpoint = "/v1/sys/capabilities-self"
    capabilities = _data(
        _answer(lambda: obj.client.request("POST", endpoint, json_body=body))
    )["capabilities"]
    if as_json:
        _emit_json({"path": path, "capabilities": capabilities})
    else:
        click.echo(", ".join(capabilities))


def _token_argument(token: str) -> str:
    if token != "-":
        return token
    line = sys.stdin.readline().strip()
    if not line:
        raise click.UsageError("TOKEN is '-' but standard input holds no token")
    return line


TOKEN_COMMANDS = [token_create, token_lookup, token_revoke, token_accessors, token_capabilities]


# ---- vault operator generate-root ------------------------------------------------------------
_FILE_OPTION = functools.partial(
    click.option, type=click.Path(path_type=Path, dir_okay=False), default=None
)


@click.command(name="generate-root")
@click.option(
    "--share-file",
    "share_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A file holding one unseal key share; repeat it for each share.",
)
@click.option(
    "--shares-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A directory of share-N files, as `vault operator init --shares-dir` writes them.",
)
@_FILE_OPTION(
    "--root-key-file",
    help="File or credential nodes: the root key file (0600, `vault-root-key-v1:...`).",
)
@_FILE_OPTION(
    "--token-out", help="Write the new root token to this new 0600 file instead of printing it."
)
@click.pass_obj
def operator_generate_root(
    obj: CliContext,
    share_files: tuple[Path, ...],
    shares_dir: Path | None,
    root_key_file: Path | None,
    token_out: Path | None,
) -> None:
    """Make a new root token from the root key; every earlier root token stops working.

    The key is proven with unseal key shares (--share-file, --shares-dir, else standard input
    one share a line, else hidden prompts) or with --root-key-file. No token is needed."""
    if root_key_file is not None and (share_files or shares_dir is not None):
        raise click.UsageError("give key shares or --root-key-file, not both")
    if token_out is not None and (token_out.exists() or not token_out.parent.is_dir()):
        _exit_with(f"{token_out} exists or its directory does not; refusing it", EXIT_USAGE)
    client = VaultClient(
        obj.addresses, None, deadline_s=obj.deadline_s, verify=obj.cacert or True
    )
    try:
        if root_key_file is not None:
            proof: dict[str, Any] = {"root_key": _root_key_line(root_key_file)}
        else:
            proof = {"keys": _key_shares(client, share_files, shares_dir)}
        reply = _answer(
            lambda: client.request(
                "POST", "/v1/sys/generate-root", json_body=proof, authenticated=False
            )
        )
    finally:
        client.close()
    data = _data(reply)
    _hand_out_root_token(data["token"], token_out)
    click.echo(f"accessor: {data['accessor']}")
    revoked = len(data["revoked"])
    click.echo(
        f"revoked {revoked} earlier root token{'' if revoked == 1 else 's'}: update VAULT_TOKEN"
        " and any root-token file; tokens they created stay valid (now without a parent)"
    )


def _hand_out_root_token(token: str, token_out: Path | None) -> None:
    if token_out is not None:
        from cli.cluster_init import write_private

        try:
            write_private(token_out, token + "\n")
        except OSError as exc:
            # The old root token is revoked already: losing this one would leave none at all.
            click.echo(f"cannot write {token_out} ({exc.strerror or exc}); printing it", err=True)
        else:
            click.echo(f"new root token written to {token_out} (mode 0600)")
            return
    click.echo(f"new root token: {token}")


def _root_key_line(path: Path) -> str:
    """The root key file's line; the file is checked as a node checks it (0600, the format)."""
    try:
        root_key = load_root_key_file(path)
    except RootKeyError as exc:  # its messages name the file, never its content
        _exit_with(str(exc), EXIT_USAGE)
    return f"{ROOT_KEY_FILE_PREFIX}{root_key.hex()}"


def _key_shares(
    client: VaultClient, share_files: tuple[Path, ...], shares_dir: Path | None
) -> list[str]:
    paths = list(share_files)
    if shares_dir is not None:
        paths += _share_files_in(shares_dir)
    if paths:
        shares = [_read_share_file(path) for path in paths]
    elif not sys.stdin.isatty():
        piped = sys.stdin.read(SHARE_FILE_BYTES_MAX * GENERATE_ROOT_SHARES_MAX)
        shares = [line.strip() for line in piped.splitlines() if line.strip()]
    else:
        shares = _prompt_for_shares(client)
    if not shares:
        raise click.UsageError("no key shares given (--share-file, --shares-dir or stdin)")
    if len(shares) > GENERATE_ROOT_SHARES_MAX:
        raise click.UsageError(f"at most {GENERATE_ROOT_SHARES_MAX} key shares are taken")
    return shares


def _share_files_in(shares_dir: Path) -> list[Path]:
    try:
        found = [p for p in shares_dir.iterdir() if p.name.startswith("share-")]
    except OSError as exc:
        _exit_with(f"cannot read {shares_dir}: {exc.strerror or exc}", EXIT_USAGE)
    if not found:
        _exit_with(f"{shares_dir} holds no share-N files", EXIT_USAGE)
    return sorted(found, key=lambda p: (len(p.name), p.name))  # share-2 before share-10


def _read_share_file(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            raw = handle.read(SHARE_FILE_BYTES_MAX + 1)
    except OSError as exc:
        _exit_with(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        share = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        share = ""
    if not share or len(raw) > SHARE_FILE_BYTES_MAX or "\n" in share:
        # Deliberately silent about what it holds: it may be key material all the same.
        _exit_with(f"{path} does not hold one unseal key share", EXIT_USAGE)
    return share


def _prompt_for_shares(client: VaultClient) -> list[str]:
    status = _answer(
        lambda: client.request("GET", "/v1/sys/seal-status", authenticated=False)
    ).body
    if status.get("type") != "shamir":
        raise click.UsageError(
            "the nodes read the root key from a file or credential: give --root-key-file PATH"
        )
    threshold = int(status["t"])
    return [
        str(click.prompt(f"Unseal key share {number}/{threshold}", hide_input=True)).strip()
        for number in range(1, threshold + 1)
    ]
