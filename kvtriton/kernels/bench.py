"""Kernel benchmark: kvtriton gather/scatter/copy against torch indexing and a contiguous copy.

Entry points: :func:`run_benchmark` (returns a dict, optionally writes JSON) and :func:`main`
(the CLI, ``python scripts/bench_kernels.py`` or ``kvtriton bench kernels``).

Shapes: 32 layers x kv 2 x 8 kv heads x 128 head_dim bf16 (128 KiB per token over all
layers), pools of 8 GiB per block size. For each case, in one run:

* ``kvtriton``: the Triton kernel, launched from a prepared plan (metadata already on the
  device) and timed as CUDA-graph replays, so launch latency is excluded;
* ``torch_1call``: the torch reference's single advanced-indexing call over all layers
  (index tensors precomputed);
* ``torch_loop``: one indexing call per layer;
* ``copy``: ``dst.copy_(src)`` of contiguous tensors holding the same bytes (the limit).

Bandwidth counts bytes read + written (2 x payload). Small cases rotate over several
disjoint buffer sets so the 50 MB L2 cannot hold the working set. Host overhead (validation,
metadata staging and all launches of one call, CPU time until the call returns) is measured
separately on the public API, including ``plan_transfer`` + ``packed_layout`` +
``pack_request`` for whole requests.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from kvtriton import kernels as K
from kvtriton.kernels import _common as C
from kvtriton.kernels import reference as R
from kvtriton.ranges import BlockSpan, TokenRange

LAYERS, KVF, HEADS, DIM = 32, 2, 8, 128
DTYPE = torch.bfloat16
BYTES_PER_TOKEN = LAYERS * KVF * HEADS * DIM * 2
POOL_BYTES = 8 << 30
MIB = 1 << 20

_COPY_BLOCK = 4096  # int32 elements (16 KiB) per program of the contiguous-copy baseline


@triton.jit
def _contig_copy_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    """The simplest bandwidth-bound copy: one program moves BLOCK contiguous elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs))


