"""``kvlab bench latency``: decode speed of compressed caches (and transformers' own) on one model.

For each method x context length x batch size: prefill a random prompt, time a greedy decode loop
(:mod:`kvlab.bench.latency`). Writes ``<output-dir>/latency.json`` (a ``"kind": "latency"`` result
that ``kvlab report`` reads, rewritten after every run), prints a table, and plots tokens/s vs
batch and ms/token vs context (PNG + SVG, with the report's plotting code).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

DEFAULT_METHODS = ["fp16", "kivi-2", "kitty-pro"]


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def _note(row: dict) -> str:
    if row.get("oom"):
        return "OOM" + (" (not run)" if row.get("error", "").startswith("not run") else "")
    if row.get("skipped"):
        return "skipped"
    notes = ["at max batch"] if row.get("at_max_batch") else []
    rows = row.get("prefill_rows")
    if rows and rows < row["batch"]:
        notes.append(f"prefill: {rows} row{'s' * (rows > 1)} repeated")
    return "; ".join(notes)


def _vs_fp16(rows: list[dict]) -> list[dict]:
    """``rows`` with ``vs_fp16``: tokens/s over the fp16 row's at the same context (where both ran)."""
    fp16 = {r["context"]: r.get("tokens_per_s") for r in rows if r["method"] == "fp16"}
    return [{**r, "note": "OOM" if r.get("oom") else "",
             "vs_fp16": r["tokens_per_s"] / fp16[r["context"]] if r.get("tokens_per_s") and fp16.get(r["context"])
             else None} for r in rows]


def _skip_reasons(rows: list[dict]) -> str:
    reasons = dict.fromkeys(f"  {r['method']}: {r['skipped']}" for r in rows if r.get("skipped"))
    return "\nskipped:\n" + "\n".join(reasons) if reasons else ""


def _validate(args: argparse.Namespace):
    """Every option, before anything loads; returns (methods, model config)."""
    import torch

    from kvlab import models
    from kvlab.bench.latency import HF_BASELINES
    from kvlab.cli import UsageError, _check_run_options, _head_dim, _methods

    for name, values in (("--batch-sizes", args.batch_sizes), ("--context-lengths", args.context_lengths)):
        if min(values) < 1:
            raise UsageError(f"{name} {' '.join(map(str, values))}: each must be at least 1")
    if args.gen_len < 1:
        raise UsageError(f"--gen-len {args.gen_len} must be at least 1")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk {args.prefill_chunk} must be at least 1")
    if args.prefill_rows is not None and args.prefill_rows < 1:
        raise UsageError(f"--prefill-rows {args.prefill_rows} must be at least 1")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup} must be >= 0")
    if args.gen_len <= args.warmup:
        raise UsageError(f"--gen-len {args.gen_len} must exceed --warmup {args.warmup} (warmup steps are not timed)")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed} must be >= 0")
    methods = _methods(args.methods)
    if args.hf_baselines == []:
        args.hf_baselines = list(HF_BASELINES)
    unknown = [n for n in args.hf_baselines or () if n not in HF_BASELINES]
    if unknown:
        raise UsageError(f"--hf-baselines {' '.join(unknown)}: unknown; choose from {', '.join(HF_BASELINES)}")
    clash = sorted({m.label for m in methods} & set(args.hf_baselines or ()))
    if clash:
        raise UsageError(f"{', '.join(clash)} in --methods is also a --hf-baselines row; give it once")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.seeds = [args.seed]
    _check_run_options(args, methods)  # threads, output folder, device, CUDA-only methods
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.find_max_batch and not cuda:
        raise UsageError("--find-max-batch probes GPU memory: it needs --device cuda")
    try:
        config = models.load_config(args.model)
        head_dim = _head_dim(config)
        for m in methods:
            m.check_head_dim(head_dim)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    limit = models.max_context(config)
    longest = max(args.context_lengths) + args.gen_len
    if limit is not None and longest > limit:
        raise UsageError(f"--context-lengths {max(args.context_lengths)} + --gen-len {args.gen_len} = {longest} "
                         f"exceeds {args.model}'s {limit} positions")
    return methods, config


