"""Accuracy evaluation by generation with a compressed cache in the loop.

Every batch gets a fresh cache (``make_cache(method, model)``). Prompts are built by the task
(chat template when asked), encoded like lm-evaluation-harness's HFLM (0.4.x) for causal models
(no special tokens added when the prompt already starts with the BOS token, as a chat template's
does; else the tokenizer's default) and left-padded. Generation stops on the model's end tokens and the task's stop
strings; the text is cut at the first stop string, as the harness does.

Results are appended per batch to a JSONL file named by the configuration hash, so rerunning the
same command resumes where it stopped and a changed configuration goes to a new file. A batch
that runs out of GPU memory is retried with half the batch size (recorded as an ``oom`` line).
With several devices, problems are sharded round-robin over one process per device; each writes
its own shard file, merged into the main file when the processes finish (or at the next start).
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from scipy import stats as scipy_stats

from kvlab.cache import make_cache
from kvlab.eval.stats import holm, mean_std, paired_test, stars
from kvlab.models import cache_kwargs, free_memory, is_oom
from kvlab.results import config_hash

BASELINE = "fp16"


@dataclass(frozen=True)
class Sampling:
    do_sample: bool
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


def resolve_sampling(generation_config, greedy: bool, temperature: float | None, top_p: float | None,
                     top_k: int | None) -> Sampling:
    """``--greedy``; else flags override the model's generation config (sampling if either asks for it)."""
    flags = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    if greedy or (all(v is None for v in flags.values()) and not getattr(generation_config, "do_sample", False)):
        return Sampling(do_sample=False)
    return Sampling(do_sample=True, **{k: v if v is not None else getattr(generation_config, k, None)
                                       for k, v in flags.items()})


@dataclass(frozen=True)
class EvalConfig:
    """What determines a generation (and so the results file); methods, repeats and limit do not."""

    model: str
    task: str
    max_new_tokens: int
    stop_sequences: tuple[str, ...]
    chat_template: bool
    sampling: Sampling
    seed: int
    dtype: str
    kitty_settings: bool = False
    data_dir: str | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("data_dir")
        return d

    @property
    def hash(self) -> str:
        return config_hash(self.as_dict())


# -- model, prompts and generation --------------------------------------------------------------------


def model_path(name: str) -> str:
    from kvlab import models

    return str(models._smollm2_dir()) if name == models.DEFAULT_MODEL else name


def load_tokenizer(name: str):
    """The tokenizer and generation config (for the default sampling) without loading the weights."""
    from transformers import AutoTokenizer, GenerationConfig

    path = model_path(name)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        generation_config = GenerationConfig()
    return AutoTokenizer.from_pretrained(path), generation_config


def load_eval_model(name: str, devices: list[str], dtype: str, device_map: str | None = None):
    """The model on ``devices[0]``, or with ``device_map="auto"`` spread over the CUDA ``devices``."""
    if device_map:
        from transformers import AutoModelForCausalLM

        gpus = [torch.device(d).index or 0 for d in devices]
        max_memory = {i: torch.cuda.get_device_properties(i).total_memory for i in gpus}
        return AutoModelForCausalLM.from_pretrained(model_path(name), dtype=getattr(torch, dtype),
                                                    device_map=device_map, max_memory=max_memory).eval()
    from kvlab.models import load_model

    return load_model(name, device=devices[0], dtype=getattr(torch, dtype))[0]


def build_prompts(task, problems, tokenizer, chat_template: bool) -> list[str]:
    return [task.build_prompt(p, tokenizer, apply_chat_template=chat_template) for p in problems]


def truncate_at_stop(text: str, stops: Iterable[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def encode_kwargs(tokenizer, prompts: list[str]) -> dict[str, bool]:
    """HFLM.tok_batch_encode: ``add_special_tokens=False`` when the prompts already start with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    return {"add_special_tokens": False} if bos and prompts[0].startswith(bos) else {}


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; batching needs one")
    return pad


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@dataclass
class Generated:
    text: str
    num_tokens: int


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], method, max_new_tokens: int, stops: tuple[str, ...],
                   sampling: Sampling, seed: int) -> list[Generated]:
    """Left-padded batched ``generate`` with a fresh ``method`` cache; texts cut at the first stop string."""
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, **encode_kwargs(tokenizer, prompts))
    enc = enc.to(_model_device(model))
    eos = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling.do_sample, eos_token_id=eos, pad_token_id=_pad_id(tokenizer),
        stop_strings=list(stops) or None,
        **({"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
           if sampling.do_sample else {}),
    )
    torch.manual_seed(seed)
    out = model.generate(**enc, **cache_kwargs(model, make_cache(method, model)), generation_config=config,
                         tokenizer=tokenizer)
    results = []
    for row in out[:, enc.input_ids.shape[1]:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        n = ends[0] + 1 if ends else len(row)
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        results.append(Generated(truncate_at_stop(text, stops), n))
    return results


# -- the results file --------------------------------------------------------------------------


Key = tuple[str, str, int]


def record_key(record: dict) -> Key:
    return record["problem_id"], record["method"], record["repeat"]


class ResultLog:
    """Append-only JSONL of per-problem results (and ``{"event": ...}`` lines). A torn last line,
    left by a crash mid-write, is dropped on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[Key, dict] = {}
        self.events: list[dict] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(data))
        for line in data.decode().splitlines():
            if line.strip():
                self._add(json.loads(line))

    def _add(self, record: dict) -> bool:
        if "event" in record:
            self.events.append(record)
            return True
        key = record_key(record)
        if key in self.records:
            return False
        self.records[key] = record
        return True

    def append(self, records: list[dict]) -> None:
        new = [r for r in records if self._add(r)]
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())

    def merge(self, other: str | os.PathLike) -> int:
        """Append the records of another log not already here; returns how many were new."""
        before, theirs = len(self.records), ResultLog(other)
        self.append(list(theirs.records.values()) + theirs.events)
        return len(self.records) - before


