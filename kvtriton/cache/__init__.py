"""Paged KV cache of one rank: pools, block allocators, per-layer-group prefix reuse.

Conventions (DESIGN.md §1): positions are 0-based, ranges half-open, ``B = tokens_per_block``
(one value for every group of a spec), logical block ``b`` holds ``[b*B, (b+1)*B)``, a
sliding window ``W`` needs ``needed(g, P) = [max(0, P + 1 - W), P)`` to decode position ``P``.

Public API
----------
Pools (:mod:`kvtriton.cache.pools`, imports torch on use)::

    allocate_pools(spec, num_blocks=None, *, num_bytes=None, num_state_slots=0,
                   device="cpu", layout="NHD" | "HND") -> CachePools
        CachePools.kv[group]    6-D view [layers, blocks, kv, B, heads, head_dim]
        CachePools.state[group] [layers, slots, *group.local_state_shape]
    blocks_for_bytes(spec, num_bytes, num_state_slots=0) -> int   (same N for every group)
    pool_bytes(spec, num_blocks, num_state_slots=0) -> int

Hashes (:mod:`kvtriton.cache.hashing`): a hash chain (SHA-256 by default, or xxh3_128) over
the u64-le token ids of full blocks, rooted at the request's extra key (LoRA / multimodal
salt); stable across processes.

Bookkeeping: one :class:`~kvtriton.cache.block_pool.BlockPool` per group (free list,
reference counts, hash -> block index, LRU of unreferenced cached blocks; a state group's
pool holds its slots: request states plus snapshots), driven by one per-kind group cache
(:mod:`kvtriton.cache.groups`: full attention, sliding window, state) chosen once per group.

Manager (:class:`KVCacheManager`, pure Python bookkeeping; copies state snapshots when it
owns pools)::

    m = KVCacheManager(spec, num_blocks, num_state_slots=0, pools=None, hash_name="sha256")
    m.match(tokens, *, extra_key=None) -> PrefixMatch
        .cached {group: tokens}  per-group counts (feed plan_transfer as a mapping)
        .boundary int            single-boundary value (feed plan_transfer as an int)
        .matched_blocks {attention group: range of logical blocks}, .state_hits
        .cached_tokens(mode)     the plan_transfer argument for "per_group" | "single_boundary"
    m.allocate(request_id, tokens | PrefixMatch, num_draft_tokens=0, mode="per_group", *,
               extra_key=None, prefill=False) -> Allocation   (a Mapping {group: BlockSpan})
        .spans, .state_slots, .cached, .reused_blocks, .state_hits, .match,
        .cached_tokens()  (mapping in per_group mode, int in single_boundary mode)
    m.append(request_id, n | token_ids, *, num_draft_tokens=None) -> {group: BlockSpan}
    m.commit(request_id, num_tokens=None) -> {group: entries published}
    m.slide(request_id) -> {sliding group: blocks released}
    m.free(request_id)
    m.evict(num_blocks=None, *, group=None) -> int
    m.spans(request_id), m.state_slots(request_id), m.request(request_id) -> RequestState
    m.requests, m.stats(), m.num_blocks(g), m.num_free_blocks(g), m.num_cached_blocks(g),
    m.refcount(g, id), m.block_hash(g, id), m.lookup(g, hash), m.evictable(g), m.version,
    m.block_pool(g), m.check_invariants()

Passing the ``PrefixMatch`` of ``match`` to ``allocate`` skips rehashing (and re-matching
while ``m.version`` is unchanged). ``prefill=True`` marks a request whose caller computes
every position of its spans (a prefill rank); by default (a receiver) only reused blocks and
the transfer range ``[max(cached, needed.start), P)`` hold valid KV, and ``commit`` never
publishes a block with a position outside them.

Request life cycle: ``allocate`` (reuses matched blocks, allocates the rest; nothing is
published) -> KV is written (a transfer, or a prefill) -> ``commit`` (full blocks below the
committed count become matchable; a state snapshot at a block boundary) -> decode steps
``append`` / ``commit`` / ``slide`` -> ``free`` (committed blocks stay matchable until LRU
eviction). A failed call raises before changing anything; ``OutOfBlocksError`` names the
request, the group, and the counts; every error names the request and, where one is at
fault, the group.

Matching rules (``match``), per group: full attention = the longest run of cached blocks
from block 0 (``cached = k*B``); sliding window = the longest run from the block holding
``needed.start`` (``cached = (s + k)*B``, or ``needed.start`` when ``k = 0``); state = a hit
only on a snapshot at exactly ``P`` (``cached = P``, else 0). Single boundary = the largest
``c`` (a multiple of ``B``) where every group could resume: full attention holds all blocks
below ``c``, a sliding window all blocks touching ``[max(0, c + 1 - W), c)``, a state group a
snapshot at ``c``. For attention groups ``cached[g] >= boundary`` always.

The transfer-facing wrapper (receiver and sender sides) is :mod:`kvtriton.adapter`.
"""

from kvtriton.cache.block_pool import BlockPool
from kvtriton.cache.hashing import (
    DEFAULT_HASH,
    HASH_NAMES,
    BlockHash,
    chain_hashes,
    encode_tokens,
    root_hash,
)
from kvtriton.cache.manager import (
    Allocation,
    KVCacheManager,
    OutOfBlocksError,
    PrefixMatch,
    RequestId,
    RequestState,
)
from kvtriton.cache.pools import CachePools, allocate_pools, blocks_for_bytes, pool_bytes

__all__ = [
    "DEFAULT_HASH",
    "HASH_NAMES",
    "Allocation",
    "BlockHash",
    "BlockPool",
    "CachePools",
    "KVCacheManager",
    "OutOfBlocksError",
    "PrefixMatch",
    "RequestId",
    "RequestState",
    "allocate_pools",
    "blocks_for_bytes",
    "chain_hashes",
    "encode_tokens",
    "pool_bytes",
    "root_hash",
]
