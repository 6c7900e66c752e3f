"""Elementwise AxCore multipliers and FP4 formats against plainly written references."""

import random

import pytest
import torch

from kvlab.approx import COMPENSATION, E1M2, E2M1, E3M0, FORMATS, Multiplier, derive_compensation, fp16_approx_mul
from kvlab.approx.formats import decode, quantize_weight, round_to_format

FMT = {"e3m0": E3M0, "e2m1": E2M1, "e1m2": E1M2}


def bits_of(x: torch.Tensor) -> list[int]:
    return [b & 0xFFFF for b in x.reshape(-1).contiguous().view(torch.int16).tolist()]


def halves(bits: list[int]) -> torch.Tensor:
    return torch.tensor([b - 0x10000 if b >= 0x8000 else b for b in bits], dtype=torch.int16).view(torch.float16)


def activation_sample(seed: int = 0) -> list[int]:
    """fp16 bit patterns: every exponent field (subnormals, inf/NaN included), both signs,
    edge and random mantissas."""
    rng = random.Random(seed)
    out = []
    for sign in (0, 0x8000):
        for e in range(32):
            mants = {0, 1, 2, 0x155, 0x200, 0x2AA, 0x3FE, 0x3FF} | {rng.randrange(1024) for _ in range(16)}
            out += [sign | (e << 10) | m for m in sorted(mants)]
    return out


# --- plain per-element reference of the rule (artifact kernel, spelled out per format) ---
SUBNORMAL_REWRITE = {  # (format, m) -> (pattern, extra offset), from AxCore_fp16.cu's SNC
    ("e2m1", 1): (0x000, 0),  # 0.5 -> a/2
    ("e1m2", 1): (0x000, 0x400),  # 0.5 -> a/2
    ("e1m2", 2): (0x000, 0),  # 1.0 -> a
    ("e1m2", 3): (0x200, 0),  # 1.5 -> a * (1 + .5), approximated
}
BIAS = {"e3m0": 3, "e2m1": 1, "e1m2": 0}
MBITS = {"e3m0": 0, "e2m1": 1, "e1m2": 2}


def ref_mul(a: int, code: int, fmt: str, s: bool, c: bool) -> int:
    sign = ((a >> 15) ^ (code >> 3)) & 1
    mag, j = a & 0x7FFF, code & 7
    if mag == 0 or j == 0:
        return 0
    if mag >= 0x7C00:
        return sign << 15 | mag
    mb = MBITS[fmt]
    e, m = j >> mb, j & ((1 << mb) - 1)
    pattern, offset = (e << 10) | (m << (10 - mb)), BIAS[fmt] << 10
    if s and e == 0:
        pattern, extra = SUBNORMAL_REWRITE[(fmt, m)]
        offset += extra
    r = mag + pattern - offset + (COMPENSATION[fmt] if c else 0)
    return sign << 15 | min(max(r, 0), 0x7C00)


@pytest.mark.parametrize("fmt", ["e3m0", "e2m1", "e1m2"])
@pytest.mark.parametrize("s,c", [(False, False), (True, False), (True, True)])
def test_every_code_against_scalar_reference(fmt, s, c):
    acts = activation_sample()
    a = halves(acts)
    mult = Multiplier(FMT[fmt], subnormal=s, compensate=c)
    for code in range(16):
        got = bits_of(mult(a, torch.tensor(code, dtype=torch.uint8)))
        want = [ref_mul(x, code, fmt, s, c) for x in acts]
        assert got == want, f"code {code}"


def test_regular_product_matches_full_multiply():
    a = halves(activation_sample(1))
    for f in FORMATS:
        for exact in (False, True):
            m = Multiplier(f, exact=exact)
            ok = m.regular(a) & (a != 0)
            assert ok.float().mean() > 0.3
            for j in range(1, 8):
                full = m(a, torch.tensor(j, dtype=torch.uint8))
                assert bits_of(m.regular_product(a, j)[ok]) == bits_of(full[ok])


# --- literal transcription of the artifact's CUDA (uint16 wrap-around included) ---
def artifact_e2m1(a: int, b: int) -> int:
    if (a & 0x7FFF) == 0 or (b & 0x7FFF) == 0:
        return 0
    sign = (a ^ b) & 0x8000
    b_mag = 0 if (b & 0x0C00) == 0 else b & 0x7FFF
    total = ((a & 0x7FFF) + b_mag) & 0xFFFF
    threshold = 0x0400 - 43
    adjusted = 0 if total < threshold else (total - threshold) & 0xFFFF
    return (adjusted & 0x7FFF) | sign


