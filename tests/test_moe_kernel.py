"""The grouped-matmul kernel against its reference, and permute/unpermute against a dense MoE layer
(interpret mode on CPU, compiled on GPU). Imports only the kernel module, so it runs without flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moe
from tests.kernel_shapes import GROUPED_TEST

INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _dense(x, w, sizes):
    """numpy float64: row r of group g gets x[r] @ w[g], rows past the sum stay 0."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start : start + size] = x[start : start + size] @ w[g]
        start += size
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,sizes,blocks", [c[1:] for c in GROUPED_TEST], ids=[c[0] for c in GROUPED_TEST])
def test_kernel_equals_reference(dtype, m, k, n, sizes, blocks):
    rng = np.random.default_rng(m * 1000 + n)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    kwargs = dict(zip(("block_m", "block_n", "block_k"), blocks)) if blocks else {}
    with jax.default_matmul_precision("highest"):  # f32 on GPU: IEEE, not TF32
        got = moe.grouped_matmul(x, w, gs, interpret=INTERPRET, **kwargs)
        want = moe.grouped_matmul_reference(x, w, gs)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(want, np.float32), _dense(x, w, sizes), atol=tol, rtol=tol)
    total = sum(sizes)
    assert np.all(np.asarray(got[total:]) == 0) and np.all(np.asarray(want[total:]) == 0)


