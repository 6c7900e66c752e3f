"""``kvlab calibrate``: fit AQUA-KV's cross-layer predictors for a model.

1. Draw ``--nsamples`` non-overlapping windows of ``--seqlen`` tokens from the calibration text
   (by default a PG-19 book: keep it distinct from the WikiText-2 evaluation text).
2. Run the model over each window and catch the ``k_proj`` / ``v_proj`` outputs of every layer:
   pre-RoPE keys and values, all KV heads together (C = kv_heads * head_dim). They are kept in
   memory, or with ``--offload-activations`` in one memory-mapped file per layer on disk.
3. Fit the predictors layer by layer in closed loop (:func:`fit_closed_loop`); the last
   ``--valid-samples`` windows (a random subset: windows are shuffled) are held out and scored.
4. Print the per-layer relative MSE table and save the predictors file (model id, shapes,
   quantizers, RoPE, calibration settings, fit statistics).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from kvlab.tables import fmt, format_table

EVAL_DATASETS = ("wikitext2", "Salesforce/wikitext")

FIT_COLUMNS = [
    ("layer", "layer", str),
    ("key_pred_train", "K pred train", fmt(".4f")), ("key_pred_valid", "K pred valid", fmt(".4f")),
    ("value_pred_train", "V pred train", fmt(".4f")), ("value_pred_valid", "V pred valid", fmt(".4f")),
    ("key_recon", "K recon", fmt(".4f")), ("value_recon", "V recon", fmt(".4f")),
]


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="fit AQUA-KV cross-layer predictors (for the aqua-kv method)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), an HF id or a local path")
    p.add_argument("--dataset", default="pg19:moby_dick",
                   help="calibration text: pg19:<book> (default pg19:moby_dick), pg19, a text file, ...; "
                        "not the evaluation text (wikitext2)")
    p.add_argument("--data-dir", default=None, help="local data folder (default: $KVLAB_DATA_DIR)")
    p.add_argument("--nsamples", type=int, default=32, help="windows of --seqlen tokens, validation included")
    p.add_argument("--valid-samples", type=int, default=None, help="windows held out (default: nsamples // 8)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--edenn-d", type=int, default=2, help="HIGGS grid dimension of the residual quantizer")
    p.add_argument("--edenn-n", type=int, default=16, help="HIGGS grid points of the residual quantizer")
    p.add_argument("--first-layer-edenn-d", type=int, default=2, help="grid dimension for layer 0 (no predictor)")
    p.add_argument("--first-layer-edenn-n", type=int, default=256, help="grid points for layer 0")
    p.add_argument("--hadamard-groupsize", type=int, default=64, help="channels per Hadamard group and fp16 scale")
    p.add_argument("--damp", type=float, default=1e-3, help="ridge damping, relative to the mean Gram diagonal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="predictors.pt")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the collected K/V on disk (one memory-mapped file per layer), not in memory")
    p.add_argument("--offload-dir", default=None, help="folder for --offload-activations (default: a temp dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_calibrate)


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def _check_grid(flag: str, d: int, n: int) -> None:
    from kvlab.cli import UsageError

    if d < 1:
        raise UsageError(f"--{flag}edenn-d {d} must be at least 1")
    if not _is_power_of_two(n) or not 2 <= n <= 2**16:
        raise UsageError(f"--{flag}edenn-n {n} must be a power of two in [2, 65536]")


def _validate(args: argparse.Namespace):
    """Every check that needs no model weights; returns (config, calibration text)."""
    from kvlab import data, models
    from kvlab.cli import UsageError

    if args.nsamples < 2:
        raise UsageError(f"--nsamples {args.nsamples} must be at least 2 (training and validation windows)")
    if args.valid_samples is None:
        args.valid_samples = max(1, args.nsamples // 8)
    if not 1 <= args.valid_samples < args.nsamples:
        raise UsageError(f"--valid-samples {args.valid_samples} must be in [1, nsamples={args.nsamples})")
    if args.seqlen < 2:
        raise UsageError(f"--seqlen {args.seqlen} must be at least 2")
    if args.damp < 0:
        raise UsageError(f"--damp {args.damp} must be >= 0")
    _check_grid("", args.edenn_d, args.edenn_n)
    _check_grid("first-layer-", args.first_layer_edenn_d, args.first_layer_edenn_n)
    g = args.hadamard_groupsize
    if not _is_power_of_two(g) or g % args.edenn_d or g % args.first_layer_edenn_d:
        raise UsageError(f"--hadamard-groupsize {g} must be a power of two divisible by both grid dimensions")
    output = Path(args.output)
    if output.is_dir() or (output.parent.exists() and not output.parent.is_dir()):
        raise UsageError(f"--output {output} must be a file path")
    if args.offload_dir and not Path(args.offload_dir).is_dir():
        raise UsageError(f"--offload-dir {args.offload_dir} is not a directory")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a directory")
    if args.model.startswith("random:"):
        raise UsageError(f"{args.model} has random weights and no tokenizer; calibrate a real model")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads} must be >= 0")
    try:
        config = models.load_config(args.model)
        text = data.load_text(args.dataset, args.data_dir)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    width = _width(config)
    if width % g:
        raise UsageError(f"--hadamard-groupsize {g} does not divide kv_heads * head_dim = {width} of {args.model}")
    max_positions = models.max_context(config)
    if max_positions and args.seqlen > max_positions:
        raise UsageError(f"--seqlen {args.seqlen} exceeds the model's maximum of {max_positions} positions")
    if args.dataset in EVAL_DATASETS:
        print(f"kvlab calibrate: warning: {args.dataset} is the perplexity evaluation text; calibrating on it "
              "leaks the test set (use a PG-19 book, e.g. --dataset pg19:moby_dick)", file=sys.stderr)
    return config, text


def _width(config) -> int:
    from kvlab.cli import _head_dim

    text = config.get_text_config(decoder=True)
    return text.num_key_value_heads * _head_dim(config)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvlab.cli import UsageError

    try:
        return _calibrate(args)
    except UsageError as e:
        # Under `python -m kvlab.cli`, cli.py runs as __main__ and its main() catches __main__.UsageError,
        # another class than kvlab.cli.UsageError: report the error here so both entry points exit with 2.
        print(f"kvlab calibrate: error: {e}", file=sys.stderr)
        return 2


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from kvlab import models
    from kvlab.aquakv_cache import Rope
    from kvlab.aquakv_calibration import ActivationStore, collect, projections, summary
    from kvlab.aquakv_file import save_predictors_file
    from kvlab.cli import UsageError, _head_dim
    from kvlab.eval.ppl import draw_windows
    from kvlab.methods import build_method
    from kvlab.quant.higgs import HiggsQuantizer
    from kvlab.quant.predictors import fit_closed_loop

    config, text = _validate(args)
    text_config = config.get_text_config(decoder=True)
    num_layers, kv_heads, head_dim = text_config.num_hidden_layers, text_config.num_key_value_heads, _head_dim(config)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = models.load_model(args.model, device=args.device, dtype=torch.float32)
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer; calibration needs a real model")
    try:
        rope = Rope.from_model(model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    token_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    try:
        starts = draw_windows(token_ids.numel(), args.seqlen, args.nsamples, args.seed)
    except ValueError as e:
        raise UsageError(f"--dataset {args.dataset}: {e}") from None
    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    windows = [token_ids[starts[i] : starts[i] + args.seqlen] for i in order]  # the last ones are held out

    t0 = time.perf_counter()
    rows = args.nsamples * args.seqlen
    with tempfile.TemporaryDirectory(dir=args.offload_dir, prefix="kvlab-calibrate-") as tmp:
        store = ActivationStore(num_layers, rows, kv_heads * head_dim, Path(tmp) if args.offload_activations else None)
        try:
            collect(model, projections(model), windows, store, not args.quiet)
        except ValueError as e:
            raise UsageError(str(e)) from None
        del model
        t_collect = time.perf_counter() - t0
        print(f"collected {rows} tokens x {num_layers} layers in {t_collect:.0f} s; building grids ...",
              file=sys.stderr)
        quantizer = HiggsQuantizer(args.edenn_d, args.edenn_n, args.hadamard_groupsize)
        first = HiggsQuantizer(args.first_layer_edenn_d, args.first_layer_edenn_n, args.hadamard_groupsize)
        t1 = time.perf_counter()
        layers = (store.read(layer) for layer in tqdm(range(num_layers), desc="fit predictors", unit="layer",
                                                      disable=args.quiet))
        predictors, stats = fit_closed_loop(
            layers, quantizer, first, model_id=args.model, kv_heads=kv_heads, head_dim=head_dim,
            damp=args.damp, valid_rows=args.valid_samples * args.seqlen)
        t_fit = time.perf_counter() - t1

    calibration = {
        "dataset": args.dataset, "nsamples": args.nsamples, "valid_samples": args.valid_samples,
        "seqlen": args.seqlen, "seed": args.seed, "damp": args.damp, "tokens": rows,
        "collect_seconds": t_collect, "fit_seconds": t_fit, "threads": torch.get_num_threads(),
    }
    save_predictors_file(args.output, predictors, rope, calibration, stats)
    print(format_table([vars(s) for s in stats], FIT_COLUMNS))
    method = build_method("aqua-kv", predictors=args.output, edenn_d=args.edenn_d, edenn_n=args.edenn_n,
                          hadamard_groupsize=args.hadamard_groupsize)
    print(summary(stats, method))
    print(f"\ncollect {t_collect:.0f} s, fit {t_fit:.0f} s; predictors: {args.output}", file=sys.stderr)
    return 0
