"""axcore-kv4: approximate-product attention against a plainly written reference, the decode
cache against the artifact's fake quantization, memory accounting, and the ``ppl`` options
``--approx`` / ``--protocol full-sequence``."""

import copy
import json

import pytest
import torch

from kvlab import attention
from kvlab.approx import fp16_approx_mul
from kvlab.approx.attention import approx_attention
from kvlab.cache import make_cache
from kvlab.cli import main
from kvlab.methods import parse_method
from kvlab.models import cache_kwargs

torch.set_num_threads(1)


def reference_attention(q, k, v, scaling, group):
    """Loops: per (batch, query head, query, key) the products one at a time, fp16 running sums
    per group of ``group`` channels / tokens, groups added in fp32; causal bottom-right."""
    B, Hq, Q, D = q.shape
    H, T = k.shape[1], k.shape[2]
    q16, k16, v16 = q.half(), k.half(), v.half()
    out = torch.empty(B, Q, Hq, D, dtype=torch.float16)
    for b in range(B):
        for h in range(Hq):
            kh, vh = k16[b, h // (Hq // H)], v16[b, h // (Hq // H)]
            for i in range(Q):
                visible = T - Q + i + 1
                s = torch.full((T,), float("-inf"))
                for t in range(visible):
                    total = torch.tensor(0.0)
                    for d0 in range(0, D, group):
                        acc = torch.tensor(0.0, dtype=torch.float16)
                        for d in range(d0, min(D, d0 + group)):
                            acc = acc + fp16_approx_mul(q16[b, h, i, d], kh[t, d])
                        total = total + acc.float()
                    s[t] = total
                p = (s * scaling).softmax(-1).half()
                o = torch.zeros(D)
                for t0 in range(0, T, group):
                    acc = torch.zeros(D, dtype=torch.float16)
                    for t in range(t0, min(T, t0 + group)):
                        acc = acc + fp16_approx_mul(p[t], vh[t])
                    o = o + acc.float()
                out[b, i, h] = o.half()
    return out


@pytest.mark.parametrize("Q, T, D, group", [(1, 21, 16, 8), (5, 13, 12, 8), (4, 4, 8, 4)])
def test_attend_equals_loop_reference(Q, T, D, group):
    g = torch.Generator().manual_seed(Q * 100 + T)
    q = torch.randn(2, 4, Q, D, generator=g) * 2
    k = torch.randn(2, 2, T, D, generator=g)
    v = torch.randn(2, 2, T, D, generator=g)
    k[0, 0, 3] = 0  # zero operands
    q[1, 1, 0, :2] = 1e-6  # fp16 subnormals
    # a small budget forces several query and key chunks
    got = approx_attention(q, k, v, None, 0.3, group=group, budget=2 * 4 * D * group)
    want = reference_attention(q, k, v, 0.3, group)
    assert torch.equal(got.half(), want)


def test_attend_is_close_to_exact_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 7, 64, generator=g) for _ in range(3))
    got = approx_attention(q, k, v, None, 0.125)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125).transpose(1, 2)
    err = (got - want).abs()
    assert err.mean() < 0.03 and err.max() < 0.3, (err.mean(), err.max())
    assert err.max() > 0  # the products are approximate


def run_tokens(model, cache, ids, steps):
    """Logits of ``ids`` fed ``steps`` (a list of chunk lengths) at a time through ``cache``."""
    out, pos = [], 0
    with torch.no_grad():
        for n in steps:
            out.append(model(ids[:, pos : pos + n], **cache_kwargs(model, cache), use_cache=True).logits)
            pos += n
    return torch.cat(out, 1)


@pytest.fixture
def kvlab_model(tiny_model):
    attention.enable(tiny_model)
    yield tiny_model
    tiny_model.set_attn_implementation("sdpa")


SPEC = "axcore-kv4:key_group=16,value_group=8"


def test_decode_cache_matches_artifact_where_groups_are_complete(kvlab_model):
    ids = torch.randint(0, 128, (2, 27), generator=torch.Generator().manual_seed(1))
    steps = [16, 8, 1, 2]
    decode = run_tokens(kvlab_model, make_cache(SPEC, kvlab_model), ids, steps)
    artifact = run_tokens(kvlab_model, make_cache(SPEC + ",mode=artifact", kvlab_model), ids, steps)
    # Through 24 tokens every call ends on complete value groups: same quantized cache, same products.
    assert torch.equal(decode[:, :24], artifact[:, :24])
    # then the artifact quantizes the partial value group, the decode cache keeps it fp16
    assert not torch.equal(decode[:, 24:], artifact[:, 24:])
    exact = kvlab_model(ids).logits
    for got in (decode, artifact):
        assert torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0) > 0.99


