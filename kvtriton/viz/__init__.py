"""Plots for the notebooks and ``kvtriton simulate --plot`` (matplotlib, imported on use).

* :mod:`kvtriton.viz.blocks`: block maps of transfer plans and the what-if helpers;
* :mod:`kvtriton.viz.sim`: simulation results (bytes, transfer-time and TTFT CDFs);
* :mod:`kvtriton.viz.bench`: kernel bandwidth and distributed-transfer reports;
* :mod:`kvtriton.viz.timeline`: layer-wise streaming (``kvtriton bench ttft``) on a time axis.

Every ``plot_*`` function returns a ``matplotlib.figure.Figure`` and saves it to ``path``
when one is given.
"""

from kvtriton.viz.bench import plot_kernel_bandwidth, plot_transfer_report
from kvtriton.viz.blocks import (
    CACHED,
    DRAFT,
    MOVED,
    NOT_NEEDED,
    PARTLY_MOVED,
    STATUS_NAMES,
    GroupMap,
    alignment_plans,
    block_maps,
    plot_block_maps,
    plot_plan_bytes,
    with_window,
)
from kvtriton.viz.sim import (
    POLICY_STYLES,
    plot_policy_summary,
    plot_simulation,
    plot_sweep,
    plot_time_cdfs,
    plot_time_sweep,
)
from kvtriton.viz.timeline import plot_ttft_bars, plot_ttft_timeline

__all__ = [
    "CACHED",
    "DRAFT",
    "MOVED",
    "NOT_NEEDED",
    "PARTLY_MOVED",
    "POLICY_STYLES",
    "STATUS_NAMES",
    "GroupMap",
    "alignment_plans",
    "block_maps",
    "plot_block_maps",
    "plot_kernel_bandwidth",
    "plot_plan_bytes",
    "plot_policy_summary",
    "plot_simulation",
    "plot_sweep",
    "plot_time_cdfs",
    "plot_time_sweep",
    "plot_transfer_report",
    "plot_ttft_bars",
    "plot_ttft_timeline",
    "with_window",
]
