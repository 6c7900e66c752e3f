import math

import pytest
import torch

from kvlab.quant import higgs
from kvlab.quant.bitpack import pack_bits, packed_bytes, unpack_bits
from kvlab.quant.higgs import HiggsQuantizer, build_eden_grid, eden_grid, grid_mse, hadamard_transform

torch.set_num_threads(1)

LLOYD_MAX_2BIT_MSE = 0.1175  # optimal scalar 4-level quantizer of N(0, 1)


@pytest.fixture(scope="module", autouse=True)
def grid_cache(tmp_path_factory):
    """Keep grids built by these tests out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVLAB_CACHE_DIR", str(tmp_path_factory.mktemp("kvlab_cache")))
        mp.setattr(higgs, "_grid_memo", {})
        yield


def fresh_gaussian(rows: int, d: int, seed: int = 12345) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def sylvester(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


@pytest.mark.parametrize("size", [1, 2, 8, 64, 1024])
def test_hadamard_is_orthonormal_sylvester_and_self_inverse(size):
    dense = hadamard_transform(torch.eye(size, dtype=torch.float64))
    torch.testing.assert_close(dense, sylvester(size), rtol=0, atol=1e-12)
    torch.testing.assert_close(dense @ dense.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, size)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1))


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard_transform(torch.zeros(4, 96))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12, 16])
def test_bitpack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (3, 4, 37))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 4, packed_bytes(37, bits))
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bitpack_layout_matches_packing_module(bits):
    packing = pytest.importorskip("kvlab.quant.packing")
    codes = torch.randint(0, 2**bits, (5, 64))
    assert torch.equal(pack_bits(codes, bits), packing.pack(codes, bits))


def test_eden_2d_16_grid_beats_scalar_lloyd_max_and_is_seed_stable():
    samples = fresh_gaussian(2**18, 2)
    mse = grid_mse(eden_grid(2, 16), samples)
    other = grid_mse(build_eden_grid(2, 16, seed=1), samples)
    assert mse < LLOYD_MAX_2BIT_MSE
    assert abs(other - mse) / mse < 0.01


def test_eden_1d_4_grid_is_lloyd_max():
    grid = eden_grid(1, 4).flatten().sort().values
    torch.testing.assert_close(grid, torch.tensor([-1.510, -0.4528, 0.4528, 1.510]), rtol=0, atol=0.02)
    assert grid_mse(eden_grid(1, 4), fresh_gaussian(2**18, 1)) == pytest.approx(LLOYD_MAX_2BIT_MSE, rel=0.01)


def test_eden_grid_is_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(higgs, "_grid_memo", {})
    grid = eden_grid(1, 2)
    assert len(list((tmp_path / "grids").glob("eden_d1_n2_seed0_*.pt"))) == 1
    monkeypatch.setattr(higgs, "_grid_memo", {})
    assert torch.equal(eden_grid(1, 2), grid)


def test_quantizer_storage_and_bits_per_value():
    q = HiggsQuantizer(2, 16, 64)
    x = torch.randn(2, 7, 256)
    codes = q.quantize(x)
    assert codes.codes.dtype == torch.uint8 and codes.codes.shape == (2, 7, 256 // 2 * 4 // 8)
    assert codes.scales.dtype == torch.float16 and codes.scales.shape == (2, 7, 4)
    assert q.bits_per_value == 2 + 16 / 64
    assert q.dequantize(codes).shape == x.shape


def test_quantizer_one_byte_per_piece_for_256_points():
    q = HiggsQuantizer(2, 256, 32, grid=torch.randn(256, 2, generator=torch.Generator().manual_seed(0)))
    codes = q.quantize(torch.randn(5, 64))
    assert codes.codes.shape == (5, 32)
    assert q.bits_per_value == 4 + 16 / 32


def test_quantizer_error_matches_grid_distortion():
    q = HiggsQuantizer(2, 16, 128)
    x = torch.randn(512, 256) * torch.linspace(0.1, 10, 256)  # uneven channels: Hadamard spreads them
    rel = ((q.dequantize(q.quantize(x)) - x).square().sum() / x.square().sum()).item()
    assert rel == pytest.approx(grid_mse(q.grid, fresh_gaussian(2**16, 2)), rel=0.05)


def test_quantizer_decodes_zero_groups_to_zero_and_is_deterministic():
    q = HiggsQuantizer(2, 16, 64)
    x = torch.randn(4, 128)
    x[1] = 0
    first, second = q.quantize(x), q.quantize(x)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scales, second.scales)
    out = q.dequantize(first)
    assert torch.equal(out[1], torch.zeros(128))
    assert torch.equal(out, q.dequantize(second))


def test_quantizer_config_roundtrip_and_input_checks():
    q = HiggsQuantizer(2, 16, 64)
    clone = HiggsQuantizer.from_config(q.config())
    x = torch.randn(3, 64)
    assert torch.equal(clone.dequantize(clone.quantize(x)), q.dequantize(q.quantize(x)))
    with pytest.raises(ValueError, match="multiple of group_size"):
        q.quantize(torch.randn(3, 96))
    with pytest.raises(ValueError, match="overflows fp16"):
        q.quantize(torch.full((1, 64), 1e4))
    with pytest.raises(ValueError, match="power of two"):
        HiggsQuantizer(2, 12, 64)