@pytest.mark.parametrize("block_m", [16, 64])
def test_work_items_cover_each_row_once(block_m):
    """Each row in [0, M) is owned by exactly one work item: its group's, or the sentinel's past the sum."""
    rng = np.random.default_rng(block_m)
    m, groups = 200, 12
    sizes = rng.multinomial(170, rng.dirichlet(np.full(groups, 0.3)))  # skewed, some groups empty, 30 rows past
    num_items = -(-m // block_m) + groups
    group, row0, start, end = np.asarray(moe._work_items(jnp.asarray(sizes, jnp.int32), m, block_m, num_items))
    owner = np.full(m, -1)
    for g, r0, lo, hi in zip(group, row0, start, end):
        assert (0 <= r0 < m and r0 % block_m == 0) or g == groups + 1
        mine = np.arange(max(r0, lo), min(r0 + block_m, hi))
        assert np.all(owner[mine] == -1), "a row is written twice"
        owner[mine] = g
    bounds = np.cumsum(sizes)
    np.testing.assert_array_equal(owner, np.searchsorted(bounds, np.arange(m), side="right"))  # G past the sum
    used = group <= groups
    assert np.all(used[: used.sum()]), "unused items come last"
    assert np.all((start < end)[used]) and np.all((start == end)[~used])


@pytest.mark.parametrize("num_items,num_col_tiles,band", [(20, 3, 8), (16, 5, 16), (9, 1, 8), (3, 4, 8)])
def test_launch_order_visits_every_tile_once(num_items, num_col_tiles, band):
    """The banded launch order is a bijection from program ids onto (work item, column tile) pairs, a band's
    programs take its items fastest, and the short last band (20 = 8 + 8 + 4 items) is handled."""
    pid = jnp.arange(num_items * num_col_tiles, dtype=jnp.int32)
    item, col = (np.asarray(a) for a in moe._tile_of(pid, num_items, num_col_tiles, band))
    assert sorted(zip(item.tolist(), col.tolist())) == [(i, j) for i in range(num_items) for j in range(num_col_tiles)]
    assert np.all(item // band == pid // (band * num_col_tiles))  # bands in order, each sweeping all columns
    assert np.all(np.diff(item[: min(band, num_items)]) == 1) and np.all(col[: min(band, num_items)] == 0)


def test_default_block_m_follows_rows_per_group():
    assert moe._default_block_m(64 * 2, 8) == 16  # Mixtral decode: 16 rows per expert
    assert moe._default_block_m(64 * 8, 128) == 16  # Qwen3-30B-A3B decode: 4 rows per expert
    assert moe._default_block_m(256, 8) == 32
    assert moe._default_block_m(8192 * 2, 8) == 128  # prefill
    assert moe._default_block_m(8192 * 8, 128) == 128


def _moe_layer(x, experts, weights, w_experts):
    xs, gs, order = moe.permute(x, experts, w_experts.shape[0])
    ys = moe.grouped_matmul(xs, w_experts, gs, interpret=INTERPRET, block_m=16, block_n=16, block_k=16)
    return moe.unpermute(ys, order, weights), (xs, gs, order, ys)


def test_permute_unpermute_equals_dense_moe():
    rng = np.random.default_rng(7)
    tokens, d, f, local, total, top_k = 13, 24, 40, 6, 10, 3
    # Experts 6..9 live on another device: they become the 'elsewhere' id 6 with weight 0.
    picked = np.stack([rng.choice(total, top_k, replace=False) for _ in range(tokens)])
    experts = np.where(picked < local, picked, local).astype(np.int32)
    weights = np.where(picked < local, rng.uniform(0.1, 1.0, (tokens, top_k)), 0.0).astype(np.float32)
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    w_experts = (rng.normal(size=(local, d, f)) / np.sqrt(d)).astype(np.float32)
    out, (xs, gs, order, ys) = _moe_layer(jnp.asarray(x), jnp.asarray(experts), jnp.asarray(weights), w_experts)

    want = np.zeros((tokens, f))
    for t in range(tokens):
        for j in range(top_k):
            if experts[t, j] < local:
                want[t] += weights[t, j] * (x[t].astype(np.float64) @ w_experts[experts[t, j]])
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)

    flat = experts.reshape(-1)
    np.testing.assert_array_equal(np.asarray(gs), np.bincount(flat, minlength=local + 1)[:local])
    np.testing.assert_array_equal(np.asarray(order), np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(xs), x[np.asarray(order) // top_k])
    assert (flat == local).sum() > 0 and np.all(flat[np.asarray(order)[int(gs.sum()) :]] == local)

    # Rows past the sum reach the output only through their zero weight, so even NaN there is dropped.
    garbage = ys.at[int(gs.sum()) :].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(moe.unpermute(garbage, order, jnp.asarray(weights))), np.asarray(out))


def test_every_token_picks_the_same_expert():
    rng = np.random.default_rng(3)
    tokens, d, f, num = 21, 16, 24, 4
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    w_experts = rng.normal(size=(num, d, f)).astype(np.float32) / 4
    experts = np.tile(np.array([[2, num]], np.int32), (tokens, 1))  # expert 2, and one held elsewhere
    weights = np.tile(np.array([[0.75, 0.0]], np.float32), (tokens, 1))
    out, (_, gs, _, _) = _moe_layer(jnp.asarray(x), jnp.asarray(experts), jnp.asarray(weights), w_experts)
    np.testing.assert_array_equal(np.asarray(gs), [0, 0, tokens, 0])
    np.testing.assert_allclose(np.asarray(out), 0.75 * (x.astype(np.float64) @ w_experts[2]), atol=2e-5, rtol=2e-5)


def test_validator_names_the_mismatch():
    x = jnp.zeros((8, 16))
    w = jnp.zeros((3, 16, 32))
    sizes = jnp.asarray([4, 0, 4], jnp.int32)
    with pytest.raises(ValueError, match=r"x has K=16 columns but w \(3, 12, 32\) expects K=12"):
        moe.grouped_matmul(x, jnp.zeros((3, 12, 32)), sizes, interpret=True)
    with pytest.raises(ValueError, match="group_sizes has 2 entries but w holds 3 groups"):
        moe.grouped_matmul_reference(x, w, sizes[:2])
    with pytest.raises(ValueError, match="group_sizes must be integers, got float32"):
        moe.grouped_matmul(x, w, sizes.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match=r"x \(float32\) and w \(bfloat16\) must share a dtype"):
        moe.grouped_matmul_reference(x, w.astype(jnp.bfloat16), sizes)
    with pytest.raises(ValueError, match=r"x must be \[rows, K\], w \[groups, K, N\]"):
        moe.grouped_matmul(x[None], w, sizes, interpret=True)
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        moe.grouped_matmul(x, w, sizes, interpret=True, block_n=48)
    with pytest.raises(ValueError, match="experts must be integer expert ids, got float32"):
        moe.permute(x, jnp.zeros((8, 2)), 3)
