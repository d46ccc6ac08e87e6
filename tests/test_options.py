"""kvtriton.options: the argparse value types and the model-selection option set shared by
the CLI, the scripts and the transfer experiment's config."""

from __future__ import annotations

import argparse

import pytest

from kvtriton.options import (
    UsageError,
    add_model_arguments,
    float_arg,
    int_arg,
    int_pair_arg,
    key_value_arg,
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