def artifact_e1m2(a: int, b: int) -> int:
    if (a & 0x7FFF) == 0 or (b & 0x7FFF) == 0:
        return 0
    sub = (b & 0x0400) == 0
    snc1 = sub and (b & 0x0300) == 0x0100
    snc3 = sub and (b & 0x0300) == 0x0300
    sign = (a ^ b) & 0x8000
    b_mag = (0x0200 if snc3 else 0) if sub else b & 0x7FFF
    total = ((a & 0x7FFF) + b_mag) & 0xFFFF
    diff = (total + 54 - (0x0400 if snc1 else 0)) & 0xFFFF
    adjusted = 0 if total < -54 + (0x0400 if snc1 else 0) else diff
    return (adjusted & 0x7FFF) | sign


def artifact_fp16(a: int, b: int, comp: int) -> int:
    if (a & 0x7FFF) == 0 or (b & 0x7FFF) == 0:
        return 0
    sign = (a ^ b) & 0x8000
    total = (a & 0x7FFF) + (b & 0x7FFF)
    threshold = (0x3C00 + comp) & 0xFFFF
    adjusted = 0 if total < threshold else (total - threshold) & 0xFFFF
    return (adjusted & 0x7FFF) | sign


# converter.py's code placement: FP4 value -> fp16 bits fed to the kernel
ARTIFACT_PATTERN = {
    "e2m1": {0.5: 0x0200, 1.0: 0x0400, 1.5: 0x0600, 2.0: 0x0800, 3.0: 0x0A00, 4.0: 0x0C00, 6.0: 0x0E00},
    "e1m2": {0.5: 0x0100, 1.0: 0x0200, 1.5: 0x0300, 2.0: 0x0400, 2.5: 0x0500, 3.0: 0x0600, 3.5: 0x0700},
}


@pytest.mark.parametrize("fmt,kernel", [("e2m1", artifact_e2m1), ("e1m2", artifact_e1m2)])
def test_agrees_with_artifact_kernel_except_overflow(fmt, kernel):
    mult = Multiplier(FMT[fmt])
    acts = [x for x in activation_sample(2) if (x & 0x7FFF) < 0x7C00]
    a = halves(acts)
    for code in range(16):
        value = float(decode(torch.tensor(code), FMT[fmt]))
        b = (0x8000 if code >> 3 else 0) | ARTIFACT_PATTERN[fmt].get(abs(value), 0)
        got = bits_of(mult(a, torch.tensor(code, dtype=torch.uint8)))
        for x, g in zip(acts, got):
            want = kernel(x, b)
            if (g & 0x7FFF) == 0x7C00:  # we saturate to inf where the artifact wraps mod 2**15
                assert ref_mul(x, code, fmt, True, True) == g
            else:
                assert g == want, (hex(x), code)


def test_hand_examples():
    one, three_halves = torch.tensor(1.0, dtype=torch.float16), torch.tensor(1.5, dtype=torch.float16)
    e2 = lambda s, c: Multiplier(E2M1, subnormal=s, compensate=c)  # noqa: E731
    e1 = lambda s, c: Multiplier(E1M2, subnormal=s, compensate=c)  # noqa: E731
    code = lambda fmt, v: round_to_format(torch.tensor(v), fmt)  # noqa: E731
    # E2M1 0.5 has no implicit one: the plain add makes it act like 0.75; +S gives a/2
    assert e2(False, False)(one, code(E2M1, 0.5)).item() == 0.75
    assert e2(True, False)(one, code(E2M1, 0.5)).item() == 0.5
    # E1M2 subnormals 0.5, 1.0, 1.5 act like 1.25, 1.5, 1.75 without +S
    assert [e1(False, False)(one, code(E1M2, v)).item() for v in (0.5, 1.0, 1.5)] == [1.25, 1.5, 1.75]
    assert [e1(True, False)(one, code(E1M2, v)).item() for v in (0.5, 1.0, 1.5)] == [0.5, 1.0, 1.5]
    # Mitchell: 1.5 * 1.5 -> 2.0 (mantissas .5 + .5 carry), +C adds 43 ulps
    assert e2(True, False)(three_halves, code(E2M1, 1.5)).item() == 2.0
    assert bits_of(e2(True, True)(one, code(E2M1, 1.5))) == [0x3E00 + 43]
    assert bits_of(e1(True, True)(one, code(E1M2, 2.5))) == [0x3C00 + 0x500 + 54]
    # fp16 x fp16: 0x3C00 is 1.0; with comp the result of 1 * 1 is 1 + 58 ulps
    assert bits_of(fp16_approx_mul(one, one, comp=0)) == [0x3C00]
    assert bits_of(fp16_approx_mul(one, one)) == [0x3C00 + 58]
    # E3M0 products of normal numbers are exact powers of two
    assert Multiplier(E3M0)(three_halves, code(E3M0, 8.0)).item() == 12.0


