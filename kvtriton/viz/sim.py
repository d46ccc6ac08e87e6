"""Plots of simulations (``kvtriton simulate --plot``, notebooks/03_hybrid_reuse): one
result per policy, several results side by side, time distributions, a swept setting.

A policy has one colour and one line style in every panel and every figure
(:data:`POLICY_STYLES`); legends sit outside the data."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvtriton.plan import ReusePolicy
from kvtriton.table import format_bytes, format_count
from kvtriton.viz._mpl import byte_scale, figure_class, save

if TYPE_CHECKING:
    from kvtriton.sim import SimResult

__all__ = [
    "POLICY_STYLES",
    "plot_policy_summary",
    "plot_simulation",
    "plot_sweep",
    "plot_time_cdfs",
    "plot_time_sweep",
]

#: Colour (Okabe-Ito, colour-blind safe) and line style of each policy, everywhere.
POLICY_STYLES: dict[ReusePolicy, dict[str, str]] = {
    ReusePolicy.PER_GROUP: {"color": "#0072B2", "linestyle": "-"},
    ReusePolicy.SINGLE_BOUNDARY: {"color": "#D55E00", "linestyle": "--"},
    ReusePolicy.NO_REUSE: {"color": "#8C8C8C", "linestyle": "-"},
}
#: Line widths, widest drawn first: lines that coincide stay visible, nested.
_LINE_WIDTH = {
    ReusePolicy.NO_REUSE: 4.0,
    ReusePolicy.SINGLE_BOUNDARY: 2.4,
    ReusePolicy.PER_GROUP: 1.4,
}

#: What each time series is, for axis labels.
TIME_SERIES: dict[str, str] = {
    "transfer_ms": "transfer time, ask -> committed (ms)",
    "ttft_ms": "time to first token (ms)",
    "queue_ms": "waiting for a context rank (ms)",
    "prefill_ms": "prefill of the uncached part (ms)",
    "admission_ms": "waiting for admission (ms)",
}


def _policies(result: SimResult) -> list[ReusePolicy]:
    return [p for p in ReusePolicy.baseline_order() if p in result.policies]


def _legend_below(fig: Any, handles: Sequence[Any], labels: Sequence[str]) -> None:
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=len(labels),
        fontsize=9,
        frameon=False,
    )


def _draw_cdf(ax: Any, result: SimResult, series: str, *, legend: bool = False) -> None:
    """One CDF line per policy of ``result``'s per-request ``series``."""
    top = 0.0
    low = math.inf
    for p in _policies(result):
        time = result[p].time
        if time is None:
            raise ValueError(f"{p}: the result holds no time")
        values = getattr(time, series).values
        n = len(values)
        ax.step(
            values,
            [(i + 1) / n for i in range(n)],
            where="post",
            linewidth=_LINE_WIDTH[p],
            label=p.label,
            **POLICY_STYLES[p],
        )
        top = max(top, values[-1] if values else 0.0)
        positive = [v for v in values if v > 0]
        low = min(low, positive[0] if positive else math.inf)
    if low < math.inf and top / low > 100:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 0.9, 1.0], ["0", "0.25", "0.5", "0.75", "0.9", "1"])
    ax.set_ylabel("fraction of requests", fontsize=9)
    ax.grid(True, axis="y", linewidth=0.5, alpha=0.5)
    ax.grid(True, axis="x", which="major", linewidth=0.5, alpha=0.3)
    ax.set_xlabel(TIME_SERIES.get(series, series), fontsize=9)
    ax.tick_params(labelsize=8)
    if legend:
        ax.legend(fontsize=8, loc="lower right")


