"""The transfer protocol in ONE process: every rank an agent over the loopback channel.

Same sender, receiver, chunk plans, kernels and checks as across processes; deterministic
and fast. Covers the topologies, the sender-side safety rules (content binding, no reuse of
freed blocks, leases, refusals, bounds, pruning, overload), faults and shutdown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from kvtriton.adapter import abort_receive, complete_receive, prepare_receive, source_target
from kvtriton.cache import KVCacheManager, allocate_pools
from kvtriton.spec import KVCacheSpec, LayerGroup, preset
from kvtriton.transfer import protocol as P
from kvtriton.transfer.config import FaultInjection, TransferOptions
from kvtriton.transfer.jobs import Landed
from kvtriton.transfer.local import LocalWorld
from kvtriton.transfer.protocol import prompt_digest
from kvtriton.transfer.session import SessionState
from kvtriton.transfer.topology import Topology
from kvtriton.transfer.values import prefill, verify

S = SessionState

HYBRID = KVCacheSpec(
    (
        LayerGroup("full", "full", (0, 2), num_kv_heads=2, head_dim=8),
        LayerGroup("sw", "sliding", (1, 3), num_kv_heads=2, head_dim=8, window=6),
    ),
    tokens_per_block=4,
    dtype="bfloat16",
    name="local-hybrid",
)


class Clock:
    """A virtual clock the loopback links and the agents share."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class World:
    """A topology's ranks in this process, each with pools and a cache manager."""

    def __init__(
        self,
        spec: KVCacheSpec = HYBRID,
        *,
        ctx_tp: int = 1,
        ctx_pp: int = 1,
        gen_tp: int = 1,
        gen_pp: int = 1,
        gen_block: int | None = None,
        options: TransferOptions | None = None,
        clock: Clock | None = None,
        bandwidth: float | None = None,
        faults: dict[int, FaultInjection] | None = None,
        blocks: int = 96,
        gen_options: TransferOptions | None = None,
        channel: str = "loopback",
    ) -> None:
        self.topo = Topology(spec, ctx_tp, ctx_pp, gen_tp, gen_pp, gen_tokens_per_block=gen_block)
        self.clock = clock
        self.pools: dict[int, Any] = {}
        self.managers: dict[int, KVCacheManager] = {}
        for r in range(self.topo.world_size):
            s = self.topo.spec(r)
            has_state = any(g.kind == "state" for g in s.groups)
            layout = "NHD" if r < self.topo.num_ctx else "HND"
            p = allocate_pools(s, blocks, num_state_slots=8 if has_state else 0, layout=layout)
            self.pools[r] = p
            self.managers[r] = KVCacheManager(s, pools=p)
        opts = options or TransferOptions(
            checksum=True, chunk_bytes=512, timeout_s=30.0, backend="reference"
        )
        per_rank: dict[int, TransferOptions] = dict.fromkeys(self.topo.ctx_ranks, opts)
        per_rank.update(dict.fromkeys(self.topo.gen_ranks, gen_options or opts))
        kw: dict[str, Any] = {"bandwidth": bandwidth, "faults": faults, "channel": channel}
        if clock is not None:
            kw["clock"] = clock
        self.world = LocalWorld(
            self.topo, {r: {**p.kv, **p.state} for r, p in self.pools.items()}, per_rank, **kw
        )
        self.agents = self.world.agents
        self.released: dict[str, dict[int, S]] = {}

    # -- context side ---------------------------------------------------------------------
    def source(self, rid: str, tokens: Sequence[int], *, lease_s: float | None = None) -> None:
        """Prefill ``tokens`` on every context rank and register the source."""
        for r in self.topo.ctx_ranks:
            m, spec = self.managers[r], self.topo.spec(r)
            alloc = m.allocate(rid, tokens, prefill=True)
            prefill(
                spec, self.pools[r], dict(alloc.spans), dict(alloc.state_slots), tokens, "reference"
            )
            m.commit(rid, len(tokens))

            def release(req: str, states: dict[int, S], m: KVCacheManager = m) -> None:
                m.free(req)
                self.released.setdefault(req, {}).update(states)

            self.agents[r].register_source(
                source_target(m, rid),
                prompt_digest=prompt_digest(tokens),
                lease_s=lease_s,
                on_release=release,
            )

    # -- generation side ------------------------------------------------------------------
    def ask(
        self, rid: str, tokens: Sequence[int], *, digest: str | None = None, mode: str = "per_group"
    ) -> dict[int, Any]:
        """Every generation rank asks for ``rid``; returns {rank: (handle, receive plan)}."""
        out = {}
        for r in self.topo.gen_ranks:
            m = self.managers[r]
            rx = prepare_receive(m, rid, tokens, mode=mode)  # type: ignore[arg-type]
            h = self.agents[r].request(
                rx.target,
                prompt_digest=digest or prompt_digest(tokens),
                mode=mode,
                on_commit=lambda h, rx=rx, m=m: complete_receive(m, rx),
                on_release=lambda h, rx=rx, m=m: abort_receive(m, rx),
            )
            out[r] = (h, rx)
        return out

    def run(self, cond: Any, steps: int = 20_000, dt: float = 0.001) -> None:
        advance = None
        if self.clock is not None:
            clock = self.clock

            def advance() -> None:
                clock.t += dt

        self.world.run_until(cond, max_steps=steps, advance=advance)

    def settle(self, asked: dict[int, Any]) -> None:
        self.run(lambda: all(h.settled for h, _ in asked.values()))

    def check(self, asked: dict[int, Any], tokens: Sequence[int]) -> None:
        for r, (h, rx) in asked.items():
            assert h.state is S.TRANSFERRED, (r, h.session.error)
            bad = verify(
                self.topo.spec(r),
                self.pools[r],
                dict(rx.spans),
                dict(rx.state_slots),
                tokens,
                "reference",
            )
            assert not bad, bad[:3]

    def sender_sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.topo.ctx_ranks:
            for k, v in self.agents[r].sender.sizes().items():  # type: ignore[union-attr]
                out[k] = out.get(k, 0) + v
        return out

    def leaked(self) -> dict[int, dict[str, int]]:
        out = {}
        for r, m in self.managers.items():
            spec = self.topo.spec(r)
            n = {
                g.name: sum(m.refcount(g.name, b) > 0 for b in range(m.num_blocks(g.name)))
                for g in spec.groups
                if g.kind != "state"
            }
            out[r] = {g: c for g, c in n.items() if c}
        return {r: v for r, v in out.items() if v}


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31) % 50_000 + 1 for i in range(n)]


