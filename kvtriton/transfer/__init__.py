"""Moving one request's paged KV between ranks over torch.distributed.

* :mod:`~kvtriton.transfer.protocol`: control messages and their compact wire encoding;
* :mod:`~kvtriton.transfer.session`: the per-request, per-side state machine;
* :mod:`~kvtriton.transfer.topology`: which sender ranks hold a receiver's heads and layers;
* :mod:`~kvtriton.transfer.chunking`: the chunk plan both sides derive;
* :mod:`~kvtriton.transfer.config`: :class:`TransferOptions`, :class:`FaultInjection`,
  :class:`DisaggConfig` and the experiment's command-line options (torch-free);
* :mod:`~kvtriton.transfer.transport`: ``TransferAgent`` (threads, pipelining, faults)::

      agent = TransferAgent(topology, rank, pools, ctrl_group, data_group, TransferOptions())
      # context rank                               # generation rank
      agent.register_source(rid, P, spans, slots)  h = agent.request(rid, P, tokens, states,
      agent.serve()                                                   spans, slots,
                                                                      on_commit=..., on_release=...)
                                                   agent.wait([rid]); h.state, h.session.error
      agent.close()                                agent.close()

* :mod:`~kvtriton.transfer.experiment`: the disaggregated experiment (``scripts/disagg.py``,
  ``kvtriton demo``); :mod:`~kvtriton.transfer.bench`: ``scripts/bench_transfer.py``.

Importing this package does not import torch; the transport and experiment modules do.
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