def plot_simulation(
    result: SimResult, path: str | os.PathLike[str] | None = None, *, title: str | None = None
) -> Any:
    """Three panels: bytes each layer group moved per policy, and the distributions (CDFs)
    of per-request transfer time and TTFT. Saves to ``path`` (any format matplotlib knows,
    by extension) when given; returns the ``matplotlib.figure.Figure``."""
    Figure = figure_class()
    policies = _policies(result)
    groups = [g.name for g in result[policies[0]].groups]
    timed = all(result[p].time is not None for p in policies)
    fig = Figure(figsize=(13.5 if timed else 6, 4.3), layout="constrained")
    axes = fig.subplots(1, 3 if timed else 1, width_ratios=(1, 1.1, 1.1) if timed else None)
    ax_bytes = axes[0] if timed else axes
    scale, unit = byte_scale(max(g.bytes for p in policies for g in result[p].groups) or 1)
    width = 0.8 / len(policies)
    for k, p in enumerate(policies):
        heights = [result[p].group(name).bytes / scale for name in groups]
        pos = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(groups))]
        ax_bytes.bar(pos, heights, width=width, color=POLICY_STYLES[p]["color"])
    ax_bytes.set_xticks(range(len(groups)), groups, fontsize=9)
    ax_bytes.set_ylabel(f"bytes moved ({unit})", fontsize=9)
    ax_bytes.tick_params(labelsize=8)
    ax_bytes.set_title("bytes the receiver pulls, per layer group", fontsize=10)
    if timed:
        _draw_cdf(axes[1], result, "transfer_ms")
        axes[1].set_title("transfer time per request (CDF)", fontsize=10)
        _draw_cdf(axes[2], result, "ttft_ms")
        axes[2].set_title("TTFT per request (CDF)", fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(color=POLICY_STYLES[p]["color"]) for p in policies]
    labels = [f"{p.label}: {format_bytes(result[p].total_bytes)}" for p in policies]
    if timed:
        labels = [
            f"{label}, TTFT p50 {_ms(result[p].time.ttft_ms.p50)} / p99 "  # type: ignore[union-attr]
            f"{_ms(result[p].time.ttft_ms.p99)}"  # type: ignore[union-attr]
            for label, p in zip(labels, policies, strict=True)
        ]
    _legend_below(fig, handles, labels)
    t = result.trace
    link = f"; link {result.time_model.link.label()}" if timed and result.time_model else ""
    fig.suptitle(
        title
        or f"{result.spec_name}, trace {t.get('name')!r} ({t.get('requests')} requests){link}",
        fontsize=11,
    )
    return save(fig, path)


def _ms(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.3g} ms"


def plot_time_cdfs(
    results: Mapping[str, SimResult],
    path: str | os.PathLike[str] | None = None,
    *,
    series: Sequence[str] = ("transfer_ms", "ttft_ms"),
    title: str | None = None,
) -> Any:
    """A grid of CDFs: one row per simulation (e.g. per model), one column per time series
    (``transfer_ms``, ``ttft_ms``, ``queue_ms``, ``prefill_ms``, ``admission_ms``), one line
    per policy. Returns the Figure (saved to ``path`` if given)."""
    Figure = figure_class()
    if not results:
        raise ValueError("no simulation result to plot")
    labels = list(results)
    fig = Figure(figsize=(4.6 * len(series) + 0.6, 2.9 * len(labels) + 0.7), layout="constrained")
    axes = fig.subplots(len(labels), len(series), squeeze=False)
    for r, label in enumerate(labels):
        for c, name in enumerate(series):
            ax = axes[r][c]
            _draw_cdf(ax, results[label], name)
            ax.set_title(f"{label}: {TIME_SERIES.get(name, name).split(' (')[0]}", fontsize=10)
    first = results[labels[0]]
    handles, names = axes[0][0].get_legend_handles_labels()
    _legend_below(fig, handles, names)
    if title or first.time_model:
        fig.suptitle(title or f"link {first.time_model.link.label()}", fontsize=11)  # type: ignore[union-attr]
    return save(fig, path)


