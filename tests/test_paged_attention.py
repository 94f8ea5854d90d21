"""The paged decode-attention kernel against its reference (interpret mode on CPU, compiled on GPU).
Imports only the kernel, so it runs on jax 0.10.2 and, in the sm_90 gate's venv, on 0.11.2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from tests.kernel_shapes import ATTENTION_TEST

INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
LAYERS = 2


def _case(rng, dtype, batch, heads, kv_heads, head_dim, page_size, pages_per_seq):
    num_pages = batch * pages_per_seq + 3
    q = jnp.asarray(rng.normal(size=(batch, heads, head_dim)), dtype)
    pool = (LAYERS, num_pages, page_size, kv_heads, head_dim)
    k = jnp.asarray(rng.normal(size=pool), dtype)
    v = jnp.asarray(rng.normal(size=pool), dtype)
    tables = jnp.asarray(rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq))
    return q, k, v, tables


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", ATTENTION_TEST, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_reference(dtype, shape):
    batch, _, _, _, page_size, pages_per_seq = shape
    rng = np.random.default_rng(sum(shape))
    q, k, v, tables = _case(rng, dtype, *shape)
    # Ragged lengths: one token, lengths that end mid-page, one full sequence.
    lengths = rng.integers(1, page_size * pages_per_seq + 1, batch)
    lengths[0] = 1
    lengths[-1] = page_size * pages_per_seq if batch > 1 else max(1, page_size * pages_per_seq - 1)
    lengths = jnp.asarray(lengths)
    with jax.default_matmul_precision("highest"):
        for layer in range(LAYERS):
            want = pa.reference(q, k, v, lengths, tables, layer)
            got = pa.paged_attention(q, k, v, lengths, tables, layer, interpret=INTERPRET)
            np.testing.assert_allclose(
                np.asarray(got, np.float32), np.asarray(want, np.float32), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
            )


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_splits_merge_to_the_same_result(num_splits):
    rng = np.random.default_rng(num_splits)
    q, k, v, tables = _case(rng, jnp.float32, 2, 8, 2, 16, 4, 40)
    lengths = jnp.asarray([37, 160])  # the first sequence leaves most splits empty
    with jax.default_matmul_precision("highest"):
        want = pa.reference(q, k, v, lengths, tables, 1)
        got = pa.paged_attention(q, k, v, lengths, tables, 1, interpret=INTERPRET, num_splits=num_splits)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_plan_fills_the_gpu_and_keeps_splits_whole():
    assert pa.plan(1, 8, 32768, 64) == (32, 1024)  # batch 1: 256 programs on 132 SMs
    assert pa.plan(64, 8, 32768, 64) == (1, 32768)  # 512 programs already
    splits, per_split = pa.plan(1, 8, 1000, 64)
    assert per_split % 64 == 0 and splits * per_split >= 1000 and per_split >= pa.MIN_SPLIT_TOKENS


def test_only_the_given_layer_and_length_count():
    rng = np.random.default_rng(0)
    q, k, v, tables = _case(rng, jnp.float32, 2, 4, 2, 16, 4, 2)
    lengths = jnp.asarray([5, 3])
    with jax.default_matmul_precision("highest"):
        base = pa.reference(q, k, v, lengths, tables, 1)
        # Positions 5.. of sequence 0 and 3.. of sequence 1, and all of layer 0, hold noise.
        noisy = k.at[1, tables[0, 1], 1:].set(99.0).at[1, tables[1, 0], 3].set(-99.0).at[0].set(50.0)
        np.testing.assert_allclose(pa.reference(q, noisy, v, lengths, tables, 1), base, atol=1e-6)
        got = pa.paged_attention(q, noisy, v, lengths, tables, 1, interpret=INTERPRET)
    np.testing.assert_allclose(got, base, atol=1e-5)


def test_validator_names_the_mismatch():
    q = jnp.zeros((2, 6, 8))
    pool = jnp.zeros((1, 4, 4, 4, 8))
    lengths, tables = jnp.ones(2, jnp.int32), jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match="query heads 6 are not a multiple of kv heads 4"):
        pa.paged_attention(q, pool, pool, lengths, tables, 0, interpret=True)
    with pytest.raises(ValueError, match=r"lengths must be \[2\]"):
        pa.reference(jnp.zeros((2, 4, 8)), pool, pool, jnp.ones(3, jnp.int32), tables, 0)
    with pytest.raises(ValueError, match=r"pages \[layers, pages, page_size, kv_heads, head_dim\]"):
        pa.reference(jnp.zeros((2, 4, 8)), pool[0], pool[0], lengths, tables, 0)
    with pytest.raises(ValueError, match="head_dim 8 must be a power of two >= 16 for the compiled kernel"):
        pa.paged_attention(jnp.zeros((2, 4, 8)), pool, pool, lengths, tables, 0)


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_partials_merge_to_the_whole_result(ranks):
    """Sequence parallelism: each rank reads blocks rank, rank + ranks, ... of every sequence (its own
    column of the block table) and returns unnormalised partials; their log-sum-exp merge is the whole."""
    rng = np.random.default_rng(ranks)
    q, k, v, tables = _case(rng, jnp.float32, 3, 8, 2, 16, 4, 12)
    lengths = jnp.asarray([3, 29, 48])  # one page only (the other ranks see nothing), mid-page, full
    parts = []
    with jax.default_matmul_precision("highest"):
        want = pa.reference(q, k, v, lengths, tables, 1)
        for rank in range(ranks):
            mine = tables[:, rank::ranks]
            got = pa.paged_attention_partial(
                q, k, v, lengths, mine, 1, jnp.int32(rank), ranks=ranks, interpret=INTERPRET, num_splits=2
            )
            ref = pa.reference_partial(q, k, v, lengths, mine, 1, rank, ranks=ranks)
            for g, r in zip(got, ref):
                np.testing.assert_allclose(g, r, atol=2e-5, rtol=2e-5)
            parts.append(got)
    out, m, total = (jnp.stack(a) for a in zip(*parts))
    weight = jnp.exp(m - m.max(axis=0))
    merged = (out * weight[..., None]).sum(0) / (total * weight).sum(0)[..., None]
    np.testing.assert_allclose(merged, want, atol=2e-5, rtol=2e-5)
    assert float(parts[-1][2][0].max()) == 0.0  # sequence 0's one page is rank 0's: the last rank adds nothing
