"""``kvtriton presets``: the built-in model specs and their layer groups, and the
``transformers`` config class that gives each the same numbers."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from kvtriton.spec import PRESET_CONFIGS, PRESETS, KVCacheSpec, LayerGroup, preset
from kvtriton.table import Column, Table, format_bytes

__all__ = ["add_arguments", "config_classes_note", "presets_table", "run"]

HELP = "list the built-in model specs and their layer groups"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the specs as JSON")


def _shape(g: LayerGroup, spec: KVCacheSpec) -> str:
    if g.is_state:  # the state's own dtype: it may differ from the pool dtype
        return "x".join(map(str, g.state_shape or ())) + f" {g.item_dtype(spec.dtype)}"
    return f"{g.num_kv_heads} x {g.head_dim}" + (" (K only)" if g.kv_factor == 1 else "")


def presets_table(specs: Sequence[KVCacheSpec]) -> str:
    """One row per layer group of each spec (what ``kvtriton presets`` prints)."""
    table = Table(
        [
            "preset",
            Column("block"),
            "dtype",
            "group",
            "kind",
            Column("window"),
            Column("layers"),
            Column("kv heads x dim"),
            Column("KV/token"),
            Column("state/request"),
        ]
    )
    for spec in specs:
        for i, g in enumerate(spec.groups):
            first = i == 0
            table.add_row(
                spec.name if first else "",
                spec.tokens_per_block if first else "",
                spec.dtype if first else "",
                g.name,
                g.kind,
                g.window,
                g.num_layers,
                _shape(g, spec),
                format_bytes(spec.bytes_per_token(g)) if g.is_attention else None,
                format_bytes(spec.state_bytes(g)) if g.is_state else None,
            )
    return table.render()


def config_classes_note(names: Sequence[str]) -> str:
    """Which ``--hf-config`` (and ``--hf-set``) gives each preset the same numbers."""
    lines = ["The same spec from a transformers config class (--hf-config CLASS [--hf-set ...]):"]
    width = max(len(n) for n in names)
    for name in names:
        if name not in PRESET_CONFIGS:
            lines.append(f"  {name:<{width}}  (synthetic: no config class)")
            continue
        cls, fields = PRESET_CONFIGS[name]
        sets = " ".join(f"--hf-set {k}={v}" for k, v in fields.items()) or "(its defaults)"
        lines.append(f"  {name:<{width}}  {cls} {sets}")
    lines.append(
        "A state shape is per layer and request, in the dtype shown; from a config class "
        "(qwen3-next-80b) it is the recurrent state plus the conv's K - 1 previous inputs, "
        "folded per head as kvtriton.hf does."
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    specs = [preset(name) for name in PRESETS]
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
    else:
        print(presets_table(specs))
        print()
        print(config_classes_note(list(PRESETS)))
    return 0