def plot_policy_summary(
    results: Mapping[str, SimResult],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """One group of horizontal bars per simulation (e.g. per model): bytes each policy moved
    as a percentage of what ``no_reuse`` moved in the same simulation, the absolute bytes at
    the end of each bar, and per-group reuse's saving over a single boundary. Returns the
    Figure."""
    Figure = figure_class()
    if not results:
        raise ValueError("no simulation result to plot")
    order = ReusePolicy.table_order()
    labels = list(results)
    fig = Figure(figsize=(8.5, 1.0 + 0.95 * len(labels)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(order)
    for k, policy in enumerate(order):
        pos, widths, texts = [], [], []
        for i, label in enumerate(labels):
            r = results[label]
            if policy not in r.policies:
                continue
            base = r[ReusePolicy.NO_REUSE].total_bytes if ReusePolicy.NO_REUSE in r.policies else 0
            moved = r[policy].total_bytes
            pos.append(i + (k - (len(order) - 1) / 2) * height)
            widths.append(100 * moved / base if base else 0.0)
            texts.append(format_bytes(moved))
        bars = ax.barh(pos, widths, height=height * 0.92, color=POLICY_STYLES[policy]["color"])
        ax.bar_label(bars, texts, fontsize=8, padding=3)
    names = []
    for label in labels:
        r = results[label]
        name = label
        if {ReusePolicy.PER_GROUP, ReusePolicy.SINGLE_BOUNDARY} <= set(r.policies):
            _, frac = r.savings(ReusePolicy.PER_GROUP, ReusePolicy.SINGLE_BOUNDARY)
            name += f"\nper-group saves {100 * frac:.0f}%"
        names.append(name)
    ax.set_yticks(range(len(labels)), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 125)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("bytes moved (% of no reuse)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    from matplotlib.patches import Patch

    _legend_below(
        fig, [Patch(color=POLICY_STYLES[p]["color"]) for p in order], [p.label for p in order]
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
    fig = Figure(figsize=(7.5, 4.3), layout="constrained")
    ax = fig.subplots()
    scale, unit = byte_scale(max(r[p].total_bytes for r in results.values() for p in r.policies))
    for policy in ReusePolicy.baseline_order():
        if all(policy in results[x].policies for x in xs):
            ax.plot(
                xs,
                [results[x][policy].total_bytes / scale for x in xs],
                marker="o",
                label=policy.label,
                linewidth=_LINE_WIDTH[policy],
                **POLICY_STYLES[policy],
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
            linestyle="-.",
            marker=".",
            label="per-group saving vs single (%, right axis)",
        )
        ax2.set_ylabel("saving (%)")
        ax2.set_ylim(0, 100)
        handles.append(line)
        labels.append(line.get_label())
    _legend_below(fig, handles, labels)
    first = results[xs[0]]
    ax.set_title(title or f"{first.spec_name}, trace {first.trace.get('name')!r}", fontsize=10)
    return save(fig, path)


def plot_time_sweep(
    results: Mapping[float, SimResult],
    xlabel: str,
    path: str | os.PathLike[str] | None = None,
    *,
    series: str = "ttft_ms",
    stats: Sequence[str] = ("p50", "p99"),
    title: str | None = None,
    logx: bool = True,
) -> Any:
    """A time series' percentiles per policy against a swept setting (``{x: SimResult}``,
    e.g. link bandwidth): one colour per policy, one marker per statistic. Returns the
    Figure (saved to ``path`` if given)."""
    Figure = figure_class()
    if not results:
        raise ValueError("no simulation result to plot")
    xs = sorted(results)
    fig = Figure(figsize=(7.5, 4.3), layout="constrained")
    ax = fig.subplots()
    markers = ("o", "s", "^", "D")
    for policy in ReusePolicy.baseline_order():
        if not all(policy in results[x].policies for x in xs):
            continue
        for stat, marker in zip(stats, markers, strict=False):
            ax.plot(
                xs,
                [getattr(getattr(results[x][policy].time, series), stat) for x in xs],
                marker=marker,
                label=f"{policy.label} {stat}",
                linewidth=_LINE_WIDTH[policy],
                **POLICY_STYLES[policy],
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(TIME_SERIES.get(series, series))
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.grid(True, linewidth=0.5, alpha=0.4)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=max(1, len(labels) // len(stats)),
        fontsize=9,
        frameon=False,
    )
    first = results[xs[0]]
    ax.set_title(title or f"{first.spec_name}, trace {first.trace.get('name')!r}", fontsize=10)
    return save(fig, path)
