"""The weight-only fp8 matmul kernel against its reference (interpret mode on CPU, compiled on GPU).
Imports only the kernel module, so it runs in the sm_90 gate's venv too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_matmul as fm
from tests.kernel_shapes import FP8_TEST

INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _case(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed + m * 1000 + n)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32).astype(fm.FP8)
    scales = jnp.asarray(rng.uniform(0.5, 2.0, size=n), jnp.float32)
    return x, w, scales


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,bn,bk,splits", [c[1:] for c in FP8_TEST], ids=[c[0] for c in FP8_TEST])
def test_kernel_equals_reference(dtype, m, k, n, bn, bk, splits):
    x, w, scales = _case(m, k, n, dtype)
    with jax.default_matmul_precision("highest"):  # f32 on GPU: IEEE, not TF32
        got = fm.fp8_matmul(x, w, scales, interpret=INTERPRET, block_n=bn, block_k=bk, splits=splits)
    want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64) * np.asarray(scales)[None]
    assert got.shape == (m, n) and got.dtype == dtype
    err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
    assert err < TOLERANCE[dtype], err
    ref = fm.fp8_matmul_reference(x, w, scales)
    np.testing.assert_allclose(np.asarray(ref, np.float64), want, atol=TOLERANCE[dtype] * np.max(np.abs(want)))


def test_plan_splits_k_until_the_gpu_is_busy():
    # Llama-3-8B's down projection: 32 column strips of 128, K (112 tiles of 128) split 9 ways
    bm, bn, bk, splits, steps = fm.plan(1, 14336, 4096)
    assert (bm, bn, bk) == (16, 128, 128) and splits * steps * bk >= 14336 and (splits - 1) * steps * bk < 14336
    assert 32 * splits >= fm.TARGET_PROGRAMS // 2 and steps >= 4
    # gate_up: 224 strips already fill the GPU, so K is split at most twice
    assert fm.plan(1, 4096, 28672)[3] <= 2
    assert fm.plan(64, 4096, 4096)[0] == 64


def test_bad_input_names_the_mismatch():
    x, w, scales = _case(2, 64, 32, jnp.float32)
    with pytest.raises(ValueError, match=r"w must be float8_e4m3fn, got float32"):
        fm.fp8_matmul(x, w.astype(jnp.float32), scales, interpret=True)
    with pytest.raises(ValueError, match=r"K or N do not match"):
        fm.fp8_matmul(x, w, scales[:-1], interpret=True)
    with pytest.raises(ValueError, match=r"x has 65 rows; the kernel is for at most 64"):
        fm.fp8_matmul(jnp.zeros((65, 64), jnp.float32), w, scales, interpret=True)
    with pytest.raises(ValueError, match=r"block_n=48 must be a power of two"):
        fm.fp8_matmul(x, w, scales, interpret=True, block_n=48)
