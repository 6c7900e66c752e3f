"""The plots of ``kvlab report`` (matplotlib, Agg): each function writes ``<path>.png`` and ``<path>.svg``
and returns the file stem, or None when there is nothing to draw."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                     "svg.fonttype": "none"})
MARKERS = "osD^vP*Xh<>p"
PLAIN = FuncFormatter(lambda v, _: f"{v / 1024:g}K" if v >= 1024 and v % 1024 == 0 else f"{v:g}")


def _style(i: int) -> dict:
    colors = plt.get_cmap("tab10" if i < 10 else "tab20").colors
    return {"color": colors[i % len(colors)], "marker": MARKERS[i % len(MARKERS)]}


def _save(fig, path: Path) -> str:
    for ext, dpi in (("png", 150), ("svg", None)):
        fig.savefig(path.parent / f"{path.name}.{ext}", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _log_if_wide(ax, axis: str, values: list[float], ratio: float = 8, base: int = 10) -> None:
    """Log scale when the positive values span more than ``ratio``, with plain tick labels (16K for
    16384), more of them on a narrow span."""
    vals = [v for v in values if v > 0]
    if not vals or max(vals) / min(vals) <= ratio:
        return
    getattr(ax, f"set_{axis}scale")("log", base=base)
    span = math.log(max(vals) / min(vals), base)
    if base == 2:
        subs = (1.0, 1.5) if span < 3 else (1.0,)
    else:
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if span < 1 else (1.0, 2.0, 5.0) if span < 2.5 else (1.0,)
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=base, subs=subs))
    target.set_major_formatter(PLAIN)
    target.set_minor_formatter(NullFormatter())


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)


BUDGET = re.compile(r"[:,]?((?:sparsity|budget)=[^,+]*)")


def _series(label: str) -> str:
    """The method without its eviction budget: the points of one sparsity sweep share a line."""
    return BUDGET.sub("", label)


def ppl_vs_bits(pts: list[tuple[str, float, float]], front: list[str], title: str, path: Path) -> str | None:
    """Perplexity vs bits per value all-in, one point per (method, bits, ppl), the Pareto ``front`` drawn."""
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    groups = {s: [q for q in pts if _series(q[0]) == s] for s in dict.fromkeys(_series(m) for m, _, _ in pts)}
    for i, (series, members) in enumerate(groups.items()):
        members.sort(key=lambda q: q[1])
        sweep = len(members) > 1
        ax.plot([q[1] for q in members], [q[2] for q in members], linestyle="-" if sweep else "none", lw=1,
                markersize=7, label=series + (" (sweep)" if sweep else ""), **_style(i))
        for m, b, p in members if sweep else []:
            tag = BUDGET.search(m)
            ax.annotate(tag.group(1) if tag else m, (b, p), xytext=(6, 4), textcoords="offset points", fontsize=7)
    f = sorted((b, p) for m, b, p in pts if m in front)
    ax.plot([b for b, _ in f], [p for _, p in f], "k--", lw=1.2, drawstyle="steps-post", label="Pareto front", zorder=0)
    _log_if_wide(ax, "x", [b for _, b, _ in pts], ratio=3, base=2)
    _log_if_wide(ax, "y", [p for _, _, p in pts], ratio=2)
    ax.set_xlabel("bits per value, all-in (full-precision parts at 16 bits)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def accuracy(tasks: list[tuple[str, list[dict]]], title: str, path: Path) -> str:
    """Horizontal points with interval bars: methods down the y axis, one series per task."""
    methods = list(dict.fromkeys(r["method"] for _, rows in tasks for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.35 * len(methods) * max(1, len(tasks)) ** 0.5))
    step = 0.7 / max(1, len(tasks))
    for i, (task, rows) in enumerate(tasks):
        st = _style(i)
        y = [methods.index(r["method"]) + (i - (len(tasks) - 1) / 2) * step for r in rows]
        x = [100 * r["accuracy"] for r in rows]
        err = [[max(0.0, xi - 100 * r["ci_low"]) if math.isfinite(r["ci_low"]) else 0 for xi, r in zip(x, rows)],
               [max(0.0, 100 * r["ci_high"] - xi) if math.isfinite(r["ci_high"]) else 0 for xi, r in zip(x, rows)]]
        ax.errorbar(x, y, xerr=err, linestyle="none", capsize=3, markersize=6, label=task, **st)
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%), 95% interval")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def agreement(methods: list[dict], title: str, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, r in enumerate(methods):
        st = _style(i)
        ax.plot(r["positions"], [100 * a for a in r["agreement"]], "-", lw=1.3, markersize=4,
                markevery=max(1, len(r["positions"]) // 12), label=r["method"], **st)
    _log_if_wide(ax, "x", [p for r in methods for p in r["positions"]], ratio=20, base=2)
    ax.set_xlabel("position in the sequence (tokens)")
    ax.set_ylabel("agreement (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return _save(fig, path)


def _panels(rows: list[dict], panel_key: str, x_key: str, y_key: str, title: str, xlabel: str, ylabel: str,
            panel_label: str, path: Path) -> str | None:
    """One panel per value of ``panel_key``, one line per method, only panels with a line of 2+ points."""
    panels = sorted({r[panel_key] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [v for v in panels if any(len([r for r in rows if r[panel_key] == v and r["method"] == m]) > 1
                                       for m in methods)]
    if not panels:
        return None
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 1.8, 3.2 * nrows), squeeze=False, sharey=True)
    for ax, value in itertools.zip_longest(axes.flat, panels):
        if value is None:
            ax.set_visible(False)
            continue
        for i, m in enumerate(methods):
            pts = sorted((r[x_key], r[y_key]) for r in rows if r[panel_key] == value and r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), "-", lw=1.3, markersize=5, label=m, **_style(i))
        _log_if_wide(ax, "x", [r[x_key] for r in rows], ratio=4, base=2)
        _log_if_wide(ax, "y", [r[y_key] for r in rows], ratio=10)
        ax.yaxis.set_tick_params(labelleft=True)
        ax.set_title(f"{panel_label} {value}")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    legend = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def throughput(rows: list[dict], title: str, path: Path) -> str | None:
    return _panels(rows, "context", "batch", "tokens_per_s", title, "batch size", "tokens/s (all sequences)",
                   "context", path)


def latency(rows: list[dict], title: str, path: Path) -> str | None:
    return _panels(rows, "batch", "context", "ms_per_token", title, "context length (tokens)", "ms per token",
                   "batch", path)
