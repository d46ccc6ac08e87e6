"""Workload simulator: bytes and time a disaggregated receiver spends per layer group and per
reuse policy.

A request trace runs through the real receiver cache manager
(:class:`kvtriton.cache.KVCacheManager`, bookkeeping only: no tensors) once per policy:

* ``no_reuse`` -- every request moves everything it needs (``cached = 0``); nothing is
  published in the prefix cache;
* ``single_boundary`` -- one reuse boundary ``c`` per request, the largest position at which
  every group could resume (what systems with one committed-token counter do; the cache
  manager's ``PrefixMatch.boundary``, DESIGN.md §1);
* ``per_group`` -- each layer group keeps its own boundary (kvtriton).

The clock (a discrete-event simulation; rates and the link are a
:class:`~kvtriton.sim.timing.TimeModel`):

1. a request is *ready* at its arrival time (``Request.arrival``, 0 when the trace has none)
   once the request it continues (``after``) has finished;
2. the **context side** prefills ready requests first come, first served on
   ``context_ranks`` ranks, each taking ``uncached / prefill_tokens_per_s``: with
   ``context_cache`` it resumes after the longest block-aligned prefix it prefilled before
   (an unbounded prefix cache holding every layer it computed; a decoded response was never
   computed there), else it prefills the whole prompt;
3. the **receiver** admits requests first come, first served: the earliest ready request in
   trace (arrival) order, once its prefill is done (a request still prefilling holds back
   those after it), when fewer than ``concurrency`` are live and, per attention group, the
   free plus evictable blocks cover the worst-case growth of every live request plus the
   new one (otherwise it waits). Admission is
   the ask: :func:`kvtriton.adapter.prepare_receive` in the policy's mode (the manager
   matches the prompt, reuses cached blocks, allocates the rest; the plan is
   :func:`kvtriton.plan.plan_transfer` with the allocation's counts), its bytes are counted;
4. the **link** moves one request at a time, first come first served:
   ``overhead + bytes / bandwidth`` once it is free. ``transfer`` is ask -> committed (the
   link's queue included), ``TTFT`` is ready -> committed (= context queue + prefill +
   admission wait + transfer);
5. the receiver commits the prompt (:func:`kvtriton.adapter.complete_receive`) and decodes
   the response at ``decode_tokens_per_s``: each event takes a request to its next block
   boundary (``append`` the fed tokens, ``commit`` a full block, ``slide`` the windows, so
   sliding-window pages really leave the window and stay matchable until evicted); at the
   end the request is ``free``-d. A response of ``R`` tokens feeds ``R - 1`` of them (the
   first comes from the sender's prefill, the last is never fed), so the receiver holds KV
   for ``[0, P + R - 1)`` when it ends.

The receiver's cache sees the prompt committed at admission and starts decoding there: the
link's delay counts in TTFT but does not hold the receiver back (transfers take milliseconds
against seconds of decoding; on a link loaded past its capacity the queue grows on the link,
where a real receiver would hold its decode slots and queue at admission). So the order of cache
operations does not depend on the link nor on the policy's bytes (only on memory pressure,
through admission), and the policies are compared on the same schedule: a faster link is
never slower, and no reuse is never faster than per-group reuse request by request (with
room enough that admission does not differ). With ``concurrency=1`` requests run one at a
time, in trace order (passing over a request whose ``after`` has not finished): the bytes
are exactly those of the untimed simulator this one replaced. ``OutOfBlocksError`` is only
possible (and reported as ``ValueError``) when a single request does not fit the pool.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from kvtriton.adapter import complete_receive, prepare_receive
from kvtriton.cache.hashing import DEFAULT_HASH, HashName, check_hash_name
from kvtriton.cache.manager import KVCacheManager, OutOfBlocksError, PrefixMatch
from kvtriton.cache.pools import blocks_for_bytes, resolve_num_blocks
from kvtriton.plan import ReusePolicy, plan_transfer
from kvtriton.ranges import ceil_div
from kvtriton.sim.report import GroupStats, PolicyResult, SimResult, TimeStats
from kvtriton.sim.timing import Percentiles, TimeModel
from kvtriton.sim.trace import Request, Trace, check_int
from kvtriton.spec import KVCacheSpec, LayerGroup

__all__ = ["POLICIES", "default_capacity_blocks", "simulate"]

#: Every policy, in the order :func:`simulate` runs them by default.
POLICIES: tuple[ReusePolicy, ...] = ReusePolicy.baseline_order()

# event kinds, in the order ties at one time are broken (then by insertion)
_READY, _PREFILLED, _DECODE = 0, 1, 2


class _Acc:
    __slots__ = ("kv", "moved", "needed", "peak", "state", "state_moves")

    def __init__(self) -> None:
        self.needed = self.moved = self.kv = self.state = self.state_moves = self.peak = 0


class _Live:
    __slots__ = ("fed", "length", "req", "step")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.length = len(req.prompt)
        self.fed = 0  # response tokens appended so far (R - 1 in all)
        self.step = 0  # tokens the pending decode event appends


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
    time_model: TimeModel | None = None,
) -> SimResult:
    """Run ``trace`` through a fresh receiver :class:`KVCacheManager` per policy.

    Args:
        spec: the receiver's (model or shard) spec: bytes are counted over its layers/heads.
        trace: a :class:`Trace` (or a sequence of :class:`Request`), in arrival order.
        capacity_blocks: blocks per attention group (one int for all, or ``{group: n}``);
            or ``capacity_bytes``: a byte budget over all pools (the same block count for
            every attention group, after the state slots; see ``blocks_for_bytes``).
        policies: any of the :class:`~kvtriton.plan.ReusePolicy` members (or their names).
        concurrency: the most requests live (decoding) at once on the receiver.
        state_slots: slots per state group (live states plus cached snapshots); default
            ``4 * concurrency``.
        progress: called with 1 after each request is planned (e.g. ``tqdm.update``).
        hash_name: the receiver cache's block hash (``"sha256"`` or ``"xxh3_128"``; the
            results are the same, only the time differs).
        time_model: link, prefill and decode rates (default :class:`TimeModel`: the
            ``nccl`` link profile and the stated default rates).

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
    model = TimeModel() if time_model is None else time_model
    if not isinstance(model, TimeModel):
        raise TypeError(f"time_model must be a TimeModel, got {type(model).__name__}")
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
    known: set[str] = set()
    for r in trace.requests:
        if r.after is not None and r.after not in known:
            raise ValueError(f"request {r.request_id!r}: after {r.after!r} is no earlier request")
        known.add(r.request_id)
        if r.arrival is not None and not 0 <= r.arrival < math.inf:
            raise ValueError(f"request {r.request_id!r}: arrival must be >= 0 s, got {r.arrival}")
    results = {
        policy: _Run(
            spec,
            trace,
            policy,
            blocks,
            slots if has_state else 0,
            concurrency,
            progress,
            check_hash_name(hash_name),
            model,
        ).run()
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
        time_model=model,
    )


