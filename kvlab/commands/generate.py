"""``kvlab generate``: greedy generation from a prompt through one compressed cache (``kvlab.generate``)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate from a prompt with a compressed cache (greedy)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), an HF id or a local path")
    p.add_argument("--method", default="kivi-2", help="a method spec, e.g. kitty-pro or kivi-2:group_size=32")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="auto: apply the model's chat template when it has one")
    p.add_argument("--no-compile", action="store_true", help="CUDA: do not torch.compile the decoder layers")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="bfloat16 on cuda, float32 on cpu")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import kvlab
    from kvlab import models
    from kvlab.cli import UsageError, _head_dim, _methods

    method = _methods([args.method])[0]
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if not args.prompt:
        raise UsageError("the prompt is empty")
    if args.model.startswith("random:"):
        raise UsageError(f"{args.model} has no tokenizer; generate needs a real model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    try:
        method.check_head_dim(_head_dim(models.load_config(args.model)))
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    model, tokenizer = models.load_model(args.model, device=device, dtype=dtype)
    chat = args.chat_template == "on" or (args.chat_template == "auto" and tokenizer.chat_template)
    if args.chat_template == "on" and not tokenizer.chat_template:
        raise UsageError(f"{args.model} has no chat template")
    text = (tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                          add_generation_prompt=True) if chat else args.prompt)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids
    t0 = time.perf_counter()
    out = kvlab.generate(model, ids, method, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id or 0, compile=not args.no_compile)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    answer = tokenizer.decode(new, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"model": args.model, "method": method.label, "prompt": args.prompt, "text": answer,
                          "prompt_tokens": ids.shape[1], "new_tokens": int(new.numel()), "seconds": seconds}))
    else:
        print(answer)
        print(f"[{method.label}: {new.numel()} tokens in {seconds:.1f} s on {device}]", file=sys.stderr)
    return 0
