import math

import pytest
import torch

from kvlab.quant import higgs
from kvlab.quant.higgs import HiggsQuantizer
from kvlab.quant.predictors import CrossLayerPredictors, LayerKV, fit_closed_loop, ridge_fit

torch.set_num_threads(1)

MODEL_ID = "synthetic/tiny"
NUM_LAYERS, KV_HEADS, HEAD_DIM, TOKENS, VALID = 4, 2, 32, 1536, 256
WIDTH = KV_HEADS * HEAD_DIM


@pytest.fixture(scope="module", autouse=True)
def grid_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVLAB_CACHE_DIR", str(tmp_path_factory.mktemp("kvlab_cache")))
        mp.setattr(higgs, "_grid_memo", {})
        yield


def synthetic_layers(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V per layer with linear cross-layer structure plus fresh noise (so prediction is imperfect)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def mixing(n_in):
        return torch.linalg.qr(randn(n_in, WIDTH))[0] * math.sqrt(n_in / WIDTH)

    keys, values = randn(TOKENS, WIDTH) * 2 + 1, randn(TOKENS, WIDTH)
    layers = [(keys, values)]
    for _ in range(1, NUM_LAYERS):
        keys = 0.9 * keys @ mixing(WIDTH) + 0.3 * randn(TOKENS, WIDTH) + randn(WIDTH)
        values = 0.6 * torch.cat([keys, values], 1) @ mixing(2 * WIDTH) + 0.3 * randn(TOKENS, WIDTH)
        layers.append((keys, values))
    return layers


@pytest.fixture(scope="module")
def fitted():
    layers = synthetic_layers()
    predictors, stats = fit_closed_loop(
        iter(layers), HiggsQuantizer(2, 16, WIDTH), HiggsQuantizer(1, 16, WIDTH),
        model_id=MODEL_ID, kv_heads=KV_HEADS, head_dim=HEAD_DIM, valid_rows=VALID,
    )
    return layers, predictors, stats


def test_ridge_recovers_planted_linear_map():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 24, generator=gen) * torch.linspace(0.5, 3, 24) + 2
    W, b = torch.randn(16, 24, generator=gen), torch.randn(16, generator=gen)
    Y = X @ W.T + b
    W0, b0 = ridge_fit(X, Y, damp=0)
    torch.testing.assert_close(W0, W, rtol=0, atol=1e-4)
    torch.testing.assert_close(b0, b, rtol=0, atol=1e-4)
    # default damping on roughly centred inputs shrinks only slightly; noise does not bias the fit
    X = torch.randn(4000, 24, generator=gen)
    Y = X @ W.T + b + 0.1 * torch.randn(4000, 16, generator=gen)
    W1, b1 = ridge_fit(X, Y, chunk_rows=1000)
    torch.testing.assert_close(W1, W, rtol=0, atol=0.02)
    torch.testing.assert_close(b1, b, rtol=0, atol=0.02)


def test_ridge_damping_is_a_fraction_of_the_mean_gram_diagonal():
    gen = torch.Generator().manual_seed(1)
    X, Y = torch.randn(50, 3, generator=gen), torch.randn(50, 2, generator=gen)
    A = torch.cat([X, torch.ones(50, 1)], 1).double()
    gram = A.T @ A
    expected = torch.linalg.solve(gram + 0.5 * gram.diagonal().mean() * torch.eye(4, dtype=torch.float64),
                                  A.T @ Y.double()).T.float()
    W, b = ridge_fit(X, Y, damp=0.5)
    torch.testing.assert_close(torch.cat([W, b[:, None]], 1), expected)


def test_closed_loop_fit_reports_useful_predictors(fitted):
    _, predictors, stats = fitted
    assert [s.layer for s in stats] == list(range(NUM_LAYERS))
    assert stats[0].key_pred_train == stats[0].value_pred_valid == 1.0  # layer 0: no predictor
    for s in stats[1:]:
        assert s.key_pred_train < 0.2 and s.key_pred_valid < 0.2
        assert s.value_pred_train < 0.4 and s.value_pred_valid < 0.4
        assert s.value_pred_valid == pytest.approx(s.value_pred_train, rel=0.5)  # ridge overfits a little
    for s in stats:
        assert s.key_recon < 0.11 and s.value_recon < 0.11  # at most the grid's own error
    assert stats[1].key_recon < 0.11 * stats[1].key_pred_train * 1.2  # residual coding on top of prediction
    assert predictors.num_layers == NUM_LAYERS and set(predictors.key_predictors) == {1, 2, 3}


