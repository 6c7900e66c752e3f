"""Bit-level emulation of AxCore's approximate multipliers.

mpFPMA multiplies an fp16 activation by an FP4 weight with one integer add: the FP4 code is
placed in an fp16 bit pattern (exponent field in the low exponent bits, mantissa field in
the top mantissa bits) and the product's magnitude bits are ``|a|bits + pattern - offset``
where ``offset = bias << 10`` re-biases the weight exponent. Because ``(1+x)(1+y) >= 1+x+y``,
this underestimates; +C adds a per-format constant in fp16 ulps. FP4 subnormals have no
implicit one, so +S rewrites them as a normal number (exactly, or nearly for E1M2's 1.5).

Every variant is therefore one signed constant ``d[j]`` per magnitude index:
``product bits = |a|bits + d[j]`` (sign = XOR), zero operands give +0, results <= 0 give a
signed zero, results reaching the inf pattern saturate to inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import FORMATS, FP4Format

MANT_BITS = 10
EXP_ONE = 1 << MANT_BITS  # one unit of the fp16 exponent field
FP16_ONE = 0x3C00
INF_BITS = 0x7C00

# Compensation constants in fp16 ulps, as in the artifact (E3M0's products are exact).
# tests/test_approx_mul.py checks them against derive_compensation().
COMPENSATION = {"e3m0": 0, "e2m1": 43, "e1m2": 54, "fp16": 58}


def derive_compensation(weight_mbits: int, act_mbits: int = MANT_BITS) -> int:
    """Mean log2 error of the integer-add product, in fp16 ulps, truncated.

    Activation mantissas x range over the fp16 grid, weight mantissas y over the normal
    codes' ``2**weight_mbits`` values, both uniform. A carry out of the mantissa (x+y >= 1)
    doubles the exponent and leaves x+y-1, i.e. the approximate value is 2(x+y).
    """
    x = torch.arange(1 << act_mbits, dtype=torch.float64) / (1 << act_mbits)
    y = torch.arange(1 << weight_mbits, dtype=torch.float64) / (1 << weight_mbits)
    x, y = x[:, None], y[None, :]
    s = x + y
    approx = torch.where(s < 1, 1 + s, 2 * s)
    err = torch.log2((1 + x) * (1 + y) / approx).mean().item()
    return math.floor(err * EXP_ONE)


@dataclass(frozen=True)
class Multiplier:
    """One multiply variant for one FP4 format: ``exact`` (fp16-rounded true product) or
    mpFPMA with optional +S (``subnormal``) and +C (``compensate``)."""

    fmt: FP4Format
    exact: bool = False
    subnormal: bool = True
    compensate: bool = True

    def offsets(self) -> list[int]:
        """``d[j]`` for j = 1..7 (index 0 unused: code 0 is zero)."""
        fmt, d = self.fmt, [0]
        c = COMPENSATION[fmt.name] if self.compensate else 0
        for j in range(1, 8):
            e, m = fmt.fields(j)
            if e == 0 and self.subnormal:
                # m * 2**(1-bias-mbits) = 2**p * (1 + f) with the leading one of m made implicit
                top = m.bit_length() - 1
                p = top + 1 - fmt.bias - fmt.mbits
                frac = (m - (1 << top)) << (MANT_BITS - top)
                d.append((p << MANT_BITS) + frac + c)
            else:
                pattern = (e << MANT_BITS) | (m << (MANT_BITS - fmt.mbits))
                d.append(pattern - (fmt.bias << MANT_BITS) + c)
        return d

    def __call__(self, a: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Elementwise signed product of fp16 ``a`` and 4-bit ``codes`` (broadcasting)."""
        a, codes = torch.broadcast_tensors(a, codes)
        j = (codes & 7).long()
        if self.exact:
            return a.float().mul(self.fmt.values().to(a.device)[codes.long()]).to(torch.float16)
        d = torch.tensor(self.offsets(), dtype=torch.int32, device=a.device)
        out = _add_bits(a, d[j], flip=((codes >> 3) & 1).to(torch.int32) << 15)
        return torch.where(j == 0, torch.zeros_like(out), out)

    def regular_product(self, a: torch.Tensor, j: int) -> torch.Tensor:
        """Product of fp16 ``a`` with the positive code ``j``; valid only where ``regular(a)``
        holds and ``a != 0`` (the GEMM masks the other entries)."""
        if self.exact:
            return (a.float() * self.fmt.magnitude(j)).to(torch.float16)
        # the sum stays below the inf pattern there, so int16 wrap-around keeps the sign bit
        return (a.view(torch.int16) + self.offsets()[j]).view(torch.float16)

    def regular_range(self) -> tuple[int, int]:
        """``(lo, hi)``: every nonzero code's product with fp16 ``a`` is a normal finite number
        iff ``lo <= |a|bits < hi``; there ``classes()``' power-of-two identity holds exactly."""
        if self.exact:
            absa = torch.arange(INF_BITS, dtype=torch.int16).view(torch.float16).float()
            ok = (absa * min(self.fmt.magnitudes[1:]) >= 2.0**-14) & (absa * self.fmt.max_value < 65504)
            idx = ok.nonzero().flatten()  # the conditions are monotone in |a|: one interval
            return int(idx[0]), int(idx[-1]) + 1
        d = self.offsets()[1:]
        return EXP_ONE - min(d), INF_BITS - max(d)

    def regular(self, a: torch.Tensor) -> torch.Tensor:
        """True where ``a`` is in ``regular_range()`` or zero."""
        lo, hi = self.regular_range()
        mag = a.contiguous().view(torch.int16) & 0x7FFF
        return ((mag >= lo) & (mag < hi)) | (mag == 0)

    def classes(self) -> list[tuple[int, dict[int, int]]]:
        """Group the nonzero indices whose products differ only by a power of two.

        Returns ``[(ref_j, {j: shift})]``: for normal, in-range results
        ``product(a, j) == product(a, ref_j) * 2**shift``. The GEMM relies on this to do one
        matmul per class and fixes up the entries where it fails (subnormal/inf results).
        """
        if self.exact:
            keys = {}
            for j in range(1, 8):
                v = self.fmt.magnitude(j)
                e = math.floor(math.log2(v))
                keys[j] = (v / 2.0**e, e)
        else:
            d = self.offsets()
            keys = {j: (d[j] & (EXP_ONE - 1), d[j] >> MANT_BITS) for j in range(1, 8)}
        out: dict[float, list[int]] = {}
        for j, (key, _) in keys.items():
            out.setdefault(key, []).append(j)
        result = []
        for js in out.values():
            ref = min(js, key=lambda j: keys[j][1])
            result.append((ref, {j: keys[j][1] - keys[ref][1] for j in js}))
        return result


