"""Triton kernels of kvlab.kernels against their PyTorch references, on fresh random inputs.

With a GPU the kernels run compiled (benchmarks/gpu_check.sh). Without one they run in Triton's
interpreter on small shapes; TRITON_INTERPRET must be set before triton is first imported, and
conftest imports transformers (which imports triton), so on CPU this module re-runs itself in a
subprocess with the flag set.
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
RUN_HERE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
here = pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter subprocess (test_kernels_interpreted)")

if HAS_TRITON:
    from kvlab.cache import QuantizedLayer
    from kvlab.kernels import fused_attend, quantize_pack_keys, quantize_pack_values
    from kvlab.kernels.reference import reference_attend
    from kvlab.kernels.scored_attention import scored_attention_triton
    from kvlab.quant.codecs import KeyChannelCodec, ValueTokenCodec


@pytest.mark.skipif(RUN_HERE, reason="the kernels run in this process")
def test_kernels_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def keys_like_a_model(B, H, T, D, dtype):
    """Random keys with per-channel offsets and scales (outlier channels, as real keys have)."""
    chan = torch.randn(1, H, 1, D, device=DEVICE) * 2
    spread = torch.rand(1, H, 1, D, device=DEVICE) * 3 + 0.2
    return (torch.randn(B, H, T, D, device=DEVICE) * spread + chan).to(dtype)


# -- quantize + pack ----------------------------------------------------------------------

KEY_CASES = [  # bits, group, boosted channels, boost bits, (B, H, T, D)
    (2, 32, 0, 4, (2, 3, 64, 64)),
    (4, 16, 0, 4, (1, 2, 48, 128)),
    (2, 32, 12, 4, (2, 2, 64, 64)),
    (2, 64, 25, 4, (1, 2, 128, 128)),
    (1, 32, 8, 2, (1, 1, 32, 64)),
]


@here
@pytest.mark.parametrize("bits,group,nb,boost_bits,shape", KEY_CASES)
def test_quantize_pack_keys(bits, group, nb, boost_bits, shape):
    codec = KeyChannelCodec(bits, group, nb, boost_bits)
    x = keys_like_a_model(*shape, torch.bfloat16)
    got, ref = quantize_pack_keys(codec, x), codec.encode(x)
    assert got.keys() == ref.keys()
    if nb:
        # The boost ranking may differ only at fp32 near-ties of the mean |k| (see quant_pack.py).
        same = (got["idx"] == ref["idx"]).all(-1)  # [B, H, blocks]
        if not same.all():
            B, H, T, D = x.shape
            means = x.float().abs().reshape(B, H, T // group, group, D).mean(3).sort(-1, descending=True).values
            gap = (means[..., nb - 1] - means[..., nb]) / means[..., nb - 1]
            assert (gap[~same] < 1e-5).all(), "boost selection differs away from a tie"
        rows = same[:, :, :, None].repeat_interleave(group, 2)
        for name, per in (("lo", 8 // bits), ("hi", 8 // (boost_bits - bits))):
            r = rows[:, :, ::per]
            assert torch.equal(got[name][r.expand_as(got[name])], ref[name][r.expand_as(ref[name])]), name
        for name in ("scale", "zero"):
            assert torch.equal(got[name][same], ref[name][same]), name
    else:
        for name in ref:
            assert torch.equal(got[name], ref[name]), name


@here
@pytest.mark.parametrize("bits,group,shape", [(2, 64, (2, 3, 48, 64)), (4, 32, (2, 2, 40, 128)),
                                              (2, 128, (1, 2, 16, 128)), (8, 32, (1, 1, 12, 64)),
                                              (1, 32, (1, 2, 96, 64))])
def test_quantize_pack_values(bits, group, shape):
    """Whole blocks of the codec (16 tokens at 2 bits); the kernel's programs take 16 or 32 tokens, so some
    shapes end in a partial program."""
    codec = ValueTokenCodec(bits, group)
    x = (torch.randn(*shape, device=DEVICE) * 3).to(torch.bfloat16)
    got, ref = quantize_pack_values(codec, x), codec.encode(x)
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


@here
def test_quantize_pack_takes_views():
    """The cache quantizes slices of its tail: non-contiguous views along the token axis."""
    tail = torch.randn(2, 2, 80, 64, device=DEVICE, dtype=torch.float16)
    view = tail[:, :, 3:67]
    codec = KeyChannelCodec(2, 32, 6, 4)
    got, ref = quantize_pack_keys(codec, view), codec.encode(view)
    assert torch.equal(got["lo"], ref["lo"]) and torch.equal(got["scale"], ref["scale"])
    vcodec = ValueTokenCodec(2, 64)
    assert torch.equal(quantize_pack_values(vcodec, view)["codes"], vcodec.encode(view)["codes"])


# -- decode attention ---------------------------------------------------------------------

def filled_layer(B, H_kv, D, key_codec, value_codec, residual, sinks, prompt, steps, dtype):
    """A QuantizedLayer after a prompt and ``steps`` decode updates (tails are views, lengths odd)."""
    layer = QuantizedLayer(key_codec, value_codec, residual, sinks)
    for n in [prompt] + [1] * steps:
        layer.update(keys_like_a_model(B, H_kv, n, D, dtype), torch.randn(B, H_kv, n, D, device=DEVICE, dtype=dtype))
    return layer


DECODE_CASES = [  # B, H_kv, n_rep, D, bits, group, boosted, sinks, prompt, steps, q_len, dtype, left pad
    (2, 2, 1, 64, 2, 32, 0, 0, 150, 3, 1, torch.bfloat16, False),
    (2, 2, 4, 64, 2, 32, 12, 4, 131, 2, 1, torch.bfloat16, True),
    (1, 2, 8, 128, 2, 64, 25, 32, 190, 1, 1, torch.bfloat16, False),
    (3, 1, 4, 128, 4, 32, 0, 0, 97, 4, 1, torch.float16, False),
    (2, 2, 4, 64, 2, 16, 0, 4, 45, 2, 2, torch.bfloat16, True),
    (1, 1, 1, 64, 4, 32, 0, 4, 20, 1, 1, torch.float16, False),  # nothing quantized yet
    # value groups span the head (the default G = head_dim): value scales fold into p
    (2, 2, 4, 64, 2, 64, 0, 0, 300, 2, 1, torch.bfloat16, True),
    (1, 2, 4, 128, 2, 128, 25, 32, 620, 3, 1, torch.bfloat16, False),
    (1, 1, 4, 64, 4, 64, 0, 4, 230, 1, 2, torch.float16, False),
    # 8- and 1-bit codes: the generic programs take every tile (value blocks of 4 and 32 tokens)
    (1, 2, 4, 64, 8, 32, 0, 0, 100, 2, 1, torch.bfloat16, False),
    (2, 1, 4, 64, 1, 32, 0, 4, 120, 2, 1, torch.bfloat16, True),
]


@here
@pytest.mark.parametrize("B,H_kv,n_rep,D,bits,group,nb,sinks,prompt,steps,q_len,dtype,pad", DECODE_CASES)
def test_fused_attend(B, H_kv, n_rep, D, bits, group, nb, sinks, prompt, steps, q_len, dtype, pad):
    key_codec = KeyChannelCodec(bits, group, nb, 4)
    layer = filled_layer(B, H_kv, D, key_codec, ValueTokenCodec(bits, min(group, D)), 2 * group, sinks, prompt,
                         steps, dtype)
    if q_len > 1:  # a few query tokens at once (speculative decoding): append them first
        new_values = torch.randn(B, H_kv, q_len, D, device=DEVICE, dtype=dtype)
        layer.update(keys_like_a_model(B, H_kv, q_len, D, dtype), new_values)
    query = torch.randn(B, H_kv * n_rep, q_len, D, device=DEVICE, dtype=dtype)
    mask = None
    if pad:  # left padding: row 0 starts 7 tokens late
        L = layer.get_seq_length()
        mask = torch.ones(B, 1, q_len, L, dtype=torch.bool, device=DEVICE).tril(L - q_len)
        mask[0, ..., :7] = False
    out = fused_attend(layer, query, mask, D**-0.5)
    ref = reference_attend(layer, query, mask, D**-0.5, compute_dtype=torch.float32)
    assert out.shape == (B, q_len, H_kv * n_rep, D) and out.dtype == dtype
    assert rel_err(out, ref) < 1e-2


@here
@pytest.mark.parametrize("pad", [False, True])
def test_fused_attend_128_token_tiles(monkeypatch, pad):
    """Lean tiles of 128 tokens (KVLAB_LEAN_TILE=128; a group of 64 keeps them at 64): same result as the
    reference."""
    from kvlab.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "LEAN_TILE", 128)
    codecs = KeyChannelCodec(2, 128), ValueTokenCodec(2, 64)
    assert decode_attention.lean_config(*codecs) == (True, 128)
    assert decode_attention.lean_config(KeyChannelCodec(2, 64), codecs[1]) == (True, 64)
    layer = filled_layer(2, 2, 64, *codecs, 256, 4, 700, 2, torch.bfloat16)
    query = torch.randn(2, 8, 1, 64, device=DEVICE, dtype=torch.bfloat16)
    mask = None
    if pad:
        mask = torch.ones(2, 1, 1, layer.get_seq_length(), dtype=torch.bool, device=DEVICE)
        mask[1, ..., :9] = False
    out = fused_attend(layer, query, mask, 0.125)
    assert rel_err(out, reference_attend(layer, query, mask, 0.125, compute_dtype=torch.float32)) < 1e-2


@here
@pytest.mark.parametrize("nb,tiles", [(0, 1), (0, 3), (12, 3)])
def test_fused_attend_lean_programs_start_inside_a_key_group_and_logits_grow(monkeypatch, nb, tiles):
    """Lean programs of 1 or 3 tiles of 64 tokens start inside 128-token key groups (the group's scales and its
    query products are taken where a program starts), and keys drift along the queries' direction so that the
    logits grow by ~2.5 (base 2) per tile up to a peak before the fp16 tail: the running max moves at most tiles
    where the weight is (the rescale, and `benchmarks/experiments/group_once_lazy_rescale.patch`'s threshold of 2).
    The reference's result."""
    from kvlab.kernels import decode_attention

    B, H_kv, D, T, per_sm = 1, 2, 64, 1200, 64
    monkeypatch.setattr(decode_attention, "LEAN_MIN_TILES", tiles)
    monkeypatch.setattr(decode_attention, "LEAN_PER_SM", per_sm)
    u = torch.nn.functional.normalize(torch.randn(H_kv, D, device=DEVICE), dim=-1)
    query = (4 * u.repeat_interleave(4, 0) + 0.5 * torch.randn(H_kv * 4, D, device=DEVICE))[None, :, None]
    query = query.to(torch.bfloat16)
    t = torch.arange(T, device=DEVICE)[:, None]
    rise = torch.where(t < 800, t, 1600 - t)  # a peak before the fp16 tail (its last 256 tokens at least)
    drift = rise * (2.5 / 64 / (0.125 * 4 * math.log2(math.e))) * u[:, None, :]  # q.u ~ 4, scale 0.125
    keys = (keys_like_a_model(B, H_kv, T, D, torch.float32) + drift).to(torch.bfloat16)
    values = torch.randn(B, H_kv, T, D, device=DEVICE, dtype=torch.bfloat16)
    layer = QuantizedLayer(KeyChannelCodec(2, 128, nb, 4), ValueTokenCodec(2, 64), 256, 4)
    layer.update(keys[:, :, :-1], values[:, :, :-1])
    layer.update(keys[:, :, -1:], values[:, :, -1:])  # quantizes what left the window
    sms = decode_attention._num_sms(torch.device(DEVICE))
    n_lean = min(layer.key_store.tokens, layer.value_store.tokens) // 64  # tiles whose keys and values are packed
    assert decode_attention.plan_splits(n_lean, B * H_kv, sms, per_sm)[0] == tiles
    out = fused_attend(layer, query, None, 0.125)
    assert rel_err(out, reference_attend(layer, query, None, 0.125, compute_dtype=torch.float32)) < 1e-2


@here
@pytest.mark.parametrize("per_sm", [1, 8])
def test_fused_attend_generic_programs_and_strided_tails(monkeypatch, per_sm):
    """One generic program per (batch, KV head) takes every generic tile (sinks, boundary zone, tails), and
    fp16 parts whose rows do not start on 16 bytes (strided views, an odd offset) are read right."""
    from kvlab.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "GENERIC_PER_SM", per_sm)
    B, H_kv, D = 2, 2, 64
    assert decode_attention.generic_programs(B * H_kv, decode_attention._num_sms(torch.device(DEVICE))) == (
        min(decode_attention.N_GENERIC, max(1, per_sm * decode_attention._num_sms(torch.device(DEVICE)) // 4)))
    layer = filled_layer(B, H_kv, D, KeyChannelCodec(2, 32), ValueTokenCodec(2, 64), 64, 8, 300, 3, torch.bfloat16)
    wide = torch.zeros(*layer.key_tail.shape[:3], D + 4, device=DEVICE, dtype=torch.bfloat16)
    wide[..., :D] = layer.key_tail
    layer.key_tail = wide[..., :D]  # rows 68 elements apart
    flat = torch.empty(layer.value_tail.numel() + 1, device=DEVICE, dtype=torch.bfloat16)
    flat[1:] = layer.value_tail.flatten()
    layer.value_tail = flat[1:].view(layer.value_tail.shape)  # starts 2 bytes into the buffer
    query = torch.randn(B, H_kv * 4, 1, D, device=DEVICE, dtype=torch.bfloat16)
    out = fused_attend(layer, query, None, 0.125)
    assert rel_err(out, reference_attend(layer, query, None, 0.125, compute_dtype=torch.float32)) < 1e-2


@here
@pytest.mark.parametrize("merge_parts", [0, 64])
def test_fused_attend_merges_partials_by_the_last_program_or_the_merge_kernel(monkeypatch, merge_parts):
    """Partials merged by the last program of each (batch, KV head) (in chunks, the last one partial) or by the
    merge kernel: the reference's result, twice in a row, and the arrival counters are back at 0 after a call."""
    from kvlab.kernels import decode_attention

    monkeypatch.setattr(decode_attention, "MERGE_PARTS", merge_parts)
    layer = filled_layer(1, 2, 64, KeyChannelCodec(2, 64), ValueTokenCodec(2, 64), 64, 4, 700, 2, torch.bfloat16)
    for _ in range(2):
        query = torch.randn(1, 8, 1, 64, device=DEVICE, dtype=torch.bfloat16)
        out = fused_attend(layer, query, None, 0.125)
        assert rel_err(out, reference_attend(layer, query, None, 0.125, compute_dtype=torch.float32)) < 1e-2
        assert all(not t.any() for held in decode_attention._TICKETS.values() for t in held)
    _, n_split = decode_attention.plan_splits(layer.key_store.tokens // 64, 2, decode_attention._num_sms(
        torch.device(DEVICE)), 12)
    n_parts = n_split + decode_attention.generic_programs(2, decode_attention._num_sms(torch.device(DEVICE)))
    chunk = decode_attention.merge_chunk(n_parts, 4, 64, 1)
    assert (chunk == 0) == (merge_parts == 0) and (merge_parts == 0 or n_parts % chunk)  # a partial last chunk


@here
def test_fused_attend_prefill_falls_back():
    """Many query rows (prefill) go to the reference path, with the same result."""
    layer = QuantizedLayer(KeyChannelCodec(2, 32), ValueTokenCodec(2, 32), 32, 4)
    x = torch.randn(1, 1, 70, 64, device=DEVICE, dtype=torch.float16)
    layer.update(x, x)
    query = torch.randn(1, 2, 70, 64, device=DEVICE, dtype=torch.float16)
    out = fused_attend(layer, query, None, 0.125)
    assert rel_err(out, reference_attend(layer, query, None, 0.125, compute_dtype=torch.float32)) < 1e-2


SCORED_CASES = [  # B, H_kv, n_rep, q_len, N, D, dtype, masked
    (2, 2, 2, 1, 37, 16, torch.float32, False),
    (1, 1, 4, 3, 70, 32, torch.float32, True),
    (2, 2, 1, 2, 130, 64, torch.float16, True),
    (3, 1, 8, 1, 65, 64, torch.bfloat16, False),
]


@here
@pytest.mark.parametrize("B,H_kv,n_rep,q_len,N,D,dtype,masked", SCORED_CASES)
def test_scored_attention_kernel_matches_reference(B, H_kv, n_rep, q_len, N, D, dtype, masked):
    """Output and per-key attention mass (causal, masked per KV head, padded query rows and rows
    before first_row excluded) against kvlab.eviction.scored_attention."""
    from kvlab.eviction import scored_attention

    g = torch.Generator().manual_seed(N)
    query = torch.randn(B, H_kv * n_rep, q_len, D, generator=g).to(DEVICE, dtype)
    key = torch.randn(B, H_kv, N, D, generator=g).to(DEVICE, dtype)
    value = torch.randn(B, H_kv, N, D, generator=g).to(DEVICE, dtype)
    mask = query_valid = None
    if masked:  # per-KV-head validity of the kept entries, causal over the new ones, each row sees itself
        rows = torch.arange(q_len)[:, None] + (N - q_len)
        cols = torch.arange(N)[None, :]
        valid = torch.rand(B, H_kv, N, generator=g) > 0.3
        mask = ((valid[:, :, None, :] | (cols == rows)) & (cols <= rows)).to(DEVICE)
        query_valid = torch.ones(B, q_len, dtype=torch.bool, device=DEVICE)
        query_valid[0, 0] = False
    first_row = 1 if q_len > 1 else 0
    out, mass = scored_attention_triton(query, key, value, mask, None, first_row, query_valid)
    ref_out, ref_mass = scored_attention(query.float(), key.float(), value.float(), mask, None, first_row, query_valid)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref_out) < tol
    assert rel_err(mass, ref_mass) < tol
    assert mass.dtype == torch.float32 and out.shape == (B, q_len, H_kv * n_rep, D)


# -- static (CUDA-graph) decode path ---------------------------------------------------------

STATIC_CASES = [  # B, H_kv, n_rep, D, bits, group, boosted, sinks, residual, prompt, steps, dtype, left pad
    (2, 2, 4, 64, 2, 16, 0, 0, 16, 37, 40, torch.bfloat16, True),
    (1, 2, 2, 64, 2, 32, 12, 4, 32, 70, 45, torch.bfloat16, False),
    (2, 1, 4, 64, 4, 16, 0, 4, 32, 20, 35, torch.float16, False),
    # lean tiles: 3, then 4 per pair (a launch planned for the capacity's 6)
    (2, 2, 4, 64, 2, 64, 0, 4, 64, 320, 20, torch.bfloat16, True),
]


@here
@pytest.mark.parametrize("B,H_kv,n_rep,D,bits,group,nb,sinks,residual,prompt,steps,dtype,pad", STATIC_CASES)
def test_static_layer_matches_dynamic(B, H_kv, n_rep, D, bits, group, nb, sinks, residual, prompt, steps, dtype,
                                      pad):
    """A frozen layer fed the same tokens stores the same codes and attends like the dynamic fused layer."""
    from kvlab.static import StaticQuantizedLayer

    codecs = KeyChannelCodec(bits, group, nb, 4), ValueTokenCodec(bits, D)
    dyn, frozen = (QuantizedLayer(*codecs, residual, sinks) for _ in range(2))
    for layer in (dyn, frozen):
        layer.capacity, layer.fused = -(-(prompt + steps) // group) * group, True
        layer.reset()
    k, v = keys_like_a_model(B, H_kv, prompt, D, dtype), torch.randn(B, H_kv, prompt, D, device=DEVICE, dtype=dtype)
    dyn.update(k, v)
    frozen.update(k, v)
    valid = mask = None
    if pad:  # row 0 starts 5 tokens late
        valid = torch.ones(B, prompt + steps, dtype=torch.bool, device=DEVICE)
        valid[0, :5] = False
    step = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    static = StaticQuantizedLayer(frozen, steps, step, valid)
    for s in range(steps):
        k, v = keys_like_a_model(B, H_kv, 1, D, dtype), torch.randn(B, H_kv, 1, D, device=DEVICE, dtype=dtype)
        query = torch.randn(B, H_kv * n_rep, 1, D, device=DEVICE, dtype=dtype)
        dyn.update(k, v)
        static.store(k, v)
        if valid is not None:
            mask = valid[:, None, None, : prompt + s + 1]
        ref = fused_attend(dyn, query, mask, D**-0.5)
        out = static.attend_step(query, D**-0.5)
        assert rel_err(out, ref) < 2e-3, s
        step += 1
    static.finish(steps)
    assert static.get_seq_length() == dyn.get_seq_length()
    for mine, ref in ((static.key_store, dyn.key_store), (static.value_store, dyn.value_store)):
        assert mine.tokens == ref.tokens
        for name, t in ref.fields.items():
            assert torch.equal(mine.fields[name], t), name


@here
@pytest.mark.parametrize("n_rep,pad,merge_parts", [(1, False, 0), (4, True, 32)])
def test_static_dense_matches_sdpa(monkeypatch, n_rep, pad, merge_parts):
    from kvlab.cache import FullPrecisionLayer
    from kvlab.kernels import decode_attention
    from kvlab.kernels.reference import keep_mask
    from kvlab.static import StaticDenseLayer

    monkeypatch.setattr(decode_attention, "MERGE_PARTS", merge_parts)  # the merge kernel / the last program

    B, H, D, prompt, steps = 2, 2, 64, 150, 5
    layer = FullPrecisionLayer()
    keys, values = (torch.randn(B, H, prompt, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    layer.update(keys, values)
    valid = None
    if pad:
        valid = torch.ones(B, prompt + steps, dtype=torch.bool, device=DEVICE)
        valid[1, :9] = False
    step = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    static = StaticDenseLayer(layer, steps, step, valid, 0)
    for s in range(steps):
        k, v = (torch.randn(B, H, 1, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        static.store(k, v)
        query = torch.randn(B, H * n_rep, 1, D, device=DEVICE, dtype=torch.bfloat16)
        out = static.attend_step(query, D**-0.5)
        mask = keep_mask(None if valid is None else valid[:, None, None, : keys.shape[2]], 1, keys.shape[2], DEVICE)
        ref = torch.nn.functional.scaled_dot_product_attention(
            query.float(), keys.float().repeat_interleave(n_rep, 1), values.float().repeat_interleave(n_rep, 1),
            attn_mask=mask, scale=D**-0.5).transpose(1, 2)
        assert rel_err(out, ref) < 1e-2
        step += 1


@here
@pytest.mark.parametrize("spec,compile", [("fp16", False), ("kivi-2:group_size=16,residual=16", False),
                                          ("kivi-2:group_size=16,residual=16", True)])
def test_static_decoder_follows_the_dynamic_cache(spec, compile):
    """StaticDecoder's greedy tokens, fed through the dynamic fused cache, are its argmax at every step
    (or within bf16 noise of it): the static path computes what the reference path computes, with
    the decoder layers compiled (Inductor around kvlab's cache ops) or not."""
    import kvlab
    from kvlab.generate import StaticDecoder, prompt_positions
    from kvlab.models import cache_kwargs, load_model

    model, _ = load_model("random:tiny-llama", device=DEVICE, dtype=torch.bfloat16)
    B, P, steps = 2, 40, 24
    ids = torch.randint(0, model.config.vocab_size, (B, P), device=DEVICE)
    mask = torch.ones(B, P, dtype=torch.long, device=DEVICE)
    mask[1, :6] = 0
    pos = prompt_positions(mask, B, P, DEVICE)

    def prefill():
        cache = kvlab.make_cache(spec, model, max_length=128)
        if spec != "fp16":
            cache.use_fused_attention(model)  # what make_cache does on a CUDA model
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache),
                       logits_to_keep=1).logits
        return cache, logits[:, -1:].argmax(-1)

    with torch.inference_mode():
        cache, first = prefill()
        decoder = StaticDecoder(model, cache, first, pos[:, -1:], steps, mask, cuda_graph=False, compile=compile)
        attn = model.model.layers[0].self_attn
        storage = lambda m: m.weight.untyped_storage().data_ptr()  # noqa: E731
        assert storage(attn.q_proj) == storage(attn.v_proj)  # joined while the decoder holds the model
        for _ in range(steps):
            decoder.step()
        if compile:  # one graph serves every layer: the cache ops take no layer index
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        tokens = decoder.finish()
        assert storage(attn.q_proj) != storage(attn.v_proj)  # apart again
        with pytest.raises(RuntimeError, match="this decoder has finished"):
            decoder.step()
        assert tokens.shape == (B, steps + 1) and cache.get_seq_length() == P + steps
        ref_cache, ref_first = prefill()
        assert torch.equal(ref_first, first)
        running = mask
        for s in range(steps):
            running = torch.cat([running, running.new_ones(B, 1)], 1)
            logits = model(input_ids=tokens[:, s : s + 1], attention_mask=running, position_ids=pos[:, -1:] + s + 1,
                           **cache_kwargs(model, ref_cache)).logits[:, -1].float()
            chosen = logits.gather(1, tokens[:, s + 1 :s + 2]).squeeze(1)
            assert ((logits.max(1).values - chosen) <= 2e-2 * logits.abs().max(1).values).all(), s


def test_tuning_override_must_be_an_integer(monkeypatch):
    from kvlab.kernels.decode_attention import _tuning

    monkeypatch.setenv("KVLAB_LEAN_TILE", "32")
    assert _tuning("KVLAB_LEAN_TILE", 64) == 32
    monkeypatch.setenv("KVLAB_LEAN_TILE", "")
    assert _tuning("KVLAB_LEAN_TILE", 64) == 64
    monkeypatch.setenv("KVLAB_LEAN_TILE", "sixty-four")
    with pytest.raises(ValueError, match="KVLAB_LEAN_TILE='sixty-four': kvlab's kernel tuning overrides take an integer"):
        _tuning("KVLAB_LEAN_TILE", 64)
    monkeypatch.setenv("KVLAB_MAXNREG", "-8")  # a negative register cap went on to Triton (a traceback)
    with pytest.raises(ValueError, match="KVLAB_MAXNREG=-8: takes an integer >= 0"):
        _tuning("KVLAB_MAXNREG", 128)
    monkeypatch.setenv("KVLAB_LEAN_MAXNREG", "-1")  # -1: the per-configuration rule
    assert _tuning("KVLAB_LEAN_MAXNREG", -1, -1) == -1


def test_overrides_are_read_at_the_first_launch_not_at_import(monkeypatch):
    from kvlab.kernels import decode_attention as da
    from kvlab.quant.codecs import KeyChannelCodec, ValueTokenCodec

    for name in da._OVERRIDES:  # restored after the test
        monkeypatch.setattr(da, name, getattr(da, name))
    monkeypatch.setattr(da, "_overrides_applied", False)
    monkeypatch.setenv("KVLAB_LEAN_TILE", "128")
    monkeypatch.setenv("KVLAB_GENERIC_PROGRAMS", "2")
    assert da.tuning_overrides() == {"LEAN_TILE": 128, "N_GENERIC": 2}
    assert da.LEAN_TILE == 64  # not yet read
    assert da.lean_config(KeyChannelCodec(2, 128), ValueTokenCodec(2, 128)) == (True, 128)
    assert da.N_GENERIC == 2
    monkeypatch.setenv("KVLAB_LEAN_TILE", "32")  # read once
    assert da.lean_config(KeyChannelCodec(2, 128), ValueTokenCodec(2, 128)) == (True, 128)


@pytest.mark.parametrize("value", ["0", "48", "8"])
def test_tile_override_must_be_a_power_of_two_from_16(monkeypatch, value):
    from kvlab.kernels.decode_attention import _tile_tuning

    monkeypatch.setenv("KVLAB_GENERIC_TILE", value)
    with pytest.raises(ValueError, match=f"KVLAB_GENERIC_TILE={value}: a tile takes a power of two >= 16 tokens"):
        _tile_tuning("KVLAB_GENERIC_TILE", 32)
    monkeypatch.setenv("KVLAB_GENERIC_TILE", "128")
    assert _tile_tuning("KVLAB_GENERIC_TILE", 32) == 128