# ---------------------------------------------------------------------------------------
# topologies, bit-exact
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"ctx_tp": 2},
        {"gen_tp": 2, "gen_block": 3},
        {"ctx_pp": 2},
        {"ctx_pp": 2, "gen_tp": 2},
        {"ctx_tp": 2, "gen_tp": 2, "gen_block": 5},
    ],
    ids=["tp1-tp1", "tp2-tp1", "tp1-tp2-bs3", "pp2-pp1", "tp1pp2-tp2pp1", "tp2-tp2-bs5"],
)
@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_topologies_move_exactly_what_each_group_needs(kw: dict[str, Any], channel: str) -> None:
    w = World(channel=channel, **kw)
    t1 = prompt(29)
    w.source("a", t1)
    asked = w.ask("a", t1)
    w.settle(asked)
    w.check(asked, t1)
    for r in w.topo.gen_ranks:  # the receiver keeps turn 1, drops its sliding pages
        w.managers[r].free("a")
        w.managers[r].evict(group="sw")
    t2 = t1 + prompt(11, seed=1)
    w.source("b", t2)
    asked = w.ask("b", t2)
    w.settle(asked)
    w.check(asked, t2)
    for h, rx in asked.values():  # per group: the full layers resumed at their cached prefix
        assert rx.tokens["full"].start > 0
        assert h.bytes_received == h.bytes_expected > 0
    w.run(lambda: w.released.keys() == {"a", "b"})
    for r in w.topo.gen_ranks:
        w.managers[r].free("b")
    assert not w.leaked() and not any(w.sender_sizes().values())


