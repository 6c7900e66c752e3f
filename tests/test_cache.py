"""The quantized cache against a straightforward reference, and its transformers integration."""

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvlab
from kvlab.cache import QuantizedLayer
from kvlab.methods import build_method, parse_method
from kvlab.models import cache_kwargs
from kvlab.quant.codecs import KeyChannelCodec, ValueTokenCodec


def expected_view(k, v, length, before, S, R, G, kcodec, vcodec):
    """Reference: the dense sequence with fake quantization at the cache's token boundaries.

    Quantization is deferred to the start of an update, so what is quantized depends on the
    length ``before`` the last update: keys in whole G-blocks until the tail is <= R, values in
    whole blocks of the value codec while the tail stays >= R.
    """
    qk = max(0, math.ceil((before - S - R) / G)) * G
    qv = max(0, before - S - R) // vcodec.block_tokens * vcodec.block_tokens
    fq_k = [kcodec.decode(kcodec.encode(k[:, :, s : s + G]), k.dtype) for s in range(S, S + qk, G)]
    fq_v = [vcodec.decode(vcodec.encode(v[:, :, S : S + qv]), v.dtype)] if qv else []
    s = min(S, length)
    keys = torch.cat([k[:, :, :s], *fq_k, k[:, :, S + qk : length]], 2)
    values = torch.cat([v[:, :, :s], *fq_v, v[:, :, S + qv : length]], 2)
    return keys, values, qk, qv


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    sinks=st.sampled_from([0, 3, 32]),
    extra_residual=st.sampled_from([0, 5, 16]),
    group=st.sampled_from([8, 16]),
    bits=st.sampled_from([2, 4]),
    boost=st.sampled_from([0, 4]),
    calls=st.lists(st.integers(1, 40), min_size=1, max_size=8),
)
def test_layer_matches_fake_quant_reference(batch, sinks, extra_residual, group, bits, boost, calls):
    H, D = 2, 16
    residual = group + extra_residual
    total = sum(calls)
    k = torch.randn(batch, H, total, D)
    v = torch.randn(batch, H, total, D)
    kcodec = KeyChannelCodec(bits, group, boost, bits + 2) if boost else KeyChannelCodec(bits, group)
    vcodec = ValueTokenCodec(bits, 16)
    layer = QuantizedLayer(kcodec, vcodec, residual, sinks)
    ref_kcodec, ref_vcodec = dataclasses.replace(kcodec), dataclasses.replace(vcodec)  # unpatched copies
    encoded = {"k": [], "v": []}
    for name, codec in (("k", kcodec), ("v", vcodec)):
        orig = codec.encode
        object.__setattr__(codec, "encode", lambda x, orig=orig, name=name: encoded[name].append(x.clone()) or orig(x))
    pos = 0
    for n in calls:
        keys, values = layer.update(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        ref_k, ref_v, qk, qv = expected_view(k, v, pos + n, pos, sinks, residual, group, ref_kcodec, ref_vcodec)
        torch.testing.assert_close(keys, ref_k, rtol=0, atol=0)
        torch.testing.assert_close(values, ref_v, rtol=0, atol=0)
        assert layer.quantized_tokens() == (qk, qv)
        assert layer.get_seq_length() == pos + n
        pos += n
    # each token encoded exactly once, from the original (never re-quantized) data, in order
    seen_k = torch.cat(encoded["k"], 2) if encoded["k"] else k[:, :, :0]
    seen_v = torch.cat(encoded["v"], 2) if encoded["v"] else v[:, :, :0]
    assert torch.equal(seen_k, k[:, :, sinks : sinks + layer.quantized_tokens()[0]])
    assert torch.equal(seen_v, v[:, :, sinks : sinks + layer.quantized_tokens()[1]])


def _held_tensors(layer):
    ts = [layer.sink_keys, layer.sink_values, layer.key_tail, layer.value_tail]
    ts += list(layer.key_store.fields.values()) + list(layer.value_store.fields.values())
    return [t for t in ts if t is not None]


def test_memory_bytes_matches_tensors_held(tiny_model):
    cache = kvlab.make_cache("kitty-pro:group_size=32,residual=32,sinks=4", tiny_model)
    tiny_model(torch.randint(3, 128, (2, 150)), **cache_kwargs(tiny_model, cache))
    for _ in range(40):
        tiny_model(torch.randint(3, 128, (2, 1)), **cache_kwargs(tiny_model, cache))
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in _held_tensors(layer))
    assert cache.memory_bytes() == held
    dense = 2 * 2 * 2 * 190 * 32 * 4 * 2  # layers x K/V x batch x tokens x head_dim x fp32 bytes x kv heads
    assert held < dense / 2
    stats = cache.stats()
    method = cache.method
    assert stats["bits_per_value_quantized"] == pytest.approx(method.bits_per_value(32), rel=0.02)


