"""Per-request transfer plans: which token range (and which state) each layer group moves.

Pure Python (no torch). Two modes, DESIGN.md §1:

* **per group** -- ``cached_tokens`` is a mapping ``{group name: cached count}``; each group
  keeps its own reuse boundary;
* **single boundary** -- ``cached_tokens`` is one int ``c`` used for every group (what a
  system with one committed-token counter does). :func:`single_boundary` derives ``c``
  from per-group counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from kvtriton.ranges import GroupKind, TokenRange, check_count
from kvtriton.spec import KVCacheSpec, LayerGroup

__all__ = [
    "GroupTransfer",
    "Mode",
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
    spec: KVCacheSpec,
    num_tokens: int,
    cached_tokens: Mapping[str, int] | int,
    *,
    num_draft_tokens: int = 0,
) -> TransferPlan:
    """Plan what each layer group of ``spec`` moves for a prompt of ``num_tokens`` tokens.

    Args:
        spec: the model (or shard) spec; bytes are counted over its layers and heads.
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


def single_boundary(spec: KVCacheSpec, num_tokens: int, cached_tokens: Mapping[str, int]) -> int:
    """The one reuse boundary a single-counter system would use, from per-group counts.

    ``c = min`` over groups of the position each could resume from at a common prefix:
    an attention group contributes ``min(cached, P)``; a state group contributes its
    snapshot position ``s`` when ``s <= P`` (a state can only resume where it was taken)
    and 0 otherwise. Groups left out count as 0.
    """
    p = check_count("num_tokens (prompt length P)", num_tokens, 1)
    if not isinstance(cached_tokens, Mapping):
        raise TypeError(
            f"cached_tokens must be a mapping {{group name: cached count}}, got "
            f"{type(cached_tokens).__name__} {cached_tokens!r} (a single boundary is already one "
            f"number: pass it to plan_transfer)"
        )
    unknown = sorted(set(cached_tokens) - set(spec.group_names))
    if unknown:
        raise ValueError(f"cached_tokens names unknown layer groups {unknown}")
    return min(
        g.rule.resume_point(
            p, check_count(f"cached_tokens[{g.name!r}]", cached_tokens.get(g.name, 0), 0)
        )
        for g in spec.groups
    )


def compare_policies(
    spec: KVCacheSpec,
    num_tokens: int,
    cached_tokens: Mapping[str, int],
    *,
    num_draft_tokens: int = 0,
) -> dict[str, TransferPlan]:
    """Plans under the three policies, keyed by :class:`ReusePolicy` (in table order)."""
    c = single_boundary(spec, num_tokens, cached_tokens)
    cached: dict[ReusePolicy, Mapping[str, int] | int] = {
        ReusePolicy.PER_GROUP: cached_tokens,
        ReusePolicy.SINGLE_BOUNDARY: c,
        ReusePolicy.NO_REUSE: 0,
    }
    return {
        policy: plan_transfer(spec, num_tokens, cached[policy], num_draft_tokens=num_draft_tokens)
        for policy in ReusePolicy.table_order()
    }
