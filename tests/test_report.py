"""``kvlab report`` on hand-made result folders of every kind (tests/fixtures/report)."""

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
from scipy import stats

from kvlab.cli import main
from kvlab.eval.stats import holm
from kvlab.report import collect, detect, mcnemar_exact, pareto_front, wilson

FIXTURES = Path(__file__).parent / "fixtures" / "report"


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Each Markdown table under the heading just before it, as rows keyed by column header."""
    out, heading, lines = {}, None, markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("# ")
        elif line.startswith("| ") and (i == 0 or not lines[i - 1].startswith("|")):
            block = list(itertools.takewhile(lambda r: r.startswith("|"), lines[i:]))
            split = [[c.strip() for c in r.strip("|").split(" | ")] for r in block]
            out[heading] = [dict(zip(split[0], r)) for r in split[2:]]
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(FIXTURES), "-o", str(out)]) == 0
    return out, (out / "report.md").read_text(), (out / "report.html").read_text()


def _by_method(rows: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in rows}


def test_perplexity_tables_from_units_and_from_an_aggregate(report):
    _, md, _ = report
    t = tables(md)
    core = _by_method(t["smollm2-135m on wikitext2, context 512 (prefill 256), chunk 1, float32"])
    units = [json.loads(p.read_text()) for p in (FIXTURES / "runs/core_ppl").glob("fp16_seed*.json")]
    expected = sum(math.exp(sum(w["nll_sum"] for w in u["windows"]) / u["tokens_scored"]) for u in units) / 2
    assert core["fp16"]["ppl"] == f"{expected:.3f}"
    assert core["kivi-2"]["bits quant. (measured)"] == "2.374" and core["kivi-2"]["bits all-in @32K"] == "2.43"
    assert core["kivi-2"]["sig"] == "***" and core["kivi-2"]["d log-ppl"] == "+0.3040"
    assert core["h2o:sparsity=0.9"]["avg kept tokens"] == "51.1"
    assert {m for m, r in core.items() if r["Pareto"] == "yes"} == {"fp16", "kitty-pro", "h2o:sparsity=0.5",
                                                                     "h2o:sparsity=0.9"}
    old = _by_method(t["smollm2-135m on wikitext2, context 256 (prefill 128), chunk 1, float32"])
    assert old["hf-quanto-2"]["ppl"] == "79.590" and old["kivi-2"]["vs fp16"] == "+37.1%"
    assert "95% CI" not in old["kivi-2"]  # one window: no interval, so the column is left out


def test_accuracy_tables_merge_files_and_mark_significance(report):
    _, md, _ = report
    t = tables(md)
    gsm = _by_method(t["gsm8k (qwen3-8b)"])
    assert set(gsm) == {"fp16", "kivi-2", "kitty-pro"}  # two files merged
    files = [json.loads((FIXTURES / f"evals/gsm8k_{x}.json").read_text()) for x in "ab"]
    rows = {r["method"]: r for f in files for r in f["methods"]}
    ids = sorted(rows["fp16"]["outcomes"])
    base = [rows["fp16"]["outcomes"][i] for i in ids]
    p = [mcnemar_exact([rows[m]["outcomes"][i] for i in ids], base) for m in ("kivi-2", "kitty-pro")]
    assert gsm["kivi-2"]["p (Holm)"] == f"{holm(p)[0]:.2g}" and gsm["kitty-pro"]["p (Holm)"] == f"{holm(p)[1]:.2g}"
    assert gsm["kivi-2"]["sig"] == "**" and gsm["kitty-pro"]["sig"] == "ns"
    aime = _by_method(t["aime24 (qwen3-8b)"])
    assert aime["fp16"]["95% CI"] == "[16.7%, 47.9%]"  # Wilson, 9/30
    assert aime["kivi-2"]["p (Holm)"] == "0.062" and aime["kivi-2"]["vs fp16"] == "-16.7%"


def test_fidelity_and_latency_tables(report):
    _, md, _ = report
    t = tables(md)
    fid = _by_method(t["top-1 agreement with fp16: qwen3-8b on wikitext2"])
    assert fid["kivi-4"]["vs best"] == "best" and fid["kivi-2"]["sig"] == "***"
    assert fid["kivi-2"]["samples"] == "8" and fid["kivi-2"]["95% CI"].startswith("[")
    lat = t["llama-3.1-8b on NVIDIA H100, bfloat16"]
    assert len(lat) == 36
    row = next(r for r in lat if r["method"] == "kivi-2" and r["batch"] == "16" and r["context"] == "4096")
    assert float(row["tokens/s"]) == pytest.approx(16 * 1000 / float(row["ms/token"]), rel=1e-3)


def test_plots_exist_and_are_not_trivial(report):
    out, md, html = report
    stems = ["accuracy-qwen3-8b", "agreement-qwen3-8b-wikitext2", "tps-vs-batch-llama-3-1-8b-nvidia-h100-bfloat16",
             "ms-vs-context-llama-3-1-8b-nvidia-h100-bfloat16"]
    stems += [p.stem for p in (out / "plots").glob("ppl-vs-bits-*.png")]
    assert len(stems) == 6
    for stem in stems:
        png, svg = out / "plots" / f"{stem}.png", out / "plots" / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        assert "<svg" in svg.read_text() and svg.stat().st_size > 8_000
        assert f"plots/{stem}.png" in md and f"plots/{stem}.svg" in html


def test_unusable_files_are_listed_not_fatal(report):
    _, md, html = report
    skipped = md.split("## Files not used", 1)[1]
    assert "broken.json: unreadable" in skipped and "notes.json: not a kvlab result" in skipped
    assert "bad_kind.json: accuracy result: field 'task' missing or not a str" in skipped
    assert "<ul><li>" in html and html.count("<table>") == md.count("\n|---")


def test_sections_without_data_are_left_out(tmp_path):
    shutil.copytree(FIXTURES / "fidelity", tmp_path / "in")
    assert main(["report", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Fidelity" in md
    assert not any(s in md for s in ("## Perplexity", "## Accuracy", "## Latency", "## Files not used"))
    assert sorted(p.name for p in (tmp_path / "out" / "plots").iterdir()) == [
        "agreement-qwen3-8b-wikitext2.png", "agreement-qwen3-8b-wikitext2.svg"]


def test_report_input_errors_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "no kvlab results found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_detect_and_statistics_helpers():
    assert detect({"kind": "latency"}) == "latency" and detect({"kind": "other"}) is None and detect([1]) is None
    assert detect(json.loads((FIXTURES / "runs/old_ppl/aggregated_results.json").read_text())) == "ppl_aggregate"
    lo, hi = wilson(9, 30)
    assert (round(lo, 4), round(hi, 4)) == (0.1666, 0.4788)
    assert mcnemar_exact([1, 1, 1, 0], [0, 0, 0, 0]) == pytest.approx(stats.binomtest(3, 3).pvalue)
    assert pareto_front([(16, 10.0), (2, 30.0), (4, 12.0), (8, 12.5), (3, 40.0)]) == [1, 2, 0]


def test_malformed_units_are_skipped_with_the_reason(tmp_path):
    unit = json.loads((FIXTURES / "runs/core_ppl/kivi-2_seed0.json").read_text())
    del unit["tokens_per_s"]
    (tmp_path / "old_seed0.json").write_text(json.dumps(unit))
    unit["windows"][0]["tokens"] = "255"
    unit["tokens_per_s"] = 1.0
    (tmp_path / "typo_seed0.json").write_text(json.dumps(unit))
    col = collect([tmp_path])
    assert col.count() == 0 and [s.split(": ", 1)[1] for s in col.skipped] == [
        "ppl_unit result: field 'tokens_per_s' missing or not a number",
        "ppl_unit result: each of 'windows' needs ['start', 'nll_sum', 'tokens']"]
