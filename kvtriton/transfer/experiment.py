"""The disaggregated-serving experiment behind ``scripts/disagg.py`` and ``kvtriton demo``.

The world splits into context ranks (prefill, senders) and generation ranks (decode,
receivers), see :class:`~kvtriton.transfer.topology.Topology`. Every rank builds a paged cache
(:class:`~kvtriton.cache.KVCacheManager` over :func:`~kvtriton.cache.allocate_pools`) for
its shard of the model. Context ranks "prefill" each request by writing position-derived
values (:func:`kv_values`: a function of layer, position, token id, K/V, head and dim,
exactly representable in the pool dtype) into the blocks the manager gives them. Generation
ranks run a stream of multi-turn conversations: turn ``t+1`` extends turn ``t``, whose blocks
the receiver committed to its prefix cache (then, as under memory pressure, its out-of-window
sliding pages are evicted). For each request the receiver plans per group with
:func:`kvtriton.adapter.prepare_receive`, asks the overlapping senders for exactly what is
missing, commits on success, and then checks **every needed position** of every group (and
every state) bit-exact against :func:`kv_values`, reused or transferred alike.

Everything here runs inside one process per rank; :func:`launch_local` spawns the ranks on
one machine (gloo on CPU, NCCL when each rank can own a GPU), ``scripts/disagg.py`` is the
torchrun entry.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from kvtriton import kernels
from kvtriton.adapter import abort_receive, complete_receive, prepare_receive
from kvtriton.cache import KVCacheManager, allocate_pools
from kvtriton.plan import plan_transfer
from kvtriton.ranges import BlockSpan, TokenRange, needed_range
from kvtriton.spec import KVCacheSpec, LayerGroup, preset
from kvtriton.transfer.config import DisaggConfig, FaultInjection, TransferOptions
from kvtriton.transfer.session import SessionState
from kvtriton.transfer.topology import Topology
from kvtriton.transfer.transport import RecvHandle, TransferAgent

__all__ = [
    "DisaggConfig",
    "format_report",
    "kv_values",
    "launch_cases",
    "launch_local",
    "make_groups",
    "run_rank",
    "state_values",
]


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
def load_model(name: str | KVCacheSpec, dtype: str | None = None) -> KVCacheSpec:
    """A spec as is, a preset by name, else a Hugging Face config via ``kvtriton.hf``."""
    from kvtriton.spec import PRESETS

    if isinstance(name, KVCacheSpec):
        return replace(name, dtype=dtype) if dtype else name
    if name in PRESETS:
        return preset(name, dtype=dtype)
    from kvtriton import hf

    spec = hf.spec_from_hf_config(name)
    return replace(spec, dtype=dtype) if dtype else spec


# ---------------------------------------------------------------------------------------
# position-derived values
# ---------------------------------------------------------------------------------------
def _modulus(dtype: torch.dtype) -> int:
    # integers in [-m//2, m//2] are exact: fp8 e5m2 up to 8, e4m3 up to 16, others 125.
    if dtype == getattr(torch, "float8_e5m2", None):
        return 17
    if dtype == getattr(torch, "float8_e4m3fn", None):
        return 33
    return 251


def kv_values(
    group: LayerGroup,
    layer_ids: Sequence[int],
    heads: tuple[int, int],
    positions: TokenRange,
    token_ids: Sequence[int],
    dtype: torch.dtype,
    device: Any = "cpu",
) -> torch.Tensor:
    """Packed ``[layers, kv, tokens, heads, head_dim]`` values of ``positions``: a function of
    (global layer, position, token id at the position, K/V, global head, dim), computed on
    ``device``."""
    m = _modulus(dtype)

    def ar(lo: int, hi: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.arange(lo, hi, dtype=torch.int64, device=device).view(shape)

    lay = torch.tensor(list(layer_ids), dtype=torch.int64, device=device).view(-1, 1, 1, 1, 1)
    kv = ar(0, group.kv_factor, (1, -1, 1, 1, 1))
    pos = ar(positions.start, positions.end, (1, 1, -1, 1, 1))
    tok = torch.tensor(
        list(token_ids[positions.start : positions.end]), dtype=torch.int64, device=device
    ).view(1, 1, -1, 1, 1)
    head = ar(heads[0], heads[1], (1, 1, 1, -1, 1))
    dim = ar(0, group.head_dim, (1, 1, 1, 1, -1))
    v = (lay * 131 + pos * 7 + tok * 13 + kv * 17 + head * 19 + dim * 3) % m - m // 2
    return v.to(torch.float32).to(dtype)


def state_values(
    group: LayerGroup,
    layer_ids: Sequence[int],
    heads: tuple[int, int],
    token_ids: Sequence[int],
    dtype: torch.dtype,
    device: Any = "cpu",
) -> torch.Tensor:
    """``[layers, heads, *state_shape[1:]]`` state summarising ``token_ids`` (all of them)."""
    m = _modulus(dtype)
    assert group.state_shape is not None
    rest = group.state_shape[1:]
    n = 1
    for d in rest:
        n *= d
    salt = (len(token_ids) * 7 + sum(token_ids) * 13) % m
    lay = torch.tensor(list(layer_ids), dtype=torch.int64, device=device).view(-1, 1, 1)
    head = torch.arange(heads[0], heads[1], dtype=torch.int64, device=device).view(1, -1, 1)
    idx = torch.arange(n, dtype=torch.int64, device=device).view(1, 1, -1)
    v = (lay * 131 + head * 19 + idx * 3 + salt) % m - m // 2
    return v.to(torch.float32).to(dtype).view(len(layer_ids), heads[1] - heads[0], *rest)


def _global_heads(group: LayerGroup) -> tuple[int, int]:
    if group.kind == "state":
        assert group.state_head_end is not None
        return group.state_head_start, group.state_head_end
    assert group.head_end is not None
    return group.head_start, group.head_end


def prefill(
    spec: KVCacheSpec,
    pools: Any,
    spans: dict[str, BlockSpan],
    slots: dict[str, int],
    token_ids: Sequence[int],
    backend: str,
) -> None:
    """Write every position a context rank holds for the request (its spans up to ``P``)."""
    p = len(token_ids)
    for g in spec.groups:
        if g.kind == "state":
            vals = state_values(
                g, g.layer_ids, _global_heads(g), token_ids, pools.state[g.name].dtype, pools.device
            )
            kernels.scatter_state(vals, pools.state[g.name], slots[g.name], backend=backend)
            continue
        span = spans[g.name]
        rng = TokenRange(span.first_block * spec.tokens_per_block, p)
        if rng.is_empty:
            continue
        vals = kv_values(
            g, g.layer_ids, _global_heads(g), rng, token_ids, pools.kv[g.name].dtype, pools.device
        )
        kernels.scatter(vals, pools.kv[g.name], span, rng, backend=backend)


def verify(
    spec: KVCacheSpec,
    pools: Any,
    spans: dict[str, BlockSpan],
    slots: dict[str, int],
    token_ids: Sequence[int],
    backend: str,
) -> list[str]:
    """Mismatches (empty = bit-exact) over every needed position of every group and state."""
    p = len(token_ids)
    bad = []
    for g in spec.groups:
        if g.kind == "state":
            want = state_values(
                g, g.layer_ids, _global_heads(g), token_ids, pools.state[g.name].dtype, pools.device
            )
            got = kernels.gather_state(pools.state[g.name], slots[g.name], backend=backend)
        else:
            rng = needed_range(g, p)
            if rng.is_empty:
                continue
            want = kv_values(
                g,
                g.layer_ids,
                _global_heads(g),
                rng,
                token_ids,
                pools.kv[g.name].dtype,
                pools.device,
            )
            got = kernels.gather(pools.kv[g.name], spans[g.name], rng, backend=backend)
        if not torch.equal(want.view(torch.uint8), got.contiguous().view(torch.uint8)):
            diff = (want.float() != got.float()).nonzero()
            bad.append(
                f"group {g.name!r}: {len(diff)} elements differ, first at "
                f"{diff[0].tolist() if len(diff) else '?'}"
            )
    return bad


# ---------------------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------------------
def conversation_stream(cfg: DisaggConfig) -> list[list[tuple[str, list[int]]]]:
    """``[conversation][turn] -> (request id, token ids)``; turn ``t+1`` extends turn ``t``."""
    rng = random.Random(cfg.seed)
    convs = []
    for c in range(cfg.conversations):
        tokens: list[int] = []
        turns = []
        for t in range(cfg.turns):
            n = cfg.first_turn_tokens if t == 0 else cfg.turn_tokens
            tokens = tokens + [rng.randrange(1, 50_000) for _ in range(n)]
            turns.append((f"c{c}t{t}", list(tokens)))
        convs.append(turns)
    return convs


def _blocks_needed(cfg: DisaggConfig, spec: KVCacheSpec) -> int:
    longest = cfg.first_turn_tokens + (cfg.turns - 1) * cfg.turn_tokens
    per_req = -(-(longest + cfg.draft_tokens) // spec.tokens_per_block) + 2
    return per_req * cfg.conversations * cfg.turns + 8


@dataclass
class _Stats:
    rid: str
    mode: str
    num_tokens: int
    bytes_by_group: dict[str, int]
    tokens_by_group: dict[str, int]
    no_reuse_bytes: dict[str, int]
    state: str
    error: str | None
    t_plan: float
    t_handshake: float
    t_data: float
    t_total: float
    t_first_data: float | None
    t_last_data: float | None
    mismatches: list[str]


def _run_ctx(
    agent: TransferAgent,
    cfg: DisaggConfig,
    spec: KVCacheSpec,
    pools: Any,
    manager: KVCacheManager,
    mode: str,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    for conv in conversation_stream(cfg):
        for rid, tokens in conv:
            rid = f"{mode}/{rid}"
            alloc = manager.allocate(rid, tokens, prefill=True)
            prefill(
                spec, pools, dict(alloc.spans), dict(alloc.state_slots), tokens, cfg.kernel_backend
            )
            manager.commit(rid, len(tokens))
            agent.register_source(
                rid,
                len(tokens),
                dict(alloc.spans),
                dict(alloc.state_slots),
                on_finished=lambda r, _s: manager.free(r),
            )
    t_prefill = time.perf_counter() - t0
    return {"prefill_s": t_prefill}


def _run_gen(
    agent: TransferAgent,
    cfg: DisaggConfig,
    spec: KVCacheSpec,
    pools: Any,
    manager: KVCacheManager,
    mode: str,
) -> list[_Stats]:
    convs = conversation_stream(cfg)
    next_turn = [0] * len(convs)
    live: dict[str, tuple[Any, list[int], float, float]] = {}
    stats: list[_Stats] = []
    sliding = [g.name for g in spec.groups if g.kind == "sliding"]

    def issue(c: int) -> None:
        rid0, tokens = convs[c][next_turn[c]]
        rid = f"{mode}/{rid0}"
        t0 = time.perf_counter()
        rx = prepare_receive(
            manager,
            rid,
            tokens,
            mode=mode,  # type: ignore[arg-type]
            num_draft_tokens=cfg.draft_tokens,
        )
        t_plan = time.perf_counter() - t0
        agent.request(
            rid,
            len(tokens),
            rx.tokens,
            rx.states,
            rx.spans,
            rx.state_slots,
            mode=mode,
            on_commit=lambda h, rx=rx: complete_receive(manager, rx),
            on_release=lambda h, rx=rx: abort_receive(manager, rx),
        )
        live[rid] = (rx, tokens, t0, t_plan)
        if rid0 in cfg.cancel:
            agent.cancel(rid, "cancelled by the experiment")

    def finish(rid: str) -> None:
        _debug(f"{rid} ended {agent.handle(rid).state.value}")
        rx, tokens, t0, t_plan = live.pop(rid)
        h: RecvHandle = agent.handle(rid)
        t_end = time.perf_counter()
        by_group: dict[str, int] = {}
        tok_by_group: dict[str, int] = {}
        for part in h.parts.values():
            for ch in part.chunks:
                for seg in ch.layout.segments:
                    by_group[seg.group] = by_group.get(seg.group, 0) + seg.nbytes
        for g, r in rx.tokens.items():
            tok_by_group[g] = len(r)
        none = plan_transfer(spec, len(tokens), 0)
        mism: list[str] = []
        if h.state is SessionState.TRANSFERRED:
            mism = verify(
                spec, pools, dict(rx.spans), dict(rx.state_slots), tokens, cfg.kernel_backend
            )
            manager.free(rid)  # decoding done: blocks stay matchable
            if cfg.evict_sliding:
                for g in sliding:
                    manager.evict(group=g)
        sess = h.session
        first = h.t_first_data
        created = sess.created
        stats.append(
            _Stats(
                rid=rid,
                mode=mode,
                num_tokens=len(tokens),
                bytes_by_group=by_group,
                tokens_by_group=tok_by_group,
                no_reuse_bytes={g.name: g.bytes for g in none.groups},
                state=h.state.value,
                error=sess.error,
                t_plan=t_plan,
                t_handshake=(first - created) if first else 0.0,
                t_data=((h.t_last_data or first) - first) if first else 0.0,
                t_total=t_end - t0,
                t_first_data=h.t_first_data,
                t_last_data=h.t_last_data,
                mismatches=mism,
            )
        )
        agent.forget(rid)

    pending = [c for c in range(len(convs))]
    while pending or live:
        while pending and len(live) < cfg.in_flight:
            c = pending.pop(0)
            issue(c)
        agent.progress(0.005)
        for rid in list(live):
            h = agent.handle(rid)
            if (
                rid.split("/", 1)[1] in cfg.cancel_during
                and h.bytes_received > 0
                and not h.session.is_terminal
            ):
                agent.cancel(rid, "cancelled by the experiment during the transfer")
            if h.session.is_terminal and not h.pending:
                finish(rid)
                c = int(rid.split("/")[1].split("t")[0][1:])
                next_turn[c] += 1
                if next_turn[c] < cfg.turns:
                    pending.append(c)
    return stats


def make_groups(world_size: int, data_backend: str, timeout_s: float = 120.0) -> tuple[Any, Any]:
    """``(control, data)`` groups over ranks ``[0, world_size)`` of the default group.

    Collective: every rank of the default group must call it (non-members get a
    non-member handle). Control is always gloo; data is ``data_backend``.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    ranks = list(range(world_size))
    ctrl = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
    data = dist.new_group(ranks=ranks, backend=data_backend, timeout=timeout)
    return ctrl, data


