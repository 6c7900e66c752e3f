"""Generation fidelity of a compressed cache against the full-precision one.

For each prompt the model first generates greedily with the fp16 cache, token by token, keeping
the log-probabilities of every step (the reference). That text is then teacher-forced through each
method's cache: the prompt is prefilled, then the fp16 tokens are fed one at a time, so every
position attends to the method's compressed past exactly as in decoding. Per position we compare
the method's distribution with the reference: top-1 agreement and KL(fp16 || method).

The first greedy divergence needs no separate free-running generation: until the method's argmax
first differs from the fp16 token, free generation with the method feeds exactly the tokens that
teacher forcing feeds, so the first position where the teacher-forced argmax differs *is* where
free greedy generation with the method would first leave the fp16 text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from kvlab.cache import make_cache
from kvlab.models import cache_kwargs

StopCheck = Callable[[list[int]], bool]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[0, -1].float(), dim=-1)


@torch.inference_mode()
def decode(model, method, prompt_ids: torch.Tensor, max_new_tokens: int, forced: list[int] | None = None,
           stop: StopCheck | None = None) -> tuple[list[int], torch.Tensor]:
    """Prefill ``prompt_ids`` (shape [1, n]) into a fresh ``method`` cache, then decode one token per step.

    With ``forced`` the given tokens are fed (teacher forcing); without, the argmax is fed (greedy)
    until ``max_new_tokens`` or ``stop(tokens)``. Returns the tokens and the log-probabilities of
    each position, ``[len(tokens), vocab]``, row ``i`` predicting token ``i``.
    """
    cache = make_cache(method, model)
    out = model(prompt_ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    steps = len(forced) if forced is not None else max_new_tokens
    tokens: list[int] = []
    rows = []
    for i in range(steps):
        lp = _log_probs(out.logits)
        rows.append(lp)
        tokens.append(forced[i] if forced is not None else int(lp.argmax()))
        if i + 1 == steps or (forced is None and stop is not None and stop(tokens)):
            break
        next_id = torch.tensor([[tokens[-1]]], device=prompt_ids.device)
        out = model(next_id, **cache_kwargs(model, cache), use_cache=True)
    return tokens, torch.stack(rows) if rows else torch.empty(0)


def stop_check(tokenizer, eos_ids: Iterable[int], stop_strings: Iterable[str]) -> StopCheck:
    """True once the last token is an end token or the decoded text holds a stop string."""
    eos, stops = set(eos_ids), [s for s in stop_strings if s]

    def check(tokens: list[int]) -> bool:
        if tokens[-1] in eos:
            return True
        text = tokenizer.decode(tokens[-16:], skip_special_tokens=False)
        return any(s in text for s in stops)

    return check


@dataclass
class Comparison:
    """Per-position comparison of one method with the reference on one prompt."""

    agree: list[bool]
    kl: list[float]

    @property
    def first_divergence(self) -> int | None:
        """Index of the first generated token where free greedy decoding with the method differs (None: never)."""
        return next((i for i, a in enumerate(self.agree) if not a), None)


def compare(ref_tokens: list[int], ref_lp: torch.Tensor, lp: torch.Tensor) -> Comparison:
    """Top-1 agreement with the fp16 tokens (the reference argmax) and KL(fp16 || method) per position."""
    agree = (lp.argmax(-1) == torch.tensor(ref_tokens, device=lp.device)).tolist()
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).tolist()
    return Comparison(agree, kl)


def bucketize(per_problem: list[dict], bucket: int) -> list[dict]:
    """Agreement and KL pooled over all tokens of all problems, in position buckets of ``bucket`` tokens."""
    agree: dict[int, list[float]] = {}
    kl: dict[int, list[float]] = {}
    for p in per_problem:
        for i, (a, k) in enumerate(zip(p["agree"], p["kl"])):
            agree.setdefault(i // bucket, []).append(float(a))
            kl.setdefault(i // bucket, []).append(k)
    return [{"start": b * bucket, "end": (b + 1) * bucket, "tokens": len(agree[b]),
             "agreement": float(np.mean(agree[b])), "kl": float(np.mean(kl[b]))} for b in sorted(agree)]


def summarize_method(method: str, per_problem: list[dict], bucket: int) -> dict:
    """Pooled per-token agreement and KL, first-divergence statistics, and the position buckets."""
    agree = [float(a) for p in per_problem for a in p["agree"]]
    kl = [k for p in per_problem for k in p["kl"]]
    firsts = [p["first_divergence"] for p in per_problem]
    diverged = [f for f in firsts if f is not None]
    # Median over problems, a problem that never diverged counting as +inf (undefined if most never did).
    ordered = sorted(f if f is not None else float("inf") for f in firsts)
    median = ordered[(len(ordered) - 1) // 2] if ordered else float("nan")
    summary = {
        "method": method, "problems": len(per_problem), "tokens": len(agree),
        "top1_agreement": float(np.mean(agree)) if agree else float("nan"),
        "kl_mean": float(np.mean(kl)) if kl else float("nan"),
        "diverged_fraction": len(diverged) / len(firsts) if firsts else float("nan"),
        "first_divergence_median": median if median != float("inf") else None,
        "first_divergence_mean_diverged": float(np.mean(diverged)) if diverged else None,
        "buckets": bucketize(per_problem, bucket),
    }
    # the fields kvlab report reads ("kind": "fidelity")
    summary.update(positions=[(b["start"] + b["end"]) // 2 for b in summary["buckets"]],
                   agreement=[b["agreement"] for b in summary["buckets"]],
                   per_sample=[float(np.mean(p["agree"])) for p in per_problem if p["agree"]],
                   mean=summary["top1_agreement"])
    return summary


def plot(summaries: list[dict], path_stem: str, title: str) -> list[str]:
    """Agreement and KL against position, one line per method; writes ``<stem>.png`` and ``.svg``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        mids = [(b["start"] + b["end"]) / 2 for b in s["buckets"]]
        ax_a.plot(mids, [b["agreement"] for b in s["buckets"]], marker="o", label=s["method"])
        ax_k.plot(mids, [b["kl"] if b["kl"] > 0 else float("nan") for b in s["buckets"]], marker="o",
                  label=s["method"])  # a KL of 0 (fp16 itself) has no place on the log axis
    ax_a.set(xlabel="generated token position", ylabel="top-1 agreement with fp16", ylim=(0, 1.02))
    ax_k.set(xlabel="generated token position", ylabel="KL(fp16 || method), nats", yscale="log")
    ax_a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths = [f"{path_stem}.png", f"{path_stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths
