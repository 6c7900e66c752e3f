"""``kvlab fidelity``: how far each compressed cache pulls generation away from the fp16 cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlab.tables import fmt, format_table

DEFAULT_METHODS = ["fp16", "kivi-2", "kivi*-2", "kitty-pro"]

COLUMNS = [
    ("method", "method", str), ("problems", "problems", str), ("tokens", "tokens", str),
    ("top1_agreement", "top-1 agreement", fmt(".4f")), ("kl_mean", "mean KL(fp16||m)", fmt(".4g")),
    ("diverged_fraction", "diverged", fmt(".0%")), ("first_divergence_median", "1st div. median", fmt(".0f")),
    ("first_divergence_mean_diverged", "1st div. mean (diverged)", fmt(".1f")),
]


def register(subparsers) -> None:
    p = subparsers.add_parser("fidelity", help="top-1 agreement / KL against fp16 along an fp16 generation")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), an HF id or a local path")
    p.add_argument("--task", default="gsm8k_cot_llama", help="a task of kvlab.eval.tasks.TASKS (its prompts)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method specs, e.g. kivi-2:group_size=32")
    p.add_argument("--limit", type=int, default=10, help="first N problems")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--bucket-size", type=int, default=32, help="positions per bucket of the growth curves")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $KVLAB_DATA_DIR)")
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="auto: apply the model's chat template when it has one")
    p.add_argument("--output-dir", default=None, help="default: results/fidelity/<task>")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fidelity)


def _validate(args: argparse.Namespace):
    from kvlab import models
    from kvlab.cli import UsageError, _head_dim, _methods
    from kvlab.eval.tasks import TaskDataError, get_task

    try:
        task = get_task(args.task)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    methods = _methods(args.methods)
    for name in ("limit", "max_new_tokens", "bucket_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a directory")
    if args.model.startswith("random:"):
        raise UsageError(f"{args.model} has no tokenizer; fidelity needs a real model")
    try:
        problems = task.load(args.data_dir)[: args.limit]
        head_dim = _head_dim(models.load_config(args.model))
        for m in methods:
            m.check_head_dim(head_dim)
    except (TaskDataError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    if not problems:
        raise UsageError(f"{args.task}: the data file holds no problems")
    return task, methods, problems


def cmd_fidelity(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from kvlab.eval import fidelity as f
    from kvlab.eval.generation import ResultLog, encode_kwargs, load_eval_model, load_tokenizer
    from kvlab.methods import parse_method
    from kvlab.results import config_hash, write_json

    task, methods, problems = _validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, gen_config = load_tokenizer(args.model)
    use_chat = args.chat_template == "on" or (args.chat_template == "auto" and tokenizer.chat_template is not None)
    cfg = {"model": args.model, "task": args.task, "max_new_tokens": args.max_new_tokens, "chat_template": use_chat,
           "stop_sequences": list(task.stop_sequences), "dtype": args.dtype, "reference": "fp16 greedy"}
    chash = config_hash(cfg)
    out = Path(args.output_dir or f"results/fidelity/{args.task}")
    log = ResultLog(out / f"fidelity_{chash}.jsonl")
    labels = [m.label for m in methods]
    todo = [p for p in problems if any((p.id, m, 0) not in log.records for m in labels)]
    print(f"{log.path}: {len(problems) - len(todo)} of {len(problems)} problems done", file=sys.stderr)
    if todo:
        print(f"loading {args.model} ...", file=sys.stderr)
        model = load_eval_model(args.model, [args.device], args.dtype)
        eos = [t for t in [gen_config.eos_token_id, tokenizer.eos_token_id] if isinstance(t, int)]
        stop = f.stop_check(tokenizer, eos, task.stop_sequences)
        reference = parse_method("fp16")
        steps = len(todo) * (1 + len(methods)) * args.max_new_tokens
        with tqdm(total=steps, unit="tok", desc="fidelity", disable=args.quiet) as bar:
            for p in todo:
                prompt = task.build_prompt(p, tokenizer, apply_chat_template=use_chat)
                ids = tokenizer(prompt, return_tensors="pt", **encode_kwargs(tokenizer, [prompt])).input_ids
                ids = ids.to(args.device)
                bar.set_postfix_str(f"{p.id} fp16 reference")
                ref_tokens, ref_lp = f.decode(model, reference, ids, args.max_new_tokens, stop=stop)
                bar.update(args.max_new_tokens)
                records = []
                for m in methods:
                    if (p.id, m.label, 0) in log.records:
                        continue
                    bar.set_postfix_str(f"{p.id} {m.label}")
                    _, lp = f.decode(model, m, ids, args.max_new_tokens, forced=ref_tokens)
                    c = f.compare(ref_tokens, ref_lp, lp)
                    records.append({"problem_id": p.id, "method": m.label, "repeat": 0, "prompt_tokens": ids.shape[1],
                                    "generated_tokens": len(ref_tokens), "agree": [int(a) for a in c.agree],
                                    "kl": c.kl, "first_divergence": c.first_divergence, "config_hash": chash,
                                    "reference_text": tokenizer.decode(ref_tokens, skip_special_tokens=True)})
                    bar.update(args.max_new_tokens)
                log.append(records)
                bar.update(args.max_new_tokens * (len(methods) - len(records)))

    wanted = {p.id for p in problems}
    done = [r for r in log.records.values() if r["problem_id"] in wanted]
    summaries = [f.summarize_method(m, [r for r in done if r["method"] == m], args.bucket_size) for m in labels]
    stem = str(out / f"fidelity_{chash}")
    plots = f.plot(summaries, stem, f"{args.model}, {args.task}: {len(problems)} prompts, fp16 greedy reference")
    write_json(stem + ".json", {"kind": "fidelity", "model": args.model, "dataset": args.task, "reference": "fp16",
                                "config": cfg, "config_hash": chash, "limit": args.limit,
                                "bucket_size": args.bucket_size, "methods": summaries,
                                "plots": [Path(p).name for p in plots], "results_file": log.path.name})
    print(format_table(summaries, COLUMNS))
    print("\nTop-1 agreement / mean KL by generated-token position:")
    print(format_table(_bucket_rows(summaries), _bucket_columns(summaries)))
    print(f"\nresults: {stem}.json, plots: {', '.join(plots)}", file=sys.stderr)
    return 0


def _bucket_rows(summaries: list[dict]) -> list[dict]:
    return [{"method": s["method"], **{f"b{b['start']}": f"{b['agreement']:.3f} / {b['kl']:.3g}" for b in s["buckets"]}}
            for s in summaries]


def _bucket_columns(summaries: list[dict]) -> list:
    starts = sorted({(b["start"], b["end"]) for s in summaries for b in s["buckets"]})
    return [("method", "method", str)] + [(f"b{a}", f"{a}-{b - 1}", lambda v: v or "-") for a, b in starts]
