"""How long one small log append's fdatasync takes, by how the segment file is laid out.

Owns: three files side by side in one directory (by default under the data disk's /tmp), each
written in one of three ways, and the fdatasync time of a 300-byte record appended to one of
them, measured alone and while fdatasyncs of the two others (started on threads ~0.1 ms
before, as a leader's and the other follower's are in a three-node cluster on one disk) are
under way:
- `append`: O_APPEND, the file grows with each record (storage/log.py without `preallocate`):
  every fdatasync also commits the size change through the filesystem's journal;
- `fallocate`: posix_fallocate'd to 64 MiB first, records written in place (storage/log.py
  with `preallocate`, as the nodes open it, and etcd's WAL with its preallocated segments);
- `zero-filled`: 64 MiB of zeros written and fsynced first, records written in place.
It prints the median and 90th percentile of each and the command that reproduces them.
Must never: be run by the test suite, or touch a node's data.

Reproduce with:  .venv/bin/python bench/bench_fsync_modes.py [--records 600] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

RECORD = b"r" * 300
PREALLOCATED_BYTES = 64 << 20
MODES = ("append", "fallocate", "zero-filled")


def open_segment(path: str, mode: str) -> int:
    if mode == "append":
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if mode == "fallocate":
        os.posix_fallocate(fd, 0, PREALLOCATED_BYTES)
    else:
        zeros = bytes(1 << 20)
        for _ in range(PREALLOCATED_BYTES >> 20):
            os.write(fd, zeros)
    os.fsync(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def append_and_sync(fd: int) -> None:
    os.write(fd, RECORD)
    os.fdatasync(fd)


def timed(fd: int) -> float:
    started = time.perf_counter()
    append_and_sync(fd)
    return time.perf_counter() - started


def measure(directory: str, mode: str, records: int) -> tuple[list[float], list[float]]:
    """(alone, while two other fdatasyncs run), in seconds, `records` of each."""
    fds = [open_segment(os.path.join(directory, f"{mode}-{n}"), mode) for n in range(3)]
    measured, *others = fds
    alone: list[float] = []
    contended: list[float] = []
    try:
        for _ in range(records):
            alone.append(timed(measured))
            threads = [threading.Thread(target=append_and_sync, args=(fd,)) for fd in others]
            for thread in threads:
                thread.start()
            time.sleep(0.0001)
            contended.append(timed(measured))
            for thread in threads:
                thread.join()
    finally:
        for fd in fds:
            os.close(fd)
    return alone, contended


def describe(samples: list[float]) -> str:
    ordered = sorted(samples)
    median = statistics.median(ordered) * 1e6
    p90 = ordered[int(len(ordered) * 0.9)] * 1e6
    return f"{median:6.0f} {p90:6.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    print("fdatasync of one 300-byte record, µs (median, p90)")
    print(f"{'segment file':12} | {'alone':>13} | {'2 others under way':>18}")
    with tempfile.TemporaryDirectory(prefix="vault-bench-fsync-", dir=args.dir) as directory:
        for mode in MODES:
            alone, contended = measure(directory, mode, args.records)
            print(f"{mode:12} | {describe(alone):>13} | {describe(contended):>18}")
    print(f"reproduce: .venv/bin/python bench/bench_fsync_modes.py --records {args.records} "
          f"--dir {args.dir}")


if __name__ == "__main__":
    main()