@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_state_groups_move_whole(channel: str) -> None:
    w = World(preset("tiny-hybrid"), channel=channel)
    t = prompt(40)
    w.source("s", t)
    asked = w.ask("s", t)
    w.settle(asked)
    w.check(asked, t)


def test_single_boundary_mode_moves_more_and_is_bit_exact() -> None:
    w = World()
    t1, t2 = prompt(29), prompt(29) + prompt(11, seed=1)
    w.source("a", t1)
    w.settle(a := w.ask("a", t1))
    (gen,) = w.topo.gen_ranks
    w.managers[gen].free("a")
    w.managers[gen].evict(group="sw")
    w.source("b", t2)
    w.source("c", t2)
    pg = w.ask("b", t2)
    w.settle(pg)
    w.managers[gen].free("b")
    w.managers[gen].evict(group="sw")
    sb = w.ask("c", t2, mode="single_boundary")
    w.settle(sb)
    w.check(sb, t2)
    assert a and pg[gen][0].bytes_received < sb[gen][0].bytes_received


# ---------------------------------------------------------------------------------------
# sender-side safety rules
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_a_request_is_bound_to_its_prompt(channel: str) -> None:
    # same id, another prompt of the same length: refused, nothing committed
    w = World(channel=channel)
    w.source("r", prompt(25))
    other = prompt(25, seed=5)
    asked = w.ask("r", other)
    w.settle(asked)
    ((h, _),) = asked.values()
    assert h.state is S.ERROR and "prompt mismatch" in (h.session.error or "")
    assert h.bytes_received == 0
    (gen,) = w.topo.gen_ranks
    assert w.managers[gen].num_cached_blocks("full") == 0  # nothing reached the cache


@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_a_finished_id_is_never_served_again_from_freed_blocks(channel: str) -> None:
    w = World(channel=channel)
    t = prompt(25)
    w.source("r", t)
    w.settle(first := w.ask("r", t))
    w.check(first, t)
    w.run(lambda: "r" in w.released)  # the sender freed the blocks
    (gen,) = w.topo.gen_ranks
    # the sender reuses the freed blocks for another request
    w.source("other", prompt(25, seed=9))
    w.agents[gen].forget("r")
    w.managers[gen].free("r")
    w.managers[gen].evict()
    again = w.ask("r", t)  # a retry of the finished id
    w.settle(again)
    ((h, _),) = again.values()
    assert h.state is S.ERROR and "unknown request 'r'" in (h.session.error or "")
    assert h.bytes_received == 0


def test_a_terminal_session_is_never_replaced() -> None:
    w = World(gen_tp=2)
    t = prompt(25)
    w.source("r", t)
    g0, _ = w.topo.gen_ranks
    asked = w.ask("r", t)
    w.settle(asked)  # both receivers done: the source is released
    # a receiver asking twice while the source is still live (its peer has not asked yet)
    w.source("q", t)
    m = w.managers[g0]
    rx = prepare_receive(m, "q", t)
    h = w.agents[g0].request(
        rx.target, prompt_digest=prompt_digest(t), on_release=lambda h: abort_receive(m, rx)
    )
    w.run(lambda: h.settled)
    w.agents[g0].forget("q")
    rx2 = prepare_receive(m, "q2", t)
    # same id again ("q"), from the same receiver: refused as a duplicate
    target = dataclasses.replace(rx2.target, request_id="q")
    h2 = w.agents[g0].request(
        target, prompt_digest=prompt_digest(t), on_release=lambda h: abort_receive(m, rx2)
    )
    w.run(lambda: h2.settled)
    assert h.state is S.TRANSFERRED
    assert h2.state is S.ERROR and "duplicate request 'q'" in (h2.session.error or "")


def test_an_unknown_id_is_refused_at_once_and_blocks_nothing_behind_it() -> None:
    clock = Clock()
    w = World(clock=clock)
    t = prompt(25)
    w.source("known", t)
    unknown = w.ask("nobody-registered-this", prompt(25, seed=3))
    known = w.ask("known", t)
    w.settle(unknown)
    w.settle(known)
    ((hu, _),) = unknown.values()
    assert hu.state is S.ERROR and "unknown request" in (hu.session.error or "")
    assert hu.session.time_in(S.READY) < 0.1  # refused at once, not after the 30 s timeout
    w.check(known, t)


