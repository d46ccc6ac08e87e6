"""Command-line option sets shared by the ``kvtriton`` command, the scripts and experiments.

Pure Python and argparse (no torch). It sits just above :mod:`kvtriton.spec`, so any layer
(the CLI, ``scripts/``, the transfer experiment's config) can declare the same options
without importing the CLI:

* argparse value types with bounds: :func:`int_arg` (:func:`positive_int`,
  :func:`count_arg`), :func:`float_arg`, :func:`int_pair_arg`, :func:`key_value_arg`,
  :func:`group_count_arg`; each raises ``argparse.ArgumentTypeError`` naming what was wrong
  and what was expected, which argparse prints as ``argument --x: <message>``;
* the model-selection option set: :func:`add_model_arguments` declares
  ``--preset NAME | --hf-config PATH_OR_CLASS`` (+ ``--hf-set KEY=VALUE``, ``--block-size B``)
  and :func:`spec_from_args` resolves them to a :class:`~kvtriton.spec.KVCacheSpec`;
* :class:`UsageError`: a user mistake found after parsing (the ``kvtriton`` command prints it
  as one ``kvtriton: error: ...`` line and exits 2; it is the CLI's ``CliError``);
  :class:`OneLineParser`: an ``ArgumentParser`` whose usage errors are that one line too;
* :func:`check_disagg_config`: every option of the disaggregated experiment (``kvtriton
  demo``, ``scripts/disagg.py``, :class:`~kvtriton.transfer.config.DisaggConfig`) checked
  before a rank is spawned: the model, the dtype, whether the heads and layers split over the
  TP/PP sizes, the timeout and every size against a stated bound.

Bounds (each message names the bound): token positions and counts ``<=``
:data:`~kvtriton.ranges.MAX_TOKENS` (2**40), the sizes of a spec (``kvtriton.spec.MAX_*``),
the experiment's sizes (:data:`MAX_LOCAL_RANKS`, :data:`MAX_EXPERIMENT_TOKENS`,
:data:`MAX_TIMEOUT_S`, ...). Floats are finite unless a type says otherwise.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NoReturn

from kvtriton.ranges import MAX_TOKENS
from kvtriton.spec import MAX_TOKENS_PER_BLOCK, PRESETS, KVCacheSpec, canonical_dtype, preset

__all__ = [
    "MAX_EXPERIMENT_TOKENS",
    "MAX_LOCAL_RANKS",
    "MAX_TIMEOUT_S",
    "OneLineParser",
    "UsageError",
    "add_model_arguments",
    "check_disagg_config",
    "count_arg",
    "float_arg",
    "group_count_arg",
    "int_arg",
    "int_pair_arg",
    "key_value_arg",
    "load_model",
    "load_preset",
    "positive_int",
    "spec_from_args",
    "token_count_arg",
]

#: Tokens per block of a spec made from a transformers config when ``--block-size`` is not given.
HF_DEFAULT_BLOCK_SIZE = 16


class UsageError(ValueError):
    """A user mistake on the command line (printed as one ``<prog>: error: <message>`` line,
    exit status 2, no traceback). A ``ValueError``, so library callers that catch bad values
    catch it too."""


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line,
    ``<prog>: error: <message> (see '<prog> --help')``, exit status 2 (no usage block);
    ``help_command`` replaces ``<prog> --help`` in that hint."""

    def __init__(self, *args: Any, help_command: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help_command = help_command

    def error(self, message: str) -> NoReturn:
        hint = self.help_command or f"{self.prog} --help"
        self.exit(2, f"{self.prog}: error: {message} (see '{hint}')\n")


# -- value types ---------------------------------------------------------------------------


def parse_int(text: str, what: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``text`` as a base-10 int (``_`` separators allowed) inside ``[minimum, maximum]``;
    ``argparse.ArgumentTypeError`` naming ``what`` otherwise."""
    try:
        value = int(text.replace("_", ""), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"{what} must be <= {maximum}, got {value}")
    return value


def int_arg(
    what: str = "the value", *, minimum: int | None = None, maximum: int | None = None
) -> Callable[[str], int]:
    """An argparse ``type=``: an int inside ``[minimum, maximum]`` (either bound optional)."""

    def parse(text: str) -> int:
        return parse_int(text, what, minimum, maximum)

    parse.__name__ = f"int({what})"  # argparse names the type in some messages
    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return parse_int(text, "the value", 1)


def count_arg(what: str = "token count", maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: an int in ``[0, maximum]`` (a count of tokens, blocks, ...)."""
    return int_arg(what, minimum=0, maximum=maximum)


def token_count_arg(what: str = "token count", minimum: int = 0) -> Callable[[str], int]:
    """An argparse ``type=``: a token position or count in ``[minimum, MAX_TOKENS]``."""
    return int_arg(what, minimum=minimum, maximum=MAX_TOKENS)


def float_arg(
    what: str = "the value",
    *,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    unit: str = "",
    finite: bool = True,
) -> Callable[[str], float]:
    """An argparse ``type=``: a float ``> above`` and/or inside ``[minimum, maximum]``; finite
    (not ``nan`` / ``inf``) unless ``finite=False``."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what}{' in ' + unit if unit else ''}, got {text!r}"
            ) from None
        if finite and not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f"{what} must be a finite number{' of ' + unit if unit else ''}, got {text!r}"
            )
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"{what} must be > {above:g}{suffix}, got {text!r}")
        if minimum is not None and not value >= minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum:g}{suffix}, got {text!r}")
        if maximum is not None and not value <= maximum:
            raise argparse.ArgumentTypeError(f"{what} must be <= {maximum:g}{suffix}, got {text!r}")
        return value

    parse.__name__ = f"float({what})"
    return parse


def int_pair_arg(
    what: str = "token counts", maximum: int = MAX_TOKENS
) -> Callable[[str], tuple[int, int]]:
    """An argparse ``type=``: ``MIN:MAX`` (or ``N`` for ``N:N``) with
    ``0 <= MIN <= MAX <= maximum``."""

    def parse(text: str) -> tuple[int, int]:
        lo, sep, hi = text.partition(":")
        try:
            pair = (int(lo), int(hi if sep else lo))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN:MAX {what}, got {text!r}") from None
        if not 0 <= pair[0] <= pair[1]:
            raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
        if pair[1] > maximum:
            raise argparse.ArgumentTypeError(
                f"{what}: MAX must be <= {maximum:,} (kvtriton's bound), got {text!r}"
            )
        return pair

    parse.__name__ = "MIN:MAX"
    return parse


def key_value_arg(text: str) -> tuple[str, object]:
    """argparse type ``KEY=VALUE``: VALUE parsed as JSON, else kept as a bare string."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE (e.g. sliding_window=1024), got {text!r}"
        )
    try:
        parsed: object = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def group_count_arg(text: str) -> tuple[str, int]:
    """argparse type ``GROUP=TOKENS``: a layer group's name and a count >= 0."""
    name, eq, count = text.partition("=")
    name = name.strip()
    if not eq or not name:
        raise argparse.ArgumentTypeError(
            f"expected GROUP=TOKENS (for example full=6000), got {text!r}"
        )
    return name, parse_int(count.strip(), f"cached tokens of group {name!r}", 0, MAX_TOKENS)


# -- model selection -------------------------------------------------------------------------


def load_preset(
    name: str, tokens_per_block: int | None = None, *, prog: str = "kvtriton"
) -> KVCacheSpec:
    """A built-in spec by name; :class:`UsageError` listing the presets otherwise."""
    if name not in PRESETS:
        raise UsageError(
            f"unknown preset {name!r}; available: {', '.join(PRESETS)} (see '{prog} presets')"
        )
    return preset(name, tokens_per_block=tokens_per_block)


def add_model_arguments(
    parser: argparse.ArgumentParser, *, default_preset: str | None = None, prog: str = "kvtriton"
) -> None:
    """Declare the model-selection options on ``parser``:

    ``--preset NAME | --hf-config PATH_OR_CLASS`` (mutually exclusive; one is required
    unless ``default_preset`` names the preset used when neither is given), ``--hf-set
    KEY=VALUE`` (repeatable, edits the transformers config) and ``--block-size B``.
    :func:`spec_from_args` turns the parsed options into a spec.
    """
    model = parser.add_mutually_exclusive_group(required=default_preset is None)
    model.add_argument(
        "--preset",
        metavar="NAME",
        default=default_preset,
        help=f"built-in model spec (see '{prog} presets')"
        + (f"; default {default_preset}" if default_preset else ""),
    )
    model.add_argument(
        "--hf-config",
        metavar="PATH_OR_CLASS",
        help="a transformers config: config.json, a directory holding one, a Hub id "
        "(org/name) already in the local Hugging Face cache, or a config class name such as "
        "GptOssConfig or Gemma3TextConfig (instantiated with its defaults); never downloads",
    )
    parser.add_argument(
        "--hf-set",
        action="append",
        type=key_value_arg,
        default=[],
        metavar="KEY=VALUE",
        help="change a config field before mapping (repeatable; VALUE is JSON, e.g. "
        "--hf-set sliding_window=1024 --hf-set num_hidden_layers=34)",
    )
    parser.add_argument(
        "--block-size",
        type=int_arg("the block size", minimum=1, maximum=MAX_TOKENS_PER_BLOCK),
        default=None,
        metavar="B",
        help=f"tokens per block (default: the preset's, {HF_DEFAULT_BLOCK_SIZE} for --hf-config)",
    )


def spec_from_args(args: argparse.Namespace, *, prog: str = "kvtriton") -> KVCacheSpec:
    """The spec that :func:`add_model_arguments`' options select; :class:`UsageError` (one
    line naming the option) for an unknown preset, ``--hf-set`` with a preset, or a config
    that cannot be read or mapped."""
    if args.hf_config is None:
        if args.hf_set:
            raise UsageError("--hf-set applies to --hf-config, not to --preset")
        return load_preset(args.preset, args.block_size, prog=prog)
    from kvtriton.hf import UnknownFieldError, spec_from_hf_config

    overrides = dict(args.hf_set)
    try:
        return spec_from_hf_config(
            args.hf_config,
            tokens_per_block=args.block_size or HF_DEFAULT_BLOCK_SIZE,
            overrides=overrides,
        )
    except UnknownFieldError as exc:
        shown = json.dumps(overrides[exc.key]) if exc.key in overrides else "..."
        raise UsageError(f"--hf-set {exc.key}={shown}: {exc}") from None
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise UsageError(f"--hf-config {args.hf_config!r}: {exc}") from None


# -- the disaggregated experiment (kvtriton demo, scripts/disagg.py) -------------------------

#: Ranks one experiment spawns on this machine at most (``ctx_tp*ctx_pp + gen_tp*gen_pp``).
MAX_LOCAL_RANKS = 64
#: Tokens of the longest request of the experiment's stream (first turn, later turns, drafts).
MAX_EXPERIMENT_TOKENS = 2**20
#: Conversations, turns and requests in flight, each at most this.
MAX_EXPERIMENT_COUNT = 4096
#: Bytes of one data chunk at most (2 GiB).
MAX_CHUNK_BYTES = 2**31
#: A session timeout is finite, > 0 and at most a day.
MAX_TIMEOUT_S = 86400.0


def _looks_like_a_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.endswith(".json") or os.path.exists(name)


def load_model(model: Any, dtype: Any = None, *, option: str = "--model") -> KVCacheSpec:
    """``--model``: a :class:`KVCacheSpec`, a preset name or a Hugging Face config (path, Hub
    id in the local cache, class name or model_type), with ``--dtype`` applied;
    :class:`UsageError` naming the option otherwise (a near-miss of a preset name fails at
    once, without looking for a config class)."""
    if isinstance(model, KVCacheSpec):
        spec = model
    elif not isinstance(model, str) or not model:
        raise UsageError(f"{option} must be a preset name or a Hugging Face config, got {model!r}")
    elif model in PRESETS:
        spec = preset(model)
    else:
        close = difflib.get_close_matches(model, list(PRESETS), n=1, cutoff=0.8)
        if close and not _looks_like_a_path(model):
            raise UsageError(
                f"{option} {model!r} is not a preset; did you mean {close[0]!r}? "
                f"(presets: {', '.join(PRESETS)})"
            )
        from kvtriton.hf import spec_from_hf_config

        try:
            spec = spec_from_hf_config(model)
        except (ValueError, TypeError, OSError) as exc:
            raise UsageError(
                f"{option} {model!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                f"Hugging Face config: {exc}"
            ) from None
    if dtype is not None:
        try:
            spec = replace(spec, dtype=canonical_dtype(dtype))
        except ValueError as exc:
            raise UsageError(f"--dtype {dtype!r}: {exc}") from None
    return spec


def _check_int(option: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{option} must be an integer in [{low}, {high:,}], got {value!r}")


def check_disagg_config(cfg: Any) -> KVCacheSpec:
    """Check a disaggregated experiment's configuration before any rank is spawned; return
    the model spec.

    ``cfg`` is a :class:`~kvtriton.transfer.config.DisaggConfig` (or anything with its
    attributes). Raises :class:`UsageError` (a ``ValueError``) with one line naming the
    option: an unknown ``--model`` or ``--dtype``, a TP size the model's heads do not split
    over (``--ctx-tp 3`` for 8 kv heads) or a PP size larger than its layer count, a timeout
    that is not a finite number of seconds in ``(0, MAX_TIMEOUT_S]``, or a size past its bound
    (:data:`MAX_LOCAL_RANKS` ranks, :data:`MAX_EXPERIMENT_TOKENS` tokens per request,
    :data:`MAX_EXPERIMENT_COUNT` conversations / turns / requests in flight,
    :data:`MAX_CHUNK_BYTES` bytes per chunk).
    """
    timeout = getattr(cfg, "timeout_s", 1.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT_S
    ):
        raise UsageError(
            f"--timeout must be a finite number of seconds in (0, {MAX_TIMEOUT_S:g}], "
            f"got {timeout!r}"
        )
    sides = {"ctx": (cfg.ctx_tp, cfg.ctx_pp), "gen": (cfg.gen_tp, cfg.gen_pp)}
    for side, (tp, pp) in sides.items():
        _check_int(f"--{side}-tp", tp, 1, MAX_LOCAL_RANKS)
        _check_int(f"--{side}-pp", pp, 1, MAX_LOCAL_RANKS)
    world = sum(tp * pp for tp, pp in sides.values())
    if world > MAX_LOCAL_RANKS:
        raise UsageError(
            f"--ctx-tp/--ctx-pp/--gen-tp/--gen-pp make {world} ranks; at most "
            f"{MAX_LOCAL_RANKS} (kvtriton's bound)"
        )
    for option, attr, low, high in (
        ("--conversations", "conversations", 1, MAX_EXPERIMENT_COUNT),
        ("--turns", "turns", 1, MAX_EXPERIMENT_COUNT),
        ("--in-flight", "in_flight", 1, MAX_EXPERIMENT_COUNT),
        ("--first-turn-tokens", "first_turn_tokens", 1, MAX_EXPERIMENT_TOKENS),
        ("--turn-tokens", "turn_tokens", 0, MAX_EXPERIMENT_TOKENS),
        ("--draft-tokens", "draft_tokens", 0, MAX_EXPERIMENT_TOKENS),
        ("--chunk-bytes", "chunk_bytes", 1, MAX_CHUNK_BYTES),
    ):
        if hasattr(cfg, attr):
            _check_int(option, getattr(cfg, attr), low, high)
    longest = cfg.first_turn_tokens + (cfg.turns - 1) * cfg.turn_tokens + cfg.draft_tokens
    if longest > MAX_EXPERIMENT_TOKENS:
        raise UsageError(
            f"--first-turn-tokens + (--turns - 1) x --turn-tokens + --draft-tokens = "
            f"{longest:,} tokens in the last turn; at most {MAX_EXPERIMENT_TOKENS:,}"
        )
    block = getattr(cfg, "gen_tokens_per_block", None)
    if block is not None:
        _check_int("--gen-block-size", block, 1, MAX_TOKENS_PER_BLOCK)
    for i, device in enumerate(getattr(cfg, "devices", ()) or ()):
        _check_int(f"--devices (entry {i})", device, 0, 1023)
    spec = load_model(cfg.model, getattr(cfg, "dtype", None))
    for side, (tp, pp) in sides.items():
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                try:
                    spec.shard_for(tp_rank, tp, pp_rank, pp)
                except ValueError as exc:
                    option = f"--{side}-pp {pp}" if "stages" in str(exc) else f"--{side}-tp {tp}"
                    raise UsageError(
                        f"{option} does not fit --model {spec.name!r}: {exc}"
                    ) from None
    return spec


def fail(prog: str, message: str) -> NoReturn:
    """Print ``<prog>: error: <message>`` on stderr and exit with status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
