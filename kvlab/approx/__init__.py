"""AxCore approximate-arithmetic emulation: FP4 weights, mpFPMA multipliers, grouped GEMM."""

from .formats import E1M2, E2M1, E3M0, FORMATS, FP4Format, FP4Weight, quantize_weight, round_to_format
from .gemm import approx_matmul
from .linear import VARIANTS, ApproxLinear, apply, approx_linear
from .mul import COMPENSATION, Multiplier, derive_compensation, fp16_approx_mul, multipliers
from .select import select_formats
from .tender import TenderLinear, quantize_activation, quantize_weight_per_channel

__all__ = [
    "COMPENSATION",
    "E1M2",
    "E2M1",
    "E3M0",
    "FORMATS",
    "VARIANTS",
    "ApproxLinear",
    "FP4Format",
    "FP4Weight",
    "Multiplier",
    "TenderLinear",
    "apply",
    "approx_linear",
    "approx_matmul",
    "derive_compensation",
    "fp16_approx_mul",
    "multipliers",
    "quantize_activation",
    "quantize_weight",
    "quantize_weight_per_channel",
    "round_to_format",
    "select_formats",
]