def test_fp16_matches_cacheless_forward(tiny_model):
    ids = torch.randint(3, 128, (2, 96))
    ref = tiny_model(ids, use_cache=False).logits
    cache = kvlab.make_cache("fp16", tiny_model)
    logits = [tiny_model(ids[:, :40], **cache_kwargs(tiny_model, cache)).logits]
    for t in range(40, 96):
        logits.append(tiny_model(ids[:, t : t + 1], **cache_kwargs(tiny_model, cache)).logits)
    torch.testing.assert_close(torch.cat(logits, 1), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["kitty-pro:group_size=16,residual=16,sinks=4", "kivi-2:group_size=16,residual=16"])
def test_generate_batch3_left_padding_greedy_and_sampling(tiny_model, spec):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    mask[1, :3] = 0
    ids[mask == 0] = 0
    out = tiny_model.generate(ids, attention_mask=mask, **cache_kwargs(tiny_model, kvlab.make_cache(spec, tiny_model)),
                              max_new_tokens=50, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 90)
    # the first new token depends only on the prompt, which attention sees in full precision
    ref = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert torch.equal(out[:, 40], ref[:, 40])
    torch.manual_seed(0)
    out = tiny_model.generate(ids, attention_mask=mask, **cache_kwargs(tiny_model, kvlab.make_cache(spec, tiny_model)),
                              max_new_tokens=20, min_new_tokens=20, do_sample=True, top_p=0.9, pad_token_id=0)
    assert out.shape == (3, 60)  # 20 sampled steps (a random model samples EOS now and then: held back)


def test_fp16_generate_identical_to_plain_generate(tiny_model):
    ids = torch.randint(3, 128, (2, 30))
    ref = tiny_model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    out = tiny_model.generate(ids, **cache_kwargs(tiny_model, kvlab.make_cache("fp16", tiny_model)), max_new_tokens=30,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_beam_search_reorders_packed_cache(tiny_model):
    ids = torch.randint(3, 128, (2, 40))
    cache = kvlab.make_cache("kitty-pro:group_size=8,residual=8,sinks=2", tiny_model)
    out = tiny_model.generate(ids, **cache_kwargs(tiny_model, cache), max_new_tokens=30, min_new_tokens=30, num_beams=3,
                              do_sample=False, pad_token_id=0)
    assert out.shape == (2, 70)
    assert cache.layers[0].key_store.fields["lo"].shape[0] == 6  # batch x beams


def test_reorder_cache_selects_rows_exactly():
    layer = build_method("kivi-2", group_size=8, residual=8).make_layer(0, 16)
    k, v = torch.randn(3, 2, 50, 16), torch.randn(3, 2, 50, 16)
    layer.update(k[:, :, :40], v[:, :, :40])
    layer.update(k[:, :, 40:], v[:, :, 40:])
    before = layer.dequantized()
    beam = torch.tensor([2, 0, 0])
    layer.reorder_cache(beam)
    after = layer.dequantized()
    assert torch.equal(after[0], before[0][beam]) and torch.equal(after[1], before[1][beam])


def test_crop_and_reset():
    layer = build_method("kivi-2", group_size=8, residual=8).make_layer(0, 16)
    k = torch.randn(1, 2, 30, 16)
    layer.update(k, k)
    layer.update(k[:, :, :3], k[:, :, :3])
    keys_before, _ = layer.dequantized()
    layer.crop(-2)
    assert layer.get_seq_length() == 31
    assert torch.equal(layer.dequantized()[0], keys_before[:, :, :31])
    with pytest.raises(ValueError, match="compressed tokens are write-once"):
        layer.crop(-25)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.memory_bytes() == 0


def test_mixed_sliding_window_model_warns_once_and_generates():
    from transformers import MinistralConfig, MinistralForCausalLM

    torch.manual_seed(0)
    cfg = MinistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=64, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"] * 2)
    model = MinistralForCausalLM(cfg).eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cache = kvlab.make_cache("kivi-2:group_size=8,residual=8", model)
    msgs = [str(x.message) for x in w if "kvlab" in str(x.message)]
    assert len(msgs) == 1 and "2 of 4 layers" in msgs[0]
    out = model.generate(torch.randint(0, 64, (1, 30)), **cache_kwargs(model, cache), max_new_tokens=20,
                         min_new_tokens=20, do_sample=False)
    assert out.shape == (1, 50)
    assert type(cache.layers[1]).__name__ == "QuantizedLayer" and cache.layers[1].quantized_tokens()[0] > 0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("kivi-3", "unknown method 'kivi-3'; valid methods: "),
        ("kivi-2:bits=3", "bits=3 is not supported; choose one of (1, 2, 4, 8)"),
        ("kivi-2:group_size=12", "group_size=12 must be a positive multiple of 8"),
        ("kivi-2:groupsize=32", "unknown parameter(s) ['groupsize']; valid parameters: "),
        ("kivi-2:group_size=abc", "group_size='abc' is not a valid int"),
        ("kivi-2:group_size", "bad parameter 'group_size'"),
        ("kitty-pro:boost_bits=5", "valid differences are (1, 2, 4, 8)"),
        ("kitty-pro:boost_ratio=1.5", "boost_ratio=1.5 must be in [0, 1]"),
        ("kivi-2:residual=64", "residual=64 must be >= group_size=128"),
    ],
)
def test_bad_method_specs_raise_clear_errors(spec, message):
    with pytest.raises(ValueError) as e:
        parse_method(spec)
    assert message in str(e.value)


