"""AQUA-KV cross-layer linear predictors and their closed-loop fitting.

Keys and values of one layer are matrices [tokens, C], C = kv_heads * head_dim, heads
concatenated head-major, keys taken before RoPE. For layer l >= 1:

- keys   of l are predicted from the reconstructed keys of l - 1            (C -> C);
- values of l are predicted from [reconstructed keys of l, values of l - 1] (2C -> C).

Only the residual ``target - prediction`` is HIGGS-quantized. Layer 0 has no predictor
and is coded directly with its own (finer) quantizer. Reconstruction = prediction +
dequantized residual, computed from the stored codes, so a decoder that sees only the
codes recomputes the exact same predictions, and predictors are fitted on those same
reconstructions ("closed loop"): quantization errors are not compounded across layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F

from kvlab.quant.higgs import HiggsCodes, HiggsQuantizer

FORMAT_VERSION = 1
DEFAULT_DAMP = 1e-3  # reference: --percdamp 1e-3


def ridge_fit(
    X: torch.Tensor, Y: torch.Tensor, damp: float = DEFAULT_DAMP, chunk_rows: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression ``Y ~ X @ W.T + b``; returns float32 ``(W [out, in], b [out])``.

    The bias is fitted as the weight of an appended column of ones (inputs are not centred),
    and ``damp * mean(diag(A.T @ A))`` is added to the whole diagonal of the augmented
    Gram matrix ``A.T @ A``, bias entry included, as the reference does. Gram matrices are
    accumulated in float64 over row chunks.
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X, Y must be [rows, in] and [rows, out], got {tuple(X.shape)}, {tuple(Y.shape)}")
    n_in = X.shape[1]
    gram = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64, device=X.device)
    cross = torch.zeros(n_in + 1, Y.shape[1], dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[0], chunk_rows):
        xb = F.pad(X[start : start + chunk_rows].double(), (0, 1), value=1.0)
        gram += xb.T @ xb
        cross += xb.T @ Y[start : start + chunk_rows].double()
    gram.diagonal().add_(damp * gram.diagonal().abs().mean())
    solution = torch.linalg.solve(gram, cross).T.float()  # [out, in + 1]
    return solution[:, :-1].contiguous(), solution[:, -1].contiguous()


class LayerKV(NamedTuple):
    """Reconstructed pre-RoPE keys and values of one layer, float32 [..., C]."""

    keys: torch.Tensor
    values: torch.Tensor


class LayerCodes(NamedTuple):
    keys: HiggsCodes
    values: HiggsCodes


class LinearPredictor(NamedTuple):
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor  # [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.device), self.bias.to(x.device))


def _code(
    quantizer: HiggsQuantizer, target: torch.Tensor, prediction: torch.Tensor
) -> tuple[HiggsCodes, torch.Tensor]:
    codes = quantizer.quantize(target.float() - prediction)
    return codes, prediction + quantizer.dequantize(codes)


def _check_prev(layer: int, prev: LayerKV | None) -> None:
    if (layer == 0) != (prev is None):
        raise ValueError(f"layer {layer}: the previous reconstruction must be given exactly for layers >= 1")


def _value_inputs(keys: torch.Tensor, prev_values: torch.Tensor) -> torch.Tensor:
    return torch.cat([keys, prev_values], dim=-1)


class CrossLayerPredictors:
    """Per-layer key (C -> C) and value (2C -> C) predictors for layers 1..L-1, plus the quantizers."""

    def __init__(
        self,
        *,
        model_id: str,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        quantizer: HiggsQuantizer,
        first_layer_quantizer: HiggsQuantizer,
        key_predictors: dict[int, LinearPredictor],
        value_predictors: dict[int, LinearPredictor],
    ) -> None:
        self.model_id, self.num_layers = model_id, num_layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.quantizer, self.first_layer_quantizer = quantizer, first_layer_quantizer
        self.key_predictors, self.value_predictors = key_predictors, value_predictors
        self._check_shapes()

    @property
    def width(self) -> int:
        return self.kv_heads * self.head_dim

    def _check_shapes(self) -> None:
        layers = set(range(1, self.num_layers))
        if set(self.key_predictors) != layers or set(self.value_predictors) != layers:
            raise ValueError(f"expected key and value predictors for layers 1..{self.num_layers - 1}")
        c = self.width
        for layer in layers:
            key, value = self.key_predictors[layer], self.value_predictors[layer]
            for kind, lin, n_in in (("key", key, c), ("value", value, 2 * c)):
                if lin.weight.shape != (c, n_in) or lin.bias.shape != (c,):
                    raise ValueError(f"layer {layer} {kind} predictor has weight {tuple(lin.weight.shape)}, "
                                     f"bias {tuple(lin.bias.shape)}; expected ({c}, {n_in}), ({c},)")

    def predict_keys(self, layer: int, prev_keys: torch.Tensor) -> torch.Tensor:
        return self.key_predictors[layer](prev_keys)

    def predict_values(self, layer: int, keys: torch.Tensor, prev_values: torch.Tensor) -> torch.Tensor:
        return self.value_predictors[layer](_value_inputs(keys, prev_values))

    def encode_layer(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, prev: LayerKV | None
    ) -> tuple[LayerCodes, LayerKV]:
        """Code one layer's pre-RoPE ``keys``/``values`` [..., C] given the previous layer's reconstruction.

        ``prev`` is None exactly for layer 0. Returns the codes and this layer's
        reconstruction, which is what the next layer must be encoded against.
        """
        _check_prev(layer, prev)
        if layer == 0:
            zeros = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
            key_codes, rec_keys = _code(self.first_layer_quantizer, keys, zeros)
            value_codes, rec_values = _code(self.first_layer_quantizer, values, zeros)
        else:
            key_codes, rec_keys = _code(self.quantizer, keys, self.predict_keys(layer, prev.keys))
            value_codes, rec_values = _code(
                self.quantizer, values, self.predict_values(layer, rec_keys, prev.values))
        return LayerCodes(key_codes, value_codes), LayerKV(rec_keys, rec_values)

    def decode_layer(self, layer: int, codes: LayerCodes, prev: LayerKV | None) -> LayerKV:
        """Reconstruct one layer from its codes and the previous layer's reconstruction."""
        _check_prev(layer, prev)
        if layer == 0:
            return LayerKV(self.first_layer_quantizer.dequantize(codes.keys),
                           self.first_layer_quantizer.dequantize(codes.values))
        keys = self.predict_keys(layer, prev.keys) + self.quantizer.dequantize(codes.keys)
        values = self.predict_values(layer, keys, prev.values) + self.quantizer.dequantize(codes.values)
        return LayerKV(keys, values)

    def to(self, device: torch.device | str) -> CrossLayerPredictors:
        """A copy with predictor weights and grids on ``device``."""
        def move(predictors: dict[int, LinearPredictor]) -> dict[int, LinearPredictor]:
            return {l: LinearPredictor(p.weight.to(device), p.bias.to(device)) for l, p in predictors.items()}

        def move_quantizer(q: HiggsQuantizer) -> HiggsQuantizer:
            return HiggsQuantizer(q.d, q.n, q.group_size, grid=q.grid.to(device))

        return CrossLayerPredictors(
            model_id=self.model_id, num_layers=self.num_layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
            quantizer=move_quantizer(self.quantizer), first_layer_quantizer=move_quantizer(self.first_layer_quantizer),
            key_predictors=move(self.key_predictors), value_predictors=move(self.value_predictors),
        )

    def state_dict(self) -> dict:
        """Everything :meth:`from_state_dict` needs: format version, model id, shapes, quantizers, weights."""
        return {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "quantizer": self.quantizer.config(),
            "first_layer_quantizer": self.first_layer_quantizer.config(),
            "key_predictors": {l: tuple(p) for l, p in self.key_predictors.items()},
            "value_predictors": {l: tuple(p) for l, p in self.value_predictors.items()},
        }

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def from_state_dict(
        cls,
        state: dict,
        source: str | Path = "state",
        *,
        model_id: str | None = None,
        num_layers: int | None = None,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        quantizer: HiggsQuantizer | None = None,
    ) -> CrossLayerPredictors:
        """Rebuild saved predictors, refusing (ValueError) any given field that differs from the saved one.

        If ``quantizer`` is given, its (d, n, group_size) must match the one the predictors
        were fitted with; the saved quantizers (grids included) are used either way.
        """
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported predictor format {state.get('format_version')!r}")
        expected = dict(model_id=model_id, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim)
        if quantizer is not None:
            expected["quantizer"] = _quantizer_key(quantizer.config())
        found = {key: state[key] for key in ("model_id", "num_layers", "kv_heads", "head_dim")}
        found["quantizer"] = _quantizer_key(state["quantizer"])
        mismatched = [f"{key}: saved {found[key]!r}, requested {want!r}"
                      for key, want in expected.items() if want is not None and found[key] != want]
        if mismatched:
            raise ValueError(f"predictors in {source} do not match this model: " + "; ".join(mismatched))
        return cls(
            model_id=state["model_id"],
            num_layers=state["num_layers"],
            kv_heads=state["kv_heads"],
            head_dim=state["head_dim"],
            quantizer=HiggsQuantizer.from_config(state["quantizer"]),
            first_layer_quantizer=HiggsQuantizer.from_config(state["first_layer_quantizer"]),
            key_predictors={l: LinearPredictor(*p) for l, p in state["key_predictors"].items()},
            value_predictors={l: LinearPredictor(*p) for l, p in state["value_predictors"].items()},
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        model_id: str,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        quantizer: HiggsQuantizer | None = None,
    ) -> CrossLayerPredictors:
        """Load predictors saved by :meth:`save`, refusing (ValueError) ones fitted for another setup."""
        state = torch.load(path, weights_only=True)
        return cls.from_state_dict(state, path, model_id=model_id, num_layers=num_layers, kv_heads=kv_heads,
                                   head_dim=head_dim, quantizer=quantizer)