def _triton_copy(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
    d, s = dst.view(torch.int32), src.view(torch.int32)
    assert d.numel() % _COPY_BLOCK == 0
    grid = (d.numel() // _COPY_BLOCK,)
    return lambda: _contig_copy_kernel[grid](s, d, BLOCK=_COPY_BLOCK, num_warps=4)


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def _time_graph(fns: Sequence[Callable[[], Any]], device: torch.device, reps: int) -> float:
    """Median seconds per call of ``fns`` (cycled), as CUDA-graph replays (or host timing)."""
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
        for f in fns:  # warm up / compile outside the capture
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


def _host_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median CPU seconds until ``fn`` returns, the device idle before each call."""
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(samples)


def _back_to_back(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Mean CPU seconds per call of ``reps`` calls issued back to back (device kept busy)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed / reps


# ---------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------
class _Pools:
    """One 8 GiB pool per (block size, layout), created on first use."""

    def __init__(self, device: torch.device, scale: float):
        self.device = device
        self.scale = scale
        self.cache: dict[tuple[int, str], torch.Tensor] = {}

    def get(self, tpb: int, layout: str) -> torch.Tensor:
        key = (tpb, layout)
        if key not in self.cache:
            blocks = max(4, int(POOL_BYTES * self.scale) // (BYTES_PER_TOKEN * tpb))
            if layout == "NHD":
                t = torch.empty(
                    (LAYERS, blocks, KVF, tpb, HEADS, DIM), dtype=DTYPE, device=self.device
                )
                view = t
            else:
                t = torch.empty(
                    (LAYERS, blocks, KVF, HEADS, tpb, DIM), dtype=DTYPE, device=self.device
                )
                view = t.permute(0, 1, 2, 4, 3, 5)
            C.bits(t).random_(-(2**15), 2**15 - 1)  # random bits, never zeros
            self.cache[key] = view
        return self.cache[key]


def _spans(
    pool: torch.Tensor,
    tokens: TokenRange,
    sets: int,
    gen: torch.Generator,
    avoid: set[int] | None = None,
) -> list[BlockSpan]:
    tpb, n_blocks = int(pool.shape[3]), int(pool.shape[1])
    blocks = tokens.blocks(tpb)
    need = len(blocks)
    perm = [
        b for b in torch.randperm(n_blocks, generator=gen).tolist() if not avoid or b not in avoid
    ]
    if need * sets > len(perm):
        sets = max(1, len(perm) // need)
    return [BlockSpan(blocks.start, perm[i * need : (i + 1) * need]) for i in range(sets)]


def _torch_fns(move: C.KVMove) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(single-call, per-layer loop) torch implementations with precomputed indices."""

    def index(side: C.PagedSide, n: int):
        return R._token_index(side, n)

    if isinstance(move.src, C.PagedSide):
        s_idx = index(move.src, move.n_tokens)
        s_view = R._paged_view(move.src)
    if isinstance(move.dst, C.PagedSide):
        d_idx = index(move.dst, move.n_tokens)
        d_view = R._paged_view(move.dst)

    def one_call() -> None:
        if isinstance(move.src, C.PagedSide):
            vals = s_view[s_idx[0], s_idx[1], :, s_idx[2]]  # [L, T, kv, H, D]
        else:
            vals = C.bits(move.src).transpose(1, 2)
        if isinstance(move.dst, C.PagedSide):
            d_view[d_idx[0], d_idx[1], :, d_idx[2]] = vals
        else:
            C.bits(move.dst).copy_(vals.transpose(1, 2))

    def per_layer() -> None:
        for i in range(len(s_idx[0]) if isinstance(move.src, C.PagedSide) else len(d_idx[0])):
            if isinstance(move.src, C.PagedSide):
                vals = s_view[int(move.src.layers[i])][s_idx[1][0], :, s_idx[2][0]]  # [T,kv,H,D]
            else:
                vals = C.bits(move.src)[i].transpose(0, 1)
            if isinstance(move.dst, C.PagedSide):
                d_view[int(move.dst.layers[i])][d_idx[1][0], :, d_idx[2][0]] = vals
            else:
                C.bits(move.dst)[i].copy_(vals.transpose(0, 1))

    return one_call, per_layer


def _case(
    op: str,
    pools: _Pools,
    tokens_n: int,
    *,
    tpb: int,
    dst_tpb: int | None = None,
    start: int = 0,
    layout: str = "NHD",
    dst_layout: str | None = None,
    gen: torch.Generator,
    reps: int,
    rotate_bytes: int,
    skip_loop: bool,
) -> dict:
    device = pools.device
    tokens = TokenRange(start, start + tokens_n)
    payload = tokens_n * BYTES_PER_TOKEN
    sets = max(1, min(8, rotate_bytes // max(1, payload)))
    pool = pools.get(tpb, layout)
    moves: list[C.KVMove] = []
    if op == "gather":
        for span in _spans(pool, tokens, sets, gen):
            moves.append(C.plan_gather(pool, span, tokens, None, None, None))
    elif op == "scatter":
        for span in _spans(pool, tokens, sets, gen):
            packed = torch.empty((LAYERS, KVF, tokens_n, HEADS, DIM), dtype=DTYPE, device=device)
            C.bits(packed).random_(-(2**15), 2**15 - 1)
            moves.append(C.plan_scatter(packed, pool, span, tokens, None, None))
    else:
        dst_pool = pools.get(dst_tpb or tpb, dst_layout or layout)
        src_spans = _spans(pool, tokens, sets, gen)
        used = {b for s in src_spans for b in s.block_ids} if dst_pool is pool else None
        dst_spans = _spans(dst_pool, tokens, len(src_spans), gen, avoid=used)
        for s_span, d_span in zip(src_spans, dst_spans, strict=False):
            moves.append(
                C.plan_copy(pool, s_span, dst_pool, d_span, tokens, None, None, None, None)
            )
    T = K._triton_module()
    # correctness first: kvtriton == reference, bitwise, on the first set
    m0 = moves[0]
    if isinstance(m0.dst, C.PagedSide):
        probe_reads = C.PagedSide(
            m0.dst.pool, m0.dst.ids, m0.dst.offset, m0.dst.layers, m0.dst.heads
        )
        T.run_kv(m0)
        got = R._read(probe_reads, m0.n_tokens).clone()
        if isinstance(m0.src, C.PagedSide):
            want = R._read(m0.src, m0.n_tokens)
        else:
            want = C.bits(m0.src)
        ok = torch.equal(got, want)
    else:
        C.bits(m0.dst).fill_(0x7FC1)
        T.run_kv(m0)
        ok = torch.equal(C.bits(m0.dst), R._read(m0.src, m0.n_tokens))
    if not ok:
        raise AssertionError(f"kvtriton {op} result differs from the torch reference")

    fast = [T.prepare_kv(m) for m in moves]
    t_fast = _time_graph(fast, device, reps)
    torch_fns = [_torch_fns(m) for m in moves]
    t_one = _time_graph([f[0] for f in torch_fns], device, max(3, reps // 4))
    t_loop = (
        math.nan if skip_loop else _time_graph([f[1] for f in torch_fns], device, max(3, reps // 4))
    )
    # contiguous copy of the same bytes, same rotation
    flat_src = [
        torch.empty(payload // 2, dtype=torch.int16, device=device).random_() for _ in moves
    ]
    flat_dst = [torch.empty_like(s) for s in flat_src]
    copies = [(lambda d=d, s=s: d.copy_(s)) for s, d in zip(flat_src, flat_dst, strict=True)]
    t_memcpy = _time_graph(copies, device, reps)
    t_tcopy = math.nan
    if device.type == "cuda" and payload % (_COPY_BLOCK * 4) == 0:
        t_tcopy = _time_graph(
            [_triton_copy(d, s) for s, d in zip(flat_src, flat_dst, strict=True)], device, reps
        )
    # the limit: the faster of torch's copy_ and a plain Triton copy of the same bytes
    t_copy = min(t_memcpy, t_tcopy) if not math.isnan(t_tcopy) else t_memcpy
    del flat_src, flat_dst

    def gbs(t: float) -> float:
        return 2 * payload / t / 1e9

    d_tpb = dst_tpb or tpb if op == "copy" else None
    return {
        "op": op,
        "src": f"{layout} tpb={tpb}" if op != "scatter" else "packed",
        "dst": (
            f"{dst_layout or layout} tpb={d_tpb}"
            if op == "copy"
            else "packed"
            if op == "gather"
            else f"{layout} tpb={tpb}"
        ),
        "start": start,
        "tokens": tokens_n,
        "blocks": len(tokens.blocks(tpb)),
        "mib": payload / MIB,
        "sets": len(moves),
        "us": {
            "kvtriton": t_fast * 1e6,
            "torch_1call": t_one * 1e6,
            "torch_loop": t_loop * 1e6,
            "copy": t_copy * 1e6,
            "copy_torch": t_memcpy * 1e6,
            "copy_triton": t_tcopy * 1e6,
        },
        "gbs": {
            "kvtriton": gbs(t_fast),
            "torch_1call": gbs(t_one),
            "torch_loop": gbs(t_loop),
            "copy": gbs(t_copy),
            "copy_torch": gbs(t_memcpy),
            "copy_triton": gbs(t_tcopy),
        },
        "vs_copy": t_copy / t_fast,
        "vs_torch_1call": t_one / t_fast,
        "correct": ok,
    }


def _host_overheads(device: torch.device, reps: int) -> list[dict]:
    from kvtriton.layout import packed_layout
    from kvtriton.plan import plan_transfer
    from kvtriton.spec import preset

    rows = []
    gen = torch.Generator().manual_seed(1)
    for name, prompt, cached in [
        ("llama-3-8b", 8192, 1000),
        ("gpt-oss-20b", 8192, 1000),
        ("gemma-3-4b", 4096, 100),
        ("llama-3-8b", 512, 100),
    ]:
        spec = preset(name)
        tpb = spec.tokens_per_block
        nblocks = -(-prompt // tpb) + 1
        pools: dict[str, torch.Tensor] = {}
        spans: dict[str, BlockSpan] = {}
        for g in spec.groups:
            shape = (g.num_layers, nblocks, g.kv_factor, tpb, g.local_heads, g.head_dim)
            pools[g.name] = torch.zeros(shape, dtype=spec.torch_dtype, device=device)
            spans[g.name] = BlockSpan(0, torch.randperm(nblocks, generator=gen).tolist())

        def plan_and_pack(spec=spec, pools=pools, spans=spans, prompt=prompt, cached=cached):
            plan = plan_transfer(spec, prompt, {g.name: cached for g in spec.groups})
            layout = packed_layout(
                spec, {g.name: g.tokens for g in plan if g.kind != "state"}, plan.state_groups
            )
            buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
            K.pack_request(spec, layout, pools, spans, {}, buf)
            return layout

        layout = plan_and_pack()
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)

        def pack_only(spec=spec, layout=layout, pools=pools, spans=spans, buf=buf):
            K.pack_request(spec, layout, pools, spans, {}, buf)

        def unpack_only(spec=spec, layout=layout, pools=pools, spans=spans, buf=buf):
            K.unpack_request(spec, layout, buf, pools, spans, {})

        rows.append(
            {
                "spec": name,
                "prompt": prompt,
                "cached": cached,
                "groups": len(spec.groups),
                "blocks": sum(len(s) for s in spans.values()),
                "mib": layout.nbytes / MIB,
                "pack_request_us": _host_time(pack_only, device, reps) * 1e6,
                "unpack_request_us": _host_time(unpack_only, device, reps) * 1e6,
                "plan_layout_pack_us": _host_time(plan_and_pack, device, reps) * 1e6,
                "plan_layout_pack_b2b_us": _back_to_back(plan_and_pack, device, reps) * 1e6,
            }
        )
        del pools
    return rows


def profile_host(device: str | torch.device = "cuda", reps: int = 200) -> dict:
    """Break the host overhead of one ``pack_request`` down (validation, metadata staging,
    bare launches) and print a cProfile of it."""
    import cProfile
    import pstats

    from kvtriton.layout import packed_layout
    from kvtriton.plan import plan_transfer
    from kvtriton.spec import preset

    device = torch.device(device)
    T = K._triton_module()
    spec = preset("gpt-oss-20b")
    prompt, nblocks = 8192, 513
    gen = torch.Generator().manual_seed(2)
    pools = {
        g.name: torch.zeros(
            (g.num_layers, nblocks, g.kv_factor, 16, g.local_heads, g.head_dim),
            dtype=spec.torch_dtype,
            device=device,
        )
        for g in spec.groups
    }
    spans = {
        g.name: BlockSpan(0, torch.randperm(nblocks, generator=gen).tolist()) for g in spec.groups
    }
    plan = plan_transfer(spec, prompt, {g.name: 1000 for g in spec.groups})
    layout = packed_layout(spec, {g.name: g.tokens for g in plan}, ())
    buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    req = C.PackedRequest(layout, spans, {}, 0)

    def validate():
        return C.plan_requests(spec, [req], pools, buf, to_dense=True, exact_size=True)

    batches = validate()

    def build(staging: str):
        def f():
            T.STAGING = staging
            meta = T._Meta()
            for b in batches:
                it = b.items[0]
                side = C.PagedSide(b.pool, it.ids, it.offset, b.layers, b.heads)
                T._kv_launch(side, buf, it.n_tokens, meta)
            return meta.tensor(device)

        return f

    launches = []
    for b in batches:
        it = b.items[0]
        shape = (len(b.layers), 2, it.n_tokens, b.heads[1] - b.heads[0], b.pool.shape[5])
        dense = b.flat[it.dense_offset : it.dense_offset + math.prod(shape)].view(shape)
        launches.append(
            T.prepare_kv(
                C.KVMove(
                    it.n_tokens, C.PagedSide(b.pool, it.ids, it.offset, b.layers, b.heads), dense
                )
            )
        )

    def launch_only():
        for f in launches:
            f()

    def pack():
        K.pack_request(spec, layout, pools, spans, {}, buf)

    out = {
        "validate_us": _host_time(validate, device, reps) * 1e6,
        "meta_pageable_us": _host_time(build("pageable"), device, reps) * 1e6,
        "meta_pinned_us": _host_time(build("pinned"), device, reps) * 1e6,
        "launches_only_us": _host_time(launch_only, device, reps) * 1e6,
    }
    for staging in ("pageable", "pinned"):
        T.STAGING = staging
        out[f"pack_request_{staging}_us"] = _host_time(pack, device, reps) * 1e6
        out[f"pack_request_{staging}_b2b_us"] = _back_to_back(pack, device, reps) * 1e6
    T.STAGING = "pinned"
    print({k: round(v, 1) for k, v in out.items()})
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        pack()
    prof.disable()
    torch.cuda.synchronize() if device.type == "cuda" else None
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return out


def run_benchmark(
    *,
    device: str | torch.device = "cuda",
    quick: bool = False,
    json_path: str | None = None,
    reps: int = 30,
    tune: bool = False,
    print_table: bool = True,
    cases: bool = True,
) -> dict:
    """Run the kernel benchmark; returns (and optionally writes as JSON) all numbers.

    ``quick`` uses few and small cases (a smoke test, also on CPU under the interpreter).
    ``tune`` adds a sweep over the kernel's tile size, warps and grid size on the small cases;
    ``cases=False`` skips the main table and the host-overhead rows.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA device (or device='cpu', quick)")
    T = K._triton_module()
    gen = torch.Generator().manual_seed(0)
    scale = 1.0 if not quick else 1 / 256
    pools = _Pools(device, scale)
    sizes = [64, 512, 2048, 8192] if not quick else [16, 64]
    rotate = 512 * MIB if not quick else 0
    common = dict(gen=gen, reps=reps if not quick else 3, rotate_bytes=rotate)
    results: list[dict] = []

    def add(op: str, n: int, **kw: Any) -> None:
        row = _case(op, pools, n, skip_loop=quick and device.type == "cpu", **common, **kw)
        results.append(row)
        if print_table:
            print(_fmt_row(row), flush=True)

    if print_table:
        print(_HEADER, flush=True)
    for n in sizes if cases else []:
        add("gather", n, tpb=16)
        add("gather", n, tpb=16, start=5)
        add("scatter", n, tpb=16)
        add("scatter", n, tpb=16, start=5)
    big = sizes[-1]
    mid = sizes[1]
    for n in (mid, big) if cases else ():
        add("gather", n, tpb=32)
        add("gather", n, tpb=64, start=17)
        add("gather", n, tpb=16, layout="HND")
        add("scatter", n, tpb=16, layout="HND", start=5)
        add("copy", n, tpb=16)
        add("copy", n, tpb=16, dst_tpb=32, start=5)
        add("copy", n, tpb=16, dst_layout="HND")
        add("copy", n, tpb=16, dst_tpb=64, start=7, dst_layout="HND")

    sweep = []
    if tune and device.type == "cuda":
        base = dict(T.TUNE)
        for tile in (8192, 16384, 32768):
            for warps in (4, 8):
                for pps in (2, 4, 8):
                    T.TUNE.update(tile_bytes=tile, num_warps=warps, programs_per_sm=pps)
                    for op, n, kw in [
                        ("gather", sizes[0], {}),
                        ("gather", sizes[0], {"start": 5}),
                        ("scatter", sizes[0], {"start": 5}),
                        ("copy", mid, {"dst_tpb": 32, "start": 5}),
                    ]:
                        row = _case(op, pools, n, tpb=16, skip_loop=True, **common, **kw)
                        sweep.append(
                            {
                                "tile_bytes": tile,
                                "num_warps": warps,
                                "programs_per_sm": pps,
                                "op": op,
                                "start": row["start"],
                                "mib": row["mib"],
                                "src": row["src"],
                                "dst": row["dst"],
                                "gbs": row["gbs"]["kvtriton"],
                                "vs_copy": row["vs_copy"],
                            }
                        )
                        if print_table:
                            print(
                                f"tune tile={tile:6d} warps={warps} pps={pps} {op:8s} "
                                f"start={row['start']} {row['dst']:14s} {row['mib']:6.1f} MiB "
                                f"{row['gbs']['kvtriton']:6.0f} GB/s {row['vs_copy']:6.1%} "
                                "of copy",
                                flush=True,
                            )
        T.TUNE.clear()
        T.TUNE.update(base)

    pools.cache.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    host = _host_overheads(device, 100) if cases and not quick else []
    if print_table and host:
        print("\nhost overhead per request (median CPU time until the call returns):")
        for h in host:
            print(
                f"  {h['spec']:12s} P={h['prompt']:5d} cached={h['cached']:5d} "
                f"groups={h['groups']} blocks={h['blocks']:5d} {h['mib']:8.1f} MiB  "
                f"pack {h['pack_request_us']:6.1f} us  unpack {h['unpack_request_us']:6.1f} us"
                f"  plan+layout+pack {h['plan_layout_pack_us']:6.1f} us"
                f" (back to back {h['plan_layout_pack_b2b_us']:6.1f} us)"
            )
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "shape": {
            "layers": LAYERS,
            "kv": KVF,
            "heads": HEADS,
            "head_dim": DIM,
            "dtype": str(DTYPE),
            "bytes_per_token": BYTES_PER_TOKEN,
        },
        "tune": dict(T.TUNE),
        "cases": results,
        "tune_sweep": sweep,
        "host_overhead": host,
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out


_HEADER = (
    f"{'op':8s} {'src':14s} {'dst':14s} {'start':>5s} {'tokens':>6s} {'MiB':>8s}  "
    f"{'kvtriton':>8s} {'torch1':>7s} {'loop':>7s} {'copy':>7s} GB/s   "
    f"{'%copy':>6s} {'x torch1':>8s}"
)


def _fmt_row(r: dict) -> str:
    g = r["gbs"]
    return (
        f"{r['op']:8s} {r['src']:14s} {r['dst']:14s} {r['start']:5d} {r['tokens']:6d} "
        f"{r['mib']:8.1f}  {g['kvtriton']:8.0f} {g['torch_1call']:7.0f} "
        f"{g['torch_loop']:7.0f} {g['copy']:7.0f}        {r['vs_copy']:6.1%} "
        f"{r['vs_torch_1call']:8.2f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvtriton bench kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (--quick only)")
    parser.add_argument("--quick", action="store_true", help="few small cases (smoke test)")
    parser.add_argument("--json", default=None, help="write all numbers to this JSON file")
    parser.add_argument("--reps", type=int, default=30, help="timed graph replays per case")
    parser.add_argument("--tune", action="store_true", help="also sweep tile size and warps")
    parser.add_argument("--tune-only", action="store_true", help="only the sweep")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu needs --quick (the full shapes are 8 GiB pools)")
    out = run_benchmark(
        device=args.device,
        quick=args.quick,
        json_path=args.json,
        reps=args.reps,
        tune=args.tune or args.tune_only,
        cases=not args.tune_only,
    )
    print(f"\ndevice: {out['device']}  torch {out['torch']}  triton {out['triton']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
