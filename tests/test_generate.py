"""kvlab.generate on CPU (the dynamic path; the static CUDA-graph path is tested in test_kernels.py)."""

import pytest
import torch
from transformers.utils.deprecation import deprecate_kwarg

import kvlab
from kvlab.bench import latency as lat
from kvlab.eval.fidelity import decode
from kvlab.eval.ppl import full_sequence_nll, window_nll
from kvlab.generate import _stop_at_eos, greedy_tokens, prompt_positions
from kvlab.methods import parse_method
from kvlab.models import cache_kwargs, load_model


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("random:tiny-llama")
    return model


def test_generate_matches_model_generate(tiny):
    ids = torch.randint(3, tiny.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    got = kvlab.generate(tiny, ids, "fp16", max_new_tokens=20, attention_mask=mask)
    ref = tiny.generate(ids, attention_mask=mask, **cache_kwargs(tiny, kvlab.make_cache("fp16", tiny)),
                        max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)


def test_generate_with_a_quantized_cache_is_greedy_over_that_cache(tiny):
    """Each generated token is the argmax of the logits the same cache gives when fed those tokens.
    (Token-for-token equality with ``model.generate`` does not hold here: its prefill differs by ~1e-7,
    which can flip a quantization code, and random weights give near-tied logits.)"""
    spec = "kivi-2:group_size=16,residual=16"
    ids = torch.randint(3, tiny.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    new = kvlab.generate(tiny, ids, spec, max_new_tokens=20, attention_mask=mask)[:, 30:]
    cache = kvlab.make_cache(spec, tiny)
    pos = prompt_positions(mask, 2, 30, "cpu")
    with torch.no_grad():
        logits = tiny(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(tiny, cache)).logits[:, -1]
        for s in range(new.shape[1]):
            assert torch.equal(logits.argmax(-1), new[:, s]), s
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            logits = tiny(new[:, s : s + 1], attention_mask=mask, position_ids=pos[:, -1:] + s + 1,
                          **cache_kwargs(tiny, cache)).logits[:, -1]


def test_stop_at_eos_pads_after_the_first_eos_and_drops_finished_columns():
    new = torch.tensor([[5, 2, 7, 8], [5, 6, 2, 9]])
    assert torch.equal(_stop_at_eos(new, 2, 0), torch.tensor([[5, 2, 0], [5, 6, 2]]))
    assert torch.equal(_stop_at_eos(new, [7, 9], 0), torch.tensor([[5, 2, 7, 0], [5, 6, 2, 9]]))
    assert torch.equal(_stop_at_eos(new, None, 0), new)


@pytest.mark.parametrize("kwargs,match", [({"max_new_tokens": 0}, "max_new_tokens"),
                                          ({"input_ids": torch.zeros(3, dtype=torch.long)}, "input_ids")])
def test_generate_rejects_bad_input(tiny, kwargs, match):
    args = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        kvlab.generate(tiny, args.pop("input_ids"), "fp16", **args)


def test_chunked_prefill_fills_the_same_cache(tiny):
    case = lat.method_case(parse_method("kivi-2:group_size=16,residual=16"))
    whole = lat.measure(tiny, case, 2, 48, 3, 0)
    chunked = lat.measure(tiny, case, 2, 48, 3, 0, prefill=lat.Prefill(chunk=20))
    assert chunked["cache_bytes"] == whole["cache_bytes"]
    assert chunked["bits_per_value_all_in"] == whole["bits_per_value_all_in"]


@pytest.mark.parametrize("spec", ["fp16", "kivi-2:group_size=16,residual=16"])
def test_repeated_prefill_rows_equal_prefilling_every_row(tiny, spec):
    """--prefill-rows: one prefilled row repeated (and cut) to a batch of 3 holds exactly what prefilling the
    same prompt in all 3 rows holds, and fp16 buffers stay preallocated (decoding writes in place)."""
    ids = torch.randint(3, 128, (1, 40))
    one = kvlab.make_cache(spec, tiny, max_length=48)
    tiny(ids, **cache_kwargs(tiny, one))
    one.batch_repeat_interleave(2)
    one.batch_repeat_interleave(2)
    one.batch_select_indices(torch.tensor([0, 1, 3]))
    three = kvlab.make_cache(spec, tiny, max_length=48)
    tiny(ids.expand(3, -1), **cache_kwargs(tiny, three))
    for a, b in zip(one.layers, three.layers):
        held_a, held_b = _held(a), _held(b)
        assert held_a.keys() == held_b.keys() and all(torch.equal(held_a[k], held_b[k]) for k in held_a)
        if spec == "fp16":
            assert a.preallocated() and a.buffers[0].shape == b.buffers[0].shape


def _held(layer) -> dict:
    names = ("keys", "values", "sink_keys", "sink_values", "key_tail", "value_tail")
    held = {n: getattr(layer, n) for n in names if getattr(layer, n, None) is not None}
    for store in ("key_store", "value_store"):
        if hasattr(layer, store):
            held.update({f"{store}.{n}": t for n, t in getattr(layer, store).fields.items()})
    return held


def test_prefill_rows_time_the_same_decode(tiny):
    case = lat.method_case(parse_method("kivi-2:group_size=16,residual=16"))
    every = lat.measure(tiny, case, 3, 48, 3, 0)
    repeated = lat.measure(tiny, case, 3, 48, 3, 0, prefill=lat.Prefill(rows=2))
    assert (every["prefill_rows"], repeated["prefill_rows"]) == (3, 2)
    assert repeated["batch"] == 3 and repeated["cache_bytes"] == every["cache_bytes"]


def test_a_kvlab_row_without_a_static_path_decodes_eagerly(tiny, monkeypatch):
    """compile_layers applies to the static path only: without one (CPU here) the row times the plain
    loop, uncompiled, and says so."""
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called for a row without a static path")

    monkeypatch.setattr(torch, "compile", no_compile)
    row = lat.measure(tiny, lat.method_case(parse_method("fp16"), compile_layers=True), 1, 16, 3, 0)
    assert row["decode_path"] == "eager"


def test_static_path_says_why_it_does_not_apply(tiny):
    from kvlab.static import make_static, static_reason

    ids = torch.zeros(1, 8, dtype=torch.long)
    fp16 = kvlab.make_cache("fp16", tiny)
    tiny(ids, **cache_kwargs(tiny, fp16))
    assert static_reason(fp16) == "not on a CUDA device"
    evicting = kvlab.make_cache("h2o:budget=4", tiny)
    tiny(ids, **cache_kwargs(tiny, evicting))
    assert "has no static decode path" in static_reason(evicting)
    with pytest.raises(ValueError, match="no static decode path: not on a CUDA device"):
        make_static(fp16, tiny, 4)


@pytest.mark.parametrize("vocab", [100, 5000, 8192])
def test_greedy_tokens_are_the_argmax_with_the_first_maximum_on_ties(vocab):
    logits = torch.randn(5, vocab)
    logits[1, [7, vocab - 3, vocab - 1]] = 50.0  # ties across chunks: the first one wins
    logits[2, -1] = 60.0  # the padded last chunk
    logits[3] = 0.0  # all equal
    got = greedy_tokens(logits)
    assert got.shape == (5, 1) and torch.equal(got, logits.argmax(-1, keepdim=True))
    assert got[1, 0] == 7 and got[3, 0] == 0


class _CacheForward(torch.nn.Module):  # transformers >= 5.25
    def forward(self, input_ids, cache=None):
        return cache


class _RenamedForward(torch.nn.Module):  # 5.25's models: the old name still accepted, with a warning
    @deprecate_kwarg("past_key_values", "99.0.0", new_name="cache")
    def forward(self, input_ids, cache=None):
        return cache


class _PastKeyValuesForward(torch.nn.Module):  # transformers 5.17
    def forward(self, input_ids, past_key_values=None):
        return past_key_values


@pytest.mark.parametrize("cls,keyword", [(_CacheForward, "cache"), (_RenamedForward, "cache"),
                                         (_PastKeyValuesForward, "past_key_values")])
def test_cache_kwargs_names_the_keyword_the_models_forward_takes(cls, keyword, cache_deprecations):
    model, cache = cls(), object()
    assert cache_kwargs(model, cache) == {keyword: cache}
    assert model(None, **cache_kwargs(model, cache)) is cache
    # a compiled module's own forward takes (*args, **kwargs): the keyword comes from the module it wraps
    assert cache_kwargs(torch.compile(model), cache) == {keyword: cache}
    assert cache_deprecations() == []


def test_kvlab_passes_the_cache_without_a_deprecation_warning(tiny, cache_deprecations):
    """transformers 5.25's forwards take ``cache=`` (``past_key_values=`` warns, and goes in 5.40; 5.17 has no
    ``cache=``): kvlab's own forwards and ``generate`` calls pass the keyword the model takes."""
    ids = torch.randint(3, tiny.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    fp16, kivi = parse_method("fp16"), parse_method("kivi-2:group_size=8,residual=8")
    assert kvlab.generate(tiny, ids, kivi, max_new_tokens=4).shape == (1, 28)
    assert window_nll(tiny, ids, kivi, 8, 4)["tokens"] == 16
    assert full_sequence_nll(tiny, ids, fp16, 8, 4)["tokens"] == 23
    assert len(decode(tiny, kivi, ids, 3)[0]) == 3
    assert lat.measure(tiny, lat.method_case(fp16), 1, 16, 3, 0)["decode_path"] == "eager"
    out = tiny.generate(ids, **cache_kwargs(tiny, kvlab.make_cache(kivi, tiny)), max_new_tokens=3, min_new_tokens=3,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 27)
    assert cache_deprecations() == []
    if "cache" in cache_kwargs(tiny, None):  # and the check sees the warning the old keyword gets
        tiny(ids, past_key_values=kvlab.make_cache(fp16, tiny))
        assert cache_deprecations()
