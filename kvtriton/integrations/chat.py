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


# ------------------------------------------------------------------------------------------
# torch.distributed: kvtriton.transfer.TransferAgent moves the KV; a small "router" channel
# carries prompts and first-token logits (what a serving frontend would do)
# ------------------------------------------------------------------------------------------

_PREFILL, _STOP = 1, 2


def _send_ints(values: Sequence[int], dst: int, group: Any) -> None:
    import torch
    import torch.distributed as dist

    data = torch.tensor([len(values), *values], dtype=torch.long)
    dist.send(data[:1].clone(), dst, group=group)
    dist.send(data[1:].clone(), dst, group=group)


def _recv_ints(src: int, group: Any) -> list[int]:
    import torch
    import torch.distributed as dist

    n = torch.empty(1, dtype=torch.long)
    dist.recv(n, src, group=group)
    data = torch.empty(int(n), dtype=torch.long)
    dist.recv(data, src, group=group)
    return [int(x) for x in data]


class AgentContext:
    """A :class:`ContextService` on another rank: the KV moves through the receiver's
    :class:`kvtriton.transfer.agent.TransferAgent` (protocol, sessions, chunked
    pipelining); prompts and logits go over ``router_group``.

    Args:
        agent: this (generation) rank's agent; its pools are the generation worker's pools.
        router_group: a gloo group shared with the context rank (not the agent's groups).
        peers: the context ranks (global ranks; several under context TP/PP: each prefills
            and serves its own heads and layers, the agent asks each for its part).
        vocab_size: length of the logits row the context rank sends back.
        timeout_s: how long to wait for one request's transfer.
        streaming: layer-wise streaming: the context rank registers the source before its
            prefill and marks each layer as its forward writes it; this rank asks at once
            (layer-major chunks, ``TransferOptions.layer_chunks``) and receives while the
            prefill runs.
    """

    def __init__(
        self,
        agent: Any,
        router_group: Any,
        peers: Sequence[int],
        vocab_size: int,
        *,
        timeout_s: float = 60.0,
        streaming: bool = False,
    ) -> None:
        self.agent = agent
        self.router_group = router_group
        self.peers = tuple(peers)
        if not self.peers:
            raise ValueError("AgentContext needs at least one context rank")
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.streaming = streaming
        self._digests: dict[str, str] = {}
        self._handles: dict[str, Any] = {}

    def prefill(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        send: bool = True,
        receive: ReceivePlan | None = None,
    ) -> torch.Tensor:
        import threading

        import torch
        import torch.distributed as dist

        from kvtriton.transfer.protocol import prompt_digest

        self._digests[request_id] = prompt_digest(prompt)
        stream = self.streaming and send and receive is not None
        rid = list(request_id.encode())
        for peer in self.peers:
            msg = [_PREFILL, int(send), int(stream), len(rid), *rid, *prompt]
            _send_ints(msg, peer, self.router_group)
        rows = [torch.empty(self.vocab_size, dtype=torch.float32) for _ in self.peers]
        if not stream:
            for peer, row in zip(self.peers, rows, strict=True):
                dist.recv(row, peer, group=self.router_group)
        else:
            for peer in self.peers:  # each context rank registered its streamed source
                _recv_ints(peer, self.router_group)
            assert receive is not None
            self._handles[request_id] = self.agent.request(
                receive.target, prompt_digest=self._digests.pop(request_id), mode=receive.mode
            )
            # receive the layers while the prefill runs; the logits come when it ends
            works = [
                dist.irecv(row, peer, group=self.router_group)
                for peer, row in zip(self.peers, rows, strict=True)
            ]
            done = threading.Event()
            waiter = threading.Thread(
                target=lambda: ([w.wait() for w in works], done.set()), daemon=True
            )
            waiter.start()
            while not done.is_set():
                self.agent.progress(0.002)
            waiter.join()
        for peer, row in zip(self.peers[1:], rows[1:], strict=True):
            if not torch.equal(row, rows[0]):
                raise RuntimeError(
                    f"request {request_id!r}: context ranks {self.peers[0]} and "
                    f"{peer} disagree on the first token's logits"
                )
        return rows[0]

    def transfer(self, request_id: str, rx: ReceivePlan, pools: Mapping[str, torch.Tensor]) -> int:
        from kvtriton.transfer.session import SessionState

        for name, tensor in pools.items():
            if self.agent.pools.pools.get(name) is not tensor:
                raise ValueError(
                    f"request {request_id!r}: pool {name!r} is not the agent's "
                    "pool; build the agent over the generation worker's pools"
                )
        handle = self._handles.pop(request_id, None)
        if handle is None:
            handle = self.agent.request(
                rx.target, prompt_digest=self._digests.pop(request_id), mode=rx.mode
            )
        done = self.agent.wait([request_id], timeout=self.timeout_s)
        if not done:
            self.agent.cancel(request_id, f"no transfer within {self.timeout_s} s")
            self.agent.wait([request_id], timeout=self.timeout_s)
        state, error = handle.state, handle.session.error
        self.agent.forget(request_id)
        if state is not SessionState.TRANSFERRED:
            raise RuntimeError(f"request {request_id!r}: transfer ended {state.value}: {error}")
        return int(handle.bytes_received)

    def stop(self) -> None:
        """Tell :func:`serve_context` on every context rank to return."""
        for peer in self.peers:
            _send_ints([_STOP], peer, self.router_group)


