"""kvlab eval / fidelity / the lm-eval model: resume, config changes, OOM halving, sharding, metrics, validation.

Fast tests use a tiny random Llama saved with a character-level tokenizer (so every process can
load it by path) and the zero-shot aime24 task on a 4-problem data file (short prompts).
"""

import json
import os
import string

import pytest
import torch

from kvlab.cli import main
from kvlab.eval import fidelity as fid
from kvlab.eval import generation as g
from kvlab.methods import parse_method

KIVI_SMALL = "kivi-2:group_size=8,residual=8"  # quantizes after 8 tokens: acts on short prompts
AIME = [{"problem": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in [(1, 2), (30, 4), (5, 60), (7, 8)]]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=len(vocab), max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "aime24.jsonl").write_text("".join(json.dumps(r) + "\n" for r in AIME))
    return d


def eval_args(model: str, data_dir, out, *extra: str) -> list[str]:
    return ["eval", "--model", model, "--task", "aime24", "--methods", "fp16", KIVI_SMALL, "--max-new-tokens", "4",
            "--greedy", "--data-dir", str(data_dir), "--output-dir", str(out), "--quiet", "--threads", "1", *extra]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def results_files(out) -> list:
    return sorted(p for p in out.glob("aime24_*.jsonl") if ".shard" not in p.name)


# -- resume and config changes ------------------------------------------------------------------


def test_resume_skips_finished_and_never_duplicates(tiny_lm, data_dir, tmp_path):
    out = tmp_path / "out"
    assert main(eval_args(tiny_lm, data_dir, out, "--limit", "3", "--batch-size", "2")) == 0
    (path,) = results_files(out)
    first = read_jsonl(path)
    assert len(first) == 3 * 2
    assert {(r["problem_id"], r["method"], r["repeat"]) for r in first} == {
        (f"aime24/{i}", m, 0) for i in range(3) for m in ("fp16", KIVI_SMALL)}
    r = first[0]
    assert r["prompt"].startswith("Question: What is") and r["config_hash"] in path.name and r["seed"] == 0
    assert {"generation", "extracted", "correct", "method", "repeat"} <= set(r)

    assert main(eval_args(tiny_lm, data_dir, out, "--limit", "3", "--batch-size", "2")) == 0
    assert read_jsonl(path) == first  # nothing rerun

    # A crash mid-write: drop the last record and leave a torn line; more problems and a repeat more.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])
    assert main(eval_args(tiny_lm, data_dir, out, "--limit", "4", "--num-repeats", "2")) == 0
    records = read_jsonl(path)
    keys = [(r["problem_id"], r["method"], r["repeat"]) for r in records]
    assert len(keys) == len(set(keys)) == 4 * 2 * 2
    assert [r for r in records[:5]] == first[:5]  # untouched
    assert {r["seed"] for r in records if r["repeat"] == 1} == {1}
    summary = json.loads((out / f"summary_{path.stem.split('_')[-1]}.json").read_text())
    rows = {m["method"]: m for m in summary["methods"]}
    assert rows["fp16"]["problems"] == 4 and rows["fp16"]["repeats"] == 2
    assert summary["paired_vs_baseline"][0]["test"] == "paired-t"
    assert rows["fp16"]["n"] == 8 and 0 <= rows["fp16"]["correct"] <= 8
    report_reads(summary, "accuracy")


def report_reads(data: dict, kind: str) -> None:
    """kvlab report recognises the file and finds every field it needs."""
    from kvlab.report import _check, detect

    assert detect(data) == kind
    _check(kind, data)


def test_config_change_writes_a_separate_file(tiny_lm, data_dir, tmp_path):
    out = tmp_path / "out"
    assert main(eval_args(tiny_lm, data_dir, out, "--limit", "1")) == 0
    (first,) = results_files(out)
    before = first.read_text()
    assert main(eval_args(tiny_lm, data_dir, out, "--limit", "1", "--max-new-tokens", "3")) == 0
    files = results_files(out)
    assert len(files) == 2 and first.read_text() == before
    (second,) = [f for f in files if f != first]
    assert all(r["generated_tokens"] <= 3 for r in read_jsonl(second))


# -- out-of-memory halving ------------------------------------------------------------------------


