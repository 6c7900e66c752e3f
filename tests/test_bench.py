"""``kvlab bench latency`` on CPU with a tiny random Llama: rows, numbers, plots, report, validation."""

import json

import pytest
import torch

from kvlab.bench import latency as lat
from kvlab.cli import main

torch.set_num_threads(1)

KIVI = "kivi-2:group_size=16,residual=16"
TINY = ["bench", "latency", "--model", "random:tiny-llama", "--device", "cpu", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = TINY + ["--methods", "fp16", KIVI, "--batch-sizes", "1", "2", "--context-lengths", "32", "64",
                   "--gen-len", "6", "--warmup", "2", "--output-dir", str(out)]
    assert main(args) == 0
    return out, json.loads((out / "latency.json").read_text())


def test_one_measured_row_per_method_batch_and_context(bench):
    _, res = bench
    assert res["kind"] == "latency" and res["model"] == "random:tiny-llama"
    assert res["device"] == "cpu" and res["dtype"] == "float32"
    assert res["torch"] == torch.__version__ and res["transformers"] and res["date"]
    rows = res["rows"]
    assert sorted((r["method"], r["batch"], r["context"]) for r in rows) == sorted(
        (m, b, c) for m in ("fp16", KIVI) for b in (1, 2) for c in (32, 64))
    for r in rows:
        assert r["prefill_ms"] > 0 and r["ms_per_token"] > 0 and r["ms_per_token_std"] >= 0
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["ms_per_token"])
        assert r["peak_memory_mb"] is None  # CPU
        assert r["gen_len"] == 6 and r["warmup"] == 2


def test_prefill_rows_are_recorded_and_shown(tmp_path, capsys):
    args = TINY + ["--methods", KIVI, "--batch-sizes", "3", "--context-lengths", "32", "--gen-len", "4",
                   "--warmup", "1", "--prefill-rows", "1", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    res = json.loads((tmp_path / "latency.json").read_text())
    assert res["config"]["prefill_rows"] == 1
    (row,) = res["rows"]
    assert (row["batch"], row["prefill_rows"]) == (3, 1) and row["ms_per_token"] > 0
    assert "prefill: 1 row repeated" in capsys.readouterr().out


def test_cache_sizes_are_measured(bench):
    _, res = bench
    row = {(r["method"], r["batch"], r["context"]): r for r in res["rows"]}
    for b in (1, 2):
        for c in (32, 64):
            # tiny-llama: 2 layers x (K, V) x 2 KV heads x head_dim 32, float32, context + gen-len tokens
            assert row["fp16", b, c]["cache_bytes"] == 2 * 2 * b * 2 * 32 * (c + 6) * 4
            assert row["fp16", b, c]["bits_per_value_all_in"] == pytest.approx(32)
        kivi, fp16 = row[KIVI, b, 64], row["fp16", b, 64]
        assert kivi["cache_bytes"] < fp16["cache_bytes"]  # 64 tokens > residual 16: most of it is 2-bit
        # 2-bit codes + fp16 scale and zero per 16 values: 4 bits nominal (a bit more: preallocated storage)
        assert kivi["bits_per_value_all_in"] < 16 and 4 <= kivi["bits_per_value_quantized"] < 6


def test_plots(bench):
    out, _ = bench
    for stem in ("latency_tps_vs_batch", "latency_ms_vs_context"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / f"{stem}.svg").read_text()


def test_kvlab_report_reads_the_result_and_lists_oom_rows(bench, tmp_path):
    _, res = bench
    oom = {"method": "fp16", "batch": 4096, "context": 64, "oom": True, "error": "CUDA out of memory"}
    res = {**res, "rows": res["rows"] + [oom]}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "latency.json").write_text(json.dumps(res))
    assert main(["report", str(tmp_path / "in"), "-o", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## Latency and throughput", 1)[1]
    assert "### random:tiny-llama on cpu, float32" in section
    assert section.count(f"| {KIVI} |") == 4 and section.count("| fp16 |") == 4
    assert "fp16, batch 4096, context 64: out of memory" in section and "Files not used" not in md
    assert list((tmp_path / "rep" / "plots").glob("tps-vs-batch-*.png"))


def test_hf_baselines_on_cpu(tmp_path, capsys):
    args = TINY + ["--methods", "fp16", "--batch-sizes", "2", "--context-lengths", "24", "--gen-len", "3",
                   "--warmup", "1", "--hf-baselines", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "latency.json").read_text())["rows"]}
    assert list(rows) == ["fp16", "hf-dynamic", "hf-static-compiled", "hf-quanto-2", "hf-quanto-4"]
    assert rows["hf-dynamic"]["ms_per_token"] > 0
    assert rows["hf-dynamic"]["cache_bytes"] == rows["fp16"]["cache_bytes"]  # same dense tensors
    assert "CUDA only" in rows["hf-static-compiled"]["skipped"] and "ms_per_token" not in rows["hf-static-compiled"]
    for bits in (2, 4):
        r = rows[f"hf-quanto-{bits}"]
        assert r.get("ms_per_token", 0) > 0 or "optimum.quanto" in r.get("skipped", "")
    table = capsys.readouterr().out
    assert "tokens/s" in table and "hf-static-compiled: torch.compile" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("hf-dynamic "))
    assert f"{rows['hf-dynamic']['tokens_per_s']:.1f}" in line


