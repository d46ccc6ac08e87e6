"""Host time per request of the prepared API (part of ``kvtriton bench kernels``).

For each request shape (a preset, a prompt length, the tokens the receiver already holds in
every group; the whole request as one chunk): ``TransferTarget.from_spans``, ``prepare_pack``
(its checks, descriptor build and staging apart), ``run`` (all launches), the two together,
the same for unpack, and the convenience ``pack_request``. Median CPU time until the call
returns, the device idle before each call. On CUDA also what the staging and the launch cost
by other means (pageable copy, preallocated buffers, Triton's normal launch path).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["HOST_SHAPES", "host_overheads"]

MIB = 1 << 20
#: BENCHMARKS.md "Host overhead per request": (preset, prompt, cached tokens per group).
HOST_SHAPES = (
    ("llama-3-8b", 8192, 1000),
    ("gpt-oss-20b", 8192, 1000),
    ("gemma-3-4b", 4096, 100),
    ("llama-3-8b", 512, 100),
)


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
    """Mean CPU seconds per call of ``reps`` calls issued back to back."""
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


def _staging_variants(plan: Any, device: torch.device, reps: int) -> dict:
    """Host time of ways to put one plan's tables on the device (diagnostics): the one
    :func:`~kvtriton.kernels.descriptors.stage` uses (pinned block from torch's caching host
    allocator + a device tensor + one async copy), a copy from pageable memory while the
    stream is busy, and preallocated pinned + device buffers (the copy call alone)."""
    import numpy as np

    from kvtriton.kernels import descriptors as D

    nbytes = len(plan.meta) * 8 + plan.ids.size * 4
    raw = np.empty(nbytes, dtype=np.uint8)
    raw[: len(plan.meta) * 8] = np.frombuffer(plan.meta, dtype=np.uint8)
    out = {"stage_us": _host_time(lambda: D.stage(plan, device), device, reps) * 1e6}
    if device.type != "cuda":
        return out
    from kvtriton.kernels import staging

    out["ring"] = staging.runtime() is not None
    saved = staging.stage_into
    staging.stage_into = lambda *a: False  # torch's pinned block + copy_ instead of the ring
    try:
        out["stage_torch_us"] = _host_time(lambda: D.stage(plan, device), device, reps) * 1e6
    finally:
        staging.stage_into = saved
    busy = torch.empty(1 << 28, dtype=torch.uint8, device=device)

    def pageable_busy() -> None:
        busy.random_()  # ~0.1 ms of device work queued ahead of the copy
        torch.from_numpy(raw).to(device, non_blocking=True)

    def busy_only() -> None:
        busy.random_()

    out["pageable_busy_us"] = (
        _host_time(pageable_busy, device, reps) - _host_time(busy_only, device, reps)
    ) * 1e6
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out["copy_call_us"] = (
        _host_time(lambda: dev.copy_(pinned, non_blocking=True), device, reps) * 1e6
    )
    out["pinned_alloc_us"] = (
        _host_time(lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), device, reps)
        * 1e6
    )
    out["device_alloc_us"] = (
        _host_time(lambda: torch.empty(nbytes, dtype=torch.uint8, device=device), device, reps)
        * 1e6
    )
    return out


def _launch_paths(prepared: Any, buf: Any, device: torch.device, reps: int) -> dict:
    """Host time of ``run`` through the direct launch path and through Triton's normal one."""
    from kvtriton.kernels.prepared import triton_module

    T = triton_module()
    out = {"run_direct_us": _host_time(lambda: prepared.run(0, buf), device, reps) * 1e6}
    saved = dict(T._compiled)
    T._compiled.clear()
    direct, T.DIRECT = T.DIRECT, False
    try:
        out["run_triton_path_us"] = _host_time(lambda: prepared.run(0, buf), device, reps) * 1e6
    finally:
        T.DIRECT = direct
        T._compiled.update(saved)
    return out


def host_overheads(device: torch.device, reps: int, shapes: Sequence = HOST_SHAPES) -> list:
    gen = torch.Generator().manual_seed(1)
    return [_host_row(device, reps, name, prompt, cached, gen) for name, prompt, cached in shapes]