def _leaked(manager: KVCacheManager, spec: KVCacheSpec) -> dict[str, int]:
    return {
        g.name: sum(manager.refcount(g.name, b) > 0 for b in range(manager.num_blocks(g.name)))
        for g in spec.groups
        if g.kind != "state"
    }


def run_rank(
    cfg: DisaggConfig,
    rank: int,
    *,
    ctrl: Any,
    data: Any,
    device: str = "cpu",
    data_backend: str = "gloo",
) -> dict[str, Any] | None:
    """Run the experiment on this rank over ``ctrl`` (gloo) and ``data`` groups whose ranks
    are ``[0, cfg.world_size)``.

    Returns the report (a dict, see :func:`format_report`) on the first generation rank,
    ``None`` elsewhere. A dead peer does not hang the run: the report then holds what the
    surviving generation rank saw.
    """
    topo_ctx = Topology(
        load_model(cfg.model, cfg.dtype),
        cfg.ctx_tp,
        cfg.ctx_pp,
        cfg.gen_tp,
        cfg.gen_pp,
        gen_tokens_per_block=cfg.gen_tokens_per_block,
    )
    info = topo_ctx.info(rank)
    topo = topo_ctx
    if info.side == "gen" and cfg.gen_dtype is not None:  # a deliberately different model
        topo = Topology(
            load_model(cfg.model, cfg.gen_dtype),
            cfg.ctx_tp,
            cfg.ctx_pp,
            cfg.gen_tp,
            cfg.gen_pp,
            gen_tokens_per_block=cfg.gen_tokens_per_block,
        )
    spec = topo.spec(rank)
    layout = cfg.ctx_layout if info.side == "ctx" else cfg.gen_layout
    nblocks = _blocks_needed(cfg, spec)
    nslots = 2 * cfg.conversations * cfg.turns + 4
    results: dict[str, Any] = {"rank": rank, "side": info.side, "modes": {}}
    options = TransferOptions(
        chunk_bytes=cfg.chunk_bytes,
        timeout_s=cfg.timeout_s,
        checksum=cfg.checksum,
        backend=cfg.kernel_backend,
        prepost=cfg.prepost,
        faults=cfg.faults.get(rank, FaultInjection()),
    )
    healthy = True
    for mode in cfg.modes:
        has_state = any(g.kind == "state" for g in spec.groups)
        pools = allocate_pools(
            spec, nblocks, num_state_slots=nslots if has_state else 0, device=device, layout=layout
        )  # type: ignore[arg-type]
        manager = KVCacheManager(spec, pools=pools)
        _debug(f"{mode}: creating the agent")
        agent = TransferAgent(topo, rank, {**pools.kv, **pools.state}, ctrl, data, options)
        _debug(f"{mode}: agent up")
        t0 = time.perf_counter()
        if info.side == "ctx":
            out: Any = _run_ctx(agent, cfg, spec, pools, manager, mode)
            _debug(f"{mode}: prefilled, serving")
            agent.serve(timeout=cfg.timeout_s * (cfg.turns + 2))
            out["gather_s"] = agent.stats["gather_s"]
            out["frames_sent"] = agent.stats["frames_sent"]
            out["sessions"] = {
                f"{rid}@{peer}": [j.session.state.value, j.session.error]
                for (peer, rid), j in agent._send_jobs.items()
            }
        else:
            reqs = [asdict(st) for st in _run_gen(agent, cfg, spec, pools, manager, mode)]
            out = {"requests": reqs, "scatter_s": agent.stats["scatter_s"]}
        _debug(f"{mode}: stream done, closing")
        agent.close(timeout=cfg.timeout_s)
        _debug(f"{mode}: closed")
        if info.side == "ctx":
            out["leaked"] = _leaked(manager, spec)
        else:
            out["leaked"] = {g: n for g, n in _leaked(manager, spec).items()}
        out["cached"] = {
            g.name: manager.num_cached_blocks(g.name) for g in spec.groups if g.kind != "state"
        }
        out["lost_peers"] = sorted(p for p, q in agent._peers.items() if q.lost is not None)
        out["wall_s"] = time.perf_counter() - t0
        results["modes"][mode] = out
        healthy = healthy and not out["lost_peers"]
        if healthy:
            dist.barrier(group=ctrl)
    _debug("gathering the results")
    reporter = topo.num_ctx
    gathered: list[Any] = [None] * cfg.world_size
    if healthy:
        dist.gather_object(
            results, gathered if rank == reporter else None, dst=reporter, group=ctrl
        )
    elif rank == reporter:
        gathered = [results]
    if rank != reporter:
        return None
    where = device
    if device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(torch.device(device))} (one per rank)"
    return _summarise(cfg, topo_ctx, [g for g in gathered if g is not None], where, data_backend)


