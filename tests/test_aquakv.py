"""AQUA-KV cache, HIGGS presets and ``kvlab calibrate`` (tiny random Llama; one slow end-to-end test)."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvlab
from kvlab import data, models
from kvlab.aquakv_cache import BufferedBlockLayer, Rope, cache_bits, predictor_parameters
from kvlab.aquakv_calibration import ActivationStore, collect, projections
from kvlab.aquakv_file import load_predictors_file, save_predictors_file
from kvlab.eval.ppl import window_nll
from kvlab.methods import build_method
from kvlab.models import cache_kwargs
from kvlab.quant import higgs
from kvlab.quant.higgs import HiggsQuantizer
from kvlab.quant.predictors import fit_closed_loop

torch.set_num_threads(1)

PREFIX, BUFFER = 4, 8
REAL_CACHE = models.cache_dir()


@pytest.fixture(scope="module", autouse=True)
def grid_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvlab_cache")
    if (REAL_CACHE / "models").is_dir():
        (root / "models").symlink_to(REAL_CACHE / "models")  # the converted SmolLM2 for the slow test
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVLAB_CACHE_DIR", str(root))
        mp.setattr(higgs, "_grid_memo", {})
        yield


def tiny_llama(layers: int = 3, kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=32, vocab_size=128, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def predictors_path(model, tmp_path_factory):
    """Predictors fitted on the tiny model's own K/V: (2, 16) residuals, (1, 16) layer 0, groups of 32."""
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(3, 128, (96,), generator=gen) for _ in range(6)]
    store = ActivationStore(3, 6 * 96, 64, None)
    collect(model, projections(model), windows, store, progress=False)
    predictors, stats = fit_closed_loop(
        (store.read(layer) for layer in range(3)), HiggsQuantizer(2, 16, 32), HiggsQuantizer(1, 16, 32),
        model_id="tiny-llama", kv_heads=2, head_dim=32, valid_rows=96)
    path = tmp_path_factory.mktemp("pred") / "predictors.pt"
    save_predictors_file(path, predictors, Rope.from_model(model), {"nsamples": 6}, stats)
    return path


def aqua(path, **params):
    return build_method("aqua-kv", predictors=str(path), hadamard_groupsize=32, prefix_size=PREFIX,
                        recent_buffer_size=BUFFER, **params)


def record_updates(cache) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Wrap every layer's update to record the (post-RoPE) key/value states it receives."""
    seen = {}
    for i, layer in enumerate(cache.layers):
        seen[i] = []
        original = layer.update

        def update(k, v, *args, _orig=original, _log=seen[i], **kwargs):
            _log.append((k.clone(), v.clone()))
            return _orig(k, v, *args, **kwargs)

        layer.update = update
    return seen


def feed(model, cache, ids: torch.Tensor, prefill: int, chunk: int = 1) -> None:
    with torch.inference_mode():
        model(ids[:, :prefill], **cache_kwargs(model, cache), use_cache=True)
        for pos in range(prefill, ids.shape[1], chunk):
            model(ids[:, pos : pos + chunk], **cache_kwargs(model, cache), use_cache=True)


# -- RoPE -------------------------------------------------------------------------------------


def test_rope_matches_the_model_and_round_trips(model):
    rope = Rope.from_model(model)
    x = torch.randn(2, 2, 50, 32)
    positions = torch.arange(7, 57)
    cos, sin = model.model.rotary_emb(x, positions.unsqueeze(0))
    _, expected = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(rope.apply(x, positions), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rope.remove(rope.apply(x, positions), positions), x, rtol=0, atol=1e-5)


def test_unrotated_cached_keys_are_the_k_proj_outputs(model):
    ids = torch.randint(3, 128, (1, 40))
    k_proj = model.model.layers[1].self_attn.k_proj
    caught = []
    hook = k_proj.register_forward_hook(lambda _m, _i, out: caught.append(out))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
    hook.remove()
    post = cache.layers[1].keys  # [1, H, T, D], post-RoPE
    pre = Rope.from_model(model).remove(post, torch.arange(40)).transpose(1, 2).flatten(2)
    torch.testing.assert_close(pre, caught[0], rtol=0, atol=1e-5)


