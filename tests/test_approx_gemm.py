"""Approximate GEMM, linear layer, format selection, apply() and the Tender baseline."""

import pytest
import torch
from torch import nn

from kvlab import approx
from kvlab.approx import E2M1, FORMATS, FP4Weight, multipliers, quantize_weight, select_formats
from kvlab.approx.gemm import FP16_UNIT_ROUNDOFF, GemmPlan, approx_matmul, group_sum_error_bound

torch.set_num_threads(1)


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Normal values plus zeros, fp16 subnormals and tiny/large magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    kind = torch.randint(0, 8, (m, k), generator=g)
    x = torch.where(kind == 0, torch.zeros_like(x), x)
    x = torch.where(kind == 1, x * 2.0**-20, x)  # subnormal inputs
    x = torch.where(kind == 2, x * 2.0**-13, x)  # products fall below the normal range
    x = torch.where(kind == 3, x * 300, x)
    return x.half()


def mixed_weight(n: int, k: int, group: int, seed: int) -> FP4Weight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q = [quantize_weight(w, f, group, tile_rows=8) for f in FORMATS]
    tiles = torch.randint(0, 3, q[0].tile_formats.shape, generator=g).to(torch.uint8)
    from kvlab.approx.select import _assemble

    return _assemble(q, tiles, group, 8)


def reference(x16: torch.Tensor, w: FP4Weight, mults):
    """Artifact order: per-element products, sequential fp16 adds in a group, fp16 scale,
    fp32 over groups. Also returns the bound on the fast path's difference."""
    m, (n, k) = x16.shape[0], w.codes.shape
    out = torch.zeros(m, n, dtype=torch.float64)
    bound = torch.zeros(m, n, dtype=torch.float64)
    for gi, k0 in enumerate(range(0, k, w.group_size)):
        fmt = w.row_formats(gi).long()
        acc = torch.zeros(m, n, dtype=torch.float16)
        abs_sum = torch.zeros(m, n, dtype=torch.float64)
        for kk in range(k0, min(k0 + w.group_size, k)):
            prods = torch.stack([mult(x16[:, kk, None], w.codes[None, :, kk]) for mult in mults])
            p = torch.gather(prods, 0, fmt.expand(m, n)[None])[0]
            acc = (acc.double() + p.double()).half()
            abs_sum += p.double().abs()
        s = w.scales[:, gi].double()
        scaled = (acc.double() * s).half().double()
        out += scaled
        glen = min(k0 + w.group_size, k) - k0
        bound += s.abs() * (group_sum_error_bound(abs_sum, glen) + 2 * FP16_UNIT_ROUNDOFF * abs_sum) + 2.0**-24
    y = out.half()
    bound += 2 * FP16_UNIT_ROUNDOFF * y.double().abs()
    return y, bound


VARIANTS_FP4 = ["fp4-exact", "mpfpma", "mpfpma+s", "mpfpma+s+c", "axcore"]


@pytest.mark.parametrize("variant", VARIANTS_FP4)
def test_group_sums_have_exact_products(variant):
    """fp32 group sums equal the exact sum of bit-exact products up to fp32 rounding."""
    x = activations(6, 75, 1)
    w = mixed_weight(20, 75, 16, 2)
    mults = multipliers(variant)
    for gi, s in GemmPlan(w, mults).group_sums(x):
        k0 = gi * 16
        fmt = w.row_formats(gi).long()
        exact = torch.zeros(6, 20, dtype=torch.float64)
        abs_sum = torch.zeros(6, 20, dtype=torch.float64)
        for kk in range(k0, min(k0 + 16, 75)):
            prods = torch.stack([m(x[:, kk, None], w.codes[None, :, kk]) for m in mults]).double()
            p = torch.gather(prods, 0, fmt.expand(6, 20)[None])[0]
            exact += p
            abs_sum += p.abs()
        assert ((s.double() - exact).abs() <= 16 * 2.0**-24 * abs_sum + 1e-30).all(), gi


@pytest.mark.parametrize("variant", VARIANTS_FP4)
@pytest.mark.parametrize("shape,group", [((5, 64, 24), 32), ((3, 100, 70), 64), ((7, 129, 17), 128)])
def test_matmul_against_sequential_reference(variant, shape, group):
    m, k, n = shape
    x = activations(m, k, k)
    w = mixed_weight(n, k, group, n) if variant == "axcore" else quantize_weight(torch.randn(n, k), E2M1, group)
    mults = multipliers(variant)
    got = approx_matmul(x, w, mults).double()
    want, bound = reference(x, w, mults)
    finite = want.isfinite()
    assert (got.isfinite() == finite).all()
    assert ((got - want.double()).abs()[finite] <= bound[finite]).all()


def test_fp4_exact_matches_dequantized_matmul():
    x = torch.randn(4, 256).half()
    w = quantize_weight(torch.randn(32, 256), E2M1, 64)
    got = approx_matmul(x, w, multipliers("fp4-exact")).float()
    want = x.float() @ w.dequantize().T
    torch.testing.assert_close(got, want, rtol=1e-2, atol=5e-2)


