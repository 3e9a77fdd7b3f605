"""Micro-benchmark of storage.envelope: seal, open and rewrap operations per second.

Owns: timing the pure crypto path of one secret version (no state machine, no disk, no network).
Must never: be run by the test suite (it takes seconds, not milliseconds) or print key material.

Reproduce with:  .venv/bin/python bench/bench_envelope.py [--seconds 1.0] [--value-bytes 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

from storage.envelope import SealedValue, new_record_id, open_sealed, rewrap, seal

REPRODUCE = ".venv/bin/python bench/bench_envelope.py"


def _ops_per_second(operation: Callable[[], object], duration_seconds: float) -> float:
    operation()  # warm up: first use of a cipher context allocates
    count = 0
    started = time.perf_counter()
    deadline = started + duration_seconds
    while True:
        for _ in range(100):
            operation()
        count += 100
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per operation")
    parser.add_argument("--value-bytes", type=int, default=64, help="plaintext size")
    args = parser.parse_args()

    kek, new_kek = os.urandom(32), os.urandom(32)
    keks = {1: kek, 2: new_kek}
    plaintext = os.urandom(args.value_bytes)

    def seal_once() -> SealedValue:
        return seal(
            plaintext,
            name="bench/secret",
            record_id=new_record_id(),
            created_at_us=1_764_000_000_000_000,
            created_by="acc-bench",
            kek_id=1,
            kek=kek,
        )

    sealed = seal_once()

    def open_once() -> object:
        return open_sealed(sealed, expected_name="bench/secret", kek_for=keks.__getitem__)

    def rewrap_once() -> object:
        return rewrap(sealed, kek_for=keks.__getitem__, new_kek_id=2, new_kek=new_kek)

    print(
        f"envelope benchmark: value {args.value_bytes} bytes, {args.seconds:.1f} s per operation, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    for label, operation in [("seal", seal_once), ("open", open_once), ("rewrap", rewrap_once)]:
        rate = _ops_per_second(operation, args.seconds)
        print(f"  {label:<7}{rate:>12,.0f} ops/s   ({1e6 / rate:6.1f} us/op)")
    print(f"reproduce: {REPRODUCE} --seconds {args.seconds} --value-bytes {args.value_bytes}")


if __name__ == "__main__":
    main()