def serve_context(
    worker: ContextWorker, agent: Any, router_group: Any, peer: int, *, timeout_s: float = 60.0
) -> int:
    """Context rank loop: prefill what ``peer`` asks for, serve its transfer, free, repeat.

    Returns the number of requests served; ends when the peer sends stop.
    """
    import torch.distributed as dist

    from kvtriton.adapter import source_target
    from kvtriton.transfer.protocol import prompt_digest

    served = 0
    finished: set[str] = set()
    while True:
        msg = _recv_ints(peer, router_group)
        if msg[0] == _STOP:
            return served
        if msg[0] != _PREFILL:
            raise ValueError(f"unknown router message {msg[0]} from rank {peer}")
        send, stream, n = bool(msg[1]), bool(msg[2]), msg[3]
        request_id = bytes(msg[4 : 4 + n]).decode()
        prompt = msg[4 + n :]

        def register(streamed: bool, rid: str = request_id, prompt: list[int] = prompt) -> None:
            agent.register_source(
                source_target(worker.manager, rid),
                prompt_digest=prompt_digest(prompt),
                on_release=lambda r, _states: finished.add(r),
                streamed=streamed,
            )

        def registered() -> None:  # streamed: the source exists before the prefill runs
            register(True)
            _send_ints([1], peer, router_group)

        def layer_ready(layer: int, rid: str = request_id) -> None:
            agent.mark_ready(rid, [layer])
            agent.progress(0.0)  # this layer's chunks go while the next layer computes

        try:
            if stream:
                logits = worker.prefill(
                    request_id, prompt, on_allocated=registered, on_layer=layer_ready
                )
            else:
                logits = worker.prefill(request_id, prompt)
                if send:
                    register(False)
            dist.send(logits.contiguous(), peer, group=router_group)
            if send and not agent.serve(
                until=lambda rid=request_id: rid in finished, timeout=timeout_s
            ):
                raise RuntimeError(
                    f"request {request_id!r}: the receiver did not finish its "
                    f"transfer within {timeout_s} s"
                )
        finally:
            worker.release(request_id)
        served += 1


