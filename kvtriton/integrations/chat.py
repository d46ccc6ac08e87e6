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
:class:`DistContext` (``torch.distributed`` point-to-point, gloo on CPU; the context rank runs
:func:`serve_context`).

The reference is :func:`greedy_reference`: the same model without disaggregation (a fresh
prefill of the whole prompt, then greedy decoding on that cache).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvtriton.adapter import ReceivePlan
from kvtriton.layout import packed_layout
from kvtriton.plan import Mode, TransferPlan
from kvtriton.ranges import BlockSpan, TokenRange, needed_range
from kvtriton.spec import KVCacheSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "ContextService",
    "ContextWorker",
        "GenerationWorker",
    "LocalContext",
    "TurnResult",
    "greedy_reference",
    "run_chat",
]


def _ids_tensor(tokens: Sequence[int], device: Any) -> torch.Tensor:
    import torch

    return torch.tensor([list(tokens)], dtype=torch.long, device=device)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def greedy_reference(model: Any, prompt: Sequence[int], steps: int
                     ) -> tuple[list[int], torch.Tensor]:
    """Greedy generation without disaggregation: prefill ``prompt``, then ``steps`` decodes.

    Returns ``steps + 1`` tokens (the first from the prefill's last logits) and their logits
    ``[steps + 1, vocab]`` (float32 copies).
    """
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(_ids_tensor(prompt, _device(model)), cache=cache, use_cache=True)
        rows = [out.logits[0, -1].float().clone()]
        tokens = [int(rows[-1].argmax())]
        for _ in range(steps):
            out = model(_ids_tensor(tokens[-1:], _device(model)), cache=cache, use_cache=True)
            rows.append(out.logits[0, -1].float().clone())
            tokens.append(int(rows[-1].argmax()))
    return tokens, torch.stack(rows)


# ------------------------------------------------------------------------------------------
# context side
# ------------------------------------------------------------------------------------------


