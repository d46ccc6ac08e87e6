"""The two workers of a disaggregated chat and the single-process run (one job: what each
side does per turn).

:class:`ContextWorker` prefills a prompt and packs the ranges a generation side asks for;
:class:`GenerationWorker` matches its prefix cache, asks for exactly what it lacks, unpacks,
commits, rebuilds a ``DynamicCache`` and decodes greedily; :class:`LocalContext` joins them
in one process; :func:`greedy_reference` is the same model without disaggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvtriton.adapter import ReceivePlan
from kvtriton.layout import packed_layout
from kvtriton.plan import Mode, TransferPlan
from kvtriton.ranges import BlockSpan, TokenRange, needed_range
from kvtriton.spec import KVCacheSpec

if TYPE_CHECKING:
    import torch


def _ids_tensor(tokens: Sequence[int], device: Any) -> torch.Tensor:
    import torch

    return torch.tensor([list(tokens)], dtype=torch.long, device=device)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _decoder_layers(model: Any) -> Any:
    """The decoder layers of a transformers causal LM, in global layer order."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if layers is not None:
            return layers
    raise ValueError(f"{type(model).__name__}: no decoder layers found (model.model.layers)")


def _forward(model: Any, tokens: Sequence[int], cache: Any) -> Any:
    from kvtriton.integrations.transformers import forward

    return forward(model, tokens, cache)


