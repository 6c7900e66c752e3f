"""The ``kvlab`` command line. Every option is validated before any model loads: a user
mistake prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from kvlab.tables import fmt, format_table

DEFAULT_PPL_METHODS = ["fp16", "kivi-2", "kivi*-2", "kitty-pro"]


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""


def _methods(specs: list[str]):
    from kvlab.methods import parse_method

    methods = []
    for spec in specs:
        try:
            methods.append(parse_method(spec))
        except ValueError as e:
            raise UsageError(str(e)) from None
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate methods in --methods: {labels}")
    return methods


def _with_budgets(methods: list, sparsities: list[float] | None, budget: int | None) -> list:
    """Each eviction method once per ``--sparsity`` (or with ``--budget``); other methods once."""
    evicting = [m for m in methods if hasattr(m, "with_budget")]
    if (sparsities or budget is not None) and not evicting:
        raise UsageError("--sparsity/--budget apply to eviction methods (streamingllm, h2o, cab, snapkv, a+b); none given")
    out = []
    try:
        for m in methods:
            if not hasattr(m, "with_budget"):
                out.append(m)
            elif budget is not None:
                out.append(m.with_budget(budget=budget))
            elif sparsities:
                out.extend(m.with_budget(sparsity=s) for s in sparsities)
            else:
                out.append(m)
    except ValueError as e:
        raise UsageError(str(e)) from None
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate methods after applying --sparsity/--budget: {labels}")
    return out


def unit_filename(method, context_length: int, seed: int) -> str:
    if hasattr(method, "budget_tag"):
        return f"{file_label(method.base_label)}_{method.budget_tag}_ctx{context_length}_seed{seed}.json"
    return f"{file_label(method.label)}_seed{seed}.json"


def file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label.replace("*", "star"))


def cmd_methods(args: argparse.Namespace) -> int:
    from kvlab.methods import PRESETS, build_method

    rows = []
    for name in sorted(PRESETS):
        m = build_method(name)
        rows.append({
            "name": name,
            "params": ", ".join(f"{k}={v}" for k, v in m.params().items()) or "-",
            "bits": m.bits_per_value(args.head_dim),
            "all_in": m.all_in_bits(32768, args.head_dim),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows, [
        ("name", "method", str), ("params", "parameters", str),
        ("bits", f"bits/value (quantized, head_dim={args.head_dim})", fmt(".3f")),
        ("all_in", "bits/value all-in @32K", fmt(".3f")),
    ]))
    print("\nSet any parameter as name:key=value[,key=value], e.g. kivi-2:group_size=32,sinks=32")
    return 0


def _check_run_options(args: argparse.Namespace, methods: list) -> None:
    """Seeds, threads, output folder and device, checked before anything loads."""
    import torch

    if not args.seeds:
        raise UsageError("--seeds needs at least one seed")
    if min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds {' '.join(map(str, args.seeds))}: seeds must be distinct and non-negative")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads} must be >= 0 (0: torch's default)")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UsageError(f"--output-dir {args.output_dir} exists and is not a directory")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: kvlab runs on cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    gpu_only = [m.label for m in methods if getattr(m, "requires_cuda", False)]
    if gpu_only and device.type != "cuda":
        raise UsageError(f"{', '.join(gpu_only)} run(s) on CUDA only; use --device cuda")


def cmd_ppl(args: argparse.Namespace) -> int:
    _, agg = run_ppl(args)
    print_ppl_summary(agg)
    print(f"\nresults: {args.output_dir}/", file=sys.stderr)
    return 0


def print_ppl_summary(agg: dict) -> None:
    print(format_table(agg["methods"], PPL_COLUMNS + CACHE_COLUMNS))
    if agg["paired_vs_baseline"]:
        print(f"\nPaired vs {agg['baseline']} over the same windows ({agg['correction']}):")
        print(format_table(agg["paired_vs_baseline"], PAIRED_COLUMNS))


def run_ppl(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Validate, run (resuming finished units) and aggregate ``kvlab ppl``; returns (units, aggregate)."""
    import torch

    from kvlab import data, models
    from kvlab.eval.aggregate import aggregate
    from kvlab.eval.ppl import PplConfig, draw_windows, run_unit, sequence_windows, validate
    from kvlab.results import PartialLog, config_hash, load_finished, partial_path, write_json

    if args.budget is not None and args.budget < 1:
        raise UsageError(f"--budget {args.budget} must be at least 1")
    for s in args.sparsity or []:
        if not 0 <= s < 1:
            raise UsageError(f"--sparsity {s} must be in [0, 1)")
    methods = _with_budgets(_methods(args.methods), args.sparsity, args.budget)
    _check_run_options(args, methods)
    extra = _approx_protocol_config(args, methods)
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a directory")
    cfg = PplConfig(args.model, args.dataset, args.context_length, args.prefill, args.num_samples,
                    args.chunk_size, args.dtype)
    if args.protocol == "full-sequence":  # every token of a --seqlen window scored; window count set below
        cfg = PplConfig(args.model, args.dataset, args.seqlen, 1, args.max_windows or 1, 1, args.dtype)
    try:
        config = models.load_config(args.model)
        validate(cfg, models.max_context(config))
        head_dim = _head_dim(config)
        for m in methods:
            m.check_head_dim(head_dim)
        text = data.load_text(args.dataset, args.data_dir)
        calib_text = data.load_text(args.calib_dataset, args.data_dir) if "calib_dataset" in extra else None
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = models.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer; perplexity needs a real model")
    token_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    try:
        if args.protocol == "full-sequence":
            starts = sequence_windows(token_ids.numel(), cfg.context_length, args.max_windows)
            cfg = dataclasses.replace(cfg, num_samples=len(starts))
        for seed in args.seeds:
            draw_windows(token_ids.numel(), cfg.context_length, cfg.num_samples, seed)
    except ValueError as e:
        raise UsageError(str(e)) from None

    if args.approx:
        _apply_approx(model, tokenizer, args.approx, calib_text)

    out = Path(args.output_dir)
    units, todo = [], []
    for seed in args.seeds:
        for m in methods:
            unit_cfg = {**cfg.as_dict(), "method": m.label, "method_params": m.params(), "seed": seed, **extra}
            chash = config_hash(unit_cfg)
            path = out / unit_filename(m, cfg.context_length, seed)
            done = load_finished(path, chash)
            if done:
                partial_path(path).unlink(missing_ok=True)  # left by a crash between the two writes
                units.append(done)
            else:
                todo.append((m, seed, path, unit_cfg, chash, PartialLog(partial_path(path), chash)))
    windows_done = sum(len(log.records) for *_, log in todo)
    if units or windows_done:
        print(f"resuming: {len(units)} finished units found in {out}, {len(todo)} to run "
              f"({windows_done} of their windows already done)", file=sys.stderr)
    from tqdm.auto import tqdm

    steps = (len(todo) * cfg.num_samples - windows_done) * (cfg.context_length - cfg.prefill - 1)
    with tqdm(total=steps, unit="tok", desc="ppl", disable=args.quiet) as bar:
        for m, seed, path, unit_cfg, chash, log in todo:
            bar.set_postfix_str(f"{m.label} seed={seed}")
            unit = run_unit(model, token_ids, cfg, m, seed, bar, done=log.records, on_window=log.append,
                            protocol=args.protocol)
            unit.update(config=unit_cfg, config_hash=chash,
                        bits_quantized_nominal=m.bits_per_value(head_dim),
                        bits_all_in_32k=m.all_in_bits(32768, head_dim))
            write_json(path, unit)
            log.remove()
            units.append(unit)

    labels = [m.label for m in methods]
    agg = aggregate(units, baseline="dense" if "dense" in labels else "fp16")
    _add_cache_sizes(agg["methods"], units)
    agg["config"] = {**cfg.as_dict(), "seeds": args.seeds, "methods": labels, **extra}
    write_json(out / "aggregated_results.json", agg)
    return units, agg