# -- AQUA-KV cache ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch, prefill, chunk", [(1, 20, 1), (2, 11, 3)])
def test_cache_decodes_exactly_the_encoders_closed_loop(model, predictors_path, batch, prefill, chunk):
    cache = kvlab.make_cache(aqua(predictors_path), model)
    seen = record_updates(cache)
    feed(model, cache, torch.randint(3, 128, (batch, 45)), prefill, chunk)
    loaded = load_predictors_file(predictors_path)
    rope, predictors = loaded.rope, loaded.predictors
    layers = cache.layers
    assert len(layers[0].blocks) >= 3
    # the encoder's closed loop, offline, on the exact states the cache received (post-RoPE -> pre-RoPE rows)
    states = {i: (torch.cat([k for k, _ in log], 2), torch.cat([v for _, v in log], 2)) for i, log in seen.items()}
    expected, prev = {}, {}
    for i, layer in enumerate(layers):
        keys, values = states[i]
        for b, block in enumerate(layer.blocks):
            pos = torch.arange(block.start, block.start + block.length)
            k = rope.remove(keys[:, :, pos].float(), pos).transpose(1, 2).flatten(2)
            v = values[:, :, pos].float().transpose(1, 2).flatten(2)
            codes, rec = predictors.encode_layer(i, k, v, prev.get((i - 1, b)))
            prev[i, b] = expected[i, b] = rec
            stored = block.codes
            for ours, theirs in ((stored.keys, codes.keys), (stored.values, codes.values)):
                assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.scales, theirs.scales)
    # the cache's decoder, layer by layer as in a forward, reproduces every reconstruction bit for bit
    for i, layer in enumerate(layers):
        keys, values = layer.dequantized()
        for b, block in enumerate(layer.blocks):
            rec = expected[i, b]
            pos = torch.arange(block.start, block.start + block.length)
            want_k = rope.apply(rec.keys.unflatten(2, (2, 32)).transpose(1, 2), pos)
            assert torch.equal(keys[:, :, pos], want_k)
            assert torch.equal(values[:, :, pos], rec.values.unflatten(2, (2, 32)).transpose(1, 2))


def test_buffer_and_sink_boundaries_each_token_compressed_once(model, predictors_path):
    cache = kvlab.make_cache(aqua(predictors_path), model)
    ids = torch.randint(3, 128, (1, 60))
    pos, history = 0, []
    with torch.inference_mode():
        for chunk in [2, 1, 1, 9, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 12, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1]:
            before = [list(layer.blocks) for layer in cache.layers]
            x = ids[:, pos : pos + chunk]
            model(x, **cache_kwargs(model, cache), use_cache=True)
            pos += chunk
            for layer, old in zip(cache.layers, before):
                assert layer.get_seq_length() == pos
                sinks = 0 if layer.sink_keys is None else layer.sink_keys.shape[2]
                assert sinks == min(PREFIX, pos)
                blocks = layer.blocks
                assert blocks[: len(old)] == old  # write-once: earlier blocks are untouched
                assert len(blocks) - len(old) <= 1
                if len(blocks) > len(old):  # a flush compresses the whole buffer (>= BUFFER tokens) as one block
                    assert blocks[-1].length >= BUFFER
                assert [b.start for b in blocks] == [PREFIX + sum(b.length for b in blocks[:i])
                                                     for i in range(len(blocks))]
                tail = layer.key_tail.shape[2]
                assert sinks + sum(b.length for b in blocks) + tail == pos
                assert tail < BUFFER + chunk  # the buffer holds < BUFFER old tokens plus this call's
            history.append([(b.start, b.length) for b in cache.layers[0].blocks])
    spans = history[-1]
    assert spans[-1][0] + spans[-1][1] <= pos and len(spans) >= 4


def test_step_that_appends_a_token_attends_to_it_in_full_precision(model, predictors_path):
    cache = kvlab.make_cache(aqua(predictors_path), model)
    seen = record_updates(cache)
    layer = cache.layers[2]
    original = layer.update
    returned = []
    layer.update = lambda k, v, *a, **kw: returned.append(original(k, v, *a, **kw)) or returned[-1]
    feed(model, cache, torch.randint(3, 128, (1, 30)), 13)
    for (k, v), (rk, rv) in zip(seen[2], returned):
        assert torch.equal(rk[:, :, -k.shape[2]:], k) and torch.equal(rv[:, :, -v.shape[2]:], v)


