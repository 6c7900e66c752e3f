"""The command line end to end on a tiny slice of the real model, and its input validation."""

import json
import os
import subprocess
import sys

import pytest

from kvlab.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvlab.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "kivi-3"], "unknown method 'kivi-3'"),
        (["--methods", "kivi-2:group_size=12"], "group_size=12 must be a positive multiple of 8"),
        (["--methods", "kivi-2:group_size=48"], "do not tile head_dim=64"),
        (["--prefill", "1024"], "--prefill 1024 must be in [1, context length 1024)"),
        (["--context-length", "100000"], "exceeds the model's maximum of 8192"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--dataset", "pg19", "--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a directory"),
        (["--methods", "fp16", "dense", "fp16"], "duplicate methods"),
    ],
)
def test_ppl_rejects_bad_input_before_loading(tmp_path, capsys, args, message):
    assert main(["ppl", "--output-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_malformed_kernel_override_is_one_line_not_an_import_error(tmp_path):
    """A bad KVLAB_* launch override used to raise at ``import kvlab``, a traceback before the command line ran."""
    bad = {"KVLAB_LEAN_TILE": "sixty-four", "KVLAB_DATA_DIR": "/nonexistent"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVLAB_")} | bad
    imported = subprocess.run([sys.executable, "-c", "import kvlab"], capture_output=True, text=True, env=env)
    assert imported.returncode == 0, imported.stderr
    cli = subprocess.run([sys.executable, "-m", "kvlab.cli", "ppl", "--output-dir", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 2
    assert cli.stderr.strip() == ("kvlab ppl: error: KVLAB_LEAN_TILE='sixty-four': kvlab's kernel tuning overrides "
                                  "take an integer")
    assert not (tmp_path / "o").exists()


def test_empty_data_file_is_rejected(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["ppl", "--dataset", str(empty), "--output-dir", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_methods_lists_presets_with_bits(capsys):
    assert main(["methods", "--head-dim", "64", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"fp16", "kivi-2", "kivi-4", "kivi*-2", "kitty-pro"} <= set(rows)
    assert rows["kivi-2"]["bits"] == pytest.approx(2.375)  # keys 2 + 32/128, values 2 + 32/64
    assert rows["kitty-pro"]["bits"] == pytest.approx(2.375 + 12 * (2 + 16 / 128) / 64 / 2)


@pytest.mark.slow
def test_ppl_end_to_end_resumes_and_is_deterministic(tmp_path):
    out = tmp_path / "ppl"
    args = ["ppl", "--context-length", "48", "--prefill", "40", "--num-samples", "2", "--seeds", "0", "1",
            "--methods", "fp16", "kivi-2:group_size=8,residual=8", "--chunk-size", "4", "--output-dir", str(out),
            "--quiet"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    agg = json.loads((out / "aggregated_results.json").read_text())
    rows = {m["method"]: m for m in agg["methods"]}
    assert set(rows) == {"fp16", "kivi-2:group_size=8,residual=8"}
    assert rows["fp16"]["tokens_scored"] == 2 * 2 * 8
    assert 1 < rows["fp16"]["ppl_mean"] < rows["kivi-2:group_size=8,residual=8"]["ppl_mean"] < 1000
    unit = json.loads((out / "kivi-2_group_size=8_residual=8_seed1.json").read_text())
    assert unit["config"]["chunk_size"] == 4 and len(unit["windows"]) == 2
    assert agg["paired_vs_baseline"][0]["n"] == 4
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*_seed*.json")}
    again = run(*args)
    assert again.returncode == 0 and "4 finished units found" in again.stderr
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("*_seed*.json")}
    fresh = run(*args[:-3], "--output-dir", str(tmp_path / "fresh"), "--quiet")
    assert fresh.returncode == 0, fresh.stderr
    rerun = json.loads((tmp_path / "fresh" / "aggregated_results.json").read_text())["methods"]
    assert [m["ppl_mean"] for m in rerun] == [m["ppl_mean"] for m in agg["methods"]]  # bit-identical


@pytest.mark.parametrize("args,message", [
    (["hi", "--method", "nope"], "unknown method 'nope'"),
    (["hi", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    (["hi", "--model", "random:tiny-llama"], "has no tokenizer"),
    (["", "--method", "fp16"], "the prompt is empty"),
])
def test_generate_rejects_bad_input(capsys, args, message):
    assert main(["generate", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_generate_prints_what_kvlab_generate_returns(smollm2, capsys):
    """The command's text is kvlab.generate's greedy continuation of the chat-formatted prompt, decoded."""
    import kvlab

    assert main(["generate", "What is 2+3?", "--method", "kivi-2", "--max-new-tokens", "12", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    model, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = kvlab.generate(model, ids, "kivi-2", max_new_tokens=12, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id or 0)
    assert row["text"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) and row["text"].strip()
    assert row["method"] == "kivi-2" and row["prompt_tokens"] == ids.shape[1] and 1 <= row["new_tokens"] <= 12
