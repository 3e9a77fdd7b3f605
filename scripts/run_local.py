"""`make run`: start a local vault in the foreground, initialising it on the first run.

Prints each node's address and the file holding the root token (never the token), then waits;
Ctrl-C (or SIGTERM) stops every node it started. The cluster lives in ./local-cluster
(git-ignored); delete it to start afresh.
A new cluster serves clients plain HTTP, said explicitly in its configs (`http_plaintext = true`):
it is a development cluster on 127.0.0.1. `--tls` makes a new one serve HTTPS like a deployment;
an existing cluster serves whatever its configs say, and VAULT_CACERT is printed when it is HTTPS.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.cluster_init import TOKEN_FILE_NAME, init_cluster
from simulations.harness import stop_processes

ROOT = Path(__file__).resolve().parent.parent
HEALTH_DEADLINE_S = 30.0


def node_configs(cluster_dir: Path) -> list[Path]:
    return sorted(cluster_dir.glob("node*.toml"))


def node_url(config: Path) -> str:
    import tomllib

    data = tomllib.loads(config.read_text())
    scheme = "http" if data.get("http_plaintext") is True else "https"
    return f"{scheme}://{data['http_listen']}"


def wait_healthy(url: str, process: subprocess.Popen[bytes], verify: ssl.SSLContext | bool) -> bool:
    give_up_at = time.monotonic() + HEALTH_DEADLINE_S
    while time.monotonic() < give_up_at:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/health", timeout=1.0, verify=verify).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=ROOT / "local-cluster")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=8200)
    parser.add_argument("--tls", action="store_true", help="a new cluster serves HTTPS")
    args = parser.parse_args()
    cluster_dir: Path = args.dir
    if not node_configs(cluster_dir):
        init_cluster(cluster_dir, args.nodes, args.base_port, plaintext_http=not args.tls)
        print(f"initialised a new {args.nodes}-node vault in {cluster_dir}")
    token_file = (cluster_dir / TOKEN_FILE_NAME).resolve()
    ca_file = cluster_dir / "ca.pem"
    urls = [node_url(config) for config in node_configs(cluster_dir)]
    tls = any(url.startswith("https://") for url in urls)
    verify = ssl.create_default_context(cafile=str(ca_file)) if tls else False
    processes: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for config in node_configs(cluster_dir):
            process = subprocess.Popen(
                [sys.executable, "-m", "vaultnode.main", "--config", str(config)],
                cwd=cluster_dir,
            )
            processes.append(process)
        for url, process in zip(urls, processes, strict=True):
            if not wait_healthy(url, process, verify):
                print(f"node at {url} did not become healthy; see its log above",
                      file=sys.stderr)
                return 1
        print("\nvault is running:" + ("" if tls else " plain HTTP, for local development only"))
        for url in urls:
            print(f"  {url}")
        # The token is read from its file when exported, so it lands in no terminal or history.
        print(f"\nroot token in {token_file} (mode 0600)")
        print(f"\n  export VAULT_ADDR={','.join(urls)}")
        print(f'  export VAULT_TOKEN="$(cat {token_file})"')
        if tls:
            print(f"  export VAULT_CACERT={ca_file}")
        print("  .venv/bin/vault status\n\nCtrl-C stops every node.", flush=True)
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.2)  # a signal ends the wait early
        return 0 if stopping else 1
    finally:
        stop_processes(processes)


if __name__ == "__main__":
    sys.exit(main())
