"""The CPU int8 matmul kernel (cpu_kernels/int8_matmul): equal to the XLA path within float32 rounding
over shapes and einsum specs, the same greedy tokens as the XLA path in a model, chosen only where it
applies, and the fallback when it cannot build or is turned off."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
import jaxinfer
from cpu_kernels import int8_matmul as k8
from jaxinfer import kernels
from models import quant
from tests.tiny import IDS

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")

# float32 sums in another order: a few ulps of the sum of |x * w| over K
RTOL = 2e-6


def _close(got, want, x, w_kn):
    """got == want within float32 rounding of x [M, K] @ w_kn [K, N] (float) summed in another order."""
    bound = RTOL * np.abs(np.asarray(x, np.float32)) @ np.abs(np.asarray(w_kn, np.float32))
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
    assert np.all(err <= bound + 1e-30), float(np.max(err - bound))


@pytest.fixture(scope="module")
def built():
    if not cpu_kernels.available():
        pytest.fail(f"the kernel did not build here: {cpu_kernels.load()}")


@pytest.mark.parametrize("m", [1, 3, 16, 40])
@pytest.mark.parametrize("k, n", [(64, 48), (37, 29), (576, 200), (130, 1), (8, 300)])
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_equals_the_reference(built, m, k, n, transposed):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
    w = quant.quantize(
        jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n), np.float32)), (1 if transposed else 0,)
    )
    scales = w.scales.reshape(n)
    got = jax.jit(lambda x, v, s: k8.int8_matmul(x, v, s, transposed=transposed))(x, w.values, scales)
    want = k8.reference(x, w.values, scales, transposed=transposed)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    w_kn = quant.dequantize(w)
    _close(got, want, x, w_kn.T if transposed else w_kn)


def test_kernel_rejects_mismatched_shapes(built):
    x, v, s = jnp.ones((2, 8)), jnp.ones((8, 4), jnp.int8), jnp.ones(4)
    with pytest.raises(ValueError, match="int8_matmul"):
        k8.int8_matmul(x, v, s, transposed=True)  # [N, K] = [8, 4] has K 4, x has 8
    with pytest.raises(ValueError, match="int8"):
        k8.int8_matmul(x, v.astype(jnp.float32), s)


# (spec, x shape, weight shape, the weight's contracted axes): the model's contractions
SPECS = [
    ("btd,dnh->btnh", (1, 1, 64), (64, 4, 16), (0,)),  # wq
    ("btd,dckh->btckh", (2, 1, 64), (64, 2, 3, 16), (0,)),  # wkv
    ("btf,fd->btd", (1, 3, 48), (48, 64), (0,)),  # wo (merged heads), w_down
    ("btd,dcf->btcf", (4, 1, 64), (64, 2, 40), (0,)),  # w_gate_up
    ("btd,vd->btv", (1, 1, 64), (77, 64), (1,)),  # the tied embedding as the head
    ("btd,dv->btv", (3, 1, 64), (64, 77), (0,)),  # lm_head
]


def _is_kernel(fn, *args) -> bool:
    return all(t in jax.jit(fn).lower(*args).as_text() for t in ("custom_call", k8.TARGETS[False][:20]))


@pytest.mark.parametrize("spec, xs, ws, in_axes", SPECS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_takes_the_kernel_at_decode_sizes(built, spec, xs, ws, in_axes, dtype):
    rng = np.random.default_rng(len(spec))
    x = jnp.asarray(rng.standard_normal(xs, np.float32)).astype(dtype)
    w = quant.quantize(jnp.asarray(rng.standard_normal(ws, np.float32)), in_axes)
    head = dict(preferred_element_type=jnp.float32) if spec.endswith("btv") else {}
    xla = lambda x, w: quant.einsum(spec, x, w, **head)
    ours = lambda x, w: quant.einsum(spec, x, w, kernel="cpu", **head)
    assert _is_kernel(ours, x, w) and not _is_kernel(xla, x, w)
    got, want = jax.jit(ours)(x, w), jax.jit(xla)(x, w)
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == jnp.float32:
        w_kn = quant.dequantize(w if in_axes == (0,) else quant.QArray(w.values.T, w.scales.T))
        _close(
            got.reshape(-1, w_kn.size // xs[-1]),
            want.reshape(-1, w_kn.size // xs[-1]),
            x.reshape(-1, xs[-1]),
            w_kn.reshape(xs[-1], -1),
        )
    else:  # bfloat16 out: one rounding of the float32 result
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)


def test_einsum_keeps_xla_for_prefill_and_other_layouts(built):
    w = quant.quantize(jnp.ones((64, 4, 16)), (0,))
    prefill = jnp.ones((1, quant.KERNEL_MAX_ROWS + 1, 64))
    assert not _is_kernel(lambda x, w: quant.einsum("btd,dnh->btnh", x, w, kernel="cpu"), prefill, w)
    # output dimensions out of the weight's order would need a transpose: XLA's
    assert not _is_kernel(lambda x, w: quant.einsum("btd,dnh->bthn", x, w, kernel="cpu"), prefill[:, :1], w)
    assert jax.jit(lambda x, w: quant.einsum("btd,dnh->bthn", x, w, kernel="cpu"))(prefill[:, :1], w).shape == (
        1,
        1,
        16,
        4,
    )


@pytest.mark.parametrize("tied", [False, True])
def test_model_greedy_tokens_with_and_without_the_kernel(built, tiny_dir, monkeypatch, tied):
    path = str(tiny_dir("llama3", tie_word_embeddings=tied))
    ours = jaxinfer.LLM(path, quant="int8", quantize_head=True, max_num_seqs=2)
    assert ours.setup.int8_matmul.impl == "cpu", ours.setup.int8_matmul
    assert "int8 matmul" in ours.setup.kernel_report()
    monkeypatch.setenv("JAXINFER_CPU_KERNELS", "0")
    cpu_kernels.load.cache_clear()
    try:
        xla = jaxinfer.LLM(path, quant="int8", quantize_head=True, max_num_seqs=2)
    finally:
        monkeypatch.delenv("JAXINFER_CPU_KERNELS")
        cpu_kernels.load.cache_clear()
    assert xla.setup.int8_matmul.impl == "xla" and "JAXINFER_CPU_KERNELS=0" in xla.setup.int8_matmul.why
    params = jaxinfer.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [IDS[:7], IDS[3:15]]
    want = [c.token_ids for c in xla.generate_static(prompts, params)]
    assert [c.token_ids for c in ours.generate_static(prompts, params)] == want
    assert [c.token_ids for c in ours.generate(prompts, params)] == [c.token_ids for c in xla.generate(prompts, params)]
    np.testing.assert_allclose(ours.score(IDS), xla.score(IDS), rtol=1e-4, atol=1e-4)


def test_several_devices_keep_the_xla_path(built):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
    choice = kernels.int8_matmul("int8", mesh)
    assert choice.impl == "xla" and "2 devices" in choice.why
    assert kernels.int8_matmul("none", mesh) is None
    assert kernels.int8_matmul("int8", jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))).impl == "cpu"


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("JAXINFER_CACHE_DIR", str(tmp_path))
    try:
        for cxx, why in (("no-such-compiler-here", "no C++ compiler"), ("false", "compiling int8_matmul.cc failed")):
            monkeypatch.setenv("CXX", cxx)
            cpu_kernels.load.cache_clear()
            cpu_kernels._registered.cache_clear()  # as in a fresh process
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="cpu_kernels"):
                assert not cpu_kernels.available() and why in cpu_kernels.load()
                assert not cpu_kernels.available()  # decided once: one warning
            assert [r.levelname for r in caplog.records] == ["WARNING"] and why in caplog.records[0].getMessage()
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
            assert kernels.int8_matmul("int8", mesh).impl == "xla"
    finally:
        monkeypatch.delenv("CXX")
        cpu_kernels.load.cache_clear()
        cpu_kernels._registered.cache_clear()
    assert not list(tmp_path.rglob("*.so"))  # a failed build leaves nothing behind


def test_processes_building_at_once_share_one_library(tmp_path):
    code = "import cpu_kernels; assert cpu_kernels.load() is None, cpu_kernels.load(); print(cpu_kernels._build())"
    env = {**os.environ, "JAXINFER_CACHE_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [outs[0].rsplit("/", 1)[1]]  # no temporaries left