# ------------------------------------------------------------------------------------------
# a two-rank launcher (tests, notebooks, demos)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatConfig:
    """A disaggregated chat over local ranks: ``ctx_tp * ctx_pp`` context ranks, then one
    generation rank.

    Attributes:
        model: a :data:`~kvtriton.integrations.transformers.TINY_MODELS` kind (random weights
            from ``seed``) or a local directory with a ``transformers`` causal LM.
        user_turns: token ids of each user turn (turn ``k``'s prompt extends turn ``k-1``'s
            prompt and reply).
        steps: decode steps per turn (each turn generates ``steps + 1`` tokens).
        modes: ``"per_group"`` and/or ``"single_boundary"``; each runs on fresh caches.
        ctx_tokens_per_block, gen_tokens_per_block: block sizes of the two sides.
        ctx_tp, ctx_pp: context-side parallelism. Every context rank runs the whole (tiny)
            model and keeps only its shard's heads and layers; the generation rank (tp1 pp1)
            asks each for its part (kvtriton.transfer's topology). State groups need tp 1.
        num_blocks: blocks per group on each side.
        num_threads: torch intra-op threads of every rank (and of :func:`verify_chat`): CPU
            matmuls split their float32 sums by thread, so bit-exact comparisons need the
            same count on both sides of a comparison.
        evict_sliding_between_turns: see :func:`run_chat`.
        backend: kernel backend (``"auto"``: Triton on CUDA/interpreter, else reference).
        timeout_s: per-transfer timeout.
        streaming: layer-wise streaming: each decoder layer's KV is copied into the pools and
            marked ready by a forward hook while the prefill runs, and the generation rank
            receives it meanwhile (the same tokens either way).
    """

    model: str = "gemma3"
    user_turns: tuple[tuple[int, ...], ...] = ()
    steps: int = 8
    modes: tuple[str, ...] = ("per_group", "single_boundary")
    seed: int = 0
    window: int = 6
    ctx_tokens_per_block: int = 4
    gen_tokens_per_block: int = 5
    ctx_tp: int = 1
    ctx_pp: int = 1
    num_blocks: int = 64
    num_threads: int = 1
    evict_sliding_between_turns: bool = True
    backend: str = "auto"
    timeout_s: float = 60.0
    streaming: bool = False


def load_model(cfg: ChatConfig) -> Any:
    """The model of ``cfg`` (a tiny seeded model, or a local checkpoint in float32, eager)."""
    import os

    from kvtriton.integrations.transformers import TINY_MODELS, tiny_model

    if cfg.model in TINY_MODELS:
        return tiny_model(cfg.model, seed=cfg.seed, window=cfg.window)
    if not os.path.isdir(cfg.model):
        raise ValueError(
            f"model {cfg.model!r} is neither a tiny model ({', '.join(TINY_MODELS)}) "
            "nor a local checkpoint directory (kvtriton never downloads)"
        )
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    )
    return model.eval()