def _add_bits(a: torch.Tensor, d: torch.Tensor, flip: torch.Tensor | int = 0) -> torch.Tensor:
    """``|a|bits + d`` with sign ``sign(a) ^ flip``; zero ``a`` -> +0; NaN/inf ``a`` pass through."""
    bits = a.contiguous().view(torch.int16).to(torch.int32)
    sign = (bits & 0x8000) ^ flip
    mag = bits & 0x7FFF
    r = (mag + d).clamp(0, INF_BITS)
    r = torch.where(mag >= INF_BITS, mag, r)
    r = torch.where(mag == 0, torch.zeros_like(r), r | sign)
    return r.to(torch.int16).view(torch.float16)  # int32 -> int16 keeps the low 16 bits


def fp16_approx_mul(a: torch.Tensor, b: torch.Tensor, comp: int = COMPENSATION["fp16"]) -> torch.Tensor:
    """fp16 x fp16 mpFPMA (AxCore-KV): ``|a|bits + |b|bits - 0x3C00 + comp``, sign XOR.

    Zero operands give +0, underflow a signed zero, overflow inf; a NaN/inf operand
    falls back to the exact product.
    """
    a, b = torch.broadcast_tensors(a.to(torch.float16), b.to(torch.float16))
    ab = a.contiguous().view(torch.int16).to(torch.int32)
    bb = b.contiguous().view(torch.int16).to(torch.int32)
    sign = (ab ^ bb) & 0x8000
    ma, mb = ab & 0x7FFF, bb & 0x7FFF
    r = (ma + mb - FP16_ONE + comp).clamp(0, INF_BITS) | sign
    r = torch.where((ma == 0) | (mb == 0), torch.zeros_like(r), r)
    out = r.to(torch.int16).view(torch.float16)
    special = (ma >= INF_BITS) | (mb >= INF_BITS)
    return torch.where(special, (a.float() * b.float()).to(torch.float16), out)


VARIANT_MULTIPLIERS = {
    "fp4-exact": dict(exact=True),
    "mpfpma": dict(subnormal=False, compensate=False),
    "mpfpma+s": dict(subnormal=True, compensate=False),
    "mpfpma+s+c": dict(subnormal=True, compensate=True),
    "axcore": dict(subnormal=True, compensate=True),
}


def multipliers(variant: str) -> tuple[Multiplier, ...]:
    """One multiplier per format id (index into FORMATS) for a variant name."""
    kw = VARIANT_MULTIPLIERS[variant]
    return tuple(Multiplier(f, **kw) for f in FORMATS)