def test_fp16_approx_mul_against_artifact():
    acts = [x for x in activation_sample(3) if (x & 0x7FFF) < 0x7C00]
    a = halves(acts)
    rng = random.Random(0)
    others = list(acts)
    rng.shuffle(others)
    b = halves(others)
    for comp in (0, 58):
        got = bits_of(fp16_approx_mul(a, b, comp=comp))
        for x, y, g in zip(acts, others, got):
            if (g & 0x7FFF) == 0x7C00:
                assert (x & 0x7FFF) + (y & 0x7FFF) - 0x3C00 + comp >= 0x7C00
            else:
                assert g == artifact_fp16(x, y, -comp), (hex(x), hex(y))


def test_zero_and_special_operands():
    m = Multiplier(E2M1)
    a = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 6e-8], dtype=torch.float16)
    for code in (0, 8):
        assert bits_of(m(a, torch.tensor(code, dtype=torch.uint8))) == [0] * 7
    six = round_to_format(torch.tensor(-6.0), E2M1)
    out = m(a, six)
    assert bits_of(out[:2]) == [0, 0]
    assert out[2].item() == float("-inf") and out[3].item() == float("inf") and out[4].isnan()
    assert out[5].item() == float("-inf")  # overflow saturates
    assert bits_of(m(a[6:], round_to_format(torch.tensor(0.5), E2M1))) == [0]  # underflow


def test_compensation_constants_derived():
    derived = {f.name: derive_compensation(f.mbits) for f in FORMATS}
    derived["fp16"] = derive_compensation(10)
    assert derived == COMPENSATION == {"e3m0": 0, "e2m1": 43, "e1m2": 54, "fp16": 58}


# --- formats and quantizer ---
def test_format_tables():
    assert E3M0.magnitudes == [0, 0.25, 0.5, 1, 2, 4, 8, 16]
    assert E2M1.magnitudes == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert E1M2.magnitudes == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    for fmt, table in ARTIFACT_PATTERN.items():
        f = FMT[fmt]
        for value, pattern in table.items():
            j = int(round_to_format(torch.tensor(value), f))
            e, m = f.fields(j)
            assert (e << 10) | (m << (10 - f.mbits)) == pattern


def reference_round(x: float, fmt) -> float:
    """Nearest representable value; ties to the even multiple of the local spacing."""
    grid = fmt.magnitudes
    mag = min(abs(x), fmt.max_value)
    best = min(grid, key=lambda v: abs(v - mag))
    ties = [v for v in grid if abs(v - mag) == abs(best - mag)]
    if len(ties) > 1:  # even multiple of the spacing in the tie point's binade
        e = max(int(torch.frexp(torch.tensor(mag))[1]) - 1, 1 - fmt.bias)
        best = next(v for v in ties if int(v / 2.0 ** (e - fmt.mbits)) % 2 == 0)
    return -best if x < 0 else best


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_round_to_format_rne(fmt):
    grid = fmt.magnitudes
    mids = [(p + q) / 2 for p, q in zip(grid, grid[1:])]
    xs = grid + mids + [v * 1.01 for v in grid] + [v * 0.99 for v in grid] + [100.0, 1e-9]
    xs += [random.Random(4).uniform(-20, 20) for _ in range(200)]
    xs = xs + [-v for v in xs]
    got = decode(round_to_format(torch.tensor(xs), fmt), fmt).tolist()
    assert got == [reference_round(v, fmt) for v in xs]


def test_quantize_weight_per_row_group():
    torch.manual_seed(0)
    w = torch.randn(5, 40)
    w[1, :16] = 0  # an all-zero group
    q = quantize_weight(w, E2M1, 16)
    assert q.scales.shape == (5, 3) and q.scales.dtype == torch.float16
    absmax = torch.stack([w[:, i : i + 16].abs().amax(1) for i in (0, 16, 32)], 1)
    torch.testing.assert_close(q.scales, (absmax / 6).half())
    assert (q.codes[1, :16] == 0).all()
    err = (q.dequantize() - w).abs()
    step = q.scales.float().repeat_interleave(16, 1)[:, :40]  # largest E2M1 gap is 2 scale units
    assert (err <= step * 1.001 + 1e-6).all()