def test_group_size_that_does_not_tile_head_dim(tiny_model):
    with pytest.raises(ValueError, match="do not tile head_dim=32"):
        kvlab.make_cache("kivi-2:group_size=24", tiny_model)


def test_spec_parameters_and_labels():
    m = parse_method("kivi-2:group_size=32, sinks=4")
    assert (m.bits, m.group_size, m.sinks, m.residual) == (2, 32, 4, 128)
    assert m.label == "kivi-2:group_size=32,sinks=4"
    assert parse_method("kitty-pro").boost_channels(64) == 12  # floor(0.2 * 64), as the artifact
    assert kvlab.make_cache(build_method("kivi", bits=4, group_size=64), _cfg()).method.bits == 4
    m = kvlab.make_cache("kivi", _cfg(), bits=2, group_size=64).method
    assert (m.bits, m.group_size) == (2, 64)
    assert kvlab.make_cache("kitty-pro:sinks=4", _cfg(), group_size=32).method.label == "kitty-pro:group_size=32,sinks=4"


def _cfg():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def test_preallocated_storage_gives_identical_results(tiny_model):
    ids = torch.randint(3, 128, (2, 120))
    outs = []
    for max_length in (None, 200):
        cache = kvlab.make_cache("kitty-pro:group_size=16,residual=16,sinks=4", tiny_model, max_length=max_length)
        logits = [tiny_model(ids[:, :60], **cache_kwargs(tiny_model, cache)).logits]
        for t in range(60, 120):
            logits.append(tiny_model(ids[:, t : t + 1], **cache_kwargs(tiny_model, cache)).logits)
        cache.reorder_cache(torch.tensor([1, 0]))
        outs.append((torch.cat(logits, 1), cache.layers[0].dequantized(), cache))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    dense, static = outs[0][2], outs[1][2]
    assert static.memory_bytes() > dense.memory_bytes()  # capacity for 200 tokens is allocated up front
    layer = static.layers[0]
    with pytest.raises(ValueError, match="preallocated for 200 tokens"):
        layer.key_store.append(layer.key_codec.encode(torch.randn(1, 2, 208, 32)), 208)


def test_preallocated_fp16_layer_writes_in_place(tiny_model):
    """fp16 with max_length: same logits as transformers' concatenating layer, keys are views of one
    buffer (no copy of the cache per append), reordering falls back to concatenation, overflow is an error."""
    ids = torch.randint(3, 128, (2, 90))
    outs = []
    for max_length in (None, 100):
        cache = kvlab.make_cache("fp16", tiny_model, max_length=max_length)
        logits = [tiny_model(ids[:, :40], **cache_kwargs(tiny_model, cache)).logits]
        for t in range(40, 80, 8):
            logits.append(tiny_model(ids[:, t : t + 8], **cache_kwargs(tiny_model, cache)).logits)
        outs.append((torch.cat(logits, 1), cache))
    (ref, dense), (out, pre) = outs
    assert torch.equal(ref, out)
    layer = pre.layers[0]
    assert layer.preallocated() and layer.keys.data_ptr() == layer.buffers[0].data_ptr()
    assert layer.memory_bytes() == 2 * layer.buffers[0].numel() * 4 > dense.layers[0].memory_bytes()
    with pytest.raises(ValueError, match="preallocated for 100 tokens; 80 \\+ 30 do not fit"):
        tiny_model(ids[:, :30], **cache_kwargs(tiny_model, pre))
    pre.reorder_cache(torch.tensor([1, 0]))
    dense.reorder_cache(torch.tensor([1, 0]))
    tiny_model(ids[:, 80:84], **cache_kwargs(tiny_model, pre))
    tiny_model(ids[:, 80:84], **cache_kwargs(tiny_model, dense))
    assert not layer.preallocated() and torch.equal(layer.keys, dense.layers[0].keys)


