"""``kvlab genbench``: the generation benchmark of eviction (and quantization) methods.

The cache-in-the-loop perplexity of ``kvlab ppl`` (prefill, then token by token through the
evicting cache), laid out as the reference eviction benchmark lays out its experiments::

    results/generation/<experiment_name>/
      aggregated_results.json      # mean/std per method x sparsity x context
      significance_tests.json      # paired tests over the same windows
      <method>_s<sparsity>_ctx<len>_seed<seed>.json

Runs use seeds 42, 43, ... (``--num-runs``), each drawing its own windows. Every method is
compared with the dense baseline, and the eviction methods with each other at the same budget,
by a paired t-test over the same windows (per-window mean token NLL); p-values are
Holm-Bonferroni corrected over all tests of the experiment.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

FIRST_SEED = 42
DEFAULT_METHODS = ["dense", "streamingllm", "h2o", "cab", "snapkv"]
CORRECTION = "Holm-Bonferroni over all tests of the experiment"


def significance_tests(units: list[dict], baseline: str, groups: dict[str, list[str]]) -> list[dict]:
    """Paired tests: every method against ``baseline``; within each budget group, every pair.

    ``groups`` maps a budget tag (``s0.5``, ``b256``) to the labels of the methods run at it.
    """
    from kvlab.eval.aggregate import window_log_ppl
    from kvlab.eval.stats import holm, paired_test, stars

    pairs = [(m, baseline, tag) for tag, labels in groups.items() for m in labels]
    pairs += [(a, b, tag) for tag, labels in groups.items() for a, b in itertools.combinations(labels, 2)]
    tests = []
    for a, b, tag in pairs:
        xa, xb = window_log_ppl(units, a), window_log_ppl(units, b)
        keys = sorted(set(xa) & set(xb))
        t = paired_test([xa[k] for k in keys], [xb[k] for k in keys])
        tests.append({"method": a, "versus": b, "budget": tag, **t, "ppl_ratio": float(np.exp(t["mean_diff"]))})
    for t, p in zip(tests, holm([t["p_value"] for t in tests])):
        t["p_holm"], t["stars"] = p, stars(p)
    return tests


def cmd_genbench(args: argparse.Namespace) -> int:
    from kvlab.cli import UsageError, _methods, _with_budgets, print_ppl_summary, run_ppl
    from kvlab.results import write_json

    if args.seeds is not None or args.output_dir is not None:
        raise UsageError("genbench takes its seeds from --num-runs and its folder from --output-root/--experiment-name")
    if args.num_runs < 1:
        raise UsageError(f"--num-runs {args.num_runs} must be at least 1")
    if not args.experiment_name or Path(args.experiment_name).name != args.experiment_name:
        raise UsageError(f"--experiment-name {args.experiment_name!r} must be a plain folder name")
    args.seeds = list(range(FIRST_SEED, FIRST_SEED + args.num_runs))
    args.output_dir = str(Path(args.output_root) / args.experiment_name)
    units, agg = run_ppl(args)
    groups: dict[str, list[str]] = {}
    for m in _with_budgets(_methods(args.methods), args.sparsity, args.budget):
        if hasattr(m, "budget_tag"):
            groups.setdefault(m.budget_tag, []).append(m.label)
    tests = significance_tests(units, agg["baseline"], groups) if agg["baseline"] in {u["method"] for u in units} else []
    write_json(Path(args.output_dir) / "significance_tests.json",
               {"baseline": agg["baseline"], "correction": CORRECTION, "unit": "window (mean token NLL)",
                "tests": tests})
    print_ppl_summary(agg)
    if tests:
        print(f"\nSignificance (paired t-test over the same windows; {CORRECTION}):")
        for t in tests:
            print(f"  {t['method']} vs {t['versus']}: ppl ratio {t['ppl_ratio']:.4f}, d log-ppl {t['mean_diff']:+.4f} "
                  f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}], n={t['n']}, p={t['p_holm']:.2g} {t['stars']}")
    print(f"\nresults: {args.output_dir}/", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    from kvlab.cli import add_ppl_arguments

    p = subparsers.add_parser("genbench", help="eviction benchmark: ppl per method x sparsity x seed, paired tests")
    add_ppl_arguments(p)
    p.add_argument("--experiment-name", default="default", help="results go to <output-root>/<experiment-name>/")
    p.add_argument("--output-root", default="results/generation")
    p.add_argument("--num-runs", type=int, default=3, help=f"runs with seeds {FIRST_SEED}, {FIRST_SEED + 1}, ...")
    p.set_defaults(func=cmd_genbench, methods=DEFAULT_METHODS, sparsity=[0.5, 0.7, 0.9], context_length=2048,
                   prefill=1024, num_samples=1, seeds=None, output_dir=None)
