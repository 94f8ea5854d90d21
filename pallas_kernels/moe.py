"""Mixture-of-Experts pieces: token permutation, and a grouped matmul as a Pallas kernel with its reference.

A MoE layer with top-k routing runs as: `permute` the [N, D] tokens into N*k rows sorted by expert,
`grouped_matmul` each expert's rows with that expert's weights (w [G, K, N]), `unpermute` the rows back
to tokens with the router weights. Experts held by another device take the group id G ("elsewhere"):
those rows sort last, are left out of `group_sizes`, come out of the matmul as zeros and get weight 0.

The kernel is written for the Triton lowering (GPU), after the megablox pattern. Triton has no scalar
prefetch, so the metadata is computed in jnp before the call: one work item per (group, row tile) pair
that overlap, the rows past sum(group_sizes) counting as one more group whose items write zeros. Each
program takes one work item and one column tile, runs a single K loop over that group's weights
w[g, k0:k0+bk, n0:n0+bn] and its row tile of x, accumulating in float32, and stores only its group's
rows. A row tile shared by two groups is thus computed twice, once per group, but no program loops over
groups and none does work for rows it does not own.

    PYTHONPATH=. python pallas_kernels/moe.py   # micro-benchmark: TFLOP/s and TB/s against the H100 peaks
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

H100_BF16_FLOPS = 989e12  # dense, no sparsity
H100_HBM_BYTES = 3.35e12  # bytes/s, H100 SXM HBM3
MIN_BLOCK = 16  # the smallest tile a Triton matmul takes
BAND = 8  # work items per band of the launch order when x is large; see _tile_of
X_IN_L2_BYTES = 16 * 2**20  # x this small stays in the H100's 50 MB L2 beside the weight tiles in flight
SMEM_BUDGET = 192 * 1024  # bytes the software pipeline may take (an H100 block gets up to 227 KiB)


def validate(x, w, group_sizes) -> None:
    """Shapes and dtypes both implementations require; raises ValueError naming the mismatch."""
    if x.ndim != 2 or w.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"x must be [rows, K], w [groups, K, N] and group_sizes [groups]; "
            f"got x {x.shape}, w {w.shape}, group_sizes {group_sizes.shape}"
        )
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"x has K={x.shape[1]} columns but w {w.shape} expects K={w.shape[1]}; transpose or reshape w to [G, K, N]"
        )
    if group_sizes.shape[0] != w.shape[0]:
        raise ValueError(
            f"group_sizes has {group_sizes.shape[0]} entries but w holds {w.shape[0]} groups; pass one size per group"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}; cast it with .astype(jnp.int32)")
    if x.dtype != w.dtype:
        raise ValueError(f"x ({x.dtype}) and w ({w.dtype}) must share a dtype; cast one to the other")


def permute(x, experts, num_groups: int):
    """Rows of every (token, expert) assignment, sorted by expert.

    x [N, D]; experts [N, k] integers in [0, num_groups], where num_groups means "not computed here".
    Returns xs [N*k, D] (stable sort by group, the 'elsewhere' rows last), group_sizes [num_groups] int32
    (not counting 'elsewhere' rows) and order [N*k] int32, the flat assignment index n*k+j of each row.
    """
    if x.ndim != 2 or experts.ndim != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [N, D] and experts [N, k]; got x {x.shape}, experts {experts.shape}")
    if not jnp.issubdtype(experts.dtype, jnp.integer):
        raise ValueError(f"experts must be integer expert ids, got {experts.dtype}")
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
        raise ValueError(
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


def _work_items(group_sizes, m: int, block_m: int, num_items: int):
    """Work items for the kernel: int32 [4, num_items], one column per (group, row tile) pair that overlap.

    Rows: group id, first row of the tile, and the group's rows [start, end). Group G is the sentinel
    holding the rows past sum(group_sizes), which the kernel fills with zeros. A group of rows
    [start, end) overlaps tiles start // block_m .. (end - 1) // block_m, so the G + 1 groups take at
    most num_tiles + G items; the unused ones at the end get group G + 1 and an empty row range.
    """
    g = group_sizes.shape[0]
    # Clipping to [0, M] keeps a bad group_sizes (sum past M) from ever addressing rows outside x.
    bounds = jnp.clip(jnp.cumsum(group_sizes.astype(jnp.int32)), 0, m)  # [G]
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), bounds])  # [G+1]; the sentinel starts at the sum
    ends = jnp.concatenate([bounds, jnp.full(1, m, jnp.int32)])  # [G+1]
    first = starts // block_m
    counts = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)  # [G+1], 0 for empty groups
    cum = jnp.cumsum(counts)  # [G+1]
    item = jnp.arange(num_items, dtype=jnp.int32)
    # Item i belongs to the first group whose cumulative count exceeds i (G + 1 past the last one).
    # compare_all is one fused [num_items, G+1] comparison: no sequential search in the decode path.
    owner = jnp.searchsorted(cum, item, side="right", method="compare_all").astype(jnp.int32)
    used = owner <= g
    e = jnp.minimum(owner, g)
    row0 = (first[e] + item - (cum[e] - counts[e])) * block_m
    rows = [jnp.where(used, v, 0) for v in (row0, starts[e], ends[e])]  # unused items: empty row range
    return jnp.stack([owner, *rows]).astype(jnp.int32)


def _tile_of(pid, num_items: int, num_col_tiles: int, band: int):
    """(work item, column tile) of program pid, walking the grid in bands of `band` work items.

    Within a band, consecutive programs take consecutive work items of the same column tile, and the band
    sweeps the column tiles before the next band starts. Neither plain order reuses well at prefill
    sizes: column-tile-fastest streams all of w[g] (Mixtral: 117 MB, more than the 50 MB L2) once per
    row tile, work-item-fastest streams all of x once per column tile. In a band of 8, the programs
    resident at once (~132 on an H100) touch ~8 row tiles of x and ~16 weight tiles, both small enough
    to stay in L2, so each weight tile comes from HBM once per band instead of once per row tile. When
    all of x fits in L2 (decode), one band holds every work item: work-item-fastest, so the one or two
    items of each group read a weight tile back to back and w, nearly all of the traffic, is read once.
    """
    per_band = band * num_col_tiles
    b = pid // per_band
    first = b * band
    size = jnp.minimum(num_items - first, band)  # the last band may be short
    local = pid - b * per_band
    return first + local % size, local // size


def _band(x, num_items: int) -> int:
    """Work items per band of the launch order (see _tile_of): all of them when x stays in L2."""
    return num_items if x.size * x.dtype.itemsize <= X_IN_L2_BYTES else BAND


def _load(ref, row_ok, col_ok):
    """All of a 2-D ref view, reading zeros where row_ok [r] / col_ok [c] is False (None: all in bounds)."""
    if row_ok is None and col_ok is None:
        return pltriton.load(ref)  # the shapes divide the blocks: a plain, unmasked load
    shape = ref.shape
    ok = jnp.ones(shape, jnp.bool_)
    if row_ok is not None:
        ok = ok & row_ok[:, None]
    if col_ok is not None:
        ok = ok & col_ok[None, :]
    return pltriton.load(ref, mask=ok, other=jnp.zeros(shape, ref.dtype))


def _kernel(meta_ref, x_ref, w_ref, o_ref, *, num_groups: int, num_items: int, band: int, bm: int, bn: int, bk: int):
    """One program: the [bm, bn] output tile of one (group, row tile) work item and one column tile.

    x_ref [M, K], w_ref [G, K, N] and o_ref [M, N] are whole arrays; the program addresses its tiles with
    offsets from its work item, so it never loops over groups and never computes another group's rows.
    """
    m, k = x_ref.shape
    n = o_ref.shape[1]
    item, j = _tile_of(pl.program_id(0), num_items, pl.cdiv(n, bn), band)
    group = meta_ref[0, item]
    row0 = pl.multiple_of(meta_ref[1, item], bm)
    start, end = meta_ref[2, item], meta_ref[3, item]
    col0 = pl.multiple_of(j * bn, bn)
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)  # [bm]
    cols = col0 + jnp.arange(bn, dtype=jnp.int32)  # [bn]
    # Only the group's rows are stored: the tile's other rows belong to the neighbouring groups' items.
    mine = (rows >= start) & (rows < end)  # [bm]
    keep = jnp.broadcast_to(mine[:, None], (bm, bn))
    if n % bn:
        keep = keep & (cols < n)[None, :]
    out = o_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)]

    # Masks exist only where a static dimension does not divide its block (tests; real models divide).
    rows_ok = rows < m if m % bm else None  # the last row tile may run past M
    cols_ok = cols < n if n % bn else None

    @pl.when(group < num_groups)
    def _matmul():
        def k_step(kk, acc):
            k0 = pl.multiple_of(kk * bk, bk)
            ks_ok = k0 + jnp.arange(bk, dtype=jnp.int32) < k if k % bk else None  # zeros past K add nothing
            xs = _load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], rows_ok, ks_ok)  # [bm, bk]
            ws = _load(w_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], ks_ok, cols_ok)  # [bk, bn]
            return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)  # [bm, bk] @ [bk, bn] -> [bm, bn]

        # Static int32 bounds: one straight loop over K that Triton software-pipelines.
        acc = jax.lax.fori_loop(jnp.int32(0), jnp.int32(pl.cdiv(k, bk)), k_step, jnp.zeros((bm, bn), jnp.float32))
        pltriton.store(out, acc.astype(o_ref.dtype), mask=keep)

    @pl.when(group == num_groups)
    def _rows_past_the_sum():
        pltriton.store(out, jnp.zeros((bm, bn), o_ref.dtype), mask=keep)


def _block(requested: int, dim: int, name: str) -> int:
    if requested < 1 or requested & (requested - 1):
        raise ValueError(f"{name}={requested} must be a power of two (the Triton lowering needs it)")
    # Small dimensions take a smaller block, never below what a GPU matmul accepts.
    return max(MIN_BLOCK, min(requested, pl.next_power_of_2(dim)))


def _default_block_m(m: int, num_groups: int) -> int:
    """Row tile from the expected rows per group: decode (a few rows per expert) wastes little of a 16-row
    tile on masked rows, prefill (hundreds per expert) takes 128 rows, what a Hopper wgmma tile wants."""
    per_group = m / max(num_groups, 1)
    for bm in (16, 32, 64):
        if per_group <= bm:
            return bm
    return 128


def _compiler_params(bm: int, bn: int, bk: int, itemsize: int):
    """Triton launch settings: two warpgroups for 128-row tiles (one m64 wgmma each), four warps below;
    as many pipeline stages (2..4) as fit SMEM_BUDGET, each holding one x tile and one w tile."""
    stage = (bm * bk + bk * bn) * itemsize
    stages = max(2, min(4, SMEM_BUDGET // stage))
    return pltriton.CompilerParams(num_warps=8 if bm >= 128 else 4, num_stages=stages)


@functools.partial(jax.jit, static_argnames=("interpret", "block_m", "block_n", "block_k"))
def grouped_matmul(
    x,
    w,
    group_sizes,
    *,
    interpret: bool = False,
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 64,
):
    """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] with sum <= M; returns [M, N] in x.dtype.

    Row r of group g (by cumulative group_sizes) gets x[r] @ w[g], accumulated in float32; rows past
    sum(group_sizes) are 0. Blocks must be powers of two; each is shrunk to the next power of two of its
    dimension (at least 16). block_m defaults from the expected rows per group, M / G: 16 for decode up
    to 128 for prefill. Nothing is padded or copied: dimensions that do not divide their block are masked.
    interpret=True runs the kernel on CPU (tests).
    """
    validate(x, w, group_sizes)
    m, k = x.shape
    g, _, n = w.shape
    if m == 0 or n == 0:
        return jnp.zeros((m, n), x.dtype)
    bm = _block(_default_block_m(m, g) if block_m is None else block_m, m, "block_m")
    bn, bk = _block(block_n, n, "block_n"), _block(block_k, k, "block_k")
    num_items = pl.cdiv(m, bm) + g  # static bound: every group boundary splits at most one more row tile
    meta = _work_items(group_sizes, m, bm, num_items)  # [4, num_items]
    return pl.pallas_call(
        functools.partial(_kernel, num_groups=g, num_items=num_items, band=_band(x, num_items), bm=bm, bn=bn, bk=bk),
        grid=(num_items * pl.cdiv(n, bn),),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=None if interpret else _compiler_params(bm, bn, bk, x.dtype.itemsize),
        interpret=interpret,
    )(meta, x, w)


def _bench() -> None:
    """TFLOP/s and weight bandwidth of the kernel and of lax.ragged_dot on MoE prefill and decode shapes, against
    the H100 dense bf16 peak (989 TFLOP/s) and HBM bandwidth (3.35 TB/s)."""
    import time

    dev = jax.devices()[0]
    interpret = dev.platform == "cpu"
    # (name, tokens, D, F, experts, top-k); the matmul is one up/gate projection, x [T*k, D] @ w [E, D, F].
    # Prefill is compute-bound (TFLOP/s is the figure); decode reads each hit expert's weights for a few
    # rows, so it is bound by HBM and its figure is the rate at which those weights are read.
    models = [("Mixtral-8x7B", 4096, 14336, 8, 2), ("Qwen3-30B-A3B", 2048, 768, 128, 8)]
    cases = (
        [(name, tokens, *dims) for tokens in (4096, 64) for name, *dims in models]
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
        weight_bytes = int((np.asarray(sizes) > 0).sum()) * d * f * jnp.dtype(dtype).itemsize  # experts hit
        rates = []
        for label, t in (("kernel", kernel), ("ragged_dot", ref)):
            share = "" if interpret else f" = {flops / t / H100_BF16_FLOPS:.1%} of H100 peak"
            hbm = "" if interpret else f" = {weight_bytes / t / H100_HBM_BYTES:.1%} of H100 HBM"
            rates.append(
                f"{label} {t * 1e3:.3f} ms, {flops / t / 1e12:.3g} TFLOP/s{share}, "
                f"weights at {weight_bytes / t / 1e12:.3g} TB/s{hbm}"
            )
        print(
            f"{dev.device_kind}: {name} experts, {tokens} tokens x top-{top_k}, D={d} F={f} E={e}, "
            f"{jnp.dtype(dtype).name}{' (interpret mode)' if interpret else ''}: " + "; ".join(rates)
        )


if __name__ == "__main__":
    _bench()
