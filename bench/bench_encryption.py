"""The cost of encryption at rest: create throughput with and without it, in one run.

Owns: driving the node's own create path in-process (VaultApi.handle -> Sealer.seal -> command ->
PaxosReplicator of one member, fsynced -> VaultState.apply, on a temporary data directory) once
with the real Sealer and once with a bench-only pass-through sealer that stores the value in the
clear, with the same workload, alternating rounds so drift on a shared machine hits both alike.
Must never: be run by the test suite (it takes seconds), offer the pass-through sealer to
production code (it lives here and nowhere else), or print the root token or a value.

Reproduce with:  .venv/bin/python bench/bench_encryption.py [--seconds 2] [--clients 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from consensus.membership import Member, Membership  # noqa: E402
from storage.envelope import new_record_id  # noqa: E402
from storage.rootkey import generate_root_key  # noqa: E402
from vaultnode.api import VaultApi  # noqa: E402
from vaultnode.auth import hash_token, new_accessor, new_token  # noqa: E402
from vaultnode.commands import CommandHeader, InitVault  # noqa: E402
from vaultnode.config import Limits  # noqa: E402
from vaultnode.events import EventLog  # noqa: E402
from vaultnode.http_server import Request  # noqa: E402
from vaultnode.identity import create_identity  # noqa: E402
from vaultnode.paxos_replicator import PaxosReplicator  # noqa: E402
from vaultnode.sealing import Sealer  # noqa: E402
from vaultnode.state import VaultState  # noqa: E402

REPRODUCE = ".venv/bin/python bench/bench_encryption.py"
VALUE_BYTES = 64


class PassThroughSealer(Sealer):
    """Stores the value in the clear with the same metadata: what the vault would write without
    encryption. Bench-only. The state machine accepts it: it checks a record's kek_id and
    record_id, never its cryptography."""

    def seal(self, plaintext: bytes, *, name: str, now_us: int, accessor: str) -> dict[str, Any]:
        return {
            "format_version": 0,
            "kek_id": self._state.current_kek_id,
            "record_id": new_record_id(),
            "name": name,
            "created_at_us": now_us,
            "created_by": accessor,
            "value": plaintext,
        }

    def open(self, name: str, sealed_wire: dict[str, Any]) -> bytes:
        value: bytes = sealed_wire["value"]
        return value


async def _measure_creates(
    sealer_class: type[Sealer], clients: int, seconds: float, data_dir: Path
) -> tuple[float, float]:
    """(creates per second, process CPU microseconds per create) for one variant."""
    state = VaultState()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below; the node logs every request too
    events = EventLog(1, devnull)

    def fatal(exc: BaseException) -> None:
        raise SystemExit(f"bench: the replicator stopped: {exc}")

    incarnation = create_identity(data_dir)
    replicator = PaxosReplicator(
        node_id=1, membership=Membership((Member(1, incarnation, True),)),
        node_incarnation=incarnation, data_dir=data_dir, state=state, events=events,
        on_fatal=fatal, segment_bytes_max=Limits().segment_bytes_max,
        snapshot_every_slots=Limits().snapshot_every_slots,
    )
    replicator.replay()
    replicator.start(None)
    sealer = sealer_class(generate_root_key(), state)
    token = new_token()
    outcome = await replicator.submit(
        InitVault(
            CommandHeader("bench-bootstrap", "", 0),
            root_token_sha256=hash_token(token),
            root_accessor=new_accessor(),
            key_check_value=sealer.key_check_value,
            first_kek_id=1,
            first_kek_wrapped=sealer.new_wrapped_kek(1),
        )
    )
    assert outcome.code == "initialized", outcome
    api = VaultApi(
        node_id=1, state=state, replicator=replicator, sealer=sealer, events=events, limits=Limits()
    )
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    value = os.urandom(VALUE_BYTES // 2).hex()
    body = json.dumps({"value": value}).encode()
    created = 0
    stop_at = time.perf_counter() + seconds

    async def client(number: int) -> None:
        nonlocal created
        sequence = 0
        while time.perf_counter() < stop_at:
            path = f"/v1/secrets/bench/{number}/{sequence}"
            response = await api.handle(Request("POST", path, {}, headers, body))
            assert response.status == 201, response.body
            sequence += 1
            created += 1

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed_s = time.perf_counter() - started
    # CPU per create moves less than ops/s when other work shares the cores or fsync stalls.
    cpu_us_per_create = (time.process_time() - cpu_started) * 1e6 / created
    await replicator.stop()
    devnull.close()
    # The comparison is only honest if one variant really stores the value and the other not.
    on_disk = b"".join(p.read_bytes() for p in data_dir.glob("paxos/*.seg"))
    stored_in_clear = value.encode() in on_disk
    assert stored_in_clear == (sealer_class is PassThroughSealer), sealer_class.__name__
    return created / elapsed_s, cpu_us_per_create


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per round per variant")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; median kept")
    parser.add_argument("--clients", default="1,64", help="concurrent clients, comma-separated")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    variants: list[tuple[str, type[Sealer]]] = [
        ("encrypted", Sealer),
        ("plaintext", PassThroughSealer),
    ]

    print(
        f"encryption cost: in-process create path (HTTP parsing excluded, fsync included), "
        f"{VALUE_BYTES}-byte values, {args.rounds} alternating rounds of {args.seconds:.1f} s, "
        f"median; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(
        f"  {'clients':>7}  {'encrypted':>12}  {'plaintext':>12}  {'enc/plain':>9}"
        f"  {'CPU us/create enc':>17}  {'plain':>6}  {'extra':>6}"
    )
    with tempfile.TemporaryDirectory(prefix="vault-bench-enc-") as tmp:
        for clients in client_counts:
            rates: dict[str, list[float]] = {label: [] for label, _ in variants}
            cpu_us: dict[str, list[float]] = {label: [] for label, _ in variants}
            for round_number in range(args.rounds):
                for label, sealer_class in variants:
                    data_dir = Path(tmp) / f"{label}-{clients}-{round_number}"
                    rate, cpu = uvloop.run(
                        _measure_creates(sealer_class, clients, args.seconds, data_dir)
                    )
                    rates[label].append(rate)
                    cpu_us[label].append(cpu)
            encrypted, plaintext = (statistics.median(rates[label]) for label, _ in variants)
            cpu_encrypted, cpu_plaintext = (
                statistics.median(cpu_us[label]) for label, _ in variants
            )
            print(
                f"  {clients:>7}  {encrypted:>8,.0f} /s  {plaintext:>8,.0f} /s  "
                f"{encrypted / plaintext:>9.2f}  {cpu_encrypted:>17.0f}  {cpu_plaintext:>6.0f}"
                f"  {cpu_encrypted - cpu_plaintext:>+6.0f}"
            )
    print(
        f"reproduce: {REPRODUCE} --seconds {args.seconds} --rounds {args.rounds} "
        f"--clients {args.clients}"
    )


if __name__ == "__main__":
    main()