def greedy_reference(
    model: Any, prompt: Sequence[int], steps: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy generation without disaggregation: prefill ``prompt``, then ``steps`` decodes.

    Returns ``steps + 1`` tokens (the first from the prefill's last logits) and their logits
    ``[steps + 1, vocab]`` (float32 copies).
    """
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = _forward(model, prompt, cache)
        rows = [out.logits[0, -1].float().clone()]
        tokens = [int(rows[-1].argmax())]
        for _ in range(steps):
            out = _forward(model, tokens[-1:], cache)
            rows.append(out.logits[0, -1].float().clone())
            tokens.append(int(rows[-1].argmax()))
    return tokens, torch.stack(rows)


def _pools_and_manager(
    model: Any, spec: KVCacheSpec, num_blocks: int, num_state_slots: int
) -> tuple[Any, Any]:
    from kvtriton.cache import KVCacheManager, allocate_pools
    from kvtriton.integrations.transformers import check_spec

    check_spec(spec, model.config)
    has_state = any(g.is_state for g in spec.groups)
    pools = allocate_pools(
        spec, num_blocks, num_state_slots=num_state_slots if has_state else 0, device=_device(model)
    )
    return pools, KVCacheManager(spec, pools=pools)


class ContextWorker:
    """The prefill side: one model, one :class:`KVCacheManager` over its own pools.

    ``prefill`` runs a fresh prefill and writes ``needed(g, P)`` of every group into the pools
    (a sliding layer keeps exactly that range); ``pack`` gathers requested ranges into one
    packed buffer; ``release`` frees the request's blocks. The context side never commits: it
    keeps no prefix cache across requests.
    """

    def __init__(
        self,
        model: Any,
        spec: KVCacheSpec,
        *,
        num_blocks: int,
        num_state_slots: int = 4,
        backend: str = "auto",
    ) -> None:
        self.model = model
        self.spec = spec
        self.backend = backend
        self.pools, self.manager = _pools_and_manager(model, spec, num_blocks, num_state_slots)
        self.pool_map: dict[str, torch.Tensor] = {**self.pools.kv, **self.pools.state}
        self._live: dict[str, tuple[int, dict[str, BlockSpan], dict[str, int]]] = {}

    def prefill(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        on_allocated: Callable[[], None] | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Prefill ``prompt``; keep its needed KV; return the last position's logits [vocab].

        Streaming: ``on_allocated()`` runs once the blocks exist (before the forward: register
        the source there); with ``on_layer``, forward hooks copy each decoder layer's KV into
        the pools as soon as that layer's forward wrote the cache, then call
        ``on_layer(global layer id)`` (mark it ready there), while the next layers compute.
        """
        import torch
        from transformers import DynamicCache

        from kvtriton.integrations.transformers import cache_to_pools

        if request_id in self._live:
            raise ValueError(f"request {request_id!r} is already live on the context side")
        p = len(prompt)
        alloc = self.manager.allocate(request_id, list(prompt))
        needed = {g.name: needed_range(g, p) for g in self.spec.groups if g.is_attention}
        held = {i for g in self.spec.groups for i in g.layer_ids}

        def write(cache: Any, layers: Sequence[int] | None) -> None:
            cache_to_pools(
                cache,
                self.spec,
                self.pool_map,
                alloc.spans,
                needed,
                state_slots=alloc.state_slots,
                config=self.model.config,
                backend=self.backend,
                layers=layers,
            )

        hooks = []
        try:
            self._live[request_id] = (p, dict(alloc.spans), dict(alloc.state_slots))
            if on_allocated is not None:
                on_allocated()
            with torch.no_grad():
                cache = DynamicCache(config=self.model.config)
                if on_layer is not None:
                    for i, layer in enumerate(_decoder_layers(self.model)):
                        if i not in held:
                            continue  # another pipeline stage's layer

                        def hook(*_: Any, i: int = i) -> None:
                            write(cache, [i])
                            on_layer(i)

                        hooks.append(layer.register_forward_hook(hook))
                out = _forward(self.model, prompt, cache)
            if on_layer is None:
                write(cache, None)
        except BaseException:
            self._live.pop(request_id, None)
            self.manager.free(request_id)
            raise
        finally:
            for h in hooks:
                h.remove()
        return out.logits[0, -1].float().clone()

    def pack(
        self, request_id: str, tokens: Mapping[str, TokenRange], states: Sequence[str] = ()
    ) -> torch.Tensor:
        """The packed buffer (1-D uint8) of ``tokens`` per group (and the whole state of each
        group in ``states``) for a live request."""
        import torch

        from kvtriton.adapter import source_spans
        from kvtriton.kernels import pack_request

        if request_id not in self._live:
            raise KeyError(f"request {request_id!r} is not live on the context side")
        src = source_spans(self.manager, request_id, dict(tokens), tuple(states))
        layout = packed_layout(self.spec, tokens, states)
        buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=_device(self.model))
        pack_request(
            self.spec,
            layout,
            self.pool_map,
            src.spans,
            src.state_slots,
            buffer,
            backend=self.backend,
        )
        return buffer

    def spans(self, request_id: str) -> dict[str, BlockSpan]:
        """Source spans of a live request (every attention group)."""
        try:
            return dict(self._live[request_id][1])
        except KeyError:
            raise KeyError(f"request {request_id!r} is not live on the context side") from None

    def state_slots(self, request_id: str) -> dict[str, int]:
        """State slots of a live request (every state group)."""
        try:
            return dict(self._live[request_id][2])
        except KeyError:
            raise KeyError(f"request {request_id!r} is not live on the context side") from None

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

    def prefill(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        send: bool = True,
        receive: ReceivePlan | None = None,
    ) -> torch.Tensor: ...

    def transfer(
        self, request_id: str, rx: ReceivePlan, pools: Mapping[str, torch.Tensor]
    ) -> int: ...


class LocalContext:
    """A :class:`ContextService` in the same process: pack on the context side, copy the
    buffer (as a wire would), unpack into the receiver's pools."""

    def __init__(self, worker: ContextWorker, *, backend: str = "auto") -> None:
        self.worker = worker
        self.backend = backend

    def prefill(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        send: bool = True,
        receive: ReceivePlan | None = None,
    ) -> torch.Tensor:
        logits = self.worker.prefill(request_id, prompt)
        if not send:
            self.worker.release(request_id)
        return logits

    def transfer(self, request_id: str, rx: ReceivePlan, pools: Mapping[str, torch.Tensor]) -> int:
        from kvtriton.kernels import unpack_request

        moved = {name: rng for name, rng in rx.tokens.items() if not rng.is_empty}
        try:
            buffer = self.worker.pack(request_id, moved, rx.states).clone()
        finally:
            self.worker.release(request_id)
        spec = rx.plan.spec
        layout = packed_layout(spec, moved, rx.states)
        if buffer.numel() != layout.nbytes:
            raise ValueError(
                f"request {request_id!r}: context packed {buffer.numel()} bytes, "
                f"the receiver expects {layout.nbytes}"
            )
        unpack_request(spec, layout, buffer, pools, rx.spans, rx.state_slots, backend=self.backend)
        return layout.nbytes


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
        states: state groups whose whole state moved.
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
    states: tuple[str, ...]
    wire_bytes: int
    reused_blocks: dict[str, range] = field(default_factory=dict)

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV the plan moved (exact, without alignment padding)."""
        return self.plan.kv_bytes

    @property
    def bytes(self) -> int:
        """Bytes the plan moved: KV plus whole states."""
        return self.plan.total_bytes

    def to_record(self) -> dict[str, Any]:
        """Plain data (logits as numpy), as :func:`launch_chat` returns per turn."""
        return {
            "request_id": self.request_id,
            "prompt_len": self.prompt_len,
            "mode": self.mode,
            "tokens": list(self.tokens),
            "logits": self.logits.tolist(),  # float32 -> float -> float32 is exact
            "moved": {g: (t.start, t.end) for g, t in self.moved.items()},
            "states": list(self.states),
            "bytes": self.bytes,
            "cached": self.cached if isinstance(self.cached, int) else dict(self.cached),
            "kv_bytes": self.kv_bytes,
            "wire_bytes": self.wire_bytes,
        }


class GenerationWorker:
    """The decode side: a model, pools and a :class:`KVCacheManager` with a prefix cache."""

    def __init__(
        self,
        model: Any,
        spec: KVCacheSpec,
        *,
        num_blocks: int,
        num_state_slots: int = 16,
        backend: str = "auto",
    ) -> None:
        self.model = model
        self.spec = spec
        self.backend = backend
        self.pools, self.manager = _pools_and_manager(model, spec, num_blocks, num_state_slots)
        self.pool_map: dict[str, torch.Tensor] = {**self.pools.kv, **self.pools.state}

    def run_turn(
        self,
        request_id: str,
        prompt: Sequence[int],
        steps: int,
        context: ContextService,
        *,
        mode: Mode = "per_group",
    ) -> TurnResult:
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
        moves = bool(rx.states) or any(not rng.is_empty for rng in rx.tokens.values())
        try:
            first_logits = context.prefill(request_id, prompt, send=moves, receive=rx)
            wire_bytes = context.transfer(request_id, rx, self.pool_map) if moves else 0
        except BaseException:
            abort_receive(self.manager, rx)
            raise
        complete_receive(self.manager, rx)
        moved = {name: rng for name, rng in rx.tokens.items() if not rng.is_empty}

        try:
            rows = [first_logits.float()]
            tokens = [int(first_logits.argmax())]
            with torch.no_grad():
                cache = pools_to_cache(
                    self.spec,
                    self.pool_map,
                    rx.spans,
                    p,
                    self.model.config,
                    state_slots=rx.state_slots,
                    backend=self.backend,
                )
                for i in range(steps):
                    q = p + i
                    out = _forward(self.model, tokens[-1:], cache)
                    spans = self.manager.append(request_id, tokens[-1:])
                    new = {g.name: TokenRange(q, q + 1) for g in self.spec.groups if g.is_attention}
                    # the state now summarises [0, q + 1): commit may snapshot it
                    cache_to_pools(
                        cache,
                        self.spec,
                        self.pool_map,
                        spans,
                        new,
                        state_slots=rx.state_slots,
                        config=self.model.config,
                        backend=self.backend,
                    )
                    self.manager.commit(request_id)  # blocks are published as they fill
                    self.manager.slide(request_id)
                    rows.append(out.logits[0, -1].float().clone())
                    tokens.append(int(rows[-1].argmax()))
        finally:
            self.manager.free(request_id)
        alloc = rx.allocation
        plan = rx.plan
        cached = alloc.cached_tokens()
        return TurnResult(
            request_id=request_id,
            prompt_len=p,
            mode=mode,
            tokens=tokens,
            logits=torch.stack(rows),
            plan=plan,
            cached=cached,
            moved=moved,
            states=tuple(rx.states),
            wire_bytes=wire_bytes,
            reused_blocks=dict(alloc.reused_blocks),
        )

    def evict_sliding(self) -> int:
        """Evict every unreferenced cached block of the sliding-window groups.

        Models memory pressure: released sliding-window pages are the first a loaded server
        loses. Returns the number of blocks evicted.
        """
        return sum(self.manager.evict(group=g.name) for g in self.spec.groups if g.kind.has_window)


def run_chat(
    generation: GenerationWorker,
    context: ContextService,
    user_turns: Sequence[Sequence[int]],
    *,
    steps: int,
    mode: Mode = "per_group",
    evict_sliding_between_turns: bool = False,
    prefix: str = "chat",
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
