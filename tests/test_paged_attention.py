"""The paged decode-attention kernel against its reference (interpret mode on CPU, compiled on GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import JaxinferError
from pallas_kernels import paged_attention as pa

INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "batch,heads,kv_heads,head_dim,page_size,pages_per_seq",
    [(3, 8, 2, 32, 4, 5), (2, 4, 4, 16, 8, 3), (4, 6, 1, 16, 2, 7), (1, 9, 3, 64, 16, 2)],
)
def test_kernel_equals_reference(dtype, batch, heads, kv_heads, head_dim, page_size, pages_per_seq):
    rng = np.random.default_rng(batch * 100 + heads)
    num_pages = batch * pages_per_seq + 3
    q = jnp.asarray(rng.normal(size=(batch, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(num_pages, page_size, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(num_pages, page_size, kv_heads, head_dim)), dtype)
    tables = jnp.asarray(rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq))
    # Ragged lengths, partly filled last pages, one sequence of a single token.
    lengths = rng.integers(1, page_size * pages_per_seq + 1, batch)
    lengths[0] = 1 if batch > 1 else 7
    lengths = jnp.asarray(lengths)
    want = pa.reference(q, k, v, lengths, tables)
    got = pa.paged_attention(q, k, v, lengths, tables, interpret=INTERPRET)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
    )


def test_reference_ignores_what_lies_past_each_length():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(5, 4, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(5, 4, 2, 8)), jnp.float32)
    tables = jnp.asarray([[1, 2], [3, 4]])
    lengths = jnp.asarray([5, 3])
    base = pa.reference(q, k, v, lengths, tables)
    noisy = k.at[2, 1:].set(99.0).at[3, 3].set(-99.0)  # positions 5.. of seq 0 and 3 of seq 1
    np.testing.assert_allclose(pa.reference(q, noisy, v, lengths, tables), base, atol=1e-6)
    np.testing.assert_allclose(pa.paged_attention(q, noisy, v, lengths, tables, interpret=INTERPRET), base, atol=1e-5)


def test_validator_names_the_mismatch():
    q = jnp.zeros((2, 6, 8))
    pages = jnp.zeros((4, 4, 4, 8))
    with pytest.raises(JaxinferError, match="query heads 6 are not a multiple of kv heads 4"):
        pa.paged_attention(q, pages, pages, jnp.ones(2, jnp.int32), jnp.zeros((2, 2), jnp.int32), interpret=True)
    with pytest.raises(JaxinferError, match=r"lengths must be \[2\]"):
        pa.reference(jnp.zeros((2, 4, 8)), pages, pages, jnp.ones(3, jnp.int32), jnp.zeros((2, 2), jnp.int32))
