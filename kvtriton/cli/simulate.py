"""``kvtriton simulate``: a request trace through the receiver cache under each reuse policy.

The simulator (:mod:`kvtriton.sim`) is imported when the command is selected, not when the
registry is built, so other commands never pay for it.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from kvtriton.options import (
    UsageError,
    add_model_arguments,
    count_arg,
    float_arg,
    int_pair_arg,
    positive_int,
    spec_from_args,
)
from kvtriton.plan import ReusePolicy

__all__ = ["add_arguments", "run", "time_model_from_args", "trace_from_args"]

HELP = (
    "run a request trace through a receiver cache under no reuse, single "
    "boundary and per-group reuse: bytes moved, hit rates, peak blocks per layer group, "
    "transfer time and TTFT percentiles"
)
EPILOG = (
    "examples: kvtriton simulate --hf-config GptOssConfig --trace chat --plot sim.png; "
    "kvtriton simulate --hf-config GptOssConfig --trace data/mooncake_synthetic_sample.jsonl "
    "(a Mooncake-format trace: docs/traces.md)"
)

#: Options that shape a synthetic trace (refused with a trace file).
GENERATOR_OPTIONS = (
    "users",
    "turns",
    "system_prompts",
    "system_len",
    "input_len",
    "context_len",
    "output_len",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``kvtriton simulate``."""
    add_model_arguments(p)
    p.add_argument(
        "--trace",
        default="chat",
        metavar="chat|agent|FILE.jsonl",
        help="a synthetic trace kind or a JSONL trace file: kvtriton's format or the "
        "Mooncake format (hash_ids, timestamp, input_length, output_length); docs/traces.md",
    )
    p.add_argument(
        "--trace-format",
        choices=("auto", "kvtriton", "mooncake"),
        default="auto",
        help="format of the trace file (auto: Mooncake when the first record holds hash_ids)",
    )
    p.add_argument(
        "--trace-block-tokens",
        type=positive_int,
        metavar="N",
        help="tokens per hash_ids entry of a Mooncake-format trace (default 512)",
    )
    p.add_argument(
        "--sample",
        type=float_arg("the sampled fraction", above=0, maximum=1),
        metavar="F",
        help="a Mooncake-format trace: keep the prefix families (requests sharing a first "
        "block) of a seeded fraction F of its first blocks (--seed)",
    )
    p.add_argument(
        "--requests",
        type=positive_int,
        metavar="N",
        help="simulate only the first N requests of the trace (in arrival order)",
    )
    p.add_argument(
        "--rate",
        type=float_arg("the arrival rate", above=0, maximum=1e9, unit="requests/s"),
        metavar="R",
        help="arrivals for a trace without timestamps: a seeded Poisson process of R "
        "requests/s (default: every request is ready at time 0)",
    )
    p.add_argument(
        "--seed",
        type=count_arg("the seed"),
        default=0,
        help="seed of the synthetic trace, of --rate arrivals and of --sample (0)",
    )
    p.add_argument(
        "--users", type=positive_int, metavar="N", help="chat users / agents (default 8 / 4)"
    )
    p.add_argument(
        "--turns",
        type=positive_int,
        metavar="N",
        help="chat turns per user / agent steps (default 4 / 8)",
    )
    p.add_argument(
        "--system-prompts",
        type=positive_int,
        metavar="N",
        help="distinct chat system prompts shared by the users (default 2)",
    )
    p.add_argument(
        "--system-len",
        type=count_arg("the system prompt length"),
        metavar="N",
        help="shared system / tool prompt tokens (default 1024 chat, 2048 agent)",
    )
    p.add_argument(
        "--input-len",
        type=int_pair_arg(),
        metavar="MIN:MAX",
        help="new tokens per turn: chat message / agent tool output (default 32:256 / 16:128)",
    )
    p.add_argument(
        "--context-len",
        type=int_pair_arg(),
        metavar="MIN:MAX",
        help="agent task context at step 0 (default 4096:8192)",
    )
    p.add_argument(
        "--output-len",
        type=int_pair_arg(),
        metavar="MIN:MAX",
        help="response tokens (default 64:384 chat, 16:96 agent)",
    )
    cap = p.add_mutually_exclusive_group()
    cap.add_argument(
        "--capacity-blocks",
        type=positive_int,
        metavar="N",
        help="receiver pool: blocks per attention group (default: 4x what "
        "--concurrency of the longest requests hold)",
    )
    cap.add_argument(
        "--capacity-gib",
        type=float_arg("the capacity", above=0, unit="GiB"),
        metavar="GIB",
        help="receiver pool: GiB over all groups (same block count per group)",
    )
    p.add_argument(
        "--concurrency",
        type=positive_int,
        default=8,
        metavar="N",
        help="requests decoding at once (8)",
    )
    p.add_argument(
        "--state-slots",
        type=positive_int,
        metavar="N",
        help="slots per state group (default 4 x concurrency)",
    )
    names = ",".join(p.value for p in ReusePolicy.baseline_order())
    p.add_argument(
        "--policies",
        default=names,
        metavar="LIST",
        help=f"comma-separated subset of {names}",
    )
    from kvtriton.sim.timing import (
        DEFAULT_DECODE_TOKENS_PER_S,
        DEFAULT_LINK,
        DEFAULT_PREFILL_TOKENS_PER_S,
        LINK_PROFILES,
    )

    links = "; ".join(p.label() for p in LINK_PROFILES.values())
    p.add_argument(
        "--link",
        choices=tuple(LINK_PROFILES),
        default=DEFAULT_LINK,
        help=f"link profile (kvtriton.sim.timing, from BENCHMARKS.md / DESIGN.md): {links}",
    )
    p.add_argument(
        "--link-gbps",
        type=float_arg("the link bandwidth", above=0, maximum=1e9, unit="GB/s"),
        metavar="GBPS",
        help="replace the profile's bandwidth (GB/s of payload)",
    )
    p.add_argument(
        "--request-overhead-us",
        type=float_arg("the request overhead", minimum=0, maximum=1e12, unit="us"),
        metavar="US",
        help="replace the profile's fixed cost per request (microseconds)",
    )
    p.add_argument(
        "--prefill-tokens-per-s",
        type=float_arg("the prefill rate", above=0, maximum=1e12, unit="tokens/s"),
        default=DEFAULT_PREFILL_TOKENS_PER_S,
        metavar="R",
        help=f"prefill throughput per context rank (an assumption: "
        f"{DEFAULT_PREFILL_TOKENS_PER_S:,.0f})",
    )
    p.add_argument(
        "--decode-tokens-per-s",
        type=float_arg("the decode rate", above=0, maximum=1e12, unit="tokens/s"),
        default=DEFAULT_DECODE_TOKENS_PER_S,
        metavar="R",
        help=f"decode speed of one request on the receiver (an assumption: "
        f"{DEFAULT_DECODE_TOKENS_PER_S:,.0f})",
    )
    p.add_argument(
        "--context-ranks",
        type=positive_int,
        default=1,
        metavar="N",
        help="context ranks prefilling at once (1)",
    )
    p.add_argument(
        "--no-context-cache",
        action="store_true",
        help="the context side prefills every prompt whole (default: it resumes after the "
        "longest prefix it prefilled before)",
    )
    p.add_argument(
        "--hash",
        choices=("sha256", "xxh3_128"),
        default="sha256",
        help="the receiver cache's block hash (same results; xxh3_128 is faster)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", metavar="PATH", help="also save a plot (png, svg, pdf ...)")
    p.add_argument("--save-trace", metavar="PATH", help="also write the trace as JSONL")


