"""Host time of the direct channel's per-request copy preparation, alone in one process.

What the receiver of the direct channel does for each request, without the agent around it:
two ``TransferTarget.from_spans`` (sender and receiver side), ``prepare_copy`` (checks,
descriptors, staging), ``run(0)`` (one launch), an event recorded behind it and a spin until
it fired. Prints the median of each step over 500 one-block requests (the shape of
``kvtriton bench latency``: 32 KiB, NHD -> HND), then the top functions of a cProfile.

    python scripts/profile_copy_prepare.py [cuda|cpu]
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from kvtriton.cache import allocate_pools
from kvtriton.kernels.plan import PoolSet
from kvtriton.layout import packed_layout
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.target import TransferTarget
from kvtriton.transfer.bench_latency import _spec
from kvtriton.transfer.moves import prepare_copy

BLOCKS = 64


def main(device: str) -> None:
    backend = "auto" if device == "cuda" else "reference"
    spec = _spec()
    src_pools = allocate_pools(spec, BLOCKS, device=device)
    dst_pools = allocate_pools(spec, BLOCKS, device=device, layout="HND")
    src, dst = PoolSet(spec, dict(src_pools.kv)), PoolSet(spec, dict(dst_pools.kv))
    bsz = spec.tokens_per_block
    tokens = {"full": TokenRange(0, bsz)}
    layouts = [packed_layout(spec, tokens, ())]
    stream = torch.cuda.Stream() if device == "cuda" else None

    def target(block: int, destination: bool) -> TransferTarget:
        return TransferTarget.from_spans(
            "r", bsz, tokens, {"full": BlockSpan(0, [block])}, {},
            tokens_per_block=bsz, num_blocks={"full": BLOCKS}, num_slots={},
            destination=destination,
        )  # fmt: skip

    def one(i: int) -> tuple[float, ...]:
        t0 = time.perf_counter()
        s, d = target(i % BLOCKS, False), target(i * 7 % BLOCKS, True)
        t1 = time.perf_counter()
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            moves = prepare_copy(src, s, dst, d, layouts, backend)
            t2 = time.perf_counter()
            moves.run(0)
            t3 = time.perf_counter()
            if stream is not None:
                done = torch.cuda.Event()
                done.record(stream)
                while not done.query():
                    pass
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    for i in range(50):  # JIT, staging ring, caches
        one(i)
    rows = [one(i) for i in range(500)]
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"one-block copy preparation on {where}, medians of 500 (us):")
    names = ("targets", "prepare_copy", "run (launch)", "until done")
    for name, col in zip(names, zip(*rows, strict=True), strict=True):
        print(f"  {name:>13} {statistics.median(col) * 1e6:8.1f}")
    prof = cProfile.Profile()
    prof.enable()
    for i in range(300):
        one(i)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
