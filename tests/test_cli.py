"""The ``kvtriton`` command: plan / presets / demo, errors, the subcommand registry, and the
table helpers it prints with."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvtriton import cli
from kvtriton.cli import CliError, Command, main
from kvtriton.spec import PRESETS
from kvtriton.table import Column, Table, format_bytes, format_count, format_percent

ROOT = Path(__file__).resolve().parents[1]
GPT_OSS_SECOND_TURN = [
    "plan",
    "--preset",
    "gpt-oss-20b",
    "--prompt",
    "8192",
    "--cached",
    "full=6000",
    "--cached",
    "sliding128=0",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def table_lines(out: str) -> list[str]:
    """The table block of a plan/presets output: from the column header to the last row."""
    lines = out.splitlines()
    first_rule = next(i for i, line in enumerate(lines) if set(line) == {"-"})
    end = first_rule + 1
    while end < len(lines) and lines[end].strip():
        end += 1
    return lines[first_rule - 1 : end]


def row(out: str, name: str) -> list[str]:
    return next(line.split() for line in table_lines(out) if line.split()[:1] == [name])


# -- plan ---------------------------------------------------------------------------------


def test_plan_shows_the_gpt_oss_second_turn_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *GPT_OSS_SECOND_TURN)
    assert status == 0 and err == ""
    # group kind layers window needed cached | per-group | single boundary | no reuse
    assert row(out, "full") == [
        "full",
        "full",
        "12",
        "-",
        "[0,",
        "8192)",
        "6,000",
        "2,192",
        "137",
        "51.4",
        "MiB",  # per-group: [6000, 8192)
        "8,192",
        "512",
        "192",
        "MiB",  # single boundary c = 0: everything
        "8,192",
        "512",
        "192",
        "MiB",
    ]
    assert row(out, "sliding128") == [
        "sliding128",
        "sliding",
        "12",
        "128",
        "[8065,",
        "8192)",
        "0",
        "127",
        "8",
        "2.98",
        "MiB",
        "127",
        "8",
        "2.98",
        "MiB",
        "127",
        "8",
        "2.98",
        "MiB",
    ]
    assert row(out, "total") == [
        "total",
        "24",
        "2,319",
        "145",
        "54.4",
        "MiB",
        "8,319",
        "520",
        "195",
        "MiB",
        "8,319",
        "520",
        "195",
        "MiB",
    ]
    assert "single boundary c = 0 (the longest prefix every group can resume from)" in out
    assert "per-group vs single boundary: saves 141 MiB (72.1% of 195 MiB)" in out
    assert "per-group vs no reuse: saves 141 MiB (72.1% of 195 MiB)" in out


def test_plan_table_is_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(
        capsys,
        "plan",
        "--preset",
        "tiny-hybrid",
        "--prompt",
        "50",
        "--cached",
        "full=40",
        "--cached",
        "state=35",
    )
    lines = table_lines(out)
    # The last column is right-aligned, so every header, rule and row has the same width.
    assert len({len(line) for line in lines}) == 1, lines
    header = lines[0]
    spans = out.splitlines()[out.splitlines().index(header) - 1]
    for title in ("per-group", "single boundary", "no reuse"):
        assert title in spans
    for title in (
        "group",
        "kind",
        "layers",
        "window",
        "needed",
        "cached",
        "tokens",
        "blocks",
        "bytes",
    ):
        assert title in header.split()
    assert row(out, "state")[:6] == ["state", "state", "1", "-", "state", "35"]


def test_plan_json_is_compare_policies(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *GPT_OSS_SECOND_TURN, "--json")
    assert status == 0
    data = json.loads(out)
    assert list(data) == ["per_group", "single_boundary", "no_reuse"]
    per = {g["group"]: g for g in data["per_group"]["groups"]}
    single = {g["group"]: g for g in data["single_boundary"]["groups"]}
    assert per["full"]["tokens"] == [6000, 8192] and per["full"]["num_tokens"] == 2192
    assert per["sliding128"]["tokens"] == [8065, 8192]
    assert single["full"]["tokens"] == [0, 8192] and single["full"]["cached_tokens"] == 0
    assert data["per_group"]["total_bytes"] == (2192 + 127) * 24576
    assert data["per_group"]["mode"] == "per_group"
    assert data["no_reuse"]["total_bytes"] == (8192 + 127) * 24576


def test_plan_boundary_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--boundary states a single boundary the counts cannot show; --plot draws the maps."""
    status, out, _ = run(capsys, *GPT_OSS_SECOND_TURN, "--boundary", "4096", "--json")
    assert status == 0
    single = {g["group"]: g for g in json.loads(out)["single_boundary"]["groups"]}
    assert single["full"]["tokens"] == [4096, 8192]
    status, _, err = run(capsys, *GPT_OSS_SECOND_TURN, "--boundary", "7000")
    assert status == 2 and "boundary 7000 exceeds the cached count of ['full']" in err
    pytest.importorskip("matplotlib")
    path = tmp_path / "maps.png"
    status, out, _ = run(capsys, *GPT_OSS_SECOND_TURN, "--plot", str(path))
    assert status == 0 and f"plot written to {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plan_cached_all_block_size_and_drafts(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(
        capsys,
        "plan",
        "--preset",
        "gpt-oss-20b",
        "--prompt",
        "100",
        "--cached-all",
        "90",
        "--cached",
        "full=10",
        "--block-size",
        "7",
        "--draft",
        "5",
        "--json",
    )
    data = json.loads(out)
    per = {g["group"]: g for g in data["per_group"]["groups"]}
    assert per["full"]["tokens"] == [10, 100] and per["full"]["num_blocks"] == 15 - 1  # 1..14
    assert per["sliding128"]["tokens"] == [90, 100]
    assert data["per_group"]["tokens_per_block"] == 7
    assert data["per_group"]["num_draft_tokens"] == 5
    _, table, _ = run(capsys, "plan", "--preset", "gpt-oss-20b", "--prompt", "100", "--draft", "5")
    assert "prompt P = 100 tokens + 5 draft (never moved)" in table


def test_full_hit_prints_zero_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(
        capsys, "plan", "--preset", "llama-3-8b", "--prompt", "64", "--cached-all", "64"
    )
    assert status == 0
    assert row(out, "full")[7:10] == ["0", "0", "0"]  # per-group: tokens, blocks, "0 B"
    assert "per-group vs single boundary: both move nothing (full hit)" in out
    assert "per-group vs no reuse: saves 8.00 MiB (100.0% of 8.00 MiB)" in out


# -- presets and demo ---------------------------------------------------------------------


def test_presets_lists_every_preset_with_its_groups(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "presets")
    assert status == 0
    for name in PRESETS:
        assert row(out, name)[0] == name
    assert row(out, "gpt-oss-20b") == [
        "gpt-oss-20b",
        "16",
        "bfloat16",
        "full",
        "full",
        "-",
        "12",
        "8",
        "x",
        "64",
        "24.0",
        "KiB",
        "-",
    ]
    assert any(line.split()[:3] == ["sliding128", "sliding", "128"] for line in table_lines(out))
    assert any(
        line.split()[:2] == ["state", "state"] and "37.7 MiB" in line for line in table_lines(out)
    )
    _, js, _ = run(capsys, "presets", "--json")
    assert [s["name"] for s in json.loads(js)] == list(PRESETS)


def test_presets_label_state_dtypes_and_the_config_class_of_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run(capsys, "presets")
    assert status == 0
    state = next(line for line in table_lines(out) if "17152" in line)
    assert "32x17152 bfloat16" in state and "37.7 MiB" in state
    assert "2x4x8 float32" in out
    note = out.split("\n\n", 1)[1]
    assert "gpt-oss-20b     GptOssConfig --hf-set num_hidden_layers=24" in note
    assert "gpt-oss-120b    GptOssConfig (its defaults)" in note
    assert "qwen3-next-80b  Qwen3NextConfig (its defaults)" in note
    assert "tiny-hybrid     (synthetic: no config class)" in note


def test_demo_prints_the_plan_and_explains_it(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "demo")
    assert status == 0 and err == ""
    assert row(out, "full")[6:11] == ["6,000", "2,192", "137", "51.4", "MiB"]
    text = " ".join(out.split("What this shows:", 1)[1].split())
    assert "(c = 0)" in text
    assert "[6000, 8192) (2,192 tokens)" in text
    assert "[8065, 8192): 54.4 MiB instead of 195 MiB (72.1% less)" in text


def test_help_and_bare_command(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0
    for name in ("plan", "presets", "demo"):
        assert name in out
    status, out2, _ = run(capsys)
    assert status == 0 and "COMMAND" in out2
    status, out3, _ = run(capsys, "plan", "--help")
    assert status == 0 and "--cached GROUP=N" in out3 and "example: kvtriton plan" in out3


# -- user mistakes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["plan", "--preset", "llama-4", "--prompt", "8"],
            r"unknown preset 'llama-4'; available: gpt-oss-20b, .*tiny-hybrid \(see 'kvtriton "
            r"presets'\)",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "0"],
            r"argument --prompt: the prompt length P must be >= 1, got 0",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "ten"],
            r"argument --prompt: the prompt length P must be an integer, got 'ten'",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "8", "--cached", "full:3"],
            r"argument --cached: expected GROUP=TOKENS \(for example full=6000\), got 'full:3'",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "8", "--cached", "=3"],
            r"argument --cached: expected GROUP=TOKENS",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "8", "--cached", "full=x"],
            r"argument --cached: cached tokens of group 'full' must be an integer, got 'x'",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "8", "--cached", "full=-1"],
            r"cached tokens of group 'full' must be >= 0, got -1",
        ),
        (
            ["plan", "--preset", "gpt-oss-20b", "--prompt", "8", "--cached", "sliding=3"],
            r"unknown layer group 'sliding' in --cached; preset 'gpt-oss-20b' has groups: full, "
            r"sliding128$",
        ),
        (
            [
                "plan",
                "--preset",
                "tiny-hybrid",
                "--prompt",
                "8",
                "--cached",
                "full=1",
                "--cached",
                "full=2",
            ],
            r"--cached names group 'full' twice \(1 and 2\)",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "8", "--block-size", "0"],
            r"argument --block-size: the block size must be >= 1, got 0",
        ),
        (
            ["plan", "--preset", "tiny-hybrid", "--prompt", "8", "--draft", "-2"],
            r"argument --draft: token count must be >= 0, got -2",
        ),
        (["plan", "--prompt", "8"], r"one of the arguments --preset --hf-config is required"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
    ],
)
def test_user_mistakes_print_one_error_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvtriton: error: ")
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]


# -- registry -----------------------------------------------------------------------------


def test_a_new_subcommand_is_one_registry_entry(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=cli.positive_int, required=True)

    def run_hello(args: argparse.Namespace) -> int:
        if args.n == 13:
            raise CliError("13 is unlucky")
        print("hello" * args.n)
        return 0

    monkeypatch.setattr(
        cli, "COMMANDS", [*cli.COMMANDS, Command("hello", "say hello", add, run_hello)]
    )
    assert run(capsys, "hello", "--n", "2") == (0, "hellohello\n", "")
    assert run(capsys, "hello", "--n", "13") == (2, "", "kvtriton: error: 13 is unlucky\n")
    assert "say hello" in run(capsys, "--help")[1]


def test_only_the_selected_subcommand_declares_its_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subcommand's add_arguments (which may import its module) runs only when it is used."""
    calls: list[str] = []

    def add(p: argparse.ArgumentParser) -> None:
        calls.append("heavy")
        p.add_argument("--x", type=int, default=1)

    heavy = Command("heavy", "imports a lot", add, lambda args: print(f"x={args.x}") or 0)
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, heavy])
    assert run(capsys, "plan", "--preset", "tiny-hybrid", "--prompt", "4")[0] == 0
    assert run(capsys, "--help")[0] == 0
    assert calls == []
    assert run(capsys, "heavy", "--x", "3") == (0, "x=3\n", "")
    assert calls == ["heavy"]
    full = cli.build_parser()  # without argv: every subcommand is fully declared
    assert calls == ["heavy", "heavy"]
    assert full.parse_args(["plan", "--preset", "p", "--prompt", "3"]).prompt == 3


