"""What a simulation measured: per group (:class:`GroupStats`), per policy
(:class:`PolicyResult`, with its :class:`TimeStats`) and over all policies (:class:`SimResult`,
with the text table that ``kvtriton simulate`` prints and the JSON it writes).

JSON (``SimResult.to_dict()``, ``kvtriton simulate --json``)::

    {"spec", "trace": {...summary}, "tokens_per_block", "pool_blocks", "state_slots",
     "concurrency", "time_model": {"link": {"name", "gbps", "request_overhead_us", ...},
                                   "prefill_tokens_per_s", "decode_tokens_per_s",
                                   "context_ranks", "context_cache"},
     "policies": {POLICY: {"policy", "requests", "full_hits", "waits", "total_bytes",
                           "groups": [{"group", "kind", ..., "bytes", "hit_rate"}, ...],
                           "time": {"transfer_ms": {"p50", "p90", "p99", "mean"},
                                    "ttft_ms": {...}, "queue_ms": {...},
                                    "prefill_ms": {...}, "admission_ms": {...},
                                    "link_busy_s", "makespan_s"}}},
     "savings": {"per_group_vs_single_boundary": {"bytes", "fraction"}, ...}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvtriton.plan import ReusePolicy
from kvtriton.ranges import GroupKind
from kvtriton.sim.timing import Percentiles, TimeModel
from kvtriton.table import Column, Table, format_bytes, format_count

__all__ = ["GroupStats", "PolicyResult", "SimResult", "TimeStats"]


@dataclass(frozen=True)
class TimeStats:
    """One policy's time per request (milliseconds), see :mod:`kvtriton.sim.engine`.

    Attributes:
        transfer_ms: ask -> committed: waiting for the link plus ``overhead + bytes / bw``.
        ttft_ms: ready -> committed = ``queue + prefill + admission + transfer``.
        queue_ms: ready -> prefill start (waiting for a context rank).
        prefill_ms: the context side's prefill of the uncached part.
        admission_ms: prefilled -> ask (waiting for a decode slot, for memory, or behind an
            earlier request).
        link_busy_s: seconds the link was busy; makespan_s: when the last request ended
            (its decode, or the link, whichever is later).
    """

    transfer_ms: Percentiles
    ttft_ms: Percentiles
    queue_ms: Percentiles
    prefill_ms: Percentiles
    admission_ms: Percentiles
    link_busy_s: float
    makespan_s: float

    #: The per-request series, in table order: (attribute, label).
    SERIES = (
        ("transfer_ms", "transfer"),
        ("ttft_ms", "TTFT"),
        ("queue_ms", "  context queue"),
        ("prefill_ms", "  prefill"),
        ("admission_ms", "  admission"),
    )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {attr: getattr(self, attr).to_dict() for attr, _ in self.SERIES}
        out["link_busy_s"] = self.link_busy_s
        out["makespan_s"] = self.makespan_s
        return out


@dataclass(frozen=True)
class GroupStats:
    """One layer group under one policy, summed over the trace.

    Attributes:
        name, kind, window, layers: the group.
        needed_tokens: sum over requests of ``len(needed(g, P))`` (0 for state groups).
        moved_tokens: positions moved (``<= needed_tokens``).
        kv_bytes, state_bytes: bytes moved.
        state_moves: requests whose state moved (state groups).
        requests: requests planned.
        peak_blocks_in_use: the most blocks (or state slots) referenced by live requests at once.
        pool_blocks: the group's pool size (blocks, or state slots).
    """

    name: str
    kind: GroupKind
    window: int | None
    layers: int
    needed_tokens: int
    moved_tokens: int
    kv_bytes: int
    state_bytes: int
    state_moves: int
    requests: int
    peak_blocks_in_use: int
    pool_blocks: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", GroupKind.parse(self.kind, where=f"group {self.name!r}"))

    @property
    def bytes(self) -> int:
        return self.kv_bytes + self.state_bytes

    @property
    def hit_rate(self) -> float:
        """Fraction of needed positions already on the receiver (state: requests whose state
        stayed); in ``[0, 1]``, 0 when nothing was needed."""
        if self.kind.has_state:
            return 1 - self.state_moves / self.requests if self.requests else 0.0
        if not self.needed_tokens:
            return 0.0
        return 1 - self.moved_tokens / self.needed_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.name,
            "kind": self.kind,
            "window": self.window,
            "layers": self.layers,
            "needed_tokens": self.needed_tokens,
            "moved_tokens": self.moved_tokens,
            "kv_bytes": self.kv_bytes,
            "state_bytes": self.state_bytes,
            "bytes": self.bytes,
            "state_moves": self.state_moves,
            "hit_rate": self.hit_rate,
            "peak_blocks_in_use": self.peak_blocks_in_use,
            "pool_blocks": self.pool_blocks,
        }


@dataclass(frozen=True)
class PolicyResult:
    """One policy over the whole trace.

    Attributes:
        policy: the :class:`~kvtriton.plan.ReusePolicy` simulated.
        groups: per layer group, in spec order.
        requests: requests planned (all of the trace).
        full_hits: requests that moved nothing at all.
        waits: admission attempts deferred because the pool could not cover the worst-case
            growth of the live requests plus the next one (a measure of capacity pressure).
        time: transfer time, TTFT and their parts per request (``None`` if not simulated).
    """

    policy: ReusePolicy
    groups: tuple[GroupStats, ...]
    requests: int
    full_hits: int
    waits: int
    time: TimeStats | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", ReusePolicy.parse(self.policy))

    @property
    def total_bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    @property
    def peak_blocks_in_use(self) -> int:
        """Sum over attention groups of each group's peak (an upper bound of the joint peak)."""
        return sum(g.peak_blocks_in_use for g in self.groups if g.kind.pages_tokens)

    def group(self, name: str) -> GroupStats:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no layer group {name!r}; groups: {[g.name for g in self.groups]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "requests": self.requests,
            "full_hits": self.full_hits,
            "waits": self.waits,
            "total_bytes": self.total_bytes,
            "groups": [g.to_dict() for g in self.groups],
            **({"time": self.time.to_dict()} if self.time is not None else {}),
        }


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` measured: one :class:`PolicyResult` per policy.

    Attributes:
        spec_name: the spec's label; trace: :meth:`Trace.summary`.
        tokens_per_block: ``B``; pool_blocks: ``{attention group: blocks}``; state_slots:
            slots per state group (0 without state groups); concurrency: live requests.
        policies: ``{policy: PolicyResult}`` in the order simulated.
        time_model: the link and rates the clock ran on.
    """

    spec_name: str
    trace: Mapping[str, Any]
    tokens_per_block: int
    pool_blocks: Mapping[str, int]
    state_slots: int
    concurrency: int
    policies: Mapping[str, PolicyResult]
    time_model: TimeModel | None = None

    def __getitem__(self, policy: str) -> PolicyResult:
        try:
            return self.policies[policy]
        except KeyError:
            raise KeyError(
                f"policy {policy!r} was not simulated; ran {[str(p) for p in self.policies]}"
            ) from None

    def savings(
        self,
        policy: ReusePolicy | str = ReusePolicy.PER_GROUP,
        baseline: ReusePolicy | str = ReusePolicy.SINGLE_BOUNDARY,
    ) -> tuple[int, float]:
        """``(bytes saved, fraction saved)`` of ``policy`` against ``baseline``."""
        base = self[baseline].total_bytes
        saved = base - self[policy].total_bytes
        return saved, (saved / base if base else 0.0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec_name,
            "trace": dict(self.trace),
            "tokens_per_block": self.tokens_per_block,
            "pool_blocks": dict(self.pool_blocks),
            "state_slots": self.state_slots,
            "concurrency": self.concurrency,
            **({"time_model": self.time_model.to_dict()} if self.time_model else {}),
            "policies": {str(name): p.to_dict() for name, p in self.policies.items()},
            "savings": {},
        }
        for policy, baseline in _saving_pairs(self.policies):
            saved, frac = self.savings(policy, baseline)
            out["savings"][f"{policy}_vs_{baseline}"] = {"bytes": saved, "fraction": frac}
        return out

    def table(self) -> str:
        """Aligned text: one row per layer group, per policy its hit rate, bytes moved and peak
        blocks in use; totals and the savings below (what ``kvtriton simulate`` prints)."""
        t = self.trace
        order = [p for p in ReusePolicy.table_order() if p in self.policies]
        columns: list[Column | str] = ["group", "kind", Column("layers")]
        for _ in order:
            columns += [Column("hit rate"), Column("moved"), Column("bytes"), Column("peak")]
        table = Table(columns, spans=[("", 3), *((p.label, 4) for p in order)])
        first = self.policies[order[0]]
        for g in first.groups:
            cells: list[object] = [g.name, g.kind, g.layers]
            for p in order:
                s = self.policies[p].group(g.name)
                moved = f"{s.state_moves} st" if s.kind.has_state else format_count(s.moved_tokens)
                cells += [
                    f"{100 * s.hit_rate:.1f}%",
                    moved,
                    format_bytes(s.bytes),
                    format_count(s.peak_blocks_in_use),
                ]
            table.add_row(*cells)
        table.add_rule()
        totals: list[object] = ["total", "", sum(g.layers for g in first.groups)]
        for p in order:
            r = self.policies[p]
            totals += ["", "", format_bytes(r.total_bytes), format_count(r.peak_blocks_in_use)]
        table.add_row(*totals)
        pool = ", ".join(f"{g} {format_count(n)}" for g, n in self.pool_blocks.items())
        head = (
            f"{self.spec_name} on trace {t.get('name')!r}: {t.get('requests')} requests in "
            f"{t.get('sessions')} sessions, {format_count(t.get('prompt_tokens', 0))} prompt "
            f"tokens; pool blocks: {pool or '-'}"
            + (f", {self.state_slots} state slots" if self.state_slots else "")
            + f"; {self.tokens_per_block} tokens/block; concurrency {self.concurrency}"
        )
        lines = [
            head,
            "",
            table.render(),
            "",
            "hit rate: needed positions already on the receiver (state groups: states "
            "kept); moved: tokens (st: states); peak: most blocks referenced at once",
        ]
        windows = [g.window for g in first.groups if g.window]
        longest = int(t.get("max_prompt_tokens", 0) or 0)
        if windows and longest and min(windows) > longest:
            lines.append(
                f"note: every sliding window (>= {min(windows):,}) exceeds the longest "
                f"prompt ({longest:,} tokens): on this trace the sliding layers read "
                "their whole context like full attention, so one boundary loses little"
            )
        for policy, baseline in _saving_pairs(self.policies):
            saved, frac = self.savings(policy, baseline)
            lines.append(
                f"{policy.label} vs {baseline.label}: saves "
                f"{format_bytes(saved)} ({100 * frac:.1f}% of "
                f"{format_bytes(self[baseline].total_bytes)})"
            )
        time_table = self.time_table()
        if time_table:
            lines += ["", time_table]
        return "\n".join(lines)

    def time_table(self) -> str:
        """Per policy the p50 / p90 / p99 / mean of transfer time, TTFT and its parts (ms),
        under the time model's link and rates ("" when no time was simulated)."""
        order = [p for p in ReusePolicy.table_order() if p in self.policies]
        if not order or any(self.policies[p].time is None for p in order):
            return ""
        stats = ("p50", "p90", "p99", "mean")
        columns: list[Column | str] = ["ms"]
        for _ in order:
            columns += [Column(s) for s in stats]
        table = Table(columns, spans=[("", 1), *((p.label, len(stats)) for p in order)])
        for attr, label in TimeStats.SERIES:
            cells: list[object] = [label]
            for p in order:
                pct = getattr(self.policies[p].time, attr)
                cells += [_ms(getattr(pct, s)) for s in stats]
            table.add_row(*cells)
        lines = []
        if self.time_model is not None:
            m = self.time_model
            ctx = "prefix-cached" if m.context_cache else "no prefix cache"
            lines.append(
                f"time: link {m.link.label()}; prefill {m.prefill_tokens_per_s:,.0f} tok/s x "
                f"{m.context_ranks} context rank{'s' if m.context_ranks > 1 else ''} "
                f"({ctx}); decode {m.decode_tokens_per_s:,.0f} tok/s per request"
            )
        lines.append(table.render())
        lines.append(
            "transfer: ask -> committed (link queue + fixed cost + bytes / bandwidth); TTFT: "
            "ready -> committed = context queue + prefill + admission + transfer"
        )
        return "\n".join(lines)


def _saving_pairs(policies: Mapping[str, Any]) -> list[tuple[ReusePolicy, ReusePolicy]]:
    pairs = [
        (ReusePolicy.PER_GROUP, ReusePolicy.SINGLE_BOUNDARY),
        (ReusePolicy.PER_GROUP, ReusePolicy.NO_REUSE),
        (ReusePolicy.SINGLE_BOUNDARY, ReusePolicy.NO_REUSE),
    ]
    return [(a, b) for a, b in pairs if a in policies and b in policies]


def _ms(value: float) -> str:
    """Milliseconds with three significant digits (at least one decimal below 100)."""
    if value != value:  # nan
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"
