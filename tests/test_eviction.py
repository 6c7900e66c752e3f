"""Eviction methods on a tiny random Llama (CPU, fast)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from kvlab import attention, make_cache, parse_method
from kvlab.eviction import EvictionMethod, top_k_mask
from kvlab.eviction_quant import Composed
from kvlab.models import cache_kwargs

PROMPT, STEPS = 24, 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    attention.enable(m)
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))


def param(spec: str, extra: str) -> str:
    return spec + ("," if ":" in spec else ":") + extra


@torch.no_grad()
def run(model, ids, spec, cache=None):
    """Prefill PROMPT tokens, then decode one token per call; returns stacked logits and the cache."""
    cache = make_cache(spec, model) if cache is None else cache
    logits = [model(ids[:, :PROMPT], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]]
    for t in range(PROMPT, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True).logits[:, -1])
    return torch.stack(logits, 1), cache


def test_dense_is_fp16(model, ids):
    assert type(parse_method("dense")) is type(parse_method("fp16"))
    assert torch.equal(run(model, ids, "dense")[0], run(model, ids, "fp16")[0])


@pytest.mark.parametrize("spec", ["streamingllm", "h2o", "cab", "snapkv:window=4,interval=1"])
def test_budget_above_length_equals_dense(model, ids, spec):
    dense, _ = run(model, ids, "fp16")
    out, cache = run(model, ids, param(spec, "budget=1000"))
    # streamingllm attends through SDPA (bit-exact); the scored methods through the chunked
    # softmax pass (same math, fp32 rounding).
    atol = 0 if spec == "streamingllm" else 1e-5
    torch.testing.assert_close(out, dense, rtol=0, atol=atol)
    assert cache.layers[0].kept_length() == ids.shape[1]


@pytest.mark.parametrize("chunk_rows", [5, 256])
def test_scores_are_causal_attention_column_sums(model, ids, monkeypatch, chunk_rows):
    monkeypatch.setattr("kvlab.eviction.CHUNK_ROWS", chunk_rows)  # 5: N % chunk != 0
    _, cache = run(model, ids, "h2o:budget=1000")
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attn = eager(ids, output_attentions=True).attentions  # per layer [B, Hq, N, N], causal
    for layer, a in zip(cache.layers, attn):
        B, Hq, N, _ = a.shape
        expected = a.sum(2).view(B, layer.scores.shape[1], Hq // layer.scores.shape[1], N).sum(2)
        torch.testing.assert_close(layer.scores, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["streamingllm", "h2o", "cab", "snapkv:window=4,interval=1"])
def test_keeps_exactly_the_budget(model, ids, spec):
    for extra, expected in (("budget=10", lambda seen: 10), ("sparsity=0.7", lambda seen: int(seen * 0.3 + 1e-6))):
        _, cache = run(model, ids, param(spec, extra))
        for layer in cache.layers:
            assert layer.keys.shape[2] == layer.kept_length() == expected(ids.shape[1])
            assert layer.positions.shape == layer.keys.shape[:3]
            # really fewer tokens: bytes = kept K/V (+ scores and positions)
            assert layer.memory_bytes() == 2 * layer.keys.numel() * 4 + layer.eviction_bytes()
        assert cache.get_seq_length() == ids.shape[1]


def test_heads_keep_their_own_positions():
    layer = parse_method("h2o:budget=4").make_layer(0, 8)
    k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    layer.update(k, v)
    layer.attend(None, torch.randn(2, 6, 10, 8), k, v, None)  # GQA: 2 query heads per KV head
    pos = layer.positions.long()
    assert layer.keys.shape == (2, 3, 4, 8) and (pos.diff(dim=-1) > 0).all()
    assert pos[..., -1].eq(9).all()  # the recent token (max(1, 0.2 * 4) = 1)
    assert len({tuple(p.tolist()) for p in pos.flatten(0, 1)}) > 1  # heads / rows choose their own
    torch.testing.assert_close(layer.keys, k.gather(2, pos[..., None].expand(-1, -1, -1, 8)), rtol=0, atol=0)
    torch.testing.assert_close(layer.values, v.gather(2, pos[..., None].expand(-1, -1, -1, 8)), rtol=0, atol=0)


def test_sinks_and_recent_are_never_evicted(model, ids):
    n = ids.shape[1]
    _, cache = run(model, ids, "streamingllm:budget=10,sinks=4")
    assert cache.layers[1].positions[0, 0].tolist() == [0, 1, 2, 3] + list(range(n - 6, n))
    for spec, recent in (("h2o:budget=10", 2), ("cab:budget=10", 3), ("snapkv:budget=10,window=4,interval=1", 4)):
        _, cache = run(model, ids, spec)
        for layer in cache.layers:
            assert (layer.positions[..., -recent:] == torch.arange(n - recent, n, dtype=torch.int32)).all(), spec


@pytest.mark.parametrize("spec", ["h2o:budget=10", "cab:sparsity=0.6", "streamingllm:budget=9"])
def test_positions_after_eviction(model, ids, spec):
    """The next token on the evicted cache == a dense model given the kept K/V and the true position."""
    _, cache = run(model, ids[:, :-1], spec)
    dense = DynamicCache()
    for i, layer in enumerate(cache.layers):
        dense.update(layer.keys.clone(), layer.values.clone(), i)
    n = ids.shape[1] - 1
    with torch.no_grad():
        got = model(ids[:, n:], **cache_kwargs(model, cache), use_cache=True).logits
        pos = torch.tensor([[n]])
        want = model(ids[:, n:], **cache_kwargs(model, dense), position_ids=pos, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert dense.get_seq_length() < n  # the dense cache alone would have placed the token at the kept length


def test_batch_rows_are_independent(model, ids):
    both, _ = run(model, ids, "h2o:budget=10")
    for b in range(ids.shape[0]):
        alone, _ = run(model, ids[b : b + 1], "h2o:budget=10")
        torch.testing.assert_close(both[b : b + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["streamingllm:budget=12,sinks=2", "h2o:budget=12", "cab:budget=12",
                                  "snapkv:budget=12,window=4,interval=1"])
def test_left_padding_survives_eviction(model, ids, spec):
    """A left-padded row decodes exactly as it does alone: padding is masked, never a sink, and
    adds no attention mass, before and after evictions."""
    pad = 5
    padded = torch.cat([torch.zeros(2, pad, dtype=ids.dtype), ids], 1)
    mask = torch.ones_like(padded)
    mask[0, :pad] = 0  # row 0 left-padded; row 1 keeps 5 real leading tokens
    padded[1, :pad] = ids[1, :pad]
    cache = make_cache(spec, model)
    with torch.no_grad():
        n = pad + PROMPT
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        out = [model(padded[:, :n], attention_mask=mask[:, :n], position_ids=pos[:, :n], **cache_kwargs(model, cache),
                     use_cache=True).logits[:, -1]]
        for t in range(n, padded.shape[1]):
            out.append(model(padded[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                             **cache_kwargs(model, cache), use_cache=True).logits[:, -1])
    alone, _ = run(model, ids[:1], spec)
    torch.testing.assert_close(torch.stack(out, 1)[:1], alone, rtol=1e-4, atol=1e-4)
    layer = cache.layers[0]
    assert layer.kept_length() == 12 and bool(layer.valid[0].all())  # the padding was evicted first


def test_reset_clears_scores(model, ids):
    out, cache = run(model, ids, "h2o:budget=10")
    cache.reset()
    assert cache.layers[0].scores is None and cache.get_seq_length() == 0
    again, _ = run(model, ids, None, cache=cache)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_composition_quantizes_only_kept_tokens(model, ids):
    spec = "h2o:budget=16+kitty-pro:group_size=8,residual=8,sinks=2"
    method = parse_method(spec)
    assert isinstance(method, Composed) and method.label == spec
    out, cache = run(model, ids, spec)
    for layer in cache.layers:
        sinks, key_tail, value_tail = layer._lengths()
        assert layer.kept_length() == 16 and sinks == 2
        assert layer.quantized_tokens() == (16 - sinks - key_tail, 16 - sinks - value_tail)
        keys, values = layer.dequantized()
        assert keys.shape[2] == values.shape[2] == 16
        assert (layer.positions[..., :2] == torch.tensor([0, 1], dtype=torch.int32)).all()  # fp16 sinks kept
    # with nothing evicted, the composition is the quantization method itself
    quant, _ = run(model, ids, "kitty-pro:group_size=8,residual=8,sinks=2")
    full, _ = run(model, ids, "h2o:budget=1000+kitty-pro:group_size=8,residual=8,sinks=2")
    torch.testing.assert_close(full, quant, rtol=1e-5, atol=1e-5)


def test_ragged_key_store_decodes_kept_codes(model, ids):
    """After eviction, the decoded keys are the quantized layer's keys at the kept entries."""
    spec = "kivi-2:group_size=8,residual=8"
    _, quant = run(model, ids, spec)
    _, evict = run(model, ids, "streamingllm:budget=24,sinks=0+" + spec)
    layer, ref = evict.layers[0], quant.layers[0]
    ref._flush()  # the plain layer quantizes at the next update; the evicting one after attention
    # layer 0 sees the same inputs in both runs; streamingllm evicts the oldest, uniformly per head
    kept = layer.positions[0, 0].long()
    torch.testing.assert_close(layer.dequantized()[0], ref.dequantized()[0][:, :, kept], rtol=0, atol=0)


