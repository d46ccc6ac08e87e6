"""User mistakes through the command line, table-driven (issue 14): each ends with exit
status 2 and one stderr line naming the option and the problem, prints nothing on stdout,
and spawns nothing (launching a rank, a process or a subprocess fails the test)."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing.process
import re
import subprocess
from pathlib import Path

import pytest

from kvtriton.cli import bench as cli_bench
from kvtriton.cli import main

ROOT = Path(__file__).resolve().parents[1]

PLAN = ["plan", "--preset", "gpt-oss-20b", "--prompt", "8192"]
SIM = ["simulate", "--preset", "tiny-hybrid", "--users", "2", "--turns", "2"]

#: config.json files written for the cases that name "{cfg:NAME}"
CONFIGS = {
    "zero_heads": {"model_type": "llama", "num_hidden_layers": 2, "num_key_value_heads": 0},
    "mistral": {"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": 64},
    "zero_head_dim": {"model_type": "llama", "num_hidden_layers": 2, "head_dim": 0},
    "huge": {"model_type": "llama", "num_hidden_layers": 1e9},
    "pattern": {
        "model_type": "gemma3_text",
        "num_hidden_layers": 6,
        "sliding_window": 512,
        "sliding_window_pattern": "6",
    },
}

CASES = [
    # -- plan: sizes and configs --------------------------------------------------------
    (
        ["plan", "--preset", "gpt-oss-20b", "--prompt", str(10**30)],
        r"--prompt: .* <= 1099511627776",
    ),
    ([*PLAN, "--cached", "full=99999999999999999"], r"--cached: .* must be <= 1099511627776"),
    ([*PLAN[:3], "--prompt", "8", "--block-size", "100000"], r"--block-size: .* <= 65536"),
    (
        ["plan", "--hf-config", "{cfg:zero_heads}", "--prompt", "8"],
        r"num_key_value_heads must be an int in \[1, 65,536\], got 0",
    ),
    (
        ["plan", "--hf-config", "{cfg:zero_head_dim}", "--prompt", "8"],
        r"head_dim must be an int in \[1, 65,536\], got 0",
    ),
    (
        ["plan", "--hf-config", "{cfg:huge}", "--prompt", "8"],
        r"num_hidden_layers must be an int in \[1, 4,096\], got 1000000000.0",
    ),
    (
        ["plan", "--hf-config", "{cfg:pattern}", "--prompt", "8"],
        r"sliding_window_pattern must be an int .*, got '6'",
    ),
    (
        [
            "plan",
            "--hf-config",
            "{cfg:mistral}",
            "--prompt",
            "8",
            "--hf-set",
            "sliding_windw=1024",
        ],
        r"--hf-set sliding_windw=1024: .*no field 'sliding_windw'; did you mean 'sliding_window'",
    ),
    (
        [
            "plan",
            "--hf-config",
            "{cfg:mistral}",
            "--prompt",
            "8",
            "--hf-set",
            "num_key_value_head=1",
        ],
        r"--hf-set num_key_value_head=1: .*no field 'num_key_value_head'; did you mean "
        r"'num_key_value_heads'",
    ),
    (
        ["plan", "--hf-config", "google/not-cached", "--prompt", "8"],
        r"not in .*cache.*never downloads",
    ),
    # -- simulate: floats and capacities ------------------------------------------------------
    (
        [*SIM, "--capacity-gib", "inf"],
        r"--capacity-gib: the capacity must be a finite number of GiB, got 'inf'",
    ),
    ([*SIM, "--capacity-gib", "nan"], r"--capacity-gib: the capacity must be a finite number"),
    (
        [*SIM, "--capacity-gib", "1e30"],
        r"more than kvtriton's bound of 16,777,216 blocks per group",
    ),
    # -- demo: validated before anything is printed or spawned --------------------------------
    (
        ["demo", "--model", "tiny-hybird"],
        r"--model 'tiny-hybird' is not a preset; did you mean 'tiny-hybrid'\?",
    ),
    (
        ["demo", "--model", "no/such-model"],
        r"--model 'no/such-model' is neither a preset .* never downloads",
    ),
    (["demo", "--dtype", "bf17"], r"--dtype 'bf17': unknown dtype 'bf17'"),
    (
        ["demo", "--model", "gpt-oss-20b", "--ctx-tp", "3"],
        r"--ctx-tp 3 does not fit --model 'gpt-oss-20b': group 'full': 8 kv heads cannot be "
        r"split over 3 TP ranks",
    ),
    (
        ["demo", "--gen-pp", "9"],
        r"--gen-pp 9 does not fit --model 'tiny-hybrid': cannot split 6 layers into 9 stages",
    ),
    (["demo", "--ctx-tp", "40", "--gen-tp", "40"], r"make 80 ranks; at most 64"),
    (
        ["demo", "--timeout", "0"],
        r"--timeout must be a finite number of seconds in \(0, 86400\], got 0.0",
    ),
    (["demo", "--timeout", "-1"], r"--timeout must be .*, got -1.0"),
    (["demo", "--timeout", "nan"], r"--timeout must be .*, got nan"),
    (["demo", "--timeout", "inf"], r"--timeout must be .*, got inf"),
    (
        ["demo", "--first-turn-tokens", "10000000"],
        r"--first-turn-tokens must be an integer in \[1, 1,048,576\]",
    ),
    (["demo", "--devices", "0,x"], r"--devices takes GPU indices"),
    (["demo", "--modes", "fast"], r"--modes takes per_group and/or single_boundary"),
    # -- bench: a GPU benchmark on a machine without one; the benchmark's own options ----------
    (
        ["bench", "kernels"],
        r"bench kernels needs 1 CUDA GPU, found 0 \(`kvtriton bench kernels -- --device cpu "
        r"--quick` is a CPU smoke test\)",
    ),
    (
        ["bench", "transfer"],
        r"bench transfer needs 1 CUDA GPU, found 0",
    ),
    (["bench", "--nproc", "1000", "transfer"], r"--nproc: the process count must be <= 64"),
    (
        ["bench", "cache", "--", "--reps", "0"],
        r"kvtriton bench cache: error: argument --reps: the repetitions must be >= 1, got 0",
    ),
    (
        ["bench", "cache", "--", "--tokens", str(10**12)],
        r"--tokens: the prompt length must be <= 16777216",
    ),
]

NEEDS_TRANSFORMERS = ("{cfg:", "google/")


def _spawning_fails(*args: object, **kwargs: object) -> None:
    raise AssertionError("a user mistake spawned a process")


@pytest.fixture
def nothing_spawns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any rank, process or subprocess started fails the test; no GPU is seen."""
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _spawning_fails)
    monkeypatch.setattr(subprocess, "Popen", _spawning_fails)
    monkeypatch.setattr(cli_bench, "cuda_device_count", lambda: 0)
    demo = pytest.importorskip("kvtriton.transfer.demo")
    monkeypatch.setattr(demo, "run_cli", _spawning_fails)


