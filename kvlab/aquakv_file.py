"""The predictors file written by ``kvlab calibrate`` and read by the ``aqua-kv`` method.

It is a :meth:`CrossLayerPredictors.state_dict` (format version, model id, shapes, both
quantizers with their grids, predictor weights), so ``CrossLayerPredictors.load`` reads it too,
plus the model's RoPE (``inv_freq``, attention scaling: the cache needs it to un-rotate keys),
the calibration settings and the per-layer fit statistics.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kvlab.aquakv_cache import Rope
from kvlab.quant.predictors import CrossLayerPredictors, LayerFitStats


class PredictorsFile(NamedTuple):
    predictors: CrossLayerPredictors
    rope: Rope
    calibration: dict[str, Any]
    fit_stats: list[dict[str, float]]


def save_predictors_file(path: str | Path, predictors: CrossLayerPredictors, rope: Rope,
                         calibration: dict[str, Any], fit_stats: list[LayerFitStats]) -> None:
    state = predictors.state_dict()
    state["rope"] = {"inv_freq": rope.inv_freq.clone(), "attention_scaling": rope.attention_scaling}
    state["calibration"] = calibration
    state["fit_stats"] = [dataclasses.asdict(s) for s in fit_stats]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never leave a torn file behind


def load_predictors_file(path: str | Path) -> PredictorsFile:
    """Read a file written by :func:`save_predictors_file`; ValueError with one clear line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictors file {path} does not exist; write one with `kvlab calibrate`")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding arbitrary objects
        raise ValueError(f"cannot read predictors file {path}: {e}") from None
    if not isinstance(state, dict) or "rope" not in state:
        raise ValueError(f"{path} is not an aqua-kv predictors file (written by `kvlab calibrate`)")
    rope = Rope(state["rope"]["inv_freq"], state["rope"]["attention_scaling"])
    if 2 * rope.inv_freq.numel() != state["head_dim"]:
        raise ValueError(f"{path}: RoPE with {rope.inv_freq.numel()} frequencies does not fit head_dim "
                         f"{state['head_dim']} (partial RoPE is not supported)")
    predictors = CrossLayerPredictors.from_state_dict(state, path)
    return PredictorsFile(predictors, rope, state.get("calibration", {}), state.get("fit_stats", []))
