"""Plots of simulations (``kvtriton simulate --plot``, notebooks/03_hybrid_reuse): one
result per policy, several results side by side, a swept setting."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kvtriton.plan import ReusePolicy
from kvtriton.table import format_bytes, format_count
from kvtriton.viz._mpl import byte_scale, figure_class, save

if TYPE_CHECKING:
    from kvtriton.sim import SimResult

__all__ = ["plot_policy_summary", "plot_simulation", "plot_sweep"]


def plot_simulation(
    result: SimResult, path: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Any:
    """Two panels: bytes moved per policy (bars stacked by layer group, GiB) and each group's
    hit rate per policy. Saves to ``path`` (any format matplotlib knows, by extension) when
    given; returns the ``matplotlib.figure.Figure``."""
    Figure = figure_class()
    policies = [p for p in ReusePolicy.baseline_order() if p in result.policies]
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
        ax_bytes.annotate(
            format_bytes(result[p].total_bytes),
            (i, bottom[i]),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax_bytes.set_xticks(list(x), [p.label for p in policies])
    ax_bytes.set_ylabel("bytes moved (GiB)")
    ax_bytes.set_ylim(0, max(bottom) * 1.15 or 1)
    ax_bytes.legend(title="layer group", fontsize=8)
    ax_bytes.set_title("bytes the receiver pulls")

    width = 0.8 / len(policies)
    for k, p in enumerate(policies):
        rates = [100 * result[p].group(name).hit_rate for name in groups]
        pos = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(groups))]
        ax_hit.bar(pos, rates, width=width, label=p.label)
    ax_hit.set_xticks(range(len(groups)), groups)
    ax_hit.set_ylabel("hit rate (% of needed positions cached)")
    ax_hit.set_ylim(0, 105)
    ax_hit.legend(fontsize=8)
    ax_hit.set_title("per-group hit rate")
    t = result.trace
    fig.suptitle(
        title or f"{result.spec_name}, trace {t.get('name')!r} ({t.get('requests')} requests)"
    )
    return save(fig, path)


def plot_policy_summary(
    results: Mapping[str, SimResult],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """One group of bars per simulation (e.g. per model): bytes each policy moved, as a
    percentage of what ``no_reuse`` moved in the same simulation (absolute bytes on the bars),
    and the per-group saving over single-boundary above each group. Returns the Figure."""
    Figure = figure_class()
    if not results:
        raise ValueError("no simulation result to plot")
    order = ReusePolicy.baseline_order()
    labels = list(results)
    fig = Figure(figsize=(max(6.0, 1.7 * len(labels) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(order)
    tops = [0.0] * len(labels)
    for k, policy in enumerate(order):
        pos, heights, texts = [], [], []
        for i, label in enumerate(labels):
            r = results[label]
            if policy not in r.policies:
                continue
            no_reuse = ReusePolicy.NO_REUSE
            base = r[no_reuse].total_bytes if no_reuse in r.policies else None
            moved = r[policy].total_bytes
            pct = 100 * moved / base if base else 0.0
            pos.append(i + (k - (len(order) - 1) / 2) * width)
            heights.append(pct)
            texts.append(format_bytes(moved))
            tops[i] = max(tops[i], pct)
        bars = ax.bar(pos, heights, width=width, label=policy.label)
        ax.bar_label(bars, texts, fontsize=6.5, rotation=90, padding=2)
    for i, label in enumerate(labels):
        r = results[label]
        if {ReusePolicy.PER_GROUP, ReusePolicy.SINGLE_BOUNDARY} <= set(r.policies):
            _, frac = r.savings(ReusePolicy.PER_GROUP, ReusePolicy.SINGLE_BOUNDARY)
            ax.annotate(
                f"per-group saves\n{100 * frac:.0f}% vs single",
                (i, tops[i]),
                xytext=(0, 34),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    ax.set_ylabel("bytes moved (% of no reuse)")
    ax.set_ylim(0, max(tops) * 1.4 or 1)
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="outside lower center",
        ncols=len(order),
        fontsize=8,
        frameon=False,
    )
    ax.set_title(title or "bytes the receiver pulls, per reuse policy", fontsize=10)
    return save(fig, path)


def plot_sweep(
    results: Mapping[float, SimResult],
    xlabel: str,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    logx: bool = False,
) -> Any:
    """Total bytes moved per policy against a swept setting (``{x: SimResult}``, e.g. cache
    capacity), with the per-group saving over single-boundary on a second axis. Returns the
    Figure (saved to ``path`` if given)."""
    Figure = figure_class()
    if not results:
        raise ValueError("no simulation result to plot")
    xs = sorted(results)
    fig = Figure(figsize=(7.5, 4), layout="constrained")
    ax = fig.subplots()
    scale, unit = byte_scale(max(r[p].total_bytes for r in results.values() for p in r.policies))
    for policy in ReusePolicy.baseline_order():
        if all(policy in results[x].policies for x in xs):
            ax.plot(
                xs,
                [results[x][policy].total_bytes / scale for x in xs],
                marker="o",
                label=policy.label,
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"bytes moved ({unit})")
    ax.set_ylim(bottom=0)
    if logx:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [format_count(x) if float(x).is_integer() else f"{x:g}" for x in xs])
    handles, labels = ax.get_legend_handles_labels()
    pair = {ReusePolicy.PER_GROUP, ReusePolicy.SINGLE_BOUNDARY}
    if all(pair <= set(results[x].policies) for x in xs):
        ax2 = ax.twinx()
        (line,) = ax2.plot(
            xs,
            [100 * results[x].savings()[1] for x in xs],
            color="black",
            linestyle="--",
            marker=".",
            label="per-group saving vs single (%)",
        )
        ax2.set_ylabel("saving (%)")
        ax2.set_ylim(0, 100)
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, fontsize=8, loc="best")
    first = results[xs[0]]
    ax.set_title(title or f"{first.spec_name}, trace {first.trace.get('name')!r}", fontsize=10)
    return save(fig, path)
