"""kvtriton.options: the argparse value types and the model-selection option set shared by
the CLI, the scripts and the transfer experiment's config."""

from __future__ import annotations

import argparse

import pytest

from kvtriton.options import (
    OneLineParser,
    UsageError,
    add_model_arguments,
    check_disagg_config,
    float_arg,
    int_arg,
    int_pair_arg,
    key_value_arg,
    load_model,
    spec_from_args,
)
from kvtriton.spec import preset


def test_bounded_types_name_what_was_wrong() -> None:
    small = int_arg("the width", minimum=1, maximum=8)
    assert small("1") == 1 and small("8") == 8
    for text, message in (
        ("0", "the width must be >= 1, got 0"),
        ("9", "the width must be <= 8, got 9"),
        ("x", "the width must be an integer, got 'x'"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            small(text)
    gib = float_arg("the capacity", above=0, unit="GiB")
    assert gib("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="the capacity must be > 0 GiB"):
        gib("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected the capacity in GiB"):
        gib("lots")
    assert int_pair_arg()("3:9") == (3, 9) and int_pair_arg()("4") == (4, 4)
    with pytest.raises(argparse.ArgumentTypeError, match="0 <= MIN <= MAX"):
        int_pair_arg()("9:3")
    assert key_value_arg("sliding_window=1024") == ("sliding_window", 1024)
    assert key_value_arg("name=abc") == ("name", "abc")


def test_model_option_set_is_reusable_with_a_default() -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser, default_preset="tiny-hybrid")
    assert spec_from_args(parser.parse_args([])) == preset("tiny-hybrid")
    args = parser.parse_args(["--preset", "gpt-oss-20b", "--block-size", "32"])
    assert spec_from_args(args) == preset("gpt-oss-20b", tokens_per_block=32)
    with pytest.raises(UsageError, match="unknown preset 'nope'"):
        spec_from_args(parser.parse_args(["--preset", "nope"]))
    with pytest.raises(UsageError, match="--hf-set applies to --hf-config"):
        spec_from_args(parser.parse_args(["--hf-set", "sliding_window=4"]))
    required = argparse.ArgumentParser()
    add_model_arguments(required)
    with pytest.raises(SystemExit):
        required.parse_args([])


def test_floats_are_finite_and_pairs_bounded() -> None:
    gib = float_arg("the capacity", above=0, unit="GiB")
    for text in ("inf", "nan", "-inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number of GiB"):
            gib(text)
    assert float_arg("x", finite=False)("inf") == float("inf")
    with pytest.raises(argparse.ArgumentTypeError, match=r"MAX must be <= 1,099,511,627,776"):
        int_pair_arg()(f"1:{2**41}")


def test_one_line_parser_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = OneLineParser(prog="tool", help_command="tool -- --help")
    parser.add_argument("--n", type=int_arg("n", minimum=1), default=1)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--n", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "tool: error: argument --n: n must be >= 1, got 0 (see 'tool -- --help')\n"
    )


def test_check_disagg_config_takes_a_config_like_object() -> None:
    from types import SimpleNamespace

    good = SimpleNamespace(
        model="gpt-oss-20b",
        dtype=None,
        ctx_tp=2,
        ctx_pp=1,
        gen_tp=1,
        gen_pp=2,
        timeout_s=30.0,
        conversations=3,
        turns=2,
        in_flight=4,
        first_turn_tokens=40,
        turn_tokens=21,
        draft_tokens=0,
        chunk_bytes=8192,
        gen_tokens_per_block=None,
        devices=(),
    )
    assert check_disagg_config(good) == preset("gpt-oss-20b")
    assert isinstance(UsageError("x"), ValueError)  # DisaggConfig callers catch ValueError
    for change, message in (
        ({"ctx_tp": 3}, r"--ctx-tp 3 does not fit --model 'gpt-oss-20b'"),
        ({"gen_pp": 25}, r"--gen-pp 25 does not fit .* cannot split 24 layers into 25 stages"),
        ({"timeout_s": float("nan")}, r"--timeout must be a finite number of seconds"),
        ({"dtype": "fp9"}, r"--dtype 'fp9': unknown dtype"),
        ({"model": "gpt-oss-21b"}, r"did you mean 'gpt-oss-20b'"),
        ({"turns": 10**6}, r"--turns must be an integer in \[1, 4,096\]"),
        ({"chunk_bytes": 0}, r"--chunk-bytes must be an integer in \[1, "),
        ({"devices": (0, -1)}, r"--devices \(entry 1\) must be an integer in \[0, 1,023\]"),
    ):
        with pytest.raises(UsageError, match=message):
            check_disagg_config(SimpleNamespace(**{**vars(good), **change}))
    assert load_model("tiny-hybrid", "bf16").dtype == "bfloat16"
