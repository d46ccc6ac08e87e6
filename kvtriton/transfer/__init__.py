"""Moving one request's paged KV between ranks.

* :mod:`~kvtriton.transfer.protocol`: control messages and their checked wire encoding;
* :mod:`~kvtriton.transfer.session`: the per-request, per-side state machine;
* :mod:`~kvtriton.transfer.topology`: which sender ranks hold a receiver's heads and layers;
* :mod:`~kvtriton.transfer.chunking`: the chunk plan both sides derive;
* :mod:`~kvtriton.transfer.control`: control planes (TCP sockets; in-process queues);
* :mod:`~kvtriton.transfer.channels`: data channels (gloo, NCCL, in-process loopback);
* :mod:`~kvtriton.transfer.sender`, :mod:`~kvtriton.transfer.receiver`: the two sides'
  rules; :mod:`~kvtriton.transfer.agent`: ``TransferAgent``, the thin owner that runs them::

      agent = connect(topology, rank, pools, ctrl_group=..., data_group=...)  # launch.py
      # context rank                                  # generation rank
      agent.register_source(target, prompt_digest=d)  h = agent.request(rx.target,
      agent.serve()                                                     prompt_digest=d,
                                                                        on_commit=...,
                                                                        on_release=...)
                                                      agent.wait([rid]); h.state
      agent.close()                                   agent.close()

* :mod:`~kvtriton.transfer.local`: every rank of a topology in ONE process (loopback);
* :mod:`~kvtriton.transfer.config`: :class:`TransferOptions`, :class:`DisaggConfig`, the
  experiment's command-line options (torch-free);
* :mod:`~kvtriton.transfer.experiment` / :mod:`~kvtriton.transfer.demo`: the disaggregated
  experiment (``scripts/disagg.py``, ``kvtriton demo``); :mod:`~kvtriton.transfer.bench`:
  the transfer and latency benchmarks.

Trust: peers of one job are trusted for liveness, not for memory safety. Nothing a peer
sends can make a rank write outside the blocks it planned, allocate without bound, serve a
request from blocks it already freed, or unpickle anything.

Importing this package does not import torch; the agent, channel and experiment modules do.
"""

from kvtriton.transfer.chunking import DEFAULT_CHUNK_BYTES, Chunk, plan_chunks
from kvtriton.transfer.config import DisaggConfig, FaultInjection, TransferOptions
from kvtriton.transfer.session import Session, SessionState
from kvtriton.transfer.topology import SourceSlice, Topology

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Chunk",
    "DisaggConfig",
    "FaultInjection",
    "Session",
    "SessionState",
    "SourceSlice",
    "Topology",
    "TransferOptions",
    "plan_chunks",
]
