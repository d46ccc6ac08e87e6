"""Which context (sender) ranks hold which part of a generation (receiver) rank's KV.

World layout: the context side's ``ctx_tp * ctx_pp`` ranks come first, then the generation
side's ``gen_tp * gen_pp`` ranks; inside a side, rank ``first + pp_rank * tp + tp_rank``
(tensor parallel fastest, as Megatron does). A rank's shard is
``model.shard_for(tp_rank, tp, pp_rank, pp)`` (``KVCacheSpec.stage`` then ``shard``).

For each layer group a receiver rank holds layers ``L_r`` and heads ``[h0, h1)``; a sender
rank holds ``L_s`` and ``[s0, s1)``. The receiver asks each sender for exactly
``L_r ∩ L_s`` and ``[h0, h1) ∩ [s0, s1)``. With fewer kv heads than context TP ranks a head
is replicated on several senders: the receiver asks one replica only (chosen by its own TP
rank, to spread receivers over replicas). Pure Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvtriton.layout import PackedLayout, packed_layout
from kvtriton.ranges import TokenRange
from kvtriton.spec import KVCacheSpec

__all__ = ["RankInfo", "SourceSlice", "Topology"]


@dataclass(frozen=True)
class RankInfo:
    """Where a world rank sits: side ``"ctx"`` or ``"gen"``, its TP and PP coordinates."""

    rank: int
    side: str
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int


@dataclass(frozen=True)
class SourceSlice:
    """What one receiver rank asks one sender rank for: global layer ids and a global
    head range per group (only groups with at least one layer and one head appear)."""

    sender: int
    layers: Mapping[str, tuple[int, ...]]
    heads: Mapping[str, tuple[int, int]]

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.layers)

    def layout(
        self,
        model: KVCacheSpec,
        tokens: Mapping[str, TokenRange],
        states: tuple[str, ...] | list[str] = (),
    ) -> PackedLayout:
        """The packed layout of this slice for the given per-group ranges (both sides)."""
        return packed_layout(
            model.root,
            {g: r for g, r in tokens.items() if g in self.layers},
            [s for s in states if s in self.layers],
            layers=self.layers,
            heads=self.heads,
        )


class Topology:
    """Context/generation split of a world and the TP/PP intersection rules.

    Args:
        model: the unsharded model spec.
        ctx_tp, ctx_pp: context (sender) side parallelism.
        gen_tp, gen_pp: generation (receiver) side parallelism.
        gen_tokens_per_block: the receiver's block size (default: the model's).
    """

    def __init__(
        self,
        model: KVCacheSpec,
        ctx_tp: int = 1,
        ctx_pp: int = 1,
        gen_tp: int = 1,
        gen_pp: int = 1,
        *,
        gen_tokens_per_block: int | None = None,
    ) -> None:
        for name, value in (
            ("ctx_tp", ctx_tp),
            ("ctx_pp", ctx_pp),
            ("gen_tp", gen_tp),
            ("gen_pp", gen_pp),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if model.tp_size != 1 or model.pp_size != 1:
            raise ValueError("Topology needs the unsharded model spec (tp_size = pp_size = 1)")
        self.model = model
        self.ctx_tp, self.ctx_pp, self.gen_tp, self.gen_pp = ctx_tp, ctx_pp, gen_tp, gen_pp
        self.gen_tokens_per_block = gen_tokens_per_block or model.tokens_per_block
        # Validate every shard up front: an impossible split fails here, naming the group.
        self._specs = {r: self._make_spec(r) for r in range(self.world_size)}

    # -- ranks ----------------------------------------------------------------------------
    @property
    def num_ctx(self) -> int:
        return self.ctx_tp * self.ctx_pp

    @property
    def num_gen(self) -> int:
        return self.gen_tp * self.gen_pp

    @property
    def world_size(self) -> int:
        return self.num_ctx + self.num_gen

    @property
    def ctx_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_ctx))

    @property
    def gen_ranks(self) -> tuple[int, ...]:
        return tuple(range(self.num_ctx, self.world_size))

    def info(self, rank: int) -> RankInfo:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world [0, {self.world_size})")
        if rank < self.num_ctx:
            pp, tp = divmod(rank, self.ctx_tp)
            return RankInfo(rank, "ctx", tp, self.ctx_tp, pp, self.ctx_pp)
        pp, tp = divmod(rank - self.num_ctx, self.gen_tp)
        return RankInfo(rank, "gen", tp, self.gen_tp, pp, self.gen_pp)

    def ctx_rank(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.ctx_tp + tp_rank

    def gen_rank(self, tp_rank: int, pp_rank: int) -> int:
        return self.num_ctx + pp_rank * self.gen_tp + tp_rank

    def _make_spec(self, rank: int) -> KVCacheSpec:
        i = self.info(rank)
        spec = self.model.shard_for(i.tp_rank, i.tp_size, i.pp_rank, i.pp_size)
        if i.side == "gen" and self.gen_tokens_per_block != spec.tokens_per_block:
            spec = spec.with_block_size(self.gen_tokens_per_block)
        return spec

    def spec(self, rank: int) -> KVCacheSpec:
        """The shard spec held by ``rank``."""
        if rank not in self._specs:
            raise ValueError(f"rank {rank} is outside the world [0, {self.world_size})")
        return self._specs[rank]

    # -- intersections --------------------------------------------------------------------
    def sources(self, gen_rank: int) -> tuple[SourceSlice, ...]:
        """Sender slices that together cover exactly ``gen_rank``'s layers and heads, each
        head of each layer asked from exactly one sender; in sender-rank order."""
        info = self.info(gen_rank)
        if info.side != "gen":
            raise ValueError(
                f"rank {gen_rank} is a context rank; sources() takes a "
                f"generation rank in {list(self.gen_ranks)}"
            )
        rspec = self.spec(gen_rank)
        layers: dict[int, dict[str, tuple[int, ...]]] = {}
        heads: dict[int, dict[str, tuple[int, int]]] = {}
        for g in rspec.groups:
            r_lo, r_hi = g.held_heads
            for pp in range(self.ctx_pp):
                stage_spec = self.spec(self.ctx_rank(0, pp))
                try:
                    sg = stage_spec.group(g.name)
                except KeyError:
                    continue
                common = tuple(sorted(set(g.layer_ids) & set(sg.layer_ids)))
                if not common:
                    continue
                # For each head, the context TP ranks holding it; pick one replica.
                runs: dict[int, list[int]] = {}
                for h in range(r_lo, r_hi):
                    holders = []
                    for tp in range(self.ctx_tp):
                        lo, hi = self.spec(self.ctx_rank(tp, pp)).group(g.name).held_heads
                        if lo <= h < hi:
                            holders.append(tp)
                    if not holders:  # impossible with a consistent split
                        raise ValueError(f"group {g.name!r}: no context rank holds head {h}")
                    chosen = holders[info.tp_rank % len(holders)]
                    runs.setdefault(chosen, []).append(h)
                for tp, hs in runs.items():
                    if hs != list(range(hs[0], hs[-1] + 1)):
                        raise AssertionError(f"non-contiguous heads {hs} from ctx tp {tp}")
                    sender = self.ctx_rank(tp, pp)
                    layers.setdefault(sender, {})[g.name] = common
                    heads.setdefault(sender, {})[g.name] = (hs[0], hs[-1] + 1)
        return tuple(SourceSlice(s, layers[s], heads[s]) for s in sorted(layers))

    def receivers(self, ctx_rank: int) -> tuple[int, ...]:
        """Generation ranks that ask ``ctx_rank`` for something."""
        if self.info(ctx_rank).side != "ctx":
            raise ValueError(f"rank {ctx_rank} is not a context rank")
        return tuple(
            r for r in self.gen_ranks if any(s.sender == ctx_rank for s in self.sources(r))
        )

    def peers(self, rank: int) -> tuple[int, ...]:
        """The ranks ``rank`` exchanges messages with (symmetric)."""
        if self.info(rank).side == "gen":
            return tuple(s.sender for s in self.sources(rank))
        return self.receivers(rank)

    def describe(self) -> str:
        return (
            f"ctx tp{self.ctx_tp}pp{self.ctx_pp} (ranks {list(self.ctx_ranks)}) -> "
            f"gen tp{self.gen_tp}pp{self.gen_pp} (ranks {list(self.gen_ranks)})"
        )
