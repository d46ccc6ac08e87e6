"""The disaggregated-serving experiment behind ``scripts/disagg.py`` and ``kvtriton demo``.

The world splits into context ranks (prefill, senders) and generation ranks (decode,
receivers), see :class:`~kvtriton.transfer.topology.Topology`. Every rank builds a paged cache
(:class:`~kvtriton.cache.KVCacheManager` over :func:`~kvtriton.cache.allocate_pools`) for
its shard of the model. Context ranks "prefill" each request by writing position-derived
values (:mod:`kvtriton.transfer.values`: a function of layer, position, token id, K/V, head
and dim, exactly representable in the pool dtype) into the blocks the manager gives them. Generation
ranks run a stream of multi-turn conversations: turn ``t+1`` extends turn ``t``, whose blocks
the receiver committed to its prefix cache (then, as under memory pressure, its out-of-window
sliding pages are evicted). For each request the receiver plans per group with
:func:`kvtriton.adapter.prepare_receive`, asks the overlapping senders for exactly what is
missing, commits on success, and then checks **every needed position** of every group (and
every state) bit-exact against those values, reused or transferred alike.

Everything here runs inside one process per rank (:func:`run_rank`);
:mod:`kvtriton.transfer.demo` spawns the ranks on one machine or runs one under torchrun.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from kvtriton.adapter import abort_receive, complete_receive, prepare_receive, source_target
from kvtriton.cache import KVCacheManager, allocate_pools
from kvtriton.plan import plan_transfer
from kvtriton.spec import KVCacheSpec, preset
from kvtriton.transfer.agent import RecvHandle, TransferAgent
from kvtriton.transfer.config import DisaggConfig, TransferOptions
from kvtriton.transfer.launch import connect, gather_json
from kvtriton.transfer.protocol import prompt_digest
from kvtriton.transfer.session import SessionState
from kvtriton.transfer.topology import Topology
from kvtriton.transfer.values import prefill, verify

__all__ = ["DisaggConfig", "conversation_stream", "load_model", "run_rank"]


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
    """Prefill every request of the stream and register it as a source; its blocks are
    freed when the source is released (every receiver done, or its lease expired)."""
    t0 = time.perf_counter()
    released: dict[str, dict[int, str]] = {}
    for conv in conversation_stream(cfg):
        for rid, tokens in conv:
            rid = f"{mode}/{rid}"
            alloc = manager.allocate(rid, tokens, prefill=True)
            prefill(
                spec, pools, dict(alloc.spans), dict(alloc.state_slots), tokens, cfg.kernel_backend
            )
            manager.commit(rid, len(tokens))

            def release(r: str, states: dict[int, SessionState]) -> None:
                manager.free(r)
                released[r] = {peer: st.value for peer, st in states.items()}

            agent.register_source(
                source_target(manager, rid), prompt_digest=prompt_digest(tokens), on_release=release
            )
    return {"prefill_s": time.perf_counter() - t0, "released": released}


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
    sliding = [g.name for g in spec.groups if g.kind.has_window]
    clock = agent.clock

    def issue(c: int) -> None:
        rid0, tokens = convs[c][next_turn[c]]
        rid = f"{mode}/{rid0}"
        t0 = clock()
        rx = prepare_receive(
            manager,
            rid,
            tokens,
            mode=mode,  # type: ignore[arg-type]
            num_draft_tokens=cfg.draft_tokens,
        )
        t_plan = clock() - t0
        agent.request(
            rx.target,
            prompt_digest=prompt_digest(tokens),
            mode=mode,
            on_commit=lambda h, rx=rx: complete_receive(manager, rx),
            on_release=lambda h, rx=rx: abort_receive(manager, rx),
        )
        live[rid] = (rx, tokens, t0, t_plan)
        if rid0 in cfg.cancel:
            agent.cancel(rid, "cancelled by the experiment")

    def finish(rid: str) -> None:
        h: RecvHandle = agent.forget(rid)
        _debug(f"{rid} ended {h.state.value}")
        rx, tokens, t0, t_plan = live.pop(rid)
        t_end = clock()
        by_group: dict[str, int] = {}
        for job in h.jobs.values():
            for ch in job.chunks:
                for seg in ch.layout.segments:
                    by_group[seg.group] = by_group.get(seg.group, 0) + seg.nbytes
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
        first = h.t_first_data
        stats.append(
            _Stats(
                rid=rid,
                mode=mode,
                num_tokens=len(tokens),
                bytes_by_group=by_group,
                tokens_by_group={g: len(r) for g, r in rx.tokens.items()},
                no_reuse_bytes={g.name: g.bytes for g in none.groups},
                state=h.state.value,
                error=h.session.error,
                t_plan=t_plan,
                t_handshake=(first - h.session.created) if first else 0.0,
                t_data=((h.t_last_data or first) - first) if first else 0.0,
                t_total=t_end - t0,
                t_first_data=h.t_first_data,
                t_last_data=h.t_last_data,
                mismatches=mism,
            )
        )

    pending = list(range(len(convs)))
    while pending or live:
        while pending and len(live) < cfg.in_flight:
            issue(pending.pop(0))
        agent.progress(0.05)
        for rid in list(live):
            h = agent.handle(rid)
            if (
                rid.split("/", 1)[1] in cfg.cancel_during
                and h.bytes_received > 0
                and not h.session.is_terminal
            ):
                agent.cancel(rid, "cancelled by the experiment during the transfer")
            if h.settled:
                finish(rid)
                c = int(rid.split("/")[1].split("t")[0][1:])
                next_turn[c] += 1
                if next_turn[c] < cfg.turns:
                    pending.append(c)
    return stats


def _leaked(manager: KVCacheManager, spec: KVCacheSpec) -> dict[str, int]:
    return {
        g.name: sum(manager.refcount(g.name, b) > 0 for b in range(manager.num_blocks(g.name)))
        for g in spec.groups
        if g.is_attention
    }


def run_rank(
    cfg: DisaggConfig, rank: int, *, ctrl: Any, data: Any, device: str = "cpu"
) -> dict[str, Any] | None:
    """Run the experiment on this rank over ``ctrl`` (gloo) and ``data`` (gloo or NCCL)
    groups whose ranks are ``[0, cfg.world_size)``.

    Returns the report (a dict, see :func:`kvtriton.transfer.report.format_report`) on the
    first generation rank, ``None`` elsewhere. A dead peer does not hang the run: the report
    then holds what the surviving generation rank saw.
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
    )
    channel_name = "?"
    healthy = True
    for mode in cfg.modes:
        has_state = any(g.is_state for g in spec.groups)
        pools = allocate_pools(
            spec, nblocks, num_state_slots=nslots if has_state else 0, device=device, layout=layout
        )  # type: ignore[arg-type]
        manager = KVCacheManager(spec, pools=pools)
        _debug(f"{mode}: connecting")
        agent = connect(
            topo,
            rank,
            {**pools.kv, **pools.state},
            ctrl_group=ctrl,
            data_group=data,
            channel=cfg.channel,
            options=options,
            faults=cfg.faults.get(rank),
            timeout_s=max(60.0, cfg.timeout_s),
        )
        channel_name = agent.channel.name
        _debug(f"{mode}: agent up over {channel_name}")
        t0 = time.perf_counter()
        out: dict[str, Any]
        if info.side == "ctx":
            out = _run_ctx(agent, cfg, spec, pools, manager, mode)
            dist.barrier(group=ctrl)  # every source is registered before any receiver asks
            _debug(f"{mode}: prefilled, serving")
            agent.serve(timeout=cfg.timeout_s * (cfg.turns + 2))
        else:
            dist.barrier(group=ctrl)
            reqs = [asdict(st) for st in _run_gen(agent, cfg, spec, pools, manager, mode)]
            out = {"requests": reqs}
        _debug(f"{mode}: stream done, closing")
        agent.close(timeout=cfg.timeout_s)
        _debug(f"{mode}: closed")
        stats = agent.stats()
        out["stats"] = stats
        out["leaked"] = _leaked(manager, spec)
        out["cached"] = {
            g.name: manager.num_cached_blocks(g.name) for g in spec.groups if g.is_attention
        }
        out["lost_peers"] = stats["lost_peers"]
        out["wall_s"] = time.perf_counter() - t0
        results["modes"][mode] = out
        healthy = healthy and not out["lost_peers"]
        if healthy:
            dist.barrier(group=ctrl)
    _debug("gathering the results")
    reporter = topo.num_ctx
    if healthy:
        gathered = gather_json(results, reporter, ctrl)
    else:
        gathered = [results] if rank == reporter else None
    if gathered is None:
        return None
    where = device
    if device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(torch.device(device))} (one per rank)"
    return _summarise(cfg, topo_ctx, gathered, where, channel_name)


