"""Mixture-of-Experts pieces: token permutation, and a grouped matmul as a Pallas kernel with its reference.

A MoE layer with top-k routing runs as: `permute` the [N, D] tokens into N*k rows sorted by expert,
`grouped_matmul` each expert's rows with that expert's weights (w [G, K, N]), `unpermute` the rows back
to tokens with the router weights. Experts held by another device take the group id G ("elsewhere"):
those rows sort last, are left out of `group_sizes`, come out of the matmul as zeros and get weight 0.

The kernel is written for the Triton lowering (GPU): one program per (row tile, column tile) finds the
groups overlapping its rows (precomputed per tile from the cumulative group offsets), and for each one
streams K in `block_k` steps through the [block_k, block_n] slice of that group's weights, masking the
rows outside the group; it accumulates in float32 and writes its output tile once. Row tiles past
sum(group_sizes) do no work and write zeros.

    PYTHONPATH=. python pallas_kernels/moe.py   # micro-benchmark: TFLOP/s against the H100 bf16 peak
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxinfer.errors import JaxinferError

H100_BF16_FLOPS = 989e12  # dense, no sparsity
MIN_BLOCK = 16  # the smallest tile a Triton matmul takes


def validate(x, w, group_sizes) -> None:
    """Shapes and dtypes both implementations require; raises JaxinferError naming the mismatch."""
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise JaxinferError(
            f"x must be [rows, K], w [groups, K, N] and group_sizes [groups]; "
            f"got x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape}"
        )
    if x.shape[1] != w.shape[1]:
        raise JaxinferError(
            f"x has K={x.shape[1]} columns but w {w.shape} expects K={w.shape[1]}; transpose or reshape w to [G, K, N]"
        )
    if group_sizes.shape[0] != w.shape[0]:
        raise JaxinferError(
            f"group_sizes has {group_sizes.shape[0]} entries but w holds {w.shape[0]} groups; pass one size per group"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise JaxinferError(f"group_sizes must be integers, got {group_sizes.dtype}; cast it with .astype(jnp.int32)")
    if x.dtype != w.dtype:
        raise JaxinferError(f"x ({x.dtype}) and w ({w.dtype}) must share a dtype; cast one to the other")


def permute(x, experts, num_groups: int):
    """Rows of every (token, expert) assignment, sorted by expert.

    x [N, D]; experts [N, k] integers in [0, num_groups], where num_groups means "not computed here".
    Returns xs [N*k, D] (stable sort by group, the 'elsewhere' rows last), group_sizes [num_groups] int32
    (not counting 'elsewhere' rows) and order [N*k] int32, the flat assignment index n*k+j of each row.
    """
    if x.ndim != 2 or experts.ndim != 2 or experts.shape[0] != x.shape[0]:
        raise JaxinferError(f"x must be [N, D] and experts [N, k]; got x {x.shape}, experts {experts.shape}")
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise JaxinferError(f"experts must be integer expert ids, got {experts.dtype}")
    k = experts.shape[1]
    flat = experts.reshape(-1).astype(jnp.int32)  # [N*k]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    return x[order // k], group_sizes, order  # [N, D] -> [N*k, D]


def unpermute(ys, order, weights):
    """Combine sorted rows back into tokens: out[n] = sum_j weights[n, j] * ys[row of (n, j)].

    ys [N*k, F] in the order `permute` returned; weights [N, k]. Accumulates in float32, returns [N, F]
    in ys.dtype. unpermute does not see group_sizes: an 'elsewhere' row (past sum(group_sizes)) is left
    out only through its weight, which callers set to 0. A zero weight drops its row exactly, so
    whatever those rows hold, NaN and inf included, never reaches the output.
    """
    n, k = weights.shape
    if ys.ndim != 2 or ys.shape[0] != n * k or order.shape != (n * k,):
        raise JaxinferError(
            f"ys must be [N*k, F] and order [N*k] for weights [N={n}, k={k}]; got ys {ys.shape}, order {order.shape}"
        )
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    y = ys[inverse].reshape(n, k, -1).astype(jnp.float32)  # [N*k, F] -> [N, k, F]
    wts = weights.astype(jnp.float32)[:, :, None]
    out = jnp.where(wts != 0, y * wts, 0.0).sum(axis=1)  # [N, k, F] -> [N, F]
    return out.astype(ys.dtype)


def grouped_matmul_reference(x, w, group_sizes):
    """Pure jnp (lax.ragged_dot): row r of group g gets x[r] @ w[g]; rows past sum(group_sizes) are 0."""
    validate(x, w, group_sizes)
    group_sizes = group_sizes.astype(jnp.int32)
    out = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)  # [M, K] -> [M, N]
    inside = jnp.arange(x.shape[0]) < group_sizes.sum()
    return jnp.where(inside[:, None], out, 0.0).astype(x.dtype)


def _kernel(offsets_ref, tiles_ref, x_ref, w_ref, o_ref, *, block_m: int, block_k: int, num_k: int):
    i = pl.program_id(0)
    rows = i * block_m + jnp.arange(block_m)

    def group(g, acc):
        start, end = offsets_ref[g], offsets_ref[g + 1]
        mine = ((rows >= start) & (rows < end))[:, None]

        def k_step(kk, acc):
            k0 = pl.multiple_of(kk * block_k, block_k)
            xs = jnp.where(mine, x_ref[:, pl.ds(k0, block_k)], 0)  # [bm, bk]
            ws = w_ref[g, pl.ds(k0, block_k), :]  # [bk, bn]
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

        # An empty group inside the tile's range runs no K steps.
        return jax.lax.fori_loop(0, jnp.where(end > start, num_k, 0), k_step, acc)

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(tiles_ref[i, 0], tiles_ref[i, 1], group, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _block(requested: int, dim: int, name: str) -> int:
    if requested < 1 or requested & (requested - 1):
        raise JaxinferError(f"{name}={requested} must be a power of two (the Triton lowering needs it)")
    # Small dimensions take a smaller block, never below what a GPU matmul accepts.
    return max(MIN_BLOCK, min(requested, pl.next_power_of_2(dim)))


def _pad_to(a, axis: int, multiple: int):
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


@functools.partial(jax.jit, static_argnames=("interpret", "block_m", "block_n", "block_k"))
def grouped_matmul(
    x, w, group_sizes, *, interpret: bool = False, block_m: int = 64, block_n: int = 128, block_k: int = 64
):
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] with sum <= M; returns [M, N] in x.dtype.

    Row r of group g (by cumulative group_sizes) gets x[r] @ w[g], accumulated in float32; rows past
    sum(group_sizes) are 0. Blocks must be powers of two; each is shrunk to the next power of two of its
    dimension (at least 16). M, K and N are padded up to block multiples; padding K or N copies w, so
    for large weights pick block_k and block_n that divide K and N.
    """
    validate(x, w, group_sizes)
    m, k = x.shape
    g, _, n = w.shape
    bm, bn, bk = _block(block_m, m, "block_m"), _block(block_n, n, "block_n"), _block(block_k, k, "block_k")
    xp = _pad_to(_pad_to(x, 0, bm), 1, bk)  # [Mp, Kp]
    wp = _pad_to(_pad_to(w, 1, bk), 2, bn)  # [G, Kp, Np]
    mp, kp = xp.shape
    np_ = wp.shape[2]
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])  # [G+1]
    # Tile i covers rows [i*bm, (i+1)*bm): groups lo (first ending after its start) to hi (first
    # starting at or after its end). Past the last row both are G, so the tile does nothing.
    tile_start = jnp.arange(mp // bm, dtype=jnp.int32) * bm
    lo = jnp.searchsorted(ends, tile_start, side="right")
    hi = jnp.searchsorted(offsets[:-1], tile_start + bm, side="left")
    tiles = jnp.stack([lo, jnp.maximum(lo, hi)], axis=1).astype(jnp.int32)  # [Mp/bm, 2]
    out = pl.pallas_call(
        functools.partial(_kernel, block_m=bm, block_k=bk, num_k=kp // bk),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((g + 1,), lambda i, j: (0,)),
            pl.BlockSpec((mp // bm, 2), lambda i, j: (0, 0)),
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((g, kp, bn), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
    )(offsets, tiles, xp, wp)
    return out[:m, :n]


def _bench() -> None:
    """TFLOP/s of the kernel and of lax.ragged_dot on MoE expert shapes, against the H100 dense bf16 peak (989)."""
    import time

    dev = jax.devices()[0]
    interpret = dev.platform == "cpu"
    # (name, tokens, D, F, experts, top-k); the matmul is one up/gate projection, x [T*k, D] @ w [E, D, F].
    cases = (
        [("Mixtral-8x7B", 4096, 4096, 14336, 8, 2), ("Qwen3-30B-A3B", 4096, 2048, 768, 128, 8)]
        if not interpret
        else [("small", 64, 128, 256, 4, 2)]
    )
    dtype = jnp.float32 if interpret else jnp.bfloat16
    if interpret:
        print(f"{dev.device_kind}: no GPU, so the kernel runs in interpret mode; its times say nothing of speed")

    def best(fn, *args) -> float:
        fn(*args).block_until_ready()
        t = float("inf")
        for _ in range(3 if interpret else 10):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            t = min(t, time.perf_counter() - t0)
        return t

    rng = np.random.default_rng(0)
    for name, tokens, d, f, e, top_k in cases:
        experts = np.stack([rng.choice(e, top_k, replace=False) for _ in range(tokens)])
        sizes = jnp.asarray(np.bincount(experts.reshape(-1), minlength=e), jnp.int32)
        x = jnp.asarray(rng.normal(size=(tokens * top_k, d)), dtype)
        w = jnp.asarray(rng.normal(size=(e, d, f)) / np.sqrt(d), dtype)
        flops = 2 * tokens * top_k * d * f
        kernel = best(functools.partial(grouped_matmul, interpret=interpret), x, w, sizes)
        ref = best(jax.jit(grouped_matmul_reference), x, w, sizes)
        rates = []
        for label, t in (("kernel", kernel), ("ragged_dot", ref)):
            share = "" if interpret else f" = {flops / t / H100_BF16_FLOPS:.1%} of H100 peak"
            rates.append(f"{label} {t * 1e3:.2f} ms, {flops / t / 1e12:.3g} TFLOP/s{share}")
        print(
            f"{dev.device_kind}: {name} experts, {tokens} tokens x top-{top_k}, D={d} F={f} E={e}, "
            f"{jnp.dtype(dtype).name}{' (interpret mode)' if interpret else ''}: " + "; ".join(rates)
        )


if __name__ == "__main__":
    _bench()
