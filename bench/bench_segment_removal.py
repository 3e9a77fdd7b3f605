"""How long removing a compacted log segment holds its caller, with a write burst under way.

Owns: timing what `SegmentedLog.compact_before` did on the node's event loop until issue 16,
stop 38, and what the log's writer now does on the fsync thread: unlink one full, preallocated
segment and fsync the directory; once on a quiet disk, once while another thread writes and
fsyncs 1 MiB chunks (a burst of large secrets on a node of the same machine). Must never: be
run by the test suite (it writes ~1 GiB), or leave its files behind.

Reproduce with:  .venv/bin/python bench/bench_segment_removal.py [--segments 8] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from storage.disk import RealDisk
from storage.log import SEGMENT_SIZE_BYTES_MAX_DEFAULT

CHUNK_BYTES = 1 << 20


def make_segments(directory: Path, count: int) -> list[Path]:
    paths = []
    chunk = os.urandom(CHUNK_BYTES)
    for number in range(count):
        path = directory / f"segment-{number}"
        with open(path, "wb") as file:
            for _ in range(SEGMENT_SIZE_BYTES_MAX_DEFAULT // CHUNK_BYTES):
                file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
        paths.append(path)
    RealDisk().fsync_dir(str(directory))
    return paths


def remove_all(directory: Path, paths: list[Path]) -> list[float]:
    """Milliseconds per removal: the unlink and the directory fsync after it."""
    disk = RealDisk()
    held_ms = []
    for path in paths:
        started = time.perf_counter()
        disk.remove(str(path))
        disk.fsync_dir(str(directory))
        held_ms.append((time.perf_counter() - started) * 1000)
    return held_ms


def burst(directory: Path, stop: threading.Event) -> None:
    chunk = os.urandom(CHUNK_BYTES)
    path = directory / "burst"
    with open(path, "wb") as file:
        while not stop.is_set():
            file.write(chunk)
            file.flush()
            os.fsync(file.fileno())
            if file.tell() >= 512 * CHUNK_BYTES:
                file.seek(0)
    path.unlink()


def report(label: str, held_ms: list[float]) -> None:
    print(
        f"{label:<24} removals {len(held_ms):>3}  median {statistics.median(held_ms):8.2f} ms"
        f"  max {max(held_ms):8.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--dir", default=None, help="a directory on the disk to measure")
    args = parser.parse_args()
    print(
        f"reproduce: .venv/bin/python bench/bench_segment_removal.py --segments {args.segments}"
        + (f" --dir {args.dir}" if args.dir else "")
    )
    print(f"segments of {SEGMENT_SIZE_BYTES_MAX_DEFAULT >> 20} MiB, fsynced before the removals")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        directory = Path(scratch)
        report("quiet disk", remove_all(directory, make_segments(directory, args.segments)))
        paths = make_segments(directory, args.segments)
        stop = threading.Event()
        writer = threading.Thread(target=burst, args=(directory, stop))
        writer.start()
        try:
            time.sleep(0.5)  # the burst under way before the first removal
            report("1 MiB write+fsync burst", remove_all(directory, paths))
        finally:
            stop.set()
            writer.join()


if __name__ == "__main__":
    main()