def _summarise(
    cfg: DisaggConfig, topo: Topology, per_rank: list[Any], device: str, channel: str
) -> dict[str, Any]:
    model = topo.model
    report: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("faults",)},
        "model": model.name,
        "topology": topo.describe(),
        "device": device,
        "channel": channel,
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
            m = r["modes"][mode]
            for g, n in m["leaked"].items():
                if n:
                    report["problems"].append(
                        f"rank {r['rank']} {mode}: {n} blocks of {g!r} "
                        f"still referenced after the stream"
                    )
            if r["side"] == "gen":
                reqs.extend(m["requests"])
        for q in reqs:
            for g, b in q["bytes_by_group"].items():
                groups[g]["bytes"] += b
            for g, b in q["no_reuse_bytes"].items():
                groups[g]["no_reuse_bytes"] += b
            if q["state"] != "TRANSFERRED":
                report["problems"].append(f"{q['rid']}: {q['state']} ({q['error']})")
            for mm in q["mismatches"]:
                report["problems"].append(f"{q['rid']}: {mm}")
        seen: set[str] = set()  # tokens per group: once per request (same on every receiver)
        for q in reqs:
            if q["rid"] in seen:
                continue
            seen.add(q["rid"])
            for g, n in q["tokens_by_group"].items():
                groups[g]["tokens"] += n
        data_s = sum(q["t_data"] for q in reqs)
        total = sum(g["bytes"] for g in groups.values())
        n = max(1, len(reqs))
        report["modes"][mode] = {
            "groups": groups,
            "requests": len(seen),
            "bytes": total,
            "no_reuse_bytes": sum(g["no_reuse_bytes"] for g in groups.values()),
            "t_plan_ms": 1e3 * sum(q["t_plan"] for q in reqs) / n,
            "t_handshake_ms": 1e3 * sum(q["t_handshake"] for q in reqs) / n,
            "t_data_ms": 1e3 * data_s / n,
            "t_total_ms": 1e3 * sum(q["t_total"] for q in reqs) / n,
            "gbps": (total / data_s / 1e9) if data_s > 0 else None,
            "wall_s": max(r["modes"][mode]["wall_s"] for r in per_rank),
        }
    report["verified"] = not report["problems"]
    report["ranks"] = per_rank  # raw per-rank results (stats, leaks, requests)
    return report


def _debug(msg: str) -> None:
    """``KVTRITON_DEBUG=1``: progress lines on stderr (rank, time)."""
    if os.environ.get("KVTRITON_DEBUG"):
        rank = os.environ.get("RANK", "?")
        print(f"[kvtriton rank {rank} {time.monotonic():.3f}] {msg}", file=sys.stderr, flush=True)
