"""Stateful property test of the cache manager and the receiver adapter.

Random interleavings of allocate (as a receiver through the adapter, or as a prefill rank) /
append / commit / slide / free / abort / evict / match over a small hybrid spec (full
attention, sliding window 6, a state group) with several live requests sharing prefixes.

The test writes token-derived values into small CPU pools with plain torch indexing: position
``p`` of token ``t`` stores ``t`` in K and ``p`` in V of every layer and head, and a state slot
stores a digest of the tokens it summarises. Writes go only where a receiver or a decoder
writes (the planned transfer range, or appended positions), and never into a block another
request or the prefix cache can see. Checked after every step: the manager's own invariants,
reference counts against the test's model of live spans, every matched block holding exactly
the tokens (and positions) its hash claims, every state hit holding the state of exactly its
prefix, per-group counts never below the single boundary, and no leaks at the end.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvtriton.adapter import abort_receive, complete_receive, prepare_receive
from kvtriton.cache import (
    KVCacheManager,
    OutOfBlocksError,
    PrefixMatch,
    allocate_pools,
    chain_hashes,
    encode_tokens,
    root_hash,
)
from kvtriton.plan import compare_policies, plan_transfer, single_boundary
from kvtriton.ranges import BlockSpan, TokenRange
from kvtriton.spec import KVCacheSpec
from kvtriton.testing import brute_force_match, hybrid_spec

B = 4
WINDOW = 6
WITH_STATE = hybrid_spec(B, window=WINDOW, sliding_heads=1, name="sm-3")
NO_STATE = hybrid_spec(B, window=WINDOW, sliding_heads=1, state_layers=None, name="sm-2")
ATTENTION = ("full", "swa")
BASES = [[100 * f + i for i in range(64)] for f in range(3)]
MAX_LIVE = 4


def prompt(family: int, length: int, diverge: int | None) -> list[int]:
    tokens = BASES[family][:length]
    if diverge is not None and diverge < length:
        tokens = [*tokens[:diverge], 9000 + 10 * diverge + family, *tokens[diverge + 1 :]]
    return tokens


def continuation(tokens: list[int], n: int) -> list[int]:
    """Appended ids depend only on the position and the first token: requests share them."""
    start = len(tokens)
    return [5000 + (tokens[0] % 7) * 100 + p for p in range(start, start + n)]


def state_value(tokens: list[int]) -> float:
    return float(sum((i + 1) * t for i, t in enumerate(tokens)) % 1_000_003 + len(tokens))


class CacheMachine(RuleBasedStateMachine):
    spec: KVCacheSpec = WITH_STATE

    @initialize(layout=st.sampled_from(["NHD", "HND"]))
    def setup(self, layout: str) -> None:
        slots = MAX_LIVE + 1 if self.has_state else 0
        self.pools = allocate_pools(
            self.spec, {"full": 14, "swa": 8}, num_state_slots=slots, layout=layout
        )
        self.m = KVCacheManager(self.spec, pools=self.pools)
        self.live: dict[str, dict] = {}  # rid -> {"tokens": known ids, "spans": live spans}
        self.counter = 0

    # -- pool writes (what a receiver / decoder writes) --------------------------------------
    def write(self, group: str, span: BlockSpan, positions: TokenRange, tokens: list[int]) -> None:
        pool = self.pools.kv[group]
        for p in positions:
            block = span.block_id(p // B, group=group)
            assert self.m.refcount(group, block) == 1, (
                f"write of position {p} into shared block {block} of {group}"
            )
            assert self.m.block_hash(group, block) is None, (
                f"write of position {p} into published block {block} of {group}"
            )
            pool[:, block, 0, p % B] = float(tokens[p])
            pool[:, block, 1, p % B] = float(p)

    @property
    def has_state(self) -> bool:
        return "ssm" in self.spec.group_names

    def write_state(self, rid: str) -> None:
        if not self.has_state:
            return
        info = self.live[rid]
        slot = self.m.state_slots(rid)["ssm"]
        self.pools.state["ssm"][:, slot] = state_value(info["tokens"])

    # -- checks ----------------------------------------------------------------------------
    def oracle(self, tokens: list[int]) -> tuple[dict[str, int], int]:
        """Per-group counts and the single boundary straight from their definitions, by
        brute force over every position (not only block boundaries) with index lookups."""
        hashes = chain_hashes(encode_tokens(tokens), B, root_hash(None))
        have = {g: [self.m.lookup(g, h) is not None for h in hashes] for g in self.spec.group_names}
        return brute_force_match(self.spec, len(tokens), have)

    def check_match(self, tokens: list[int]) -> None:
        before = self.snapshot()
        match = self.m.match(tokens)
        assert self.snapshot() == before, "match changed the manager"
        p = len(tokens)
        event(
            f"match: full {'hit' if match.cached['full'] else 'miss'}, swa "
            f"{'hit' if match.matched_blocks['swa'] else 'miss'}, state "
            f"{'hit' if match.state_hits.get('ssm') else 'miss'}, boundary "
            f"{'> 0' if match.boundary else '0'}"
        )
        assert (dict(match.cached), match.boundary) == self.oracle(tokens)
        for group in ATTENTION:
            pool = self.pools.kv[group]
            blocks = match.matched_blocks[group]
            ids = match.block_ids[group]
            assert len(ids) == len(blocks)
            for logical, block in zip(blocks, ids, strict=True):
                want = torch.tensor(tokens[logical * B : (logical + 1) * B], dtype=torch.float32)
                pos = torch.arange(logical * B, (logical + 1) * B, dtype=torch.float32)
                got_k = pool[:, block, 0]  # [layers, B, heads, dim]
                got_v = pool[:, block, 1]
                assert torch.equal(got_k, want.view(1, B, 1, 1).expand_as(got_k)), (
                    f"{group} block {block} (logical {logical}) holds other tokens"
                )
                assert torch.equal(got_v, pos.view(1, B, 1, 1).expand_as(got_v)), (
                    f"{group} block {block} (logical {logical}) holds other positions"
                )
            # per-group reuse is never shorter than the single boundary
            assert match.cached[group] >= match.boundary
        if self.has_state:
            if match.state_hits["ssm"]:
                (slot,) = match.block_ids["ssm"]
                assert torch.all(self.pools.state["ssm"][:, slot] == state_value(tokens))
            if match.boundary == p:
                assert match.state_hits["ssm"]
        per_group = plan_transfer(self.spec, p, match.cached_tokens("per_group"))
        single = plan_transfer(self.spec, p, match.cached_tokens("single_boundary"))
        assert per_group.total_bytes <= single.total_bytes
        # one single-boundary rule: the planner given the match plans what the manager's
        # boundary says, and from the counts alone it proves no more than the cache holds
        assert compare_policies(self.spec, p, match)["single_boundary"] == single
        assert single_boundary(self.spec, p, match.cached) <= match.boundary

    def snapshot(self) -> tuple:
        m = self.m
        names = self.spec.group_names
        refs = {g: tuple(m.refcount(g, b) for b in range(m.num_blocks(g))) for g in names}
        tags = {g: tuple(m.block_hash(g, b) for b in range(m.num_blocks(g))) for g in names}
        return (
            m.stats(),
            refs,
            tags,
            {r: m.request(r) for r in m.requests},
            {g: m.evictable(g) for g in names},
        )

    # -- rules ----------------------------------------------------------------------------
    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(
        family=st.integers(0, 2),
        length=st.integers(1, 26),
        diverge=st.one_of(st.none(), st.integers(0, 25)),
        drafts=st.integers(0, 3),
        mode=st.sampled_from(["per_group", "single_boundary"]),
        prefill=st.booleans(),
        fail=st.booleans(),
        reuse_match=st.one_of(st.none(), st.integers(0, 3)),
    )
    def allocate(
        self,
        family: int,
        length: int,
        diverge: int | None,
        drafts: int,
        mode: str,
        prefill: bool,
        fail: bool,
        reuse_match: int | None,
    ) -> None:
        tokens = prompt(family, length, diverge)
        self.check_match(tokens)
        rid = f"r{self.counter}"
        self.counter += 1
        source: list[int] | PrefixMatch = tokens
        if prefill and reuse_match is not None:
            # allocate from an earlier match; evicting in between makes it stale
            source = self.m.match(tokens)
            self.m.evict(reuse_match)
        before = self.snapshot()
        try:
            if prefill:
                alloc = self.m.allocate(
                    rid,
                    source,
                    drafts,
                    mode,  # type: ignore[arg-type]
                    prefill=True,
                )
            else:
                rx = prepare_receive(self.m, rid, tokens, num_draft_tokens=drafts, mode=mode)  # type: ignore[arg-type]
        except OutOfBlocksError as err:
            event(f"allocate: out of {err.group}")
            assert err.request_id == rid and err.group in self.spec.group_names
            assert self.snapshot() == before, "a failed allocation changed the manager"
            return
        spans = self.m.spans(rid)
        self.live[rid] = {"tokens": list(tokens), "spans": spans}
        if prefill:
            # a prefill computes every position of its spans past the reused blocks
            for group in ATTENTION:
                reused = alloc.reused_blocks[group]
                start = reused.stop * B if reused else spans[group].first_block * B
                assert self.m.request(rid).valid_from[group] <= start
                self.write(group, spans[group], TokenRange(start, len(tokens)), tokens)
            self.write_state(rid)
            return
        for group, rng in rx.tokens.items():
            self.write(group, spans[group], rng, tokens)
        if "ssm" in rx.states:
            self.write_state(rid)
        if fail:
            # a transfer that fails half way: garbage in the destination blocks, then abort
            for group, rng in rx.tokens.items():
                pool = self.pools.kv[group]
                for block in spans[group].block_ids_for(rng, B, group=group):
                    pool[:, block] = -7.0
            fresh = {
                g: set(spans[g].block_ids) - set(rx.allocation.match.block_ids[g])
                for g in ATTENTION
            }
            abort_receive(self.m, rx)
            del self.live[rid]
            for group in ATTENTION:
                for block in fresh[group]:
                    assert self.m.block_hash(group, block) is None
        else:
            complete_receive(self.m, rx)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), n=st.integers(0, 6), drafts=st.one_of(st.none(), st.integers(0, 5)))
    def append(self, data: st.DataObject, n: int, drafts: int | None) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        info = self.live[rid]
        new = continuation(info["tokens"], n)
        before = self.snapshot()
        try:
            spans = self.m.append(rid, new, num_draft_tokens=drafts)
        except OutOfBlocksError as err:
            assert err.request_id == rid
            assert self.snapshot() == before, "a failed append changed the manager"
            return
        start = len(info["tokens"])
        info["tokens"].extend(new)
        info["spans"] = spans
        for group in ATTENTION:
            self.write(group, spans[group], TokenRange(start, start + n), info["tokens"])
        self.write_state(rid)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), everything=st.booleans())
    def commit(self, data: st.DataObject, everything: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        length = len(self.live[rid]["tokens"])
        n = length if everything else data.draw(st.integers(0, length))
        self.m.commit(rid, n)
        if n:  # what was just published holds what its hashes claim
            self.check_match(self.live[rid]["tokens"][:n])

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def slide(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        released = self.m.slide(rid)
        spans = self.m.spans(rid)
        old = self.live[rid]["spans"]["swa"]
        assert spans["swa"].first_block == old.first_block + released["swa"]
        assert spans["swa"].block_ids == old.block_ids[released["swa"] :]
        assert spans["full"] == self.live[rid]["spans"]["full"]
        self.live[rid]["spans"] = spans

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.m.free(rid)
        del self.live[rid]

    @rule(group=st.sampled_from(WITH_STATE.group_names), n=st.one_of(st.none(), st.integers(0, 4)))
    def evict(self, group: str, n: int | None) -> None:
        if group not in self.spec.group_names:
            group = "full"
        held = {
            g: {b for info in self.live.values() for b in info["spans"][g].block_ids}
            for g in ATTENTION
        }
        before = {
            g: {b: (self.m.block_hash(g, b), self.pools.kv[g][:, b].clone()) for b in held[g]}
            for g in ATTENTION
        }
        self.m.evict(n, group=group)
        for g in ATTENTION:
            for b, (tag, content) in before[g].items():
                assert self.m.block_hash(g, b) == tag, f"evict touched referenced block {b}"
                assert torch.equal(self.pools.kv[g][:, b], content)

    @rule(
        family=st.integers(0, 2),
        length=st.integers(1, 30),
        diverge=st.one_of(st.none(), st.integers(0, 29)),
    )
    def match(self, family: int, length: int, diverge: int | None) -> None:
        self.check_match(prompt(family, length, diverge))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def match_live_sequence(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        tokens = self.live[rid]["tokens"]
        self.check_match(tokens)
        cut = data.draw(st.integers(1, len(tokens)))
        self.check_match(tokens[:cut])

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def bookkeeping(self) -> None:
        if not hasattr(self, "m"):
            return
        self.m.check_invariants()
        for group in ATTENTION:
            expected = [0] * self.m.num_blocks(group)
            for rid, info in self.live.items():
                assert self.m.spans(rid)[group] == info["spans"][group]
                for b in info["spans"][group].block_ids:
                    expected[b] += 1
            got = [self.m.refcount(group, b) for b in range(self.m.num_blocks(group))]
            assert got == expected, f"{group}: refcounts {got} != live spans {expected}"
        if self.has_state:
            slots = [self.m.refcount("ssm", s) for s in range(self.m.num_blocks("ssm"))]
            assert sorted(s for s, r in enumerate(slots) if r) == sorted(
                self.m.state_slots(rid)["ssm"] for rid in self.live
            )

    def teardown(self) -> None:
        if not hasattr(self, "m"):
            return
        for rid in list(self.live):
            self.m.free(rid)
        self.m.evict()
        for group in self.spec.group_names:
            stats = self.m.stats()[group]
            assert stats["free"] == stats["blocks"], f"{group} leaked blocks: {stats}"
        self.m.check_invariants()


class NoStateMachine(CacheMachine):
    """Full attention + sliding window only: single boundaries > 0 are common here."""

    spec = NO_STATE


# max_examples and deadline come from the loaded profile (tests/conftest.py: 500 in CI).
MACHINE_SETTINGS = settings(
    stateful_step_count=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CacheMachine.TestCase.settings = MACHINE_SETTINGS
NoStateMachine.TestCase.settings = MACHINE_SETTINGS
TestCacheMachine = CacheMachine.TestCase
TestNoStateMachine = NoStateMachine.TestCase
