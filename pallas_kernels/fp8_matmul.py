"""Weight-only fp8 matmul for a few activation rows (decode): y = (x @ w) * scales, w stored float8_e4m3fn.

A decode step is bound by the bytes of its weights, so fp8 weights should make it up to twice as fast as
bf16 ones. XLA's own path (the fp8 values cast inside a fused dot) read fp8 at about half the rate cuBLAS
reads bf16 on an H200 (benchmarks/gpu_check.py stage f), which left the fp8 step no faster than bf16's.

This kernel streams w once. Each program owns one [bk-step K range, bn] column strip of w: it walks its
K range in [bk, bn] tiles, widens each fp8 tile to the activations' dtype in registers, multiplies it with
the matching [bm, bk] tile of x on the tensor cores (bm: the rows rounded up to 16, the smallest Triton
matmul tile) and accumulates in float32. A layer's down projection has too few column strips to fill
the GPU (N 4096 / 128 = 32 programs on 132 SMs), so K is split too: program (j, s) writes the partial
sum of K range s, and the partials are summed (and scaled per output channel) outside the kernel, a few
KB at decode sizes. benchmarks/gpu_check.py stage f times it beside XLA's paths and bf16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

FP8 = jnp.float8_e4m3fn
MIN_BLOCK = 16  # the smallest tile a Triton matmul takes
MAX_ROWS = 64  # activation rows the kernel is for: past them the step is no longer bound by the weights
TARGET_PROGRAMS = 264  # two per SM of an H100 (132): enough column strips x K splits to keep HBM busy
SMEM_BUDGET = 192 * 1024  # bytes the software pipeline may take (an H100 block gets up to 227 KiB)


def validate(x, w, scales) -> None:
    """Shapes and dtypes the kernel requires; raises ValueError naming the mismatch and the fix."""
    if x.ndim != 2 or w.ndim != 2 or scales.ndim != 1:
        raise ValueError(f"x must be [rows, K], w [K, N] and scales [N]; got {x.shape}, {w.shape}, {scales.shape}")
    if x.shape[1] != w.shape[0] or scales.shape[0] != w.shape[1]:
        raise ValueError(f"x {x.shape} @ w {w.shape} with scales {scales.shape}: K or N do not match")
    if w.dtype != FP8:
        raise ValueError(f"w must be float8_e4m3fn, got {w.dtype}; quantize it with models/quant.quantize")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"x has {x.shape[0]} rows; the kernel is for at most {MAX_ROWS} (decode): use XLA's dot")


def fp8_matmul_reference(x, w, scales):
    """Pure jnp: (x @ float(w)) * scales in float32, returned in x.dtype."""
    validate(x, w, scales)
    y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    return (y * scales[None, :]).astype(x.dtype)


def _kernel(x_ref, w_ref, o_ref, *, bm: int, bn: int, bk: int, steps: int):
    """Program (j, s): the float32 partial [bm, bn] of column strip j over K range s (steps tiles of bk)."""
    m, k = x_ref.shape
    n = w_ref.shape[1]
    j, s = pl.program_id(0), pl.program_id(1)
    col0 = pl.multiple_of(j * bn, bn)
    rows = jnp.arange(bm, dtype=jnp.int32)
    cols = col0 + jnp.arange(bn, dtype=jnp.int32)
    # Masks exist only where a static dimension does not divide its block (tests; real models divide).
    rows_ok = rows < m if m % bm else None
    cols_ok = cols < n if n % bn else None
    ragged_k = k % (bk * steps) != 0 or k < bk

    def load(ref, row_ok, col_ok):
        if row_ok is None and col_ok is None:
            return pltriton.load(ref)
        ok = jnp.ones(ref.shape, jnp.bool_)
        if row_ok is not None:
            ok = ok & row_ok[:, None]
        if col_ok is not None:
            ok = ok & col_ok[None, :]
        return pltriton.load(ref, mask=ok, other=jnp.zeros(ref.shape, ref.dtype))

    def k_step(i, acc):
        k0 = pl.multiple_of((s * steps + i) * bk, bk)
        ks_ok = k0 + jnp.arange(bk, dtype=jnp.int32) < k if ragged_k else None  # zeros past K add nothing
        xs = load(x_ref.at[pl.ds(0, bm), pl.ds(k0, bk)], rows_ok, ks_ok)  # [bm, bk]
        ws = load(w_ref.at[pl.ds(k0, bk), pl.ds(col0, bn)], ks_ok, cols_ok)  # [bk, bn] fp8
        return acc + jnp.dot(xs, ws.astype(xs.dtype), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(steps), k_step, jnp.zeros((bm, bn), jnp.float32))
    keep = None
    if rows_ok is not None or cols_ok is not None:
        keep = jnp.ones((bm, bn), jnp.bool_)
        keep = keep if rows_ok is None else keep & rows_ok[:, None]
        keep = keep if cols_ok is None else keep & cols_ok[None, :]
    pltriton.store(o_ref.at[s, pl.ds(0, bm), pl.ds(col0, bn)], acc, mask=keep)


def _block(requested: int, dim: int, name: str) -> int:
    if requested < 1 or requested & (requested - 1):
        raise ValueError(f"{name}={requested} must be a power of two (the Triton lowering needs it)")
    return max(MIN_BLOCK, min(requested, pl.next_power_of_2(dim)))


def plan(m: int, k: int, n: int, block_n: int = 128, block_k: int = 128, splits: int | None = None):
    """(bm, bn, bk, splits, steps): tiles, K splits and bk-steps per split for an [m, k] x [k, n] product.
    Without `splits`, enough K splits for TARGET_PROGRAMS programs, each keeping at least 4 steps."""
    bm = max(MIN_BLOCK, pl.next_power_of_2(max(m, 1)))
    bn, bk = _block(block_n, n, "block_n"), _block(block_k, k, "block_k")
    k_tiles = pl.cdiv(k, bk)
    if splits is None:
        want = pl.cdiv(TARGET_PROGRAMS, pl.cdiv(n, bn))
        splits = max(1, min(want, k_tiles // 4))
    splits = max(1, min(splits, k_tiles))
    steps = pl.cdiv(k_tiles, splits)
    return bm, bn, bk, pl.cdiv(k_tiles, steps), steps


def _compiler_params(bm: int, bn: int, bk: int, itemsize: int):
    """Four warps; as many pipeline stages (2..4) as fit SMEM_BUDGET, each an x tile and an fp8 w tile."""
    stage = bm * bk * itemsize + bk * bn
    return pltriton.CompilerParams(num_warps=4, num_stages=max(2, min(4, SMEM_BUDGET // stage)))


@functools.partial(jax.jit, static_argnames=("interpret", "block_n", "block_k", "splits"))
def fp8_matmul(x, w, scales, *, interpret: bool = False, block_n: int = 128, block_k: int = 128, splits=None):
    """x [M, K] (M <= MAX_ROWS), w [K, N] float8_e4m3fn, scales [N] float32; returns (x @ w) * scales
    [M, N] in x.dtype, accumulated in float32. interpret=True runs the kernel on CPU (tests)."""
    validate(x, w, scales)
    m, k = x.shape
    n = w.shape[1]
    if m == 0 or n == 0:
        return jnp.zeros((m, n), x.dtype)
    bm, bn, bk, splits, steps = plan(m, k, n, block_n, block_k, splits)
    partial = pl.pallas_call(
        functools.partial(_kernel, bm=bm, bn=bn, bk=bk, steps=steps),
        grid=(pl.cdiv(n, bn), splits),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        compiler_params=None if interpret else _compiler_params(bm, bn, bk, x.dtype.itemsize),
        interpret=interpret,
    )(x, w)
    return (partial.sum(0) * scales[None, :]).astype(x.dtype)
