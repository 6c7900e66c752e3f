"""Packing, scalar quantization and the block codecs against their definitions."""

import pytest
import torch

from kvlab.quant import uniform
from kvlab.quant.codecs import KeyChannelCodec, ValueTokenCodec
from kvlab.quant.packing import pack, unpack


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_pack_roundtrip_exact(bits, dim):
    shape = [16, 8, 24]
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8)
    packed = pack(codes, bits, dim)
    assert packed.dtype == torch.uint8
    assert packed.shape[dim] == shape[dim] * bits // 8
    assert torch.equal(unpack(packed, bits, dim), codes)


def test_pack_layout_is_little_endian_within_byte():
    codes = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert pack(codes, 2).item() == 1 | 2 << 2 | 3 << 4


def test_pack_rejects_bad_width_and_length():
    with pytest.raises(ValueError, match="supported widths"):
        pack(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack(torch.zeros(6, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_roundtrip_error_within_analytic_bound(bits):
    x = torch.randn(64, 32, 48) * torch.rand(64, 1, 1) * 10 + torch.randn(64, 1, 1)
    x[0] = 3.25  # a constant group
    codes, scale, zero = uniform.quantize(x, bits, dim=2)
    assert codes.max() <= (1 << bits) - 1
    err = (uniform.dequantize(codes, scale, zero, torch.float32) - x).abs()
    bound = uniform.max_roundtrip_error(x, bits, dim=2)
    assert (err <= bound + 1e-6).all()
    # the bound is tight: half a step is reached somewhere for random data
    assert (err / bound).max() > 0.4


def test_key_codec_roundtrip_and_boost_selection():
    torch.manual_seed(1)
    B, H, T, D, G = 2, 3, 64, 32, 32
    x = torch.randn(B, H, T, D)
    x[..., 5] *= 20  # an outlier channel: must be boosted in every block
    codec = KeyChannelCodec(bits=2, group_size=G, boost_channels=4, boost_bits=4)
    fields = codec.encode(x)
    assert fields["lo"].shape == (B, H, T * 2 // 8, D)
    assert fields["hi"].shape == (B, H, T * 2 // 8, 4)
    assert fields["idx"].shape == (B, H, T // G, 4)
    assert (fields["idx"] == 5).any(-1).all()
    expected_idx = x.reshape(B, H, T // G, G, D).abs().mean(3).topk(4, -1).indices.sort(-1).values
    assert torch.equal(fields["idx"].long(), expected_idx)
    y = codec.decode(fields, torch.float32)
    blocks = x.reshape(B, H, T // G, G, D)
    boosted = torch.zeros(B, H, T // G, D, dtype=torch.bool).scatter_(-1, expected_idx, True)
    bound2 = uniform.max_roundtrip_error(blocks, 2, dim=3)
    bound4 = uniform.max_roundtrip_error(blocks, 4, dim=3)
    bound = torch.where(boosted.unsqueeze(3), bound4, bound2)
    assert ((y.reshape_as(blocks) - blocks).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_value_codec_roundtrip_and_layout(bits):
    codec = ValueTokenCodec(bits=bits, group_size=32)
    T = 3 * codec.block_tokens
    x = torch.randn(2, 2, T, 64)
    fields = codec.encode(x)
    assert fields["codes"].shape == (2, 2, 3, 4 * 64) and fields["scale"].shape == (2, 2, T, 2)
    # byte row R = t // (8 // bits) of channel c lies at [R // 4, 4 c + R % 4], token t in bit field t % (8 // bits)
    g = x.reshape(2, 2, T, 2, 32)
    codes, _, _ = uniform.quantize(g, bits, dim=4)
    codes = codes.reshape(2, 2, T, 64)
    per = 8 // bits
    t, c = torch.arange(T)[:, None], torch.arange(64)[None, :]
    row = t // per
    byte = fields["codes"][:, :, row // 4, 4 * c + row % 4]
    assert torch.equal((byte.long() >> (bits * (t % per))) & ((1 << bits) - 1), codes.long())
    y = codec.decode(fields, torch.float32)
    assert ((y.reshape_as(g) - g).abs() <= uniform.max_roundtrip_error(g, bits, dim=4) + 1e-6).all()
    with pytest.raises(ValueError, match="blocks of"):
        codec.encode(x[:, :, :T - 1])


def test_codec_nominal_bits_match_storage():
    x = torch.randn(1, 1, 128, 64)
    for codec in (KeyChannelCodec(2, 128), KeyChannelCodec(2, 32, 12, 4), ValueTokenCodec(2, 64), ValueTokenCodec(4, 32)):
        nbytes = sum(t.numel() * t.element_size() for t in codec.encode(x).values())
        assert 8 * nbytes / x.numel() == pytest.approx(codec.bits_per_value(64))