def test_out_of_memory_halves_the_batch_and_continues(tiny_lm, data_dir, monkeypatch):
    from kvlab.eval.tasks import get_task

    model = g.load_eval_model(tiny_lm, ["cpu"], "float32")
    tokenizer, _ = g.load_tokenizer(tiny_lm)
    real_generate, sizes = model.generate, []

    def generate(input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    task = get_task("aime24")
    cfg = g.EvalConfig("tiny", "aime24", 3, task.stop_sequences, False, g.Sampling(False), 0, "float32")
    problems = task.load(data_dir)
    plan = g.Plan([parse_method("fp16")], 1, problems, g.build_prompts(task, problems, tokenizer, False))
    log = g.ResultLog(data_dir / "out.jsonl")
    assert g.run_plan(model, tokenizer, task, cfg, plan, log, batch_size=4) == 1
    assert sizes[:3] == [4, 2, 1] and len(log.records) == 4
    assert all(r["batch_size"] == 1 for r in log.records.values())
    assert [(e["batch_size"], e["new_batch_size"]) for e in log.events] == [(4, 2), (2, 1)]
    assert g.summarize(log.records.values(), ["fp16"], log.events)["methods"][0]["oom_halvings"] == 2
    reread = g.ResultLog(log.path)  # the halvings are in the file
    assert len(reread.events) == 2 and len(reread.records) == 4


def test_out_of_memory_at_batch_size_one_is_raised(tiny_lm, data_dir):
    from kvlab.eval.tasks import get_task

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    task = get_task("aime24")
    cfg = g.EvalConfig("tiny", "aime24", 3, task.stop_sequences, False, g.Sampling(False), 0, "float32")
    plan = g.Plan([parse_method("fp16")], 1, task.load(data_dir)[:1], ["Question: 1\nAnswer:"])
    with pytest.raises(torch.OutOfMemoryError):
        g.run_plan(None, None, task, cfg, plan, g.ResultLog(data_dir / "o.jsonl"), batch_size=1, generate=oom)


# -- several processes -------------------------------------------------------------------------


def test_two_cpu_processes_gather_every_problem_once(tiny_lm, data_dir, tmp_path):
    assert main(eval_args(tiny_lm, data_dir, tmp_path / "one", "--limit", "3")) == 0
    assert main(eval_args(tiny_lm, data_dir, tmp_path / "two", "--limit", "3", "--devices", "cpu,cpu")) == 0
    (single,) = results_files(tmp_path / "one")
    (sharded,) = results_files(tmp_path / "two")
    assert single.name == sharded.name  # same configuration
    assert not list((tmp_path / "two").glob("*.shard*"))
    rows = read_jsonl(sharded)
    keys = sorted((r["problem_id"], r["method"]) for r in rows)
    assert keys == sorted((f"aime24/{i}", m) for i in range(3) for m in ("fp16", KIVI_SMALL))
    by_key = {(r["problem_id"], r["method"]): r["generation"] for r in read_jsonl(single)}
    assert all(by_key[(r["problem_id"], r["method"])] == r["generation"] for r in rows)  # greedy, batch 1


def test_prompts_starting_with_bos_get_no_special_tokens_added(tiny_lm):
    tokenizer, _ = g.load_tokenizer(tiny_lm)
    assert g.encode_kwargs(tokenizer, ["<s>Question: 1"]) == {"add_special_tokens": False}
    assert g.encode_kwargs(tokenizer, ["Question: 1"]) == {}  # the tokenizer's default, as HFLM


def test_sampling_from_generation_config_or_flags():
    from transformers import GenerationConfig

    qwen = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    assert g.resolve_sampling(qwen, False, None, None, None) == g.Sampling(True, 0.6, 0.95, 20)
    assert g.resolve_sampling(qwen, False, 1.0, None, None) == g.Sampling(True, 1.0, 0.95, 20)
    assert g.resolve_sampling(qwen, True, None, None, None) == g.Sampling(False)
    assert g.resolve_sampling(GenerationConfig(), False, None, None, None) == g.Sampling(False)


# -- statistics ---------------------------------------------------------------------------------


def test_summary_mcnemar_and_holm():
    recs = [{"problem_id": str(i), "method": m, "repeat": 0, "correct": c, "generated_tokens": 5}
            for i in range(20) for m, c in (("fp16", True), ("kivi-2", i >= 10), ("kitty-pro", i != 0))]
    s = g.summarize(recs, ["fp16", "kivi-2", "kitty-pro"])
    rows = {r["method"]: r for r in s["methods"]}
    assert rows["kivi-2"]["accuracy_mean"] == 0.5 and rows["kivi-2"]["delta_vs_baseline"] == -0.5
    tests = {c["method"]: c for c in s["paired_vs_baseline"]}
    assert tests["kivi-2"]["test"] == "mcnemar-exact"
    assert tests["kivi-2"]["p_value"] == pytest.approx(2 * 0.5**10)
    assert tests["kitty-pro"]["p_value"] == 1.0
    assert tests["kivi-2"]["p_holm"] == pytest.approx(2 * tests["kivi-2"]["p_value"])


# -- fidelity ------------------------------------------------------------------------------------


def test_batched_generation_passes_the_cache_without_a_deprecation_warning(tiny_lm, cache_deprecations, monkeypatch):
    """``generate`` gets the cache by the keyword the model takes (``cache=`` in transformers 5.25,
    ``past_key_values=`` in 5.17), and the compressed cache is the one it fills."""
    model = g.load_eval_model(tiny_lm, ["cpu"], "float32")
    tokenizer, _ = g.load_tokenizer(tiny_lm)
    made = []
    monkeypatch.setattr(g, "make_cache", lambda method, m, make=g.make_cache: made.append(make(method, m)) or made[-1])
    out = g.generate_batch(model, tokenizer, ["Question: 1 plus 2?", "Q: 3?"], parse_method(KIVI_SMALL), 6, (),
                           g.Sampling(False), 0)
    assert len(out) == 2 and all(1 <= r.num_tokens <= 6 for r in out)
    assert made[0].layers[0].quantized_tokens()[0] > 0
    assert cache_deprecations() == []


def test_fidelity_fp16_against_itself_is_exact_and_divergence_matches_free_generation(tiny_lm):
    model = g.load_eval_model(tiny_lm, ["cpu"], "float32")
    tokenizer, _ = g.load_tokenizer(tiny_lm)
    ids = tokenizer("Question: How many legs does a spider have?\nAnswer:", return_tensors="pt",
                    add_special_tokens=False).input_ids
    fp16, kivi = parse_method("fp16"), parse_method(KIVI_SMALL)
    ref_tokens, ref_lp = fid.decode(model, fp16, ids, 24)
    _, lp = fid.decode(model, fp16, ids, 24, forced=ref_tokens)
    same = fid.compare(ref_tokens, ref_lp, lp)
    assert all(same.agree) and max(same.kl) == 0.0 and same.first_divergence is None

    _, lp = fid.decode(model, kivi, ids, 24, forced=ref_tokens)
    c = fid.compare(ref_tokens, ref_lp, lp)
    assert sum(c.kl) > 0
    free, _ = fid.decode(model, kivi, ids, 24)
    first_free = next((i for i, (a, b) in enumerate(zip(free, ref_tokens)) if a != b), None)
    assert c.first_divergence == first_free


def test_fidelity_command_writes_json_table_and_plots(tiny_lm, data_dir, tmp_path, capsys):
    out = tmp_path / "fid"
    args = ["fidelity", "--model", tiny_lm, "--task", "aime24", "--methods", "fp16", KIVI_SMALL, "--limit", "2",
            "--max-new-tokens", "12", "--bucket-size", "4", "--data-dir", str(data_dir), "--output-dir", str(out),
            "--quiet", "--threads", "1"]
    assert main(args) == 0
    (summary,) = out.glob("fidelity_*.json")
    data = json.loads(summary.read_text())
    rows = {m["method"]: m for m in data["methods"]}
    assert rows["fp16"]["top1_agreement"] == 1.0 and rows["fp16"]["kl_mean"] == 0.0
    assert rows["fp16"]["diverged_fraction"] == 0.0 and rows["fp16"]["problems"] == 2
    assert rows[KIVI_SMALL]["kl_mean"] > 0 and [b["start"] for b in rows["fp16"]["buckets"]][:2] == [0, 4]
    assert (out / (summary.stem + ".png")).stat().st_size > 0 and (out / (summary.stem + ".svg")).exists()
    report_reads(data, "fidelity")
    assert rows[KIVI_SMALL]["agreement"] == [b["agreement"] for b in rows[KIVI_SMALL]["buckets"]]
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "0-3" in printed
    assert main(args) == 0 and "2 of 2 problems done" in capsys.readouterr().err  # resumed


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("eval", ["--task", "nope"], "unknown task 'nope'"),
        ("eval", ["--methods", "kivi-3"], "unknown method 'kivi-3'"),
        ("eval", ["--task", "aime25"], "aime25: data not found. Put aime25.jsonl"),
        ("eval", ["--gpus", "7"], "--gpus 7: no CUDA device 7"),
        ("eval", ["--gpus", "a,b"], "expected comma-separated GPU indices"),
        ("eval", ["--greedy", "--temperature", "0.6"], "--greedy excludes"),
        ("eval", ["--temperature", "0"], "--temperature 0.0 must be > 0"),
        ("eval", ["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        ("eval", ["--model", "random:tiny-llama"], "has no tokenizer"),
        ("eval", ["--data-dir", "/nonexistent"], "--data-dir /nonexistent is not a directory"),
        ("fidelity", ["--task", "nope"], "unknown task 'nope'"),
        ("fidelity", ["--methods", "fp16", "fp16"], "duplicate methods"),
        ("fidelity", ["--limit", "0"], "--limit 0 must be at least 1"),
    ],
)
def test_bad_options_exit_2_with_one_line_before_loading(data_dir, tmp_path, capsys, command, args, message):
    base = ["--task", "aime24"] if "--task" not in args else []
    if "--data-dir" not in args:
        base += ["--data-dir", str(data_dir)]
    assert main([command, *base, *args, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- lm-evaluation-harness -------------------------------------------------------------------------

TINY_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
{extra}
"""


def test_lm_eval_model_scores_and_generates_with_the_cache(tiny_lm, tmp_path, cache_deprecations):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import kvlab.eval.lm_eval_model  # noqa: F401  (registers the "kvlab" model)

    docs = [{"question": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 0},
            {"question": "Two plus two equals", "choices": [" four", " five"], "label": 0},
            {"question": "The color of the sky is", "choices": [" green", " blue"], "label": 1}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mc.yaml").write_text(TINY_TASK.format(
        name="kvlab_tiny_mc", data=data, output_type="multiple_choice",
        extra='doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc'))
    (tmp_path / "gen.yaml").write_text(TINY_TASK.format(
        name="kvlab_tiny_gen", data=data, output_type="generate_until",
        extra='doc_to_target: "{{choices[label]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
              "  do_sample: false\nmetric_list:\n  - metric: exact_match"))
    manager = TaskManager(include_path=str(tmp_path))

    def run(model: str, model_args: str, tasks: list[str]):
        r = simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, device="cpu",
                            batch_size=2, log_samples=True)
        return r["results"], {t: [s["resps"] for s in r["samples"][t]] for t in tasks}

    results, samples = run("kvlab", f"pretrained={tiny_lm},method=kivi-2:group_size=8;residual=8",
                           ["kvlab_tiny_mc", "kvlab_tiny_gen"])
    assert set(results) == {"kvlab_tiny_mc", "kvlab_tiny_gen"} and "acc,none" in results["kvlab_tiny_mc"]
    assert len(samples["kvlab_tiny_gen"]) == 3
    assert cache_deprecations() == []  # generate gets the cache by the keyword the model takes
    _, plain = run("hf", f"pretrained={tiny_lm}", ["kvlab_tiny_mc"])
    _, dense = run("kvlab", f"pretrained={tiny_lm},method=fp16", ["kvlab_tiny_mc"])
    flat = lambda s: [ll for doc in s["kvlab_tiny_mc"] for (ll, _), in doc]  # noqa: E731
    assert flat(dense) == pytest.approx(flat(plain), abs=1e-4)  # fp16 cache in the loop = one forward pass
    assert flat(samples) != pytest.approx(flat(plain), abs=1e-4)  # the compressed cache acts on the scores


# -- the real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_and_fidelity_on_smollm2(tmp_path):
    data = os.environ.get("KVLAB_DATA_DIR", "")
    if not os.path.isfile(os.path.join(data, "gsm8k_test.jsonl")):
        pytest.skip("needs gsm8k_test.jsonl in $KVLAB_DATA_DIR")
    common = ["--task", "gsm8k_cot_llama", "--methods", "fp16", "kivi-2", "--limit", "2", "--max-new-tokens", "8",
              "--data-dir", data, "--quiet"]
    assert main(["eval", *common, "--greedy", "--batch-size", "2", "--output-dir", str(tmp_path / "eval")]) == 0
    (path,) = (tmp_path / "eval").glob("gsm8k_cot_llama_*.jsonl")
    records = read_jsonl(path)
    assert len(records) == 4 and all(r["prompt"].startswith("<|im_start|>system") for r in records)  # chat template
    assert all(0 < r["generated_tokens"] <= 8 for r in records)
    assert main(["fidelity", *common, "--output-dir", str(tmp_path / "fid")]) == 0
    (summary,) = (tmp_path / "fid").glob("fidelity_*.json")
    rows = {m["method"]: m for m in json.loads(summary.read_text())["methods"]}
    assert rows["fp16"]["top1_agreement"] == 1.0 and rows["fp16"]["kl_mean"] == 0.0
    assert rows["kivi-2"]["tokens"] == rows["fp16"]["tokens"] > 0
