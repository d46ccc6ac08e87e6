"""Kernel benchmark: prepared plans against a contiguous copy of the same bytes, and the host
time per request.

(Over 600 lines on purpose: one benchmark whose timing harness, case builders, design-variant
comparison, page-locality diagnostic and report share the same cases; the host-time table
lives in :mod:`kvtriton.kernels.bench_host`.)

Entry points: :func:`run_benchmark` (returns a dict, optionally writes JSON) and :func:`main`
(``python scripts/bench_kernels.py`` or ``kvtriton bench kernels``).

1. **Correctness first**: every case's first buffer set is checked bit-exactly against the
   naive oracle (:mod:`kvtriton.kernels.naive`) before anything is timed.
2. **Bandwidth** on the current GPU: gather / scatter / copy of a Llama-3-8B-shaped pool
   (32 layers x kv 2 x 8 kv heads x 128 head_dim, bf16 = 128 KiB per token; 8 GiB pools,
   blocks drawn at random) at 8 MiB, 64 MiB, 256 MiB and 1 GiB, NHD / HND, block sizes 16 /
   32 / 64, starts inside blocks. ``run(0, buffer)`` of a prepared plan is timed as CUDA-graph
   replays (launch latency excluded), next to the same run's baselines: ``copy_`` of a
   contiguous tensor holding the same bytes and a plain Triton contiguous copy. GB/s counts
   bytes read + written; cases under 512 MiB rotate over disjoint buffer sets so the L2
   cannot hold them.
3. **Host overhead** per request for the four shapes of BENCHMARKS.md (whole request as one
   chunk): ``prepare_pack``, ``run`` (all launches), and the two together; the same for
   unpack. Median CPU time until the call returns, the device idle before each call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kvtriton.kernels.bench_host import HOST_SHAPES, host_overheads
from kvtriton.kernels.compare import compare_backends

__all__ = ["compare_backends", "main", "run_benchmark"]

LAYERS, KVF, HEADS, DIM = 32, 2, 8, 128
BYTES_PER_TOKEN = LAYERS * KVF * HEADS * DIM * 2
POOL_BYTES = 8 << 30
MIB = 1 << 20
TARGETS = {"large": 0.95, "small": 0.85, "host_us": 50.0}


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def _time_graph(fns: Sequence[Callable[[], Any]], device: torch.device, reps: int) -> float:
    """Median seconds per call of ``fns`` (cycled), as CUDA-graph replays (host timing on
    CPU)."""
    if device.type != "cuda":
        for f in fns:
            f()
        samples = []
        for i in range(max(3, reps)):
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # warm up (compile, first direct launch, stream join) outside capture
            f()
            f()
    torch.cuda.synchronize()
    per_graph = max(len(fns), 8 // len(fns) * len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(per_graph):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / per_graph)
    return statistics.median(samples)


def _contig_copy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None] | None:
    """A plain Triton contiguous copy (16 KiB per program), the second copy baseline."""
    import triton
    import triton.language as tl

    global _COPY_KERNEL
    if _COPY_KERNEL is None:

        @triton.jit
        def _copy(src_ptr, dst_ptr, BLOCK: tl.constexpr):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            tl.store(dst_ptr + offs, tl.load(src_ptr + offs))

        _COPY_KERNEL = _copy
    d, s = dst.view(torch.int32), src.view(torch.int32)
    if d.numel() % 4096:
        return None
    grid = (d.numel() // 4096,)
    kernel = _COPY_KERNEL
    return lambda: kernel[grid](s, d, BLOCK=4096, num_warps=4)


_COPY_KERNEL: Any = None


def _baselines(payload: int, sets: int, device: torch.device, reps: int) -> tuple[float, float]:
    """Seconds per contiguous copy of ``payload`` bytes through ``copy_`` and through the
    plain Triton copy (nan off CUDA), rotating over ``sets`` buffer pairs."""
    flat_src = [
        torch.empty(payload // 2, dtype=torch.int16, device=device).random_() for _ in range(sets)
    ]
    flat_dst = [torch.empty_like(s) for s in flat_src]
    copies = [(lambda d=d, s=s: d.copy_(s)) for s, d in zip(flat_src, flat_dst, strict=True)]
    t_torch = _time_graph(copies, device, reps)
    t_tri = math.nan
    if device.type == "cuda":
        tri = [_contig_copy(d, s) for s, d in zip(flat_src, flat_dst, strict=True)]
        if all(f is not None for f in tri):
            t_tri = _time_graph(tri, device, reps)  # type: ignore[arg-type]
    return t_torch, t_tri


def _dense(b: _Bench, n: int, rotate: int) -> dict:
    """Diagnostic: the kernel copying ``n`` tokens' packed bytes from one packed buffer to
    another (both sides dense: no block lookup), against the same run's baselines: what the
    launch shape itself reaches on contiguous memory."""
    from kvtriton.kernels import descriptors as D
    from kvtriton.kernels.prepared import _sm_count, triton_module

    T = triton_module()
    payload = n * BYTES_PER_TOKEN
    sets = max(1, min(8, rotate // max(1, payload)))
    move = D.Move(D.Dense(0), D.Dense(payload), LAYERS, KVF, n, 1, HEADS * DIM * 2)
    plan = D.build([[move]], sm_count=_sm_count(b.device), tuning=b.tuning)
    owner, meta, ids = D.stage(plan, b.device)
    bufs = [torch.empty(2 * payload, dtype=torch.uint8, device=b.device) for _ in range(sets)]
    for x in bufs:
        x[:payload].view(torch.int16).random_()
    launch = plan.chunks[0][0]
    dev = b.device.index or 0

    def go(x: torch.Tensor) -> None:
        T.launch(launch, meta, ids, x.data_ptr(), T.current_stream(dev), dev)

    go(bufs[0])
    if not torch.equal(bufs[0][:payload], bufs[0][payload:]):
        raise AssertionError("dense diagnostic copy differs")
    t = _time_graph([(lambda x=x: go(x)) for x in bufs], b.device, b.reps)
    t_torch, t_tri = _baselines(payload, sets, b.device, b.reps)
    t_copy = t_torch if math.isnan(t_tri) else min(t_torch, t_tri)
    del owner
    return {
        "op": "dense",
        "mib": payload / MIB,
        "gbs": 2 * payload / t / 1e9,
        "vs_copy": t_copy / t,
    }


# ---------------------------------------------------------------------------------------
# bandwidth cases
# ---------------------------------------------------------------------------------------
class _Bench:
    """Pools (one per block size and layout, created on first use) and the prepared API."""

    def __init__(self, device: torch.device, scale: float, reps: int, tuning: Any = None):
        from kvtriton.spec import KVCacheSpec, LayerGroup

        self.device = device
        self.scale = scale
        self.reps = reps
        self.tuning = tuning
        self.baselines: dict | None = None  # {(payload, sets): (copy_, Triton copy)} if kept
        self.gen = torch.Generator().manual_seed(0)
        self.pools: dict[tuple[int, str], torch.Tensor] = {}
        group = LayerGroup("kv", "full", tuple(range(LAYERS)), num_kv_heads=HEADS, head_dim=DIM)
        self.spec = KVCacheSpec((group,), tokens_per_block=16, dtype="bfloat16", name="bench")

    def pool(self, tpb: int, layout: str) -> torch.Tensor:
        key = (tpb, layout)
        if key not in self.pools:
            blocks = max(8, int(POOL_BYTES * self.scale) // (BYTES_PER_TOKEN * tpb))
            if layout == "NHD":
                shape = (LAYERS, blocks, KVF, tpb, HEADS, DIM)
            else:
                shape = (LAYERS, blocks, KVF, HEADS, tpb, DIM)
            t = torch.empty(shape, dtype=torch.bfloat16, device=self.device)
            t.view(torch.int16).random_(-(2**15), 2**15 - 1)  # random bits, never zeros
            self.pools[key] = t if layout == "NHD" else t.permute(0, 1, 2, 4, 3, 5)
        return self.pools[key]

    def targets(self, pool: torch.Tensor, tokens: Any, sets: int, dst: bool, avoid=()) -> list:
        from kvtriton.ranges import BlockSpan
        from kvtriton.target import TransferTarget

        tpb, n_blocks = int(pool.shape[3]), int(pool.shape[1])
        blocks = tokens.blocks(tpb)
        perm = [b for b in torch.randperm(n_blocks, generator=self.gen).tolist() if b not in avoid]
        sets = max(1, min(sets, len(perm) // len(blocks)))
        out = []
        for i in range(sets):
            span = BlockSpan(blocks.start, perm[i * len(blocks) : (i + 1) * len(blocks)])
            out.append(
                TransferTarget.from_spans(
                    f"bench{i}",
                    tokens.end,
                    {"kv": tokens},
                    {"kv": span},
                    {},
                    tokens_per_block=tpb,
                    num_blocks={"kv": n_blocks},
                    num_slots={},
                    destination=dst,
                )
            )
        return out


def _span(target: Any) -> Any:
    from kvtriton.ranges import BlockSpan

    g = target.kv["kv"]
    return BlockSpan(g.first_block, g.block_ids.tolist())


def _check(
    b: _Bench,
    op: str,
    plan: Any,
    buf: Any,
    pool: torch.Tensor,
    tokens: Any,
    targets: tuple,
    dst_pool: torch.Tensor | None,
) -> bool:
    """Run ``plan`` once and compare bit for bit with the naive oracle (whole destination
    pool for scatter and copy: positions outside the range must stay untouched)."""
    from kvtriton.kernels import naive

    if op == "gather":
        buf.fill_(0xA5)
        plan.run(0, buf)
        want = naive.bits(naive.gather(pool, _span(targets[0]), tokens)).reshape(-1)
        got = naive.bits(buf[: want.numel() * 2].view(torch.bfloat16))
        return torch.equal(got, want)
    if op == "scatter":
        expected = pool.clone()
        naive.scatter(
            buf[: len(tokens) * BYTES_PER_TOKEN]
            .view(torch.bfloat16)
            .view(LAYERS, KVF, len(tokens), HEADS, DIM),
            expected,
            _span(targets[0]),
            tokens,
        )
        plan.run(0, buf)
        ok = torch.equal(naive.bits(pool), naive.bits(expected))
        del expected
        return ok
    assert dst_pool is not None
    expected = dst_pool.clone()
    naive.copy(pool, _span(targets[0]), expected, _span(targets[1]), tokens)
    plan.run(0, None)
    ok = torch.equal(naive.bits(dst_pool), naive.bits(expected))
    del expected
    return ok


def _case(
    b: _Bench,
    op: str,
    n: int,
    *,
    tpb: int,
    start: int = 0,
    layout: str = "NHD",
    dst_tpb: int | None = None,
    dst_layout: str | None = None,
    rotate: int = 0,
    profile: bool = False,
) -> dict:
    from kvtriton import kernels as K
    from kvtriton.layout import packed_layout
    from kvtriton.ranges import TokenRange

    device = b.device
    tokens = TokenRange(start, start + n)
    payload = n * BYTES_PER_TOKEN
    sets = max(1, min(8, rotate // max(1, payload)))
    pool = b.pool(tpb, layout)
    chunk = packed_layout(b.spec, {"kv": tokens})
    pools = K.PoolSet(b.spec, {"kv": pool})
    dst_pool = None
    if op == "copy":
        dst_pool = b.pool(dst_tpb or tpb, dst_layout or layout)
        dst_pools = K.PoolSet(b.spec, {"kv": dst_pool})
        srcs = b.targets(pool, tokens, sets, dst=False)
        used = {int(x) for t in srcs for x in t.kv["kv"].block_ids} if dst_pool is pool else set()
        dsts = b.targets(dst_pool, tokens, len(srcs), dst=True, avoid=used)
        pairs = list(zip(srcs, dsts, strict=False))
        plans = [K.prepare_copy(pools, s, dst_pools, d, [chunk], tuning=b.tuning) for s, d in pairs]
        bufs: list[Any] = [None] * len(plans)
        first = pairs[0]
    else:
        tgts = b.targets(pool, tokens, sets, dst=op == "scatter")
        prepare = K.prepare_pack if op == "gather" else K.prepare_unpack
        plans = [prepare(pools, t, [chunk], tuning=b.tuning) for t in tgts]
        bufs = [torch.empty(chunk.nbytes, dtype=torch.uint8, device=device) for _ in plans]
        for x in bufs:
            x.view(torch.int16).random_(-(2**15), 2**15 - 1)
        first = (tgts[0],)
    if profile:  # one untimed launch for a profiler, no check
        plans[0].run(0, bufs[0])
        return {}
    ok = _check(b, op, plans[0], bufs[0], pool, tokens, first, dst_pool)
    if not ok:
        raise AssertionError(f"{op} {tokens} differs from the naive oracle")
    fns = [(lambda p=p, x=x: p.run(0, x)) for p, x in zip(plans, bufs, strict=True)]
    t_k = _time_graph(fns, device, b.reps)
    base = b.baselines.get((payload, len(plans))) if b.baselines is not None else None
    if base is None:
        base = _baselines(payload, len(plans), device, b.reps)
        if b.baselines is not None:
            b.baselines[(payload, len(plans))] = base
    t_torch, t_tri = base
    t_copy = t_torch if math.isnan(t_tri) else min(t_torch, t_tri)

    def gbs(t: float) -> float:
        return 2 * payload / t / 1e9

    if op == "gather":
        dst = "packed"
    elif op == "copy":
        dst = f"{dst_layout or layout} tpb={dst_tpb or tpb}"
    else:
        dst = f"{layout} tpb={tpb}"
    times = {"kvtriton": t_k, "copy": t_copy, "copy_torch": t_torch, "copy_triton": t_tri}
    return {
        "op": op,
        "src": "packed" if op == "scatter" else f"{layout} tpb={tpb}",
        "dst": dst,
        "start": start,
        "tokens": n,
        "blocks": len(tokens.blocks(tpb)),
        "mib": payload / MIB,
        "sets": len(plans),
        "launches": len(plans[0]._chunks[0]),
        "us": {k: v * 1e6 for k, v in times.items()},
        "gbs": {k: gbs(v) for k, v in times.items()},
        "vs_copy": t_copy / t_k,
        "correct": ok,
    }


# ---------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------
def _cases(quick: bool) -> list[tuple[str, int, dict]]:
    if quick:  # a smoke test: one case of each kind, a few tokens
        return [
            ("gather", 4, {"tpb": 16, "start": 5}),
            ("scatter", 4, {"tpb": 16, "layout": "HND", "start": 3}),
            ("copy", 4, {"tpb": 16, "dst_tpb": 32, "start": 7, "dst_layout": "HND"}),
        ]
    sizes = [64, 512, 2048, 8192]
    out = []
    for n in sizes:
        for op in ("gather", "scatter"):
            out.append((op, n, {"tpb": 16}))
            out.append((op, n, {"tpb": 16, "start": 5}))
    for n in (sizes[1], sizes[-1]):
        out += [
            ("gather", n, {"tpb": 32}),
            ("gather", n, {"tpb": 64, "start": 17}),
            ("gather", n, {"tpb": 16, "layout": "HND"}),
            ("scatter", n, {"tpb": 16, "layout": "HND", "start": 5}),
            ("copy", n, {"tpb": 16}),
            ("copy", n, {"tpb": 16, "dst_tpb": 32, "start": 5}),
            ("copy", n, {"tpb": 16, "dst_layout": "HND"}),
            ("copy", n, {"tpb": 16, "dst_tpb": 64, "start": 7, "dst_layout": "HND"}),
        ]
    return out


#: The sweep's cases: small moves (where per-program latency shows), 64 and 256 MiB.
_SWEEP_CASES = (
    ("gather", 64, {"tpb": 16, "start": 5}),
    ("scatter", 64, {"tpb": 16, "start": 5}),
    ("gather", 512, {"tpb": 16}),
    ("scatter", 2048, {"tpb": 16, "start": 5}),
    ("copy", 512, {"tpb": 16, "dst_tpb": 32, "start": 5}),
)


def _sweep(device: torch.device, reps: int, print_table: bool) -> list[dict]:
    """% of copy for tile sizes x warps, with and without the streaming eviction hint."""
    from kvtriton.kernels.descriptors import Tuning

    configs = [
        Tuning(),  # the defaults
        Tuning(stream_hint=False),
        Tuning(tile_bytes=8192, num_warps=4),
        Tuning(tile_bytes=8192, num_warps=4, stream_hint=False),
        Tuning(tile_bytes=32768, num_warps=4),
        Tuning(programs_per_sm=8),
    ]
    rows = []
    for tuning in configs:
        b = _Bench(device, 1.0, reps, tuning)
        for op, n, kw in _SWEEP_CASES:
            r = _case(b, op, n, rotate=512 * MIB, **kw)
            rows.append(
                {
                    "tile_bytes": tuning.tile_bytes,
                    "num_warps": tuning.num_warps,
                    "programs_per_sm": tuning.programs_per_sm,
                    "stream_hint": tuning.stream_hint,
                    "op": op,
                    "mib": r["mib"],
                    "start": r["start"],
                    "dst": r["dst"],
                    "gbs": r["gbs"]["kvtriton"],
                    "vs_copy": r["vs_copy"],
                }
            )
            if print_table:
                print(
                    f"tune tile={tuning.tile_bytes:6d} warps={tuning.num_warps} "
                    f"pps={tuning.programs_per_sm} hint={int(tuning.stream_hint)} {op:8s} "
                    f"{r['mib']:6.0f}MiB start={r['start']:2d} {r['gbs']['kvtriton']:6.0f}GB/s "
                    f"{r['vs_copy']:6.1%}",
                    flush=True,
                )
        b.pools.clear()
        torch.cuda.empty_cache()
    return rows


#: Designs compared by ``--variants`` (Tuning fields); "v1" is the kernel as first landed
#: (one program per tile, one head per piece, rows loaded from the table).
VARIANTS: dict[str, dict] = {
    "v1": {"merge_heads": False, "row_args": False},
    "merge": {"row_args": False},
    "args": {},  # the default: heads merged into rows, a one-row launch's row as arguments
    "args-t32k": {"tile_bytes": 32768},
    "args-pps8": {"programs_per_sm": 8},
    "loop8": {"resident_per_sm": 8},
    "loop8-4warps": {"resident_per_sm": 8, "num_warps": 4},
}

#: The cases each variant runs: small moves, 64 and 256 MiB, both layouts, a copy.
_VARIANT_CASES = (
    ("gather", 64, {"tpb": 16, "start": 5}),
    ("scatter", 64, {"tpb": 16, "start": 5}),
    ("gather", 512, {"tpb": 16}),
    ("scatter", 512, {"tpb": 16, "start": 5}),
    ("gather", 2048, {"tpb": 16, "start": 5}),
    ("scatter", 2048, {"tpb": 16, "start": 5}),
    ("gather", 512, {"tpb": 16, "layout": "HND"}),
    ("scatter", 512, {"tpb": 16, "layout": "HND", "start": 5}),
    ("copy", 512, {"tpb": 16, "dst_tpb": 32, "start": 5}),
)


def _score(rows: list[dict]) -> float:
    """How close a variant's gather/scatter rows come to the targets (1.0: both met)."""
    kv = [r for r in rows if r["op"] in ("gather", "scatter")]
    large = min((r["vs_copy"] for r in kv if r["mib"] >= 64), default=0.0)
    small = min((r["vs_copy"] for r in kv if r["mib"] < 64), default=0.0)
    return min(large / TARGETS["large"], small / TARGETS["small"])


