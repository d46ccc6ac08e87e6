"""Transfer benchmark: kvtriton end to end (ask -> committed) next to the baselines of the
same run (``kvtriton bench transfer``, ``scripts/bench_transfer.py``).

Two ranks, a context rank 0 and a generation rank 1: spawned here, or one per process under
torchrun. The model is a llama-3-8b-shaped full-attention group (32 layers x 8 kv heads x
128, bf16: 128 KiB per token) over paged pools with shuffled block ids on both sides
(NHD sender, HND receiver: every transfer is also a layout conversion). For each size (16
MiB .. 1 GiB of KV) and channel:

* ``copy``: ``dst.copy_(src)`` of one contiguous tensor of the same bytes on the receiver's
  GPU (one GPU: the device-copy limit; counted as payload bytes per second, each byte once);
* ``peer``: ``copy_`` of the same bytes from the sender's GPU to the receiver's (two GPUs);
* ``raw``: NCCL ``send``/``recv`` of one contiguous tensor of the same bytes (two GPUs);
* ``e2e x1``: one request at a time through the agents: from the ask until the receiver
  committed it (every chunk landed, its session TRANSFERRED); ``e2e xK``: K requests in
  flight at once, from the first ask to the last commit.

GB/s = payload bytes / seconds (each byte once). Every request is checked bit-exact against
the sender's position-derived values after the clock stopped; a row says ``exact`` only
if all were.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

__all__ = ["main"]

MiB = 1 << 20


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvtriton bench transfer", description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mib", default="16,64,256,1024", help="request sizes (MiB)")
    p.add_argument(
        "--channel",
        choices=("auto", "nccl", "ipc"),
        default="auto",
        help="auto: the direct channel on one host (default), nccl otherwise",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median)")
    p.add_argument(
        "--in-flight-mib",
        type=int,
        default=1024,
        help="bytes in flight for e2e xK (K = this / size, 2..16)",
    )
    p.add_argument(
        "--chunk-mib",
        type=int,
        default=None,
        help="chunk size (default chunking.DEFAULT_CHUNK_BYTES)",
    )
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def _rank(rank: int, port: int, args: argparse.Namespace, ngpu: int, conn: Any) -> None:
    import traceback

    from kvtriton.transfer.launch import exit_worker, init_spawned, send_result

    init_spawned(rank, 2, port, ngpu)
    try:
        out = _run(rank, args)
    except BaseException:
        send_result(conn, {"error": f"rank {rank}: {traceback.format_exc()}"})
        exit_worker(conn, 1)
    if rank == 1:
        send_result(conn, out)
    exit_worker(conn)


def _run(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from kvtriton.adapter import complete_receive, prepare_receive, source_target
    from kvtriton.cache import KVCacheManager, allocate_pools
    from kvtriton.spec import preset
    from kvtriton.transfer.chunking import DEFAULT_CHUNK_BYTES
    from kvtriton.transfer.config import TransferOptions
    from kvtriton.transfer.launch import connect, make_groups
    from kvtriton.transfer.protocol import prompt_digest
    from kvtriton.transfer.session import SessionState
    from kvtriton.transfer.topology import Topology
    from kvtriton.transfer.values import prefill, verify

    dev = torch.device("cuda", torch.cuda.current_device())
    two_gpus = torch.cuda.device_count() >= 2
    ctrl, data = make_groups(2, "nccl" if args.channel == "nccl" else "gloo", 600.0)
    raw_pg = dist.new_group([0, 1], backend="nccl") if two_gpus else None
    spec = preset("llama-3-8b")
    topo = Topology(spec)
    bpt = spec.bytes_per_token("full")
    bsz = spec.tokens_per_block
    sizes = [int(x) * MiB for x in args.sizes_mib.split(",") if x]
    inflight = args.in_flight_mib * MiB

    def k_for(nbytes: int) -> int:
        return max(2, min(16, inflight // nbytes))

    need = max(k_for(n) * n for n in sizes)
    nblocks = need // (bpt * bsz) + 256  # + what the scrambling below keeps allocated
    pools = allocate_pools(spec, nblocks, device=dev, layout="NHD" if rank == 0 else "HND")
    manager = KVCacheManager(spec, pools=pools)
    options = TransferOptions(
        timeout_s=300.0,
        lease_s=600.0,
        chunk_bytes=(args.chunk_mib or DEFAULT_CHUNK_BYTES // MiB) * MiB,
    )
    agent = connect(
        topo,
        rank,
        dict(pools.kv),
        ctrl_group=ctrl,
        data_group=data,
        channel=args.channel,
        options=options,
        timeout_s=120.0,
    )
    # shuffle the free list: requests land on scattered blocks on both sides
    g = torch.Generator().manual_seed(1234 + rank)
    scramble = [f"s{i}" for i in range(128)]
    for i, rid in enumerate(scramble):
        manager.allocate(
            rid, [i + 1] * (1 + int(torch.randint(0, 3 * bsz, (1,), generator=g))), prefill=True
        )
    for rid in scramble[::2]:
        manager.free(rid)
    counter = [0]
    released: set[str] = set()

    def prompts(nbytes: int, k: int) -> list[tuple[str, list[int]]]:
        tokens = nbytes // bpt
        out = []
        for _ in range(k):
            counter[0] += 1
            c = counter[0]
            out.append((f"b{c}", [(c * 7919 + j * 31) % 50_000 + 1 for j in range(tokens)]))
        return out

    def e2e(nbytes: int, k: int) -> tuple[float, bool]:
        """Seconds from the first ask to the last commit of ``k`` requests of ``nbytes``
        (generation rank; the context rank returns 0) and whether all were exact."""
        reqs = prompts(nbytes, k)
        if rank == 0:
            for rid, tokens in reqs:
                alloc = manager.allocate(rid, tokens, prefill=True)
                prefill(spec, pools, dict(alloc.spans), {}, tokens, "auto")
                agent.register_source(
                    source_target(manager, rid),
                    prompt_digest=prompt_digest(tokens),
                    on_release=lambda r, _s: released.add(r),
                )
            torch.cuda.synchronize()
        dist.barrier(group=ctrl)
        if rank == 0:
            agent.serve(until=lambda: all(r in released for r, _ in reqs), timeout=600)
            for rid, _ in reqs:
                manager.free(rid)
            dist.barrier(group=ctrl)
            return 0.0, True
        plans = [(prepare_receive(manager, rid, tokens), tokens) for rid, tokens in reqs]
        t0 = time.perf_counter()
        handles = [
            agent.request(
                rx.target,
                prompt_digest=prompt_digest(tokens),
                on_commit=lambda h, rx=rx: complete_receive(manager, rx),
            )
            for rx, tokens in plans
        ]
        agent.wait([h.request_id for h in handles], timeout=600)
        t = time.perf_counter() - t0
        exact = all(h.state is SessionState.TRANSFERRED for h in handles)
        for h, (rx, tokens) in zip(handles, plans, strict=True):
            agent.forget(h.request_id)
            exact = exact and not verify(spec, pools, dict(rx.spans), {}, tokens, "auto")
            manager.free(rx.request_id)
            manager.evict()
        dist.barrier(group=ctrl)
        return t, exact

    def timed(fn: Any) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def baselines(nbytes: int) -> dict[str, float | None]:
        a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        b = torch.empty_like(a)
        out: dict[str, float | None] = {"copy": None, "peer": None, "raw": None}
        if rank == 1:
            b.copy_(a)
            out["copy"] = statistics.median(timed(lambda: b.copy_(a)) for _ in range(args.reps))
        if two_gpus:
            other = torch.device("cuda", 1 - dev.index)
            remote = torch.empty(nbytes, dtype=torch.uint8, device=other)
            if rank == 1:
                b.copy_(remote)
                out["peer"] = statistics.median(
                    timed(lambda: b.copy_(remote)) for _ in range(args.reps)
                )
            del remote
            dist.barrier(group=ctrl)
            op = dist.send if rank == 0 else dist.recv

            def once() -> None:
                op(a, 1 - rank, group=raw_pg)

            once()
            ts = []
            for _ in range(args.reps):
                dist.barrier(group=ctrl)
                ts.append(timed(once))
            out["raw"] = statistics.median(ts)
        dist.barrier(group=ctrl)
        return out

    rows = []
    e2e(sizes[0], 1)  # warm-up: compiles the kernels, maps nothing new
    for nbytes in sizes:
        k = k_for(nbytes)
        base = baselines(nbytes)
        t1, ok1 = zip(*(e2e(nbytes, 1) for _ in range(args.reps)), strict=True)
        tk, okk = zip(*(e2e(nbytes, k) for _ in range(max(1, args.reps // 2))), strict=True)
        if rank == 1:
            e1, ek = statistics.median(t1), statistics.median(tk)

            def gbps(t: float | None, n: int = 1, size: int = nbytes) -> float | None:
                return n * size / t / 1e9 if t else None

            row = {
                "size_mib": nbytes // MiB,
                "k": k,
                "copy_gbps": gbps(base["copy"]),
                "peer_gbps": gbps(base["peer"]),
                "raw_gbps": gbps(base["raw"]),
                "e2e_1_gbps": gbps(e1),
                "e2e_k_gbps": gbps(ek, k),
                "e2e_1_ms": 1e3 * e1,
                "exact": all(ok1) and all(okk),
            }
            ref = "copy_gbps" if base["raw"] is None else "raw_gbps"
            row["e2e_1_vs"] = row["e2e_1_gbps"] / row[ref]  # type: ignore[operator]
            row["e2e_k_vs"] = row["e2e_k_gbps"] / row[ref]  # type: ignore[operator]
            if base["peer"]:
                row["e2e_1_vs_peer"] = row["e2e_1_gbps"] / row["peer_gbps"]  # type: ignore[operator]
            rows.append(row)
    agent.close(timeout=30)
    out = {}
    if rank == 1:
        out = {
            "device": torch.cuda.get_device_name(dev),
            "gpus": torch.cuda.device_count(),
            "channel": agent.channel.name,
            "torch": torch.__version__,
            "model": "llama-3-8b full attention (128 KiB/token), NHD -> HND",
            "chunk_mib": options.chunk_bytes / MiB,
            "baseline": "raw NCCL send/recv" if two_gpus else "contiguous copy_ on the GPU",
            "rows": rows,
        }
    return out


def _print(r: dict[str, Any]) -> None:
    print(
        f"kvtriton transfer over the {r['channel']} channel, {r['gpus']} x {r['device']}, "
        f"torch {r['torch']}; {r['model']}; chunks {r['chunk_mib']:.0f} MiB"
    )
    print(
        f"{'size':>8} {'K':>3} {'copy':>8} {'peer':>8} {'raw':>8} {'e2e x1':>8} {'% base':>7} "
        f"{'e2e xK':>8} {'% base':>7} exact"
    )

    def f(x: float | None) -> str:
        return f"{x:>8.1f}" if x is not None else f"{'-':>8}"

    for row in r["rows"]:
        print(
            f"{row['size_mib']:>5}MiB {row['k']:>3} {f(row['copy_gbps'])} {f(row['peer_gbps'])} "
            f"{f(row['raw_gbps'])} {f(row['e2e_1_gbps'])} {100 * row['e2e_1_vs']:>6.1f}% "
            f"{f(row['e2e_k_gbps'])} {100 * row['e2e_k_vs']:>6.1f}% {row['exact']}"
        )
    print(
        f"GB/s = payload bytes / s; % base = e2e against {r['baseline']} of the same bytes, "
        f"same run; e2e = ask -> committed"
    )


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import torch

    if not torch.cuda.is_available():
        print(
            "kvtriton bench transfer: needs a CUDA GPU (the direct channel, or NCCL across two "
            "GPUs); for the CPU protocol path run `kvtriton bench latency`",
            file=sys.stderr,
        )
        return 2
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl")
        result = _run(rank, args)
        dist.destroy_process_group()
        if rank != 1:
            return 0
    else:
        from kvtriton.transfer.launch import gpus_for, spawn_for_result

        try:
            ngpu = max(1, gpus_for(args.channel, 2))
        except ValueError as exc:
            print(f"kvtriton bench transfer: {exc}", file=sys.stderr)
            return 2
        result, codes = spawn_for_result(
            _rank, 2, lambda rank, port, conn: (rank, port, args, ngpu, conn), 3600.0
        )
        if result is None or "error" in result:
            why = result["error"] if result else f"no result (exit codes {codes})"
            print(f"kvtriton bench transfer: {why}", file=sys.stderr)
            return 1
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if all(r["exact"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
