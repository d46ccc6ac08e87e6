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
  as one ``kvtriton: error: ...`` line and exits 2; it is the CLI's ``CliError``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from kvtriton.spec import PRESETS, KVCacheSpec, preset

__all__ = [
    "UsageError",
    "add_model_arguments",
    "count_arg",
    "float_arg",
    "group_count_arg",
    "int_arg",
    "int_pair_arg",
    "key_value_arg",
    "load_preset",
    "positive_int",
    "spec_from_args",
]

#: Tokens per block of a spec made from a transformers config when ``--block-size`` is not given.
HF_DEFAULT_BLOCK_SIZE = 16


class UsageError(Exception):
    """A user mistake on the command line (printed as one ``<prog>: error: <message>`` line,
    exit status 2, no traceback)."""


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


def count_arg(what: str = "token count") -> Callable[[str], int]:
    """An argparse ``type=``: an int >= 0 (a count of tokens, blocks, ...)."""
    return int_arg(what, minimum=0)


def float_arg(
    what: str = "the value",
    *,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    unit: str = "",
) -> Callable[[str], float]:
    """An argparse ``type=``: a float ``> above`` and/or inside ``[minimum, maximum]``."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {what}{' in ' + unit if unit else ''}, got {text!r}"
            ) from None
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"{what} must be > {above:g}{suffix}, got {text!r}")
        if minimum is not None and not value >= minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum:g}{suffix}, got {text!r}")
        if maximum is not None and not value <= maximum:
            raise argparse.ArgumentTypeError(f"{what} must be <= {maximum:g}{suffix}, got {text!r}")
        return value

    parse.__name__ = f"float({what})"
    return parse


def int_pair_arg(what: str = "token counts") -> Callable[[str], tuple[int, int]]:
    """An argparse ``type=``: ``MIN:MAX`` (or ``N`` for ``N:N``) with ``0 <= MIN <= MAX``."""

    def parse(text: str) -> tuple[int, int]:
        lo, sep, hi = text.partition(":")
        try:
            pair = (int(lo), int(hi if sep else lo))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected MIN:MAX {what}, got {text!r}") from None
        if not 0 <= pair[0] <= pair[1]:
            raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
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
    return name, parse_int(count.strip(), f"cached tokens of group {name!r}", 0)


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
        help="a transformers config: config.json, a directory holding one, or a "
        "config class name such as GptOssConfig or Gemma3TextConfig "
        "(instantiated with its defaults; no network, no weights)",
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
        type=positive_int,
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
    from kvtriton.hf import spec_from_hf_config

    try:
        return spec_from_hf_config(
            args.hf_config,
            tokens_per_block=args.block_size or HF_DEFAULT_BLOCK_SIZE,
            overrides=dict(args.hf_set),
        )
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise UsageError(f"--hf-config {args.hf_config!r}: {exc}") from None