@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_a_source_is_leased_until_its_receivers_end_or_the_lease_expires(channel: str) -> None:
    clock = Clock()
    w = World(gen_tp=2, clock=clock, channel=channel)
    t = prompt(25)
    w.source("partial", t, lease_s=5.0)
    w.source("nobody", t, lease_s=5.0)
    g0, _ = w.topo.gen_ranks
    m = w.managers[g0]
    rx = prepare_receive(m, "partial", t)
    h = w.agents[g0].request(
        rx.target, prompt_digest=prompt_digest(t), on_commit=lambda h: complete_receive(m, rx)
    )
    w.run(lambda: h.settled)
    assert h.state is S.TRANSFERRED
    assert not w.released  # rank g1 may still ask for both
    w.run(lambda: clock.t > 1000.0 + 5.0 and len(w.released) == 2, dt=0.01)
    assert w.released["partial"] == {g0: S.TRANSFERRED}
    assert w.released["nobody"] == {}
    assert not any(w.sender_sizes().values())
    (ctx,) = w.topo.ctx_ranks
    assert not w.leaked().get(ctx)


def test_an_id_registered_again_after_release_keeps_its_own_lease() -> None:
    """The lease of a released source must not end the lease of a later source of the same id."""
    clock = Clock()
    w = World(clock=clock)
    t = prompt(25)
    w.source("x", t, lease_s=5.0)
    first = w.ask("x", t)
    w.settle(first)
    w.check(first, t)
    w.run(lambda: "x" in w.released)  # served, acknowledged, released
    for r in w.topo.gen_ranks:
        w.agents[r].forget("x")
        w.managers[r].free("x")
    w.released.clear()
    w.source("x", t, lease_s=60.0)
    w.run(lambda: clock.t > 1000.0 + 10.0, dt=0.01)  # past the first lease, within the second
    assert not w.released, "the second source was released by the first one's lease"
    again = w.ask("x", t)
    w.settle(again)
    w.check(again, t)


@pytest.mark.parametrize(
    "tamper,reason",
    [
        (
            lambda r: dataclasses.replace(
                r, tokens={"full": P.TokenRange(0, 10**6)}, num_tokens=10**6
            ),
            "prompt length",
        ),
        (lambda r: dataclasses.replace(r, tokens={**r.tokens, "full": P.TokenRange(0, 25)}), None),
        (lambda r: dataclasses.replace(r, heads={**r.heads, "full": (0, 3)}), "must ask for heads"),
        (
            lambda r: dataclasses.replace(r, layers={**r.layers, "full": (0,)}),
            "must ask for layers",
        ),
        (
            lambda r: dataclasses.replace(r, tokens={**r.tokens, "nope": P.TokenRange(0, 1)}),
            "not an attention group",
        ),
        (lambda r: dataclasses.replace(r, chunk_bytes=128), None),
    ],
    ids=["huge-range", "range-held", "heads-not-owned", "layers", "unknown-group", "tiny-chunks"],
)
def test_every_field_of_a_request_is_checked_before_anything_is_allocated(
    tamper: Any, reason: str | None
) -> None:
    w = World()
    t = prompt(25)
    w.source("r", t)
    (ctx,) = w.topo.ctx_ranks
    (gen,) = w.topo.gen_ranks
    rx = prepare_receive(w.managers[gen], "r", t)
    base = P.Request(
        request_id="r",
        prompt_digest=prompt_digest(t),
        model_digest=HYBRID.model_digest(),
        num_tokens=25,
        tokens={g: gt.tokens for g, gt in rx.target.kv.items()},
        states=(),
        layers={"full": (0, 2), "sw": (1, 3)},
        heads={"full": (0, 2), "sw": (0, 2)},
        chunk_bytes=512,
    )
    req = tamper(base)
    sender = w.agents[ctx].sender
    assert sender is not None
    before = sender.sizes()
    sender.on_request(gen, req)
    if reason is None:  # a legitimate request (covered, or small chunks within the bound)
        assert sender.sizes()["jobs"] == 1
        return
    assert sender.sizes() == before
    assert any(reason in x for x in sender.refusals), list(sender.refusals)


