"""Per-request transfer plans: which token range (and which state) each layer group moves.

Pure Python (no torch). Two modes, DESIGN.md §1:

* **per group** -- ``cached_tokens`` is a mapping ``{group name: cached count}``; each group
  keeps its own reuse boundary;
* **single boundary** -- ``cached_tokens`` is one int ``c`` used for every group (what a
  system with one committed-token counter does): the largest prefix at which every group
  could resume. ``c`` comes from what the cache holds (the cache manager's
  ``PrefixMatch.boundary``); :func:`single_boundary` applies the same rule to exactly what
  per-group counts state (DESIGN.md §1, "the rule, in one place").

:func:`compare_policies` plans all three policies (a :class:`PlanComparison`); plans and
comparisons print as aligned tables (``str()``, ``.table()``, and in Jupyter).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Protocol, runtime_checkable

from kvtriton.ranges import GroupKind, TokenRange, check_count
from kvtriton.spec import KVCacheSpec, LayerGroup, resolve_spec
from kvtriton.table import Column, Table, format_bytes, format_count, format_percent

__all__ = [
    "CacheHolding",
    "GroupTransfer",
    "Mode",
    "PlanComparison",
    "ReusePolicy",
    "TransferPlan",
    "compare_policies",
    "plan_transfer",
    "single_boundary",
]


class ReusePolicy(str, Enum):
    """How a receiver reuses its prefix cache (DESIGN.md §1); the one registry of the
    policies' names (the values) and their human labels (:attr:`label`).

    A ``str`` subclass: ``ReusePolicy.PER_GROUP == "per_group"`` and it formats and
    serialises as its value, so plain strings are accepted wherever a policy is.
    """

    PER_GROUP = "per_group"
    """One reuse boundary per layer group (kvtriton)."""
    SINGLE_BOUNDARY = "single_boundary"
    """One boundary for every group: what systems with one committed-token counter do."""
    NO_REUSE = "no_reuse"
    """Nothing is reused: every needed position moves."""

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def label(self) -> str:
        """The column / legend title: ``"per-group"``, ``"single boundary"``, ``"no reuse"``."""
        return _POLICY_LABELS[self]

    @property
    def cache_mode(self) -> ReusePolicy:
        """The :class:`~kvtriton.cache.KVCacheManager` allocation mode that runs this policy
        (``NO_REUSE`` allocates like ``PER_GROUP`` and never publishes)."""
        return (
            ReusePolicy.SINGLE_BOUNDARY
            if self is ReusePolicy.SINGLE_BOUNDARY
            else (ReusePolicy.PER_GROUP)
        )

    @classmethod
    def parse(cls, value: object, *, what: str = "policy") -> ReusePolicy:
        """``value`` (a member or its name) as a policy; ``ValueError`` listing the names."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"{what} must be one of {names}; got {value!r}") from None

    @classmethod
    def table_order(cls) -> tuple[ReusePolicy, ...]:
        """Column order of tables: per-group first, then the baselines."""
        return (cls.PER_GROUP, cls.SINGLE_BOUNDARY, cls.NO_REUSE)

    @classmethod
    def baseline_order(cls) -> tuple[ReusePolicy, ...]:
        """Simulation / plot order: the worst baseline first, kvtriton last."""
        return (cls.NO_REUSE, cls.SINGLE_BOUNDARY, cls.PER_GROUP)


_POLICY_LABELS = {
    ReusePolicy.PER_GROUP: "per-group",
    ReusePolicy.SINGLE_BOUNDARY: "single boundary",
    ReusePolicy.NO_REUSE: "no reuse",
}

#: The modes :func:`plan_transfer` and the cache manager's allocations run in (the
#: :class:`ReusePolicy` values ``per_group`` and ``single_boundary``).
Mode = Literal["per_group", "single_boundary"]