class _Run:
    """One policy's simulation (see the module docstring)."""

    def __init__(
        self,
        spec: KVCacheSpec,
        trace: Trace,
        policy: ReusePolicy,
        blocks: dict[str, int],
        slots: int,
        concurrency: int,
        progress: Callable[[int], None] | None,
        hash_name: HashName,
        model: TimeModel,
    ) -> None:
        self.spec = spec
        self.requests = trace.requests
        self.policy = policy
        self.blocks = blocks
        self.slots = slots
        self.concurrency = concurrency
        self.progress = progress
        self.model = model
        self.mgr = KVCacheManager(spec, blocks or None, num_state_slots=slots, hash_name=hash_name)
        self.bsz = spec.tokens_per_block
        self.attention = [g for g in spec.groups if g.is_attention]
        self.acc = {g.name: _Acc() for g in spec.groups}
        self.publish = policy is not ReusePolicy.NO_REUSE
        self.full_hits = self.waits = 0
        n = len(self.requests)
        self.index = {r.request_id: i for i, r in enumerate(self.requests)}
        self.children: dict[int, list[int]] = {}
        for i, r in enumerate(self.requests):
            if r.after is not None:
                self.children.setdefault(self.index[r.after], []).append(i)
        # per request: when it was ready, its prompt's match (taken at prefill), when its
        # prefill ended, what each phase took
        self.ready = [math.nan] * n
        self.match: list[PrefixMatch | None] = [None] * n
        self.prefilled = [math.nan] * n
        self.queue_s = [0.0] * n
        self.prefill_s = [0.0] * n
        self.admission_s = [0.0] * n
        self.transfer_s = [0.0] * n
        self.ttft_s = [0.0] * n
        self.finished = [False] * n
        self.pending: list[int] = list(range(n))  # not yet admitted, trace order
        self.live: dict[int, _Live] = {}
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.ctx_queue: deque[int] = deque()
        self.ctx_idle = model.context_ranks
        self.ctx_index: set[bytes] = set()
        self.link_free = 0.0
        self.link_busy = 0.0
        self.now = 0.0

    # -- events ---------------------------------------------------------------------------
    def push(self, t: float, kind: int, i: int) -> None:
        heapq.heappush(self.events, (t, kind, self.seq, i))
        self.seq += 1

    def run(self) -> PolicyResult:
        for i, r in enumerate(self.requests):
            if r.after is None:
                self.push(r.arrival or 0.0, _READY, i)
        while self.events:
            t, kind, _, i = heapq.heappop(self.events)
            self.now = t
            if kind == _READY:
                self.make_ready(i)
            elif kind == _PREFILLED:
                self.ctx_idle += 1
                self.prefilled[i] = t
                if self.model.context_cache:
                    self.ctx_index.update(self.match[i].hashes)  # type: ignore[union-attr]
                self.start_prefills()
            else:
                self.decode(i)
            self.admit()
        if self.pending or self.live:
            raise AssertionError("the simulation stopped with requests left")  # never: after=
        return self.result()

    def make_ready(self, i: int) -> None:
        self.ready[i] = self.now
        self.ctx_queue.append(i)
        self.start_prefills()

    def start_prefills(self) -> None:
        while self.ctx_idle and self.ctx_queue:
            i = self.ctx_queue.popleft()
            self.ctx_idle -= 1
            req = self.requests[i]
            match = self.mgr.match(req.prompt_ids())
            self.match[i] = match
            p = len(req.prompt)
            cached = 0
            if self.model.context_cache:
                index = self.ctx_index
                for h in match.hashes:
                    if h not in index:
                        break
                    cached += self.bsz
            uncached = p - min(cached, p - 1)  # the last position is always computed
            self.queue_s[i] = self.now - self.ready[i]
            self.prefill_s[i] = self.model.prefill_seconds(uncached)
            self.push(self.now + self.prefill_s[i], _PREFILLED, i)

    # -- the receiver ---------------------------------------------------------------------
    def growth(self, state: _Live, group: LayerGroup) -> int:
        # Blocks held now (spans end at ceil(L/B); a sliding span, slid after every step,
        # starts at the block of needed(L).start), without building spans.
        bsz, rule = self.bsz, group.rule
        held = ceil_div(state.length, bsz) - rule.first_block(group, state.length, bsz)
        return max(0, rule.peak_blocks(group, _final_length(state.req), bsz) - held)

    def fits(self, req: Request) -> bool:
        for g in self.attention:
            need = g.rule.peak_blocks(g, _final_length(req), self.bsz)
            need += sum(self.growth(s, g) for s in self.live.values())
            if need > self.mgr.num_free_blocks(g.name):
                return False
        return True

    def track(self) -> None:
        for name, st in self.mgr.stats().items():
            a = self.acc[name]
            a.peak = max(a.peak, st["referenced"])

    def admit(self) -> None:
        while self.pending and len(self.live) < self.concurrency:
            pos = next(
                (k for k, i in enumerate(self.pending) if not math.isnan(self.ready[i])), None
            )
            if pos is None:
                return
            i = self.pending[pos]
            if math.isnan(self.prefilled[i]):
                return  # first come, first served: wait for its prefill
            req = self.requests[i]
            if self.live and not self.fits(req):
                self.waits += 1
                return
            rid = req.request_id
            try:
                rx = prepare_receive(self.mgr, rid, self.match[i], mode=self.policy.cache_mode)  # type: ignore[arg-type]
            except OutOfBlocksError as exc:
                if self.live:
                    self.waits += 1
                    return
                raise ValueError(
                    f"{self.policy}: request {rid!r} (P={len(req.prompt)}) does not fit "
                    f"the pool even alone: {exc}; raise the capacity"
                ) from None
            self.match[i] = None
            # no_reuse never publishes, so its match finds nothing: the plan is cached = 0
            # (a sliding group's vacuous count needed.start moves the same positions).
            plan = rx.plan if self.publish else plan_transfer(self.spec, len(req.prompt), 0)
            for gt in plan.groups:
                a = self.acc[gt.name]
                a.needed += len(gt.needed)
                a.moved += len(gt.tokens)
                a.kv += gt.kv_bytes
                a.state += gt.state_bytes
                a.state_moves += int(gt.moves_state)
            self.full_hits += int(plan.is_full_hit)
            # the link: first come, first served
            start = max(self.now, self.link_free)
            busy = self.model.link.seconds(plan.total_bytes)
            self.link_free = start + busy
            self.link_busy += busy
            self.admission_s[i] = self.now - self.prefilled[i]
            self.transfer_s[i] = self.link_free - self.now
            self.ttft_s[i] = self.link_free - self.ready[i]
            if self.publish:
                complete_receive(self.mgr, rx)
            self.live[i] = _Live(req)
            self.pending.pop(pos)
            if self.progress is not None:
                self.progress(1)
            self.track()
            self.next_step(i)

    def next_step(self, i: int) -> None:
        state = self.live[i]
        left = len(state.req.response) - 1 - state.fed
        if left > 0:
            # One event decodes up to the next block boundary (at most B tokens).
            state.step = min(left, self.bsz - state.length % self.bsz)
            self.push(self.now + self.model.decode_seconds(state.step), _DECODE, i)
            return
        rid = state.req.request_id
        if self.publish:
            self.mgr.commit(rid)
        self.mgr.free(rid)
        del self.live[i]
        self.finished[i] = True
        self.track()
        for child in self.children.get(i, ()):
            arrival = self.requests[child].arrival or 0.0
            if arrival <= self.now:  # ready now: before anything else is admitted
                self.make_ready(child)
            else:
                self.push(arrival, _READY, child)

    def decode(self, i: int) -> None:
        state = self.live[i]
        req, n = state.req, state.step
        rid = req.request_id
        try:
            self.mgr.append(rid, req.response[state.fed : state.fed + n])
        except OutOfBlocksError as exc:
            raise ValueError(
                f"{self.policy}: request {rid!r} ran out of blocks while decoding: {exc}; "
                "raise the capacity"
            ) from None
        state.fed += n
        state.length += n
        if self.publish and state.length % self.bsz == 0:
            self.mgr.commit(rid, state.length)
        self.mgr.slide(rid)
        self.track()
        self.next_step(i)

    # -- results --------------------------------------------------------------------------
    def result(self) -> PolicyResult:
        spec, acc = self.spec, self.acc
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
                requests=len(self.requests),
                peak_blocks_in_use=acc[g.name].peak,
                pool_blocks=self.blocks[g.name] if g.is_attention else self.slots,
            )
            for g in spec.groups
        )

        def ms(values: list[float]) -> Percentiles:
            return Percentiles.of([1000.0 * x for x in values])

        time = TimeStats(
            transfer_ms=ms(self.transfer_s),
            ttft_ms=ms(self.ttft_s),
            queue_ms=ms(self.queue_s),
            prefill_ms=ms(self.prefill_s),
            admission_ms=ms(self.admission_s),
            link_busy_s=self.link_busy,
            makespan_s=max(self.now, self.link_free),
        )
        return PolicyResult(
            policy=self.policy,
            groups=groups,
            requests=len(self.requests),
            full_hits=self.full_hits,
            waits=self.waits,
            time=time,
        )


def default_capacity_blocks(
    spec: KVCacheSpec, trace: Trace, *, concurrency: int = 8, factor: float = 4.0
) -> int:
    """A pool size that holds ``concurrency`` of the trace's longest requests ``factor`` times
    over (room for a prefix cache beside the live requests), in blocks per group."""
    longest = max(_final_length(r) for r in trace.requests)
    return max(1, math.ceil(factor * concurrency * ceil_div(longest, spec.tokens_per_block)))