def shard_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.shard{rank}.jsonl")


def merge_shards(log: ResultLog) -> int:
    merged = 0
    for shard in sorted(log.path.parent.glob(f"{log.path.stem}.shard*.jsonl")):
        merged += log.merge(shard)
        shard.unlink()
    return merged


# -- the evaluation loop -----------------------------------------------------------------------


@dataclass
class Plan:
    """What to run: the methods, repeats and problems (with their prompts)."""

    methods: list
    repeats: int
    problems: list
    prompts: list[str]

    def todo(self, done: Iterable[Key]) -> list[tuple[Any, int, list[int]]]:
        """(method, repeat, indices of problems still to run), each list longest prompt first."""
        done = set(done)
        units = []
        for repeat in range(self.repeats):
            for m in self.methods:
                idx = [i for i, p in enumerate(self.problems) if (p.id, m.label, repeat) not in done]
                if idx:
                    units.append((m, repeat, sorted(idx, key=lambda i: -len(self.prompts[i]))))
        return units


def batch_seed(seed: int, repeat: int, problem_ids: list[str]) -> int:
    """The torch seed of one batch: the repeat's seed mixed with the batch's problems."""
    return zlib.crc32(json.dumps([seed + repeat, problem_ids]).encode()) & 0x7FFFFFFF


def run_plan(model, tokenizer, task, cfg: EvalConfig, plan: Plan, log: ResultLog, batch_size: int,
             progress=None, generate: Callable = generate_batch) -> int:
    """Run every unfinished (problem, method, repeat); returns the final batch size (after OOM halvings)."""
    for method, repeat, idx in plan.todo(log.records):
        start = 0
        while start < len(idx):
            batch = idx[start : start + batch_size]
            ids = [plan.problems[i].id for i in batch]
            seed = batch_seed(cfg.seed, repeat, ids)
            try:
                outs = generate(model, tokenizer, [plan.prompts[i] for i in batch], method, cfg.max_new_tokens,
                                cfg.stop_sequences, cfg.sampling, seed)
            except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
                if not is_oom(e) or batch_size == 1:
                    raise
                free_memory()
                log.append([{"event": "oom", "method": method.label, "repeat": repeat, "batch_size": batch_size,
                             "new_batch_size": batch_size // 2, "config_hash": cfg.hash}])
                print(f"out of memory at batch size {batch_size}; continuing with {batch_size // 2}", file=sys.stderr)
                batch_size //= 2
                continue
            log.append([_record(task, plan.problems[i], plan.prompts[i], out, method, repeat, cfg, seed, len(batch))
                        for i, out in zip(batch, outs)])
            start += len(batch)
            if progress is not None:
                progress.update(len(batch))
    return batch_size


def _record(task, problem, prompt: str, out: Generated, method, repeat: int, cfg: EvalConfig, seed: int,
            batch_size: int) -> dict:
    answer = task.extract(out.text, problem)
    return {
        "problem_id": problem.id, "method": method.label, "repeat": repeat,
        "correct": task.score(answer, problem), "extracted": answer, "reference": problem.reference,
        "generation": out.text, "generated_tokens": out.num_tokens, "prompt": prompt,
        "seed": cfg.seed + repeat, "batch_seed": seed, "batch_size": batch_size, "config_hash": cfg.hash,
    }


# -- several devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs (picklable: names, not objects)."""

    cfg: EvalConfig
    method_specs: tuple[str, ...]
    repeats: int
    problem_ids: tuple[str, ...]
    log_path: str
    devices: tuple[str, ...]
    batch_size: int
    threads: int
    progress: bool


def load_plan(cfg: EvalConfig, method_specs: Iterable[str], repeats: int, problem_ids: Iterable[str] | None,
              tokenizer) -> tuple[Any, Plan]:
    from kvlab.eval.tasks import get_task, kitty_settings
    from kvlab.methods import parse_method

    task = get_task(cfg.task)
    task = kitty_settings(task) if cfg.kitty_settings else task
    problems = task.load(cfg.data_dir)
    if problem_ids is not None:
        wanted = set(problem_ids)
        problems = [p for p in problems if p.id in wanted]
    methods = [parse_method(s) for s in method_specs]
    return task, Plan(methods, repeats, problems, build_prompts(task, problems, tokenizer, cfg.chat_template))


def shard_worker(rank: int, job: ShardJob) -> None:
    """One process of a multi-device run: its round-robin share of the problems, into its own shard file."""
    from tqdm.auto import tqdm

    if job.threads:
        torch.set_num_threads(job.threads)
    device = job.devices[rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    tokenizer, _ = load_tokenizer(job.cfg.model)
    model = load_eval_model(job.cfg.model, [device], job.cfg.dtype)
    mine = job.problem_ids[rank :: len(job.devices)]
    task, plan = load_plan(job.cfg, job.method_specs, job.repeats, mine, tokenizer)
    log = ResultLog(shard_path(Path(job.log_path), rank))
    log.records.update(ResultLog(job.log_path).records)  # finished before this run: skip, do not copy
    total = sum(len(idx) for _, _, idx in plan.todo(log.records))
    with tqdm(total=total, unit="gen", desc=f"{device} #{rank}", position=rank, disable=not job.progress) as bar:
        run_plan(model, tokenizer, task, job.cfg, plan, log, job.batch_size, bar)


def run_sharded(job: ShardJob) -> None:
    import torch.multiprocessing as mp

    mp.spawn(shard_worker, args=(job,), nprocs=len(job.devices), join=True)


# -- summary -----------------------------------------------------------------------------------


def mcnemar_exact(base: list[bool], other: list[bool]) -> float:
    """Two-sided exact McNemar test: binomial test on the discordant pairs."""
    b = sum(x and not y for x, y in zip(base, other))
    c = sum(y and not x for x, y in zip(base, other))
    return 1.0 if b + c == 0 else float(scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue)


def summarize(records: Iterable[dict], methods: list[str], events: list[dict] = (), baseline: str = BASELINE) -> dict:
    """Accuracy per method (mean/std over repeats) and paired tests against ``baseline`` on the same
    problems: exact McNemar with one repeat, else a paired t-test over problems of the per-problem
    accuracy; p-values Holm-corrected over the methods compared."""
    by: dict[str, dict[str, dict[int, bool]]] = {m: {} for m in methods}
    tokens: dict[str, list[int]] = {m: [] for m in methods}
    for r in records:
        if r["method"] in by:
            by[r["method"]].setdefault(r["problem_id"], {})[r["repeat"]] = bool(r["correct"])
            tokens[r["method"]].append(r["generated_tokens"])
    rows = []
    for m in methods:
        repeats = sorted({rep for per in by[m].values() for rep in per})
        accs = [float(np.mean([per[rep] for per in by[m].values() if rep in per])) for rep in repeats]
        mean, std = mean_std(accs) if accs else (float("nan"), float("nan"))
        every_answer = [ok for per in by[m].values() for ok in per.values()]
        rows.append({"method": m, "problems": len(by[m]), "repeats": len(repeats), "accuracy_mean": mean,
                     "accuracy_std": std, "accuracy_per_repeat": accs, "n": len(every_answer),
                     "correct": sum(every_answer),
                     **({"outcomes": {pid: int(per[0]) for pid, per in by[m].items() if 0 in per}}
                        if repeats == [0] else {}),
                     "generated_tokens_mean": float(np.mean(tokens[m])) if tokens[m] else float("nan"),
                     "oom_halvings": sum(1 for e in events if e.get("event") == "oom" and e["method"] == m)})
    comparisons = []
    if baseline in by:
        for m in methods:
            if m != baseline:
                comparisons.append(_paired(by[baseline], by[m], m, baseline))
        for c, p in zip(comparisons, holm([c["p_value"] for c in comparisons])):
            c["p_holm"], c["stars"] = p, stars(p)
        for row in rows:
            row["delta_vs_baseline"] = row["accuracy_mean"] - rows[methods.index(baseline)]["accuracy_mean"]
    return {"methods": rows, "paired_vs_baseline": comparisons,
            "correction": "Holm-Bonferroni over the methods compared with the baseline"}


def _paired(base: dict[str, dict[int, bool]], other: dict[str, dict[int, bool]], method: str, baseline: str) -> dict:
    pairs = []
    for pid in sorted(set(base) & set(other)):
        reps = sorted(set(base[pid]) & set(other[pid]))
        if reps:
            pairs.append(([base[pid][r] for r in reps], [other[pid][r] for r in reps]))
    out = {"method": method, "baseline": baseline, "n": len(pairs)}
    if pairs and all(len(b) == 1 for b, _ in pairs):
        b, o = [p[0][0] for p in pairs], [p[1][0] for p in pairs]
        return {**out, "test": "mcnemar-exact", "mean_diff": float(np.mean(o) - np.mean(b)),
                "p_value": mcnemar_exact(b, o)}
    t = paired_test([float(np.mean(o)) for _, o in pairs], [float(np.mean(b)) for b, _ in pairs]) if pairs else {
        "mean_diff": float("nan"), "p_value": float("nan")}
    return {**out, **t, "n": len(pairs), "test": "paired-t"}
