"""Calibration helpers for AQUA-KV: catch pre-RoPE K/V, store them, summarise the fit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kvlab.aquakv_cache import predictor_parameters


class ActivationStore:
    """Per-layer [rows, 2, C] float32 arrays (keys, values): in memory, or memory-mapped files on disk."""

    def __init__(self, num_layers: int, rows: int, width: int, offload_dir: Path | None) -> None:
        shape = (rows, 2, width)
        if offload_dir is None:
            self.layers = [np.zeros(shape, dtype=np.float32) for _ in range(num_layers)]
        else:
            self.layers = [np.lib.format.open_memmap(offload_dir / f"layer{l:03d}.npy", mode="w+",
                                                     dtype=np.float32, shape=shape) for l in range(num_layers)]

    def write(self, layer: int, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[0]
        self.layers[layer][row : row + n, 0] = keys.float().cpu().numpy()
        self.layers[layer][row : row + n, 1] = values.float().cpu().numpy()

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = torch.from_numpy(self.layers[layer])
        return kv[:, 0].contiguous(), kv[:, 1].contiguous()


def projections(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(k_proj, v_proj) of each attention layer, in layer order."""
    text_config = model.config.get_text_config(decoder=True)
    attn = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")]
    if len(attn) != text_config.num_hidden_layers:
        raise ValueError(f"found {len(attn)} attention modules with k_proj/v_proj, "
                         f"expected one per layer ({text_config.num_hidden_layers})")
    return [(m.k_proj, m.v_proj) for m in attn]


@torch.inference_mode()
def collect(model, projections: list[tuple[torch.nn.Module, torch.nn.Module]], windows: list[torch.Tensor],
            store: ActivationStore, progress: bool) -> None:
    """Run ``model``'s decoder over each window; store each layer's k_proj / v_proj outputs."""
    decoder = model.get_decoder()  # skips the LM head, which only costs time here
    caught: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for layer, (k_proj, v_proj) in enumerate(projections):
        for name, module in (("k", k_proj), ("v", v_proj)):
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, key=(layer, name): caught.__setitem__(key, out[0])))
    device = next(model.parameters()).device
    try:
        for i, ids in enumerate(tqdm(windows, desc="collect K/V", unit="window", disable=not progress)):
            decoder(ids.unsqueeze(0).to(device), use_cache=False)
            for layer in range(len(store.layers)):
                store.write(layer, i * ids.numel(), caught[layer, "k"], caught[layer, "v"])
            caught.clear()
    finally:
        for h in hooks:
            h.remove()


def summary(stats, method) -> str:
    """Mean relMSEs over the predicted layers, and bits per value without / with the predictor weights."""
    predicted = [s for s in stats if s.layer > 0]

    def mean(key: str) -> float:
        return float(np.mean([getattr(s, key) for s in predicted])) if predicted else math.nan

    p = method.codec.predictors
    amortised = ", ".join(f"{tokens // 1024}K tokens +{method.predictor_bits_per_value(tokens):.3f}"
                          for tokens in (1024, 8192, 32768))
    return "\n".join([
        f"\nlayers 1..{p.num_layers - 1} mean relMSE: K pred train {mean('key_pred_train'):.4f} valid "
        f"{mean('key_pred_valid'):.4f}; V pred train {mean('value_pred_train'):.4f} valid "
        f"{mean('value_pred_valid'):.4f}; recon K {mean('key_recon'):.4f} V {mean('value_recon'):.4f}",
        f"bits/value of compressed tokens: {method.bits_per_value(p.head_dim):.3f} "
        f"(layer 0: {p.first_layer_quantizer.bits_per_value:.3f}); predictors: "
        f"{predictor_parameters(p) / 1e6:.2f} M parameters, at 16 bits amortised over a cache of {amortised} bits/value",
        f"use: --methods aqua-kv:{method.label.partition(':')[2]}",
    ])