def test_top_k_mask_is_exact_and_prefers_recent_ties():
    p = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0]])
    assert top_k_mask(p, 2).tolist() == [[False, False, True, False, True]]
    assert top_k_mask(torch.rand(3, 4, 50), 7).sum(-1).eq(7).all()


def test_parse_and_labels():
    m = parse_method("h2o:budget=256")
    assert isinstance(m, EvictionMethod) and m.token_budget(10_000) == 256 and m.budget_tag == "b256"
    assert parse_method("cab").with_budget(sparsity=0.9).label == "cab:sparsity=0.9"
    assert parse_method("cab").token_budget(1000) == 500 and parse_method("cab:sparsity=0.9").token_budget(1000) == 100
    with pytest.raises(ValueError, match="not an eviction method"):
        parse_method("kivi-2+h2o")
    with pytest.raises(ValueError, match="sparsity"):
        parse_method("h2o:sparsity=1.0")


def test_needs_kvlab_attention():
    """make_cache switches the model to kvlab's attention; switching it away afterwards is a clear error."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=64)
    plain = AutoModelForCausalLM.from_config(config).eval()
    plain.set_attn_implementation("sdpa")
    cache = make_cache("h2o:budget=4", plain)
    assert plain.config._attn_implementation == "kvlab"
    plain.set_attn_implementation("sdpa")
    with torch.no_grad(), pytest.raises(RuntimeError, match="kvlab.attention.enable"):
        for t in range(3):
            plain(torch.tensor([[t]]), **cache_kwargs(plain, cache), use_cache=True)
