"""Starting ranks and bringing their results home, with no pickle of peer data.

* :func:`make_groups`: the control (gloo) and data (gloo or NCCL) process groups of a world;
* :func:`connect`: a :class:`~kvtriton.transfer.agent.TransferAgent` for this rank: socket
  control connections to its peers and the data channel (``auto`` / ``gloo`` / ``nccl`` /
  ``ipc``, :func:`resolve_channel`);
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    "gpus_for",
    "init_spawned",
    "make_groups",
    "resolve_channel",
    "spawn_for_result",
]

#: Data channels a user may name (``auto`` picks one).
CHANNELS = ("auto", "gloo", "nccl", "ipc")


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


@dataclass(frozen=True)
class RankPlace:
    """Where a rank runs: its host name and its pools' device (``index`` -1 on CPU)."""

    host: str
    device_type: str
    index: int


def places(group: Any, device: torch.device) -> list[RankPlace]:
    """Every rank's :class:`RankPlace` (collective over the gloo ``group``; fixed-size byte
    tensors, no pickle)."""
    mine = torch.zeros(128, dtype=torch.uint8)
    idx = -1 if device.type == "cpu" else (device.index or 0)
    text = f"{socket.gethostname()} {device.type} {idx}".encode()[:128]
    mine[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    table = [torch.zeros(128, dtype=torch.uint8) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    out = []
    for row in table:
        host, kind, index = bytes(row.tolist()).rstrip(b"\0").decode().split()
        out.append(RankPlace(host, kind, int(index)))
    return out


def resolve_channel(channel: str, ranks: Sequence[RankPlace]) -> str:
    """The data channel ``channel`` means for ranks placed as ``ranks`` (the same answer on
    every rank). ``auto``: the direct channel when every rank has CUDA pools on one host and
    every GPU pair can reach the other's memory (the same GPU, or peer access); NCCL for
    CUDA pools otherwise; gloo for CPU pools."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    kinds = {r.device_type for r in ranks}
    if len(kinds) != 1:
        raise ValueError(f"ranks mix {sorted(kinds)} pools; one channel needs one device type")
    cuda = kinds == {"cuda"}
    if channel == "auto":
        if not cuda:
            return "gloo"
        return "ipc" if _direct_possible(ranks) else "nccl"
    if channel in ("nccl", "ipc") and not cuda:
        raise ValueError(f"the {channel} channel needs CUDA pools")
    if channel == "gloo" and cuda:
        raise ValueError("the gloo channel moves CPU tensors; CUDA pools need nccl or ipc")
    if channel == "ipc" and not _direct_possible(ranks):
        raise ValueError(
            "the ipc channel needs every rank on one host with GPUs that can "
            "reach each other's memory (the same GPU, or peer access)"
        )
    return channel


def _direct_possible(ranks: Sequence[RankPlace]) -> bool:
    if len({r.host for r in ranks}) != 1:
        return False
    gpus = sorted({r.index for r in ranks})
    return all(a == b or torch.cuda.can_device_access_peer(a, b) for a in gpus for b in gpus)


_GROUPS: dict[tuple[str, tuple[int, ...]], Any] = {}


def _group(backend: str, ranks: Sequence[int], timeout_s: float) -> Any:
    """A process group over ``ranks`` (created once per backend and ranks; collective over
    the default group the first time)."""
    key = (backend, tuple(ranks))
    if key not in _GROUPS:
        timeout = datetime.timedelta(seconds=timeout_s)
        _GROUPS[key] = dist.new_group(ranks=list(ranks), backend=backend, timeout=timeout)
    return _GROUPS[key]


def connect(
    topology: Topology,
    rank: int,
    pools: Mapping[str, torch.Tensor],
    *,
    channel: str = "auto",
    options: TransferOptions | None = None,
    faults: FaultInjection | None = None,
    ctrl_group: Any = None,
    data_group: Any = None,
    timeout_s: float = 60.0,
) -> TransferAgent:
    """This rank's agent: control sockets to its peers, then the data channel.

    Collective: every rank of the default process group calls it with the same ``channel``
    (``auto``, ``gloo``, ``nccl`` or ``ipc``; see :func:`resolve_channel`). The topology's
    world ranks are the default group's ``[0, world_size)``. ``ctrl_group`` (gloo) and
    ``data_group`` (gloo or NCCL) may be given; otherwise they are created once and reused.
    ``faults`` wraps the channel in a :class:`~kvtriton.transfer.faults.FaultyChannel`
    (tests only).
    """
    ranks = list(range(topology.world_size))
    if ctrl_group is None:
        ctrl_group = _group("gloo", ranks, max(120.0, timeout_s))
    device = next(iter(pools.values())).device
    kind = resolve_channel(channel, places(ctrl_group, device))
    control = SocketControl.connect(
        rank,
        topology.peers(rank),
        ctrl_group,
        model_digest=topology.model.model_digest(),
        channel=kind,
        timeout_s=timeout_s,
    )
    if data_group is not None and dist.get_backend(data_group) != {"nccl": "nccl"}.get(
        kind, "gloo"
    ):
        data_group = None  # made for another channel than the one resolved
    data: DataChannel
    if kind == "nccl":
        from kvtriton.transfer.channels.nccl import NcclChannel

        data = NcclChannel(data_group or _group("nccl", ranks, max(120.0, timeout_s)), device)
    elif kind == "ipc":
        from kvtriton.transfer.channels.direct import CudaIpcMemory, DirectChannel

        data = DirectChannel(CudaIpcMemory(), device)
    else:
        from kvtriton.transfer.channels.gloo import GlooChannel

        data = GlooChannel(data_group or _group("gloo", ranks, max(120.0, timeout_s)))
    if faults is not None and faults.active:
        from kvtriton.transfer.faults import FaultyChannel

        data = FaultyChannel(data, faults)
    agent = TransferAgent(topology, rank, pools, control, data, options)
    agent.channel.connect([(s.sender, r) for r in topology.gen_ranks for s in topology.sources(r)])
    return agent


def init_spawned(rank: int, world: int, port: int, ngpu: int) -> str:
    """Join the spawned world; returns this rank's device (``cuda:i`` when ``ngpu`` GPUs
    are shared round-robin, else ``cpu``)."""
    torch.set_num_threads(1)
    store = dist.TCPStore(
        "127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60)
    )
    if ngpu:
        torch.cuda.set_device(rank % ngpu)
        # no device_id: lazy NCCL init, so each point-to-point pair gets its own 2-rank
        # communicator (own stream): sends to different peers never queue behind each other
        dist.init_process_group("cpu:gloo,cuda:nccl", store=store, rank=rank, world_size=world)
        return f"cuda:{rank % ngpu}"
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    return "cpu"


def gpus_for(channel: str, world: int) -> int:
    """How many GPUs spawned ranks share round-robin (0: CPU pools): ``gloo`` runs on CPU;
    ``auto`` and ``ipc`` use every GPU there is (two ranks may share one: the direct channel
    maps a peer's pool on the same GPU); ``nccl`` needs one GPU per rank."""
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if channel == "gloo":
        return 0
    if channel == "nccl" and ngpu < world:
        raise ValueError(f"the nccl channel needs {world} GPUs (one per rank), found {ngpu}")
    if channel == "ipc" and ngpu == 0:
        raise ValueError("the ipc channel needs a CUDA GPU; none is visible")
    return min(ngpu, world)


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