def test_chunk_count_is_bounded() -> None:
    spec = KVCacheSpec(
        (LayerGroup("full", "full", tuple(range(4)), num_kv_heads=8, head_dim=128),),
        tokens_per_block=16,
        dtype="bfloat16",
    )
    w = World(spec, blocks=600)
    t = prompt(8192)
    w.source("big", t)
    (ctx,) = w.topo.ctx_ranks
    (gen,) = w.topo.gen_ranks
    req = P.Request(
        request_id="big",
        prompt_digest=prompt_digest(t),
        model_digest=spec.model_digest(),
        num_tokens=8192,
        tokens={"full": P.TokenRange(0, 8192)},
        states=(),
        layers={"full": (0, 1, 2, 3)},
        heads={"full": (0, 8)},
        chunk_bytes=128,
    )
    sender = w.agents[ctx].sender
    assert sender is not None
    sender.on_request(gen, req)
    assert sender.sizes()["jobs"] == 0
    assert any("chunks" in x for x in sender.refusals)


def test_state_is_pruned_over_a_long_stream() -> None:
    """Sender and receiver tables are O(live requests): after every 250 requests of a stream
    they are empty, and the number of live Python objects does not grow."""
    import gc

    w = World(options=TransferOptions(chunk_bytes=1 << 20, timeout_s=30.0, backend="reference"))
    (gen,) = w.topo.gen_ranks
    (ctx,) = w.topo.ctx_ranks
    objects = []
    for i in range(1000):
        t = prompt(9, seed=i)
        w.source(f"r{i}", t)
        asked = w.ask(f"r{i}", t)
        w.settle(asked)
        ((h, _),) = asked.values()
        assert h.state is S.TRANSFERRED
        w.agents[gen].forget(f"r{i}")
        w.managers[gen].free(f"r{i}")
        if i % 250 == 249:
            w.run(lambda: not w.agents[ctx].sender.sources)  # type: ignore[union-attr]
            assert not any(w.sender_sizes().values()), w.sender_sizes()
            assert w.agents[gen].receiver.sizes() == {"handles": 0, "open_jobs": 0}  # type: ignore[union-attr]
            assert len(w.released) == 250
            w.released.clear()  # the test's own record of releases
            gc.collect()
            objects.append(len(gc.get_objects()))
    assert objects[-1] <= objects[0] + 500, objects  # flat: no per-request residue


def test_overload_serves_in_order_and_keeps_goodput() -> None:
    # 2x overload: a 200 kB/s link, 20 requests of ~3.9 kB (~0.39 s of wire in all) that each
    # must finish within 0.2 s of being asked: about half of them fit
    clock = Clock()
    opts = TransferOptions(chunk_bytes=4096, timeout_s=0.2, backend="reference")
    w = World(clock=clock, bandwidth=2e5, options=opts, blocks=200)
    n = 20
    for i in range(n):
        w.source(f"r{i}", prompt(25, seed=i))
    asked = [w.ask(f"r{i}", prompt(25, seed=i)) for i in range(n)]
    w.run(lambda: all(h.settled for a in asked for h, _ in a.values()), dt=0.0005)
    handles = [h for a in asked for h, _ in a.values()]
    done = [i for i, h in enumerate(handles) if h.state is S.TRANSFERRED]
    wire_s = handles[0].bytes_expected / 2e5
    fits = int(0.2 / wire_s)
    assert n * wire_s >= 0.38  # really 2x overloaded
    assert len(done) >= 0.9 * fits, (len(done), fits)
    assert done == list(range(len(done)))  # served in request order


# ---------------------------------------------------------------------------------------
# faults, cancel, shutdown
# ---------------------------------------------------------------------------------------
def test_corrupted_chunk_fails_both_sides_and_commits_nothing() -> None:
    w = World(faults={0: FaultInjection(corrupt_chunk=1)})
    t = prompt(29)
    w.source("r", t)
    asked = w.ask("r", t)
    w.settle(asked)
    ((h, _),) = asked.values()
    assert h.state is S.ERROR and "checksum mismatch in chunk 1" in (h.session.error or "")
    w.run(lambda: "r" in w.released)
    assert w.released["r"] == {1: S.ERROR}
    (gen,) = w.topo.gen_ranks
    assert w.managers[gen].num_cached_blocks("full") == 0
    assert not w.leaked()


