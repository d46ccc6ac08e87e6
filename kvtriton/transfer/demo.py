"""Running the disaggregated experiment: spawned ranks on this machine, or one rank under
torchrun (``scripts/disagg.py``, ``kvtriton demo``).

* :func:`launch_local`: spawn every rank here (gloo on CPU; NCCL when each rank can own a
  GPU) and return the report;
* :func:`launch_cases`: several gloo experiments, one after another, in ONE spawned world
  (the tests: process start-up and the torch import are paid once);
* :func:`run_torchrun`: this process's rank under torchrun;
* :func:`run_cli`: the command line (prints the report; exit status 0 when VERIFIED).

Results come home as JSON bytes through one pipe per rank, never pickled.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from kvtriton.transfer.config import DisaggConfig
from kvtriton.transfer.experiment import run_rank
from kvtriton.transfer.launch import (
    exit_worker,
    free_port,
    gpus_for,
    init_spawned,
    make_groups,
    send_result,
    spawn_for_result,
)
from kvtriton.transfer.report import format_report

__all__ = [
    "DisaggConfig",
    "format_report",
    "launch_cases",
    "launch_local",
    "run_cli",
    "run_torchrun",
]


def _worker(rank: int, cfg: DisaggConfig, world: int, port: int, ngpu: int, conn: Any) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = init_spawned(rank, world, port, ngpu)
    code = 0
    try:
        backend = "nccl" if cfg.channel == "nccl" else "gloo"
        ctrl, data = make_groups(world, backend, max(120.0, 4 * cfg.timeout_s))
        report = run_rank(cfg, rank, ctrl=ctrl, data=data, device=device)
        if report is not None:
            send_result(conn, report)
    except BaseException:
        send_result(conn, {"error": f"rank {rank}: {traceback.format_exc()}"})
        code = 1
    exit_worker(conn, code)


def launch_local(cfg: DisaggConfig) -> dict[str, Any]:
    """Spawn ``cfg.world_size`` ranks on this machine and return the report.

    With GPUs the ranks share them round-robin and ``auto`` picks the direct channel (NCCL
    only when asked for, one GPU per rank); without, gloo on CPU. Raises ``RuntimeError``
    with a rank's error.
    """
    world = cfg.world_size
    ngpu = gpus_for(cfg.channel, world)
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    timeout_s = cfg.timeout_s * (cfg.turns + 4) * len(cfg.modes) + 60
    report, codes = spawn_for_result(
        _worker,
        world,
        lambda rank, port, conn: (rank, cfg, world, port, ngpu, conn),
        timeout_s,
    )
    if report is None:
        raise RuntimeError(f"the experiment produced no report (exit codes {codes})")
    if "error" in report:
        raise RuntimeError(report["error"])
    return report  # type: ignore[no-any-return]


def _case_worker(
    rank: int, cases: list[tuple[str, DisaggConfig]], world: int, port: int, ngpu: int, conn: Any
) -> None:
    device = init_spawned(rank, world, port, ngpu)
    code = 0
    for name, cfg in cases:
        ctrl, data = make_groups(cfg.world_size, "gloo", max(60.0, 4 * cfg.timeout_s))
        if rank < cfg.world_size:
            try:
                report = run_rank(cfg, rank, ctrl=ctrl, data=data, device=device)
            except Exception:
                send_result(conn, [name, {"error": f"rank {rank}: {traceback.format_exc()}"}])
                code = 1
                break
            if report is not None:
                send_result(conn, [name, report])
        if any(f.die_after_frames is not None for f in cfg.faults.values()):
            break  # a rank died: the world is broken, this must be the last case
    send_result(conn, ["__exit__", rank])
    exit_worker(conn, code)


def launch_cases(
    cases: Sequence[tuple[str, DisaggConfig]],
    world_size: int,
    timeout_s: float = 200.0,
    *,
    ngpu: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run several experiments one after another in one spawned world of ``world_size``
    ranks (each case uses ranks ``[0, cfg.world_size)``), sharing the process start-up cost:
    CPU ranks over gloo, or (``ngpu`` > 0) ranks sharing ``ngpu`` GPUs round-robin over the
    direct channel. Returns ``{case name: report or {"error": text}}``. A case with a
    ``die_after_frames`` fault must come last.
    """
    import multiprocessing.connection as mpc

    import torch.multiprocessing as mp

    for name, cfg in cases:
        if cfg.world_size > world_size:
            raise ValueError(f"case {name!r} needs {cfg.world_size} ranks > {world_size}")
    ctx = mp.get_context("spawn")
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world_size)]
    procs = [
        ctx.Process(target=_case_worker, args=(r, list(cases), world_size, port, ngpu, pipes[r][1]))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for _, w in pipes:
        w.close()
    readers = [r for r, _ in pipes]
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while readers and time.monotonic() < deadline:
        for r in mpc.wait(readers, timeout=0.5):
            try:
                name, rep = json.loads(r.recv_bytes())  # type: ignore[union-attr]
            except (EOFError, OSError):
                readers.remove(r)  # type: ignore[arg-type]
                continue
            if name == "__exit__":
                readers.remove(r)  # type: ignore[arg-type]
            else:
                results.setdefault(name, rep)
    for p in procs:
        p.join(timeout=5)
        if p.exitcode is None:
            p.kill()
            p.join()
    for r, _ in pipes:
        r.close()
    for name, _ in cases:
        results.setdefault(
            name,
            {
                "error": f"no report (a rank crashed or hung; exit codes "
                f"{[p.exitcode for p in procs]})"
            },
        )
    return results


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
    use_gpu = cfg.channel != "gloo" and ngpu > 0
    if cfg.channel == "nccl" and ngpu < local_world and not cfg.devices:
        raise ValueError(
            f"the nccl channel needs a GPU per local rank ({local_world}), found "
            f"{ngpu}; or map ranks to GPUs with --devices"
        )
    device = "cpu"
    if use_gpu:
        # --devices maps ranks to GPUs (several ranks may share one, as long as every
        # sender/receiver pair spans two GPUs); default: one GPU per local rank
        gpu = cfg.devices[local_rank] if cfg.devices else local_rank % ngpu
        torch.cuda.set_device(gpu)
        device = f"cuda:{gpu}"
        dist.init_process_group("cpu:gloo,cuda:nccl")  # lazy: p2p gets 2-rank comms
    else:
        dist.init_process_group("gloo")
    try:
        backend = "nccl" if cfg.channel == "nccl" else "gloo"
        ctrl, data = make_groups(world, backend, max(120.0, 4 * cfg.timeout_s))
        report = run_rank(cfg, rank, ctrl=ctrl, data=data, device=device)
    except BaseException:
        # Say what failed now: tearing the groups down could block on the peers.
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
    from kvtriton.transfer.config import config_from_args

    cfg = config_from_args(args)
    if _torchrun_env():
        report = run_torchrun(cfg)  # prints the report on the reporting rank
    else:
        report = launch_local(cfg)
        print(format_report(report), flush=True)
    if report is None:
        return 0
    if getattr(args, "json", None):
        slim = {k: v for k, v in report.items() if k != "ranks"}
        with open(args.json, "w") as f:
            json.dump(slim, f, indent=1, default=str)
    return 0 if report["verified"] else 1
