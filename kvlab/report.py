"""``kvlab report``: one Markdown and one HTML page, with plots, from any mix of result folders.

Every ``*.json`` under the given paths is read (recursively) and recognised by its shape:

* perplexity unit (``kvlab ppl``): ``method``, ``seed``, ``ppl``, ``windows`` and the other fields of
  ``SCHEMAS["ppl_unit"]``; units are grouped by their ``config`` without method and seed, and aggregated;
* perplexity aggregate (``aggregated_results.json``): ``methods``, ``paired_vs_baseline``, ``config``;
  used only for a configuration none of whose units were found;
* files with a ``"kind"`` field, schemas below (``?``: optional). Several files of one group
  (same model and task / dataset / device) are merged; a method seen twice keeps its first row.

``"kind": "accuracy"`` (``kvlab eval``)::

    {"kind": "accuracy", "model": str, "task": str, "baseline"?: str (default "fp16"),
     "methods": [{"method": str, "n": int, "correct": int,
                  "outcomes"?: {problem_id: 0 | 1},   # paired exact McNemar test vs the baseline
                  "ci_low"?: float, "ci_high"?: float,  # default: Wilson 95% interval
                  "p_value"?: float}]}                 # vs the baseline, used when no outcomes

``"kind": "fidelity"`` (``kvlab fidelity``: agreement with a reference model run, by position)::

    {"kind": "fidelity", "model": str, "dataset": str, "reference"?: str (default "fp16"),
     "metric"?: str (default "top-1 agreement"),
     "methods": [{"method": str, "positions": [int], "agreement": [float in 0..1],
                  "per_sample"?: [float],   # mean agreement per sample, same samples for all methods:
                                            # t interval, paired t-test vs the best method
                  "mean"?: float, "ci_low"?: float, "ci_high"?: float}]}

``"kind": "latency"`` (``kvlab bench latency``)::

    {"kind": "latency", "model": str, "device": str, "dtype"?: str,
     "rows": [{"method": str, "batch": int, "context": int, "ms_per_token": float,
               "ms_per_token_std"?: float, "tokens_per_s"?: float (default batch * 1000 / ms_per_token),
               "peak_memory_mb"?: float}]}

    A row with ``"oom": true`` or ``"skipped": str`` (a run that ran out of memory or could not run)
    needs no timing; it is listed under the table, not drawn.

p-values are Holm-corrected within a table; marks: *** p<0.001, ** p<0.01, * p<0.05, ns.
"""

from __future__ import annotations

import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from kvlab.eval.aggregate import aggregate
from kvlab.eval.stats import holm, paired_test, stars
from kvlab.results import config_hash

KINDS = ("accuracy", "fidelity", "latency")
NA = "-"

# -- collecting -------------------------------------------------------------------------------


NUM = (int, float)
# kind: (top-level fields, the list of rows, fields of each row); each field with its type(s)
SCHEMAS: dict[str, tuple[dict[str, Any], str, dict[str, Any]]] = {
    "ppl_unit": ({"method": str, "seed": int, "ppl": NUM, "config": dict, "config_hash": str, "windows": list,
                  "tokens_scored": int, "cache_bytes": NUM, "bits_per_value_quantized": NUM,
                  "bits_per_value_all_in": NUM, "bits_per_value_all_in_fp16": NUM, "tokens_per_s": NUM},
                 "windows", {"start": int, "nll_sum": NUM, "tokens": int}),
    "ppl_aggregate": ({"methods": list, "paired_vs_baseline": list, "config": dict}, "methods",
                      {"method": str, "ppl_mean": NUM}),
    "accuracy": ({"model": str, "task": str, "methods": list}, "methods", {"method": str, "n": int, "correct": int}),
    "fidelity": ({"model": str, "dataset": str, "methods": list}, "methods",
                 {"method": str, "positions": list, "agreement": list}),
    "latency": ({"model": str, "device": str, "rows": list}, "rows",
                {"method": str, "batch": int, "context": int, "ms_per_token": NUM}),
}


@dataclass
class Collected:
    by_kind: dict[str, list[dict]] = field(default_factory=lambda: {k: [] for k in SCHEMAS})
    skipped: list[str] = field(default_factory=list)  # "path: reason"

    def count(self) -> int:
        return sum(map(len, self.by_kind.values()))


def detect(data: Any) -> str | None:
    """The kind of a parsed result file: a key of SCHEMAS, or None."""
    if not isinstance(data, dict):
        return None
    if "kind" in data:
        return data["kind"] if data["kind"] in KINDS else None
    if {"method", "seed", "ppl", "windows"} <= data.keys():
        return "ppl_unit"
    if {"methods", "paired_vs_baseline"} <= data.keys():
        return "ppl_aggregate"
    return None


