"""Trustworthy runs: per-window persistence and resume, validation before loading, parser fuzzing."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlab import data
from kvlab.cli import main
from kvlab.eval.ppl import PplConfig, run_unit
from kvlab.methods import PRESETS, REGISTRY, parse_method
from kvlab.methods.fp16 import FP16
from kvlab.results import PartialLog, partial_path

# -- PartialLog -------------------------------------------------------------------------------


def test_partial_log_drops_torn_lines_other_configs_and_duplicates(tmp_path):
    path = tmp_path / "u.partial.jsonl"
    log = PartialLog(path, "h1")
    log.append({"start": 0, "nll_sum": 1.5})
    log.append({"start": 48, "nll_sum": float("nan")})
    with open(path, "a") as f:
        f.write(json.dumps({"config_hash": "h1", "start": 0, "nll_sum": 9.0}) + "\n")  # duplicate
        f.write(json.dumps({"config_hash": "other", "start": 96, "nll_sum": 2.0}) + "\n")  # another config
        f.write('{"config_hash": "h1", "start": 144, "nll_')  # torn by a crash mid-write
    again = PartialLog(path, "h1")
    assert list(again.records) == [0, 48] and again.records[0]["nll_sum"] == 1.5
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["config_hash"] == "h1" for line in lines)  # compacted
    again.append({"start": 96, "nll_sum": 3.0})
    assert list(PartialLog(path, "h1").records) == [0, 48, 96]
    assert PartialLog(path, "changed").records == {} and not path.exists()  # a config change starts over


def test_partial_path_sits_next_to_the_unit(tmp_path):
    assert partial_path(tmp_path / "kivi-2_seed0.json") == tmp_path / "kivi-2_seed0.partial.jsonl"


class Interrupt(Exception):
    pass


def test_resumed_unit_equals_uninterrupted_run(tiny_model, tmp_path):
    token_ids = torch.randint(3, 128, (24 * 6,), generator=torch.Generator().manual_seed(0))
    cfg = PplConfig("tiny", "random", context_length=24, prefill=16, num_samples=3, chunk_size=3)
    method = parse_method("kivi-2:group_size=8,residual=8")
    full = run_unit(tiny_model, token_ids, cfg, method, seed=1)

    log = PartialLog(tmp_path / "u.partial.jsonl", "h")

    def crash_after_first(window: dict) -> None:
        log.append(window)
        raise Interrupt

    with pytest.raises(Interrupt):
        run_unit(tiny_model, token_ids, cfg, method, seed=1, on_window=crash_after_first)
    resumed_log = PartialLog(tmp_path / "u.partial.jsonl", "h")
    (first,) = resumed_log.records.values()
    computed = []
    resumed = run_unit(tiny_model, token_ids, cfg, method, seed=1, done=resumed_log.records, on_window=computed.append)
    assert [w["start"] for w in computed] == [w["start"] for w in full["windows"] if w["start"] != first["start"]]
    assert resumed["windows"][[w["start"] for w in resumed["windows"]].index(first["start"])] == first  # reused
    assert resumed["ppl"] == full["ppl"]
    assert [w["nll_sum"] for w in resumed["windows"]] == [w["nll_sum"] for w in full["windows"]]


def _ppl_args(out, windows: int = 4) -> list[str]:
    return ["ppl", "--context-length", "48", "--prefill", "40", "--num-samples", str(windows), "--seeds", "0",
            "--methods", "fp16", "--output-dir", str(out), "--quiet", "--threads", "1"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_sigkill_mid_unit_then_rerun_resumes_without_duplicates(tmp_path, capsys, restore_threads):
    out = tmp_path / "killed"
    partial = out / "fp16_seed0.partial.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", *_ppl_args(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = {r["start"]: r for r in map(json.loads, partial.read_text().splitlines())}
    assert 1 <= len(before) < 4 and not (out / "fp16_seed0.json").exists()

    assert main(_ppl_args(out)) == 0  # the rerun, in this process to save a second start-up
    assert f"({len(before)} of their windows already done)" in capsys.readouterr().err
    assert not partial.exists()
    unit = json.loads((out / "fp16_seed0.json").read_text())
    starts = [w["start"] for w in unit["windows"]]
    assert len(starts) == len(set(starts)) == 4
    for w in unit["windows"]:  # finished windows were reused as recorded, not recomputed
        if w["start"] in before:
            assert w == {k: v for k, v in before[w["start"]].items() if k != "config_hash"}

    assert main(_ppl_args(tmp_path / "fresh")) == 0
    ref = json.loads((tmp_path / "fresh" / "fp16_seed0.json").read_text())
    assert unit["ppl"] == ref["ppl"]
    assert [w["nll_sum"] for w in unit["windows"]] == [w["nll_sum"] for w in ref["windows"]]
    agg = json.loads((out / "aggregated_results.json").read_text())
    assert agg["methods"][0]["ppl_mean"] == ref["ppl"] and agg["methods"][0]["windows"] == 4


# -- validation before loading ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "h2o", "--sparsity", "1.0"], "--sparsity 1.0 must be in [0, 1)"),
        (["--methods", "h2o", "--sparsity", "0.5", "-0.1"], "--sparsity -0.1 must be in [0, 1)"),
        (["--seeds", "0", "0"], "seeds must be distinct and non-negative"),
        (["--seeds", "-1"], "seeds must be distinct and non-negative"),
        (["--threads", "-2"], "--threads -2 must be >= 0"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device"),
        (["--device", "meta"], "kvlab runs on cpu or cuda[:N]"),
        (["--budget", "0", "--methods", "h2o"], "--budget 0 must be at least 1"),
        (["--num-samples", "0"], "--num-samples 0 must be at least 1"),
        (["--chunk-size", "0"], "--chunk-size 0 must be at least 1"),
    ],
)
def test_ppl_options_rejected_before_loading(tmp_path, capsys, args, message):
    assert main(["ppl", "--output-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["ppl", "--device", "cuda", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "kvlab ppl: error: --device cuda: CUDA is not available on this machine; use --device cpu"


def test_gpu_only_method_on_cpu_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(FP16, "requires_cuda", True, raising=False)
    assert main(["ppl", "--methods", "fp16", "kivi-2", "--output-dir", str(tmp_path / "out")]) == 2
    assert "fp16 run(s) on CUDA only; use --device cuda" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_rejected(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["ppl", "--output-dir", str(tmp_path / "f")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


# -- parser fuzzing ---------------------------------------------------------------------------

FIELDS = sorted({f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls)})
VALUES = st.one_of(
    st.integers(-(10**6), 10**20).map(str),
    st.floats().map(repr),
    st.sampled_from(["true", "no", "nan", "-inf", "1e400", "0x10", "1_000", "", " ", "\u0661\u0662"]),
    st.text(max_size=6),
)
PARAMS = st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=5), VALUES).map("=".join), max_size=3)
SINGLE = st.builds(lambda name, ps: name + (":" + ",".join(ps) if ps else ""),
                   st.sampled_from(sorted(PRESETS)) | st.text(max_size=6), PARAMS)
SPECS = st.one_of(SINGLE, st.tuples(SINGLE, SINGLE).map("+".join), st.text(max_size=30))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPECS)
def test_parse_method_raises_only_value_error_and_round_trips_label(spec):
    try:
        method = parse_method(spec)
    except ValueError as e:
        assert str(e)
        return
    again = parse_method(method.label)
    assert again.label == method.label and type(again) is type(method)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=64), st.text(max_size=32).map(lambda t: t.encode("utf-16")),
                         st.sampled_from([b"", b"   \n\t", b"\xff\xfe\xfa", b"caf\xe9", b"\x00" * 8])))
def test_data_files_load_or_fail_with_a_clear_value_error(tmp_path, content):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    try:
        text = data.load_text(str(path))
    except ValueError as e:
        assert str(path) in str(e) and ("cannot read" in str(e) or "is empty" in str(e))
        return
    assert isinstance(text, str) and text.strip()


def test_unreadable_data_file_is_a_value_error(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("some text")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anyway
        pytest.skip("running as root")
    with pytest.raises(ValueError, match="cannot read data file"):
        data.load_text(str(path))
