"""Triton kernels of the quantized cache (CUDA); the PyTorch references sit in :mod:`.reference`.

``fused_attend(layer, query, attention_mask, scaling)`` is decode attention straight over a
:class:`~kvlab.cache.QuantizedLayer`'s packed fields; ``quantize_pack_keys/values(codec, x)``
are one-launch equivalents of the codecs' ``encode``. Each falls back to the PyTorch path where
its kernel does not apply (no CUDA, unsupported shapes). Needs triton.
"""

from kvlab.kernels.decode_attention import fused_attend
from kvlab.kernels.quant_pack import quantize_pack_keys, quantize_pack_values

__all__ = ["fused_attend", "quantize_pack_keys", "quantize_pack_values"]
