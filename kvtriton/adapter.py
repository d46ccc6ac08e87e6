"""The per-layer-group adapter: the one place that turns cache state into a transfer plan.

Receiver side::

    rx = prepare_receive(manager, request_id, prompt_token_ids, num_draft_tokens=k,
                         mode="per_group" | "single_boundary")
    # rx.plan: TransferPlan; rx.tokens {group: TokenRange to receive}; rx.states (state groups
    # whose state moves); rx.spans {group: destination BlockSpan}; rx.state_slots {group: slot}
    # rx.target: the same as a TransferTarget (validated once, block ids as int32 arrays):
    # what kvtriton.transfer and kvtriton.kernels take
    ... receive into the pools (TransferAgent.request(rx.target, ...)) ...
    complete_receive(manager, rx)      # success: commit P tokens (blocks become matchable)
    abort_receive(manager, rx)         # failure: free; nothing reaches the prefix cache

Sender side (the rank that prefilled the request; it allocated it with
``manager.allocate(request_id, tokens, prefill=True)`` and may commit it like any prefill)::

    target = source_target(manager, request_id)         # everything it holds, validated once
    src = source_spans(manager, request_id, rx.plan)    # or ({group: TokenRange}, states)
    # src.spans {group: BlockSpan covering its range}, src.state_slots {group: slot}

The receiver's match runs over the prompt's token ids, so the sender and receiver agree on
positions, never on block ids. Destination spans never put a transferred position into a
block reused from the prefix cache (checked), so a failed transfer cannot corrupt a cached
block, and an aborted receive publishes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvtriton.cache.hashing import ExtraKey
from kvtriton.cache.manager import Allocation, KVCacheManager, PrefixMatch, RequestId
from kvtriton.plan import Mode, TransferPlan, plan_transfer
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.target import TransferTarget

__all__ = [
    "ReceivePlan",
    "SourceSpans",
    "abort_receive",
    "complete_receive",
    "prepare_receive",
    "preview_plan",
    "source_spans",
    "source_target",
]


@dataclass(frozen=True)
class ReceivePlan:
    """A receiver's plan for one request: what each group receives and where it lands.

    Attributes:
        request_id: the request (live in the manager until complete/abort).
        plan: the :class:`~kvtriton.plan.TransferPlan` (per-group ranges, bytes).
        spans: ``{attention group: destination BlockSpan}``; covers ``needed`` plus drafts.
        state_slots: ``{state group: destination slot}`` (every state group; see ``states``).
        allocation: what the manager reused and allocated.
        target: the destination of exactly what moves (groups with a non-empty range, state
            groups whose state moves), validated against the pool sizes once.
    """

    request_id: RequestId
    plan: TransferPlan
    spans: Mapping[str, BlockSpan]
    state_slots: Mapping[str, int]
    allocation: Allocation
    target: TransferTarget

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    @property
    def mode(self) -> Mode:
        return self.plan.mode

    @property
    def tokens(self) -> dict[str, TokenRange]:
        """``{attention group: positions to receive}`` (possibly empty), for ``packed_layout``."""
        return {g.name: g.tokens for g in self.plan.groups if g.group.is_attention}

    @property
    def states(self) -> tuple[str, ...]:
        """State groups whose state is received."""
        return self.plan.state_groups

    @property
    def total_bytes(self) -> int:
        return self.plan.total_bytes


@dataclass(frozen=True)
class SourceSpans:
    """A sender's blocks for one request, checked to cover the requested ranges.

    Attributes:
        request_id: the sender-side request.
        tokens: ``{attention group: positions to send}`` (groups this sender holds).
        states: state groups whose state is sent.
        spans: ``{attention group: BlockSpan}`` covering ``tokens[group]``.
        state_slots: ``{state group: slot}`` for the groups in ``states``.
    """

    request_id: RequestId
    tokens: Mapping[str, TokenRange]
    states: tuple[str, ...]
    spans: Mapping[str, BlockSpan]
    state_slots: Mapping[str, int]


def preview_plan(
    manager: KVCacheManager,
    tokens: Sequence[int],
    *,
    num_draft_tokens: int = 0,
    mode: Mode = "per_group",
    extra_key: ExtraKey = None,
) -> TransferPlan:
    """The plan :func:`prepare_receive` would make now, without allocating anything."""
    match = manager.match(tokens, extra_key=extra_key)
    return plan_transfer(
        manager.spec, match.num_tokens, match.cached_tokens(mode), num_draft_tokens=num_draft_tokens
    )


def prepare_receive(
    manager: KVCacheManager,
    request_id: RequestId,
    tokens: Sequence[int] | PrefixMatch,
    *,
    num_draft_tokens: int = 0,
    mode: Mode = "per_group",
    extra_key: ExtraKey = None,
) -> ReceivePlan:
    """Allocate destination blocks for a request and plan what each group must receive.

    ``tokens`` are the prompt's token ids (``P = len(tokens)``), or the manager's
    :class:`~kvtriton.cache.PrefixMatch` for them (no rehashing); ``mode`` picks per-group
    reuse or the single-boundary baseline. The plan is
    ``plan_transfer(spec, P, allocation.cached_tokens(), num_draft_tokens=k)``: a group
    receives ``[max(cached, needed.start), P)``; a state group receives its state unless the
    slot was restored from a snapshot at ``P``. Raises like
    :meth:`~kvtriton.cache.KVCacheManager.allocate` (nothing allocated on error).
    """
    alloc = manager.allocate(request_id, tokens, num_draft_tokens, mode, extra_key=extra_key)
    try:
        plan = plan_transfer(
            manager.spec,
            alloc.num_tokens,
            alloc.cached_tokens(),
            num_draft_tokens=alloc.num_draft_tokens,
        )
        bsz = manager.tokens_per_block
        for g in plan.groups:
            if g.group.is_state:
                if g.moves_state == alloc.state_hits[g.name]:
                    raise RuntimeError(
                        f"request {request_id!r}: group {g.name!r}: state hit "
                        f"{alloc.state_hits[g.name]} disagrees with the plan"
                    )
                continue
            span = alloc.spans[g.name]
            span.check_covers(g.tokens, bsz, group=g.name, side="receiver")
            reused = alloc.reused_blocks[g.name]
            if reused and not g.tokens.is_empty and g.tokens.start < reused.stop * bsz:
                raise RuntimeError(
                    f"request {request_id!r}: group {g.name!r}: transfer range {g.tokens} "
                    f"would write into reused cached blocks {reused}"
                )
        tokens = {g.name: g.tokens for g in plan.groups if g.group.is_attention}
        states = plan.state_groups
        target = TransferTarget.from_spans(
            str(request_id),
            alloc.num_tokens,
            tokens,
            alloc.spans,
            {g: alloc.state_slots[g] for g in states},
            tokens_per_block=bsz,
            num_blocks={g: manager.num_blocks(g) for g in tokens},
            num_slots={g: manager.num_blocks(g) for g in states},
            destination=True,
        )
    except BaseException:
        manager.free(request_id)
        raise
    return ReceivePlan(
        request_id=request_id,
        plan=plan,
        spans=dict(alloc.spans),
        state_slots=dict(alloc.state_slots),
        allocation=alloc,
        target=target,
    )


def _request_id(receive: ReceivePlan | RequestId) -> RequestId:
    return receive.request_id if isinstance(receive, ReceivePlan) else receive


def complete_receive(manager: KVCacheManager, receive: ReceivePlan | RequestId) -> dict[str, int]:
    """After a successful receive: commit the prompt's ``P`` tokens (full blocks become
    matchable, a state snapshot is taken at a block-aligned ``P``). The request stays live
    for decoding. Returns ``{group: entries published}``."""
    request_id = _request_id(receive)
    p = (
        receive.num_tokens
        if isinstance(receive, ReceivePlan)
        else (manager.request(request_id).num_tokens)
    )
    return manager.commit(request_id, p)


def abort_receive(manager: KVCacheManager, receive: ReceivePlan | RequestId) -> None:
    """After a failed receive: free the request's blocks and slots without committing, so
    nothing written by the failed transfer ever reaches the prefix cache."""
    manager.free(_request_id(receive))


def source_spans(
    manager: KVCacheManager,
    request_id: RequestId,
    ranges: TransferPlan | Mapping[str, TokenRange],
    states: Iterable[str] = (),
) -> SourceSpans:
    """The sender's spans (and state slots) for the positions a receiver asked for.

    ``ranges`` is the receiver's plan (its state groups are taken from it; groups this
    sender's spec does not hold, e.g. on another pipeline stage, are skipped) or
    ``{group: TokenRange}`` with ``states`` (every named group must be held). Raises
    ``ValueError`` naming the group and positions when the sender's sequence or span does not
    hold a requested position (e.g. a sliding window already slid past it).
    """
    spec = manager.spec
    held = set(spec.group_names)
    if isinstance(ranges, TransferPlan):
        tokens = {
            g.name: g.tokens for g in ranges.groups if g.group.is_attention and g.name in held
        }
        wanted_states = tuple(name for name in ranges.state_groups if name in held)
    else:
        tokens = dict(ranges)
        wanted_states = tuple(states)
        unknown = sorted((set(tokens) | set(wanted_states)) - held)
        if unknown:
            raise ValueError(
                f"request {request_id!r}: sender spec {spec.name!r} holds no groups {unknown}; "
                f"it holds {list(spec.group_names)}"
            )
    state = manager.request(request_id)
    bsz = manager.tokens_per_block
    spans: dict[str, BlockSpan] = {}
    for name, rng in tokens.items():
        group = spec.group(name)
        if not isinstance(rng, TokenRange):
            raise TypeError(
                f"request {request_id!r}: range of group {name!r} must be a "
                f"TokenRange, got {type(rng).__name__}"
            )
        if group.is_state:
            if not rng.is_empty:
                raise ValueError(
                    f"request {request_id!r}: group {name!r} is a state group; "
                    f"it has no token positions to send ({rng})"
                )
            continue
        if rng.end > state.num_tokens:
            raise ValueError(
                f"request {request_id!r}: group {name!r}: positions "
                f"[{max(rng.start, state.num_tokens)}, {rng.end}) are past the sender's "
                f"sequence of {state.num_tokens} tokens"
            )
        span = state.spans[name]
        span.check_covers(rng, bsz, group=name, side=f"request {request_id!r}: sender")
        spans[name] = span
    slots: dict[str, int] = {}
    for name in wanted_states:
        if not spec.group(name).is_state:
            raise ValueError(f"request {request_id!r}: group {name!r} is not a state group")
        slots[name] = state.state_slots[name]
    return SourceSpans(
        request_id=request_id, tokens=tokens, states=wanted_states, spans=spans, state_slots=slots
    )


def source_target(manager: KVCacheManager, request_id: RequestId) -> TransferTarget:
    """Everything a sender holds of a prefilled request, as a :class:`TransferTarget`
    (validated once): per attention group the positions of its prompt ``[0, P)`` its span
    holds with valid KV (a slid window holds fewer), per state group its slot. What a
    receiver may ask this sender for is checked against it."""
    state = manager.request(request_id)
    spec = manager.spec
    bsz = manager.tokens_per_block
    p = state.num_tokens
    tokens: dict[str, TokenRange] = {}
    for name, span in state.spans.items():
        held = span.covered(bsz).intersect(TokenRange(0, p))
        start = max(held.start, state.valid_from.get(name, 0))
        if start < held.end:
            tokens[name] = TokenRange(start, held.end)
    states = {g.name: state.state_slots[g.name] for g in spec.groups if g.is_state}
    return TransferTarget.from_spans(
        str(request_id),
        p,
        tokens,
        state.spans,
        states,
        tokens_per_block=bsz,
        num_blocks={g: manager.num_blocks(g) for g in tokens},
        num_slots={g: manager.num_blocks(g) for g in states},
        destination=False,
    )
