"""Starting ranks and bringing their results home, with no pickle of peer data.

* :func:`make_groups`: the control (gloo) and data (gloo or NCCL) process groups of a world;
* :func:`connect`: a :class:`~kvtriton.transfer.agent.TransferAgent` for this rank: socket
  control connections to its peers and the data channel (``auto`` / ``gloo`` / ``nccl``);
* :func:`gather_json`: per-rank results to one rank as JSON bytes (never ``gather_object``);
* :func:`spawn_for_result`: spawn the ranks of a world on this machine and read the result a
  rank writes to its own pipe as JSON bytes; :func:`exit_worker` ends a spawned rank.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from kvtriton.transfer.agent import TransferAgent
from kvtriton.transfer.channels.base import DataChannel
from kvtriton.transfer.config import FaultInjection, TransferOptions
from kvtriton.transfer.control import SocketControl
from kvtriton.transfer.topology import Topology

__all__ = [
    "CHANNELS",
    "connect",
    "exit_worker",
    "free_port",
    "gather_json",
    "make_groups",
    "resolve_channel",
    "spawn_for_result",
]

#: Data channels a user may name (``auto`` picks one).
CHANNELS = ("auto", "gloo", "nccl")


def make_groups(world_size: int, data_backend: str, timeout_s: float = 120.0) -> tuple[Any, Any]:
    """``(control, data)`` groups over ranks ``[0, world_size)`` of the default group.

    Collective: every rank of the default group must call it. Control is gloo (address
    exchange, barriers, results); data is ``data_backend`` (``"gloo"`` or ``"nccl"``).
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    ranks = list(range(world_size))
    ctrl = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
    data = dist.new_group(ranks=ranks, backend=data_backend, timeout=timeout)
    return ctrl, data


def resolve_channel(channel: str, device: torch.device | str) -> str:
    """The data channel ``channel`` means for pools on ``device``: ``auto`` is NCCL for
    CUDA pools and gloo for CPU pools."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    device = torch.device(device)
    if channel == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if channel == "nccl" and device.type != "cuda":
        raise ValueError("the nccl channel needs CUDA pools")
    if channel == "gloo" and device.type != "cpu":
        raise ValueError("the gloo channel moves CPU tensors; CUDA pools need nccl")
    return channel


def connect(
    topology: Topology,
    rank: int,
    pools: Mapping[str, torch.Tensor],
    *,
    ctrl_group: Any,
    data_group: Any,
    channel: str = "auto",
    options: TransferOptions | None = None,
    faults: FaultInjection | None = None,
    timeout_s: float = 60.0,
) -> TransferAgent:
    """This rank's agent. Collective over ``ctrl_group`` (every rank of the topology calls it
    with the same ``channel``): control sockets are connected, then the channel.

    ``data_group`` carries the data (gloo for the gloo channel, NCCL for the nccl channel);
    ``faults`` wraps the channel in a :class:`~kvtriton.transfer.faults.FaultyChannel`
    (tests only).
    """
    device = next(iter(pools.values())).device
    kind = resolve_channel(channel, device)
    control = SocketControl.connect(
        rank,
        topology.peers(rank),
        ctrl_group,
        model_digest=topology.model.model_digest(),
        channel=kind,
        timeout_s=timeout_s,
    )
    data: DataChannel
    if kind == "nccl":
        from kvtriton.transfer.channels.nccl import NcclChannel

        data = NcclChannel(data_group, device)
    else:
        from kvtriton.transfer.channels.gloo import GlooChannel

        data = GlooChannel(data_group)
    if faults is not None and faults.active:
        from kvtriton.transfer.faults import FaultyChannel

        data = FaultyChannel(data, faults)
    agent = TransferAgent(topology, rank, pools, control, data, options)
    agent.channel.connect([(s.sender, r) for r in topology.gen_ranks for s in topology.sources(r)])
    return agent


def gather_json(obj: Any, dst: int, group: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (a list in group-rank order), ``None`` elsewhere.

    Collective over ``group`` (gloo). Objects travel as JSON bytes in uint8 tensors: a
    peer's result is parsed, never unpickled.
    """
    data = json.dumps(obj, default=str).encode()
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    me = dist.get_rank(group)
    dst_in_group = dist.get_group_rank(group, dst) if group is not None else dst
    if me != dst_in_group:
        dist.gather(buf, None, dst=dst, group=group)
        return None
    bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.gather(buf, bufs, dst=dst, group=group)
    return [json.loads(bytes(b[: int(n)].tolist())) for b, n in zip(bufs, sizes, strict=True)]


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
    """Spawn ``world`` processes running ``target(*rank_args(rank, port, conn))`` and return
    the first result any of them writes to its ``conn`` (JSON bytes:
    ``conn.send_bytes(json.dumps(obj).encode())``).

    ``port`` is a free TCP port on 127.0.0.1 for the ranks' store. Returns that object
    (``None`` if every rank exited, or ``timeout_s`` seconds passed, without one) and the exit
    codes; ranks still running after the deadline are killed, so nothing outlives the call.
    """
    import multiprocessing.connection as mpc

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    procs = [
        ctx.Process(target=target, args=rank_args(rank, port, pipes[rank][1]))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    for _, w in pipes:
        w.close()
    readers = [r for r, _ in pipes]
    deadline = time.monotonic() + timeout_s
    result: Any = None
    while result is None and readers and time.monotonic() < deadline:
        for r in mpc.wait(readers, timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            try:
                raw = r.recv_bytes()  # type: ignore[union-attr]
            except (EOFError, OSError):
                readers.remove(r)  # type: ignore[arg-type]
                continue
            result = json.loads(raw)
            break
    for proc in procs:
        proc.join(timeout=max(1.0, deadline - time.monotonic()))
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    for r, _ in pipes:
        r.close()
    return result, [proc.exitcode for proc in procs]


def send_result(conn: Any, obj: Any) -> None:
    """Write a spawned rank's result to its pipe as JSON bytes."""
    conn.send_bytes(json.dumps(obj, default=str).encode())


def exit_worker(conn: Any, code: int = 0) -> NoReturn:
    """End a spawned rank: close its pipe, flush stdio, leave at once (interpreter teardown
    with torch and gloo threads takes seconds on a small CPU box, and everything the parent
    needs has been written)."""
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
