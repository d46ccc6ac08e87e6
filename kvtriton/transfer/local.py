"""Every rank of a topology as agents of ONE process: the in-process loopback world.

The same agents, sender, receiver, chunk plans, kernels and checks as across processes, over
a :class:`~kvtriton.transfer.control.LocalHub` and a
:class:`~kvtriton.transfer.channels.loopback.LoopbackHub`: protocol, session and fault tests
run in milliseconds and deterministically (a test may drive a virtual clock), and a notebook
can watch a transfer step by step::

    world = LocalWorld(topology, pools_by_rank, TransferOptions(checksum=True))
    world.agents[0].register_source(target, prompt_digest=d)
    h = world.agents[1].request(rx.target, prompt_digest=d)
    world.run_until(lambda: h.settled)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from kvtriton.transfer.agent import TransferAgent
from kvtriton.transfer.channels.base import DataChannel
from kvtriton.transfer.channels.direct import DirectChannel, LocalMemory
from kvtriton.transfer.channels.loopback import LoopbackHub
from kvtriton.transfer.config import FaultInjection, TransferOptions
from kvtriton.transfer.control import LocalHub
from kvtriton.transfer.faults import FaultyChannel
from kvtriton.transfer.topology import Topology

__all__ = ["LocalWorld"]


class LocalWorld:
    """Agents for every rank of ``topology`` in this process.

    Args:
        topology: the world split.
        pools: ``{rank: {group: tensor}}`` for every rank (CPU tensors).
        options: transfer options of every agent (or ``{rank: options}``).
        bandwidth: bytes/s of each directed link (``None``: instant).
        clock: time source of the agents and the links (a test may pass a virtual clock and
            advance it; :meth:`run_until` then advances it by ``step`` when idle).
        faults: ``{rank: FaultInjection}`` (wraps that rank's channel).
        channel: ``"loopback"`` (packed chunks through memory) or ``"direct"`` (the direct
            channel's pool-to-pool copies, pools "mapped" in-process).
    """

    def __init__(
        self,
        topology: Topology,
        pools: Mapping[int, Mapping[str, torch.Tensor]],
        options: TransferOptions | Mapping[int, TransferOptions] | None = None,
        *,
        bandwidth: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        faults: Mapping[int, FaultInjection] | None = None,
        channel: str = "loopback",
    ) -> None:
        self.topology = topology
        self.clock = clock
        self.control = LocalHub()
        self.links = LoopbackHub(bandwidth=bandwidth, clock=clock)
        self.agents: dict[int, TransferAgent] = {}
        for rank in range(topology.world_size):
            opts = options.get(rank) if isinstance(options, Mapping) else options
            data: DataChannel
            if channel == "direct":
                data = DirectChannel(LocalMemory(), "cpu")
            elif channel == "loopback":
                data = self.links.channel()
            else:
                raise ValueError(f"channel must be 'loopback' or 'direct', got {channel!r}")
            fault = (faults or {}).get(rank)
            if fault is not None and fault.active:
                data = FaultyChannel(data, fault)
            ctl = self.control.endpoint(rank, topology.peers(rank))
            self.agents[rank] = TransferAgent(
                topology, rank, pools[rank], ctl, data, opts, clock=clock
            )
        pairs = [(s.sender, r) for r in topology.gen_ranks for s in topology.sources(r)]
        for agent in self.agents.values():
            agent.channel.connect_start(pairs)
        for agent in self.agents.values():
            agent.channel.connect_finish(pairs)

    def step(self) -> None:
        """One :meth:`TransferAgent.progress` of every live agent (no waiting)."""
        for rank, agent in self.agents.items():
            if not self.control.endpoints[rank].dead and not agent.closed:
                agent.progress(0.0)

    def run_until(
        self,
        cond: Callable[[], bool],
        *,
        max_steps: int = 100_000,
        advance: Callable[[], None] | None = None,
    ) -> int:
        """Step until ``cond()`` holds; returns the steps taken. ``advance`` (e.g. moving a
        virtual clock) runs after every step. ``RuntimeError`` after ``max_steps``."""
        for n in range(max_steps):
            if cond():
                return n
            self.step()
            if advance is not None:
                advance()
        raise RuntimeError(f"condition not reached in {max_steps} steps")

    def kill(self, rank: int) -> None:
        """Rank ``rank`` dies: its peers see its connections drop; it does nothing more."""
        self.control.kill(rank)

    def close(self) -> None:
        """Close every live agent (cancels what is live, says Bye)."""
        live = [r for r in self.agents if not self.control.endpoints[r].dead]
        for r in live:
            a = self.agents[r]
            a.sender and a.sender.shutdown()
            a.receiver and a.receiver.shutdown()
        self.run_until(
            lambda: not any(self.agents[r].channel.busy() for r in live), max_steps=10_000
        )
        for r in live:
            self.agents[r].close(timeout=0.0)