def test_a_stale_pending_layer_does_not_capture_attention(tiny_model):
    """A layer marked pending by a direct update (no attention consumed it) must not receive the
    attention of a later forward through another cache."""
    from kvlab.attention import enable, mark_pending

    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        ref = tiny_model(ids, **cache_kwargs(tiny_model, kvlab.make_cache("fp16", tiny_model))).logits
        stale = kvlab.make_cache("kivi-2:group_size=16,residual=16", tiny_model).layers[0]
        stale.layer_idx = 0
        mark_pending(stale)
        enable(tiny_model)
        try:
            out = tiny_model(ids, **cache_kwargs(tiny_model, kvlab.make_cache("fp16", tiny_model))).logits
        finally:
            tiny_model.set_attn_implementation("sdpa")
    assert torch.allclose(out, ref, atol=1e-5)


def test_prefill_attention_without_repeated_keys_matches_sdpa(tiny_model, monkeypatch):
    """fp16 layers made for CUDA attend prefill chunks with the GQA group folded into the query rows
    (no repeated keys); the logits are those of transformers' SDPA with repeated keys."""
    from kvlab.kernels import reference

    calls = []
    grouped = reference.grouped_attention
    monkeypatch.setattr(reference, "grouped_attention", lambda *a: calls.append(a[0].shape) or grouped(*a))
    ids = torch.randint(3, 128, (2, 70))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    outs = []
    with torch.no_grad():
        for fold in (False, True):
            cache = kvlab.make_cache("fp16", tiny_model, max_length=80)
            if fold:
                cache.use_fused_attention(tiny_model)  # what make_cache does on CUDA
            try:
                logits = [tiny_model(ids[:, :30], attention_mask=mask[:, :30],
                                     **cache_kwargs(tiny_model, cache)).logits]
                for start in (30, 50):
                    logits.append(tiny_model(ids[:, start : start + 20], attention_mask=mask[:, : start + 20],
                                             **cache_kwargs(tiny_model, cache)).logits)
            finally:
                tiny_model.set_attn_implementation("sdpa")
            outs.append(torch.cat(logits, 1))
    assert calls == [(2, 4, 20, 32)] * 4  # 2 later chunks x 2 layers; the first chunk stays on SDPA
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)


def test_reference_attention_in_batch_slices_matches_repeated_keys(monkeypatch):
    """A quantized layer is dequantized a few batch rows at a time, never repeated for GQA: the same
    attention as dequantizing everything and repeating keys per query head."""
    import torch.nn.functional as F

    from kvlab.kernels import reference

    layer = QuantizedLayer(KeyChannelCodec(2, 16, 3), ValueTokenCodec(2, 32), 16, 4)
    B, H, n_rep, D, L, q = 3, 2, 4, 32, 75, 11
    for n in (L - q, q):
        layer.update(torch.randn(B, H, n, D) * 2 + 1, torch.randn(B, H, n, D))
    query = torch.randn(B, H * n_rep, q, D)
    mask = torch.ones(B, 1, q, L, dtype=torch.bool)
    mask[1, ..., :6] = False
    keys, values = layer.dequantized(torch.float32)
    causal = reference.keep_mask(mask, q, L, "cpu")
    ref = F.scaled_dot_product_attention(query, keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1),
                                         attn_mask=causal, scale=0.2).transpose(1, 2)
    whole = reference.reference_attend(layer, query, mask, 0.2, compute_dtype=torch.float32)
    monkeypatch.setattr(reference, "TRANSIENT_BYTES", 1)  # one batch row per slice
    sliced = reference.reference_attend(layer, query, mask, 0.2, compute_dtype=torch.float32)
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
