"""kvtriton: move exactly the paged KV cache each layer group still needs between the ranks
of a disaggregated LLM server.

The top level stays torch-free: ``kvtriton.ranges``, ``kvtriton.spec``, ``kvtriton.plan`` and
``kvtriton.layout`` are pure Python. Kernels, caches and transport import torch on use.
"""

from kvtriton.layout import PackedLayout, Segment, packed_layout
from kvtriton.plan import (
    GroupTransfer,
    ReusePolicy,
    TransferPlan,
    compare_policies,
    plan_transfer,
    single_boundary,
)
from kvtriton.ranges import (
    BlockSpan,
    GroupKind,
    TokenRange,
    needed_range,
    state_needs_transfer,
    transfer_range,
)
from kvtriton.spec import PRESETS, KVCacheSpec, LayerGroup, preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BlockSpan",
    "GroupKind",
    "GroupTransfer",
    "KVCacheSpec",
    "LayerGroup",
    "PackedLayout",
    "ReusePolicy",
    "Segment",
    "TokenRange",
    "TransferPlan",
    "compare_policies",
    "needed_range",
    "packed_layout",
    "plan_transfer",
    "preset",
    "single_boundary",
    "state_needs_transfer",
    "transfer_range",
]