@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_receiver_timeout_when_the_sender_stalls(channel: str) -> None:
    clock = Clock()
    w = World(
        channel=channel,
        clock=clock,
        faults={0: FaultInjection(stall=True)},
        options=TransferOptions(timeout_s=1.5, chunk_bytes=512, checksum=True),
    )
    t = prompt(29)
    w.source("r", t)
    asked = w.ask("r", t)
    w.settle(asked)
    ((h, _),) = asked.values()
    assert h.state is S.ERROR and "timed out after 1.5 s" in (h.session.error or "")
    w.run(lambda: "r" in w.released)
    assert w.released["r"][1] in (S.ERROR, S.CANCELLED)
    assert not w.leaked()


def test_cancel_before_and_during_ends_both_sides_cancelled() -> None:
    w = World(options=TransferOptions(chunk_bytes=256, max_frames_in_flight=1, checksum=True))
    t = prompt(29)
    w.source("early", t)
    w.source("mid", t)
    (gen,) = w.topo.gen_ranks
    early = w.ask("early", t)
    w.agents[gen].cancel("early", "cancelled by the test")
    mid = w.ask("mid", t)
    ((hm, _),) = mid.values()
    w.run(lambda: hm.bytes_received > 0)
    w.agents[gen].cancel("mid", "cancelled by the test")
    w.settle(early)
    w.settle(mid)
    w.run(lambda: len(w.released) == 2)
    assert w.released == {"early": {gen: S.CANCELLED}, "mid": {gen: S.CANCELLED}}
    assert not w.leaked()
    assert w.managers[gen].num_cached_blocks("full") == 0


def test_a_sender_that_dies_mid_transfer_leaves_nothing_committed() -> None:
    w = World(options=TransferOptions(chunk_bytes=256, max_frames_in_flight=1, checksum=True))
    t = prompt(29)
    w.source("r", t)
    asked = w.ask("r", t)
    ((h, _),) = asked.values()
    w.run(lambda: h.bytes_received > 0)
    (ctx,) = w.topo.ctx_ranks
    w.world.kill(ctx)
    w.settle(asked)
    assert h.state is S.ERROR and "lost sender rank 0" in (h.session.error or "")
    (gen,) = w.topo.gen_ranks
    assert not w.leaked().get(gen)
    assert w.managers[gen].num_cached_blocks("full") == 0


def test_close_cancels_live_sessions_on_both_sides() -> None:
    w = World(options=TransferOptions(chunk_bytes=256, max_frames_in_flight=1))
    t = prompt(29)
    w.source("r", t)
    asked = w.ask("r", t)
    ((h, _),) = asked.values()
    w.run(lambda: h.bytes_received > 0)
    (gen,) = w.topo.gen_ranks
    w.agents[gen].close(timeout=0.0)
    assert h.state is S.CANCELLED and h.released
    w.run(lambda: "r" in w.released)
    assert w.released["r"] == {gen: S.CANCELLED}
    assert not w.leaked()


@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_spec_mismatch_is_refused(channel: str) -> None:
    w = World(channel=channel)
    t = prompt(25)
    w.source("r", t)
    (gen,) = w.topo.gen_ranks
    other = dataclasses.replace(HYBRID, dtype="float16")
    rx = prepare_receive(w.managers[gen], "r", t)
    agent = w.agents[gen]
    agent.digest = other.model_digest()  # the receiver runs another model
    h = agent.request(rx.target, prompt_digest=prompt_digest(t))
    w.run(lambda: h.session.is_terminal)
    assert h.state is S.ERROR and "spec mismatch" in (h.session.error or "")