def compare_variants(
    device: torch.device, reps: int, names: Sequence[str] = tuple(VARIANTS), quick: bool = False
) -> dict:
    """Every variant on the same cases, baselines measured once per size in this run; the
    dense diagnostic (no block lookup) per variant; registers of what was compiled."""
    from kvtriton.kernels.descriptors import Tuning
    from kvtriton.kernels.prepared import triton_module

    cases = _VARIANT_CASES if not quick else tuple(_cases(True))
    baselines: dict = {}
    out: dict = {"variants": {}, "scores": {}}
    scale = 1.0 if not quick else 1 / 1024
    for name in names:
        tuning = Tuning(**VARIANTS[name])
        b = _Bench(device, scale, reps if not quick else 3, tuning)
        b.baselines = baselines
        rows = []
        failed = []
        for op, n, kw in cases:
            try:
                r = _case(b, op, n, rotate=0 if quick else 512 * MIB, **kw)
            except Exception as err:  # a failing variant scores 0; the others still run
                failed.append(f"{op} {n} {kw}: {err!r}")
                print(f"variant {name:14s} ERROR {op} {n} {kw}: {err!r}", flush=True)
                continue
            rows.append(r)
            print(f"variant {name:14s} {_fmt(r)}", flush=True)
        if device.type == "cuda":
            for n in (64, 512):
                try:
                    d = _dense(b, n, 512 * MIB)
                except Exception as err:
                    failed.append(f"dense {n}: {err!r}")
                    print(f"variant {name:14s} ERROR dense {n}: {err!r}", flush=True)
                    continue
                rows.append(d)
                print(
                    f"variant {name:14s} dense->dense {d['mib']:6.0f} MiB "
                    f"{d['gbs']:6.0f} GB/s {100 * d['vs_copy']:5.1f}%",
                    flush=True,
                )
        out["variants"][name] = rows
        out["scores"][name] = 0.0 if failed else _score(rows)
        if failed:
            out.setdefault("errors", {})[name] = failed
        print(f"variant {name:14s} score {out['scores'][name]:.3f}", flush=True)
        b.pools.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["best"] = max(out["scores"], key=out["scores"].get)
    out["compiled"] = {str(k): v for k, v in getattr(triton_module(), "COMPILED", {}).items()}
    return out