def _summarise(
    cfg: DisaggConfig, topo: Topology, per_rank: list[Any], device: str, data_backend: str
) -> dict[str, Any]:
    model = topo.model
    report: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("faults",)},
        "model": model.name,
        "topology": topo.describe(),
        "device": device,
        "data_backend": data_backend,
        "modes": {},
        "verified": True,
        "problems": [],
    }
    for mode in cfg.modes:
        groups = {
            g.name: {
                "kind": g.kind,
                "window": g.window,
                "tokens": 0,
                "bytes": 0,
                "no_reuse_bytes": 0,
            }
            for g in model.groups
        }
        reqs: list[dict[str, Any]] = []
        for r in per_rank:
            if r["side"] != "gen":
                continue
            m = r["modes"][mode]
            reqs.extend(m["requests"])
            for g, n in m["leaked"].items():
                if n:
                    report["problems"].append(
                        f"rank {r['rank']} {mode}: {n} blocks of "
                        f"{g!r} still referenced after the stream"
                    )
        for q in reqs:
            for g, b in q["bytes_by_group"].items():
                groups[g]["bytes"] += b
            for g, b in q["no_reuse_bytes"].items():
                groups[g]["no_reuse_bytes"] += b
            if q["state"] != "TRANSFERRED":
                report["problems"].append(f"{q['rid']}: {q['state']} ({q['error']})")
            for mm in q["mismatches"]:
                report["problems"].append(f"{q['rid']}: {mm}")
        # tokens moved per group: one count per request (the same on every receiver rank)
        seen: set[str] = set()
        for q in reqs:
            if q["rid"] in seen:
                continue
            seen.add(q["rid"])
            for g, n in q["tokens_by_group"].items():
                groups[g]["tokens"] += n
        data_s = sum(q["t_data"] for q in reqs)
        total = sum(g["bytes"] for g in groups.values())
        report["modes"][mode] = {
            "groups": groups,
            "requests": len(seen),
            "bytes": total,
            "no_reuse_bytes": sum(g["no_reuse_bytes"] for g in groups.values()),
            "t_plan_ms": 1e3 * sum(q["t_plan"] for q in reqs) / max(1, len(reqs)),
            "t_handshake_ms": 1e3 * sum(q["t_handshake"] for q in reqs) / max(1, len(reqs)),
            "t_data_ms": 1e3 * data_s / max(1, len(reqs)),
            "t_total_ms": 1e3 * sum(q["t_total"] for q in reqs) / max(1, len(reqs)),
            "gbps": (total / data_s / 1e9) if data_s > 0 else None,
            "wall_s": max(r["modes"][mode]["wall_s"] for r in per_rank),
        }
    report["verified"] = not report["problems"]
    report["ranks"] = per_rank  # raw per-rank results (sessions, leaks, requests)
    return report


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """A readable summary: header, per-group table, phases, final VERIFIED/FAILED line."""
    cfg = report["config"]
    lines = [
        f"kvtriton disaggregated transfer: {report['model']}, {report['topology']}",
        f"  data over {report['data_backend']} on {report['device']}, control over gloo; "
        f"{cfg['conversations']} conversations x {cfg['turns']} turns "
        f"({cfg['first_turn_tokens']} tokens, +{cfg['turn_tokens']} per turn)",
        "  Context ranks prefill position-derived KV; generation ranks keep earlier turns in "
        "their prefix cache",
        "  (sliding-window pages evicted), ask each overlapping sender for exactly the missing "
        "per-group ranges,",
        "  commit only intact requests, and check every needed position bit-exact.",
        "",
    ]
    modes = report["modes"]
    pg = modes.get("per_group")
    sb = modes.get("single_boundary")
    title = "per-group" if pg else "single-boundary"
    lines.append(
        f"  Moved with {title} reuse, against one boundary per sequence and against "
        f"no reuse (all receivers):"
    )
    hdr = f"  {'group':<12} {'kind':<13} {'tokens':>7} {'bytes':>11}"
    if sb and pg:
        hdr += f" {'single-bnd':>11} {'saved':>6}"
    hdr += f" {'no reuse':>11} {'saved':>6}"
    main = pg or sb
    lines.append(hdr)
    for name, g in main["groups"].items():
        kind = g["kind"] + (f"({g['window']})" if g["window"] else "")
        tokens = str(g["tokens"]) if g["kind"] != "state" else "-"
        row = f"  {name:<12} {kind:<13} {tokens:>7} {_fmt_bytes(g['bytes']):>11}"
        if sb and pg:
            sbb = sb["groups"][name]["bytes"]
            save = f"{100 * (1 - g['bytes'] / sbb):.0f}%" if sbb else "-"
            row += f" {_fmt_bytes(sbb):>11} {save:>6}"
        nr = g["no_reuse_bytes"]
        save = f"{100 * (1 - g['bytes'] / nr):.0f}%" if nr else "-"
        row += f" {_fmt_bytes(nr):>11} {save:>6}"
        lines.append(row)
    tot = main["bytes"]
    row = f"  {'total':<12} {'':<13} {'':>7} {_fmt_bytes(tot):>11}"
    if sb and pg:
        save = f"{100 * (1 - tot / sb['bytes']):.0f}%" if sb["bytes"] else "-"
        row += f" {_fmt_bytes(sb['bytes']):>11} {save:>6}"
    nr = main["no_reuse_bytes"]
    row += f" {_fmt_bytes(nr):>11} {(f'{100 * (1 - tot / nr):.0f}%' if nr else '-'):>6}"
    lines.append(row)
    lines.append("")
    lines.append("  Time per phase (mean per request and receiver rank):")
    for mode, m in modes.items():
        rate = m["gbps"]
        gb = (
            "n/a" if not rate else (f"{rate:.2f} GB/s" if rate >= 0.1 else f"{rate * 1e3:.1f} MB/s")
        )
        lines.append(
            f"  {mode:<16} {m['requests']} requests, {_fmt_bytes(m['bytes'])}, {gb} while data "
            f"flows; stream {m['wall_s']:.2f} s"
        )
        lines.append(
            f"  {'':<16} plan {m['t_plan_ms']:.2f} ms | ask -> first byte "
            f"{m['t_handshake_ms']:.2f} ms | data {m['t_data_ms']:.2f} ms | until committed "
            f"{m['t_total_ms']:.2f} ms"
        )
    lines.append("")
    if report["verified"]:
        n = sum(m["requests"] for m in modes.values())
        lines.append(
            f"VERIFIED: {n} requests, every needed position of every group "
            f"bit-exact on every generation rank, no leaked blocks"
        )
    else:
        lines.append("FAILED:")
        lines.extend(f"  {p}" for p in report["problems"][:20])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_for_result(
    target: Callable[..., None],
    world: int,
    rank_args: Callable[[int, int, Any], tuple[Any, ...]],
    timeout_s: float,
) -> tuple[Any, list[int | None]]:
    """Spawn ``world`` processes running ``target(*rank_args(rank, port, queue))`` and wait
    for the first object any of them puts on ``queue``.

    ``port`` is a free TCP port on 127.0.0.1 for the ranks' store. Returns that object (None
    if every rank exited, or ``timeout_s`` seconds passed, without one) and the exit codes;
    ranks still running after the deadline are killed, so nothing outlives the call.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=rank_args(rank, port, out_q)) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    result: Any = None
    while result is None and time.monotonic() < deadline:
        try:
            result = out_q.get(timeout=0.5)
        except Exception:  # queue.Empty: check whether the ranks are still alive
            if all(proc.exitcode is not None for proc in procs):
                break
    for proc in procs:
        proc.join(timeout=max(1.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    out_q.close()
    out_q.join_thread()
    return result, [proc.exitcode for proc in procs]


def exit_worker(out_q: Any) -> NoReturn:
    """End a spawned rank: flush its result queue and stdio, then leave at once.

    Interpreter teardown with torch and gloo threads takes seconds on a small CPU box, and
    everything the parent needs has been flushed by then.
    """
    out_q.close()
    out_q.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(
    rank: int, cfg: DisaggConfig, world: int, port: int, use_nccl: bool, out_q: Any
) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.set_num_threads(1)
    # The agent's network threads hand the GIL back and forth per message: a short switch
    # interval keeps a small message from waiting 5 ms for the main thread (CPU demo).
    sys.setswitchinterval(0.0002)
    store = dist.TCPStore(
        "127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60)
    )
    device = "cpu"
    if use_nccl:
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
        # no device_id: lazy NCCL init, so each point-to-point pair gets its own 2-rank
        # communicator (own stream): sends to different peers never queue behind each other
        dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        backend = "nccl" if use_nccl else "gloo"
        ctrl, data = make_groups(world, backend, max(120.0, 4 * cfg.timeout_s))
        report = run_rank(cfg, rank, ctrl=ctrl, data=data, device=device, data_backend=backend)
        if report is not None:
            out_q.put(report)
    finally:
        dist.destroy_process_group()
    exit_worker(out_q)


def _case_worker(
    rank: int, cases: list[tuple[str, DisaggConfig]], world: int, port: int, out_q: Any
) -> None:
    import traceback

    torch.set_num_threads(1)
    sys.setswitchinterval(0.0002)
    store = dist.TCPStore(
        "127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60)
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    code = 0
    for name, cfg in cases:
        ctrl, data = make_groups(cfg.world_size, "gloo", max(60.0, 4 * cfg.timeout_s))
        if rank < cfg.world_size:
            try:
                report = run_rank(cfg, rank, ctrl=ctrl, data=data)
            except Exception:
                out_q.put((name, {"error": f"rank {rank}: {traceback.format_exc()}"}))
                code = 1
                break
            if report is not None:
                out_q.put((name, report))
        if any(f.die_after_frames is not None for f in cfg.faults.values()):
            break  # a rank died: the world is broken, this must be the last case
    out_q.put(("__exit__", rank))
    out_q.close()
    out_q.join_thread()
    os._exit(code)


def launch_cases(
    cases: Sequence[tuple[str, DisaggConfig]], world_size: int, timeout_s: float = 200.0
) -> dict[str, dict[str, Any]]:
    """Run several gloo experiments one after another in one spawned world of
    ``world_size`` CPU ranks (each case uses ranks ``[0, cfg.world_size)``), sharing the
    process start-up cost. Returns ``{case name: report or {"error": text}}``. A case with
    a ``die_after_frames`` fault must come last.
    """
    import torch.multiprocessing as mp

    for name, cfg in cases:
        if cfg.world_size > world_size:
            raise ValueError(f"case {name!r} needs {cfg.world_size} ranks > {world_size}")
    ctx = mp.get_context("spawn")
    out_q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_case_worker, args=(r, list(cases), world_size, port, out_q))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[str, dict[str, Any]] = {}
    exited = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and exited < world_size:
        try:
            name, rep = out_q.get(timeout=0.5)
        except Exception:
            if all(p.exitcode is not None for p in procs):
                break
            continue
        if name == "__exit__":
            exited += 1
        else:
            results.setdefault(name, rep)
    for p in procs:
        p.join(timeout=5)
        if p.exitcode is None:
            p.kill()
    for name, _ in cases:
        results.setdefault(
            name,
            {
                "error": "no report (a rank crashed or hung; exit codes "
                f"{[p.exitcode for p in procs]})"
            },
        )
    return results


def launch_local(cfg: DisaggConfig) -> dict[str, Any]:
    """Spawn ``cfg.world_size`` ranks on this machine and return the report.

    NCCL carries the data when ``cfg.backend`` is ``"nccl"``, or ``"auto"`` with at least one
    GPU per rank; otherwise gloo on CPU.
    """

    world = cfg.world_size
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_nccl = cfg.backend == "nccl" or (cfg.backend == "auto" and ngpu >= world)
    if use_nccl and ngpu < world:
        raise RuntimeError(f"backend nccl needs {world} GPUs, found {ngpu}")
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    timeout_s = cfg.timeout_s * (cfg.turns + 4) * len(cfg.modes) + 60
    report, codes = spawn_for_result(
        _worker,
        world,
        lambda rank, port, out_q: (rank, cfg, world, port, use_nccl, out_q),
        timeout_s,
    )
    if report is None:
        raise RuntimeError(f"the experiment produced no report (exit codes {codes})")
    return report


def _debug(msg: str) -> None:
    """``KVTRITON_DEBUG=1``: progress lines on stderr (rank, time)."""
    if os.environ.get("KVTRITON_DEBUG"):
        rank = os.environ.get("RANK", "?")
        print(f"[kvtriton rank {rank} {time.monotonic():.3f}] {msg}", file=sys.stderr, flush=True)


def _torchrun_env() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run_torchrun(cfg: DisaggConfig) -> dict[str, Any] | None:
    """Run this process's rank under ``torchrun`` (env:// rendezvous); the report comes back
    on the first generation rank, ``None`` elsewhere."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if os.environ.get("KVTRITON_DUMP_STACKS_AFTER_S"):  # debugging hangs
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["KVTRITON_DUMP_STACKS_AFTER_S"]))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world != cfg.world_size:
        raise ValueError(
            f"torchrun started {world} ranks; ctx tp{cfg.ctx_tp}pp{cfg.ctx_pp} + "
            f"gen tp{cfg.gen_tp}pp{cfg.gen_pp} needs {cfg.world_size}"
        )
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_nccl = cfg.backend == "nccl" or (cfg.backend == "auto" and ngpu >= local_world > 0)
    device = "cpu"
    if use_nccl:
        # --devices maps ranks to GPUs (several ranks may share one, as long as every
        # sender/receiver pair spans two GPUs); default: one GPU per local rank
        gpu = cfg.devices[local_rank] if cfg.devices else local_rank
        torch.cuda.set_device(gpu)
        device = f"cuda:{gpu}"
        dist.init_process_group("cpu:gloo,cuda:nccl")  # lazy: p2p gets 2-rank comms
    else:
        dist.init_process_group("gloo")
    sys.setswitchinterval(0.0002)
    try:
        backend = "nccl" if use_nccl else "gloo"
        ctrl, data = make_groups(world, backend, max(120.0, 4 * cfg.timeout_s))
        report = run_rank(cfg, rank, ctrl=ctrl, data=data, device=device, data_backend=backend)
    except BaseException:
        # Say what failed now: tearing the groups down could block on the peers' threads.
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if report is not None:
        print(format_report(report), flush=True)
    dist.destroy_process_group()
    return report


def run_cli(args: Any) -> int:
    """``scripts/disagg.py`` and ``kvtriton demo``: under torchrun run this rank, otherwise
    spawn every rank here. Prints the report; exit status 0 when VERIFIED."""
    import json

    from kvtriton.transfer.config import config_from_args

    cfg = config_from_args(args)
    if _torchrun_env():
        report = run_torchrun(cfg)  # prints the report on the reporting rank
    else:
        report = launch_local(cfg)
        if report is not None:
            print(format_report(report), flush=True)
    if report is None:
        return 0
    if getattr(args, "json", None):
        slim = {k: v for k, v in report.items() if k != "ranks"}
        with open(args.json, "w") as f:
            json.dump(slim, f, indent=1, default=str)
    return 0 if report["verified"] else 1