APPROX_GROUP_SIZE = 64  # FP4 weight groups (the artifact's setting for Llama models)
CALIB_TOKENS = (4096, 4608)  # slice of the calibration text for --approx axcore (past a Gutenberg header)


def _approx_protocol_config(args: argparse.Namespace, methods: list) -> dict:
    """Checks --approx / --protocol before any model loads; returns what they add to each unit's
    config (nothing for the defaults, so earlier results keep their config hashes)."""
    from kvlab.approx import VARIANTS

    extra: dict = {}
    if args.approx is not None:
        if args.approx not in VARIANTS:
            raise UsageError(f"unknown --approx {args.approx!r}; valid: {', '.join(VARIANTS)}")
        extra.update(approx=args.approx, approx_group_size=APPROX_GROUP_SIZE)
        if args.approx == "axcore":
            if args.calib_dataset == args.dataset:
                raise UsageError(f"--calib-dataset {args.calib_dataset} must differ from --dataset (calibrate on other text)")
            extra.update(calib_dataset=args.calib_dataset, calib_tokens=list(CALIB_TOKENS))
        own = [m.label for m in methods if getattr(m, "needs_kvlab_attention", False)]
        if args.approx == "tender-int4" and own:
            raise UsageError(f"--approx tender-int4 replaces the attention function; {', '.join(own)} run their own attention")
    if args.protocol == "full-sequence":
        if len(args.seeds) > 1:
            raise UsageError("--protocol full-sequence scores fixed windows from the start of the text: give one seed")
        if args.max_windows < 0:
            raise UsageError(f"--max-windows {args.max_windows} must be >= 0 (0: all windows)")
        extra.update(protocol="full-sequence")
    return extra


