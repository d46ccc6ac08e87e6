#!/usr/bin/env python
"""Per-request timelines from ``KVTRITON_TRACE=DIR`` files: for each request, every event's
time after the request's first event (microseconds), and the median over requests.

    python scripts/trace_report.py DIR
"""

from __future__ import annotations

import collections
import pathlib
import statistics
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    events: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for path in pathlib.Path(argv[0]).glob("trace.*.txt"):
        for line in path.read_text().splitlines():
            t, what, *rid = line.split(" ", 2)
            events[rid[0] if rid else ""].append((float(t), what))
    steps: dict[str, list[float]] = collections.defaultdict(list)
    for seq in events.values():
        seq.sort()
        t0 = seq[0][0]
        for t, what in seq:
            steps[what].append(1e6 * (t - t0))
    print(f"{len(events)} requests; median microseconds after each request's first event:")
    for what in sorted(steps, key=lambda w: statistics.median(steps[w])):
        print(f"  {statistics.median(steps[what]):10.0f}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
