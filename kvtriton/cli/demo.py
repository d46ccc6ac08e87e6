"""``kvtriton demo``: the plan of a hybrid model at scale, then a real transfer between
spawned ranks (options from :mod:`kvtriton.transfer.config`, the run from
:mod:`kvtriton.transfer.experiment`, both imported on use).

Every option is checked before anything is printed or spawned (:func:`validate_args`, which
``scripts/disagg.py`` calls too): a user mistake ends in one line naming the option, exit 2.
"""

from __future__ import annotations

import argparse
import re
import textwrap
from typing import Any

from kvtriton.cli.plan import cached_counts, compare, plan_table
from kvtriton.options import UsageError, check_disagg_config, load_preset
from kvtriton.plan import ReusePolicy
from kvtriton.table import format_bytes, format_count, format_percent

__all__ = ["DEMO_CACHED", "DEMO_PRESET", "DEMO_PROMPT", "add_arguments", "run", "validate_args"]

HELP = (
    "the main job: the per-group plan of a hybrid model (gpt-oss-20b, "
    "P = 8192, 6000 tokens cached), then a real multi-turn transfer between spawned "
    "context and generation ranks, verified bit-exact"
)

DEMO_PRESET = "gpt-oss-20b"
DEMO_PROMPT = 8192
DEMO_CACHED = {"full": 6000}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The end-to-end demo's options (those of ``scripts/disagg.py``; torch-free)."""
    from kvtriton.transfer.config import add_arguments as add_transfer_arguments

    add_transfer_arguments(p)


def validate_args(args: argparse.Namespace) -> Any:
    """The :class:`~kvtriton.transfer.config.DisaggConfig` of the parsed options, every option
    checked before a rank is spawned (:func:`kvtriton.options.check_disagg_config`: model,
    dtype, TP/PP splits, timeout, bounds); :class:`UsageError` naming the option otherwise."""
    from kvtriton.transfer.config import config_from_args

    devices = getattr(args, "devices", "") or ""
    for entry in (d.strip() for d in devices.split(",")):
        if entry and not re.fullmatch(r"\d{1,4}", entry):
            raise UsageError(f"--devices takes GPU indices G,G,... (e.g. 0,0,1,1), got {devices!r}")
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    check_disagg_config(cfg)
    if cfg.channel in ("ipc", "nccl"):  # a channel the GPUs here cannot carry: say so now
        from kvtriton.transfer.launch import gpus_for

        try:
            gpus_for(cfg.channel, cfg.world_size)
        except ValueError as exc:
            raise UsageError(f"--channel {cfg.channel}: {exc}") from None
    return cfg


def run(args: argparse.Namespace) -> int:
    """The main job: the plan at model scale, then a real transfer between spawned ranks.

    Prints the per-group plan of gpt-oss-20b (P = 8192, 6000 tokens cached), then spawns
    context and generation ranks on this machine (gloo on CPU, NCCL when every rank owns a
    GPU), runs a multi-turn request stream with per-group prefix reuse on the receiver and
    verifies every needed position bit-exact (:mod:`kvtriton.transfer.experiment`).
    """
    validate_args(args)
    plan_preface()
    print()
    print(
        "Now for real: the same per-group rule moving KV between spawned ranks "
        "(scripts/disagg.py has the same options, and runs under torchrun)."
    )
    print(flush=True)
    from kvtriton.transfer.demo import run_cli

    try:
        return run_cli(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def plan_preface() -> None:
    """Plan table for a hybrid model whose receiver holds 6000 tokens of full attention."""
    spec = load_preset(DEMO_PRESET)
    cached = cached_counts(spec, list(DEMO_CACHED.items()), 0)
    plans, boundary = compare(spec, DEMO_PROMPT, cached, 0)
    print(plan_table(plans, boundary))
    per, single = plans[ReusePolicy.PER_GROUP], plans[ReusePolicy.SINGLE_BOUNDARY]
    full = per.group("full")
    sliding = next(g for g in per.groups if g.group.kind.has_window)
    saved = single.total_bytes - per.total_bytes
    text = (
        f"What this shows: the receiver's prefix cache already holds the first "
        f"{format_count(full.cached_tokens)} prompt tokens for the {full.group.num_layers} "
        f"full-attention layers, but its {sliding.group.num_layers} sliding-window layers "
        f"(W = {sliding.group.window}) kept nothing that the next query reads, so their cached "
        f"count is {sliding.cached_tokens}. A system with one reuse boundary per sequence must "
        f"take the minimum over groups (c = {boundary}) and resends all "
        f"{format_count(len(single.group('full').tokens))} tokens of the full-attention layers. "
        f"kvtriton keeps one boundary per layer group: the full-attention layers send only "
        f"[{full.tokens.start}, {full.tokens.end}) ({format_count(len(full.tokens))} tokens) and "
        f"the sliding layers send only the {len(sliding.tokens)} positions their window still "
        f"reads, [{sliding.tokens.start}, {sliding.tokens.end}): "
        f"{format_bytes(per.total_bytes)} instead of {format_bytes(single.total_bytes)} "
        f"({format_percent(saved, single.total_bytes)} less)."
    )
    print()
    print(textwrap.fill(text, width=100))
