"""`make run`: start a local vault in the foreground, initialising it on the first run.

Prints each node's address and the root token, then waits; Ctrl-C (or SIGTERM) stops every node
it started. The cluster lives in ./local-cluster (git-ignored); delete it to start afresh.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.cluster_init import TOKEN_FILE_NAME, init_cluster

ROOT = Path(__file__).resolve().parent.parent
HEALTH_DEADLINE_S = 30.0


def node_configs(cluster_dir: Path) -> list[Path]:
    return sorted(cluster_dir.glob("node*.toml"))


def http_address(config: Path) -> str:
    import tomllib

    return tomllib.loads(config.read_text())["http_listen"]


def wait_healthy(address: str, process: subprocess.Popen[bytes]) -> bool:
    give_up_at = time.monotonic() + HEALTH_DEADLINE_S
    while time.monotonic() < give_up_at:
        if process.poll() is not None:
            return False
        try:
            if httpx.get(f"http://{address}/health", timeout=1.0).status_code == 200:
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
    args = parser.parse_args()
    cluster_dir: Path = args.dir
    if not node_configs(cluster_dir):
        init_cluster(cluster_dir, args.nodes, args.base_port)
        print(f"initialised a new {args.nodes}-node vault in {cluster_dir}")
    token = (cluster_dir / TOKEN_FILE_NAME).read_text().strip()
    processes: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    addresses = []
    try:
        for config in node_configs(cluster_dir):
            address = http_address(config)
            process = subprocess.Popen(
                [sys.executable, "-m", "vaultnode.main", "--config", str(config)],
                cwd=cluster_dir,
            )
            processes.append(process)
            addresses.append(address)
        for address, process in zip(addresses, processes, strict=True):
            if not wait_healthy(address, process):
                print(f"node at {address} did not become healthy; see its log above",
                      file=sys.stderr)
                return 1
        print("\nvault is running:")
        for address in addresses:
            print(f"  http://{address}")
        print(f"\nroot token: {token}")
        print(f"\n  export VAULT_ADDR={','.join(addresses)}")
        print(f"  export VAULT_TOKEN={token}")
        print("  .venv/bin/vault status\n\nCtrl-C stops every node.", flush=True)
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.2)  # a signal ends the wait early
        return 0 if stopping else 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