def pool_diagnostic(device: torch.device, reps: int) -> list[dict]:
    """The same 64 / 256 MiB gather and scatter with blocks drawn from 1 GiB pools instead of
    8 GiB ones (4x-8x more bytes per 2 MiB page touched): what page locality is worth."""
    rows = []
    for gib in (8, 1):
        b = _Bench(device, gib / 8, reps)
        for op, n in (("gather", 512), ("scatter", 512), ("gather", 2048), ("scatter", 2048)):
            r = _case(b, op, n, tpb=16, start=5, rotate=512 * MIB)
            r["pool_gib"] = gib
            rows.append(r)
            print(f"pool {gib} GiB  {_fmt(r)}", flush=True)
        b.pools.clear()
        torch.cuda.empty_cache()
    return rows


def profile_cases(device: str = "cuda") -> None:
    """Run a 64 MiB gather, scatter and copy once each, untimed and unchecked: a target for
    ``ncu -k regex:piece_copy -c 3 python scripts/bench_kernels.py --profile``."""
    b = _Bench(torch.device(device), 1.0, 1)
    for op, kw in (("gather", {}), ("scatter", {}), ("copy", {"dst_tpb": 32})):
        _case(b, op, 512, tpb=16, start=5, rotate=512 * MIB, profile=True, **kw)
    torch.cuda.synchronize()


