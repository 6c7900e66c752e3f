"""Approximate linear layer and ``apply(model, variant=...)`` swapping it into a HF model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .formats import E2M1, FP4Weight, quantize_weight
from .gemm import GemmPlan
from .mul import multipliers
from .select import select_formats
from .tender import ATTENTION as TENDER_ATTENTION
from .tender import TenderLinear

FP4_VARIANTS = ("fp4-exact", "mpfpma", "mpfpma+s", "mpfpma+s+c", "axcore")
VARIANTS = FP4_VARIANTS + ("tender-int4",)


class ApproxLinear(nn.Module):
    """Linear layer computing ``x @ W^T + b`` with FP4 ``W`` through the emulated AxCore GEMM."""

    def __init__(self, weight: FP4Weight, bias: torch.Tensor | None, variant: str, approx_dequant: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.variant, self.approx_dequant = variant, approx_dequant
        self.group_size, self.tile_rows = weight.group_size, weight.tile_rows
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("tile_formats", weight.tile_formats)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float16))
        self._plan = GemmPlan(weight, multipliers(variant))  # built once: the buffers are not meant to change

    @property
    def weight_fp4(self) -> FP4Weight:
        return FP4Weight(self.codes, self.scales, self.tile_formats, self.group_size, self.tile_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._plan.matmul(x, self.approx_dequant)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, variant={self.variant}, group={self.group_size}"


def approx_linear(
    linear: nn.Linear,
    variant: str,
    group_size: int,
    calib: torch.Tensor | None = None,
    approx_dequant: bool = False,
) -> nn.Module:
    """The approximate replacement of one ``nn.Linear``; ``calib [T, K]`` needed for ``axcore``."""
    _check_variant(variant)
    w = linear.weight.detach()
    if variant == "tender-int4":
        return TenderLinear(linear)
    if variant == "axcore":
        if calib is None:
            raise ValueError("variant 'axcore' needs calibration activations")
        q, _ = select_formats(w, group_size, calib, multipliers("axcore"), approx_dequant=approx_dequant)
    else:
        q = quantize_weight(w, E2M1, group_size)
    return ApproxLinear(q, linear.bias, variant, approx_dequant)


@torch.no_grad()
def apply(
    model: nn.Module,
    variant: str,
    group_size: int = 128,
    calib: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    max_calib_rows: int = 512,
    approx_dequant: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` except ``lm_head`` in place; returns ``model``.

    ``tender-int4`` also switches a transformers model to the INT4 attention
    (``tender.tender_attention``): the attention products are INT4 too.

    ``calib`` (``axcore`` only): token ids ``[B, T]`` run through the unmodified model to
    record each layer's input, or a ``{module name: activations [..., K]}`` mapping.
    At most ``max_calib_rows`` rows per layer are used.
    """
    _check_variant(variant)
    targets = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.split(".")[-1] != "lm_head"
    }
    acts: Mapping[str, torch.Tensor] = {}
    if variant == "axcore":
        if calib is None:
            raise ValueError("variant 'axcore' needs calib (token ids or per-layer activations)")
        acts = calib if isinstance(calib, Mapping) else _record_inputs(model, targets, calib, max_calib_rows)
    for name, mod in targets.items():
        x = acts.get(name)
        if x is not None:
            x = x.reshape(-1, mod.in_features)[:max_calib_rows]
        new = approx_linear(mod, variant, group_size, x, approx_dequant)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if variant == "tender-int4" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(TENDER_ATTENTION)
    return model


def _record_inputs(model: nn.Module, targets: Mapping[str, nn.Module], ids: torch.Tensor, max_rows: int):
    acts: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, inputs, _out):
            if name not in acts:
                acts[name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[:max_rows].clone()

        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in targets.items()]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return acts


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown approx variant {variant!r}; valid: {', '.join(VARIANTS)}")
