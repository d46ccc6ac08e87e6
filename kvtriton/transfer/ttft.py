"""Time to first token with and without layer-wise streaming (``kvtriton bench ttft``).

A context rank and a generation rank are spawned on this machine (the direct channel on a
GPU, both ranks sharing it when there is one; gloo on CPU). For each reuse policy and each
mode, ``--reps`` requests run one at a time:

* the context rank "prefills" layer by layer: a compute step of ``--layer-ms`` (on a GPU,
  matrix products calibrated to that time, enqueued without a host wait; on CPU, that much
  time spent serving the agent), then that layer's position-derived KV is written;
* **streamed**: the source is registered before the prefill starts and each layer is marked
  ready as it is written (on CUDA an event the receiver's copy waits for on the device), so
  a layer's chunks move while the next layer computes; the receiver asks layer-major chunks;
* **not streamed**: the source is registered once the whole prefill is written;
* the generation rank asks as soon as the context rank says the source exists, and the clock
  stops when every needed position is committed: TTFT = prefill start -> committed.

Policies: ``per_group`` and ``single_boundary`` (the receiver holds an earlier turn of the
conversation, its sliding pages evicted) and ``no_reuse`` (a cold receiver). Every request is
checked bit-exact after the clock stopped. The report holds, per policy: bytes moved, prefill
time, TTFT without and with streaming, the time saved, the share of the transfer hidden
behind compute, and a per-layer timeline (compute done / chunk landed) for the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TtftConfig", "format_ttft", "main", "measure"]

POLICIES = ("per_group", "single_boundary", "no_reuse")


@dataclass(frozen=True)
class TtftConfig:
    """One TTFT experiment (see the module docstring).

    Attributes:
        model: a preset name.
        prompt_tokens: ``P`` of the timed request.
        history_tokens: tokens of the earlier turn the receiver holds (reuse policies).
        layer_ms: compute time per layer of the synthetic prefill (milliseconds).
        reps: timed requests per policy and mode (medians are reported).
        channel: the data channel (``auto``: direct on a GPU, gloo on CPU).
        device: ``auto`` (CUDA when visible), ``cpu`` or ``cuda``.
    """

    model: str = "gpt-oss-20b"
    prompt_tokens: int = 4096
    history_tokens: int = 3072
    layer_ms: float = 3.0
    reps: int = 3
    channel: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.prompt_tokens <= 1 << 20:
            raise ValueError(f"prompt_tokens must be in [1, 2**20], got {self.prompt_tokens}")
        if not 0 <= self.history_tokens < self.prompt_tokens:
            raise ValueError("history_tokens must be in [0, prompt_tokens)")
        if not 0 <= self.layer_ms <= 1000:
            raise ValueError(f"layer_ms must be in [0, 1000], got {self.layer_ms}")
        if not 1 <= self.reps <= 100:
            raise ValueError(f"reps must be in [1, 100], got {self.reps}")


class _Compute:
    """A calibrated per-layer compute step: matrix products on a GPU, agent progress on CPU."""

    def __init__(self, device: Any, layer_ms: float) -> None:
        import torch

        self.device = device
        self.layer_ms = layer_ms
        self.n = 0
        if device.type == "cuda" and layer_ms > 0:
            self.a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
            self.b = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
            for _ in range(3):
                self.a @ self.b
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                self.a @ self.b
            torch.cuda.synchronize()
            per = (time.perf_counter() - t0) / 50
            self.n = max(1, round(layer_ms / 1e3 / per))

    def layer(self, agent: Any) -> None:
        if self.device.type == "cuda":
            for _ in range(self.n):
                self.a @ self.b
            agent.progress(0.0)
        else:  # spend the time serving the agent, as a transfer engine beside compute would
            end = time.perf_counter() + self.layer_ms / 1e3
            while (left := end - time.perf_counter()) > 0:
                agent.progress(min(left, 0.002))


def _rank(rank: int, port: int, cfg: TtftConfig, ngpu: int, conn: Any) -> None:
    import traceback

    import torch

    from kvtriton.transfer.launch import exit_worker, init_spawned, send_result

    dev = torch.device(init_spawned(rank, 2, port, ngpu))
    try:
        _experiment(rank, cfg, dev, conn)
    except BaseException:
        send_result(conn, {"error": f"rank {rank}: {traceback.format_exc()}"})
        exit_worker(conn, 1)


def _experiment(rank: int, cfg: TtftConfig, dev: Any, conn: Any) -> None:
    import torch
    import torch.distributed as dist

    from kvtriton.adapter import abort_receive, complete_receive, prepare_receive, source_target
    from kvtriton.cache import KVCacheManager, allocate_pools
    from kvtriton.spec import preset
    from kvtriton.transfer.config import TransferOptions
    from kvtriton.transfer.launch import connect, exit_worker, gather_json, make_groups, send_result
    from kvtriton.transfer.protocol import prompt_digest
    from kvtriton.transfer.session import SessionState
    from kvtriton.transfer.topology import Topology
    from kvtriton.transfer.values import prefill, verify

    ctrl, data = make_groups(2, "gloo", 600.0)
    spec = preset(cfg.model)
    topo = Topology(spec)
    bsz = spec.tokens_per_block
    per_req = -(-(cfg.prompt_tokens + bsz) // bsz)
    slots = 8 if any(g.is_state for g in spec.groups) else 0
    pools = allocate_pools(spec, 3 * per_req + 16, num_state_slots=slots, device=dev)
    manager = KVCacheManager(spec, pools=pools)
    compute = _Compute(dev, cfg.layer_ms) if rank == 0 else None
    layers = sorted({i for g in spec.groups for i in g.layer_ids})
    stamp = torch.zeros(1, dtype=torch.float64)
    counter = [0]
    results: dict[str, Any] = {}
    failed: list[str] = []  # requests of any turn not transferred bit-exact

    def tokens_for(n: int, seed: int) -> list[int]:
        return [(seed * 7919 + j * 31) % 50_000 + 1 for j in range(n)]

    for streamed in (False, True):
        opts = TransferOptions(timeout_s=120.0, layer_chunks=streamed)
        agent = connect(
            topo,
            rank,
            {**pools.kv, **pools.state},
            ctrl_group=ctrl,
            data_group=data,
            channel=cfg.channel,
            options=opts,
            timeout_s=120.0,
        )
        for policy in POLICIES:
            runs = []
            for _rep in range(cfg.reps + 1):  # the first is a warm-up
                counter[0] += 1
                c = counter[0]
                history = tokens_for(cfg.history_tokens, c)
                full = history + tokens_for(cfg.prompt_tokens - cfg.history_tokens, c + 10**6)
                turns = [] if policy == "no_reuse" else [(f"h{c}", history)]
                turns.append((f"q{c}", full))
                for i, (rid, toks) in enumerate(turns):
                    timed = i == len(turns) - 1
                    mode = "single_boundary" if policy == "single_boundary" else "per_group"
                    run = _one(
                        rank,
                        agent,
                        manager,
                        pools,
                        spec,
                        rid,
                        toks,
                        layers,
                        timed,
                        streamed and timed,
                        compute,
                        mode,
                        ctrl,
                        stamp,
                        dict(
                            source_target=source_target,
                            prompt_digest=prompt_digest,
                            prefill=prefill,
                            verify=verify,
                            prepare_receive=prepare_receive,
                            complete_receive=complete_receive,
                            abort_receive=abort_receive,
                            state=SessionState,
                        ),
                    )
                    if not run.get("exact", True):  # a warm-up or history turn too
                        failed.append(f"{policy}, {'streamed' if streamed else 'plain'}, "
                                      f"{rid}: {run['failure']}")  # fmt: skip
                    if timed and _rep > 0:
                        runs.append(run)
            results[f"{policy}/{'streamed' if streamed else 'plain'}"] = runs
        channel_name = agent.channel.name
        agent.close(timeout=30)
        dist.barrier(group=ctrl)
    out = {
        "rank": rank,
        "runs": results,
        "failed": failed,
        "compute_steps": compute.n if compute else 0,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "channel": channel_name,
    }
    gathered = gather_json(out, 1, ctrl)
    if rank == 1:
        send_result(conn, {"config": asdict(cfg), "ranks": gathered})
    exit_worker(conn)


def _one(
    rank: int,
    agent: Any,
    manager: Any,
    pools: Any,
    spec: Any,
    rid: str,
    toks: list[int],
    layers: list[int],
    timed: bool,
    streamed: bool,
    compute: Any,
    mode: str,
    ctrl: Any,
    stamp: Any,
    f: dict[str, Any],
) -> dict[str, Any]:
    """One request: the context rank prefills (layer by layer when timed) and serves it; the
    generation rank asks once told the source exists, and commits."""
    import torch.distributed as dist

    dist.barrier(group=ctrl)
    out: dict[str, Any] = {}
    if rank == 0:
        t0 = time.monotonic()
        alloc = manager.allocate(rid, toks, prefill=True)
        released: list[str] = []

        def register(streamed_source: bool) -> None:
            agent.register_source(
                f["source_target"](manager, rid),
                prompt_digest=f["prompt_digest"](toks),
                on_release=lambda r, _s: released.append(r),
                streamed=streamed_source,
            )
            stamp[0] = t0
            dist.send(stamp, 1, group=ctrl)  # "the source exists" (the router's message)

        cuda = pools.device.type == "cuda"
        if cuda:
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()
        if streamed:
            register(True)
        marks: list[Any] = []
        for layer in layers:
            if timed and compute is not None:
                compute.layer(agent)
            f["prefill"](
                spec,
                pools,
                dict(alloc.spans),
                dict(alloc.state_slots),
                toks,
                "auto",
                layers=[layer],
            )
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append(ev)
            else:
                marks.append(time.monotonic() - t0)
            if streamed:
                agent.mark_ready(rid, [layer])
                agent.progress(0.0)
        if cuda:  # keep serving while the device computes: no host sync
            while not marks[-1].query():
                agent.progress(0.0002)
            marks = [start.elapsed_time(ev) / 1e3 for ev in marks]
        out["prefill_s"] = time.monotonic() - t0
        out["layer_done_s"] = marks
        if not streamed:
            register(False)
        if not agent.serve(until=lambda: rid in released, timeout=300):
            out["exact"], out["failure"] = False, "source not released after 300 s"
        manager.free(rid)
    else:
        dist.recv(stamp, 0, group=ctrl)
        t0 = float(stamp[0])
        rx = f["prepare_receive"](manager, rid, toks, mode=mode)
        h = agent.request(
            rx.target,
            prompt_digest=f["prompt_digest"](toks),
            mode=mode,
            on_commit=lambda h: f["complete_receive"](manager, rx),
            on_release=lambda h: f["abort_receive"](manager, rx),
        )
        settled = agent.wait([rid], timeout=300)
        t1 = time.monotonic()
        ok = h.state is f["state"].TRANSFERRED
        out["failure"] = (
            "not settled after 300 s" if not settled else f"ended {h.state.name}: {h.session.error}"
        )
        out["ttft_s"] = t1 - t0
        out["asked_s"] = h.session.created - t0
        out["bytes"] = h.bytes_received
        out["landed_s"] = [
            (min(c.layer_ids), t - t0)
            for job in h.jobs.values()
            for c, t in zip(job.chunks, job.landed_at, strict=False)
        ]
        agent.forget(rid)
        if ok:
            ok = not f["verify"](spec, pools, dict(rx.spans), dict(rx.state_slots), toks, "auto")
            out["failure"] = "transferred, but the KV differs from the prefill's"
        out["exact"] = ok
        if h.state is f["state"].TRANSFERRED:
            manager.free(rid)
            for g in spec.groups:
                if g.kind.has_window:
                    manager.evict(group=g.name)
    dist.barrier(group=ctrl)
    return out


def measure(cfg: TtftConfig) -> dict[str, Any]:
    """Spawn the two ranks and run ``cfg``; the summary (see :func:`format_ttft`)."""
    import torch

    from kvtriton.transfer.launch import gpus_for, spawn_for_result

    if cfg.device == "cpu":
        channel = "gloo"
        ngpu = 0
    else:
        channel = cfg.channel
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible")
        ngpu = gpus_for(channel, 2) if torch.cuda.is_available() else 0
    run = TtftConfig(**{**asdict(cfg), "channel": channel})
    result, codes = spawn_for_result(
        _rank, 2, lambda rank, port, conn: (rank, port, run, ngpu, conn), 3600.0
    )
    if result is None:
        raise RuntimeError(f"the TTFT experiment produced no result (exit codes {codes})")
    if "error" in result:
        raise RuntimeError(result["error"])
    return summarise(result)


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    ctx, gen = result["ranks"][0], result["ranks"][1]
    if ctx["failed"] or gen["failed"]:
        raise RuntimeError(
            "requests not transferred bit-exact: " + "; ".join(ctx["failed"] + gen["failed"])
        )
    rows = []
    for policy in POLICIES:
        plain_g, stream_g = gen["runs"][f"{policy}/plain"], gen["runs"][f"{policy}/streamed"]
        plain_c, stream_c = ctx["runs"][f"{policy}/plain"], ctx["runs"][f"{policy}/streamed"]
        prefill = statistics.median(r["prefill_s"] for r in plain_c)
        prefill_streamed = statistics.median(r["prefill_s"] for r in stream_c)
        plain = statistics.median(r["ttft_s"] for r in plain_g)
        streamed = statistics.median(r["ttft_s"] for r in stream_g)
        transfer = max(plain - prefill, 0.0)
        n_layers = len(plain_c[0]["layer_done_s"])
        rows.append({
            "policy": policy,
            "bytes": plain_g[-1]["bytes"],
            "prefill_ms": 1e3 * prefill,
            "prefill_streamed_ms": 1e3 * prefill_streamed,
            "ttft_plain_ms": 1e3 * plain,
            "ttft_streamed_ms": 1e3 * streamed,
            "transfer_ms": 1e3 * transfer,
            "tail_streamed_ms": 1e3 * (streamed - prefill_streamed),
            "layer_transfer_ms": 1e3 * transfer / n_layers,
            "saved_ms": 1e3 * (plain - streamed),
            "hidden": (plain - streamed) / transfer if transfer > 0 else None,
            "target_met": streamed <= prefill + transfer / n_layers + 1e-3,
            "exact": all(r["exact"] for r in plain_g + stream_g),
            "timeline": {
                "plain": {"layer_done_s": plain_c[-1]["layer_done_s"],
                          "landed_s": plain_g[-1]["landed_s"], "ttft_s": plain_g[-1]["ttft_s"]},
                "streamed": {"layer_done_s": stream_c[-1]["layer_done_s"],
                             "landed_s": stream_g[-1]["landed_s"],
                             "ttft_s": stream_g[-1]["ttft_s"]},
            },
        })  # fmt: skip
    return {"config": result["config"], "device": ctx["device"], "channel": ctx["channel"],
            "rows": rows, "compute_steps_per_layer": ctx["compute_steps"]}  # fmt: skip


def format_ttft(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    lines = [
        f"TTFT with and without layer-wise streaming: {cfg['model']}, P={cfg['prompt_tokens']} "
        f"(the receiver holds {cfg['history_tokens']} for the reuse policies), "
        f"{cfg['layer_ms']} ms of compute per layer, over the {summary['channel']} channel on "
        f"{summary['device']}; medians of {cfg['reps']}",
        f"{'policy':<16} {'moved':>10} {'prefill':>9} {'TTFT':>9} {'transfer':>9} "
        f"{'prefill~':>9} {'streamed':>9} {'tail~':>7} {'saved':>8} {'hidden':>7} "
        f"{'target':>6} exact",
    ]
    for r in summary["rows"]:
        hidden = f"{100 * r['hidden']:.0f}%" if r["hidden"] is not None else "-"
        lines.append(
            f"{r['policy']:<16} {r['bytes'] / 2**20:>7.1f} MiB {r['prefill_ms']:>7.1f}ms "
            f"{r['ttft_plain_ms']:>7.1f}ms {r['transfer_ms']:>7.1f}ms "
            f"{r['prefill_streamed_ms']:>7.1f}ms {r['ttft_streamed_ms']:>7.1f}ms "
            f"{r['tail_streamed_ms']:>5.1f}ms {r['saved_ms']:>6.1f}ms "
            f"{hidden:>7} {'met' if r['target_met'] else 'missed':>6} {r['exact']}"
        )
    lines.append(
        "TTFT = prefill start -> every needed position committed on the generation rank; "
        "transfer = TTFT - prefill without streaming; ~ = with streaming (prefill~: its own "
        "prefill, slower when both ranks share a GPU; tail~ = streamed TTFT - prefill~); "
        "hidden = share of the transfer time saved; target: streamed TTFT <= prefill + one "
        "layer's transfer + 1 ms"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvtriton bench ttft", description=__doc__.split("\n")[0])
    d = TtftConfig()
    p.add_argument("--model", default=d.model, help="a preset (default %(default)s)")
    p.add_argument("--prompt", type=int, default=d.prompt_tokens, help="prompt tokens P")
    p.add_argument(
        "--history",
        type=int,
        default=d.history_tokens,
        help="tokens of the earlier turn the receiver holds",
    )
    p.add_argument("--layer-ms", type=float, default=d.layer_ms, help="compute per layer (ms)")
    p.add_argument("--reps", type=int, default=d.reps)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--channel", choices=("auto", "ipc", "nccl"), default="auto")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    try:
        cfg = TtftConfig(
            args.model,
            args.prompt,
            args.history,
            args.layer_ms,
            args.reps,
            args.channel,
            args.device,
        )
        summary = measure(cfg)
    except ValueError as exc:
        print(f"kvtriton bench ttft: error: {exc}", file=sys.stderr)
        return 2
    print(format_ttft(summary))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0 if all(r["exact"] for r in summary["rows"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.exit(main())
