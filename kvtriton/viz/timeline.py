"""Layer-wise streaming on a time axis: the summary of :func:`kvtriton.transfer.ttft.measure`
(``kvtriton bench ttft --json``) as "layer computed" and "chunk landed" marks per mode."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kvtriton.viz._mpl import figure_class, save

__all__ = ["plot_ttft_bars", "plot_ttft_timeline"]

_MODES = (("plain", "registered after the prefill"), ("streamed", "streamed layer by layer"))


def _row(summary: Mapping[str, Any], policy: str) -> Mapping[str, Any]:
    rows = {r["policy"]: r for r in summary["rows"]}
    if policy not in rows:
        raise ValueError(f"policy {policy!r} is not in the summary; it holds {sorted(rows)}")
    return rows[policy]


def plot_ttft_timeline(
    summary: Mapping[str, Any],
    policy: str = "per_group",
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """One panel per mode (plain, streamed) of ``policy``'s last timed request: x is time
    since the prefill started (ms), y the layer index; dots mark when a layer's compute was
    done on the context rank, crosses when a chunk (placed at its first layer) was committed
    on the generation rank, and a vertical line the TTFT. Returns the Figure."""
    Figure = figure_class()
    row = _row(summary, policy)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True, sharex=True)
    for ax, (mode, label) in zip(axes, _MODES, strict=True):
        tl = row["timeline"][mode]
        done = [1e3 * t for t in tl["layer_done_s"]]
        ax.plot(done, range(len(done)), "o", ms=3, color="tab:blue", label="layer computed")
        landed = sorted((float(t), int(layer)) for layer, t in tl["landed_s"])
        if landed:
            ax.plot(
                [1e3 * t for t, _ in landed],
                [layer for _, layer in landed],
                "x",
                ms=4,
                color="tab:orange",
                label="chunk landed",
            )
        ttft = 1e3 * tl["ttft_s"]
        ax.axvline(ttft, color="tab:red", lw=1)
        ax.text(ttft, 0, f" TTFT {ttft:.1f} ms", color="tab:red", fontsize=8, va="bottom")
        ax.set_title(f"{mode}: {label}", fontsize=9)
        ax.set_xlabel("ms since the prefill started")
    axes[0].set_ylabel("layer")
    axes[0].legend(fontsize=8, loc="upper left")
    cfg = summary["config"]
    fig.suptitle(
        f"{cfg['model']}, P={cfg['prompt_tokens']}, policy {policy}, "
        f"{cfg['layer_ms']} ms/layer, {summary['channel']} on {summary['device']}",
        fontsize=10,
    )
    return save(fig, path)


def plot_ttft_bars(summary: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> Any:
    """Median TTFT per policy, plain vs streamed, with the prefill time as a reference line
    per policy (ms). Returns the Figure."""
    Figure = figure_class()
    rows = list(summary["rows"])
    if not rows:
        raise ValueError("the summary holds no policy row")
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.38
    xs = range(len(rows))
    ax.bar([x - width / 2 for x in xs], [r["ttft_plain_ms"] for r in rows], width, label="plain")
    ax.bar(
        [x + width / 2 for x in xs], [r["ttft_streamed_ms"] for r in rows], width, label="streamed"
    )
    for x, r in zip(xs, rows, strict=True):
        ax.hlines(r["prefill_ms"], x - 0.45, x + 0.45, colors="k", lw=1, linestyles="dashed")
    ax.set_xticks(list(xs), [f"{r['policy']}\n{r['bytes'] / 2**20:.1f} MiB" for r in rows])
    ax.set_ylabel("TTFT (ms); dashed: prefill alone")
    ax.legend(fontsize=8)
    ax.set_title(f"TTFT with and without streaming ({summary['device']})", fontsize=10)
    return save(fig, path)