def cmd_latency(args: argparse.Namespace) -> int:
    methods, _ = _validate(args)
    import torch
    import transformers
    from tqdm.auto import tqdm

    from kvlab import models
    from kvlab import report_plots as plots
    from kvlab.bench import latency as lat
    from kvlab.results import write_json
    from kvlab.tables import fmt, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"loading {args.model} ({args.dtype}) on {device} ...", file=sys.stderr)
    model, _ = models.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    baselines = [c for c in lat.hf_cases(device) if c.label in (args.hf_baselines or ())]
    cases = [lat.method_case(m, compile_layers=not args.no_compile) for m in methods] + baselines
    batches, contexts = sorted(set(args.batch_sizes)), sorted(set(args.context_lengths))
    prefill = lat.Prefill(args.prefill_chunk, args.prefill_rows)

    out = Path(args.output_dir)
    result = {
        "kind": "latency", "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "config": {"methods": [c.label for c in cases], "batch_sizes": batches, "context_lengths": contexts,
                   "gen_len": args.gen_len, "warmup": args.warmup, "seed": args.seed,
                   "prefill_chunk": args.prefill_chunk, "prefill_rows": args.prefill_rows,
                   "timing": "median over decode steps after warmup, each step synchronized (forward + argmax)"},
        "rows": [],
    }

    with tqdm(total=len(cases) * len(batches) * len(contexts), desc="latency", unit="run", disable=args.quiet) as bar:
        def on_row(row: dict) -> None:
            result["rows"].append(row)
            write_json(out / "latency.json", result)  # what finished survives a crash
            bar.update()
            bar.set_postfix_str(f"{row['method']} b={row['batch']} ctx={row['context']}")

        lat.run_grid(model, cases, batches, contexts, args.gen_len, args.warmup, args.seed, on_row=on_row,
                     prefill=prefill)

    if args.find_max_batch:
        with tqdm(desc="max batch", unit="probe", disable=args.quiet) as bar:
            def on_probe(what: str) -> None:
                bar.update()
                bar.set_postfix_str(what)

            result["max_batch"] = lat.max_batch_rows(model, cases, contexts, args.seed, on_probe=on_probe,
                                                     prefill=prefill)
        write_json(out / "latency.json", result)
        with tqdm(desc="at max batch", unit="run", disable=args.quiet) as bar:
            def on_max_row(row: dict) -> None:
                result["rows"].append(row)
                write_json(out / "latency.json", result)
                bar.update()

            lat.at_max_batch(model, cases, result["max_batch"], args.gen_len, args.warmup, args.seed, prefill,
                             on_row=on_max_row)

    rows = result["rows"]
    print(format_table([{**r, "note": _note(r)} for r in rows], [
        ("method", "method", str), ("decode_path", "decode", str), ("batch", "batch", str),
        ("context", "context", str), ("prefill_ms", "prefill ms", fmt(".1f")), ("ms_per_token", "ms/token", fmt(".2f")),
        ("ms_per_token_std", "std", fmt(".2f")), ("tokens_per_s", "tokens/s", fmt(".1f")),
        ("peak_memory_mb", "peak MB", fmt(".0f")), ("cache_bytes", "cache MB", _mb),
        ("bits_per_value_all_in", "bits all-in", fmt(".2f")), ("note", "", str),
    ]) + _skip_reasons(rows))
    if "max_batch" in result:
        print("\nLargest batch that fits (prefill + a few decode steps):")
        print(format_table([{**r, "max": r.get("max_batch"), "note": _note(r) or ("cap reached" if r.get("capped") else "")}
                            for r in result["max_batch"]],
                           [("method", "method", str), ("context", "context", str), ("max", "max batch", fmt("d")),
                            ("note", "", str)]) + _skip_reasons(result["max_batch"]))
        at_max = _vs_fp16([r for r in rows if r.get("at_max_batch")])
        if at_max:
            print("\nTokens/s at each method's largest batch (vs fp16 at its own):")
            print(format_table(at_max, [("method", "method", str), ("context", "context", str), ("batch", "batch", str),
                                        ("tokens_per_s", "tokens/s", fmt(".1f")), ("vs_fp16", "vs fp16", fmt(".2f")),
                                        ("note", "", str)]))

    measured = [r for r in rows if "ms_per_token" in r]
    title = f"{args.model} on {result['device']}, {args.dtype}"
    for name, draw, what in (("latency_tps_vs_batch", plots.throughput, "tokens/s vs batch"),
                             ("latency_ms_vs_context", plots.latency, "ms/token vs context")):
        if draw(measured, f"{what} ({title})", out / name) is None:
            print(f"no {what} plot: it needs one method measured at 2+ points", file=sys.stderr)
    print(f"\nresults: {out}/latency.json", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="speed benchmarks of the caches")
    sub = p.add_subparsers(dest="bench_command", required=True)
    q = sub.add_parser("latency", help="prefill time, decode ms/token, tokens/s and memory per method x batch x context")
    q.add_argument("--model", default="random:llama-3.1-8b",
                   help="random:llama-3.1-8b (default), random:qwen3-8b, random:tiny-llama, an HF id or a path")
    q.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method specs, e.g. kivi-2:group_size=32")
    q.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    q.add_argument("--context-lengths", type=int, nargs="+", default=[4096, 32768], help="prompt tokens")
    q.add_argument("--gen-len", type=int, default=128, help="decode steps per run")
    q.add_argument("--warmup", type=int, default=8, help="first decode steps not timed")
    q.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill in chunks of this many tokens (default: one forward), so that prefill "
                        "activations do not limit the batch")
    q.add_argument("--prefill-rows", type=int, default=None, metavar="N",
                   help="prefill N distinct prompts and repeat their cache rows up to the batch (default: every "
                        "row its own). Decode steps cost the same whatever the cache holds, so N=1 makes large "
                        "batches at long context (and --find-max-batch probes) fast; prefill ms then covers N rows")
    q.add_argument("--hf-baselines", nargs="*", default=None, metavar="NAME",
                   help="also time transformers' caches: hf-dynamic, hf-static-compiled, hf-quanto-2, hf-quanto-4 "
                        "(all when no name is given)")
    q.add_argument("--no-compile", action="store_true",
                   help="kvlab rows: replay the decode step without torch.compile of the decoder layers "
                        "(by default Inductor fuses the norms, RoPE and MLP gating around kvlab's cache kernels)")
    q.add_argument("--find-max-batch", action="store_true",
                   help="also find the largest batch that fits, per method and context, and time each method "
                        "there (tokens/s against fp16 at its own largest batch; CUDA only)")
    q.add_argument("--device", default=None, help="cuda if available, else cpu")
    q.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="bfloat16 on cuda, float32 on cpu")
    q.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    q.add_argument("--output-dir", default="results/bench")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_latency)