def chat_rank(
    cfg: ChatConfig, rank: int, ctrl: Any, data: Any, router: Any
) -> dict[str, list[dict[str, Any]]] | None:
    """Run ``cfg`` on this rank over gloo groups of all ranks (context ranks first, then the
    generation rank; :class:`kvtriton.transfer.topology.Topology` order).

    Returns ``{mode: [turn record, ...]}`` on the generation rank (records hold tokens,
    logits as numpy, moved ranges, bytes), ``None`` on context ranks.
    """
    import torch.distributed as dist

    from kvtriton.integrations.transformers import spec_for_model
    from kvtriton.transfer.config import TransferOptions
    from kvtriton.transfer.launch import connect
    from kvtriton.transfer.topology import Topology

    model = load_model(cfg)
    spec = spec_for_model(model, tokens_per_block=cfg.ctx_tokens_per_block)
    topology = Topology(spec, cfg.ctx_tp, cfg.ctx_pp, gen_tokens_per_block=cfg.gen_tokens_per_block)
    local = topology.spec(rank)
    (gen_rank,) = topology.gen_ranks
    options = TransferOptions(
        timeout_s=cfg.timeout_s, backend=cfg.backend, layer_chunks=cfg.streaming
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for mode in cfg.modes:
        if rank != gen_rank:
            worker = ContextWorker(model, local, num_blocks=cfg.num_blocks, backend=cfg.backend)
            agent = connect(
                topology, rank, worker.pool_map, ctrl_group=ctrl, data_group=data, options=options
            )
            try:
                serve_context(worker, agent, router, gen_rank, timeout_s=cfg.timeout_s)
            finally:
                agent.close(timeout=cfg.timeout_s)
        else:
            gen = GenerationWorker(model, local, num_blocks=cfg.num_blocks, backend=cfg.backend)
            agent = connect(
                topology, rank, gen.pool_map, ctrl_group=ctrl, data_group=data, options=options
            )
            context = AgentContext(
                agent,
                router,
                topology.ctx_ranks,
                int(model.config.vocab_size),
                timeout_s=cfg.timeout_s,
                streaming=cfg.streaming,
            )
            try:
                results = run_chat(
                    gen,
                    context,
                    cfg.user_turns,
                    steps=cfg.steps,
                    mode=mode,  # type: ignore[arg-type]
                    evict_sliding_between_turns=cfg.evict_sliding_between_turns,
                    prefix=mode,
                )
            finally:
                context.stop()
                agent.close(timeout=cfg.timeout_s)
            gen.manager.check_invariants()
            out[mode] = [r.to_record() for r in results]
        dist.barrier(group=ctrl)
    return out if rank == gen_rank else None


def _chat_worker(rank: int, cfg: ChatConfig, world: int, port: int, conn: Any) -> None:
    import datetime
    import traceback

    import torch
    import torch.distributed as dist

    from kvtriton.transfer.launch import exit_worker, send_result

    torch.set_num_threads(cfg.num_threads)
    store = dist.TCPStore(
        "127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60)
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    code = 0
    try:
        timeout = datetime.timedelta(seconds=max(120.0, 4 * cfg.timeout_s))
        ctrl, data, router = (
            dist.new_group(list(range(world)), backend="gloo", timeout=timeout) for _ in range(3)
        )
        result = chat_rank(cfg, rank, ctrl, data, router)
        if result is not None:
            send_result(conn, result)
    except BaseException:
        send_result(conn, {"error": f"rank {rank}: {traceback.format_exc()}"})
        code = 1
    exit_worker(conn, code)


def launch_chat(cfg: ChatConfig) -> dict[str, list[dict[str, Any]]]:
    """Spawn the ranks of ``cfg`` on this machine (gloo) and return the generation rank's
    records (see :func:`chat_rank`). Raises ``RuntimeError`` with the failing rank's error
    if a rank fails."""
    import numpy as np

    from kvtriton.transfer.launch import spawn_for_result

    if not cfg.user_turns:
        raise ValueError("ChatConfig.user_turns is empty: give the token ids of each turn")
    world = cfg.ctx_tp * cfg.ctx_pp + 1
    timeout_s = 120 + cfg.timeout_s * len(cfg.user_turns) * len(cfg.modes)
    result, codes = spawn_for_result(
        _chat_worker, world, lambda rank, port, conn: (rank, cfg, world, port, conn), timeout_s
    )
    if result is None:
        raise RuntimeError(f"the chat produced no result (exit codes {codes})")
    if "error" in result:
        raise RuntimeError(result["error"])
    for turns in result.values():  # the records came as JSON: logits back to float32 arrays
        for rec in turns:
            rec["logits"] = np.asarray(rec["logits"], dtype=np.float32)
            rec["moved"] = {g: tuple(r) for g, r in rec["moved"].items()}
    return result  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------
# checking and reporting a chat (demo / notebook)
# ------------------------------------------------------------------------------------------


def demo_user_turns(
    lengths: Sequence[int] = (21, 13), *, seed: int = 1, vocab_size: int = 96
) -> tuple[tuple[int, ...], ...]:
    """Seeded random user turns of the given lengths (token ids below ``vocab_size``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randint(0, vocab_size, (n,), generator=g).tolist()) for n in lengths)


@dataclass(frozen=True)
class TurnCheck:
    """One turn compared with :func:`greedy_reference` (no disaggregation).

    Attributes: ``mode``, ``turn``, ``tokens_match``, ``exact`` (logits bit-identical),
    ``max_abs_diff`` (largest logit difference).
    """

    mode: str
    turn: int
    tokens_match: bool
    exact: bool
    max_abs_diff: float


def verify_chat(
    model: Any, cfg: ChatConfig, records: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[TurnCheck]:
    """Replay every turn of ``records`` (from :func:`launch_chat`) without disaggregation.

    Turn ``k``'s prompt is rebuilt from ``cfg.user_turns`` and the recorded replies, then
    prefilled from scratch and decoded greedily for ``cfg.steps`` steps, with
    ``cfg.num_threads`` torch threads (as the ranks used).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _verify(model, cfg, records)
    finally:
        torch.set_num_threads(before)


def _verify(
    model: Any, cfg: ChatConfig, records: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[TurnCheck]:
    import torch

    checks: list[TurnCheck] = []
    for mode, turns in records.items():
        conversation: list[int] = []
        for k, rec in enumerate(turns):
            prompt = conversation + list(cfg.user_turns[k])
            tokens, logits = greedy_reference(model, prompt, cfg.steps)
            got = torch.as_tensor(rec["logits"])
            checks.append(
                TurnCheck(
                    mode,
                    k,
                    list(rec["tokens"]) == tokens,
                    bool(torch.equal(got, logits)),
                    float((got - logits).abs().max()),
                )
            )
            conversation = prompt + list(rec["tokens"])
    return checks


def format_chat_report(
    records: Mapping[str, Sequence[Mapping[str, Any]]], checks: Sequence[TurnCheck] = ()
) -> str:
    """A table per turn and mode: prompt length, positions moved per group, bytes, and (with
    ``checks``) whether the tokens and logits match the non-disaggregated run."""
    from kvtriton.table import Column, Table, format_bytes, format_percent

    by_key = {(c.mode, c.turn): c for c in checks}
    columns: list[Column | str] = [
        "mode",
        Column("turn"),
        Column("P"),
        "moved (positions)",
        Column("bytes"),
    ]
    if checks:
        columns += ["tokens", Column("max |dlogit|")]
    table = Table(columns)
    for mode, turns in records.items():
        for k, rec in enumerate(turns):
            moved = [f"{g} [{a}, {b})" for g, (a, b) in rec["moved"].items()]
            moved += [f"{s} (state)" for s in rec.get("states", ())]
            row: list[object] = [
                mode,
                k + 1,
                rec["prompt_len"],
                ", ".join(moved) or "nothing",
                format_bytes(int(rec.get("bytes", rec["kv_bytes"]))),
            ]
            check = by_key.get((mode, k))
            if checks:
                if check is None:
                    row += ["-", "-"]
                else:
                    row += [
                        "same" if check.tokens_match else "DIFFER",
                        "0 (bit-exact)" if check.exact else f"{check.max_abs_diff:.2e}",
                    ]
            table.add_row(*row)
    lines = [table.render()]
    if "per_group" in records and "single_boundary" in records:
        for k, (pg, sb) in enumerate(
            zip(records["per_group"], records["single_boundary"], strict=True)
        ):
            a, b = int(pg.get("bytes", pg["kv_bytes"])), int(sb.get("bytes", sb["kv_bytes"]))
            if b > a:
                lines.append(
                    f"turn {k + 1}: per-group reuse moves {format_bytes(a)}, single "
                    f"boundary {format_bytes(b)} (saves {format_percent(b - a, b)})"
                )
    return "\n".join(lines)


@dataclass(frozen=True)
class ChatDemo:
    """What :func:`run_chat_demo` returns.

    Attributes:
        records: ``{mode: [turn record, ...]}`` from the generation rank.
        checks: every turn compared with the non-disaggregated run.
        report: :func:`format_chat_report` text.
        ok: every turn generated the reference's tokens, with logits bit-exact or within
            ``atol = rtol = 1e-5`` (the float32 rounding of reused receiver-computed KV).
    """

    records: Mapping[str, Sequence[Mapping[str, Any]]]
    checks: tuple[TurnCheck, ...]
    report: str
    ok: bool


def run_chat_demo(cfg: ChatConfig) -> ChatDemo:
    """Launch ``cfg`` (:func:`launch_chat`), replay it without disaggregation
    (:func:`verify_chat`) and format the report: one call for a CLI or a notebook.

    ``cfg.user_turns`` may be empty: then :func:`demo_user_turns` draws two turns (21 and
    13 tokens) below the model's vocabulary size.
    """
    import numpy as np

    model = load_model(cfg)
    if not cfg.user_turns:
        from dataclasses import replace

        cfg = replace(cfg, user_turns=demo_user_turns(vocab_size=int(model.config.vocab_size)))
    records = launch_chat(cfg)
    checks = tuple(verify_chat(model, cfg, records))
    ok = True
    for c in checks:
        expected = np.asarray(records[c.mode][c.turn]["logits"])
        bound = 1e-5 + 1e-5 * float(np.abs(expected).max())
        ok = ok and c.tokens_match and (c.exact or c.max_abs_diff <= bound)
    return ChatDemo(records, checks, format_chat_report(records, checks), ok)
