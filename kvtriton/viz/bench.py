"""Plots of measurements: kernel bandwidth (notebooks/02_kernels) and a distributed
transfer's report (notebooks/04_distributed)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kvtriton.plan import ReusePolicy
from kvtriton.table import format_bytes, format_count
from kvtriton.viz._mpl import byte_scale, figure_class, save

__all__ = ["plot_kernel_bandwidth", "plot_transfer_report"]


def plot_kernel_bandwidth(
    bench: Mapping[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """Bandwidth per case of :func:`kvtriton.kernels.bench.run_benchmark` output: kvtriton,
    torch (one indexing call; per-layer loop) and a contiguous copy of the same bytes (the
    limit), in GB/s of bytes read + written. Returns the Figure (saved to ``path`` if given)."""
    import math

    Figure = figure_class()
    cases = list(bench["cases"])
    if not cases:
        raise ValueError("the benchmark result holds no case")
    series = (
        ("kvtriton", "kvtriton (Triton)"),
        ("torch_1call", "torch, one indexing call"),
        ("torch_loop", "torch, one call per layer"),
        ("copy", "contiguous copy (limit)"),
    )
    fig = Figure(figsize=(10, 0.3 * len(cases) + 1.4), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(series)
    for k, (key, label) in enumerate(series):
        values = [c["gbs"].get(key, math.nan) for c in cases]
        pos = [i + (k - (len(series) - 1) / 2) * height for i in range(len(cases))]
        ax.barh(pos, [0 if math.isnan(v) else v for v in values], height=height, label=label)
    labels = [
        f"{c['op']} {c['src']} -> {c['dst']}, start {c['start']}, "
        f"{format_count(c['tokens'])} tok ({c['mib']:.0f} MiB)"
        for c in cases
    ]
    ax.set_yticks(range(len(cases)), labels, fontsize=7)
    ax.set_ylim(len(cases) - 0.5, -0.5)
    ax.set_xlabel("GB/s (bytes read + written)")
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="outside lower center",
        ncols=len(series),
        fontsize=8,
        frameon=False,
    )
    ax.set_title(
        title
        or f"paged KV moves on {bench.get('device', '?')} "
        f"(torch {bench.get('torch', '?')}, triton {bench.get('triton', '?')})",
        fontsize=10,
    )
    return save(fig, path)


def plot_transfer_report(
    report: Mapping[str, Any],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Any:
    """A :func:`kvtriton.transfer.experiment.launch_local` report: bytes moved per mode (bars
    stacked by layer group, plus what no reuse would have moved), and bytes per request (summed
    over the generation ranks), turn by turn. Returns the Figure (saved to ``path`` if given)."""
    import re

    Figure = figure_class()
    known = (ReusePolicy.SINGLE_BOUNDARY, ReusePolicy.PER_GROUP)
    modes = [m for m in known if m in report["modes"]] + [
        m for m in report["modes"] if m not in known
    ]
    if not modes:
        raise ValueError("the report holds no mode")
    groups = list(report["modes"][modes[0]]["groups"])
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_total, ax_req = fig.subplots(1, 2, width_ratios=(1, 1.6))

    columns = [ReusePolicy.NO_REUSE, *modes]
    scale, unit = byte_scale(
        max(
            [report["modes"][m]["bytes"] for m in modes]
            + [report["modes"][modes[0]]["no_reuse_bytes"]]
        )
    )
    bottom = [0.0] * len(columns)
    for g in groups:
        heights = [report["modes"][modes[0]]["groups"][g]["no_reuse_bytes"] / scale]
        heights += [report["modes"][m]["groups"][g]["bytes"] / scale for m in modes]
        ax_total.bar(range(len(columns)), heights, bottom=bottom, width=0.6, label=g)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, top in enumerate(bottom):
        ax_total.annotate(
            format_bytes(round(top * scale)),
            (i, top),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax_total.set_xticks(range(len(columns)), [_label(c) for c in columns])
    ax_total.set_ylabel(f"bytes moved ({unit})")
    ax_total.set_ylim(0, max(bottom) * 1.15 or 1)
    ax_total.legend(title="layer group", fontsize=8)
    ax_total.set_title("whole stream, all receivers", fontsize=10)

    per_request: dict[str, dict[str, int]] = {m: {} for m in modes}
    for rank in report.get("ranks", []):
        if rank.get("side") != "gen":
            continue
        for m in modes:
            for q in rank["modes"][m]["requests"]:
                rid = q["rid"].split("/", 1)[-1]
                per_request[m][rid] = per_request[m].get(rid, 0) + sum(q["bytes_by_group"].values())

    def order(rid: str) -> tuple[int, int, str]:
        found = re.fullmatch(r"c(\d+)t(\d+)", rid)
        return (int(found[2]), int(found[1]), rid) if found else (1 << 30, 0, rid)

    rids = sorted({r for m in modes for r in per_request[m]}, key=order)
    if rids:
        width = 0.8 / len(modes)
        for k, m in enumerate(modes):
            pos = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(rids))]
            ax_req.bar(
                pos,
                [per_request[m].get(r, 0) / 1024 for r in rids],
                width=width,
                label=_label(m),
                color=f"C{_color_index(m)}",
            )
        ax_req.set_xticks(range(len(rids)), rids, fontsize=8)
        ax_req.set_xlabel("request (conversation c, turn t)")
        ax_req.set_ylabel("KiB moved")
        ax_req.legend(fontsize=8)
    ax_req.set_title(
        "per request: turn 0 is cold, later turns reuse the receiver's cache", fontsize=10
    )
    fig.suptitle(
        title
        or f"{report['model']}: {report['topology']}, data over "
        f"{report['channel']} on {report['device']}"
        + ("" if report.get("verified") else " (NOT VERIFIED)"),
        fontsize=11,
    )
    return save(fig, path)


def _label(policy: str) -> str:
    try:
        return ReusePolicy(policy).label
    except ValueError:
        return str(policy)


def _color_index(policy: str) -> int:
    """The matplotlib cycle colour a policy has in the simulation plots (5 for others)."""
    order = ReusePolicy.baseline_order()
    return order.index(policy) if policy in order else 5  # type: ignore[arg-type]