def test_hf_baselines_by_name(tmp_path):
    args = TINY + ["--methods", "fp16", "--batch-sizes", "1", "--context-lengths", "16", "--gen-len", "3",
                   "--warmup", "1", "--hf-baselines", "hf-dynamic", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp16", "hf-dynamic"]


@pytest.mark.parametrize("extra, message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--batch-sizes", "1", "0"], "--batch-sizes 1 0"),
    (["--context-lengths", "0"], "--context-lengths 0"),
    (["--gen-len", "0"], "--gen-len 0"),
    (["--prefill-chunk", "0"], "--prefill-chunk 0 must be at least 1"),
    (["--prefill-rows", "0"], "--prefill-rows 0 must be at least 1"),
    (["--gen-len", "4", "--warmup", "4"], "must exceed --warmup"),
    (["--context-lengths", "4096", "--gen-len", "16"], "exceeds random:tiny-llama's 4096 positions"),
    (["--find-max-batch"], "--find-max-batch"),
    (["--methods", "hf-quanto-2", "--hf-baselines"], "also a --hf-baselines row"),
    (["--hf-baselines", "hf-dynamic", "hf-nope"], "--hf-baselines hf-nope: unknown; choose from hf-dynamic,"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--model", "random:nope"], "unknown random model"),
])
def test_usage_errors_exit_2_before_loading(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("kvlab.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    args = TINY + ["--batch-sizes", "1", "--context-lengths", "32", "--gen-len", "8", "--warmup", "2",
                   "--output-dir", str(tmp_path / "out")] + extra
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlab bench: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_out_of_memory_is_a_row_and_larger_batches_are_not_run(tiny_model, monkeypatch):
    calls = []

    def fake(model, case, batch, context, gen_len, warmup, seed=0, prefill=None):
        calls.append((batch, context))
        if batch > 1:
            torch.empty(1)  # a tensor the traceback holds until the row is recorded
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"method": case.label, "batch": batch, "context": context, "ms_per_token": 1.0}

    monkeypatch.setattr(lat, "measure", fake)
    rows = lat.run_grid(tiny_model, [lat.Case("m")], [4, 1, 2], [4096], gen_len=3, warmup=1)
    assert calls == [(1, lat.WARM_CONTEXT), (1, 4096), (2, 4096)]  # untimed warm run: batch 1, short prompt
    assert [(r["batch"], bool(r.get("oom"))) for r in rows] == [(1, False), (2, True), (4, True)]
    assert rows[1]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert rows[2]["error"] == "not run: batch 2 already ran out of memory"
    from kvlab.models import is_oom

    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory")) and not is_oom(ValueError("x"))
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.7 GiB"))