def _apply_approx(model, tokenizer, variant: str, calib_text: str | None) -> None:
    """Swap the model's linear layers (not lm_head) for ``variant``'s approximate ones, once."""
    from kvlab import approx

    calib = None
    if calib_text is not None:
        ids = tokenizer(calib_text, return_tensors="pt", add_special_tokens=False).input_ids
        calib = ids[:, CALIB_TOKENS[0] : CALIB_TOKENS[1]].to(model.device)
        if calib.numel() == 0:
            raise UsageError(f"the calibration text has {ids.shape[1]} tokens, fewer than {CALIB_TOKENS[0]}")
    print(f"applying --approx {variant} ...", file=sys.stderr)
    approx.apply(model, variant, group_size=APPROX_GROUP_SIZE, calib=calib)


PPL_COLUMNS = [
    ("method", "method", str), ("ppl_mean", "ppl", fmt(".3f")), ("ppl_std", "std", fmt(".3f")),
    ("rel_to_baseline", "vs fp16", fmt("+.1%")),
    ("bits_per_value_quantized", "bits (quant part)", fmt(".3f")),
    ("bits_per_value_all_in_fp16", "bits all-in", fmt(".2f")), ("bits_all_in_32k", "all-in @32K", fmt(".2f")),
    ("cache_bytes", "cache MB", lambda v: f"{v / 1e6:.2f}"), ("tokens_per_s", "tok/s", fmt(".1f")),
]
CACHE_COLUMNS = [
    ("avg_cache_tokens", "avg kept", fmt(".1f")), ("final_cache_tokens", "final kept", fmt(".0f")),
    ("peak_cache_bytes", "peak cache MB", lambda v: f"{v / 1e6:.2f}"),
]


def _add_cache_sizes(summaries: list[dict], units: list[dict]) -> None:
    """Mean over seeds of the per-unit cache sizes (units from before these fields get NaN)."""
    import numpy as np

    for s in summaries:
        us = [u for u in units if u["method"] == s["method"]]
        for key, _, _ in CACHE_COLUMNS + [("peak_memory_mb", "", None)]:
            if any(key in u for u in us):
                s[key] = float(np.mean([u.get(key, float("nan")) for u in us]))


