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

from kvtriton.layout import packed_layout
from kvtriton.plan import Mode, TransferPlan, plan_transfer
from kvtriton.ranges import BlockSpan, TokenRange, needed_range
from kvtriton.spec import KVCacheSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "ContextService",
    "ContextWorker",
    "DistContext",
    "GenerationWorker",
    "LocalContext",
    "TurnResult",
    "greedy_reference",
    "run_chat",
    "serve_context",
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

        from kvtriton.kernels import pack_request

        try:
            p, spans = self._live[request_id]
        except KeyError:
            raise KeyError(f"request {request_id!r} is not live on the context side") from None
        for name, rng in tokens.items():
            group = self.spec.group(name)
            held = needed_range(group, p)
            if not (held.start <= rng.start and rng.end <= held.end) and not rng.is_empty:
                raise ValueError(f"request {request_id!r}, group {name!r}: the context side "
                                 f"holds {held}, which does not cover the requested {rng}")
        layout = packed_layout(self.spec, tokens)
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=_device(self.model))
        pack_request(self.spec, layout, self.pools.kv, spans, {}, buffer, backend=self.backend)
        return buffer

    def release(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None:
            self.manager.free(request_id)


class ContextService(Protocol):
    """How the generation side reaches a context worker."""

    def prefill(self, request_id: str, prompt: Sequence[int]) -> torch.Tensor: ...

    def fetch(self, request_id: str, tokens: Mapping[str, TokenRange], nbytes: int
              ) -> torch.Tensor: ...

    def release(self, request_id: str) -> None: ...


class LocalContext:
    """A :class:`ContextService` in the same process (the buffer is copied, as on a wire)."""

    def __init__(self, worker: ContextWorker) -> None:
        self.worker = worker

    def prefill(self, request_id: str, prompt: Sequence[int]) -> torch.Tensor:
        return self.worker.prefill(request_id, prompt)

    def fetch(self, request_id: str, tokens: Mapping[str, TokenRange], nbytes: int
              ) -> torch.Tensor:
        buffer = self.worker.pack(request_id, tokens)
        if buffer.numel() != nbytes:
            raise ValueError(f"request {request_id!r}: context packed {buffer.numel()} bytes, "
                             f"the receiver expects {nbytes}")
        return buffer.clone()

    def release(self, request_id: str) -> None:
        self.worker.release(request_id)


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

        Every decoded position's KV is written back into the pools (``append`` + write +
        ``slide`` per step) and ``commit`` publishes ``[0, P + steps)`` at the end; the
        request is then freed (its committed blocks stay matchable).
        """
        import torch

        from kvtriton.integrations.transformers import cache_to_pools, pools_to_cache
        from kvtriton.kernels import unpack_request

        prompt = [int(t) for t in prompt]
        p = len(prompt)
        first_logits = context.prefill(request_id, prompt)
        released = False
        try:
            alloc = self.manager.allocate(request_id, prompt, mode=mode)
        except BaseException:
            context.release(request_id)
            raise
        try:
            cached = alloc.cached_tokens()
            plan = plan_transfer(self.spec, p, cached)
            moved = {g.name: g.tokens for g in plan.groups if not g.tokens.is_empty}
            layout = packed_layout(self.spec, moved)
            buffer = context.fetch(request_id, moved, layout.nbytes)
            context.release(request_id)
            released = True
            unpack_request(self.spec, layout, buffer, self.pools.kv, alloc.spans, {},
                           backend=self.backend)
            self.manager.commit(request_id, p)

            config = self.model.config
            rows = [first_logits.float()]
            tokens = [int(first_logits.argmax())]
            with torch.no_grad():
                cache = pools_to_cache(self.spec, self.pools.kv, alloc.spans, p, config,
                                       backend=self.backend)
                for i in range(steps):
                    q = p + i
                    out = self.model(_ids_tensor(tokens[-1:], _device(self.model)),
                                     cache=cache, use_cache=True)
                    spans = self.manager.append(request_id, tokens[-1:])
                    new = {g.name: TokenRange(q, q + 1) for g in self.spec.groups}
                    cache_to_pools(cache, self.spec, self.pools.kv, spans, new,
                                   backend=self.backend)
                    self.manager.slide(request_id)
                    rows.append(out.logits[0, -1].float().clone())
                    tokens.append(int(rows[-1].argmax()))
            self.manager.commit(request_id)
        finally:
            if not released:
                context.release(request_id)
            self.manager.free(request_id)
        return TurnResult(request_id=request_id, prompt_len=p, mode=mode, tokens=tokens,
                          logits=torch.stack(rows), plan=plan, cached=cached, moved=moved,
                          wire_bytes=layout.nbytes, reused_blocks=dict(alloc.reused_blocks))

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


# ------------------------------------------------------------------------------------------
# torch.distributed: the context rank serves, the generation rank asks
# ------------------------------------------------------------------------------------------

_PREFILL, _FETCH, _RELEASE, _STOP = 1, 2, 3, 4


def _send_ints(values: Sequence[int], dst: int) -> None:
    import torch
    import torch.distributed as dist

    data = torch.tensor([len(values), *values], dtype=torch.long)
    dist.send(data[:1], dst)
    dist.send(data[1:], dst)


def _recv_ints(src: int) -> list[int]:
    import torch
    import torch.distributed as dist

    n = torch.empty(1, dtype=torch.long)
    dist.recv(n, src)
    data = torch.empty(int(n), dtype=torch.long)
    dist.recv(data, src)
    return [int(x) for x in data]


def _encode_id(request_id: str) -> list[int]:
    return list(request_id.encode())


def _decode_id(values: Sequence[int]) -> str:
    return bytes(values).decode()


class DistContext:
    """A :class:`ContextService` on another rank (``torch.distributed`` send/recv, CPU tensors).

    Control messages are int64 tensors (op, request id, prompt or per-group ranges); the KV
    moves as one uint8 packed buffer whose size both sides derive from the same layout.
    """

    def __init__(self, peer: int, vocab_size: int) -> None:
        self.peer = peer
        self.vocab_size = vocab_size

    def prefill(self, request_id: str, prompt: Sequence[int]) -> torch.Tensor:
        import torch
        import torch.distributed as dist

        rid = _encode_id(request_id)
        _send_ints([_PREFILL, len(rid), *rid, *prompt], self.peer)
        logits = torch.empty(self.vocab_size, dtype=torch.float32)
        dist.recv(logits, self.peer)
        return logits

    def fetch(self, request_id: str, tokens: Mapping[str, TokenRange], nbytes: int
              ) -> torch.Tensor:
        import torch
        import torch.distributed as dist

        rid = _encode_id(request_id)
        ranges: list[int] = []
        for name, rng in tokens.items():
            enc = _encode_id(name)
            ranges += [len(enc), *enc, rng.start, rng.end]
        _send_ints([_FETCH, len(rid), *rid, nbytes, *ranges], self.peer)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            dist.recv(buffer, self.peer)
        return buffer

    def release(self, request_id: str) -> None:
        rid = _encode_id(request_id)
        _send_ints([_RELEASE, len(rid), *rid], self.peer)

    def stop(self) -> None:
        _send_ints([_STOP], self.peer)


def serve_context(worker: ContextWorker, peer: int) -> int:
    """Serve :class:`DistContext` requests from rank ``peer`` until it sends stop.

    Returns the number of KV bytes sent.
    """
    import torch.distributed as dist

    sent = 0
    while True:
        msg = _recv_ints(peer)
        op = msg[0]
        if op == _STOP:
            return sent
        n = msg[1]
        rid = _decode_id(msg[2:2 + n])
        rest = msg[2 + n:]
        if op == _PREFILL:
            dist.send(worker.prefill(rid, rest).contiguous(), peer)
        elif op == _FETCH:
            nbytes, rest = rest[0], rest[1:]
            tokens: dict[str, TokenRange] = {}
            while rest:
                k = rest[0]
                name = _decode_id(rest[1:1 + k])
                tokens[name] = TokenRange(rest[1 + k], rest[2 + k])
                rest = rest[3 + k:]
            buffer = worker.pack(rid, tokens)
            if buffer.numel() != nbytes:
                raise ValueError(f"request {rid!r}: packed {buffer.numel()} bytes but the "
                                 f"receiver expects {nbytes}")
            if nbytes:
                dist.send(buffer, peer)
            sent += nbytes
        elif op == _RELEASE:
            worker.release(rid)
        else:
            raise ValueError(f"unknown context op {op}")