@dataclass(frozen=True)
class GroupTransfer:
    """What one layer group moves for one request.

    Attributes:
        group: the layer group (of the spec the plan was made for).
        needed: positions the receiver needs to decode position ``P``.
        cached_tokens: the reuse boundary this group was planned with.
        tokens: positions to move, ``[max(cached, needed.start), P)`` (empty for state groups).
        moves_state: whether the group's per-request state moves (state groups only).
        kv_bytes: bytes of paged KV moved (``len(tokens) * bytes_per_token``).
        state_bytes: bytes of state moved (0 unless ``moves_state``).
    """

    group: LayerGroup
    needed: TokenRange
    cached_tokens: int
    tokens: TokenRange
    moves_state: bool
    kv_bytes: int
    state_bytes: int

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def kind(self) -> GroupKind:
        return self.group.kind

    @property
    def bytes(self) -> int:
        """Total bytes this group moves (KV + state)."""
        return self.kv_bytes + self.state_bytes

    @property
    def is_empty(self) -> bool:
        return self.tokens.is_empty and not self.moves_state

    def blocks(self, tokens_per_block: int) -> range:
        """Logical blocks the moved positions touch at ``tokens_per_block`` (either side)."""
        return self.tokens.blocks(tokens_per_block)

    def to_dict(self, tokens_per_block: int) -> dict[str, Any]:
        return {
            "group": self.name,
            "kind": self.kind,
            "layers": self.group.num_layers,
            "window": self.group.window,
            "needed": [self.needed.start, self.needed.end],
            "cached_tokens": self.cached_tokens,
            "tokens": [self.tokens.start, self.tokens.end],
            "num_tokens": len(self.tokens),
            "num_blocks": len(self.blocks(tokens_per_block)),
            "moves_state": self.moves_state,
            "kv_bytes": self.kv_bytes,
            "state_bytes": self.state_bytes,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class TransferPlan:
    """The per-group ranges one request moves; see :func:`plan_transfer`."""

    spec: KVCacheSpec
    num_tokens: int
    num_draft_tokens: int
    mode: ReusePolicy
    groups: tuple[GroupTransfer, ...]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.groups)

    def group(self, name: str) -> GroupTransfer:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no layer group {name!r} in this plan; groups: {self.spec.group_names}")

    @property
    def total_bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    @property
    def kv_bytes(self) -> int:
        return sum(g.kv_bytes for g in self.groups)

    @property
    def state_groups(self) -> tuple[str, ...]:
        """Names of the state groups whose state moves."""
        return tuple(g.name for g in self.groups if g.moves_state)

    @property
    def is_full_hit(self) -> bool:
        """Nothing moves (the request still completes)."""
        return all(g.is_empty for g in self.groups)

    @property
    def allocated_tokens(self) -> int:
        """Positions a receiver allocates: ``P + num_draft_tokens`` (drafts never move)."""
        return self.num_tokens + self.num_draft_tokens

    def __repr__(self) -> str:
        moved = ", ".join(f"{g.name} {_moved_text(g)}" for g in self.groups)
        drafts = f" + {self.num_draft_tokens} draft" if self.num_draft_tokens else ""
        return (
            f"TransferPlan({self.spec.name}, P={self.num_tokens}{drafts}, {self.mode}: {moved}; "
            f"{format_bytes(self.total_bytes)})"
        )

    def table(self) -> str:
        """Aligned text: per group its window, needed and cached positions, what moves
        (tokens, blocks, bytes), and a total row."""
        tpb = self.spec.tokens_per_block
        table = Table(
            [
                "group",
                "kind",
                Column("layers"),
                Column("window"),
                Column("needed"),
                Column("cached"),
                Column("moves"),
                Column("tokens"),
                Column("blocks"),
                Column("bytes"),
            ]
        )
        for g in self.groups:
            state = g.group.is_state
            table.add_row(
                g.name,
                g.kind,
                g.group.num_layers,
                g.group.window,
                "state" if state else _range_text(g.needed),
                format_count(g.cached_tokens),
                ("state" if g.moves_state else "kept") if state else _range_text(g.tokens),
                None if state else format_count(len(g.tokens)),
                None if state else format_count(len(g.blocks(tpb))),
                format_bytes(g.bytes),
            )
        table.add_rule()
        table.add_row(
            "total",
            "",
            self.spec.num_layers,
            "",
            "",
            "",
            "",
            format_count(sum(len(g.tokens) for g in self.groups)),
            format_count(sum(len(g.blocks(tpb)) for g in self.groups)),
            format_bytes(self.total_bytes),
        )
        return f"{_plan_head(self)}; {self.mode.label}\n\n{table.render()}"

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / Jupyter
        printer.text(repr(self) if cycle else self.table())

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.name,
            "mode": self.mode,
            "num_tokens": self.num_tokens,
            "num_draft_tokens": self.num_draft_tokens,
            "tokens_per_block": self.spec.tokens_per_block,
            "total_bytes": self.total_bytes,
            "groups": [g.to_dict(self.spec.tokens_per_block) for g in self.groups],
        }