_HEADER = (
    f"{'op':8s} {'src':12s} {'dst':12s} {'start':>5s} {'tokens':>6s} {'MiB':>7s} "
    f"{'kvtriton':>8s} {'copy_':>7s} {'triton':>7s} GB/s {'%copy':>7s}"
)


def _num(x: float, width: int) -> str:
    """A rate or time in ``width`` characters: whole numbers when large, 3 digits when small."""
    if math.isnan(x):
        return "-".rjust(width)
    return f"{x:{width}.0f}" if abs(x) >= 1000 else f"{x:{width}.3g}"


def _fmt(r: dict) -> str:
    g = r["gbs"]
    return (
        f"{r['op']:8s} {r['src']:12s} {r['dst']:12s} {r['start']:5d} {r['tokens']:6d} "
        f"{r['mib']:7.1f} {_num(g['kvtriton'], 8)} {_num(g['copy_torch'], 7)} "
        f"{_num(g['copy_triton'], 7)}      {_num(100 * r['vs_copy'], 5)}%"
    )


_HOST_COLUMNS = (
    ("target", "target_us"),
    ("prep", "prepare_pack_us"),
    ("checks", "checks_us"),
    ("build", "build_us"),
    ("stage", "stage_us"),
    ("run", "run_pack_us"),
    ("pack", "pack_us"),
    ("unpack", "unpack_us"),
    ("b2b", "pack_b2b_us"),
    ("pack_req", "pack_request_us"),
)