def _quantizer_key(config: dict) -> tuple[int, int, int]:
    return config["d"], config["n"], config["group_size"]


@dataclass(frozen=True)
class LayerFitStats:
    """Relative MSEs ``||target - x||^2 / ||target||^2`` for one layer (NaN where a split is empty).

    ``*_pred_*`` measure the predictor alone (for layer 0 the prediction is zero, so 1.0);
    ``*_recon`` measure the final reconstruction (prediction + dequantized residual), all rows.
    """

    layer: int
    key_pred_train: float
    key_pred_valid: float
    value_pred_train: float
    value_pred_valid: float
    key_recon: float
    value_recon: float


def _rel_mse(target: torch.Tensor, approx: torch.Tensor) -> float:
    if target.shape[0] == 0:
        return math.nan
    target = target.double()
    return ((target - approx.double()).square().sum() / target.square().sum()).item()


def fit_closed_loop(
    layer_kv_iter: Iterable[tuple[torch.Tensor, torch.Tensor]],
    quantizer: HiggsQuantizer,
    first_layer_quantizer: HiggsQuantizer | None = None,
    *,
    model_id: str,
    kv_heads: int,
    head_dim: int,
    damp: float = DEFAULT_DAMP,
    valid_rows: int = 0,
) -> tuple[CrossLayerPredictors, list[LayerFitStats]]:
    """Fit the predictors layer by layer on closed-loop reconstructions.

    ``layer_kv_iter`` yields clean pre-RoPE ``(keys, values)`` [tokens, C] per layer, in
    layer order; only one layer and the previous reconstruction are held at a time. The
    last ``valid_rows`` rows are held out from fitting and only scored. The first layer
    quantizer defaults to the reference's 4-bit HIGGS grid (d=2, n=256).
    """
    if first_layer_quantizer is None:
        first_layer_quantizer = HiggsQuantizer(2, 256, quantizer.group_size)
    keys_fit: dict[int, LinearPredictor] = {}
    values_fit: dict[int, LinearPredictor] = {}
    stats: list[LayerFitStats] = []
    prev: LayerKV | None = None
    for layer, (keys, values) in enumerate(layer_kv_iter):
        keys, values = keys.float(), values.float()
        if keys.shape != values.shape or keys.ndim != 2 or keys.shape[1] != kv_heads * head_dim:
            raise ValueError(f"layer {layer}: expected keys and values [tokens, {kv_heads * head_dim}], "
                             f"got {tuple(keys.shape)} and {tuple(values.shape)}")
        train = keys.shape[0] - valid_rows
        if train <= 0:
            raise ValueError(f"valid_rows={valid_rows} leaves no training rows out of {keys.shape[0]}")
        if layer == 0:
            pred_keys = torch.zeros_like(keys)
            _, rec_keys = _code(first_layer_quantizer, keys, pred_keys)
            pred_values = torch.zeros_like(values)
            _, rec_values = _code(first_layer_quantizer, values, pred_values)
        else:
            keys_fit[layer] = LinearPredictor(*ridge_fit(prev.keys[:train], keys[:train], damp))
            pred_keys = keys_fit[layer](prev.keys)
            _, rec_keys = _code(quantizer, keys, pred_keys)
            value_inputs = _value_inputs(rec_keys, prev.values)
            values_fit[layer] = LinearPredictor(*ridge_fit(value_inputs[:train], values[:train], damp))
            pred_values = values_fit[layer](value_inputs)
            del value_inputs
            _, rec_values = _code(quantizer, values, pred_values)
        stats.append(LayerFitStats(
            layer=layer,
            key_pred_train=_rel_mse(keys[:train], pred_keys[:train]),
            key_pred_valid=_rel_mse(keys[train:], pred_keys[train:]),
            value_pred_train=_rel_mse(values[:train], pred_values[:train]),
            value_pred_valid=_rel_mse(values[train:], pred_values[train:]),
            key_recon=_rel_mse(keys, rec_keys),
            value_recon=_rel_mse(values, rec_values),
        ))
        prev = LayerKV(rec_keys, rec_values)
    if prev is None:
        raise ValueError("layer_kv_iter yielded no layers")
    predictors = CrossLayerPredictors(
        model_id=model_id, num_layers=len(stats), kv_heads=kv_heads, head_dim=head_dim,
        quantizer=quantizer, first_layer_quantizer=first_layer_quantizer,
        key_predictors=keys_fit, value_predictors=values_fit,
    )
    return predictors, stats