class ContextWorker:
    """The prefill side: one model, one :class:`KVCacheManager` over its own pools.

    ``prefill`` runs a fresh prefill and writes ``needed(g, P)`` of every group into the pools
    (a sliding layer keeps exactly that range); ``pack`` gathers requested ranges into one
    packed buffer; ``release`` frees the request's blocks. The context side never commits: it
    keeps no prefix cache across requests.
    """

    def __init__(self, model: Any, spec: KVCacheSpec, *, num_blocks: int,
                 backend: str = "auto") -> None:
        from kvtriton.cache import KVCacheManager, allocate_pools
        from kvtriton.integrations.transformers import check_spec

        check_spec(spec, model.config)
        self.model = model
        self.spec = spec
        self.backend = backend
        self.pools = allocate_pools(spec, num_blocks, device=_device(model))
        self.manager = KVCacheManager(spec, pools=self.pools)
        self._live: dict[str, tuple[int, dict[str, BlockSpan]]] = {}

    def prefill(self, request_id: str, prompt: Sequence[int]) -> torch.Tensor:
        """Prefill ``prompt``; keep its needed KV; return the last position's logits [vocab]."""
        import torch
        from transformers import DynamicCache

        from kvtriton.integrations.transformers import cache_to_pools

        if request_id in self._live:
            raise ValueError(f"request {request_id!r} is already live on the context side")
        p = len(prompt)
        alloc = self.manager.allocate(request_id, list(prompt))
        try:
            with torch.no_grad():
                cache = DynamicCache(config=self.model.config)
                out = self.model(_ids_tensor(prompt, _device(self.model)), cache=cache,
                                 use_cache=True)
            needed = {g.name: needed_range(g, p) for g in self.spec.groups}
            cache_to_pools(cache, self.spec, self.pools.kv, alloc.spans, needed,
                           backend=self.backend)
        except BaseException:
            self.manager.free(request_id)
            raise
        self._live[request_id] = (p, dict(alloc.spans))
        return out.logits[0, -1].float().clone()

    def pack(self, request_id: str, tokens: Mapping[str, TokenRange]) -> torch.Tensor:
        """The packed buffer (1-D uint8) of ``tokens`` per group for a live request."""
        import torch

        from kvtriton.adapter import source_spans
        from kvtriton.kernels import pack_request

        if request_id not in self._live:
            raise KeyError(f"request {request_id!r} is not live on the context side")
        src = source_spans(self.manager, request_id, dict(tokens))
        layout = packed_layout(self.spec, tokens)
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=_device(self.model))
        pack_request(self.spec, layout, self.pools.kv, src.spans, {}, buffer,
                     backend=self.backend)
        return buffer

    def release(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None:
            self.manager.free(request_id)


class ContextService(Protocol):
    """How the generation side reaches a context worker.

    ``prefill`` runs the prompt on the context side and returns its last-position logits;
    ``send=False`` says nothing will be fetched (a full hit), so the context side frees the
    request at once. ``transfer`` lands ``rx.tokens`` (per-group positions) into the
    receiver's ``pools`` at ``rx.spans``, frees the context side's blocks and returns the
    bytes that crossed; it raises if the transfer failed (the receiver then aborts).
    """

    def prefill(self, request_id: str, prompt: Sequence[int], *, send: bool = True
                ) -> torch.Tensor: ...

    def transfer(self, request_id: str, rx: ReceivePlan, pools: Mapping[str, torch.Tensor]
                 ) -> int: ...


class LocalContext:
    """A :class:`ContextService` in the same process: pack on the context side, copy the
    buffer (as a wire would), unpack into the receiver's pools."""

    def __init__(self, worker: ContextWorker, *, backend: str = "auto") -> None:
        self.worker = worker
        self.backend = backend

    def prefill(self, request_id: str, prompt: Sequence[int], *, send: bool = True
                ) -> torch.Tensor:
        logits = self.worker.prefill(request_id, prompt)
        if not send:
            self.worker.release(request_id)
        return logits

    def transfer(self, request_id: str, rx: ReceivePlan, pools: Mapping[str, torch.Tensor]
                 ) -> int:
        from kvtriton.kernels import unpack_request

        try:
            moved = {name: rng for name, rng in rx.tokens.items() if not rng.is_empty}
            buffer = self.worker.pack(request_id, moved).clone()
        finally:
            self.worker.release(request_id)
        spec = rx.plan.spec
        layout = packed_layout(spec, moved)
        if buffer.numel() != layout.nbytes:
            raise ValueError(f"request {request_id!r}: context packed {buffer.numel()} bytes, "
                             f"the receiver expects {layout.nbytes}")
        unpack_request(spec, layout, buffer, pools, rx.spans, {}, backend=self.backend)
        return layout.nbytes


# ------------------------------------------------------------------------------------------
# generation side
# ------------------------------------------------------------------------------------------


@dataclass
class TurnResult:
    """One disaggregated turn as the generation side saw it.

    Attributes:
        request_id, prompt_len (``P``), mode.
        tokens: ``steps + 1`` generated ids (the first from the context side's logits).
        logits: ``[steps + 1, vocab]`` float32: the context side's last-position logits, then
            the generation side's decode steps.
        plan: the per-group transfer plan that was executed.
        cached: ``cached_tokens`` the plan was made with (mapping or single int).
        moved: ``{group: positions moved}`` (empty ranges left out).
        wire_bytes: size of the packed buffer that crossed (plan bytes + segment alignment).
        reused_blocks: ``{group: logical blocks reused from the receiver's prefix cache}``.
    """

    request_id: str
    prompt_len: int
    mode: str
    tokens: list[int]
    logits: Any
    plan: TransferPlan
    cached: Mapping[str, int] | int
    moved: dict[str, TokenRange]
    wire_bytes: int
    reused_blocks: dict[str, range] = field(default_factory=dict)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV the plan moved (exact, without alignment padding)."""
        return self.plan.kv_bytes


class GenerationWorker:
    """The decode side: a model, pools and a :class:`KVCacheManager` with a prefix cache."""

    def __init__(self, model: Any, spec: KVCacheSpec, *, num_blocks: int,
                 backend: str = "auto") -> None:
        from kvtriton.cache import KVCacheManager, allocate_pools
        from kvtriton.integrations.transformers import check_spec

        check_spec(spec, model.config)
        self.model = model
        self.spec = spec
        self.backend = backend
        self.pools = allocate_pools(spec, num_blocks, device=_device(model))
        self.manager = KVCacheManager(spec, pools=self.pools)

    def run_turn(self, request_id: str, prompt: Sequence[int], steps: int,
                 context: ContextService, *, mode: Mode = "per_group") -> TurnResult:
        """One request: remote prefill, per-group transfer, local greedy decode of ``steps``.

        Every decoded position's KV is written back into the pools; per step: ``append``,
        write, ``commit`` (blocks are published as they fill, as a serving engine does) and
        ``slide`` (sliding-window blocks that left the window lose the request's reference
        but stay matchable until evicted). The request is freed at the end.
        """
        import torch

        from kvtriton.adapter import abort_receive, complete_receive, prepare_receive
        from kvtriton.integrations.transformers import cache_to_pools, pools_to_cache

        prompt = [int(t) for t in prompt]
        p = len(prompt)
        rx = prepare_receive(self.manager, request_id, prompt, mode=mode)
        moves = any(not rng.is_empty for rng in rx.tokens.values())
        try:
            first_logits = context.prefill(request_id, prompt, send=moves)
            wire_bytes = context.transfer(request_id, rx, self.pools.kv) if moves else 0
        except BaseException:
            abort_receive(self.manager, rx)
            raise
        complete_receive(self.manager, rx)
        moved = {name: rng for name, rng in rx.tokens.items() if not rng.is_empty}

        try:
            rows = [first_logits.float()]
            tokens = [int(first_logits.argmax())]
            with torch.no_grad():
                cache = pools_to_cache(self.spec, self.pools.kv, rx.spans, p, self.model.config,
                                       backend=self.backend)
                for i in range(steps):
                    q = p + i
                    out = self.model(_ids_tensor(tokens[-1:], _device(self.model)),
                                     cache=cache, use_cache=True)
                    spans = self.manager.append(request_id, tokens[-1:])
                    new = {g.name: TokenRange(q, q + 1) for g in self.spec.groups}
                    cache_to_pools(cache, self.spec, self.pools.kv, spans, new,
                                   backend=self.backend)
                    self.manager.commit(request_id)  # blocks are published as they fill
                    self.manager.slide(request_id)
                    rows.append(out.logits[0, -1].float().clone())
                    tokens.append(int(rows[-1].argmax()))
        finally:
            self.manager.free(request_id)
        alloc = rx.allocation
        plan = rx.plan
        cached = alloc.cached_tokens()
        return TurnResult(request_id=request_id, prompt_len=p, mode=mode, tokens=tokens,
                          logits=torch.stack(rows), plan=plan, cached=cached, moved=moved,
                          wire_bytes=wire_bytes, reused_blocks=dict(alloc.reused_blocks))

    def evict_sliding(self) -> int:
        """Evict every unreferenced cached block of the sliding-window groups.

        Models memory pressure: released sliding-window pages are the first a loaded server
        loses. Returns the number of blocks evicted.
        """
        return sum(self.manager.evict(group=g.name) for g in self.spec.groups
                   if g.kind == "sliding")


def run_chat(generation: GenerationWorker, context: ContextService,
             user_turns: Sequence[Sequence[int]], *, steps: int, mode: Mode = "per_group",
             evict_sliding_between_turns: bool = False, prefix: str = "chat"
             ) -> list[TurnResult]:
    """A multi-turn chat: turn ``k``'s prompt = previous prompt + its reply + ``user_turns[k]``.

    ``evict_sliding_between_turns`` evicts the receiver's unreferenced sliding-window blocks
    after each turn (see :meth:`GenerationWorker.evict_sliding`).
    """
    results: list[TurnResult] = []
    conversation: list[int] = []
    for k, user in enumerate(user_turns):
        prompt = conversation + [int(t) for t in user]
        result = generation.run_turn(f"{prefix}-{k}", prompt, steps, context, mode=mode)
        results.append(result)
        conversation = prompt + result.tokens
        if evict_sliding_between_turns:
            generation.evict_sliding()
    return results