def _fmt_host(h: dict) -> str:
    label = f"{h['spec']} P={h['prompt']} cached={h['cached']}"
    cols = " ".join(_num(h.get(key, math.nan), 8) for _, key in _HOST_COLUMNS)
    return (
        f"{label:28s} {h['groups']:4d} {h['blocks']:6d} {h['mib']:7.1f} {h['launches']:4d} {cols}"
    )


def _print_host(overhead: list[dict], device: torch.device) -> None:
    print("\nhost time per request, whole request as one chunk (median us, device idle):")
    heads = " ".join(f"{name:>8s}" for name, _ in _HOST_COLUMNS)
    print(f"{'request':28s} {'segs':>4s} {'blocks':>6s} {'MiB':>7s} {'runs':>4s} {heads}")
    for h in overhead:
        print(_fmt_host(h), flush=True)
    if device.type == "cuda":
        print("staging and launch paths (us):")
        for h in overhead:
            extra = {
                k: round(v, 1)
                for k, v in h.items()
                if k.endswith("_us") and k not in dict((v, 0) for _, v in _HOST_COLUMNS)
            }
            print(f"  {h['spec']} P={h['prompt']}: {extra}")


def _verdict(cases: list[dict], host: list[dict]) -> dict:
    def pct(rows: list[dict]) -> float | None:
        return min((r["vs_copy"] for r in rows), default=None)

    kv = [r for r in cases if r["op"] in ("gather", "scatter")]
    large = pct([r for r in kv if r["mib"] >= 64])
    small = pct([r for r in kv if r["mib"] < 64])
    worst = max((max(h["pack_us"], h["unpack_us"]) for h in host), default=None)
    return {
        "min_vs_copy_ge_64mib": large,
        "min_vs_copy_8mib": small,
        "max_host_us": worst,
        "met_large": large is not None and large >= TARGETS["large"],
        "met_small": small is not None and small >= TARGETS["small"],
        "met_host": worst is not None and worst <= TARGETS["host_us"],
    }


