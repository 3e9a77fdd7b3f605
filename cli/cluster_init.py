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
from dataclasses import dataclass
from pathlib import Path

from storage.rootkey import generate_root_key, write_root_key_file
from vaultnode.auth import hash_token, new_accessor, new_token
from vaultnode.tls import generate_ca, issue_node_cert

TOKEN_FILE_NAME = "root-token"


class InitError(Exception):
    pass


@dataclass(frozen=True)
class InitResult:
    out_dir: Path
    config_paths: list[Path]
    http_addresses: list[str]
    token_path: Path
    root_token: str
    ca_path: Path
    scheme: str  # "https", or "http" for a plaintext development cluster

    @property
    def urls(self) -> list[str]:
        return [f"{self.scheme}://{address}" for address in self.http_addresses]


def _write_private(path: Path, text: str) -> None:
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
) -> InitResult:
    """Write a new cluster's files. `data_dir`, when given, is every node's (absolute) data path."""
    if nodes not in (1, 3, 5):
        raise InitError("--nodes must be 1, 3 or 5 (a majority must survive a failure)")
    if data_dir is not None and not Path(data_dir).is_absolute():
        raise InitError(f"--data-dir must be an absolute path, got {data_dir!r}")
    addresses = _node_addresses(nodes, base_port, hosts)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InitError(f"{out_dir} is not empty; refusing to overwrite an existing cluster")
    out_dir.mkdir(parents=True, exist_ok=True)
    root_key = generate_root_key()
    root_token = new_token()
    root_accessor = new_accessor()
    cluster_id = secrets.token_hex(8)
    peer_lines = "".join(
        f'\n[[peers]]\nid = {i}\npeer_addr = "{peer}"\nhttp_addr = "{http}"\n'
        for i, _, peer, http in addresses
    )
    if plaintext_http:
        client_api = "# Plain HTTP for clients: local development only, never on a network.\n"
        client_api += "http_plaintext = true\n"
    else:
        client_api = "# The client API serves HTTPS with the node certificate (clients: ca.pem).\n"
    ca_cert, ca_key = generate_ca(cluster_id)
    (out_dir / "ca.pem").write_bytes(ca_cert)
    _write_private(out_dir / "ca.key", ca_key.decode())  # only for issuing more certificates
    config_paths = []
    for node_id, host, peer_addr, http_addr in addresses:
        node_dir = out_dir / f"node{node_id}"
        node_dir.mkdir()
        write_root_key_file(node_dir / "root.key", root_key)
        cert, key = issue_node_cert(ca_cert, ca_key, node_id, [host])
        (node_dir / "ca.pem").write_bytes(ca_cert)
        (node_dir / "node.pem").write_bytes(cert)
        _write_private(node_dir / "node.key", key.decode())
        node_data_dir = data_dir or f"node{node_id}/data"
        config = (
            f"# vaultnode configuration written by `vault operator init`\n"
            f"node_id = {node_id}\n"
            f'cluster_id = "{cluster_id}"\n'
            f'data_dir = "{node_data_dir}"\n'
            f'http_listen = "{http_addr}"\n'
            f'peer_listen = "{peer_addr}"\n'
            f'root_key_file = "node{node_id}/root.key"\n'
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
    token_path = out_dir / TOKEN_FILE_NAME
    _write_private(token_path, root_token + "\n")
    return InitResult(
        out_dir,
        config_paths,
        [http for _, _, _, http in addresses],
        token_path,
        root_token,
        out_dir / "ca.pem",
        "http" if plaintext_http else "https",
    )
