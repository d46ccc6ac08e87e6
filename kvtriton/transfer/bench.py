"""Transfer benchmark: kvtriton end to end (gather + send + recv + scatter) next to raw
NCCL send/recv of the same bytes, in the same run (``scripts/bench_transfer.py``).

Two ranks under torchrun: rank 0 is a context rank (sender), rank 1 a generation rank
(receiver), one GPU each, NCCL data and gloo control. The model is a llama-3-8b-shaped single
full-attention group (32 layers x 8 kv heads x 128, bf16: 128 KiB per token) over paged pools
with shuffled block ids. For each size (16 MiB .. 1 GiB of KV):

* ``raw``: ``K`` back-to-back ``dist.send``/``recv`` of one contiguous tensor of the size;
* ``e2e x1``: one request at a time through :class:`TransferAgent` (receiver asks, sender
  gathers chunks, NCCL moves them, receiver scatters): wall time from the ask until the
  receiver's last scatter finished, handshake over gloo included;
* ``e2e xK``: ``K`` requests in flight at once (the serving case), same bytes as ``raw``;
* ``gather`` / ``scatter``: the pack / unpack kernels alone (CUDA events).

GB/s = payload bytes / seconds (each byte counted once). ``--chunk-sweep`` times ``e2e xK``
for several chunk sizes (what ``chunking.DEFAULT_CHUNK_BYTES`` was picked from). The receiver's
last request of each size is checked bit-exact against the raw NCCL copy of the same bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

__all__ = ["main"]

MiB = 1 << 20


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mib", default="16,64,256,1024")
    p.add_argument(
        "--chunk-mib",
        type=int,
        default=None,
        help="chunk size (default chunking.DEFAULT_CHUNK_BYTES)",
    )
    p.add_argument(
        "--chunk-sweep",
        default="16,64,128,256",
        help="chunk sizes (MiB) to sweep for e2e xK; empty to skip",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--in-flight-bytes-mib",
        type=int,
        default=2048,
        help="bytes kept in flight for e2e xK (K = this / size, at most 16)",
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--cpu", action="store_true", help="smoke test on CPU tensors over gloo (no GPU needed)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import torch
    import torch.distributed as dist

    from kvtriton import kernels
    from kvtriton.cache import allocate_pools
    from kvtriton.ranges import BlockSpan, TokenRange
    from kvtriton.spec import preset
    from kvtriton.transfer.chunking import DEFAULT_CHUNK_BYTES, plan_chunks
    from kvtriton.transfer.config import TransferOptions
    from kvtriton.transfer.topology import Topology
    from kvtriton.transfer.transport import TransferAgent

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != 2:
        print("bench_transfer needs exactly 2 ranks (torchrun --nproc-per-node 2)", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", rank))
    if args.cpu:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
        backend = "gloo"
    else:
        torch.cuda.set_device(local)
        dev = torch.device(f"cuda:{local}")
        dist.init_process_group("cpu:gloo,cuda:nccl")  # lazy: p2p gets 2-rank comms
        backend = "nccl"
    sync_dev = torch.cuda.synchronize if not args.cpu else (lambda: None)
    sys.setswitchinterval(0.0002)
    tmo = datetime.timedelta(seconds=300)
    ctrl = dist.new_group(backend="gloo", timeout=tmo)
    data = dist.new_group(backend=backend, timeout=tmo)
    sync = dist.new_group(backend="gloo", timeout=tmo)
    raw_pg = dist.new_group(backend=backend, timeout=tmo)

    model = preset("llama-3-8b")
    topo = Topology(model, 1, 1, 1, 1)
    spec = topo.spec(rank)
    group = spec.groups[0]
    bpt = spec.bytes_per_token(group)
    bsz = spec.tokens_per_block
    sizes = [int(x) * MiB for x in args.sizes_mib.split(",") if x]
    max_tokens = max(sizes) // bpt
    per_block = bpt * bsz
    inflight_bytes = args.in_flight_bytes_mib * MiB
    nblocks = (
        max(max_tokens // bsz + 1, inflight_bytes // per_block + 1)
        if rank == 1
        else max_tokens // bsz + 1
    )
    recv_blocks = max(max_tokens // bsz + 1, inflight_bytes // per_block + 1)
    pools = allocate_pools(spec, nblocks, device=dev)
    pool = pools.kv[group.name]
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    perm = torch.randperm(nblocks, generator=gen).tolist()
    if rank == 0:
        flat = pool.view(-1) if pool.is_contiguous() else None
        assert flat is not None
        flat.copy_((torch.arange(flat.numel(), device=dev) % 251 - 125).to(flat.dtype))

    chunk_default = (args.chunk_mib * MiB) if args.chunk_mib else DEFAULT_CHUNK_BYTES
    results: list[dict[str, Any]] = []
    counter = [0]

    def barrier() -> None:
        dist.barrier(group=sync)

    def raw(nbytes: int, k: int) -> tuple[float, torch.Tensor | None]:
        """Seconds for k back-to-back sends of nbytes (receiver's wall clock)."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        if rank == 0:
            tokens = nbytes // bpt
            kernels.gather(
                pool, BlockSpan(0, perm[: -(-tokens // bsz)]), TokenRange(0, tokens), out=None
            )  # warm the kernel
            packed = kernels.gather(
                pool, BlockSpan(0, perm[: -(-tokens // bsz)]), TokenRange(0, tokens)
            )
            buf.copy_(packed.reshape(-1).view(torch.uint8))
        sync_dev()
        for _ in range(2):  # warm-up
            (dist.send if rank == 0 else dist.recv)(buf, 1 - rank, group=raw_pg)
        sync_dev()
        barrier()
        t0 = time.perf_counter()
        for _ in range(k):
            (dist.send if rank == 0 else dist.recv)(buf, 1 - rank, group=raw_pg)
        sync_dev()
        t = time.perf_counter() - t0
        return t, (buf.clone() if rank == 1 else None)

    def e2e(
        nbytes: int, k: int, chunk_bytes: int, prepost: bool = False
    ) -> tuple[float, dict[str, float]]:
        """Seconds for k requests of nbytes in flight at once, through the agent."""
        tokens = nbytes // bpt
        nb = -(-tokens // bsz)
        opts = TransferOptions(
            chunk_bytes=chunk_bytes,
            timeout_s=120.0,
            checksum=False,
            staging_slots=3,
            prepost=prepost,
        )
        agent = TransferAgent(topo, rank, {group.name: pool}, ctrl, data, opts)
        rids = []
        for _ in range(k):
            counter[0] += 1
            rids.append(f"b{counter[0]}")
        if rank == 0:
            src = BlockSpan(0, perm[:nb])
            for rid in rids:
                agent.register_source(rid, tokens, {group.name: src})
        barrier()
        t0 = time.perf_counter()
        if rank == 1:
            for i, rid in enumerate(rids):
                dst = BlockSpan(0, [perm[(i * nb + j) % nblocks] for j in range(nb)])
                agent.request(
                    rid, tokens, {group.name: TokenRange(0, tokens)}, (), {group.name: dst}
                )
            ok = agent.wait(rids, timeout=120)
            t = time.perf_counter() - t0
            states = {agent.handle(r).state.value for r in rids}
            if not ok or states != {"TRANSFERRED"}:
                raise RuntimeError(
                    f"e2e transfer failed: {states} {[agent.handle(r).session.error for r in rids]}"
                )
            firsts = [agent.handle(r).t_first_data for r in rids]
            lasts = [agent.handle(r).t_last_data for r in rids]
            data_s = max(lasts) - min(firsts)  # type: ignore[type-var,operator]
        else:
            agent.serve(
                until=lambda: (
                    all(s.is_terminal for r in rids for s in agent.send_sessions(r).values())
                    and len([1 for r in rids if agent.send_sessions(r)]) == k
                ),
                timeout=120,
            )
            t = time.perf_counter() - t0
            data_s = float("nan")
        agent.close()
        stats = dict(agent.stats)
        stats["data_s"] = data_s
        barrier()
        return t, stats

    def kernel_only(nbytes: int) -> tuple[float, float]:
        tokens = nbytes // bpt
        span = BlockSpan(0, perm[: -(-tokens // bsz)])
        rng = TokenRange(0, tokens)
        out = kernels.gather(pool, span, rng)
        for _ in range(2):
            kernels.gather(pool, span, rng, out=out)
            kernels.scatter(out, pool, span, rng)
        sync_dev()
        t0 = time.perf_counter()
        for _ in range(5):
            kernels.gather(pool, span, rng, out=out)
        sync_dev()
        t1 = time.perf_counter()
        for _ in range(5):
            kernels.scatter(out, pool, span, rng)
        sync_dev()
        t2 = time.perf_counter()
        return (t1 - t0) / 5, (t2 - t1) / 5

    name = "cpu" if args.cpu else torch.cuda.get_device_name(dev)

    def in_flight(nbytes: int) -> int:
        """Requests in flight: distinct destination blocks on the receiver for each."""
        nb = -(-(nbytes // bpt) // bsz)
        return max(1, min(16, inflight_bytes // nbytes, recv_blocks // nb))

    for nbytes in sizes:
        k = in_flight(nbytes)
        t_raw1 = min(raw(nbytes, 1)[0] for _ in range(args.reps))
        t_rawk, ref = raw(nbytes, k)
        for _ in range(args.reps - 1):
            t_rawk = min(t_rawk, raw(nbytes, k)[0])
        runs1 = [e2e(nbytes, 1, chunk_default) for _ in range(args.reps)]
        runsk = [e2e(nbytes, k, chunk_default) for _ in range(args.reps)]
        t_e1 = min(r[0] for r in runs1)
        t_ek = min(r[0] for r in runsk)
        d_e1 = min(r[1]["data_s"] for r in runs1)
        d_ek = min(r[1]["data_s"] for r in runsk)
        t_p1 = min(e2e(nbytes, 1, chunk_default, True)[0] for _ in range(args.reps))
        t_pk = min(e2e(nbytes, k, chunk_default, True)[0] for _ in range(args.reps))
        # bit-exact check of the last received request against the raw copy
        if rank == 1 and ref is not None:
            tokens = nbytes // bpt
            nb = -(-tokens // bsz)
            i = k - 1
            dst = BlockSpan(0, [perm[(i * nb + j) % nblocks] for j in range(nb)])
            got = kernels.gather(pool, dst, TokenRange(0, tokens)).reshape(-1).view(torch.uint8)
            exact = bool(torch.equal(got, ref))
        else:
            exact = None
        g_s, s_s = kernel_only(nbytes)
        row = {
            "size_mib": nbytes // MiB,
            "k": k,
            "chunk_mib": chunk_default / MiB,
            "raw_1_gbps": nbytes / t_raw1 / 1e9,
            "raw_k_gbps": k * nbytes / t_rawk / 1e9,
            "e2e_1_gbps": nbytes / t_e1 / 1e9,
            "e2e_k_gbps": k * nbytes / t_ek / 1e9,
            "prepost_1_gbps": nbytes / t_p1 / 1e9,
            "prepost_k_gbps": k * nbytes / t_pk / 1e9,
            "data_1_gbps": nbytes / d_e1 / 1e9 if d_e1 > 0 else None,
            "data_k_gbps": k * nbytes / d_ek / 1e9 if d_ek > 0 else None,
            "gather_gbps": nbytes / g_s / 1e9,
            "scatter_gbps": nbytes / s_s / 1e9,
            "bit_exact": exact,
        }
        row["e2e_1_vs_raw_1"] = row["e2e_1_gbps"] / row["raw_1_gbps"]
        row["e2e_k_vs_raw_k"] = row["e2e_k_gbps"] / row["raw_k_gbps"]
        results.append(row)
    sweep: list[dict[str, Any]] = []
    for c in [int(x) for x in args.chunk_sweep.split(",") if x]:
        for nbytes in (sizes[0], sizes[-1]):
            k = in_flight(nbytes)
            t = min(e2e(nbytes, k, c * MiB)[0] for _ in range(max(1, args.reps - 1)))
            t1 = min(e2e(nbytes, 1, c * MiB)[0] for _ in range(max(1, args.reps - 1)))
            sweep.append(
                {
                    "chunk_mib": c,
                    "size_mib": nbytes // MiB,
                    "k": k,
                    "e2e_k_gbps": k * nbytes / t / 1e9,
                    "e2e_1_gbps": nbytes / t1 / 1e9,
                }
            )
    if rank == 1:
        out = {
            "device": name,
            "torch": torch.__version__,
            "model": "llama-3-8b (128 KiB/token)",
            "results": results,
            "chunk_sweep": sweep,
            "chunks_at_max": len(
                plan_chunks(
                    model,
                    {group.name: TokenRange(0, max(sizes) // bpt)},
                    [],
                    layers={},
                    heads={},
                    chunk_bytes=chunk_default,
                )
            ),
        }
        print(f"device: {name} x2 ({backend} data, gloo control), torch {torch.__version__}")
        print(
            f"{'size':>8} {'K':>3} {'raw x1':>8} {'e2e x1':>8} {'%':>5} {'pp x1':>8} "
            f"{'data x1':>8} {'raw xK':>8} {'e2e xK':>8} {'%':>5} {'pp xK':>8} "
            f"{'data xK':>8} {'gather':>8} {'scatter':>8} exact"
        )

        def f(x: float | None) -> str:
            return f"{x:>8.1f}" if x is not None else f"{'-':>8}"

        for r in results:
            print(
                f"{r['size_mib']:>5}MiB {r['k']:>3} {f(r['raw_1_gbps'])} "
                f"{f(r['e2e_1_gbps'])} {100 * r['e2e_1_vs_raw_1']:>4.0f}% "
                f"{f(r['prepost_1_gbps'])} {f(r['data_1_gbps'])} {f(r['raw_k_gbps'])} "
                f"{f(r['e2e_k_gbps'])} {100 * r['e2e_k_vs_raw_k']:>4.0f}% "
                f"{f(r['prepost_k_gbps'])} {f(r['data_k_gbps'])} "
                f"{f(r['gather_gbps'])} {f(r['scatter_gbps'])} {r['bit_exact']}"
            )
        print(
            "e2e: ask -> last scatter done (gloo handshake included); pp: the same with "
            "pre-posted receives; data: first receive posted -> last scatter done"
        )
        print("GB/s = payload bytes / s. chunk sweep (e2e GB/s):")
        for s in sweep:
            print(
                f"  chunk {s['chunk_mib']:>4} MiB, {s['size_mib']:>5} MiB x{s['k']}: "
                f"{s['e2e_k_gbps']:.1f} (x1 {s['e2e_1_gbps']:.1f})"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
