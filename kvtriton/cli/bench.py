"""``kvtriton bench kernels|cache|transfer|latency|ttft``: run a benchmark module with its own
options (given after ``--``); ``transfer`` runs under torchrun with one process per rank.

A benchmark that needs CUDA GPUs is refused in one line (exit 2) on a machine without enough
of them, before the benchmark runs or spawns anything, unless its options select its CPU mode
(``kernels -- --device cpu --quick``, ``transfer -- --cpu``); ``-- --help`` always works.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from kvtriton.options import UsageError, int_arg

__all__ = ["BENCHMARKS", "Benchmark", "add_arguments", "cuda_device_count", "run"]

HELP = (
    "benchmarks: kernels (GPU; CPU smoke test), cache (CPU), transfer (GPU), latency and ttft "
    "(CPU or GPU)"
)
EPILOG = "example: kvtriton bench kernels -- --json kernels.json"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: the module with ``main(argv) -> int``, the CUDA GPUs it needs (``-1``:
    one per torchrun process, ``--nproc``), the options that select its CPU mode, and whether
    it runs under torchrun."""

    module: str
    help: str
    gpus: int = 0
    cpu_mode: tuple[tuple[str, ...], ...] = ()
    torchrun: bool = False
    cpu_example: str = ""

    def wants_cpu(self, argv: Sequence[str]) -> bool:
        """Whether ``argv`` selects the CPU mode (e.g. ``--device cpu`` or ``--device=cpu``)."""
        joined = [a for arg in argv for a in (arg.split("=", 1) if "=" in arg else [arg])]
        return any(
            any(list(mode) == joined[i : i + len(mode)] for i in range(len(joined)))
            for mode in self.cpu_mode
        )


#: benchmark name -> what it runs and needs. ``latency`` is looked up when it is run: a
#: checkout without ``kvtriton.transfer.bench_latency`` says so in one line.
BENCHMARKS: dict[str, Benchmark] = {
    "kernels": Benchmark(
        "kvtriton.kernels.bench",
        "gather/scatter/copy vs copy_ and torch indexing (a CUDA GPU; "
        "-- --device cpu --quick: a CPU smoke test)",
        gpus=1,
        cpu_mode=(("--device", "cpu"),),
        cpu_example="--device cpu --quick",
    ),
    "cache": Benchmark("kvtriton.cache.bench", "match + allocate + commit (CPU)"),
    "transfer": Benchmark(
        "kvtriton.transfer.bench",
        "end to end (ask -> committed) vs a device copy, a peer copy and raw NCCL of the same "
        "bytes (a CUDA GPU: the direct channel; 2 GPUs: also NCCL); `kvtriton bench latency` "
        "is the CPU protocol benchmark",
        gpus=1,
    ),
    "ttft": Benchmark(
        "kvtriton.transfer.ttft",
        "time to first token with and without layer-wise streaming, per reuse policy "
        "(two spawned ranks; a GPU, or -- --device cpu)",
    ),
    "latency": Benchmark(
        "kvtriton.transfer.bench_latency",
        "ask -> committed of 1-block requests between two spawned ranks (gloo on CPU; the "
        "direct channel on a GPU)",
    ),
}

#: torchrun processes of ``bench transfer`` at most
MAX_NPROC = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "which",
        choices=sorted(BENCHMARKS),
        help="; ".join(f"{name}: {b.help}" for name, b in BENCHMARKS.items()),
    )
    p.add_argument(
        "--nproc",
        type=int_arg("the process count", minimum=1, maximum=MAX_NPROC),
        default=2,
        help="transfer only: ranks torchrun spawns (default 2)",
    )
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="options passed to the benchmark (see `kvtriton bench WHICH -- --help`)",
    )


def cuda_device_count() -> int:
    """CUDA GPUs torch sees here (0 without a CUDA build or a driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_device(name: str, bench: Benchmark, extra: Sequence[str], nproc: int) -> None:
    if bench.gpus == 0 or "--help" in extra or "-h" in extra or bench.wants_cpu(extra):
        return
    needed = nproc if bench.gpus < 0 else bench.gpus
    found = cuda_device_count()
    if found >= needed:
        return
    cpu = bench.cpu_example
    hint = f" (`kvtriton bench {name} -- {cpu}` is a CPU smoke test)" if cpu else ""
    raise UsageError(
        f"bench {name} needs {needed} CUDA GPU{'s' if needed > 1 else ''}, found {found}{hint}"
    )


def run(args: argparse.Namespace) -> int:
    extra = [a for a in args.args if a != "--"]
    bench = BENCHMARKS[args.which]
    if not _exists(bench.module):
        raise UsageError(
            f"bench {args.which}: this kvtriton has no {bench.module} module yet "
            f"(available: {', '.join(n for n, b in BENCHMARKS.items() if _exists(b.module))})"
        )
    _check_device(args.which, bench, extra, args.nproc)
    if bench.torchrun:
        # One process per rank: torchrun spawns them; NVLink multicast stays off.
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0"}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            bench.module,
            *extra,
        ]
        return subprocess.call(cmd, env=env)
    try:
        status: int | None = importlib.import_module(bench.module).main(extra)
    except SystemExit as exc:  # the benchmark's own argparse (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    return int(status or 0)


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
