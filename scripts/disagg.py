#!/usr/bin/env python
"""Disaggregated KV transfer experiment: context ranks prefill, generation ranks fetch.

Under torchrun (one process per rank; NCCL data when each rank owns a GPU, gloo otherwise)::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 scripts/disagg.py --model tiny-hybrid
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 scripts/disagg.py --ctx-tp 2 --gen-tp 2

Without torchrun it spawns its own ranks on this machine (``kvtriton demo`` does the same).
The world is ``ctx_tp * ctx_pp`` context ranks followed by ``gen_tp * gen_pp`` generation
ranks. The report (printed by the first generation rank) lists, per layer group, tokens and
bytes moved, savings against a single reuse boundary and against no reuse, GB/s and the time
per phase, and ends with a VERIFIED line when every needed position on every receiver is
bit-exact. The logic lives in :mod:`kvtriton.transfer.experiment`.
"""

from __future__ import annotations

import sys

from kvtriton.cli.demo import validate_args
from kvtriton.options import OneLineParser, UsageError
from kvtriton.transfer.config import add_arguments


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="disagg", description=(__doc__ or "").split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:  # every option checked here, before a rank is spawned: one line, exit 2
        validate_args(args)
    except UsageError as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2
    from kvtriton.transfer.demo import run_cli

    try:
        return run_cli(args)
    except ValueError as exc:
        print(f"disagg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