def _check(kind: str, data: dict) -> None:
    """Raise ValueError naming the first missing or mistyped field."""
    top, list_key, row_fields = SCHEMAS[kind]

    def bad(obj: dict, fields: dict[str, Any]) -> str | None:  # booleans are not numbers here
        return next((k for k, t in fields.items() if not isinstance(obj.get(k), t) or isinstance(obj[k], bool)), None)

    if key := bad(data, top):
        kind_name = "number" if top[key] == NUM else top[key].__name__
        raise ValueError(f"{kind} result: field {key!r} missing or not a {kind_name}")
    if not data[list_key]:
        raise ValueError(f"{kind} result: {list_key!r} is empty")
    if any(not isinstance(row, dict) or bad(row, row_fields) for row in data[list_key] if not _not_run(kind, row)):
        raise ValueError(f"{kind} result: each of {list_key!r} needs {list(row_fields)}")
    if kind == "fidelity" and any(len(r["positions"]) != len(r["agreement"]) for r in data["methods"]):
        raise ValueError("fidelity result: 'positions' and 'agreement' differ in length")


def _not_run(kind: str, row: Any) -> bool:
    """A latency row of a run that ran out of memory or was skipped: no timing to check."""
    return kind == "latency" and isinstance(row, dict) and isinstance(row.get("method"), str) and (
        bool(row.get("oom")) or bool(row.get("skipped")))


def collect(paths: list[Path], exclude: Path | None = None) -> Collected:
    """Every result under ``paths`` (recursively), by kind; unusable files go to ``skipped`` with the reason."""
    out = Collected()
    files = []
    for p in paths:
        files += [p] if p.is_file() else sorted(f for f in p.rglob("*.json") if not f.name.startswith("."))
    for f in files:
        if exclude is not None and exclude.resolve() in f.resolve().parents:
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            out.skipped.append(f"{f}: unreadable ({type(e).__name__})")
            continue
        kind = detect(data)
        if kind is None:
            out.skipped.append(f"{f}: not a kvlab result")
            continue
        try:
            _check(kind, data)
        except ValueError as e:
            out.skipped.append(f"{f}: {e}")
            continue
        out.by_kind[kind].append(data)
    return out


def _merge(files: list[dict], key: tuple[str, ...], list_key: str) -> dict[tuple, dict]:
    """Files of one group merged: the first file's fields, rows from all (first row per method wins)."""
    groups: dict[tuple, dict] = {}
    for f in files:
        g = groups.setdefault(tuple(f.get(k) for k in key), {**f, list_key: []})
        seen = {(r["method"], r.get("batch"), r.get("context")) for r in g[list_key]}
        g[list_key] += [r for r in f[list_key] if (r["method"], r.get("batch"), r.get("context")) not in seen]
    return groups


