"""Disaggregated multi-turn chat on a real ``transformers`` model, moved by kvtriton.

A context worker prefills each prompt (stateless: a fresh cache per request) and keeps the
KV each layer group needs in its own paged pools. A generation worker owns a
:class:`~kvtriton.cache.KVCacheManager` with a prefix cache: for each turn it matches the
prompt, plans per layer group what it still needs (:func:`kvtriton.plan.plan_transfer`,
per-group or single-boundary mode), asks the context side for exactly those ranges as one
packed buffer (DESIGN.md §2), scatters it into its pools, commits the prompt blocks, rebuilds
a ``DynamicCache`` (:func:`~kvtriton.integrations.transformers.pools_to_cache`) and decodes
greedily, writing every decoded position back into its pools so the next turn can reuse it.

The context side is reached through a :class:`ContextService`: :class:`LocalContext` (one
process; the packed buffer is still the only thing that crosses) or
:class:`AgentContext` (``torch.distributed``: a :class:`~kvtriton.transfer.agent.TransferAgent`
moves the KV; the context rank runs :func:`serve_context`).

The reference is :func:`greedy_reference`: the same model without disaggregation (a fresh
prefill of the whole prompt, then greedy decoding on that cache).

Modules: :mod:`.workers` (the two sides and the single-process run), :mod:`.service` (over
``torch.distributed``), :mod:`.launch` (a two-rank launcher), :mod:`.demo` (checks and the
report); everything public is importable from here.
"""

from kvtriton.integrations.chat.demo import (
    ChatDemo,
    TurnCheck,
    demo_user_turns,
    format_chat_report,
    run_chat_demo,
    verify_chat,
)
from kvtriton.integrations.chat.launch import ChatConfig, chat_rank, launch_chat, load_model
from kvtriton.integrations.chat.service import AgentContext, serve_context
from kvtriton.integrations.chat.workers import (
    ContextService,
    ContextWorker,
    GenerationWorker,
    LocalContext,
    TurnResult,
    greedy_reference,
    run_chat,
)

__all__ = [
    "AgentContext",
    "ChatConfig",
    "ChatDemo",
    "ContextService",
    "ContextWorker",
    "GenerationWorker",
    "LocalContext",
    "TurnCheck",
    "TurnResult",
    "chat_rank",
    "demo_user_turns",
    "format_chat_report",
    "greedy_reference",
    "launch_chat",
    "load_model",
    "run_chat",
    "run_chat_demo",
    "serve_context",
    "verify_chat",
]