def _range_text(r: TokenRange) -> str:
    return f"[{r.start}, {r.end})"


def _moved_text(g: GroupTransfer) -> str:
    if g.group.is_state:
        return "state" if g.moves_state else "kept"
    return _range_text(g.tokens)


def _plan_head(plan: TransferPlan) -> str:
    spec = plan.spec
    drafts = f" + {plan.num_draft_tokens} draft (never moved)" if plan.num_draft_tokens else ""
    return (
        f"{spec.name}: prompt P = {format_count(plan.num_tokens)} tokens{drafts}, "
        f"{spec.tokens_per_block} tokens/block, {spec.dtype}"
    )


class PlanComparison(dict):  # type: ignore[type-arg]
    """``{ReusePolicy: TransferPlan}`` from :func:`compare_policies` (a plain ``dict`` in
    table order), with the single boundary and a comparison table (``str()``, Jupyter)."""

    @property
    def boundary(self) -> int:
        """The single boundary ``c`` the single-boundary plan used."""
        plan = self[ReusePolicy.SINGLE_BOUNDARY]
        return plan.groups[0].cached_tokens if plan.groups else 0

    def table(self) -> str:
        """Per layer group: kind, layers, window, needed positions, cached count, and per
        policy tokens, blocks and bytes moved; totals and the savings below."""
        policies = [p for p in ReusePolicy.table_order() if p in self]
        per = self[policies[0]]
        spec = per.spec
        tpb = spec.tokens_per_block
        columns: list[Column | str] = [
            "group",
            "kind",
            Column("layers"),
            Column("window"),
            Column("needed"),
            Column("cached"),
        ]
        for _ in policies:
            columns += [Column("tokens"), Column("blocks"), Column("bytes")]
        table = Table(columns, spans=[("", 6), *((policy.label, 3) for policy in policies)])
        for g in per.groups:
            cells: list[object] = [
                g.name,
                g.kind,
                g.group.num_layers,
                g.group.window,
                "state" if g.group.is_state else _range_text(g.needed),
                format_count(g.cached_tokens),
            ]
            for policy in policies:
                pg = self[policy].group(g.name)
                if pg.group.is_state:
                    cells += ["state" if pg.moves_state else "kept", None, format_bytes(pg.bytes)]
                else:
                    cells += [
                        format_count(len(pg.tokens)),
                        format_count(len(pg.blocks(tpb))),
                        format_bytes(pg.bytes),
                    ]
            table.add_row(*cells)
        table.add_rule()
        totals: list[object] = ["total", "", spec.num_layers, "", "", ""]
        for policy in policies:
            plan = self[policy]
            totals += [
                format_count(sum(len(g.tokens) for g in plan.groups)),
                format_count(sum(len(g.blocks(tpb)) for g in plan.groups)),
                format_bytes(plan.total_bytes),
            ]
        table.add_row(*totals)
        head = _plan_head(per)
        if ReusePolicy.SINGLE_BOUNDARY in self:
            head += (
                f"; single boundary c = {format_count(self.boundary)} (the longest prefix "
                "every group can resume from)"
            )
        lines = [head, "", table.render(), ""]
        base = ReusePolicy.PER_GROUP
        for policy in policies:
            if policy is base or base not in self:
                continue
            other = self[policy].total_bytes
            saved = other - self[base].total_bytes
            if other == 0:
                lines.append(f"{base.label} vs {policy.label}: both move nothing (full hit)")
            else:
                lines.append(
                    f"{base.label} vs {policy.label}: saves {format_bytes(saved)} "
                    f"({format_percent(saved, other)} of {format_bytes(other)})"
                )
        return "\n".join(lines).rstrip()

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython / Jupyter
        printer.text("PlanComparison(...)" if cycle else self.table())


