"""CPU microbenchmark of the cache manager: match + allocate + commit of one prompt.

    python scripts/bench_cache.py                       # 4k / 32k / 128k tokens, B = 16
    kvtriton bench cache -- --tokens 32768 --reps 50 --json out.json
    kvtriton bench cache -- --hash xxh3_128             # one block hash only

For each preset, prompt length and block hash (SHA-256, the default, and xxh3_128) it times,
on a fresh manager each repetition:

* ``cold``: ``match`` + ``allocate(match)`` + ``commit`` of a prompt nothing of which is
  cached (hash every block, allocate every block, publish every block);
* ``warm``: the same prompt again after the first request was freed (every block reused);
* ``hash``: the hash chain alone (part of ``cold``).

It prints the median and best time of each and the cold median per block, which stays flat
when the cost is linear in blocks. Targets: a cold 32k-token prompt under 2 ms with SHA-256
and under 0.5 ms with xxh3_128.
"""

from __future__ import annotations

import json
import random
import statistics
import time

from kvtriton.cache import HASH_NAMES, KVCacheManager, chain_hashes, encode_tokens, root_hash
from kvtriton.cache.hashing import HashName, available_hash_names
from kvtriton.options import OneLineParser, count_arg, int_arg
from kvtriton.ranges import ceil_div
from kvtriton.spec import MAX_TOKENS_PER_BLOCK, PRESETS, preset

__all__ = ["MAX_BENCH_TOKENS", "MAX_REPS", "bench", "main"]

#: prompt length of one timed request at most (the prompt and its hash chain live in memory)
MAX_BENCH_TOKENS = 2**24
#: repetitions per case at most
MAX_REPS = 100_000


def bench(
    preset_name: str,
    num_tokens: int,
    tokens_per_block: int,
    reps: int,
    seed: int,
    hash_name: HashName = "sha256",
) -> dict[str, float | int | str]:
    """Time ``reps`` cold and warm match + allocate + commit rounds (see the module doc)."""
    spec = preset(preset_name, tokens_per_block=tokens_per_block)
    rng = random.Random(seed)
    tokens = [rng.randrange(200_000) for _ in range(num_tokens)]
    num_blocks = ceil_div(num_tokens, tokens_per_block) + 8
    cold: list[float] = []
    warm: list[float] = []
    hashing: list[float] = []
    clock = time.perf_counter
    for _ in range(reps):
        m = KVCacheManager(spec, num_blocks, num_state_slots=4, hash_name=hash_name)
        t0 = clock()
        match = m.match(tokens)
        m.allocate("a", match)
        m.commit("a")
        t1 = clock()
        m.free("a")
        t2 = clock()
        match = m.match(tokens)
        alloc = m.allocate("b", match)
        m.commit("b")
        t3 = clock()
        t4 = clock()
        root = root_hash(None, hash_name=hash_name)
        chain_hashes(encode_tokens(tokens), tokens_per_block, root, hash_name=hash_name)
        t5 = clock()
        assert alloc.reused_blocks[spec.groups[0].name], "warm run reused nothing"
        cold.append(t1 - t0)
        warm.append(t3 - t2)
        hashing.append(t5 - t4)
    blocks = num_tokens // tokens_per_block
    return {
        "preset": preset_name,
        "hash": hash_name,
        "groups": len(spec.groups),
        "tokens": num_tokens,
        "blocks": blocks,
        "cold_ms": statistics.median(cold) * 1e3,
        "cold_best_ms": min(cold) * 1e3,
        "warm_ms": statistics.median(warm) * 1e3,
        "warm_best_ms": min(warm) * 1e3,
        "hash_ms": statistics.median(hashing) * 1e3,
        "cold_us_per_block": statistics.median(cold) * 1e6 / blocks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="kvtriton bench cache",
        description=(__doc__ or "").split("\n\n")[0],
        help_command="kvtriton bench cache -- --help",
    )
    parser.add_argument(
        "--tokens",
        type=int_arg("the prompt length", minimum=1, maximum=MAX_BENCH_TOKENS),
        nargs="+",
        default=[4096, 32768, 131072],
    )
    parser.add_argument(
        "--presets", nargs="+", choices=list(PRESETS), default=["gpt-oss-20b", "llama-3-8b"]
    )
    parser.add_argument(
        "--hash",
        nargs="+",
        choices=HASH_NAMES,
        default=list(available_hash_names()),
        help="block hashes to time (default: every one installed)",
    )
    parser.add_argument(
        "--tokens-per-block",
        type=int_arg("tokens per block", minimum=1, maximum=MAX_TOKENS_PER_BLOCK),
        default=16,
    )
    parser.add_argument(
        "--reps", type=int_arg("the repetitions", minimum=1, maximum=MAX_REPS), default=20
    )
    parser.add_argument("--seed", type=count_arg("the seed"), default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = [
        bench(p, n, args.tokens_per_block, args.reps, args.seed, h)
        for p in args.presets
        for n in args.tokens
        for h in args.hash
    ]
    header = (
        f"{'preset':<14} {'hash':<8} {'tokens':>7} {'blocks':>6} {'cold ms':>8} {'(best)':>7} "
        f"{'warm ms':>8} {'(best)':>7} {'hash ms':>8} {'cold us/blk':>11}"
    )
    print(f"match + allocate + commit, B={args.tokens_per_block}, median of {args.reps}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['preset']:<14} {r['hash']:<8} {r['tokens']:>7} {r['blocks']:>6} "
            f"{r['cold_ms']:>8.3f} "
            f"{r['cold_best_ms']:>7.3f} {r['warm_ms']:>8.3f} {r['warm_best_ms']:>7.3f} "
            f"{r['hash_ms']:>8.3f} {r['cold_us_per_block']:>11.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
