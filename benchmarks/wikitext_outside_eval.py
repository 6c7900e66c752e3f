"""Write the WikiText-2 test text minus the `kvlab ppl` evaluation windows, as calibration text.

    python benchmarks/wikitext_outside_eval.py --context-length 1024 --num-samples 4 --seeds 0 \
        --output results/aquakv/wikitext2_outside_eval.txt

The windows are drawn exactly as `kvlab ppl` draws them (same tokenizer, same seeds); the text
between them is decoded back and joined by blank lines, so no calibration window can contain an
evaluated token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvlab import data, models
from kvlab.eval.ppl import draw_windows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--output", required=True)
    args = p.parse_args()
    _, tokenizer = models.load_model(args.model)
    ids = tokenizer(data.load_text("wikitext2"), add_special_tokens=False).input_ids
    taken = sorted({s for seed in args.seeds for s in draw_windows(len(ids), args.context_length, args.num_samples, seed)})
    pieces, prev = [], 0
    for start in taken + [len(ids)]:
        if start > prev:
            pieces.append(tokenizer.decode(ids[prev:start]))
        prev = start + args.context_length
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n\n".join(pieces))
    print(f"{len(ids) - len(taken) * args.context_length} of {len(ids)} tokens kept; windows {taken} removed")


if __name__ == "__main__":
    main()