def test_memory_bytes_and_bits_are_honest(model, predictors_path):
    method = aqua(predictors_path)
    cache = kvlab.make_cache(method, model)
    feed(model, cache, torch.randint(3, 128, (2, 37)), 20)
    total = 0
    for layer in cache.layers:
        held = [layer.sink_keys, layer.sink_values, layer.key_tail, layer.value_tail]
        held += [t for b in layer.blocks for codes in b.codes for t in codes]
        total += sum(t.numel() * t.element_size() for t in held)
        assert all(t.dtype == torch.uint8 for b in layer.blocks for t in (b.codes.keys.codes, b.codes.values.codes))
        assert all(t.dtype == torch.float16 for b in layer.blocks for t in (b.codes.keys.scales, b.codes.values.scales))
    assert cache.memory_bytes() == total
    # layer 0: (1, 16) grid = 4 bits, layers 1-2: (2, 16) = 2 bits; plus 16 bits per group of 32
    bits = cache_bits(cache, predictor_parameters(method.codec.predictors))
    assert bits["bits_per_value_quantized"] == pytest.approx((4 + 2 + 2) / 3 + 0.5)
    assert method.bits_per_value(32) == pytest.approx((4 + 2 + 2) / 3 + 0.5)
    values = 2 * 3 * 2 * 2 * 32 * sum(b.length for b in cache.layers[0].blocks)  # K+V, layers, batch, heads, dim
    weights = 16 * 2 * (64 * 64 + 64 + 128 * 64 + 64)
    assert bits["bits_per_value_quantized_with_predictors"] == pytest.approx(
        bits["bits_per_value_quantized"] + weights / values)
    assert method.all_in_bits(1024, 32) > build_method("higgs-2", hadamard_groupsize=32).all_in_bits(1024, 32)