def test_decode_cache_uses_the_approximate_products(kvlab_model):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = make_cache(SPEC, kvlab_model)
    got = run_tokens(kvlab_model, cache, ids, [8, 4])
    layer = cache.layers[0]
    keys, values = layer.dequantized()
    assert keys.shape[2] == values.shape[2] == 12
    kvlab_model.set_attn_implementation("sdpa")  # same cache contents, exact attention
    exact_products = run_tokens(kvlab_model, make_cache(SPEC, kvlab_model.config), ids, [8, 4])
    assert not torch.equal(got, exact_products)


def test_memory_accounting_is_packed(kvlab_model):
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(3))
    cache = make_cache(SPEC, kvlab_model)
    run_tokens(kvlab_model, cache, ids, [13, 1, 1, 1, 1, 1, 1, 1, 1])
    layer = cache.layers[0]
    B, H, D, T = 2, 2, 32, 21
    keys = B * H * T * (D // 2 + 2 * D // 16)  # 4-bit codes + an fp16 scale per 16 channels
    values = B * H * 16 * D // 2 + B * H * 2 * D * 2  # two complete groups of 8 tokens
    tail = B * H * 5 * D * 2  # 5 fp16 tokens
    assert layer.quantized_tokens() == (21, 16)
    assert layer.memory_bytes() == keys + values + tail
    assert cache.memory_bytes() == 2 * layer.memory_bytes()
    stats = cache.stats()
    assert stats["bits_per_value_quantized"] == pytest.approx((5 * 21 + 6 * 16) / 37)  # keys 4 + 16/16, values 4 + 16/8
    assert stats["bits_per_value_all_in"] == pytest.approx(8 * cache.memory_bytes() / (2 * 2 * B * H * D * T))
    artifact = make_cache(SPEC + ",mode=artifact", kvlab_model)
    run_tokens(kvlab_model, artifact, ids, [21])
    assert artifact.layers[0].memory_bytes() == 2 * B * H * T * D * 2  # fake quantization holds fp16


def test_method_validation():
    m = parse_method("axcore-kv4")
    assert (m.key_format, m.value_format, m.key_group, m.value_group) == ("e2m1", "e3m0", 64, 64)
    assert m.bits_per_value(64) == pytest.approx(4.25)
    for bad, msg in (("mode=fake", "mode=fake"), ("key_format=e4m3", "key_format"), ("value_group=7", "even")):
        with pytest.raises(ValueError, match=msg):
            parse_method(f"axcore-kv4:{bad}")
    with pytest.raises(ValueError, match="do not tile head_dim=32"):
        m.check_head_dim(32)


def test_ppl_rejects_bad_approx_before_loading(tmp_path, capsys):
    assert main(["ppl", "--approx", "axcore2", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown --approx 'axcore2'" in err and "mpfpma+s+c" in err and "tender-int4" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_full_sequence_protocol_on_smollm2(tmp_path):
    out = tmp_path / "full"
    args = ["ppl", "--protocol", "full-sequence", "--seqlen", "64", "--max-windows", "2",
            "--methods", "fp16", "axcore-kv4", "--approx", "mpfpma+s+c", "--output-dir", str(out), "--quiet"]
    assert main(args) == 0
    units = {p.name: json.loads(p.read_text()) for p in out.glob("*_seed0.json")}
    fp16 = units["fp16_seed0.json"]
    assert fp16["config"]["protocol"] == "full-sequence" and fp16["config"]["approx"] == "mpfpma+s+c"
    assert fp16["tokens_scored"] == 2 * 63 and [w["start"] for w in fp16["windows"]] == [0, 64]
    kv = units["axcore-kv4_seed0.json"]
    assert 1 < fp16["ppl"] < kv["ppl"] < 1.5 * fp16["ppl"]
    assert kv["bits_per_value_quantized"] == pytest.approx(4.25)


def test_tender_attention_products_are_int4(tiny_model):
    from kvlab.approx.tender import tender_attention

    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 4, 9, 32, generator=g), torch.randn(1, 2, 9, 32, generator=g), torch.randn(1, 2, 9, 32, generator=g)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True).transpose(1, 2)
    wide, _ = tender_attention(None, q, k, v, None, bits=16)
    int4, _ = tender_attention(None, q, k, v, None)
    torch.testing.assert_close(wide, exact, atol=1e-3, rtol=1e-3)
    assert 0 < (int4 - exact).abs().max() < 0.5
    from kvlab import approx

    model = approx.apply(copy.deepcopy(tiny_model), "tender-int4")  # the fixture is shared
    assert model.config._attn_implementation == "tender-int4"
    with torch.no_grad():
        assert model(torch.arange(20)[None]).logits.isfinite().all()
