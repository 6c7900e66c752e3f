"""``kvlab genbench``: experiment layout, seeds 42.., paired significance tests."""

import json
import math

import pytest

from kvlab.cli import main
from kvlab.commands.genbench import significance_tests


def unit(method: str, seed: int, log_ppls: list[float]) -> dict:
    return {"method": method, "seed": seed,
            "windows": [{"start": 100 * i, "nll_sum": 10 * x, "tokens": 10} for i, x in enumerate(log_ppls)]}


def test_significance_pairs_each_method_with_the_baseline_and_peers_at_the_same_budget():
    units = [unit("dense", 42, [1.0, 2.0, 3.0]), unit("h2o:sparsity=0.5", 42, [1.1, 2.3, 3.2]),
             unit("cab:sparsity=0.5", 42, [1.05, 2.1, 3.1]), unit("h2o:sparsity=0.9", 42, [2.0, 3.0, 4.5])]
    groups = {"s0.5": ["h2o:sparsity=0.5", "cab:sparsity=0.5"], "s0.9": ["h2o:sparsity=0.9"]}
    tests = significance_tests(units, "dense", groups)
    pairs = {(t["method"], t["versus"]) for t in tests}
    assert pairs == {("h2o:sparsity=0.5", "dense"), ("cab:sparsity=0.5", "dense"), ("h2o:sparsity=0.9", "dense"),
                     ("h2o:sparsity=0.5", "cab:sparsity=0.5")}
    peer = next(t for t in tests if t["versus"] == "cab:sparsity=0.5")
    assert peer["n"] == 3 and peer["mean_diff"] == pytest.approx((0.05 + 0.2 + 0.1) / 3)
    assert peer["ppl_ratio"] == pytest.approx(math.exp(peer["mean_diff"]))
    raw = sorted(t["p_value"] for t in tests)
    assert min(t["p_holm"] for t in tests) == pytest.approx(min(1.0, 4 * raw[0]))  # Holm over all 4 tests
    assert all(t["p_holm"] >= t["p_value"] for t in tests)


def test_genbench_refuses_seeds_and_output_dir(tmp_path, capsys):
    assert main(["genbench", "--seeds", "0", "--output-root", str(tmp_path)]) == 2
    assert "--num-runs" in capsys.readouterr().err
    assert main(["genbench", "--num-runs", "0", "--output-root", str(tmp_path)]) == 2
    assert main(["genbench", "--experiment-name", "../x", "--output-root", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_genbench_end_to_end_layout(tmp_path, capsys):
    args = ["genbench", "--methods", "dense", "h2o", "cab", "--sparsity", "0.5", "--context-length", "48",
            "--prefill", "32", "--num-runs", "2", "--chunk-size", "4", "--output-root", str(tmp_path),
            "--experiment-name", "tiny", "--quiet"]
    assert main(args) == 0
    out = tmp_path / "tiny"
    names = {p.name for p in out.iterdir()}
    assert {"aggregated_results.json", "significance_tests.json", "dense_seed42.json",
            "h2o_s0.5_ctx48_seed42.json", "cab_s0.5_ctx48_seed43.json"} <= names
    sig = json.loads((out / "significance_tests.json").read_text())
    assert sig["baseline"] == "dense" and "Holm" in sig["correction"]
    assert {(t["method"], t["versus"]) for t in sig["tests"]} == {
        ("h2o:sparsity=0.5", "dense"), ("cab:sparsity=0.5", "dense"), ("h2o:sparsity=0.5", "cab:sparsity=0.5")}
    assert all(t["n"] == 2 for t in sig["tests"])  # one window per run, seeds 42 and 43
    printed = capsys.readouterr().out
    assert "h2o:sparsity=0.5 vs dense" in printed
    agg = json.loads((out / "aggregated_results.json").read_text())
    kept = {m["method"]: m["final_cache_tokens"] for m in agg["methods"]}
    assert kept["h2o:sparsity=0.5"] < kept["dense"]