def _argv(argv: list[str], tmp_path: Path) -> list[str]:
    out = []
    for arg in argv:
        found = re.fullmatch(r"\{cfg:(\w+)\}", arg)
        if found:
            directory = tmp_path / found[1]
            directory.mkdir(exist_ok=True)
            (directory / "config.json").write_text(json.dumps(CONFIGS[found[1]]))
            arg = str(directory)
        out.append(arg)
    return out


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_a_user_mistake_is_one_line_and_exit_2_and_spawns_nothing(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    nothing_spawns: None,
) -> None:
    if any(marker in arg for arg in argv for marker in NEEDS_TRANSFORMERS):
        pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status = main(_argv(argv, tmp_path))
    out, err = capsys.readouterr()
    assert status == 2, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvtriton"), lines[0]
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]


def _disagg():
    spec = importlib.util.spec_from_file_location("disagg_script", ROOT / "scripts" / "disagg.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny-hybird"], r"did you mean 'tiny-hybrid'"),
        (["--dtype", "bf17"], r"--dtype 'bf17'"),
        (["--model", "gpt-oss-20b", "--gen-tp", "3"], r"--gen-tp 3 does not fit"),
        (["--timeout", "nan"], r"--timeout must be a finite number"),
        (["--ctx-tp", "x"], r"argument --ctx-tp: expected a positive integer, got 'x'"),
    ],
)
def test_disagg_script_validates_before_spawning(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], nothing_spawns: None
) -> None:
    try:
        status = _disagg().main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("disagg: error: "), err
    assert re.search(message, lines[0]), lines[0]


def test_bench_latency_runs_once_its_module_lands(capsys: pytest.CaptureFixture[str]) -> None:
    if importlib.util.find_spec("kvtriton.transfer.bench_latency") is None:
        assert main(["bench", "latency"]) == 2
        err = capsys.readouterr().err
        assert "no kvtriton.transfer.bench_latency module yet" in err
        pytest.skip("kvtriton.transfer.bench_latency has not landed on this branch")
    assert main(["bench", "latency", "--", "--help"]) == 0


def test_bench_cpu_modes_and_help_pass_the_gpu_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_bench, "cuda_device_count", lambda: 0)
    kernels, transfer = cli_bench.BENCHMARKS["kernels"], cli_bench.BENCHMARKS["transfer"]
    assert kernels.wants_cpu(["--device", "cpu", "--quick"])
    assert kernels.wants_cpu(["--quick", "--device=cpu"])
    assert not kernels.wants_cpu(["--device", "cuda"])
    assert not transfer.wants_cpu(["--cpu"])  # GPU only: the CPU path is `bench latency`
    cli_bench._check_device("kernels", kernels, ["--device", "cpu", "--quick"], 2)
    cli_bench._check_device("kernels", kernels, ["--help"], 2)
    cli_bench._check_device("transfer", transfer, ["--help"], 2)
    with pytest.raises(cli_bench.UsageError, match="needs 1 CUDA GPU"):
        cli_bench._check_device("transfer", transfer, [], 2)