def test_decoder_reproduces_encoder_reconstructions_bit_exactly(fitted, tmp_path):
    layers, predictors, stats = fitted
    codes, encoded, prev = [], [], None
    for layer, (keys, values) in enumerate(layers):
        layer_codes, prev = predictors.encode_layer(layer, keys, values, prev)
        codes.append(layer_codes)
        encoded.append(prev)
    # the fit used the same chain: its reconstruction errors are the encoder's
    for s, (keys, _), rec in zip(stats, layers, encoded):
        assert s.key_recon == pytest.approx(((keys - rec.keys).square().sum() / keys.square().sum()).item())

    predictors.save(tmp_path / "p.pt")
    decoder = CrossLayerPredictors.load(
        tmp_path / "p.pt", model_id=MODEL_ID, num_layers=NUM_LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    prev = None
    for layer, (layer_codes, enc) in enumerate(zip(codes, encoded)):
        prev = decoder.decode_layer(layer, layer_codes, prev)
        assert torch.equal(prev.keys, enc.keys) and torch.equal(prev.values, enc.values)


def test_save_load_roundtrip(fitted, tmp_path):
    _, predictors, _ = fitted
    predictors.save(tmp_path / "p.pt")
    loaded = CrossLayerPredictors.load(
        tmp_path / "p.pt", model_id=MODEL_ID, num_layers=NUM_LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        quantizer=HiggsQuantizer(2, 16, WIDTH))
    for layer in range(1, NUM_LAYERS):
        for a, b in ((predictors.key_predictors, loaded.key_predictors),
                     (predictors.value_predictors, loaded.value_predictors)):
            assert torch.equal(a[layer].weight, b[layer].weight) and torch.equal(a[layer].bias, b[layer].bias)
    for a, b in ((predictors.quantizer, loaded.quantizer),
                 (predictors.first_layer_quantizer, loaded.first_layer_quantizer)):
        assert (a.d, a.n, a.group_size) == (b.d, b.n, b.group_size) and torch.equal(a.grid, b.grid)


@pytest.mark.parametrize("field, value", [
    ("model_id", "other/model"), ("num_layers", NUM_LAYERS + 1), ("kv_heads", 4), ("head_dim", 64),
])
def test_load_refuses_predictors_of_another_model(fitted, tmp_path, field, value):
    _, predictors, _ = fitted
    predictors.save(tmp_path / "p.pt")
    request = dict(model_id=MODEL_ID, num_layers=NUM_LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    request[field] = value
    with pytest.raises(ValueError, match=f"do not match this model: {field}: saved"):
        CrossLayerPredictors.load(tmp_path / "p.pt", **request)


def test_load_refuses_another_quantizer(fitted, tmp_path):
    _, predictors, _ = fitted
    predictors.save(tmp_path / "p.pt")
    with pytest.raises(ValueError, match="quantizer: saved"):
        CrossLayerPredictors.load(
            tmp_path / "p.pt", model_id=MODEL_ID, num_layers=NUM_LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
            quantizer=HiggsQuantizer(1, 16, WIDTH))


def test_fit_rejects_wrong_width():
    with pytest.raises(ValueError, match="expected keys and values"):
        fit_closed_loop(iter([(torch.zeros(8, 32), torch.zeros(8, 32))]), HiggsQuantizer(1, 2, 32),
                        HiggsQuantizer(1, 2, 32), model_id=MODEL_ID, kv_heads=KV_HEADS, head_dim=HEAD_DIM)


def test_encode_layer_shapes_and_types(fitted):
    layers, predictors, _ = fitted
    keys, values = layers[0]
    codes, rec = predictors.encode_layer(0, keys[:5], values[:5], None)
    assert isinstance(rec, LayerKV) and rec.keys.shape == (5, WIDTH) and rec.keys.dtype == torch.float32
    assert codes.keys.codes.dtype == torch.uint8 and codes.keys.scales.dtype == torch.float16
    with pytest.raises(ValueError, match="previous reconstruction"):
        predictors.encode_layer(1, keys[:5], values[:5], None)
    with pytest.raises(ValueError, match="previous reconstruction"):
        predictors.decode_layer(0, codes, rec)