def test_overflowing_products_give_inf():
    x = torch.full((1, 64), 30000.0).half()
    w = quantize_weight(torch.ones(2, 64), E2M1, 64)  # every code is 6.0
    assert approx_matmul(x, w, multipliers("mpfpma+s+c")).isinf().all()


def test_linear_layer_and_bias():
    torch.manual_seed(0)
    lin = nn.Linear(128, 40)
    layer = approx.approx_linear(lin, "mpfpma+s+c", group_size=64)
    x = torch.randn(2, 3, 128)
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    want = approx_matmul(x, layer.weight_fp4, multipliers("mpfpma+s+c")).float() + lin.bias.half().float()
    torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)
    rel = ((y - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.2


# --- format selection ---
def planted_tile(fmt, rows: int, group: int, gen) -> torch.Tensor:
    codes = torch.randint(0, 16, (rows, group), generator=gen).to(torch.uint8)
    codes[:, 0] = 7  # the format's max in every row: absmax scaling is exact
    scale = torch.rand(rows, 1, generator=gen) + 0.5
    return fmt.values()[codes.long()] * scale.half().float()


@pytest.mark.parametrize("variant", ["fp4-exact", "axcore"])
def test_selection_picks_planted_format(variant):
    gen = torch.Generator().manual_seed(0)
    plan = torch.tensor([[0, 1, 2], [2, 0, 1]])  # format id per (tile, group)
    w = torch.cat(
        [torch.cat([planted_tile(FORMATS[int(f)], 64, 32, gen) for f in row], 1) for row in plan], 0
    )
    calib = torch.randn(64, 96, generator=gen)
    q, mse = select_formats(w, 32, calib, multipliers(variant))
    assert (q.tile_formats.long() == plan).all()
    assert mse.shape == (3, 2, 3)
    if variant == "fp4-exact":
        torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=0)


def test_selection_beats_every_single_format():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(128, 128, generator=gen) * torch.rand(1, 128, generator=gen)
    calib = torch.randn(32, 128, generator=gen)
    mults = multipliers("axcore")
    q, _ = select_formats(w, 64, calib, mults)
    ref = calib @ w.T

    def err(weight):
        return ((approx_matmul(calib, weight, mults).float() - ref) ** 2).mean()

    assert all(err(q) <= err(quantize_weight(w, f, 64)) for f in FORMATS)


# --- apply() ---
def test_bad_variant_names():
    for bad in ("", "AXCORE", "mpfpma+c", "tender"):
        with pytest.raises(ValueError, match="valid: fp4-exact, mpfpma"):
            approx.apply(nn.Sequential(nn.Linear(4, 4)), bad)
    with pytest.raises(ValueError, match="calib"):
        approx.apply(nn.Sequential(nn.Linear(4, 4)), "axcore")


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("variant", approx.VARIANTS)
def test_apply_swaps_linears_except_lm_head(variant):
    model = tiny_llama()
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        approx.apply(model, variant, group_size=32, calib=ids)
        out = model(ids).logits
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    assert kinds == {"TenderLinear" if variant == "tender-int4" else "ApproxLinear"}
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    assert out.isfinite().all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


def test_apply_axcore_with_activation_mapping():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    calib = {"0": torch.randn(8, 64), "2": torch.rand(8, 64)}
    approx.apply(model, "axcore", group_size=32, calib=calib)
    assert model[0].tile_formats.shape == (1, 2)


# --- Tender ---
def test_tender_weight_per_channel_int4():
    w = torch.randn(8, 32)
    q = approx.quantize_weight_per_channel(w)
    step = w.abs().amax(1, keepdim=True) / 7
    torch.testing.assert_close(q / step, torch.round(q / step))
    assert ((q - w).abs() <= step / 2 + 1e-6).all()


def test_tender_activation_groups_power_of_two():
    torch.manual_seed(0)
    x = torch.randn(300, 16) * torch.tensor([1.0] * 12 + [4.0, 16.0, 64.0, 0.01]) + 3.0
    xq = approx.quantize_activation(x, chunk_size=256, n_groups=8)
    chunk = x[:256]
    bias = (chunk.amax(0) + chunk.amin(0)) / 2
    top = (chunk - bias).abs().amax()
    steps = top / 7 / 2.0 ** torch.arange(8)
    resid = xq[:256] - bias
    for c in range(16):  # every channel sits on one of the power-of-two grids
        on_grid = [torch.allclose(resid[:, c] / s, torch.round(resid[:, c] / s), atol=1e-3) for s in steps]
        assert any(on_grid), c
    # a channel's step is at most twice its own absmax / 7 (it is in the group above that),
    # except below the last group's range (channel 15), where the last group's step applies
    err = (xq[:256] - chunk).abs().amax(0)
    assert (err[:15] <= (chunk - bias).abs().amax(0)[:15] / 7 + 1e-4).all()
    assert err[15] <= steps[-1] / 2 + 1e-4