def trace_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~kvtriton.sim.Trace` that ``--trace`` and the generator options select."""
    trace = _select_trace(args)
    if args.sample is not None:
        from kvtriton.sim.mooncake import sample_prefix_families

        trace = sample_prefix_families(trace, args.sample, seed=args.seed)
    if args.requests is not None:
        trace = trace.head(args.requests)
    if args.rate is not None:
        if trace.timed:
            raise UsageError(
                f"--rate applies to traces without arrival times; {args.trace!r} has timestamps"
            )
        trace = trace.with_rate(args.rate, seed=args.seed)
    return trace


def _select_trace(args: argparse.Namespace) -> Any:
    from kvtriton.sim import TRACE_KINDS, load_trace, synthetic_trace

    if args.trace in TRACE_KINDS:
        for option in ("trace_block_tokens",):
            if getattr(args, option) is not None or args.trace_format != "auto":
                raise UsageError(
                    "--trace-format / --trace-block-tokens apply to trace files, not "
                    f"--trace {args.trace}"
                )
        params: dict[str, Any] = {"seed": args.seed}
        chat = args.trace == "chat"
        for option, key in (
            ("users", "users" if chat else "agents"),
            ("turns", "turns" if chat else "steps"),
            ("system_len", "system_len"),
            ("output_len", "response_len"),
            ("input_len", "user_len" if chat else "step_len"),
        ):
            if getattr(args, option) is not None:
                params[key] = getattr(args, option)
        only = {"system_prompts": chat, "context_len": not chat}
        for option, allowed in only.items():
            if getattr(args, option) is not None:
                if not allowed:
                    raise UsageError(
                        f"--{option.replace('_', '-')} does not apply to --trace {args.trace}"
                    )
                params[option] = getattr(args, option)
        return synthetic_trace(args.trace, **params)
    if not os.path.exists(args.trace):
        raise UsageError(
            f"--trace {args.trace!r} is neither {' nor '.join(TRACE_KINDS)} nor an "
            "existing JSONL file"
        )
    generator = [o for o in GENERATOR_OPTIONS if getattr(args, o) is not None]
    if generator:
        raise UsageError(
            f"--{generator[0].replace('_', '-')} shapes synthetic traces only, not "
            f"the trace file {args.trace!r}"
        )
    return load_trace(
        args.trace, trace_format=args.trace_format, block_tokens=args.trace_block_tokens
    )


def time_model_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~kvtriton.sim.timing.TimeModel` the time options select."""
    from kvtriton.sim.timing import TimeModel, link_profile

    link = link_profile(args.link).with_overrides(args.link_gbps, args.request_overhead_us)
    return TimeModel(
        link=link,
        prefill_tokens_per_s=args.prefill_tokens_per_s,
        decode_tokens_per_s=args.decode_tokens_per_s,
        context_ranks=args.context_ranks,
        context_cache=not args.no_context_cache,
    )


def run(args: argparse.Namespace) -> int:
    """``kvtriton simulate``: print the per-policy table (or JSON) and optionally a plot."""
    from kvtriton.sim import default_capacity_blocks, simulate

    try:
        spec = spec_from_args(args)
        trace = trace_from_args(args)
        time_model = time_model_from_args(args)
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if args.capacity_gib is not None:
            capacity: dict[str, Any] = {"capacity_bytes": int(args.capacity_gib * 1024**3)}
        else:
            capacity = {
                "capacity_blocks": args.capacity_blocks
                or default_capacity_blocks(spec, trace, concurrency=args.concurrency)
            }
        if args.save_trace:
            trace.save(args.save_trace)
        from tqdm import tqdm

        with tqdm(
            total=len(trace) * len(policies), unit="req", desc="simulate", disable=None, leave=False
        ) as bar:
            result = simulate(
                spec,
                trace,
                policies=policies,
                concurrency=args.concurrency,
                state_slots=args.state_slots,
                progress=bar.update,
                hash_name=args.hash,
                time_model=time_model,
                **capacity,
            )
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if args.plot:
        from kvtriton.viz import plot_simulation

        try:
            plot_simulation(result, args.plot)
        except (ImportError, ValueError, OSError) as exc:
            raise UsageError(f"--plot {args.plot!r}: {exc}") from exc
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
