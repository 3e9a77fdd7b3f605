"""Where one request's wall-clock time goes, across the three nodes of a one-client cell.

Reads the event files that a node built with `bench/latency_trace.patch` writes when
`VAULT_TRACE=<prefix>` is set (one `<prefix>.<pid>` per process: lines of
`<CLOCK_MONOTONIC ns> <event> <detail>`; the nodes share the machine's monotonic clock). The
leader is the node with the most `req` events. Every request it answered (`req` .. `resp`, the
first fifth skipped as warm-up) is a window; within each window every node's events are
numbered by occurrence, and the median offset of each (node, event, occurrence) from the
window's `req` is printed in time order. Events seen in fewer than half the windows are left
out. Follower names F1, F2 are arbitrary.

Usage (see bench/README.md, "Where one write's time goes"):
    .venv/bin/python bench/latency_trace.py /tmp/trace/t [--show 3]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import glob
import statistics

# Events after a window's `resp` that still count towards it (a late ack, the tail of a turn).
TAIL_NS = 300_000

Event = tuple[int, str]


def read_events(path: str) -> list[Event]:
    events: list[Event] = []
    with open(path) as lines:
        for line in lines:
            ns, name, _detail = line.split(maxsplit=2)
            events.append((int(ns), name))
    return events


def windows_of(leader: list[Event]) -> list[tuple[int, int]]:
    windows: list[tuple[int, int]] = []
    start: int | None = None
    for ns, name in leader:
        if name == "req":
            start = ns
        elif name == "resp" and start is not None:
            windows.append((start, ns))
            start = None
    return windows[len(windows) // 5 :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", help="the VAULT_TRACE prefix the nodes ran with")
    parser.add_argument(
        "--show", type=int, default=0, metavar="N",
        help="also print N requests' events in the order they happened (medians of events on "
        "different paths, a leader's own fsync beside its followers', can mislead about order)",
    )
    args = parser.parse_args()
    processes = {path: read_events(path) for path in sorted(glob.glob(args.prefix + ".*"))}
    if not processes:
        raise SystemExit(f"no trace files match {args.prefix}.*")
    leader = max(processes, key=lambda p: sum(1 for _, name in processes[p] if name == "req"))
    names = {leader: "L"}
    for number, path in enumerate((p for p in processes if p != leader), start=1):
        names[path] = f"F{number}"
    windows = windows_of(processes[leader])
    if not windows:
        raise SystemExit("the leader's trace holds no answered request")
    offsets: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
    for path, events in processes.items():
        times = [ns for ns, _ in events]
        for start, end in windows:
            seen: collections.Counter[str] = collections.Counter()
            low = bisect.bisect_left(times, start)
            high = bisect.bisect_right(times, end + TAIL_NS)
            for ns, name in events[low:high]:
                seen[name] += 1
                offsets[(names[path], name, seen[name])].append((ns - start) / 1000)
    total = statistics.median((end - start) / 1000 for start, end in windows)
    print(f"{len(windows)} requests, median req -> resp {total:.0f} us on the leader")
    rows = sorted(
        (statistics.median(values), key, len(values))
        for key, values in offsets.items()
        if len(values) * 2 > len(windows)
    )
    for median, (node, name, occurrence), count in rows:
        share = 100 * count // len(windows)
        print(f"{median:8.1f} us  {node:<3} {name:<16} #{occurrence}  ({share}% of requests)")
    shown = windows[:: max(1, len(windows) // args.show)][: args.show] if args.show else []
    for start, end in shown:
        print(f"---- one request, {(end - start) / 1000:.0f} us")
        merged = sorted(
            (ns, names[path], name)
            for path, events in processes.items()
            for ns, name in events
            if start <= ns <= end
        )
        for ns, node, name in merged:
            print(f"{(ns - start) / 1000:8.1f} us  {node:<3} {name}")


if __name__ == "__main__":
    main()