PAIRED_COLUMNS = [
    ("method", "method", str), ("n", "windows", str), ("ppl_ratio", "ppl ratio", fmt(".4f")),
    ("mean_diff", "d log-ppl", fmt("+.4f")), ("ci_low", "95% CI low", fmt("+.4f")),
    ("ci_high", "high", fmt("+.4f")), ("p_holm", "p (Holm)", fmt(".2g")), ("stars", "", str),
]


def _head_dim(config) -> int:
    c = config.get_text_config(decoder=True)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


# Further subcommands live in their own modules, each with ``register(subparsers)``.
COMMAND_MODULES: list[str] = [
    "kvlab.commands.calibrate", "kvlab.commands.report", "kvlab.commands.eval", "kvlab.commands.fidelity",
    "kvlab.commands.genbench", "kvlab.commands.bench", "kvlab.commands.generate",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="kvlab", description="Compressed KV caches for transformers: methods and bench")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)

    m = sub.add_parser("methods", help="list every method with its parameters and bits per value")
    m.add_argument("--head-dim", type=int, default=128)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_methods)

    q = sub.add_parser("ppl", help="perplexity with the compressed cache in the decode loop")
    add_ppl_arguments(q)
    q.set_defaults(func=cmd_ppl)
    return p


def add_ppl_arguments(q: argparse.ArgumentParser) -> None:
    """The options of ``kvlab ppl`` (shared by ``kvlab genbench``, which changes some defaults)."""
    q.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), an HF id or a local path")
    q.add_argument("--methods", nargs="+", default=DEFAULT_PPL_METHODS, help="method specs, e.g. kivi-2:group_size=32")
    q.add_argument("--dataset", default="wikitext2", help="wikitext2, pg19, pg19:<book>, a text file, or an HF dataset")
    q.add_argument("--data-dir", default=None, help="local data folder (default: $KVLAB_DATA_DIR)")
    q.add_argument("--context-length", type=int, default=1024)
    q.add_argument("--prefill", type=int, default=512)
    q.add_argument("--num-samples", type=int, default=2, help="windows per seed")
    q.add_argument("--seeds", type=int, nargs="+", default=[0])
    q.add_argument("--chunk-size", type=int, default=1, help="tokens fed per decode call")
    b = q.add_mutually_exclusive_group()
    b.add_argument("--sparsity", type=float, nargs="+", default=None,
                   help="eviction methods run once per sparsity: keep (1 - s) x tokens seen, e.g. 0.5 0.7 0.9")
    b.add_argument("--budget", type=int, default=None, help="eviction methods keep this many tokens per head")
    q.add_argument("--output-dir", default="results/ppl")
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.add_argument("--approx", default=None, help="AxCore arithmetic in every linear layer but lm_head: fp4-exact, "
                   "mpfpma, mpfpma+s, mpfpma+s+c, axcore or tender-int4 (kvlab.approx)")
    q.add_argument("--calib-dataset", default="pg19:moby_dick", help="calibration text for --approx axcore")
    q.add_argument("--protocol", default="cache-loop", choices=["cache-loop", "full-sequence"],
                   help="cache-loop: prefill, then token by token (default); full-sequence: consecutive --seqlen "
                        "windows each scored with one forward (standard HF perplexity, the AxCore artifact's)")
    q.add_argument("--seqlen", type=int, default=2048, help="window length of --protocol full-sequence")
    q.add_argument("--max-windows", type=int, default=0, help="--protocol full-sequence: the first N windows (0: all)")


def _check_kernel_tuning() -> None:
    """The KVLAB_* kernel launch overrides, checked before any work (the kernels read them at their first launch)."""
    from kvlab.kernels.decode_attention import tuning_overrides

    try:
        tuning_overrides()
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_kernel_tuning()
        return args.func(args)
    except UsageError as e:
        print(f"kvlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the canonical module's main: subcommand modules raise ``kvlab.cli.UsageError``, which
    # is not this ``__main__`` module's class.
    from kvlab.cli import main as canonical_main

    sys.exit(canonical_main())