# -- statistics -------------------------------------------------------------------------------


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mcnemar_exact(a: list[int], b: list[int]) -> float:
    """Two-sided exact McNemar p-value of paired binary outcomes."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0


def t_interval(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    if len(a) < 2:
        return math.nan, math.nan
    half = float(sps.t.ppf(0.975, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return float(a.mean()) - half, float(a.mean()) + half


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), by x."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


# -- page blocks ------------------------------------------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]

    def without_empty_columns(self) -> "Table":
        keep = [i for i in range(len(self.headers)) if i == 0 or any(r[i] not in (NA, "") for r in self.rows)]
        return Table([self.headers[i] for i in keep], [[r[i] for i in keep] for r in self.rows])


@dataclass
class Block:
    kind: str  # "h1", "h2", "h3", "p", "list" (one item a line), "table", "plot"
    text: str = ""
    table: Table | None = None


def _f(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return NA
    return format(v, spec)


def _ci(lo: Any, hi: Any, spec: str) -> str:
    return NA if _f(lo, spec) == NA or _f(hi, spec) == NA else f"[{format(lo, spec)}, {format(hi, spec)}]"


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(str(p) for p in parts if p is not None)).strip("-").lower()


# -- perplexity -------------------------------------------------------------------------------

_RUN_KEYS = ("method", "method_params", "seed", "seeds", "methods")


def _run_key(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in _RUN_KEYS}, sort_keys=True, default=str)


def ppl_groups(col: Collected) -> list[tuple[dict, dict]]:
    """(run config, aggregate) per perplexity configuration: from units when any, else the stored aggregate."""
    units: dict[str, dict[str, dict]] = {}
    for u in col.by_kind["ppl_unit"]:
        units.setdefault(_run_key(u["config"]), {}).setdefault(u["config_hash"], u)
    groups = {k: (next(iter(us.values()))["config"], aggregate(list(us.values()))) for k, us in units.items()}
    for k, us in units.items():
        for s in groups[k][1]["methods"]:
            kept = [u["avg_cache_tokens"] for u in us.values()
                    if u["method"] == s["method"] and "avg_cache_tokens" in u]
            s["avg_cache_tokens"] = float(np.mean(kept)) if kept else math.nan
    for agg in col.by_kind["ppl_aggregate"]:
        groups.setdefault(_run_key(agg["config"]), (agg["config"], agg))
    return list(groups.values())


def _ppl_title(c: dict) -> str:
    return (f"{c.get('model')} on {c.get('dataset')}, context {c.get('context_length')} "
            f"(prefill {c.get('prefill')}), chunk {c.get('chunk_size')}, {c.get('dtype')}")


def ppl_table(agg: dict) -> Table:
    paired = {c["method"]: c for c in agg.get("paired_vs_baseline", [])}
    rows_in = agg["methods"]
    front = set(pareto_front_methods(rows_in))
    rows = []
    for s in rows_in:
        c = paired.get(s["method"], {})
        rows.append([
            s["method"], _f(s.get("ppl_mean"), ".3f"), _f(s.get("ppl_std"), ".3f"),
            _f(s.get("rel_to_baseline"), "+.1%"),
            _f(c.get("mean_diff"), "+.4f"), _ci(c.get("ci_low"), c.get("ci_high"), "+.4f"), _f(c.get("p_holm"), ".2g"),
            c.get("stars") or NA,
            _f(s.get("bits_per_value_quantized"), ".3f"), _f(s.get("bits_quantized_nominal"), ".3f"),
            _f(s.get("bits_per_value_all_in_fp16"), ".2f"), _f(s.get("bits_all_in_32k"), ".2f"),
            _f(s.get("avg_cache_tokens"), ".1f"), str(len(s.get("seeds", []))), str(s.get("windows", NA)),
            "yes" if s["method"] in front else "",
        ])
    return Table(["method", "ppl", "std (seeds)", "vs fp16", "d log-ppl", "95% CI", "p (Holm)", "sig",
                  "bits quant. (measured)", "bits quant. (nominal)", "bits all-in (measured)", "bits all-in @32K",
                  "avg kept tokens", "seeds", "windows", "Pareto"], rows).without_empty_columns()


def _ppl_points(rows: list[dict]) -> list[tuple[str, float, float]]:
    pts = [(s["method"], s.get("bits_per_value_all_in_fp16"), s.get("ppl_mean")) for s in rows]
    return [(m, float(b), float(p)) for m, b, p in pts
            if isinstance(b, (int, float)) and isinstance(p, (int, float)) and math.isfinite(b) and math.isfinite(p)]


def pareto_front_methods(rows: list[dict]) -> list[str]:
    pts = _ppl_points(rows)
    return [pts[i][0] for i in pareto_front([(b, p) for _, b, p in pts])]


# -- accuracy, fidelity, latency tables ---------------------------------------------------------


def accuracy_rows(group: dict) -> list[dict]:
    """Accuracy with its interval and the paired test vs the baseline, per method."""
    base_name = group.get("baseline", "fp16")
    base = next((r for r in group["methods"] if r["method"] == base_name), None)
    out = []
    for r in group["methods"]:
        acc = r["correct"] / r["n"] if r["n"] else math.nan
        lo, hi = (r["ci_low"], r["ci_high"]) if "ci_low" in r and "ci_high" in r else wilson(r["correct"], r["n"])
        row = {"method": r["method"], "n": r["n"], "accuracy": acc, "ci_low": lo, "ci_high": hi,
               "diff": math.nan, "diff_low": math.nan, "diff_high": math.nan, "p": math.nan}
        if base is not None and r is not base:
            row["diff"] = acc - base["correct"] / base["n"] if base["n"] else math.nan
            if "outcomes" in r and "outcomes" in base:
                ids = sorted(set(r["outcomes"]) & set(base["outcomes"]))
                a, b = [int(r["outcomes"][i]) for i in ids], [int(base["outcomes"][i]) for i in ids]
                t = paired_test(a, b)
                row.update(diff=t["mean_diff"], diff_low=t["ci_low"], diff_high=t["ci_high"], p=mcnemar_exact(a, b))
            elif r.get("p_value") is not None:
                row["p"] = float(r["p_value"])
        out.append(row)
    _holm_marks(out)
    return out


def _holm_marks(rows: list[dict]) -> None:
    tested = [r for r in rows if math.isfinite(r["p"])]
    for r, p in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"], r["stars"] = p, stars(p)


def accuracy_table(rows: list[dict], baseline: str) -> Table:
    return Table(["method", "n", "accuracy", "95% CI", f"vs {baseline}", "95% CI (paired)", "p (Holm)", "sig"], [
        [r["method"], str(r["n"]), _f(r["accuracy"], ".1%"), _ci(r["ci_low"], r["ci_high"], ".1%"),
         _f(r["diff"], "+.1%"), _ci(r["diff_low"], r["diff_high"], "+.1%"), _f(r.get("p_holm"), ".2g"),
         r.get("stars", NA)] for r in rows]).without_empty_columns()


def fidelity_rows(group: dict) -> list[dict]:
    """Mean agreement per method with its interval, and a paired test vs the most faithful method."""
    out = []
    for r in group["methods"]:
        samples = r.get("per_sample")
        mean = r.get("mean", float(np.mean(samples)) if samples else float(np.mean(r["agreement"])))
        lo, hi = (r["ci_low"], r["ci_high"]) if "ci_low" in r and "ci_high" in r else (
            t_interval(samples) if samples else (math.nan, math.nan))
        out.append({"method": r["method"], "mean": mean, "ci_low": lo, "ci_high": hi, "samples": samples,
                    "n": len(samples) if samples else None, "p": math.nan})
    best = max(out, key=lambda r: r["mean"])
    for r in out:
        if r is not best and r["samples"] and best["samples"] and len(r["samples"]) == len(best["samples"]):
            r["p"] = paired_test(r["samples"], best["samples"])["p_value"]
    _holm_marks(out)
    for r in out:
        r["vs"] = "best" if r is best else r["mean"] - best["mean"]
    return out


def fidelity_table(rows: list[dict]) -> Table:
    return Table(["method", "samples", "mean agreement", "95% CI", "vs best", "p (Holm)", "sig"], [
        [r["method"], str(r["n"] or NA), _f(r["mean"], ".2%"), _ci(r["ci_low"], r["ci_high"], ".2%"),
         r["vs"] if isinstance(r["vs"], str) else _f(r["vs"], "+.2%"), _f(r.get("p_holm"), ".2g"),
         r.get("stars", NA)] for r in rows]).without_empty_columns()


def latency_rows(group: dict) -> list[dict]:
    rows = [{**r, "tokens_per_s": r.get("tokens_per_s", r["batch"] * 1000 / r["ms_per_token"])} for r in group["rows"]
            if not _not_run("latency", r)]
    return sorted(rows, key=lambda r: (r["method"], r["context"], r["batch"]))


def latency_not_run(group: dict) -> str:
    """The runs without timing, one line each: ``method, batch B, context C: out of memory``."""
    return "\n".join(f"{r['method']}, batch {r.get('batch', NA)}, context {r.get('context', NA)}: "
                     + ("out of memory" if r.get("oom") else f"skipped ({r['skipped']})")
                     for r in group["rows"] if _not_run("latency", r))


def latency_table(rows: list[dict]) -> Table:
    return Table(["method", "batch", "context", "ms/token", "std", "tokens/s", "peak MB"], [
        [r["method"], str(r["batch"]), str(r["context"]), _f(r["ms_per_token"], ".2f"),
         _f(r.get("ms_per_token_std"), ".2f"), _f(r["tokens_per_s"], ".1f"), _f(r.get("peak_memory_mb"), ".0f")]
        for r in rows]).without_empty_columns()


# -- the page ---------------------------------------------------------------------------------


def build(col: Collected, plot_dir: Path) -> list[Block]:
    from kvlab import report_plots as plots

    blocks = [Block("h1", "kvlab report")]
    groups = ppl_groups(col)
    if groups:
        blocks.append(Block("h2", "Perplexity"))
        blocks.append(Block("p", "ppl: mean over seeds of exp(mean token NLL); d log-ppl: mean paired difference "
                                 "of log perplexity vs fp16 over the same windows, t interval, paired t-test. "
                                 "Bits per value: quantized part (codes, scales, indices) and all-in (the whole "
                                 "cache, full-precision parts at 16 bits); Pareto: no method has both fewer bits "
                                 "all-in and lower perplexity."))
        for config, agg in groups:
            blocks += [Block("h3", _ppl_title(config)), Block("table", table=ppl_table(agg))]
            stem = _slug("ppl_vs_bits", config.get("model"), config.get("dataset"), config.get("context_length"),
                         config_hash(json.loads(_run_key(config)))[:6])
            name = plots.ppl_vs_bits(_ppl_points(agg["methods"]), pareto_front_methods(agg["methods"]),
                                     _ppl_title(config), plot_dir / stem)
            blocks += [Block("plot", name)] if name else []
    acc = _merge(col.by_kind["accuracy"], ("model", "task"), "methods")
    if acc:
        blocks.append(Block("h2", "Accuracy"))
        blocks.append(Block("p", "95% Wilson interval per method; vs baseline: paired difference over the same "
                                 "problems (t interval) with an exact McNemar test, Holm-corrected per task."))
        per_model: dict[str, list[tuple[str, list[dict]]]] = {}
        for (model, task), g in acc.items():
            rows = accuracy_rows(g)
            blocks += [Block("h3", f"{task} ({model})"),
                       Block("table", table=accuracy_table(rows, g.get("baseline", "fp16")))]
            per_model.setdefault(model, []).append((task, rows))
        for model, tasks in per_model.items():
            blocks.append(Block("plot", plots.accuracy(tasks, f"Accuracy by method ({model})",
                                                       plot_dir / _slug("accuracy", model))))
    fid = _merge(col.by_kind["fidelity"], ("model", "dataset"), "methods")
    if fid:
        blocks.append(Block("h2", "Fidelity"))
        blocks.append(Block("p", "Mean over samples with a 95% t interval; p: paired t-test vs the most faithful "
                                 "method over the same samples, Holm-corrected."))
        for (model, dataset), g in fid.items():
            metric, ref = g.get("metric", "top-1 agreement"), g.get("reference", "fp16")
            blocks += [Block("h3", f"{metric} with {ref}: {model} on {dataset}"),
                       Block("table", table=fidelity_table(fidelity_rows(g))),
                       Block("plot", plots.agreement(g["methods"], f"{metric} with {ref} by position ({model}, "
                                                     f"{dataset})", plot_dir / _slug("agreement", model, dataset)))]
    lat = _merge(col.by_kind["latency"], ("model", "device", "dtype"), "rows")
    if lat:
        blocks.append(Block("h2", "Latency and throughput"))
        for (model, device, dtype), g in lat.items():
            rows = latency_rows(g)
            title = f"{model} on {device}" + (f", {dtype}" if dtype else "")
            blocks += [Block("h3", title)] + ([Block("table", table=latency_table(rows))] if rows else [])
            if not_run := latency_not_run(g):
                blocks += [Block("p", "Not measured:"), Block("list", not_run)]
            for name in (plots.throughput(rows, f"Throughput vs batch ({title})",
                                          plot_dir / _slug("tps_vs_batch", model, device, dtype)),
                         plots.latency(rows, f"Decode latency vs context ({title})",
                                       plot_dir / _slug("ms_vs_context", model, device, dtype))):
                blocks += [Block("plot", name)] if name else []
    if col.skipped:
        blocks += [Block("h2", "Files not used"), Block("list", "\n".join(col.skipped))]
    return blocks


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "list":
            out.append("\n".join(f"- {line}" for line in b.text.splitlines()))
        elif b.kind == "table":
            t = b.table
            cells = [[c.replace("|", "\\|") for c in row] for row in [t.headers] + t.rows]
            out.append("\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(t.headers)]
                                 + ["| " + " | ".join(r) + " |" for r in cells[1:]]))
        elif b.kind == "plot":
            out.append(f"![{b.text}](plots/{b.text}.png)")
    return "\n\n".join(out) + "\n"


HTML_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px}
td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}p{max-width:60em}"""


def render_html(blocks: list[Block]) -> str:
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>kvlab report</title>",
           f"<style>{HTML_STYLE}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "list":
            out.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in b.text.splitlines()) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.table.headers)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.table.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "plot":
            out.append(f"<p><img src='plots/{html.escape(b.text)}.svg' alt='{html.escape(b.text)}'></p>")
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_report(inputs: list[Path], out_dir: Path) -> Collected:
    """Write ``report.md``, ``report.html`` and ``plots/*.png|svg`` under ``out_dir``; raises ValueError
    when no result is found."""
    col = collect(inputs, exclude=out_dir)
    if not col.count():
        raise ValueError(f"no kvlab results found under {', '.join(map(str, inputs))}")
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    blocks = build(col, out_dir / "plots")
    (out_dir / "report.md").write_text(render_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(blocks), encoding="utf-8")
    for s in col.skipped:
        print(f"skipped {s}", file=sys.stderr)
    return col
