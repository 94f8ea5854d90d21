"""Weight quantization (int8, fp8, int4) and the one contraction that takes a plain or a quantized weight.

A quantized weight is one pytree, `QArray(values, scales)`, symmetric round-to-nearest:
- values: int8 or float8_e4m3fn in the weight's shape; int4 is stored as uint8 holding two values per
  byte along the last dimension (element 2j in the low nibble, 2j+1 in the high one, two's complement);
- scales: float32 of the weight's rank. Per output channel (int8, fp8) every input (contracted)
  dimension has size 1. Grouped (int4; fp8 block-scaled checkpoints) the last input dimension has
  size n / group, and the other input dimensions keep their full size (a group never spans them).
  weight = values * scales, each scale repeated over its group.

A per-channel scale belongs to one output channel, so it commutes with the contraction: `einsum`
contracts the activations with the values and scales the output. What runs where:
- int8 on CPU, one device, at most KERNEL_MAX_ROWS activation rows (decode, short prompts), the
  contraction mapping onto a 2-D matmul by reshapes (every dense weight of models/llama.py does, the
  head and the tied embedding included): cpu_kernels/int8_matmul, one XLA FFI call that reads each
  int8 byte once and widens it in registers. jaxinfer/kernels.int8_matmul decides once per model whether it applies (the
  kernel built, the mesh one CPU device; GSPMD cannot partition an FFI call) and the model passes the
  answer down as einsum's `kernel`. `JAXINFER_CPU_KERNELS=0` keeps the XLA path.
- fp8 on one GPU with `fp8_kernel="pallas"`, at most pallas_kernels.fp8_matmul.MAX_ROWS rows (decode):
  that kernel, which widens each fp8 tile in registers (jaxinfer/kernels.fp8_matmul decides it).
- everywhere else (GPU, a multi-device mesh, long prompts, other specs): XLA's dot with the values cast to
  the activations' dtype inside it (on CPU XLA writes that cast as a float copy of the weight first,
  which made int8 decode slower than fp32 before the kernel), or on GPU for fp8 with at least
  FP8_NATIVE_MIN_ROWS activation rows (prefill, large batches) a native fp8 matmul with the activations
  quantized per token.
A grouped weight is dequantized inside the jitted step, one layer's weight at a time, before its
contraction.

A QArray is a registered dataclass, not a NamedTuple, so that code telling a list of per-layer arrays
from one stacked array (models/llama.py) never mistakes it for a sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cpu_kernels import int8_matmul as cpu_int8
from pallas_kernels import fp8_matmul

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
GROUPS = (128, 64, 32, 16)  # int4 group sizes, the first that divides the input dimension


@dataclasses.dataclass(frozen=True)
class Format:
    """A storage format: its values' dtype (as stored), largest magnitude, and group size (None: one
    scale per output channel)."""

    name: str
    dtype: np.dtype
    qmax: float
    group: int | None = None

    @property
    def packed(self) -> bool:
        return self.name == "int4"

    def group_for(self, n: int) -> int | None:
        """The group along an input dimension of length n (int4: the largest of GROUPS that divides it)."""
        if self.group is None:
            return None
        sizes = [self.group] if self.name != "int4" else [g for g in GROUPS if g <= self.group]
        for g in sizes:
            if n % g == 0:
                return g
        raise ValueError(f"{self.name}: no group of {sizes} divides the input dimension {n}")


FORMATS = {
    "int8": Format("int8", np.dtype(np.int8), 127.0),
    "fp8": Format("fp8", FP8, 448.0),
    "int4": Format("int4", np.dtype(np.uint8), 7.0, group=128),
}
MODES = ("none", "auto", *FORMATS)  # "auto": as the checkpoint stores its weights (jaxinfer/qcheckpoint.py)
NOT_BUILT = ()  # named in errors: asked for, not built yet
QMAX = 127  # int8's


def as_format(fmt) -> Format:
    return fmt if isinstance(fmt, Format) else FORMATS[fmt]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    values: jax.Array  # int8 / float8_e4m3fn in the weight's shape; uint8 (two int4 per byte) for int4
    scales: jax.Array  # float32, the weight's rank (see the module docstring)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's logical shape (an int4 weight's last dimension unpacked)."""
        shape = tuple(self.values.shape)
        return shape[:-1] + (2 * shape[-1],) if self.values.dtype == np.uint8 else shape

    @property
    def ndim(self) -> int:
        return len(self.values.shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a weight of `shape` keeps its values and scales in a format."""

    values_shape: tuple[int, ...]
    scale_shape: tuple[int, ...]
    group: int | None  # inputs per scale; None: per output channel


def layout(shape: Sequence[int], in_axes: Sequence[int], fmt) -> Layout:
    """A group of g inputs covers a suffix of the input dimensions: walking them from the last, a
    dimension the rest of the group spans whole gets scale size 1, the one it ends in n / rest, and the
    ones before it keep their full size (wo [heads, head_dim] with head_dim 64 and g 128: scales
    [heads / 2, 1])."""
    fmt = as_format(fmt)
    shape = tuple(shape)
    inputs = math.prod(shape[i] for i in in_axes)
    group = fmt.group_for(inputs)
    sizes = list(scale_shape_per_channel(shape, in_axes))
    if group is not None:
        rest = group
        for i in reversed(in_axes):
            if rest == 1:
                sizes[i] = shape[i]
            elif rest % shape[i] == 0:
                rest //= shape[i]
            elif shape[i] % rest == 0:
                sizes[i], rest = shape[i] // rest, 1
            else:
                raise ValueError(f"{fmt.name}: groups of {group} do not tile the input dimensions {shape} {in_axes}")
    values_shape = shape
    if fmt.packed:
        if shape[-1] % 2:
            raise ValueError(f"int4 packs two values per byte along the last dimension; {shape} has it odd")
        values_shape = shape[:-1] + (shape[-1] // 2,)
    return Layout(values_shape, tuple(sizes), group)


def scale_shape_per_channel(shape: Sequence[int], in_axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(1 if i in in_axes else n for i, n in enumerate(shape))


scale_shape = scale_shape_per_channel  # the int8 layout's name before groups existed


def _xp(w):
    return np if isinstance(w, np.ndarray) else jnp


def expand(scales, shape: Sequence[int]):
    """`scales` repeated over their groups to `shape` (size-1 dimensions are left to broadcasting)."""
    xp = _xp(scales)
    for i, (s, n) in enumerate(zip(scales.shape, shape)):
        if s not in (1, n):
            scales = xp.repeat(scales, n // s, axis=i)
    return scales


def scales_of(w, in_axes: Sequence[int], fmt="int8"):
    """Scales of `w` in `fmt` (numpy in, numpy out; jax otherwise): max|w| / qmax over each output
    channel's inputs, or over each group (1 where all are zero)."""
    fmt = as_format(fmt)
    xp = _xp(w)
    sizes = layout(w.shape, in_axes, fmt).scale_shape
    split, reduce = [], []
    for n, s in zip(w.shape, sizes):  # each dimension as (scale entries, inputs per entry)
        split += [s, n // s]
        reduce.append(len(split) - 1)
    amax = xp.max(xp.abs(w.astype(xp.float32)).reshape(split), axis=tuple(reduce)).reshape(sizes)
    # A multiply by the reciprocal, not a divide: XLA rewrites the divide by a constant that way, and numpy
    # (the loader, on the host) must round exactly as a jitted quantize does.
    return xp.where(amax > 0, amax * np.float32(1 / fmt.qmax), xp.float32(1)).astype(xp.float32)


def values_of(w, scales, fmt="int8"):
    """The stored values of `w` (or of any piece of it) under `scales` (its piece too)."""
    fmt = as_format(fmt)
    xp = _xp(w)
    # Times the reciprocal, as XLA computes a divide by a broadcast one, so host and device agree bit for bit.
    inv = (np.float32(1) / expand(scales, w.shape)).astype(xp.float32)
    x = w.astype(xp.float32) * inv
    if fmt.name == "fp8":
        return xp.clip(x, -fmt.qmax, fmt.qmax).astype(FP8)
    q = xp.clip(xp.round(x), -fmt.qmax - (1 if fmt.packed else 0), fmt.qmax).astype(xp.int8)
    return pack(q) if fmt.packed else q


def pack(q):
    """int8 values in [-8, 7] -> uint8, two per byte along the last dimension."""
    xp = _xp(q)
    lo, hi = q[..., 0::2].astype(xp.uint8) & 0xF, q[..., 1::2].astype(xp.uint8) & 0xF
    return (lo | (hi << 4)).astype(xp.uint8)


def unpack(v):
    """pack's inverse: uint8 [..., n/2] -> int8 [..., n]."""
    xp = _xp(v)
    lo, hi = (v & 0xF).astype(xp.int8), (v >> 4).astype(xp.int8)
    lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8  # sign-extend the nibbles
    return xp.stack([lo, hi], axis=-1).reshape(*v.shape[:-1], 2 * v.shape[-1])


def quantize(w, in_axes: Sequence[int], fmt="int8") -> QArray:
    """Symmetric quantization of `w` in `fmt`; `in_axes` are the contracted dimensions."""
    scales = scales_of(w, in_axes, fmt)
    return QArray(values_of(w, scales, fmt), scales)


def int_values(q: QArray):
    return unpack(q.values) if q.values.dtype == np.uint8 else q.values


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
    v = int_values(q)
    return (v.astype(jnp.float32) * expand(q.scales, v.shape)).astype(dtype)


def take(w, ids, dtype):
    """Rows `ids` of a table (an embedding lookup), plain or quantized (each row dequantized alone)."""
    if not isinstance(w, QArray):
        return jnp.take(w, ids, axis=0)
    rows = QArray(jnp.take(w.values, ids, axis=0), jnp.take(w.scales, ids, axis=0))
    return dequantize(rows, dtype)


def merge_leading(w, n: int):
    """The first n dimensions merged into one, for a plain or a quantized weight."""
    if isinstance(w, QArray):
        return QArray(merge_leading(w.values, n), merge_leading(w.scales, n))
    return w.reshape(-1, *w.shape[n:])


# Activation rows from which fp8 weights meet fp8 activations in cuBLASLt's native matmul on GPU; fewer
# rows (decode, short chunks) cast the fp8 values to the activations' dtype inside the dot (weight-only,
# one fused kernel). The native path adds the activations' quantization (four more kernels) and, since
# cuBLASLt's fp8 kernels take both operands contracted on their minor dimension, a transpose of the
# [K, N] weight in every call. Measured on an H200 (benchmarks/gpu_check.py stage f, Llama-3-8B's gate
# projection, 2026-11-28): weight-only 0.052 / 0.058 / 0.079 ms at 1 / 64 / 256 rows against native's
# 0.080 / 0.420 / 0.434; Llama-3-8B's fp8 decode step went from 9.57 to 5.45 ms at batch 1 (bf16: 4.97).
# Past 256 rows nothing was measured yet: prefill chunks of 512 and more keep the native fp8 GEMM.
FP8_NATIVE_MIN_ROWS = 512


def native_fp8(rows: float | None = None, gpu: bool | None = None) -> bool:
    """Whether fp8 weights meet fp8 activations in one native matmul (cuBLASLt on Hopper) for a
    contraction of `rows` activation rows (None: some contraction does) on a GPU (`gpu`; default: this
    backend is one; jaxinfer/plan asks for the GPU it plans on); elsewhere the fp8 values are cast to the
    activations' dtype inside the fused contraction (weight-only)."""
    on_gpu = jax.default_backend() == "gpu" if gpu is None else gpu
    return on_gpu and (rows is None or rows >= FP8_NATIVE_MIN_ROWS)


def _broadcast_to_out(a, dims: str, out: str):
    """`a` (dimensions named by `dims`; those not in `out` must have size 1) reshaped to broadcast
    against an array whose dimensions are named by `out`."""
    keep = [i for i, c in enumerate(dims) if c in out]
    if any(a.shape[i] != 1 for i, c in enumerate(dims) if c not in out):
        raise ValueError(f"{dims}->{out}: {a.shape} is not size 1 on the contracted dims")
    kept = "".join(dims[i] for i in keep)
    a = a.reshape([a.shape[i] for i in keep])
    order = sorted(range(len(kept)), key=lambda i: out.index(kept[i]))
    a = jnp.transpose(a, order)
    sizes = dict(zip((kept[i] for i in order), a.shape))
    return a.reshape([sizes.get(c, 1) for c in out])


# Activation rows up to which the CPU int8 kernel beats XLA's convert-then-dot in the model: SmolLM2-135M
# prefill on 2 cores took 281 ms with the kernel and 348 ms without at 128 tokens, 1327 and 848 ms at 512.
KERNEL_MAX_ROWS = 128


def _as_matrix_product(x_dims: str, w_dims: str, out: str, x, w: QArray):
    """The contraction as a 2-D product [M, K] x [K, N] (or [N, K]) by reshapes of contiguous dimensions
    only: (x [M, K], values [K, N] or [N, K], scales [N], transposed, the output's shape), or None where it
    does not map (then the caller takes the XLA path). x's contracted dimensions must trail it in the
    weight's order, the weight must be all contracted dimensions then all output ones (kn: wq [embed,
    heads, head_dim]) or the reverse (nk: the tied embedding [vocab, embed]), and the output must be x's
    other dimensions then the weight's outputs."""
    contracted = "".join(c for c in x_dims if c in w_dims and c not in out)
    rows = x_dims[: len(x_dims) - len(contracted)]
    outs = "".join(c for c in w_dims if c not in contracted)
    if not contracted or x_dims != rows + contracted or out != rows + outs or any(c in rows for c in w_dims):
        return None
    if w_dims == contracted + outs:
        transposed = False
    elif w_dims == outs + contracted:
        transposed = True
    else:
        return None
    m = math.prod(x.shape[: len(rows)])
    n_shape = w.values.shape[len(contracted) :] if not transposed else w.values.shape[: len(outs)]
    k, n = math.prod(x.shape[len(rows) :]), math.prod(n_shape)
    values = w.values.reshape((n, k) if transposed else (k, n))
    return x.reshape(m, k), values, w.scales.reshape(n), transposed, (*x.shape[: len(rows)], *n_shape)


def _kernel_product(kernel: str, x_dims: str, w_dims: str, out: str, x, w: QArray, out_dtype):
    """The contraction through a kernel (`kernel`: "cpu" for int8 on CPU, "pallas" or "interpret" for
    fp8), or None where the kernel does not apply and the caller takes the XLA path: a contraction that
    is no plain matrix product, more rows than the kernel is for (long prompts stay on XLA's dot, compute
    bound there), or a transposed fp8 weight (the tied head)."""
    if kernel == "cpu" and w.values.dtype == np.int8:
        product = _as_matrix_product(x_dims, w_dims, out, x, w)
        if product is None or product[0].shape[0] > KERNEL_MAX_ROWS:
            return None
        x2, values, scales, transposed, shape = product
        return cpu_int8.int8_matmul(x2, values, scales, transposed=transposed).reshape(shape).astype(out_dtype)
    if kernel in ("pallas", "interpret") and w.values.dtype == FP8:
        product = _as_matrix_product(x_dims, w_dims, out, x, w)
        if product is None or product[3] or product[0].shape[0] > fp8_matmul.MAX_ROWS:
            return None
        x2, values, scales, _, shape = product
        y = fp8_matmul.fp8_matmul(x2, values, scales, interpret=kernel == "interpret")
        return y.reshape(shape).astype(out_dtype)
    return None


def einsum(spec: str, x: jax.Array, w, *, kernel: str | None = None, **kw) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a plain weight. A per-channel QArray: the contraction with its values
    times the scales broadcast to the output (fp8 on GPU from FP8_NATIVE_MIN_ROWS activation rows: a
    native fp8 matmul, the activations quantized per token). A grouped one: dequantized inside the step,
    then contracted.

    `kernel` names the kernel the caller may take for its format (jaxinfer/kernels.py decides it once
    per model): "cpu" for int8 on one CPU device (cpu_kernels.int8_matmul, at most KERNEL_MAX_ROWS rows),
    "pallas" or "interpret" for fp8 on one GPU (pallas_kernels.fp8_matmul, at most its MAX_ROWS rows).
    Neither call can be partitioned by GSPMD, so over a mesh of several devices the XLA path, which XLA
    shards, is kept."""
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w, **kw)
    out_dtype = kw.pop("preferred_element_type", None) or x.dtype
    inputs, out = spec.replace(" ", "").split("->")
    x_dims, w_dims = inputs.split(",")
    if w.values.dtype == np.uint8 or any(s != 1 for c, s in zip(w_dims, w.scales.shape) if c not in out):
        # grouped: a scale covers part of an output channel's inputs, so it cannot scale the output
        return jnp.einsum(spec, x, dequantize(w, x.dtype), preferred_element_type=out_dtype, **kw)
    if kernel and not kw:
        y = _kernel_product(kernel, x_dims, w_dims, out, x, w, out_dtype)
        if y is not None:
            return y
    scale = _broadcast_to_out(w.scales, w_dims, out)
    rows = math.prod(n for c, n in zip(x_dims, x.shape) if c in out and c not in w_dims)
    if w.values.dtype == FP8 and native_fp8(rows):
        contracted = tuple(i for i, c in enumerate(x_dims) if c not in out)
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=contracted, keepdims=True)
        sx = jnp.where(amax > 0, amax / FORMATS["fp8"].qmax, 1.0)
        xq = (x.astype(jnp.float32) / sx).astype(FP8)
        y = jnp.einsum(spec, xq, w.values, preferred_element_type=jnp.float32, **kw)
        return (y * _broadcast_to_out(sx, x_dims, out) * scale).astype(out_dtype)
    y = jnp.einsum(spec, x, w.values.astype(x.dtype), preferred_element_type=jnp.float32, **kw)
    return (y * scale).astype(out_dtype)
