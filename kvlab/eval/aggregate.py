"""Aggregation of per-(method, seed) perplexity units: mean/std over seeds, paired tests vs fp16."""

from __future__ import annotations

import numpy as np

from kvlab.eval.stats import holm, mean_std, paired_test, stars


def window_log_ppl(units: list[dict], method: str) -> dict[tuple[int, int], float]:
    """Mean token NLL of every window of ``method``'s units, keyed by (seed, window start)."""
    return {(u["seed"], w["start"]): w["nll_sum"] / w["tokens"] for u in units if u["method"] == method
            for w in u["windows"]}


def aggregate(units: list[dict], baseline: str = "fp16") -> dict:
    """Summaries per method and paired comparisons of every method with ``baseline`` over the same windows.

    The paired test is a t-test over windows of the difference in mean token NLL (log perplexity);
    p-values are Holm-corrected over the methods compared.
    """
    by_method: dict[str, list[dict]] = {}
    for u in units:
        by_method.setdefault(u["method"], []).append(u)
    summary = {}
    for method, us in by_method.items():
        ppl_mean, ppl_std = mean_std([u["ppl"] for u in us])
        summary[method] = {
            "method": method,
            "ppl_mean": ppl_mean,
            "ppl_std": ppl_std,
            "seeds": sorted(u["seed"] for u in us),
            "windows": sum(len(u["windows"]) for u in us),
            "tokens_scored": sum(u["tokens_scored"] for u in us),
            **{k: float(np.mean([u[k] for u in us])) for k in (
                "bits_per_value_quantized", "bits_per_value_all_in", "bits_per_value_all_in_fp16",
                "cache_bytes", "tokens_per_s")},
            **{k: us[0][k] for k in ("bits_quantized_nominal", "bits_all_in_32k") if k in us[0]},
        }
    comparisons = []
    if baseline in by_method:
        base = window_log_ppl(units, baseline)
        for method in by_method:
            if method == baseline:
                continue
            cur = window_log_ppl(units, method)
            keys = sorted(set(cur) & set(base))
            test = paired_test([cur[k] for k in keys], [base[k] for k in keys])
            comparisons.append({"method": method, "baseline": baseline, **test,
                                "ppl_ratio": float(np.exp(test["mean_diff"]))})
        for c, p in zip(comparisons, holm([c["p_value"] for c in comparisons])):
            c["p_holm"] = p
            c["stars"] = stars(p)
        for c in comparisons:
            summary[c["method"]]["rel_to_baseline"] = summary[c["method"]]["ppl_mean"] / summary[baseline]["ppl_mean"] - 1
    return {"methods": list(summary.values()), "baseline": baseline, "paired_vs_baseline": comparisons,
            "correction": "Holm-Bonferroni over the methods compared with the baseline"}