def test_at_max_batch_steps_down_until_the_timed_run_fits(tiny_model, monkeypatch):
    calls = []

    def fake(model, case, batch, context, gen_len, warmup, seed=0, prefill=None):
        calls.append(batch)
        if batch > 30:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return {"method": case.label, "batch": batch, "context": context, "tokens_per_s": 10.0 * batch}

    monkeypatch.setattr(lat, "measure", fake)
    found = [{"method": "a", "context": 4096, "max_batch": 34}, {"method": "b", "context": 4096, "skipped": "x"},
             {"method": "c", "context": 4096, "max_batch": 100}]
    rows = lat.at_max_batch(tiny_model, [lat.Case("a"), lat.Case("b"), lat.Case("c")], found, 4, 1)
    assert calls == [34, 33, 29, 100, 99, 95, 79]  # 1/64 down, then 4x larger steps; four runs at most
    assert [(r["method"], r["batch"], bool(r.get("oom"))) for r in rows] == [("a", 29, False), ("c", 79, True)]
    assert all(r["at_max_batch"] for r in rows)


def test_caches_that_cannot_repeat_rows_are_skipped_not_run(tiny_model, monkeypatch):
    monkeypatch.setattr(lat, "measure", lambda *a, **k: pytest.fail("measured"))
    case = lat.Case("hf-static-compiled", repeatable=False)
    row = lat.run_case(tiny_model, case, 4, 64, 3, 1, prefill=lat.Prefill(rows=1))
    assert row["skipped"].startswith("cannot repeat prefilled rows")
    assert {c.label: c.repeatable for c in lat.hf_cases(torch.device("cpu"))} == {
        "hf-dynamic": True, "hf-static-compiled": False, "hf-quanto-2": False, "hf-quanto-4": False}


def test_tokens_per_second_against_fp16_at_its_own_max_batch():
    from kvlab.commands.bench import _vs_fp16

    rows = [{"method": "fp16", "context": 32768, "batch": 28, "tokens_per_s": 800.0},
            {"method": "kivi-2", "context": 32768, "batch": 112, "tokens_per_s": 2000.0},
            {"method": "kivi-2", "context": 4096, "batch": 300, "tokens_per_s": 9000.0},
            {"method": "kitty-pro", "context": 32768, "batch": 100, "oom": True}]
    got = [(r["method"], r["context"], r["vs_fp16"], r["note"]) for r in _vs_fp16(rows)]
    assert got == [("fp16", 32768, 1.0, ""), ("kivi-2", 32768, 2.5, ""), ("kivi-2", 4096, None, ""),
                   ("kitty-pro", 32768, None, "OOM")]


def test_find_max_batch_starts_at_the_linear_prediction():
    def fits_up_to(n, base=10.0, per=3.0):
        return lambda b: base + per * b if b <= n else None

    # exact prediction: memory for 37 sequences -> probes 1, 2, then 37 fits and 38 does not
    best, probes = lat.find_max_batch(fits_up_to(37), memory=10 + 3 * 37.5)
    assert (best, probes) == (37, [[1, True], [2, True], [37, True], [38, False]])
    # memory overestimated (guess 50): after a failure the midpoint, after a fit the (refined) prediction
    best, probes = lat.find_max_batch(fits_up_to(37), memory=10 + 3 * 50)
    assert best == 37 and [b for b, _ in probes] == [1, 2, 50, 26, 49, 37, 48, 42, 39, 38]
    # memory underestimated (guess 20): walks up by 1, 2, 4, ..., then bisects
    best, probes = lat.find_max_batch(fits_up_to(37), memory=10 + 3 * 20)
    assert best == 37 and [b for b, _ in probes] == [1, 2, 20, 21, 23, 27, 35, 51, 43, 39, 37, 38]

    # batches 1 and 2 understate the slope (as the 2-bit caches' probes did on the H200, by half; here by
    # two thirds): the guess is 3x too large, the first batch that fits after it corrects the slope
    def understated(b):
        return None if b > 170 else (14 + b if b <= 2 else 10 + 3 * b)

    best, probes = lat.find_max_batch(understated, memory=10 + 3 * 170.5)
    assert best == 170 and [b for b, _ in probes] == [1, 2, 507, 254, 128, 170, 171]
    assert lat.find_max_batch(lambda b: None, memory=100) == (0, [[1, False]])
    assert lat.find_max_batch(fits_up_to(1), memory=100) == (1, [[1, True], [2, False]])
    assert lat.find_max_batch(fits_up_to(100), memory=1e9, limit=6) == (6, [[1, True], [2, True], [6, True]])