def run_benchmark(
    *,
    device: str | torch.device = "cuda",
    quick: bool = False,
    json_path: str | None = None,
    reps: int = 30,
    tune: bool = False,
    cases: bool = True,
    host: bool = True,
    print_table: bool = True,
    variants: Sequence[str] = (),
    use_best: bool = False,
) -> dict:
    """Run the benchmark; returns (and optionally writes as JSON) every number.

    ``quick`` runs few, small cases (a smoke test; on CPU under the Triton interpreter);
    ``tune`` adds a sweep of tile size, warps and programs per SM (GPU only).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA device (or device='cpu', quick)")
    import triton

    from kvtriton.kernels.prepared import triton_module

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if print_table:
        print(f"device: {name}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    scale = 1.0 if not quick else 1 / 1024
    errors: list[str] = []
    compared: dict = {}
    tuning = None
    if variants:
        try:
            compared = compare_variants(device, reps, variants, quick)
            print(f"best variant: {compared['best']} {compared['scores']}", flush=True)
            if device.type == "cuda":
                compared["pool_diagnostic"] = pool_diagnostic(device, reps)
            if use_best:
                from kvtriton.kernels import descriptors as D

                tuning = D.Tuning(**VARIANTS[compared["best"]])
                D.DEFAULT_TUNING = tuning  # the host table and tests below use it too
        except Exception as err:  # report it and measure the rest
            errors.append(f"variants: {err!r}")
            print(f"ERROR variants: {err!r}", flush=True)
            traceback.print_exc()
    overhead: list = []
    if host:
        try:
            shapes = HOST_SHAPES if not quick else (("tiny-hybrid", 64, 16),)
            overhead = host_overheads(device, 200 if not quick else 5, shapes)
        except Exception as err:  # report it; keep what was measured
            errors.append(repr(err))
            print(f"ERROR: {err!r}", flush=True)
            traceback.print_exc()
        if print_table and overhead:
            _print_host(overhead, device)
    b = _Bench(device, scale, reps if not quick else 3, tuning)
    results: list[dict] = []
    if cases:
        if print_table:
            print(_HEADER, flush=True)
        for op, n, kw in _cases(quick):
            try:
                row = _case(b, op, n, rotate=0 if quick else 512 * MIB, **kw)
            except Exception as err:  # report it and measure the other cases
                errors.append(f"{op} {n} {kw}: {err!r}")
                print(f"ERROR {op} {n} {kw}: {err!r}", flush=True)
                traceback.print_exc()
                continue
            results.append(row)
            if print_table:
                print(_fmt(row), flush=True)
    b.pools.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sweep: list = []
    try:
        if tune and device.type == "cuda":
            sweep = _sweep(device, reps, print_table)
    except Exception as err:  # report it; keep what was measured
        errors.append(repr(err))
        print(f"ERROR: {err!r}", flush=True)
        traceback.print_exc()
    verdict = _verdict(results, overhead)
    if print_table and device.type == "cuda":
        print(f"\ntargets: {json.dumps(verdict)}")
    out = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "direct_launch": bool(getattr(triton_module(), "DIRECT", False)),
        "launch_counts": triton_module().launch_counts(),
        "shape": {
            "layers": LAYERS,
            "kv": KVF,
            "heads": HEADS,
            "head_dim": DIM,
            "dtype": "bfloat16",
            "bytes_per_token": BYTES_PER_TOKEN,
        },
        "cases": results,
        "tune_sweep": sweep,
        "variants": compared,
        "tuning": repr(tuning) if tuning is not None else "default",
        "host_overhead": overhead,
        "targets": verdict,
        "errors": errors,
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out


def _variant_names(arg: str | None) -> tuple[str, ...]:
    if not arg:
        return ()
    names = tuple(VARIANTS) if arg == "all" else tuple(x for x in arg.split(",") if x)
    unknown = [x for x in names if x not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvtriton bench kernels", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick)")
    parser.add_argument("--quick", action="store_true", help="few small cases (smoke test)")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--reps", type=int, default=30, help="timed graph replays per case")
    parser.add_argument("--tune", action="store_true", help="also sweep tile size and warps")
    parser.add_argument("--no-cases", action="store_true", help="skip the bandwidth table")
    parser.add_argument("--no-host", action="store_true", help="skip the host-overhead table")
    parser.add_argument(
        "--profile", action="store_true", help="only run a few untimed 64 MiB moves (for ncu)"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"compare designs first: 'all' or comma-separated names of {list(VARIANTS)}",
    )
    parser.add_argument(
        "--use-best", action="store_true", help="measure the tables with the best variant"
    )
    args = parser.parse_args(argv)
    if args.profile:
        profile_cases(args.device)
        return 0
    if args.device == "cpu":
        if not args.quick:
            parser.error("--device cpu needs --quick (the full shapes are 8 GiB pools)")
        # the kernels run under the interpreter on CPU tensors: before they are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print(
            "kvtriton bench kernels: the bandwidth table needs a CUDA GPU "
            "(use --device cpu --quick for a CPU smoke run)",
            file=sys.stderr,
        )
        return 2
    out = run_benchmark(
        device=args.device,
        quick=args.quick,
        json_path=args.json,
        reps=args.reps,
        tune=args.tune,
        cases=not args.no_cases,
        host=not args.no_host,
        variants=_variant_names(args.variants),
        use_best=args.use_best,
    )
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
