"""Workload simulator: bytes a disaggregated receiver pulls per layer group, per reuse policy.

A request trace runs through the real receiver cache manager
(:class:`kvtriton.cache.KVCacheManager`, bookkeeping only: no tensors) once per policy:

* ``no_reuse`` -- every request moves everything it needs (``cached = 0``); nothing is
  published in the prefix cache;
* ``single_boundary`` -- one reuse boundary ``c`` per request, the largest position at which
  every group could resume (what systems with one committed-token counter do);
* ``per_group`` -- each layer group keeps its own boundary (kvtriton).

For each request, in trace order: :func:`kvtriton.adapter.prepare_receive` in the policy's
mode (the manager matches the prompt, reuses cached blocks, allocates the rest, and the plan is
:func:`kvtriton.plan.plan_transfer` with the allocation's cached counts), its bytes are
counted, :func:`kvtriton.adapter.complete_receive` commits the prompt (the KV was received);
then the receiver decodes the response: each step ``append``-s the fed token, ``commit``-s at
block boundaries and ``slide``-s the windows, so sliding-window pages really leave the window
(they stay matchable until evicted); at the end the request is ``free``-d. A response of
``R`` tokens feeds ``R - 1`` of them (the first comes from the sender's prefill, the last is
never fed), so the receiver holds KV for ``[0, P + R - 1)`` when it ends.

Up to ``concurrency`` requests are live at once and decode in lock-step, one step taking each
request to its next block boundary (at most ``B`` tokens: block allocation, commits and window
releases happen at block granularity, so the cache contents match token-by-token decoding at
every block boundary). A request starts
when the request it continues (``after``) has finished and, per attention group, the free
plus evictable blocks cover the worst-case growth of every live request plus its own (so
decoding never runs out of blocks); otherwise it waits. ``OutOfBlocksError`` is only possible
(and reported as ``ValueError``) when a single request does not fit the pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from kvtriton.adapter import complete_receive, prepare_receive
from kvtriton.cache.hashing import DEFAULT_HASH, HashName, check_hash_name
from kvtriton.cache.manager import KVCacheManager, OutOfBlocksError
from kvtriton.cache.pools import blocks_for_bytes, resolve_num_blocks
from kvtriton.plan import ReusePolicy, plan_transfer
from kvtriton.ranges import ceil_div
from kvtriton.sim.report import GroupStats, PolicyResult, SimResult
from kvtriton.sim.trace import Request, Trace, check_int
from kvtriton.spec import KVCacheSpec, LayerGroup

__all__ = ["POLICIES", "default_capacity_blocks", "simulate"]

#: Every policy, in the order :func:`simulate` runs them by default.
POLICIES: tuple[ReusePolicy, ...] = ReusePolicy.baseline_order()


class _Acc:
    __slots__ = ("kv", "moved", "needed", "peak", "state", "state_moves")

    def __init__(self) -> None:
        self.needed = self.moved = self.kv = self.state = self.state_moves = self.peak = 0


class _Live:
    __slots__ = ("fed", "length", "req")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.length = len(req.prompt)
        self.fed = 0  # response tokens appended so far (R - 1 in all)


def _final_length(req: Request) -> int:
    return len(req.prompt) + len(req.response) - 1


def _resolve_capacity(
    spec: KVCacheSpec,
    capacity_blocks: int | Mapping[str, int] | None,
    capacity_bytes: int | None,
    slots: int,
) -> dict[str, int]:
    attention = [g for g in spec.groups if g.is_attention]
    if (capacity_blocks is None) == (capacity_bytes is None):
        raise ValueError("give exactly one of capacity_blocks and capacity_bytes")
    if not attention:
        return {}
    if capacity_bytes is not None:
        return resolve_num_blocks(spec, blocks_for_bytes(spec, capacity_bytes, slots))
    return resolve_num_blocks(spec, capacity_blocks)  # type: ignore[arg-type]


def simulate(
    spec: KVCacheSpec,
    trace: Trace | Sequence[Request],
    *,
    capacity_blocks: int | Mapping[str, int] | None = None,
    capacity_bytes: int | None = None,
    policies: Sequence[ReusePolicy | str] = POLICIES,
    concurrency: int = 8,
    state_slots: int | None = None,
    progress: Callable[[int], None] | None = None,
    hash_name: HashName = DEFAULT_HASH,
) -> SimResult:
    """Run ``trace`` through a fresh receiver :class:`KVCacheManager` per policy.

    Args:
        spec: the receiver's (model or shard) spec: bytes are counted over its layers/heads.
        trace: a :class:`Trace` (or a sequence of :class:`Request`).
        capacity_blocks: blocks per attention group (one int for all, or ``{group: n}``);
            or ``capacity_bytes``: a byte budget over all pools (the same block count for
            every attention group, after the state slots; see ``blocks_for_bytes``).
        policies: any of the :class:`~kvtriton.plan.ReusePolicy` members (or their names).
        concurrency: the most requests live (decoding) at once.
        state_slots: slots per state group (live states plus cached snapshots); default
            ``4 * concurrency``.
        progress: called with 1 after each request is planned (e.g. ``tqdm.update``).
        hash_name: the receiver cache's block hash (``"sha256"`` or ``"xxh3_128"``; the
            results are the same, only the time differs).

    Raises:
        ValueError: bad arguments, or a request that does not fit the pool even alone.
    """
    if not isinstance(trace, Trace):
        trace = Trace(tuple(trace))
    if not trace.requests:
        raise ValueError("the trace holds no request")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies or len(set(policies)) != len(policies):
        raise ValueError(
            f"policies must be distinct names from {tuple(p.value for p in POLICIES)}, "
            f"got {[str(p) for p in policies]}"
        )
    check_int(concurrency, "concurrency", 1)
    has_state = any(g.is_state for g in spec.groups)
    slots = 4 * concurrency if state_slots is None else check_int(state_slots, "state_slots", 1)
    if has_state and slots <= concurrency:
        raise ValueError(
            f"state_slots ({slots}) must exceed concurrency ({concurrency}): "
            "each live request holds one slot"
        )
    blocks = _resolve_capacity(spec, capacity_blocks, capacity_bytes, slots if has_state else 0)
    ids = [r.request_id for r in trace.requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids in the trace must be unique")
    results = {
        policy: _run(
            spec,
            trace,
            policy,
            blocks,
            slots if has_state else 0,
            concurrency,
            progress,
            check_hash_name(hash_name),
        )
        for policy in map(ReusePolicy, policies)
    }
    return SimResult(
        spec_name=spec.name,
        trace=trace.summary(),
        tokens_per_block=spec.tokens_per_block,
        pool_blocks=blocks,
        state_slots=slots if has_state else 0,
        concurrency=concurrency,
        policies=results,
    )


def _run(
    spec: KVCacheSpec,
    trace: Trace,
    policy: ReusePolicy,
    blocks: dict[str, int],
    slots: int,
    concurrency: int,
    progress: Callable[[int], None] | None,
    hash_name: HashName,
) -> PolicyResult:
    mgr = KVCacheManager(spec, blocks or None, num_state_slots=slots, hash_name=hash_name)
    bsz = spec.tokens_per_block
    attention = [g for g in spec.groups if g.is_attention]
    acc = {g.name: _Acc() for g in spec.groups}
    publish = policy is not ReusePolicy.NO_REUSE
    mode = policy.cache_mode
    pending = list(trace.requests)
    finished: set[str] = set()
    live: dict[str, _Live] = {}
    full_hits = waits = 0

    def growth(state: _Live, group: LayerGroup) -> int:
        # Blocks held now (spans end at ceil(L/B); a sliding span, slid after every step,
        # starts at the block of needed(L).start), without building spans.
        rule = group.rule
        held = ceil_div(state.length, bsz) - rule.first_block(group, state.length, bsz)
        return max(0, rule.peak_blocks(group, _final_length(state.req), bsz) - held)

    def fits(req: Request) -> bool:
        for g in attention:
            need = g.rule.peak_blocks(g, _final_length(req), bsz)
            need += sum(growth(s, g) for s in live.values())
            if need > mgr.num_free_blocks(g.name):
                return False
        return True

    def track() -> None:
        for name, st in mgr.stats().items():
            a = acc[name]
            a.peak = max(a.peak, st["referenced"])

    while pending or live:
        i = 0
        while i < len(pending) and len(live) < concurrency:
            req = pending[i]
            if req.after is not None and req.after not in finished:
                i += 1
                continue
            if live and not fits(req):
                waits += 1
                break
            rid = req.request_id
            try:
                rx = prepare_receive(mgr, rid, req.prompt, mode=mode)
            except OutOfBlocksError as exc:
                if live:
                    waits += 1
                    break
                raise ValueError(
                    f"{policy}: request {rid!r} (P={len(req.prompt)}) does not fit "
                    f"the pool even alone: {exc}; raise the capacity"
                ) from None
            # no_reuse never publishes, so its match finds nothing: the plan is cached = 0
            # (a sliding group's vacuous count needed.start moves the same positions).
            plan = rx.plan if publish else plan_transfer(spec, len(req.prompt), 0)
            for gt in plan.groups:
                a = acc[gt.name]
                a.needed += len(gt.needed)
                a.moved += len(gt.tokens)
                a.kv += gt.kv_bytes
                a.state += gt.state_bytes
                a.state_moves += int(gt.moves_state)
            full_hits += int(plan.is_full_hit)
            if publish:
                complete_receive(mgr, rx)
            live[rid] = _Live(req)
            pending.pop(i)
            if progress is not None:
                progress(1)
        track()
        if not live:
            raise AssertionError("no request could start")  # after= always names earlier ones
        for rid in list(live):
            state = live[rid]
            req = state.req
            left = len(req.response) - 1 - state.fed
            if left > 0:
                # One step decodes up to the next block boundary (at most B tokens).
                n = min(left, bsz - state.length % bsz)
                try:
                    mgr.append(rid, req.response[state.fed : state.fed + n])
                except OutOfBlocksError as exc:
                    raise ValueError(
                        f"{policy}: request {rid!r} ran out of blocks while "
                        f"decoding: {exc}; raise the capacity"
                    ) from None
                state.fed += n
                state.length += n
                if publish and state.length % bsz == 0:
                    mgr.commit(rid, state.length)
                mgr.slide(rid)
            else:
                if publish:
                    mgr.commit(rid)
                mgr.free(rid)
                finished.add(rid)
                del live[rid]
        track()
    groups = tuple(
        GroupStats(
            name=g.name,
            kind=g.kind,
            window=g.window,
            layers=g.num_layers,
            needed_tokens=acc[g.name].needed,
            moved_tokens=acc[g.name].moved,
            kv_bytes=acc[g.name].kv,
            state_bytes=acc[g.name].state,
            state_moves=acc[g.name].state_moves,
            requests=len(trace.requests),
            peak_blocks_in_use=acc[g.name].peak,
            pool_blocks=blocks[g.name] if g.is_attention else slots,
        )
        for g in spec.groups
    )
    return PolicyResult(
        policy=policy, groups=groups, requests=len(trace.requests), full_hits=full_hits, waits=waits
    )


def default_capacity_blocks(
    spec: KVCacheSpec, trace: Trace, *, concurrency: int = 8, factor: float = 4.0
) -> int:
    """A pool size that holds ``concurrency`` of the trace's longest requests ``factor`` times
    over (room for a prefix cache beside the live requests), in blocks per group."""
    longest = max(_final_length(r) for r in trace.requests)
    return max(1, math.ceil(factor * concurrency * ceil_div(longest, spec.tokens_per_block)))
