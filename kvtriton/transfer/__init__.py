"""Moving one request's paged KV between ranks over torch.distributed.

* :mod:`~kvtriton.transfer.protocol`: control messages and their compact wire encoding;
* :mod:`~kvtriton.transfer.session`: the per-request, per-side state machine;
* :mod:`~kvtriton.transfer.topology`: which sender ranks hold a receiver's heads and layers;
* :mod:`~kvtriton.transfer.chunking`: the chunk plan both sides derive;
* :mod:`~kvtriton.transfer.transport`: :class:`TransferAgent` (threads, pipelining, faults);
* :mod:`~kvtriton.transfer.experiment`: the disaggregated experiment (``scripts/disagg.py``,
  ``kvtriton demo``).

Importing this package does not import torch; the transport and experiment modules do.
"""

from kvtriton.transfer.chunking import DEFAULT_CHUNK_BYTES, Chunk, plan_chunks
from kvtriton.transfer.session import Session, SessionState
from kvtriton.transfer.topology import SourceSlice, Topology

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Chunk",
    "Session",
    "SessionState",
    "SourceSlice",
    "Topology",
    "plan_chunks",
]