def _group_transfer(
    spec: KVCacheSpec, group: LayerGroup, num_tokens: int, cached: int
) -> GroupTransfer:
    rule = group.rule
    moves = rule.moves_state(num_tokens, cached)
    tokens = rule.transfer(group, num_tokens, cached)
    return GroupTransfer(
        group=group,
        needed=rule.needed(group, num_tokens),
        cached_tokens=cached,
        tokens=tokens,
        moves_state=moves,
        kv_bytes=len(tokens) * spec.bytes_per_token(group),
        state_bytes=spec.state_bytes(group) if moves else 0,
    )


def plan_transfer(
    spec: KVCacheSpec | str,
    num_tokens: int,
    cached_tokens: Mapping[str, int] | int,
    *,
    num_draft_tokens: int = 0,
) -> TransferPlan:
    """Plan what each layer group of ``spec`` moves for a prompt of ``num_tokens`` tokens.

    Args:
        spec: the model (or shard) spec, or a preset name; bytes are counted over its layers
            and heads.
        num_tokens: prompt length ``P >= 1``; the receiver decodes position ``P`` next.
        cached_tokens: a mapping ``{group: count}`` selects per-group mode (groups left out
            count as 0; unknown names are an error); an int ``c`` selects single-boundary
            mode with ``c`` for every group. A count ``>= P`` is a full hit for attention
            groups (that is the only clamping); a state group's state stays only when its
            count is exactly ``P``, except that in single-boundary mode ``c`` is first
            clamped to ``P`` (one boundary at or past ``P`` means the receiver resumes at P).
        num_draft_tokens: speculative positions ``[P, P + k)`` the receiver allocates; they
            never move and are not counted.
    """
    spec = resolve_spec(spec)
    p = check_count("num_tokens (prompt length P)", num_tokens, 1)
    check_count("num_draft_tokens", num_draft_tokens, 0)
    if isinstance(cached_tokens, Mapping):
        unknown = sorted(set(cached_tokens) - set(spec.group_names))
        if unknown:
            raise ValueError(
                f"cached_tokens names unknown layer groups {unknown}; "
                f"spec {spec.name!r} has {list(spec.group_names)}"
            )
        per_group = {
            name: check_count(f"cached_tokens[{name!r}]", cached_tokens.get(name, 0), 0)
            for name in spec.group_names
        }
        mode = ReusePolicy.PER_GROUP
    else:
        c = min(check_count("cached_tokens (single boundary)", cached_tokens, 0), p)
        per_group = dict.fromkeys(spec.group_names, c)
        mode = ReusePolicy.SINGLE_BOUNDARY
    groups = tuple(_group_transfer(spec, g, p, per_group[g.name]) for g in spec.groups)
    return TransferPlan(spec, p, num_draft_tokens, mode, groups)


@runtime_checkable
class CacheHolding(Protocol):
    """What a receiver cache says it holds for one prompt: per-group counts and the one
    boundary derived from its contents (:class:`kvtriton.cache.PrefixMatch` is one)."""

    num_tokens: int
    cached: Mapping[str, int]
    boundary: int


def _check_counts(spec: KVCacheSpec, cached_tokens: object) -> dict[str, int]:
    if not isinstance(cached_tokens, Mapping):
        raise TypeError(
            f"cached_tokens must be a mapping {{group name: cached count}}, got "
            f"{type(cached_tokens).__name__} {cached_tokens!r} (a single boundary is already one "
            f"number: pass it to plan_transfer)"
        )
    unknown = sorted(set(cached_tokens) - set(spec.group_names))
    if unknown:
        raise ValueError(
            f"cached_tokens names unknown layer groups {unknown}; "
            f"spec {spec.name!r} has {list(spec.group_names)}"
        )
    return {
        name: check_count(f"cached_tokens[{name!r}]", cached_tokens.get(name, 0), 0)
        for name in spec.group_names
    }


