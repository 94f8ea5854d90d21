"""The quantized KV cache (kv_cache_dtype "fp8" and "int8"): the kernel against its reference on
quantized pools, the per-token round trip, logits and greedy tokens against the activation-dtype cache
on tp, pp and one device, the embedded model's answer, and the bytes explain and the engine count.

The kernel and round-trip tests import only the kernel and models/kv_cache.py (jax and numpy), so they
also run in the sm_90 gate's venv; the rest load jaxinfer where they need it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models import kv_cache
from pallas_kernels import paged_attention as pa
from tests.kernel_shapes import ATTENTION_QUANT_TEST, KV_QUANT_DTYPES

INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # kernel vs reference on the same quantized pools
LAYERS = 2
KINDS = {"int8": jnp.int8, "float8_e4m3fn": jnp.float8_e4m3fn}


def _pools(rng, dtype, kv, batch, heads, kv_heads, head_dim, page_size, pages_per_seq):
    """q and quantized k/v pools (QuantKV, scales [L, P, ps, K, 1] as the cache keeps them) with token
    magnitudes spread over four decades, so the per-token scales matter."""
    num_pages = batch * pages_per_seq + 3
    q = jnp.asarray(rng.normal(size=(batch, heads, head_dim)), dtype)
    shape = (LAYERS, num_pages, page_size, kv_heads, head_dim)
    k, v = (rng.normal(size=shape) * 10.0 ** rng.uniform(-2, 2, size=(*shape[:-1], 1)) for _ in range(2))
    k, v = (kv_cache.quantize(jnp.asarray(x, jnp.float32), KINDS[kv]) for x in (k, v))
    tables = jnp.asarray(rng.permutation(num_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq))
    lengths = rng.integers(1, page_size * pages_per_seq + 1, batch)
    lengths[-1] = page_size * pages_per_seq
    return q, k, v, tables, jnp.asarray(lengths)


@pytest.mark.parametrize("kv", KV_QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", ATTENTION_QUANT_TEST, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_reference_on_quantized_pools(kv, dtype, shape):
    rng = np.random.default_rng(sum(shape))
    q, k, v, tables, lengths = _pools(rng, dtype, kv, *shape)
    with jax.default_matmul_precision("highest"):
        for layer in range(LAYERS):
            want = np.asarray(pa.reference(q, k, v, lengths, tables, layer), np.float32)
            got = np.asarray(pa.paged_attention(q, k, v, lengths, tables, layer, interpret=INTERPRET), np.float32)
            # Outputs reach ~100 here (values over four decades): the tolerance is relative to the largest.
            tol = TOLERANCE[dtype]
            np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol)


def test_quantized_reference_is_attention_over_the_dequantized_pools():
    """The reference on (values, scales) equals the float reference on values * scales, and scales passed
    as keywords in [L, P, ps, K] equal the cache's (values, scales [..., 1]) pairs, in kernel and reference."""
    rng = np.random.default_rng(1)
    q, k, v, tables, lengths = _pools(rng, jnp.float32, "int8", 2, 8, 2, 16, 4, 6)
    with jax.default_matmul_precision("highest"):
        want = pa.reference(q, kv_cache.dequantize(k), kv_cache.dequantize(v), lengths, tables, 1)
        pairs = pa.reference(q, k, v, lengths, tables, 1)
        flat = dict(k_scales=k.scales[..., 0], v_scales=v.scales[..., 0])
        keywords = pa.reference(q, k.values, v.values, lengths, tables, 1, **flat)
        kernel = pa.paged_attention(q, k.values, v.values, lengths, tables, 1, interpret=INTERPRET, **flat)
    np.testing.assert_allclose(pairs, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(keywords, pairs)
    np.testing.assert_allclose(kernel, want, atol=2e-5, rtol=2e-5)


def test_validator_names_quantized_pool_mistakes():
    q, lengths, tables = jnp.zeros((2, 4, 16)), jnp.ones(2, jnp.int32), jnp.zeros((2, 2), jnp.int32)
    pool = jnp.zeros((1, 4, 4, 2, 16), jnp.int8)
    scales = jnp.ones((1, 4, 4, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"k_pages are int8: pass k_scales"):
        pa.paged_attention(q, pool, pool, lengths, tables, 0, interpret=True)
    floats = pool.astype(jnp.float32)
    with pytest.raises(ValueError, match=r"k_pages are float32: drop k_scales"):
        pa.reference(q, floats, floats, lengths, tables, 0, scales, scales)
    with pytest.raises(ValueError, match=r"k_scales must be float32 \[1, 4, 4, 2\].*got float32 \[1, 4, 4\]"):
        pa.reference(q, pool, pool, lengths, tables, 0, scales[..., 0], scales)
    with pytest.raises(ValueError, match=r"k_scales must be float32.*got bfloat16"):
        pa.reference(q, pool, pool, lengths, tables, 0, scales.astype(jnp.bfloat16), scales)
    with pytest.raises(ValueError, match=r"one \(values, scales\) pair, and then without k_scales"):
        pa.reference(q, (pool, scales), (pool, scales), lengths, tables, 0, scales)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_error_bounds(dtype):
    """Per token and head: int8 within half a step, max/254; e4m3 within 2^-4 of the element (3 mantissa
    bits), plus half a subnormal step; an all-zero row keeps scale 1 and comes back zero."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 128)) * 10.0 ** rng.uniform(-3, 3, size=(64, 4, 1))
    x[5, 2] = 0.0
    x = jnp.asarray(x, dtype)
    x32 = np.asarray(x, np.float32)
    amax = np.abs(x32).max(axis=-1, keepdims=True)
    slack = amax * 2.0**-21  # float32 rounding of x / scale and values * scale
    for kind, (store, qmax) in kv_cache.FORMATS.items():
        c = kv_cache.quantize(x, store)
        assert c.values.dtype == store and c.scales.dtype == jnp.float32 and c.scales.shape == (64, 4, 1)
        assert c.scales[5, 2, 0] == 1.0
        err = np.abs(np.asarray(kv_cache.dequantize(c)) - x32)
        assert err[5, 2].max() == 0.0
        if kind == "int8":
            assert (err <= amax / 254 + slack).all()
        else:
            assert (err <= 2.0**-4 * np.abs(x32) + amax / qmax * 2.0**-10 + slack).all()
            assert (err <= 2.0**-4 * amax + slack).all()
        assert (np.abs(np.asarray(c.values, np.float32)) <= qmax).all()


# --- the model over a quantized cache ---------------------------------------------------------------

# Teacher-forced logits against the activation-dtype cache on the tiny 4-layer Llama-3 (fp32, head_dim
# 8), largest |difference| / largest |logit| over 12 prompt positions and 8 decode steps. Measured, the
# same on tp=1, tp=2 and pp=2 and for the contiguous and the paged cache: int8 1.19e-2, fp8 7.50e-2.
LOGIT_TOLERANCE = {"int8": 2e-2, "fp8": 1e-1}
MESHES = [dict(tp=1), dict(tp=2), dict(pp=2)]
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """tiny.py's Llama-3 with 4 layers, so that pp=2 splits it."""
    import torch
    import transformers

    from tests import tiny

    cls, kwargs = tiny.ARCHS["llama3"]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(**{**tiny.COMMON, "num_hidden_layers": 4}, **kwargs)
    path = tmp_path_factory.mktemp("llama3-4")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _caches(llm, kind: str, length: int):
    """A contiguous cache [1 row, `length`] and a paged one over pages 1.. of a pool, stored as `kind`."""
    from models.kv_cache import CACHE_AXES, PAGE_AXES, KVCache, PagedKVCache

    setup, pages = llm.setup, length // 4
    flat = KVCache(*kv_cache.empty(setup.cache_layout(setup.cache_shape(1, length), CACHE_AXES, kind)))
    pool = kv_cache.empty(setup.cache_layout(setup.page_shape(pages + 1, 4), PAGE_AXES, kind))
    tables = np.arange(1, pages + 1, dtype=np.int32)[None]
    return flat, PagedKVCache(*pool, tables, np.ones((1, 1), bool))


def _forced_logits(llm, cache, ids: list[int], split: int) -> np.ndarray:
    """fp32 logits [len(ids), V]: ids[:split] in one prefill step, then one decode step per token."""
    from jaxinfer import steps
    from models.kv_cache import PagedKVCache

    forward = jax.jit(steps.forward, static_argnames=("graphdef", "kv_len"), donate_argnames=("cache",))
    kv_len = 0 if isinstance(cache, PagedKVCache) else cache.k.shape[3]
    out = []
    for start, stop in [(0, split)] + [(i, i + 1) for i in range(split, len(ids))]:
        tokens = llm.setup.put(np.asarray([ids[start:stop]], np.int32))
        positions = llm.setup.put(np.arange(start, stop, dtype=np.int32)[None])
        if isinstance(cache, PagedKVCache):
            cache = cache._replace(valid=np.ones((1, stop - start), bool))
        logits, cache = forward(llm.graphdef, llm.state, tokens, positions, cache, kv_len=kv_len)
        out.append(np.asarray(logits[0]))
    return np.concatenate(out)


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_logits_over_a_quantized_cache_stay_close_to_the_float_cache(llama4, mesh):
    import jaxinfer
    from tests.tiny import IDS, rel_err

    llm = jaxinfer.LLM(llama4, **mesh, max_seq_len=64)
    want = _forced_logits(llm, _caches(llm, "auto", 32)[0], IDS, 12)
    for kind in kv_cache.FORMATS:
        flat, paged = _caches(llm, kind, 32)
        assert isinstance(flat.k, kv_cache.QuantKV) and isinstance(paged.k, kv_cache.QuantKV)
        got_flat = _forced_logits(llm, flat, IDS, 12)
        got_paged = _forced_logits(llm, paged, IDS, 12)
        assert rel_err(got_flat, want) < LOGIT_TOLERANCE[kind]
        # Both caches hold the same quantized values: only float summation order could tell them apart.
        assert rel_err(got_paged, got_flat) < 1e-5


def _prompts(n: int) -> list[list[int]]:
    """Prompts of 5 to 40 tokens, every other one behind a shared 21-token prefix (five full pages)."""
    rng = np.random.default_rng(0)
    shared = list(range(100, 121))
    own = [rng.integers(3, 250, int(rng.integers(5, 20))).tolist() for _ in range(n)]
    return [shared + p if i % 2 == 0 else p for i, p in enumerate(own)]


@pytest.mark.parametrize(
    "kind,mesh", [("int8", m) for m in MESHES] + [("fp8", dict(tp=2))], ids=lambda x: str(x).replace(" ", "")
)
def test_engine_and_static_path_agree_on_a_quantized_cache(llama4, kind, mesh):
    """Chunked prefill, shared prefixes and preemption (22 pages of 4 tokens for four sequences of up to
    52 tokens) over the quantized pool give the static path's greedy tokens over the quantized contiguous
    cache; on this model int8 keeps every token of the float cache (fp8 keeps 36 of 72)."""
    import jaxinfer

    llm = jaxinfer.LLM(
        llama4,
        **mesh,
        kv_cache_dtype=kind,
        max_seq_len=128,
        max_num_seqs=4,
        page_size=4,
        num_pages=23,
        prefill_chunk=16,
    )
    prompts, params = _prompts(6), jaxinfer.SamplingParams(max_tokens=12, **GREEDY)
    auto = [o.token_ids for o in jaxinfer.LLM(llama4, **mesh, max_seq_len=128).generate_static(prompts, params)]
    assert isinstance(llm._cache(1, 16).k, kv_cache.QuantKV)
    static = [o.token_ids for o in llm.generate_static(prompts, params)]
    assert [o.token_ids for o in llm.generate(prompts, params)] == static
    engine = llm.engine
    assert engine.preemptions > 0 and engine.pages.hits > 0
    assert engine.free_pages() == engine.num_pages - 1
    if kind == "int8":
        assert static == auto


def test_warmup_compiles_every_shape_of_the_quantized_pool(llama4):
    import jaxinfer
    from tests import tiny

    llm = jaxinfer.LLM(
        llama4, kv_cache_dtype="int8", max_seq_len=32, max_num_seqs=1, page_size=16, num_pages=3, prefill_chunk=16
    )
    assert llm.engine.warmup() > 0
    compiles = tiny.compiles()
    out = llm.generate(_prompts(6)[1::2], jaxinfer.SamplingParams(max_tokens=4, **GREEDY))  # 5-19 tokens
    assert [len(o.token_ids) for o in out] == [4] * 3
    assert tiny.compiles() == compiles  # not one program, of any kind


def _pallas_operands(jaxpr) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every operand of every pallas_call in a jaxpr, nested ones included."""

    def eqns(j):
        for e in j.eqns:
            yield e
            for param in e.params.values():
                for sub in param if isinstance(param, tuple | list) else [param]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from eqns(sub)

    return [
        (tuple(v.aval.shape), str(v.aval.dtype))
        for e in eqns(jaxpr.jaxpr)
        if e.primitive.name == "pallas_call"
        for v in e.invars
    ]


@pytest.mark.parametrize("mesh", [dict(tp=2), dict(pp=2, tp=2)], ids=["tp2", "pp2-tp2"])
def test_pallas_kernel_reads_the_quantized_pool_in_the_engine(llama4, mesh):
    """The kernel in shard_map over tp (and inside the pipeline's stages) takes the int8 pool and its
    scales, and gives the XLA path's tokens."""
    import jaxinfer
    from jaxinfer import steps
    from models.kv_cache import PagedKVCache

    kwargs = dict(**mesh, kv_cache_dtype="int8", max_seq_len=64, max_num_seqs=2, page_size=8, num_pages=16)
    prompts, params = _prompts(2), jaxinfer.SamplingParams(max_tokens=6, **GREEDY)
    xla = jaxinfer.LLM(llama4, attention="xla", **kwargs).generate(prompts, params)
    llm = jaxinfer.LLM(llama4, attention="interpret", **kwargs)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in xla]
    eng, put, s = llm.engine, llm.setup.put, 2
    cache = PagedKVCache(eng.cache_k, eng.cache_v, np.zeros((s, 4), np.int32), np.ones((s, 1), bool))
    sampling, _ = llm.setup.sampling_arrays(jaxinfer.SamplingParams(temperature=0), s, s)
    jaxpr = jax.make_jaxpr(lambda *a: steps.decode(*a, n_steps=1, greedy_only=True), static_argnums=0)(
        eng.graphdef, llm.state, cache, put(np.zeros(s, "i4")), put(np.zeros(s, "i4")), sampling
    )
    layers, pages, page, heads, dim = eng.cache_k.shape
    local = (layers // mesh.get("pp", 1), pages, page, heads // mesh["tp"])  # one device's part
    operands = _pallas_operands(jaxpr)
    assert ((*local, dim), "int8") in operands and (local, "float32") in operands


def test_scales_are_sharded_like_the_pages_and_counted(llama4):
    """On pp=2 x tp=2 the scales split over layers and kv heads exactly as the values do; the engine's
    page budget and pool bytes count 1 byte per element + 4 per token and head for int8."""
    import jaxinfer
    from jaxinfer import executor
    from models.kv_cache import CACHE_AXES

    llm = jaxinfer.LLM(llama4, pp=2, tp=2, kv_cache_dtype="int8", max_seq_len=64, max_num_seqs=2, num_pages=8)
    k = llm.engine.cache_k
    assert k.values.dtype == jnp.int8 and k.scales.dtype == jnp.float32
    # The values' split [layers, pages, page_size, kv_heads, head_dim]; the scales' head_dim (a 1) unnamed.
    assert k.values.sharding.spec == k.scales.sharding.spec == P("pp", None, None, "tp")
    layers, pages, page, heads, dim = k.shape
    shard = (layers // 2, pages, page, heads // 2)
    assert {s.data.shape for s in k.values.addressable_shards} == {(*shard, dim)}
    assert {s.data.shape for s in k.scales.addressable_shards} == {(*shard, 1)}
    per_page = 2 * (layers // 2) * page * (heads // 2) * (dim + 4)  # k and v, values + scales
    assert executor.pool_bytes(llm, 1, page) == per_page
    device = llm.mesh.devices.flat[0]
    pool = jax.tree.leaves((k, llm.engine.cache_v))
    assert executor.pool_bytes(llm, pages, page) == sum(
        s.data.nbytes for a in pool for s in a.addressable_shards if s.device == device
    )
    assert executor.default_num_pages(llm, page, 1e-12, 100) == 2  # a budget under one page: the minimum
    flat = llm.setup.cache_layout(llm.setup.cache_shape(2, 32), CACHE_AXES)
    assert tuple(flat[0].scales.sharding.spec) == tuple(flat[0].values.sharding.spec) == ("pp", "dp", "tp", None, None)


def test_explain_counts_values_and_scales(llama4):
    """kv bytes per token with int8 (and fp8) = (1 + 4 / head_dim) / 4 of the float32 cache's; the JSON
    and the text report say the cache dtype; the decode step reads the smaller cache."""
    from jaxinfer import explain

    runs = {
        kind: explain.explain(llama4, dict(tp=2), batch=2, prompt_len=8, gen_len=8, kv_cache_dtype=kind)
        for kind in ("auto", "int8", "fp8")
    }
    auto = runs["auto"]["per_device"]
    hd = 8
    assert auto["kv_cache_bytes_per_token"] == 2 * 4 * (4 // 2) * hd * 4  # k+v, 4 layers, 2 of 4 kv heads, fp32
    for kind in ("int8", "fp8"):
        r = runs[kind]
        json.dumps(r)
        got = r["per_device"]
        assert got["kv_cache_bytes_per_token"] * 4 * hd == auto["kv_cache_bytes_per_token"] * (hd + 4)
        assert got["kv_cache_bytes"] * 4 * hd == auto["kv_cache_bytes"] * (hd + 4)
        saved = auto["kv_cache_bytes"] - got["kv_cache_bytes"]
        assert runs["auto"]["steps"]["decode"]["bytes_read"] - r["steps"]["decode"]["bytes_read"] == saved
        assert r["kv_cache_dtype"] == kind
        assert f"kv_cache_dtype {kind}: {kind} values + a float32 scale per token and kv head" in explain.format_report(
            r
        )
    assert "kv_cache_dtype auto: float32" in explain.format_report(runs["auto"])


def test_embedded_model_answers_the_same_with_int8_kv(smollm2):
    import jaxinfer
    from tests.tiny import SMALL_ENGINE

    llm = jaxinfer.LLM("smollm2-135m", tp=3, kv_cache_dtype="int8", **SMALL_ENGINE)
    params = jaxinfer.SamplingParams(max_tokens=24, temperature=0)
    question = "What is the capital of France?"
    got = llm.generate(question, params, chat=True)[0]
    want = smollm2.generate(question, params, chat=True)[0]
    assert got.text == want.text == "The capital of France is Paris."
    assert isinstance(llm.engine.cache_k, kv_cache.QuantKV)


def test_unknown_kv_cache_dtype_names_the_choices(llama4):
    import jaxinfer
    from jaxinfer import JaxinferError

    with pytest.raises(
        JaxinferError, match=r"kv_cache_dtype='fp16' is not a KV-cache dtype; use one of 'auto', 'fp8', 'int8'"
    ):
        jaxinfer.LLM(llama4, kv_cache_dtype="fp16")