def test_generate_greedy_and_beam_search(model, predictors_path):
    ids = torch.randint(3, 128, (2, 14))
    out = model.generate(ids, **cache_kwargs(model, kvlab.make_cache(aqua(predictors_path), model)), max_new_tokens=30,
                         min_new_tokens=30, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 44)
    cache = kvlab.make_cache(aqua(predictors_path), model)
    out = model.generate(ids[:1], **cache_kwargs(model, cache), max_new_tokens=20, num_beams=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape[0] == 1 and len(cache.layers[0].blocks) >= 2


def test_ppl_cache_loop(model, predictors_path):
    ids = torch.randint(3, 128, (1, 40))
    w = window_nll(model, ids, aqua(predictors_path), prefill=16, chunk_size=1)
    assert w["tokens"] == 24 and math.isfinite(w["nll_sum"])
    assert 2 < w["bits_per_value_quantized"] < 3.2


def test_crop_only_the_buffer(model, predictors_path):
    cache = kvlab.make_cache(aqua(predictors_path), model)
    feed(model, cache, torch.randint(3, 128, (1, 20)), 17)
    buffered = cache.layers[0].key_tail.shape[2]
    cache.crop(20 - buffered)
    assert cache.get_seq_length() == 20 - buffered
    with pytest.raises(ValueError, match="write-once"):
        cache.crop(1)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("other, message", [
    (dict(layers=4), "calibrated for tiny-llama \\(3 layers, 2 KV heads x head_dim 32\\); this model has more layers"),
    (dict(layers=2), "this model has 2 full-attention layers"),
    (dict(kv_heads=1), "C = 64; this model has C = kv_heads \\* head_dim = 32"),
])
def test_predictors_for_another_model_are_refused(predictors_path, other, message):
    other_model = tiny_llama(**other)
    with pytest.raises(ValueError, match=message):
        cache = kvlab.make_cache(aqua(predictors_path), other_model)
        other_model(torch.randint(3, 128, (1, 5)), **cache_kwargs(other_model, cache), use_cache=True)


@pytest.mark.parametrize("spec, message", [
    ("aqua-kv", "aqua-kv needs predictors="),
    ("aqua-kv:predictors=/nonexistent.pt", "does not exist; write one with `kvlab calibrate`"),
    ("aqua-kv:predictors={path},hadamard_groupsize=32,edenn_n=64", "calibrated with edenn_d=2, edenn_n=16"),
    ("aqua-kv:predictors={path},hadamard_groupsize=32", None),
])
def test_bad_aqua_specs_fail_with_one_clear_line(predictors_path, spec, message):
    method = kvlab.parse_method(spec.format(path=predictors_path))
    if message is None:
        with pytest.raises(ValueError, match="calibrated for tiny-llama .*; this model has head_dim 64"):
            method.check_head_dim(64)
        return
    with pytest.raises(ValueError, match=message):
        method.check_head_dim(32)


def test_not_a_predictors_file(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not an aqua-kv predictors file"):
        load_predictors_file(tmp_path / "x.pt")


# -- HIGGS presets ----------------------------------------------------------------------------


def test_higgs_presets():
    bits = {name: build_method(name).bits_per_value(64) for name in ("higgs-2", "higgs-3", "higgs-4")}
    assert bits == pytest.approx({"higgs-2": 2.25, "higgs-3": 3.25, "higgs-4": 4.25})
    assert build_method("higgs-3").edenn_n == 64 and build_method("higgs-4").edenn_n == 256
    with pytest.raises(ValueError, match="hadamard_groupsize=48 must be a power of two"):
        build_method("higgs-2", hadamard_groupsize=48)


def test_higgs2_round_trip_error_is_the_grid_distortion():
    method = build_method("higgs-2", hadamard_groupsize=32, prefix_size=0, recent_buffer_size=64)
    layer = method.make_layer(0, 32)
    assert isinstance(layer, BufferedBlockLayer)
    keys = torch.randn(2, 4, 512, 32) * torch.linspace(0.2, 3, 32)
    values = torch.randn(2, 4, 512, 32)
    layer.update(keys, values)
    rk, rv = layer.update(torch.zeros(2, 4, 1, 32), torch.zeros(2, 4, 1, 32))  # flushes the 512 tokens
    for x, r in ((keys, rk[:, :, :512]), (values, rv[:, :, :512])):
        rel = ((x - r).square().sum() / x.square().sum()).item()
        assert 0.095 < rel < 0.12  # the (2, 16) grid's MSE per dimension is ~0.108


def test_higgs_cache_in_the_model(model):
    cache = kvlab.make_cache("higgs-2:hadamard_groupsize=32,recent_buffer_size=8", model)
    feed(model, cache, torch.randint(3, 128, (1, 30)), 12)
    assert all(len(layer.blocks) >= 2 for layer in cache.layers)
    assert cache.stats()["bits_per_value_quantized"] == pytest.approx(2.5)


# -- kvlab calibrate --------------------------------------------------------------------------


def test_calibrate_rejects_bad_input_before_loading(capsys, tmp_path):
    from kvlab.cli import main

    assert main(["calibrate", "--dataset", str(tmp_path / "none.txt")]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["calibrate", "--model", "random:tiny-llama"]) == 2
    assert "random weights" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_end_to_end_on_smollm2(tmp_path, capsys):
    from kvlab.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(data.load_text("wikitext2")[:20000])  # any text file: this only checks the pipeline
    out = tmp_path / "p.pt"
    rc = main(["calibrate", "--dataset", str(text), "--nsamples", "2", "--seqlen", "64", "--edenn-n", "16",
               "--first-layer-edenn-d", "1", "--first-layer-edenn-n", "16", "--hadamard-groupsize", "64",
               "--output", str(out), "--offload-activations", "--quiet", "--threads", "1"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "K pred valid" in table and "bits/value of compressed tokens" in table
    loaded = load_predictors_file(out)
    assert loaded.predictors.model_id == "smollm2-135m" and loaded.predictors.num_layers == 30
    assert loaded.calibration["nsamples"] == 2 and len(loaded.fit_stats) == 30
    model, tokenizer = models.load_model("smollm2-135m")
    method = build_method("aqua-kv", predictors=str(out), recent_buffer_size=16)
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    cache = kvlab.make_cache(method, model)
    out_ids = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out_ids.shape[1] == ids.shape[1] + 20 and len(cache.layers[0].blocks) >= 2