def single_boundary(
    spec: KVCacheSpec | str, num_tokens: int, cached_tokens: Mapping[str, int]
) -> int:
    """The one reuse boundary ``c`` that per-group counts alone establish (DESIGN.md §1).

    ``c`` is the largest prefix at which *every* group could resume: full attention holds
    ``[0, c)``, a window-``W`` group holds ``[max(0, c + 1 - W), c)`` (what the query at ``c``
    reads), a state group holds its state at exactly ``c`` (``c = 0`` always qualifies). A
    count says only what §1 says -- the group holds every *needed* position below it -- so
    this takes the cache to hold exactly that: full attention ``[0, cached)``, a window group
    ``[needed(g, P).start, cached)`` and nothing before its window, a state group one snapshot
    at ``cached``. Hence a window group whose window starts after 0 supports only ``c = P``
    (a full hit) or ``c = 0``: its count cannot show that it still holds the window below an
    earlier ``c``.

    That is the same rule the cache manager applies to its contents
    (:meth:`kvtriton.cache.KVCacheManager.match`), applied to the contents the counts
    describe: for counts taken from a real cache it is a lower bound of that cache's
    ``PrefixMatch.boundary`` (the cache may hold more than its counts show). To plan with
    what a cache really holds, pass its ``PrefixMatch`` to :func:`compare_policies`, or the
    boundary to :func:`plan_transfer`. Groups left out count as 0. ``spec`` may be a preset
    name.
    """
    spec = resolve_spec(spec)
    p = check_count("num_tokens (prompt length P)", num_tokens, 1)
    counts = _check_counts(spec, cached_tokens)
    candidates = sorted({p, 0, *(min(n, p) for n in counts.values())}, reverse=True)
    return next(
        c
        for c in candidates
        if all(g.rule.resumes_at(g, p, counts[g.name], c) for g in spec.groups)
    )


def compare_policies(
    spec: KVCacheSpec | str,
    num_tokens: int,
    cached_tokens: Mapping[str, int] | CacheHolding,
    *,
    boundary: int | None = None,
    num_draft_tokens: int = 0,
) -> PlanComparison:
    """Plans under the three policies, keyed by :class:`ReusePolicy` (in table order).

    ``cached_tokens`` is what the receiver holds: a mapping ``{group: count}``, or a cache's
    :class:`CacheHolding` (a :class:`kvtriton.cache.PrefixMatch`, or an allocation's
    ``match``) whose ``boundary`` came from the cache contents. The single-boundary plan uses
    ``boundary`` when given, else the holding's boundary, else :func:`single_boundary` of
    the counts -- one rule everywhere (DESIGN.md §1): ``c`` comes from what the cache holds.
    ``spec`` may be a preset name.
    """
    spec = resolve_spec(spec)
    p = check_count("num_tokens (prompt length P)", num_tokens, 1)
    holding = getattr(cached_tokens, "match", cached_tokens)  # an Allocation: its match
    if isinstance(holding, CacheHolding) and not isinstance(holding, Mapping):
        if holding.num_tokens != p:
            raise ValueError(
                f"the cache holding is for a prompt of {holding.num_tokens} tokens, "
                f"not num_tokens={p}"
            )
        if boundary is not None and boundary != holding.boundary:
            raise ValueError(
                f"boundary={boundary} contradicts the cache holding's boundary {holding.boundary}"
            )
        counts = _check_counts(spec, holding.cached)
        boundary = holding.boundary
    else:
        counts = _check_counts(spec, cached_tokens)
    if boundary is None:
        c = single_boundary(spec, p, counts)
    else:
        given = check_count("boundary (single boundary)", boundary, 0)
        c = min(given, p)
        over = [
            g.name
            for g in spec.groups
            if g.kind.pages_tokens and c > max(counts[g.name], g.rule.needed(g, p).start)
        ]
        if over:
            raise ValueError(
                f"boundary {given} exceeds the cached count of {over}: a group that holds the "
                "window below c holds every needed position below c"
            )
    cached: dict[ReusePolicy, Mapping[str, int] | int] = {
        ReusePolicy.PER_GROUP: counts,
        ReusePolicy.SINGLE_BOUNDARY: c,
        ReusePolicy.NO_REUSE: 0,
    }
    return PlanComparison(
        (policy, plan_transfer(spec, p, cached[policy], num_draft_tokens=num_draft_tokens))
        for policy in ReusePolicy.table_order()
    )