def test_demo_is_replaced_by_swapping_one_function(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = next(c for c in cli.COMMANDS if c.name == "demo")
    assert entry.run is cli.run_demo and entry.add_arguments is cli.add_demo_arguments
    replaced = [
        Command(c.name, c.help, c.add_arguments, lambda _: print("e2e") or 0)
        if c.name == "demo"
        else c
        for c in cli.COMMANDS
    ]
    monkeypatch.setattr(cli, "COMMANDS", replaced)
    assert run(capsys, "demo") == (0, "e2e\n", "")


# -- process-level ------------------------------------------------------------------------


def test_module_help_and_plan_never_import_torch() -> None:
    help_run = subprocess.run(
        [sys.executable, "-m", "kvtriton", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "plan" in help_run.stdout and "demo" in help_run.stdout
    probe = (
        "import sys\n"
        "from kvtriton.cli import main\n"
        "assert main(['--help']) == 0\n"
        f"assert main({GPT_OSS_SECOND_TURN!r}) == 0\n"
        "assert main(['presets']) == 0\n"
        "assert 'torch' not in sys.modules, 'kvtriton plan imported torch'\n"
        "assert 'triton' not in sys.modules, 'kvtriton plan imported triton'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "2,192" in proc.stdout


def test_console_script_points_at_main() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kvtriton"] == "kvtriton.cli:main"


# -- table helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10 * 1024, "10.0 KiB"),
        (1023 * 1024, "1023 KiB"),
        (1024**2 - 1, "1.00 MiB"),
        (53_870_592, "51.4 MiB"),
        (201_326_592, "192 MiB"),
        (3 * 1024**3, "3.00 GiB"),
        (-2048, "-2.00 KiB"),
        (2**70, "1024 EiB"),
    ],
)
def test_format_bytes(nbytes: int, text: str) -> None:
    assert format_bytes(nbytes) == text


def test_format_helpers() -> None:
    assert format_count(8192) == "8,192" and format_count(0) == "0"
    assert format_percent(1, 3) == "33.3%" and format_percent(0, 0) == "-"
    with pytest.raises(TypeError, match=r"nbytes must be an int, got float 1.5"):
        format_bytes(1.5)  # type: ignore[arg-type]


def test_table_alignment_spans_and_rules() -> None:
    t = Table(["name", Column("n")], spans=[("", 1), ("a wide title", 1)])
    t.add_row("x", 5)
    t.add_row("longer", None)
    t.add_rule()
    t.add_row("total", 12345)
    spans, header, rule, *rows = str(t).splitlines()
    width = len(rule)
    assert set(rule) == {"-"} and rows[2] == rule  # a rule under the header and add_rule()
    body = [rows[0], rows[1], rows[3]]
    # the right-aligned last column ends every line at the full width, under its span title
    assert all(len(line) == width for line in (spans, header, *body))
    assert spans.strip() == "a wide title" and spans.endswith("a wide title")
    name_width = len("longer")  # the widest cell of the left-aligned first column
    gap = 2
    assert width == name_width + gap + len("a wide title")  # a wide span widens its column
    cells = [(line[:name_width].rstrip(), line[name_width + gap :].strip()) for line in body]
    assert cells == [("x", "5"), ("longer", "-"), ("total", "12345")]  # None prints "-"
    assert header.startswith("name") and header.endswith("n")


def test_table_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"row has 1 cells, the table has 2 columns \(a, b\)"):
        Table(["a", "b"]).add_row(1)
    with pytest.raises(ValueError, match=r"spans cover 3 columns, the table has 2"):
        Table(["a", "b"], spans=[("x", 3)])
    with pytest.raises(ValueError, match=r"needs at least one column"):
        Table([])


def test_bench_cache_runs_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["bench", "cache", "--", "--tokens", "256", "--reps", "1", "--presets", "tiny-hybrid"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert "match + allocate + commit" in out
    assert "tiny-hybrid" in out


def test_bench_rejects_an_unknown_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_plan_takes_a_transformers_config_class(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    status = main(
        [
            "plan",
            "--hf-config",
            "GptOssConfig",
            "--prompt",
            "8192",
            "--cached",
            "full=6000",
            "--json",
        ]
    )
    assert status == 0
    plans = json.loads(capsys.readouterr().out)
    full = next(g for g in plans["per_group"]["groups"] if g["group"] == "full")
    assert full["tokens"] == [6000, 8192]


def test_plan_reports_an_unmappable_hf_config_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "--hf-config", "NoSuchConfig", "--prompt", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtriton: error: --hf-config 'NoSuchConfig'")
    assert "Traceback" not in err


def test_hf_set_is_refused_with_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["plan", "--preset", "gpt-oss-20b", "--prompt", "8", "--hf-set", "sliding_window=4"])
        == 2
    )
    assert "--hf-set applies to --hf-config" in capsys.readouterr().err
