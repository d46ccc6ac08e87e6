"""``kvtriton presets``: the built-in model specs and their layer groups."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from kvtriton.spec import PRESETS, KVCacheSpec, LayerGroup, preset
from kvtriton.table import Column, Table, format_bytes

__all__ = ["add_arguments", "presets_table", "run"]

HELP = "list the built-in model specs and their layer groups"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the specs as JSON")


def _shape(g: LayerGroup) -> str:
    if g.is_state:
        return "x".join(map(str, g.state_shape or ()))
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
                _shape(g),
                format_bytes(spec.bytes_per_token(g)) if g.is_attention else None,
                format_bytes(spec.state_bytes(g)) if g.is_state else None,
            )
    return table.render()


def run(args: argparse.Namespace) -> int:
    specs = [preset(name) for name in PRESETS]
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
    else:
        print(presets_table(specs))
    return 0