def _host_row(
    device: torch.device, reps: int, name: str, prompt: int, cached: int, gen: torch.Generator
) -> dict:
    """One request of preset ``name``: ``prompt`` tokens, ``cached`` held by the receiver in
    every group, packed and unpacked as one chunk."""
    from kvtriton import kernels as K
    from kvtriton.kernels import descriptors as D
    from kvtriton.kernels.plan import packed_moves
    from kvtriton.kernels.prepared import _sm_count
    from kvtriton.layout import packed_layout
    from kvtriton.plan import plan_transfer
    from kvtriton.ranges import BlockSpan
    from kvtriton.spec import preset
    from kvtriton.target import TransferTarget

    spec = preset(name)
    tpb = spec.tokens_per_block
    nblocks = -(-prompt // tpb) + 1
    pools: dict[str, torch.Tensor] = {}
    spans: dict[str, BlockSpan] = {}
    slots: dict[str, int] = {}
    for g in spec.groups:
        if g.is_state:
            dtype = getattr(torch, g.item_dtype(spec.dtype))
            shape = (g.num_layers, 2, *g.local_state_shape)
            pools[g.name] = torch.zeros(shape, dtype=dtype, device=device)
            slots[g.name] = 1
            continue
        shape = (g.num_layers, nblocks, g.kv_factor, tpb, g.local_heads, g.head_dim)
        pools[g.name] = torch.zeros(shape, dtype=spec.torch_dtype, device=device)
        spans[g.name] = BlockSpan(0, torch.randperm(nblocks, generator=gen).tolist())
    plan = plan_transfer(spec, prompt, {g.name: cached for g in spec.groups})
    tokens = {g.name: g.tokens for g in plan if not g.tokens.is_empty}
    layout = packed_layout(spec, tokens, plan.state_groups)

    def target(dst: bool) -> TransferTarget:
        return TransferTarget.from_spans(
            "r",
            prompt,
            tokens,
            spans,
            slots,
            tokens_per_block=tpb,
            num_blocks=dict.fromkeys(spans, nblocks),
            num_slots=dict.fromkeys(slots, 2),
            destination=dst,
        )

    src, dst = target(False), target(True)
    ps = K.PoolSet(spec, pools)
    buf = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    packer = K.prepare_pack(ps, src, [layout])
    unpacker = K.prepare_unpack(ps, dst, [layout])
    moves = packed_moves(ps, src, [layout], True)
    sms = _sm_count(device)
    hplan = D.build(moves, sm_count=sms, interpret=device.type == "cpu")

    def timed(fn: Callable[[], Any]) -> float:
        return _host_time(fn, device, reps) * 1e6

    def pack() -> None:
        K.prepare_pack(ps, src, [layout]).run(0, buf)

    def unpack() -> None:
        K.prepare_unpack(ps, dst, [layout]).run(0, buf)

    row = {
        "spec": name,
        "prompt": prompt,
        "cached": cached,
        "groups": len(layout.segments),
        "blocks": sum(len(g.block_ids) for g in src.kv.values()),
        "mib": layout.nbytes / MIB,
        "launches": len(packer._chunks[0]),
        "target_us": timed(lambda: target(True)),
        "prepare_pack_us": timed(lambda: K.prepare_pack(ps, src, [layout])),
        "checks_us": timed(lambda: packed_moves(ps, src, [layout], True)),
        "build_us": timed(lambda: D.build(moves, sm_count=sms)),
        "run_pack_us": timed(lambda: packer.run(0, buf)),
        "pack_us": timed(pack),
        "prepare_unpack_us": timed(lambda: K.prepare_unpack(ps, dst, [layout])),
        "run_unpack_us": timed(lambda: unpacker.run(0, buf)),
        "unpack_us": timed(unpack),
        "pack_b2b_us": _back_to_back(pack, device, reps) * 1e6,
        "pack_request_us": timed(lambda: K.pack_request(spec, layout, pools, spans, slots, buf)),
    }
    row.update(_staging_variants(hplan, device, reps))
    if device.type == "cuda":
        row.update(_launch_paths(packer, buf, device, reps))
    return row
