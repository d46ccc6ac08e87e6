"""Ask -> committed latency of 1-block requests between two ranks (``kvtriton bench latency``).

A context rank and a generation rank are spawned on this machine (gloo on CPU; on a GPU box
the direct channel, both ranks sharing the GPU when there is one; ``--channel`` picks). The
context rank prefills ``--requests`` prompts of exactly one block with position-derived
values and registers them; then the generation rank asks for them one at a time, each
request moving exactly one block (its whole prompt; nothing cached), and times from the ask
to the commit (its ``on_commit`` ran and the session ended TRANSFERRED). After the clock
stops, every request is checked bit-exact against the position-derived values. Prints and
writes ``p50_us``, ``p99_us``, ``requests``, ``channel``, ``verified`` (true only if every
request was checked and matched) and the shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

__all__ = ["main", "measure"]

#: The shape of one request: one block of a small full-attention group (2 layers x K/V x
#: 4 heads x 64 dims, bf16 = 2 KiB per token; 16 tokens = 32 KiB), so the time is the
#: protocol's and not the copy's.
SHAPE = dict(layers=2, heads=4, head_dim=64, tokens_per_block=16, dtype="bfloat16")


def _spec() -> Any:
    from kvtriton.spec import KVCacheSpec, LayerGroup

    s = SHAPE
    group = LayerGroup(
        "full", "full", tuple(range(s["layers"])), num_kv_heads=s["heads"], head_dim=s["head_dim"]
    )
    return KVCacheSpec(
        (group,), tokens_per_block=s["tokens_per_block"], dtype=s["dtype"], name="latency-1block"
    )


def _rank(
    rank: int, port: int, requests: int, channel: str, ngpu: int, profile: str | None, conn: Any
) -> None:
    from kvtriton.transfer.launch import exit_worker

    if profile is None:
        _run_rank(rank, port, requests, channel, ngpu, conn)
        exit_worker(conn)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        _run_rank(rank, port, requests, channel, ngpu, conn)
    finally:  # a rank that exits through exit_worker still writes its profile
        prof.disable()
        os.makedirs(profile, exist_ok=True)
        prof.dump_stats(os.path.join(profile, f"rank{rank}.pstats"))
        with open(os.path.join(profile, f"rank{rank}.txt"), "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)
    exit_worker(conn)


def _run_rank(rank: int, port: int, requests: int, channel: str, ngpu: int, conn: Any) -> None:
    import time

    import torch
    import torch.distributed as dist

    from kvtriton.adapter import complete_receive, prepare_receive, source_target
    from kvtriton.cache import KVCacheManager, allocate_pools
    from kvtriton.transfer.config import TransferOptions
    from kvtriton.transfer.launch import (
        connect,
        init_spawned,
        make_groups,
        send_result,
    )
    from kvtriton.transfer.protocol import prompt_digest
    from kvtriton.transfer.session import SessionState
    from kvtriton.transfer.topology import Topology
    from kvtriton.transfer.values import prefill, verify

    dev = init_spawned(rank, 2, port, ngpu)
    ctrl, data = make_groups(2, "nccl" if channel == "nccl" else "gloo")
    topo = Topology(_spec())
    spec = topo.spec(rank)
    bsz = spec.tokens_per_block
    pools = allocate_pools(spec, requests + 8, device=dev)
    manager = KVCacheManager(spec, pools=pools)
    agent = connect(
        topo,
        rank,
        dict(pools.kv),
        ctrl_group=ctrl,
        data_group=data,
        channel=channel,
        options=TransferOptions(timeout_s=30.0),
    )
    prompts = [[(i * 7919 + j) % 50_000 + 1 for j in range(bsz)] for i in range(requests)]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    out: dict[str, Any] = {}
    if rank == 0:
        for i, tokens in enumerate(prompts):
            rid = f"r{i}"
            alloc = manager.allocate(rid, tokens, prefill=True)
            prefill(spec, pools, dict(alloc.spans), {}, tokens, "auto")
            manager.commit(rid, len(tokens))
            agent.register_source(
                source_target(manager, rid),
                prompt_digest=prompt_digest(tokens),
                on_release=lambda r, _s: manager.free(r),
            )
        sync()
        dist.barrier(group=ctrl)
        agent.serve(timeout=600)
    else:
        dist.barrier(group=ctrl)
        times, plans, ok = [], [], 0
        for i, tokens in enumerate(prompts):
            rid = f"r{i}"
            rx = prepare_receive(manager, rid, tokens)
            t0 = time.perf_counter()
            h = agent.request(
                rx.target,
                prompt_digest=prompt_digest(tokens),
                on_commit=lambda h, rx=rx: complete_receive(manager, rx),
            )
            agent.wait([rid], timeout=60)
            times.append(time.perf_counter() - t0)
            if h.state is SessionState.TRANSFERRED:
                plans.append((rx, tokens))
            agent.forget(rid)
        for rx, tokens in plans:  # after the clock: every request bit-exact
            if not verify(spec, pools, dict(rx.spans), {}, tokens, "auto"):
                ok += 1
            manager.free(rx.request_id)
        us = sorted(t * 1e6 for t in times)
        out = {
            "p50_us": statistics.median(us),
            "p99_us": us[min(len(us) - 1, round(0.99 * (len(us) - 1)))],
            "mean_us": statistics.fmean(us),
            "requests": requests,
            "transferred": len(plans),
            "channel": agent.channel.name,
            "verified": ok == requests,
            "device": torch.cuda.get_device_name(torch.device(dev)) if ngpu else "cpu",
            "ranks_per_gpu": 2 // ngpu if ngpu else 0,
            "bytes_per_request": spec.bytes_per_block("full"),
            "shape": SHAPE,
        }
    agent.close(timeout=10)
    if rank == 1:
        send_result(conn, out)


def measure(
    requests: int = 200, channel: str = "auto", profile: str | None = None
) -> dict[str, Any]:
    """Spawn the two ranks, run ``requests`` 1-block requests one at a time over
    ``channel`` (``auto``: the direct channel on GPUs, gloo on CPU), return the result (see
    the module docstring). ``profile``: a folder where each rank writes its cProfile
    (``rank{r}.pstats`` and the top functions as text)."""
    from kvtriton.transfer.launch import gpus_for, spawn_for_result

    ngpu = gpus_for(channel, 2)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    result, codes = spawn_for_result(
        _rank,
        2,
        lambda rank, port, conn: (rank, port, requests, channel, ngpu, profile, conn),
        300.0,
    )
    if result is None:
        raise RuntimeError(f"the latency benchmark produced no result (exit codes {codes})")
    return result  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtriton bench latency", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200, help="1-block requests (default 200)")
    p.add_argument(
        "--channel",
        choices=("auto", "gloo", "nccl", "ipc"),
        default="auto",
        help="auto: the direct channel (ipc) when a GPU is visible (the two ranks may share "
        "it), gloo on CPU otherwise; nccl needs two GPUs",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="write each rank's cProfile here (rank{r}.pstats, rank{r}.txt)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result here")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 100_000:
        p.error(f"--requests must be in [1, 100000], got {args.requests}")
    try:
        r = measure(args.requests, args.channel, args.profile)
    except ValueError as exc:
        print(f"kvtriton bench latency: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"ask -> committed, {r['requests']} requests of one block ({r['bytes_per_request']} B) "
        f"one at a time over the {r['channel']} channel on {r['device']}: p50 "
        f"{r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, mean {r['mean_us']:.0f} us; "
        f"verified: {str(r['verified']).lower()}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
