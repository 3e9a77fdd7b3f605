"""`vault operator init`: the files a new local cluster needs, written once and never overwritten.

Owns the layout of an initialised cluster directory: one TOML config and one root-key copy per
node, the cluster CA and each node's certificate (for peer links and the HTTPS client API), and the
root token file (mode 0600). Nodes run on 127.0.0.1 by default, or one per host given. Plain HTTP
for clients is written only when asked for (local development). The root token is printed nowhere
by this module; the caller decides whether to show it (once).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from storage.crypto_errors import RootKeyError
from storage.keysource import split_root_key
from storage.rootkey import (
    ROOT_KEY_FILE_PREFIX,
    generate_root_key,
    key_check_value,
    write_root_key_file,
)
from vaultnode.auth import hash_token, new_accessor, new_token
from vaultnode.identity import IdentityError, create_identity
from vaultnode.tls import generate_ca, issue_node_cert

TOKEN_FILE_NAME = "root-token"
CREDENTIAL_NAME = "vault-root-key"  # the name the unit's LoadCredentialEncrypted= uses
CREDENTIAL_FILE_NAME = "root-key.cred"


class InitError(Exception):
    pass


@dataclass(frozen=True)
class InitResult:
    out_dir: Path
    config_paths: list[Path]
    http_addresses: list[str]
    token_path: Path | None  # None (and root_token "") when no root token was issued
    root_token: str
    ca_path: Path
    scheme: str  # "https", or "http" for a plaintext development cluster
    # root_key_source = "shamir": the key shares (hex), to hand out; stored nowhere by init.
    key_shares: list[str] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"{self.scheme}://{address}" for address in self.http_addresses]


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _node_addresses(
    nodes: int, base_port: int, hosts: list[str] | None
) -> list[tuple[int, str, str, str]]:
    """(node id, host, peer address, HTTP address) for each node."""
    if hosts is None:
        # One machine: every node needs its own pair of ports.
        if not 1024 <= base_port <= 65536 - 2 * nodes:
            raise InitError(f"--base-port must leave room for {2 * nodes} ports below 65536")
        return [
            (i, "127.0.0.1", f"127.0.0.1:{base_port + 2 * (i - 1) + 1}",
             f"127.0.0.1:{base_port + 2 * (i - 1)}")
            for i in range(1, nodes + 1)
        ]
    if len(hosts) != nodes:
        raise InitError(f"--hosts names {len(hosts)} hosts for {nodes} nodes; give one per node")
    if len(set(hosts)) != len(hosts):
        raise InitError("--hosts names a host twice; give each node its own machine")
    for host in hosts:
        if not host or any(c in host for c in ' :/"\\'):
            raise InitError(f"--hosts: {host!r} is not a host name or IPv4 address")
    if not 1024 <= base_port <= 65534:
        raise InitError("--base-port must leave room for 2 ports below 65536")
    return [
        (i, host, f"{host}:{base_port + 1}", f"{host}:{base_port}")
        for i, host in enumerate(hosts, start=1)
    ]


def init_cluster(
    out_dir: Path,
    nodes: int,
    base_port: int,
    *,
    plaintext_http: bool = False,
    hosts: list[str] | None = None,
    data_dir: str | None = None,
    root_key_source: str = "file",
    key_shares: int = 5,
    key_threshold: int = 3,
    root_key: bytes | None = None,
    issue_root_token: bool = True,
) -> InitResult:
    """Write a new cluster's files. `data_dir`, when given, is every node's (absolute) data path.

    A restore (cli/snapshot_restore.py) passes the backed-up vault's `root_key` and
    `issue_root_token=False`: its vault is already initialised and keeps its own tokens, so the
    bootstrap token hash the configs need is of a token nobody holds, and no token file is written.

    `root_key_source` says how nodes get the root key: "file" (a 0600 key file per node),
    "systemd-credential" (a credential file per node, encrypted by `systemd-creds` with this
    host's key) or "shamir" (`key_shares` shares, `key_threshold` of which unseal; no key file).
    """
    if root_key_source not in ("file", "systemd-credential", "shamir"):
        raise InitError(f"unknown root key source {root_key_source!r}")
    if root_key_source == "shamir" and not 2 <= key_threshold <= key_shares <= 255:
        raise InitError("need 2 <= --key-threshold <= --key-shares <= 255")
    if root_key_source == "systemd-credential" and shutil.which("systemd-creds") is None:
        raise InitError("--root-key-source systemd-credential needs systemd-creds (systemd 250+)")
    if nodes not in (1, 3, 5):
        raise InitError("--nodes must be 1, 3 or 5 (a majority must survive a failure)")
    if data_dir is not None and not Path(data_dir).is_absolute():
        raise InitError(f"--data-dir must be an absolute path, got {data_dir!r}")
    addresses = _node_addresses(nodes, base_port, hosts)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InitError(f"{out_dir} is not empty; refusing to overwrite an existing cluster")
    out_dir.mkdir(parents=True, exist_ok=True)
    root_key = generate_root_key() if root_key is None else root_key
    root_token = new_token()
    root_accessor = new_accessor()
    cluster_id = secrets.token_hex(8)
    # Each node's identity is bound here, at creation (docs/membership.md, "Identity"): its data
    # directory gets a new incarnation, and every node's initial configuration names it, so a
    # node whose data directory is later wiped can no longer vote under its old identity.
    incarnations = {
        node_id: _create_node_data_dir(out_dir / f"node{node_id}" / "data")
        for node_id, _, _, _ in addresses
    }
    peer_lines = "".join(
        peer_entry(i, incarnations[i], peer, http) for i, _, peer, http in addresses
    )
    if plaintext_http:
        client_api = "# Plain HTTP for clients: local development only, never on a network.\n"
        client_api += "http_plaintext = true\n"
    else:
        client_api = "# The client API serves HTTPS with the node certificate (clients: ca.pem).\n"
    ca_cert, ca_key = generate_ca(cluster_id)
    (out_dir / "ca.pem").write_bytes(ca_cert)
    write_private(out_dir / "ca.key", ca_key.decode())  # only for issuing more certificates
    shares: list[str] = []
    if root_key_source == "shamir":
        try:
            shares = [share.hex() for share in split_root_key(root_key, key_shares, key_threshold)]
        except RootKeyError as exc:
            raise InitError(str(exc)) from None
    config_paths = []
    for node_id, host, peer_addr, http_addr in addresses:
        node_dir = out_dir / f"node{node_id}"
        key_lines = write_node_key(
            node_dir, node_id, root_key, root_key_source, encrypt_here=hosts is None
        )
        if shares:
            key_lines += (
                f"# {key_threshold} of the {key_shares} key shares unseal this node.\n"
                f"unseal_shares = {key_shares}\nunseal_threshold = {key_threshold}\n"
            )
        cert, key = issue_node_cert(ca_cert, ca_key, node_id, [host])
        (node_dir / "ca.pem").write_bytes(ca_cert)
        (node_dir / "node.pem").write_bytes(cert)
        write_private(node_dir / "node.key", key.decode())
        node_data_dir = data_dir or f"node{node_id}/data"
        config = (
            f"# vaultnode configuration written by `vault operator init`\n"
            f"node_id = {node_id}\n"
            f'cluster_id = "{cluster_id}"\n'
            f'data_dir = "{node_data_dir}"\n'
            f'http_listen = "{http_addr}"\n'
            f'peer_listen = "{peer_addr}"\n'
            + key_lines +
            f'tls_ca_file = "node{node_id}/ca.pem"\n'
            f'tls_cert_file = "node{node_id}/node.pem"\n'
            f'tls_key_file = "node{node_id}/node.key"\n'
            + client_api +
            "# Only the root token's hash: nodes need it to bootstrap; none keeps the token.\n"
            f'root_token_sha256 = "{hash_token(root_token).hex()}"\n'
            f'root_accessor = "{root_accessor}"\n' + peer_lines
        )
        path = out_dir / f"node{node_id}.toml"
        path.write_text(config)
        config_paths.append(path)
    del root_key
    token_path: Path | None = None
    if issue_root_token:
        token_path = out_dir / TOKEN_FILE_NAME
        write_private(token_path, root_token + "\n")
    return InitResult(
        out_dir,
        config_paths,
        [http for _, _, _, http in addresses],
        token_path,
        root_token if issue_root_token else "",
        out_dir / "ca.pem",
        "http" if plaintext_http else "https",
        shares,
    )


def peer_entry(
    node_id: int, incarnation: int, peer_addr: str, http_addr: str, voter: bool = True,
    auto_promote: bool = False,
) -> str:
    """One `[[peers]]` entry of a node config: a member of its starting configuration."""
    return (
        f"\n[[peers]]\nid = {node_id}\nincarnation = {incarnation}\n"
        f'peer_addr = "{peer_addr}"\nhttp_addr = "{http_addr}"\n'
        f"voter = {'true' if voter else 'false'}\n"
        + ("auto_promote = true\n" if auto_promote else "")
    )


def _create_node_data_dir(data_dir: Path) -> int:
    """Create a node's data directory (0700) with a new identity; its incarnation."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        return create_identity(data_dir)
    except IdentityError as exc:
        raise InitError(str(exc)) from None


def write_node_key(
    node_dir: Path, node_id: int, root_key: bytes, source: str, *, encrypt_here: bool
) -> str:
    """Give one node the root key as `source` says; return its config lines.

    A credential is encrypted with the key of the machine that will decrypt it. For nodes on
    this machine that is done here; for other hosts (--hosts) init writes `root.key` for the
    admin to pipe into `systemd-creds encrypt` on each VM and then delete (docs/deploy.md).
    """
    if source == "file" or (source == "systemd-credential" and not encrypt_here):
        write_root_key_file(node_dir / "root.key", root_key)
    if source == "file":
        return f'root_key_file = "node{node_id}/root.key"\n'
    if source == "systemd-credential":
        if encrypt_here:
            encrypt_credential(root_key, node_dir / CREDENTIAL_FILE_NAME)
        return (
            'root_key_source = "systemd-credential"\n'
            f'root_key_credential = "{CREDENTIAL_NAME}"\n'
        )
    # Shamir: only the check value, so a node can refuse a wrong share set before the vault
    # exists; the key itself goes nowhere but into the shares.
    return (
        'root_key_source = "shamir"\n'
        f'root_key_check_value = "{key_check_value(root_key).hex()}"\n'
    )


def encrypt_credential(root_key: bytes, path: Path, with_key: str = "host") -> None:
    """Write `path`: the root key as a systemd credential, encrypted by `systemd-creds`.

    `--with-key=host` uses /var/lib/systemd/credential.secret (root only), so it works on VMs
    without a TPM; "auto" would add the TPM2 where one exists, binding the file to that chip.
    Either way only this machine can decrypt it. The key reaches systemd-creds on a pipe.
    """
    contents = f"{ROOT_KEY_FILE_PREFIX}{root_key.hex()}\n".encode("ascii")
    try:
        result = subprocess.run(
            [
                "systemd-creds", "encrypt", f"--with-key={with_key}",
                f"--name={CREDENTIAL_NAME}", "-", str(path),
            ],
            input=contents,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InitError(f"systemd-creds encrypt failed: {exc}") from None
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        raise InitError(
            f"systemd-creds encrypt failed (exit {result.returncode}): "
            f"{detail[-1] if detail else 'no message'}; it needs root for --with-key={with_key}"
        )
    os.chmod(path, 0o600)