def test_cancel_takes_precedence_over_a_failure() -> None:
    from kvtriton.transfer.session import Session

    s = Session("r", "send")
    assert s.fail("boom")
    assert s.cancel("shutdown")  # a cancel racing the failure wins
    assert s.state is S.CANCELLED
    assert not s.fail("late")  # and nothing replaces a cancel
    done = Session("d", "recv")
    done.advance_to(S.TRANSFERRED)
    assert not done.cancel("late") and done.state is S.TRANSFERRED


def test_peer_data_is_never_unpickled() -> None:
    """No module that handles peer data imports pickle or calls an API that unpickles what a
    peer (or a spawned rank) sent: results and messages travel as JSON / raw bytes."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "kvtriton"
    unpickling_calls = {
        "gather_object",
        "all_gather_object",
        "broadcast_object_list",
        "recv_object_list",
        "scatter_object_list",
        "Queue",
        "SimpleQueue",
        "recv",  # multiprocessing recv() unpickles
    }
    files = [*root.glob("transfer/**/*.py"), *root.glob("integrations/*.py")]
    assert files
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not any("pickle" in n for n in names), f"{path.name} imports pickle"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                name = node.func.attr
                if name in ("Queue", "SimpleQueue") and owner == "queue":
                    continue  # thread queues inside one process
                if name == "recv" and owner.endswith(("sock", "_wake_r", "dist")):
                    continue  # socket bytes, tensors
                assert name not in unpickling_calls, f"{path.name}: {owner}.{name}(...)"


def test_direct_channel_checks_a_senders_block_ids_before_any_copy() -> None:
    w = World(channel="direct")
    t = prompt(25)
    w.source("r", t)
    (ctx,) = w.topo.ctx_ranks
    (gen,) = w.topo.gen_ranks
    sender = w.agents[ctx]
    real = sender.channel.schedule

    def lying_schedule(job: Any, count: int) -> None:  # a sender naming blocks it lacks
        ids = job.target.kv["full"].block_ids.copy()
        ids[0] = 10**6
        job.target = dataclasses.replace(
            job.target,
            kv={**job.target.kv, "full": dataclasses.replace(job.target.kv["full"], block_ids=ids)},
        )
        real(job, count)

    sender.channel.schedule = lying_schedule  # type: ignore[method-assign]
    asked = w.ask("r", t)
    w.settle(asked)
    ((h, _),) = asked.values()
    assert h.state is S.ERROR and "outside the pool's blocks" in (h.session.error or "")
    assert h.bytes_received == 0 and not w.leaked().get(gen)


def test_direct_channel_keeps_the_source_leased_until_the_receivers_final_word() -> None:
    clock = Clock()
    w = World(
        channel="direct", clock=clock, options=TransferOptions(timeout_s=1.0, backend="reference")
    )
    t = prompt(25)
    w.source("r", t)
    (gen,) = w.topo.gen_ranks
    receiver = w.agents[gen]
    held: list[Any] = []

    def slow_reader(job: Any, message: Any) -> Any:  # a copy launched, not yet complete
        held.append(job)
        job.posted = len(job.chunks)
        job.pending += 1
        return None

    receiver.channel.on_announce = slow_reader  # type: ignore[method-assign]
    asked = w.ask("r", t)
    w.run(lambda: bool(held))
    # both sides time out while the receiver still reads: the blocks stay leased, and the
    # receiver's final word waits for its copy
    w.run(lambda: clock.t > 1001.5, dt=0.01)
    ((h, _),) = asked.values()
    assert h.state is S.ERROR and "timed out" in (h.session.error or "")
    assert "r" not in w.released and not h.released
    (job,) = held
    receiver.receiver.on_write_done(job)  # type: ignore[union-attr]
    for k in range(len(job.chunks)):
        receiver.receiver.on_landed(Landed(job, k, written=True))  # type: ignore[union-attr]
    w.run(lambda: "r" in w.released)  # released only after the receiver's final word
    assert h.released and not w.leaked()


# ---------------------------------------------------------------------------------------
# layer-wise streaming
# ---------------------------------------------------------------------------------------
def _streamed_source(w: World, rid: str, tokens: list[int]) -> tuple[Any, Any]:
    """Register ``rid`` before its KV exists (context rank 0); returns (manager, alloc)."""
    (ctx,) = w.topo.ctx_ranks
    m = w.managers[ctx]
    alloc = m.allocate(rid, tokens, prefill=True)

    def release(req: str, states: dict[int, S]) -> None:
        m.free(req)
        w.released.setdefault(req, {}).update(states)

    w.agents[ctx].register_source(
        source_target(m, rid), prompt_digest=prompt_digest(tokens), on_release=release,
        streamed=True,
    )  # fmt: skip
    return m, alloc


def _write_layer(w: World, rid: str, alloc: Any, tokens: list[int], layer: int) -> None:
    (ctx,) = w.topo.ctx_ranks
    spec = w.topo.spec(ctx)
    prefill(spec, w.pools[ctx], dict(alloc.spans), dict(alloc.state_slots), tokens,
            "reference", layers=[layer])  # fmt: skip
    assert w.agents[ctx].mark_ready(rid, [layer])


@pytest.mark.parametrize("channel", ["loopback", "direct"])
def test_streamed_layers_move_as_they_are_written_and_commit_only_at_the_end(
    channel: str,
) -> None:
    opts = TransferOptions(layer_chunks=True, checksum=True, backend="reference")
    w = World(preset("tiny-hybrid"), options=opts, channel=channel)
    t = prompt(40)
    _, alloc = _streamed_source(w, "s", t)
    asked = w.ask("s", t)
    ((h, _),) = asked.values()
    (job,) = h.jobs.values()
    layers = sorted({i for c in job.chunks for i in c.layer_ids})
    assert [min(c.layer_ids) for c in job.chunks] == sorted(min(c.layer_ids) for c in job.chunks)
    w.run(lambda: h.state is S.READY or h.state is S.TRANSFERRING, steps=50)
    for _ in range(20):
        w.world.step()
    assert job.landed == 0  # nothing written yet: nothing moved
    for n, layer in enumerate(layers):
        _write_layer(w, "s", alloc, t, layer)
        w.run(lambda layer=layer: all(
            k < job.landed for k, c in enumerate(job.chunks) if max(c.layer_ids) <= layer
        ))  # fmt: skip
        if n < len(layers) - 1:
            assert h.state is not S.TRANSFERRED  # committed only once every layer arrived
    w.settle(asked)
    w.check(asked, t)
    w.run(lambda: "s" in w.released)
    for r in w.topo.gen_ranks:
        w.managers[r].free("s")  # decoding done
    assert not w.leaked()


def test_a_context_rank_that_dies_mid_stream_leaves_nothing_committed() -> None:
    opts = TransferOptions(layer_chunks=True, backend="reference")
    w = World(preset("tiny-hybrid"), options=opts)
    (ctx,) = w.topo.ctx_ranks
    (gen,) = w.topo.gen_ranks
    t = prompt(40)
    _, alloc = _streamed_source(w, "s", t)
    asked = w.ask("s", t)
    ((h, _),) = asked.values()
    (job,) = h.jobs.values()
    first = min(min(c.layer_ids) for c in job.chunks)
    _write_layer(w, "s", alloc, t, first)
    w.run(lambda: job.landed > 0)
    w.world.kill(ctx)  # dies half-way through the prefill
    w.settle(asked)
    assert h.state is S.ERROR and "lost sender rank 0" in (h.session.error or "")
    assert not w.leaked().get(gen)
    assert all(n == 0 for n in (w.managers[gen].num_cached_blocks(g) for g in ("full", "sliding8")))


def test_a_job_waiting_for_its_layers_lets_the_next_request_go() -> None:
    opts = TransferOptions(layer_chunks=True, backend="reference")
    w = World(preset("tiny-hybrid"), options=opts, blocks=128)
    t1, t2 = prompt(40, seed=1), prompt(40, seed=2)
    _streamed_source(w, "slow", t1)  # its prefill has not written anything yet
    w.source("fast", t2)
    slow = w.ask("slow", t1)
    fast = w.ask("fast", t2)
    w.settle(fast)
    w.check(fast, t2)
    ((hs, _),) = slow.values()
    assert not hs.session.is_terminal and hs.bytes_received == 0
