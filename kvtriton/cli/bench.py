"""``kvtriton bench kernels|cache|transfer``: run a benchmark module with its own options
(given after ``--``); ``transfer`` runs under torchrun with one process per rank."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from kvtriton.options import positive_int

__all__ = ["BENCHMARKS", "add_arguments", "run"]

HELP = "benchmarks: kernels (GPU), cache (CPU), transfer (2 GPUs, torchrun)"
EPILOG = "example: kvtriton bench kernels -- --json kernels.json"

#: benchmark name -> module with ``main(argv) -> int``
BENCHMARKS = {
    "kernels": "kvtriton.kernels.bench",
    "cache": "kvtriton.cache.bench",
    "transfer": "kvtriton.transfer.bench",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "which",
        choices=sorted(BENCHMARKS),
        help="kernels: gather/scatter/copy vs copy_ and torch indexing (GPU); "
        "cache: match + allocate + commit (CPU); transfer: end to end vs raw "
        "NCCL send/recv (2 GPUs, spawned with torchrun)",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=2,
        help="transfer only: ranks torchrun spawns (default 2)",
    )
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="options passed to the benchmark (see `kvtriton bench WHICH -- --help`)",
    )


def run(args: argparse.Namespace) -> int:
    extra = [a for a in args.args if a != "--"]
    module = BENCHMARKS[args.which]
    if args.which == "transfer":
        # One process per rank: torchrun spawns them; NVLink multicast stays off.
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            module,
            *extra,
        ]
        return subprocess.call(cmd, env=env)
    status: int | None = importlib.import_module(module).main(extra)
    return int(status or 0)
