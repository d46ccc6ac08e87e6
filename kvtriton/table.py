"""Aligned plain-text tables and human-readable numbers for the ``kvtriton`` command.

Pure Python (no torch). Every CLI subcommand that prints a table uses :class:`Table`, so the
output looks the same everywhere::

    t = Table(["group", Column("tokens"), Column("bytes")], spans=[("", 1), ("moved", 2)])
    t.add_row("full", 2192, format_bytes(53_870_592))
    t.add_rule()
    t.add_row("total", 2192, format_bytes(53_870_592))
    print(t.render())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Align", "Column", "Table", "format_bytes", "format_count", "format_percent"]

Align = Literal["left", "right"]

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in binary units with three significant digits: ``"0 B"``, ``"512 B"``,
    ``"1.50 KiB"``, ``"51.4 MiB"``, ``"192 MiB"``. Negative values keep their sign."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__} {nbytes!r}")
    sign = "-" if nbytes < 0 else ""
    value = float(abs(nbytes))
    if value < 1024:
        return f"{sign}{int(value)} B"
    unit = 0
    while value >= 1024 and unit < len(_BYTE_UNITS) - 1:
        value /= 1024
        unit += 1
    text = _three_digits(value)
    if text == "1024" and unit < len(_BYTE_UNITS) - 1:  # 1023.9x rounds up: next unit
        text, unit = "1.00", unit + 1
    return f"{sign}{text} {_BYTE_UNITS[unit]}"


def _three_digits(value: float) -> str:
    if round(value, 2) < 10:
        return f"{value:.2f}"
    if round(value, 1) < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def format_count(n: int) -> str:
    """An integer with thousands separators: ``8192 -> "8,192"``."""
    return f"{n:,}"


def format_percent(part: float, whole: float) -> str:
    """``part / whole`` as a percentage with one decimal (``"-"`` when ``whole`` is 0)."""
    if whole == 0:
        return "-"
    return f"{100.0 * part / whole:.1f}%"


@dataclass(frozen=True)
class Column:
    """A column title and how its cells align (numbers: right, the default)."""

    title: str
    align: Align = "right"


class Table:
    """A plain-text table with aligned columns, optional spanning titles and rules.

    Args:
        columns: column titles; a bare string is a left-aligned column, a :class:`Column`
            says its alignment.
        spans: optional titles over runs of columns, ``(title, number_of_columns)``, left
            to right; they must cover every column exactly (use ``""`` for no title).
        gap: spaces between columns.
    """

    def __init__(
        self,
        columns: Sequence[Column | str],
        *,
        spans: Sequence[tuple[str, int]] = (),
        gap: int = 2,
    ) -> None:
        self.columns: tuple[Column, ...] = tuple(
            c if isinstance(c, Column) else Column(c, "left") for c in columns
        )
        if not self.columns:
            raise ValueError("a Table needs at least one column")
        if spans and sum(n for _, n in spans) != len(self.columns):
            raise ValueError(
                f"spans cover {sum(n for _, n in spans)} columns, the table has {len(self.columns)}"
            )
        if any(n < 1 for _, n in spans):
            raise ValueError(f"every span must cover at least one column, got {list(spans)}")
        if gap < 1:
            raise ValueError(f"gap must be >= 1, got {gap}")
        self.spans = tuple(spans)
        self.gap = gap
        self._rows: list[tuple[str, ...] | None] = []

    def add_row(self, *cells: object) -> None:
        """Append a row: one cell per column, converted with ``str`` (``None`` prints "-")."""
        if len(cells) != len(self.columns):
            raise ValueError(
                f"row has {len(cells)} cells, the table has {len(self.columns)} "
                f"columns ({', '.join(c.title for c in self.columns)})"
            )
        self._rows.append(tuple("-" if c is None else str(c) for c in cells))

    def add_rule(self) -> None:
        """Append a horizontal rule (e.g. before a totals row)."""
        self._rows.append(None)

    def _widths(self) -> list[int]:
        widths = [len(c.title) for c in self.columns]
        for row in self._rows:
            if row is not None:
                widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
        # A spanning title wider than its columns widens the last of them.
        col = 0
        for title, n in self.spans:
            inner = sum(widths[col : col + n]) + self.gap * (n - 1)
            if len(title) > inner:
                widths[col + n - 1] += len(title) - inner
            col += n
        return widths

    def render(self) -> str:
        """The table as text (no trailing newline)."""
        widths = self._widths()
        sep = " " * self.gap
        total = sum(widths) + self.gap * (len(widths) - 1)

        def line(cells: Sequence[str]) -> str:
            parts = [
                cell.rjust(w) if col.align == "right" else cell.ljust(w)
                for cell, w, col in zip(cells, widths, self.columns, strict=True)
            ]
            return sep.join(parts).rstrip()

        out: list[str] = []
        if self.spans:
            parts, col = [], 0
            for title, n in self.spans:
                inner = sum(widths[col : col + n]) + self.gap * (n - 1)
                parts.append(title.center(inner) if title else " " * inner)
                col += n
            out.append(sep.join(parts).rstrip())
        out.append(line([c.title for c in self.columns]))
        out.append("-" * total)
        for row in self._rows:
            out.append("-" * total if row is None else line(row))
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()
