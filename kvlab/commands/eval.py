"""``kvlab eval``: task accuracy by generation, one compressed cache per method."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvlab.tables import fmt, format_table

DEFAULT_METHODS = ["fp16", "kivi-2", "kivi*-2", "kitty-pro"]

SUMMARY_COLUMNS = [
    ("method", "method", str), ("problems", "problems", str), ("repeats", "repeats", str),
    ("accuracy_mean", "accuracy", fmt(".3f")), ("accuracy_std", "std", fmt(".3f")),
    ("delta_vs_baseline", "vs fp16", fmt("+.3f")), ("generated_tokens_mean", "gen tokens", fmt(".0f")),
    ("oom_halvings", "OOM halvings", str),
]
PAIRED_COLUMNS = [
    ("method", "method", str), ("n", "problems", str), ("test", "test", str), ("mean_diff", "d acc", fmt("+.3f")),
    ("p_value", "p", fmt(".2g")), ("p_holm", "p (Holm)", fmt(".2g")), ("stars", "", str),
]


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="task accuracy (GSM8K, MATH, HumanEval, GPQA, AIME) with each cache")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), an HF id or a local path")
    p.add_argument("--task", default="gsm8k_cot_llama", help="a task of kvlab.eval.tasks.TASKS")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method specs, e.g. kivi-2:group_size=32")
    p.add_argument("--num-repeats", type=int, default=1, help="generations per problem and method")
    p.add_argument("--batch-size", type=int, default=1, help="halved automatically on out-of-memory")
    p.add_argument("--limit", type=int, default=None, help="first N problems")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $KVLAB_DATA_DIR)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (256; AIME 32768)")
    p.add_argument("--kitty-settings", action="store_true",
                   help="Kitty's runs: 4096 new tokens, end tokens + one task stop string")
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="auto: apply the model's chat template when it has one")
    s = p.add_argument_group("sampling (default: the model's generation config)")
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="repeat r uses seed+r")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--gpus", default=None, help="CUDA devices, e.g. 0,1: one process per GPU, problems sharded")
    d.add_argument("--devices", default=None, help="torch devices, one process each, e.g. cpu,cpu")
    p.add_argument("--device-map", default=None, help="'auto': one process, the model spread over --gpus")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--output-dir", default=None, help="default: results/eval/<task>")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def _positive(args: argparse.Namespace, *names: str) -> None:
    from kvlab.cli import UsageError

    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be at least 1")


def parse_devices(gpus: str | None, devices: str | None, device_map: str | None) -> list[str]:
    """The torch devices to run on (one process each, or one process with ``--device-map``)."""
    import torch

    from kvlab.cli import UsageError

    if gpus is not None:
        try:
            ids = [int(g) for g in gpus.split(",")]
        except ValueError:
            raise UsageError(f"--gpus {gpus!r}: expected comma-separated GPU indices, e.g. 0,1") from None
        n = torch.cuda.device_count()
        missing = [i for i in ids if not 0 <= i < n]
        if missing:
            raise UsageError(f"--gpus {gpus}: no CUDA device {missing[0]} ({n} visible)")
        if len(set(ids)) != len(ids):
            raise UsageError(f"--gpus {gpus}: a GPU is named twice")
        out = [f"cuda:{i}" for i in ids]
    elif devices is not None:
        out = [d.strip() for d in devices.split(",")]
        for d in out:
            try:
                dev = torch.device(d)
            except RuntimeError:
                raise UsageError(f"--devices: {d!r} is not a torch device") from None
            if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
                raise UsageError(f"--devices: no CUDA device {d} ({torch.cuda.device_count()} visible)")
    else:
        out = ["cuda:0" if torch.cuda.is_available() else "cpu"]
    if device_map is not None and device_map != "auto":
        raise UsageError(f"--device-map {device_map!r}: only 'auto' is supported")
    if device_map and not out[0].startswith("cuda"):
        raise UsageError("--device-map auto spreads the model over GPUs; no CUDA device is selected")
    return out


def _validate(args: argparse.Namespace):
    from kvlab import models
    from kvlab.cli import UsageError, _head_dim, _methods
    from kvlab.eval.tasks import TaskDataError, get_task, kitty_settings

    try:
        task = get_task(args.task)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    methods = _methods(args.methods)
    _positive(args, "num_repeats", "batch_size", "limit", "max_new_tokens", "top_k")
    if args.greedy and any(v is not None for v in (args.temperature, args.top_p, args.top_k)):
        raise UsageError("--greedy excludes --temperature/--top-p/--top-k")
    if args.temperature is not None and args.temperature <= 0:
        raise UsageError(f"--temperature {args.temperature} must be > 0 (use --greedy for greedy decoding)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a directory")
    if args.model.startswith("random:"):
        raise UsageError(f"{args.model} has no tokenizer; evaluation needs a real model")
    devices = parse_devices(args.gpus, args.devices, args.device_map)
    task = kitty_settings(task) if args.kitty_settings else task
    try:
        problems = task.load(args.data_dir)[: args.limit]
        head_dim = _head_dim(models.load_config(args.model))
        for m in methods:
            m.check_head_dim(head_dim)
    except (TaskDataError, ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    if not problems:
        raise UsageError(f"{args.task}: the data file holds no problems")
    return task, methods, problems, devices


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from kvlab.eval import generation as g
    from kvlab.results import write_json

    task, methods, problems, devices = _validate(args)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if devices[0].startswith("cuda") else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, gen_config = g.load_tokenizer(args.model)
    use_chat = args.chat_template == "on" or (args.chat_template == "auto" and tokenizer.chat_template is not None)
    cfg = g.EvalConfig(
        model=args.model, task=args.task, max_new_tokens=args.max_new_tokens or task.max_new_tokens,
        stop_sequences=tuple(task.stop_sequences), chat_template=use_chat,
        sampling=g.resolve_sampling(gen_config, args.greedy, args.temperature, args.top_p, args.top_k),
        seed=args.seed, dtype=dtype, kitty_settings=args.kitty_settings, data_dir=args.data_dir,
    )
    out = Path(args.output_dir or f"results/eval/{args.task}")
    log = g.ResultLog(out / f"{args.task}_{cfg.hash}.jsonl")
    if g.merge_shards(log):
        print(f"merged unfinished shard files into {log.path}", file=sys.stderr)
    plan = g.Plan(methods, args.num_repeats, problems, g.build_prompts(task, problems, tokenizer, use_chat))
    todo = plan.todo(log.records)
    pending = sum(len(idx) for _, _, idx in todo)
    print(f"{log.path}: {len(log.records)} results found, {pending} generations to run", file=sys.stderr)
    if pending and len(devices) > 1 and not args.device_map:
        ids = sorted({plan.problems[i].id for _, _, idx in todo for i in idx},
                     key=[p.id for p in problems].index)
        job = g.ShardJob(cfg, tuple(args.methods), args.num_repeats, tuple(ids), str(log.path), tuple(devices),
                         args.batch_size, max(1, torch.get_num_threads() // len(devices)), not args.quiet)
        g.run_sharded(job)
        g.merge_shards(log)
    elif pending:
        print(f"loading {args.model} ...", file=sys.stderr)
        model = g.load_eval_model(args.model, devices, dtype, args.device_map)
        with tqdm(total=pending, unit="gen", desc=args.task, disable=args.quiet) as bar:
            g.run_plan(model, tokenizer, task, cfg, plan, log, args.batch_size, bar)

    labels = [m.label for m in methods]
    wanted = {p.id for p in problems}
    records = [r for r in log.records.values() if r["problem_id"] in wanted and r["repeat"] < args.num_repeats]
    summary = g.summarize(records, labels, log.events)
    write_json(out / f"summary_{cfg.hash}.json", {  # "kind": "accuracy" is what kvlab report reads
        "kind": "accuracy", "model": cfg.model, "task": cfg.task, "baseline": g.BASELINE,
        "config": cfg.as_dict(), "config_hash": cfg.hash, "methods_run": labels, "num_repeats": args.num_repeats,
        "limit": args.limit, "results_file": log.path.name, **summary,
    })
    print(format_table(summary["methods"], SUMMARY_COLUMNS))
    if summary["paired_vs_baseline"]:
        print(f"\nPaired vs fp16 on the same problems ({summary['correction']}):")
        print(format_table(summary["paired_vs_baseline"], PAIRED_COLUMNS))
    print(f"\nresults: {log.path}", file=sys.stderr)
    return 0
