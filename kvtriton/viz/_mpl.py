"""Matplotlib helpers shared by the plotting modules (matplotlib is imported on use)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["byte_scale", "figure_class", "save"]


def byte_scale(nbytes: int) -> tuple[int, str]:
    """``(divisor, unit)`` that shows ``nbytes`` in GiB, MiB, KiB or B."""
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if nbytes >= 1024**power:
            return 1024**power, unit
    return 1, "B"


def figure_class() -> Any:
    """``matplotlib.figure.Figure``; ``ImportError`` saying how to install matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'kvtriton[notebooks]'") from None
    return Figure


def save(fig: Any, path: str | os.PathLike[str] | None) -> Any:
    """Save ``fig`` to ``path`` (format by extension) when a path is given; return ``fig``."""
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig
