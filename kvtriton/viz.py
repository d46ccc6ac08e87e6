"""Plots for the notebooks and ``kvtriton simulate --plot`` (matplotlib, imported on use)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from kvtriton.table import format_bytes

if TYPE_CHECKING:
    from kvtriton.sim import SimResult

__all__ = ["plot_simulation"]

_POLICY_ORDER = ("no_reuse", "single_boundary", "per_group")
_POLICY_TITLES = {"no_reuse": "no reuse", "single_boundary": "single boundary",
                  "per_group": "per-group"}


def plot_simulation(result: SimResult, path: str | os.PathLike[str] | None = None, *,
                    title: str | None = None) -> Any:
    """Two panels: bytes moved per policy (bars stacked by layer group, GiB) and each group's
    hit rate per policy. Saves to ``path`` (any format matplotlib knows, by extension) when
    given; returns the ``matplotlib.figure.Figure``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'kvtriton[notebooks]'"
                          ) from None
    policies = [p for p in _POLICY_ORDER if p in result.policies]
    groups = [g.name for g in result[policies[0]].groups]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_bytes, ax_hit = fig.subplots(1, 2, width_ratios=(1, 1.3))
    gib = 1024**3
    x = range(len(policies))
    bottom = [0.0] * len(policies)
    for name in groups:
        heights = [result[p].group(name).bytes / gib for p in policies]
        ax_bytes.bar(x, heights, bottom=bottom, label=name, width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, p in enumerate(policies):
        ax_bytes.annotate(format_bytes(result[p].total_bytes), (i, bottom[i]),
                          ha="center", va="bottom", fontsize=9, xytext=(0, 2),
                          textcoords="offset points")
    ax_bytes.set_xticks(list(x), [_POLICY_TITLES[p] for p in policies])
    ax_bytes.set_ylabel("bytes moved (GiB)")
    ax_bytes.set_ylim(0, max(bottom) * 1.15 or 1)
    ax_bytes.legend(title="layer group", fontsize=8)
    ax_bytes.set_title("bytes the receiver pulls")

    width = 0.8 / len(policies)
    for k, p in enumerate(policies):
        rates = [100 * result[p].group(name).hit_rate for name in groups]
        pos = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(groups))]
        ax_hit.bar(pos, rates, width=width, label=_POLICY_TITLES[p])
    ax_hit.set_xticks(range(len(groups)), groups)
    ax_hit.set_ylabel("hit rate (% of needed positions cached)")
    ax_hit.set_ylim(0, 105)
    ax_hit.legend(fontsize=8)
    ax_hit.set_title("per-group hit rate")
    t = result.trace
    fig.suptitle(title or f"{result.spec_name}, trace {t.get('name')!r} "
                 f"({t.get('requests')} requests)")
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig
