"""Weight quantization: int8 values with per-output-channel float32 scales, and the one contraction
that takes a plain or a quantized weight.

A quantized weight is one pytree, `QArray(values, scales)`: int8 `values` of the weight's shape and
float32 `scales` of the same rank whose contracted (input) dimensions have size 1. It is symmetric
round-to-nearest: scale = max|w| / 127 over the input dimensions (1 for an all-zero channel). Because
each scale belongs to one output channel it commutes with the contraction, so `einsum` contracts the
activations with the int8 values (cast to the activations' dtype inside the fused op) and scales the
output: no full-precision copy of the weight is ever made.

A QArray is a registered dataclass, not a NamedTuple, so that code telling a list of per-layer arrays
from one stacked array (models/llama.py) never mistakes it for a sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("none", "int8")
NOT_BUILT = ("fp8", "int4", "auto")  # named in errors: asked for, not built yet
QMAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    values: jax.Array  # int8, the weight's shape
    scales: jax.Array  # float32, the weight's rank; input dimensions of size 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)


def scale_shape(shape: Sequence[int], in_axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(1 if i in in_axes else n for i, n in enumerate(shape))


def _xp(w):
    return np if isinstance(w, np.ndarray) else jnp


def scales_of(w, in_axes: Sequence[int]):
    """Per-output-channel scales of `w` (numpy in, numpy out; jax otherwise), input dims kept as size 1."""
    xp = _xp(w)
    amax = xp.max(xp.abs(w.astype(xp.float32)), axis=tuple(in_axes), keepdims=True)
    # A multiply by the reciprocal, not a divide: XLA rewrites the divide by a constant that way, and numpy
    # (the loader, on the host) must round exactly as a jitted quantize does.
    return xp.where(amax > 0, amax * np.float32(1 / QMAX), xp.float32(1)).astype(xp.float32)


def values_of(w, scales):
    """int8 values of `w` (or of any piece of it) under `scales` broadcast to it."""
    xp = _xp(w)
    # Times the reciprocal, as XLA computes a divide by a broadcast one, so host and device agree bit for bit.
    inv = (np.float32(1) / scales).astype(xp.float32)
    return xp.clip(xp.round(w.astype(xp.float32) * inv), -QMAX, QMAX).astype(xp.int8)


def quantize(w, in_axes: Sequence[int]) -> QArray:
    """Symmetric per-output-channel int8 quantization; `in_axes` are the contracted dimensions."""
    scales = scales_of(w, in_axes)
    return QArray(values_of(w, scales), scales)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
    return (q.values.astype(jnp.float32) * q.scales).astype(dtype)


def merge_leading(w, n: int):
    """The first n dimensions merged into one, for a plain or a quantized weight."""
    if isinstance(w, QArray):
        return QArray(merge_leading(w.values, n), merge_leading(w.scales, n))
    return w.reshape(-1, *w.shape[n:])


def einsum(spec: str, x: jax.Array, w, **kw) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a plain weight; for a QArray the contraction with its int8 values
    (as x.dtype) times the per-output-channel scales broadcast to the output."""
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w, **kw)
    inputs, out = spec.replace(" ", "").split("->")
    _, w_dims = inputs.split(",")
    out_dtype = kw.pop("preferred_element_type", None) or x.dtype
    y = jnp.einsum(spec, x, w.values.astype(x.dtype), preferred_element_type=jnp.float32, **kw)
    contracted = [i for i, c in enumerate(w_dims) if c not in out]
    if any(w.scales.shape[i] != 1 for i in contracted):
        raise ValueError(f"einsum {spec!r}: scales {w.scales.shape} are not size 1 on the contracted dims {contracted}")
    kept = [c for c in w_dims if c in out]
    scales = w.scales.reshape([n for i, n in enumerate(w.scales.shape) if i not in contracted])
    scales = jnp.transpose(scales, sorted(range(len(kept)), key=lambda i: out.index(kept[i])))
    scales = scales.reshape([w.scales.shape[w_dims.index(c)] if c in kept else 1 for c in out])
    return (y * scales).astype(out_dtype)
