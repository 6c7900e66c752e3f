"""Plain-text tables for the terminal and Markdown reports."""

from __future__ import annotations

import math
from typing import Any, Callable

Column = tuple[str, str, Callable[[Any], str]]


def fmt(spec: str) -> Callable[[Any], str]:
    def f(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return format(v, spec)

    return f


def format_table(rows: list[dict], columns: list[Column], markdown: bool = False) -> str:
    cells = [[header for _, header, _ in columns]] + [[f(row.get(key)) for key, _, f in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append(("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded))
        if n == 0:
            sep = ["-" * w for w in widths]
            lines.append(("| " + " | ".join(sep) + " |") if markdown else "  ".join(sep))
    return "\n".join(lines)
