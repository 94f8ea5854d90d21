"""Weight quantization (int8, fp8, int4): the round trips, logits against a dequantized-weights model on
several meshes, drift from the float model, per-device bytes, the scales' shardings and the errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxinfer
from jaxinfer import JaxinferError, config, explain
from models import llama, quant
from tests.tiny import IDS, rel_err

QUANTIZED = ("wq", "wkv", "wo", "w_gate_up", "w_down")


def test_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 64, 2, 4, 8)).astype(np.float32)
    w[0, :, 1, 2, 3] = 0  # an all-zero channel: scale 1, values 0
    q = quant.quantize(jnp.asarray(w), (1,))
    assert q.values.dtype == jnp.int8 and q.values.shape == w.shape
    assert q.scales.dtype == jnp.float32 and q.scales.shape == (3, 1, 2, 4, 8)
    assert float(q.scales[0, 0, 1, 2, 3]) == 1 and not np.any(np.asarray(q.values)[0, :, 1, 2, 3])
    err = np.abs(np.asarray(quant.dequantize(q)) - w)
    assert np.all(err <= np.asarray(q.scales) / 2 * (1 + 1e-6))
    assert np.abs(np.asarray(q.values)).max() == 127
    # the host (numpy) and the device (jax, jitted) quantize bit for bit alike
    host = quant.quantize(w, (1,))
    assert np.array_equal(host.values, np.asarray(q.values)) and np.array_equal(host.scales, np.asarray(q.scales))


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_fp8_and_int4_round_trips(fmt):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 256, 4, 16)).astype(np.float32)  # wq-like: [layers, embed, heads, head_dim]
    q = quant.quantize(jnp.asarray(w), (1,), fmt)
    host = quant.quantize(w, (1,), fmt)
    assert np.array_equal(np.asarray(q.values).view(np.uint8), np.asarray(host.values).view(np.uint8))
    assert np.array_equal(np.asarray(q.scales), host.scales)
    d = np.asarray(quant.dequantize(q))
    scale = quant.expand(np.asarray(q.scales), w.shape)
    if fmt == "fp8":  # e4m3: 3 mantissa bits, round to nearest: within 2^-4 of the value (above the subnormals)
        assert q.values.dtype == quant.FP8 and q.scales.shape == (2, 1, 4, 16)
        assert np.all(np.abs(d - w) <= np.maximum(np.abs(w) * 2**-4, scale * 2**-9) * (1 + 1e-6))
    else:  # int4: group 128 along embed, two values per byte along head_dim; within half a step
        assert q.values.dtype == jnp.uint8 and q.values.shape == (2, 256, 4, 8) and q.scales.shape == (2, 2, 4, 16)
        assert np.all(np.abs(d - w) <= scale / 2 * (1 + 1e-6))
        assert set(np.unique(np.asarray(quant.int_values(q)))) <= set(range(-8, 8))
    x = jnp.asarray(rng.normal(size=(3, 5, 256)).astype(np.float32))
    one = jax.tree.map(lambda a: a[0], q)
    want = jnp.einsum("btd,dnh->btnh", x, quant.dequantize(one))
    assert rel_err(np.asarray(quant.einsum("btd,dnh->btnh", x, one)), np.asarray(want)) < 1e-6


def test_int4_groups_span_small_head_dims():
    # wo [heads, head_dim, embed] with head_dim 8: a group of 32 inputs spans 4 heads
    lay = quant.layout((8, 8, 64), (0, 1), "int4")
    assert lay.group == 64 and lay.scale_shape == (1, 1, 64)  # 64 inputs: one group, per channel
    lay = quant.layout((32, 8, 64), (0, 1), "int4")
    assert lay.group == 128 and lay.scale_shape == (2, 1, 64) and lay.values_shape == (32, 8, 32)
    lay = quant.layout((4, 256, 64), (0, 1), "int4")
    assert lay.scale_shape == (4, 2, 64)


def test_einsum_scales_the_output_like_a_dequantized_weight():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 12)).astype(np.float32))
    wo = quant.quantize(jnp.asarray(rng.normal(size=(3, 4, 6)).astype(np.float32)), (0, 1))
    flat = quant.merge_leading(wo, 2)
    assert flat.values.shape == (12, 6) and flat.scales.shape == (1, 6)
    want = jnp.einsum("btf,fd->btd", x, quant.dequantize(flat))
    assert rel_err(np.asarray(quant.einsum("btf,fd->btd", x, flat)), np.asarray(want)) < 1e-6
    w = quant.quantize(jnp.asarray(rng.normal(size=(12, 2, 3)).astype(np.float32)), (0,))
    want = jnp.einsum("btd,dch->bhct", x, quant.dequantize(w))  # output dims in another order
    assert rel_err(np.asarray(quant.einsum("btd,dch->bhct", x, w)), np.asarray(want)) < 1e-6


def test_quantized_weights_and_their_input_dims():
    cfg = config.SHAPES["llama3-8b"]
    spec = llama.weights(cfg)
    assert {n for n, w in spec.items() if w.quant} == set(QUANTIZED)
    moe = llama.weights(config.SHAPES["qwen3-30b-a3b"])
    assert {n for n, w in moe.items() if w.quant} == {"wq", "wkv", "wo", "we_gate_up", "we_down"}
    assert moe["we_gate_up"].in_axes == (2,) and moe["we_down"].scale_axes() == ("layers", "experts", None, "embed")
    assert spec["wo"].in_axes == (1, 2) and spec["wo"].scale_axes() == ("layers", None, None, "embed")
    assert spec["wq"].in_axes == (1,) and spec["wq"].layout("int8").scale_shape == (
        cfg.num_layers,
        1,
        cfg.num_heads,
        cfg.head_dim,
    )
    assert spec["w_down"].scale_axes() == ("layers", None, "embed")
    # int4 (group 128): wo's groups span one head's inputs; w_down's split over tp with the mlp dim
    assert spec["wo"].layout("int4").scale_shape == (cfg.num_layers, cfg.num_heads, 1, cfg.hidden_size)
    assert spec["wo"].scale_axes("int4") == ("layers", "q_heads", None, "embed")
    assert spec["w_down"].scale_axes("int4") == ("layers", "mlp", "embed")


@functools.lru_cache
def _float_params(path: str) -> dict:
    return {n: np.asarray(a) for n, a in jaxinfer.LLM(path).params.items()}


def _dequantized_reference(path: str, axes: tuple, fmt: str = "int8") -> jaxinfer.LLM:
    """The float model with each quantizable weight replaced by dequantize(quantize(w))."""
    llm = jaxinfer.LLM(path, **dict(axes))
    spec = llama.weights(llm.config)
    params = dict(llm.params)
    for name in QUANTIZED:
        w, x = spec[name], params[name]
        params[name] = jax.jit(
            lambda a, w=w: quant.dequantize(quant.quantize(a, w.in_axes, fmt)), out_shardings=x.sharding
        )(x)
    llm.params = params
    return llm


MESHES = {"tp1": (), "tp2": (("tp", 2),), "pp3": (("pp", 3),), "dp2-tp2": (("dp", 2), ("tp", 2))}


CASES = [("int8", m) for m in MESHES] + [(f, m) for f in ("fp8", "int4") for m in ("tp2", "pp3", "dp2-tp2")]


@pytest.mark.parametrize("fmt,mesh", CASES)
def test_logits_equal_dequantized_weights(tiny_dir, fmt, mesh):
    path, axes = str(tiny_dir("llama3")), MESHES[mesh]
    llm = jaxinfer.LLM(path, quant=fmt, **dict(axes))
    assert all(isinstance(llm.params[n], quant.QArray) for n in QUANTIZED)
    assert not isinstance(llm.params["embed"], quant.QArray)
    got = llm.score(IDS)
    ref = _dequantized_reference(path, axes, fmt)
    assert rel_err(got, ref.score(IDS)) < 1e-5
    # loaded shard by shard, the values and scales are exactly those of quantizing the whole weight
    spec = llama.weights(llm.config)
    for name in QUANTIZED:
        want = quant.quantize(_float_params(path)[name], spec[name].in_axes, fmt)
        got_v = np.asarray(llm.params[name].values)
        assert np.array_equal(got_v.view(np.uint8), np.asarray(want.values).view(np.uint8)), name
        assert np.array_equal(np.asarray(llm.params[name].scales), want.scales), name


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_int8_stays_close_to_the_float_model(tiny_dir, arch):
    path = str(tiny_dir(arch))
    plain, q = jaxinfer.LLM(path, tp=2), jaxinfer.LLM(path, tp=2, quant="int8")
    got, want = q.score(IDS), plain.score(IDS)
    # Measured at tp=2 on the tiny random checkpoints (flat logits: the worst case for int8): largest
    # error 0.041 (llama3), 0.039 (qwen2), at most 0.055 over all six archs; mean error 0.003-0.007.
    assert rel_err(got, want) < 0.06
    assert np.abs(got - want).mean() / np.abs(want).max() < 0.01
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    params = jaxinfer.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [IDS[:4], IDS[3:11], IDS[:17]]
    want = [o.token_ids for o in plain.generate(prompts, params)]
    got = [o.token_ids for o in q.generate(prompts, params)]
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert same >= 0.75 * sum(map(len, want)), (same, want, got)


def test_random_weights_quantize_the_same_way(tiny_dir):
    path = str(tiny_dir("llama3"))
    plain = jaxinfer.LLM(path, random_weights=True, tp=2)
    q = jaxinfer.LLM(path, random_weights=True, tp=2, quant="int8")
    spec = llama.weights(q.config)
    for name in QUANTIZED:
        want = quant.quantize(np.asarray(plain.params[name]), spec[name].in_axes)
        assert np.array_equal(np.asarray(q.params[name].values), want.values), name
        assert np.array_equal(np.asarray(q.params[name].scales), want.scales), name
        assert q.params[name].values.sharding.spec == plain.params[name].sharding.spec


def _on_device(params: dict, device) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards if s.device == device)


def test_explain_counts_the_bytes_on_a_device(tiny_dir):
    path = str(tiny_dir("llama3"))
    r = explain.explain(path, dict(tp=2), batch=2, prompt_len=8, gen_len=8, quant="int8")
    f = explain.explain(path, dict(tp=2), batch=2, prompt_len=8, gen_len=8)
    assert r["quant"] == "int8" and f["quant"] == "none"
    llm = jaxinfer.LLM(path, tp=2, quant="int8")
    plain = jaxinfer.LLM(path, tp=2)
    for device in llm.mesh.devices.flat:
        assert _on_device(llm.params, device) == r["per_device"]["param_bytes"]
        dense = _on_device({n: plain.params[n] for n in QUANTIZED}, device)
        assert _on_device({n: llm.params[n] for n in QUANTIZED}, device) < 0.3 * dense  # int8 + scales vs float32
    assert _on_device(plain.params, plain.mesh.devices.flat[0]) == f["per_device"]["param_bytes"]
    assert r["total"]["param_bytes"] == sum(x.nbytes for x in jax.tree.leaves(llm.params))


def test_explain_llama3_8b_int8_halves_the_bf16_dense_weights():
    r = explain.explain("llama3-8b", dict(tp=2), dtype="bfloat16", batch=1, prompt_len=16, gen_len=16, quant="int8")
    f = explain.explain("llama3-8b", dict(tp=2), dtype="bfloat16", batch=1, prompt_len=16, gen_len=16)
    d, v = 4096, 128256
    head = 2 * v * d * 2 // 2  # embedding and head, bf16, split over tp
    dense_bf16 = f["per_device"]["param_bytes"] - head
    dense_int8 = r["per_device"]["param_bytes"] - head
    assert 0.49 < dense_int8 / dense_bf16 < 0.51
    assert "int8 weights" in explain.format_report(r)


def test_wo_scales_are_replicated_over_tp_and_its_values_split(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("llama3")), tp=2, quant="int8")
    wo = llm.params["wo"]
    assert wo.values.sharding.spec == P("pp", "tp", None, None)  # row-parallel: its input (heads) split
    assert wo.scales.sharding.spec == P("pp", None, None, None)  # one scale per output channel, on every device
    assert wo.scales.shape == (3, 1, 1, llm.config.hidden_size)
    assert {s.data.shape for s in wo.scales.addressable_shards} == {wo.scales.shape}
    assert {s.data.shape[1] for s in wo.values.addressable_shards} == {llm.config.num_heads // 2}
    wq = llm.params["wq"]  # column-parallel: the scales split like the values' output heads
    assert wq.values.sharding.spec == P("pp", None, "tp", None) and wq.scales.sharding.spec == P("pp", None, "tp", None)


@pytest.mark.parametrize("mode", ["int9"])
def test_unbuilt_modes_fail_before_any_weight_is_read(tiny_dir, monkeypatch, mode):
    from jaxinfer import checkpoint

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(checkpoint, "place", no_reading)
    monkeypatch.setattr(checkpoint, "resolve", no_reading)
    with pytest.raises(JaxinferError, match=f"quant='{mode}'.*not (built yet|a quantization mode)"):
        jaxinfer.LLM(str(tiny_dir("llama3")), quant=mode)


@pytest.mark.parametrize("mode,fit", [("fp8", True), ("none", False)])
def test_explain_llama3_405b_fp8_fits_one_h100_node(mode, fit):
    r = explain.explain("llama3-405b", dict(tp=8), dtype="bfloat16", batch=1, prompt_len=16, gen_len=16, quant=mode)
    gb = r["per_device"]["param_bytes"] / 1e9
    # fp8 projections, bf16 embedding and head split over tp: ~51 GB per device; bf16: ~101 GB
    assert (50 < gb < 52) if fit else (100 < gb < 102)
    assert (r["per_device"]["bytes_left_beside_weights"]["an 80 GB H100"] > 25e9) == fit
    assert ("fit an 80 GB H100 with" if fit else "do not fit an 80 GB H100") in explain.format_report(r)


MOE_CASES = [
    ("qwen3_moe", "int8", (("ep", 2),)),
    ("qwen3_moe", "fp8", (("ep", 2), ("tp", 2))),
    ("qwen3_moe", "int4", (("ep", 4),)),
    ("mixtral", "int8", (("pp", 3), ("ep", 2))),
]


@pytest.mark.parametrize(
    "arch,fmt,axes", MOE_CASES, ids=lambda c: c if isinstance(c, str) else "x".join(f"{a}{n}" for a, n in c)
)
def test_quantized_experts_equal_dequantized_weights(tiny_dir, arch, fmt, axes):
    path = str(tiny_dir(arch))
    llm = jaxinfer.LLM(path, quant=fmt, **dict(axes))
    assert isinstance(llm.params["we_gate_up"], quant.QArray) and not isinstance(llm.params["router"], quant.QArray)
    plain = jaxinfer.LLM(path, **dict(axes))
    spec = llama.weights(plain.config)
    params = dict(plain.params)
    for name, w in spec.items():
        if w.quant:
            params[name] = jax.jit(
                lambda a, w=w: quant.dequantize(quant.quantize(a, w.in_axes, fmt)), out_shardings=params[name].sharding
            )(params[name])
    plain.params = params
    assert rel_err(llm.score(IDS), plain.score(IDS)) < 1e-5


@pytest.mark.parametrize("arch,fmt", [("llama3", "int8"), ("smollm2", "int8"), ("smollm2", "int4"), ("llama2", "fp8")])
def test_quantize_head_equals_dequantized_head(tiny_dir, arch, fmt):
    """quantize_head: the head (untied lm_head, or a tied embedding, which the lookup reads row by row) too."""
    path = str(tiny_dir(arch))
    llm = jaxinfer.LLM(path, tp=2, quant=fmt, quantize_head=True)
    head = "embed" if llm.config.tie_word_embeddings else "lm_head"
    assert isinstance(llm.params[head], quant.QArray)
    plain = jaxinfer.LLM(path, tp=2)
    spec = llama.weights(llm.config)
    params = dict(plain.params)
    for name in (*QUANTIZED, head):
        w = spec[name]
        params[name] = jax.jit(
            lambda a, w=w: quant.dequantize(quant.quantize(a, w.in_axes, fmt)), out_shardings=params[name].sharding
        )(params[name])
    plain.params = params
    assert rel_err(llm.score(IDS), plain.score(IDS)) < 1e-5


def test_quantize_head_needs_a_quant_mode(tiny_dir):
    with pytest.raises(JaxinferError, match="quantize_head=True needs a quantized model"):
        jaxinfer.LLM(str(tiny_dir("llama3")), quantize_head=True)


def test_the_fp8_decode_kernel_gives_the_xla_paths_tokens(tiny_dir):
    """fp8_kernel="interpret" runs pallas_kernels/fp8_matmul (interpret mode) for the decode-row
    contractions: greedy tokens and scores equal XLA's cast-and-dot path; "auto" keeps XLA and says why;
    over a mesh of several devices the kernel is refused before any weight is read."""
    w = quant.quantize(jnp.asarray(np.random.default_rng(0).normal(size=(64, 4, 16)), jnp.float32), (0,), "fp8")
    for rows, kernel in ((1, True), (64, True), (65, False)):  # decode rows take it, a longer prompt does not
        jaxpr = str(jax.make_jaxpr(lambda x: quant.einsum("btd,dnh->btnh", x, w, kernel="interpret"))(
            jnp.zeros((1, rows, 64), jnp.float32)))
        assert ("pallas_call" in jaxpr) == kernel, rows
    path = str(tiny_dir("llama3"))
    ours = jaxinfer.LLM(path, quant="fp8", fp8_kernel="interpret", max_num_seqs=2)
    assert ours.setup.fp8_matmul.impl == "interpret" and ours.setup.weight_kernel() == "interpret"
    assert "fp8 decode matmul" in ours.setup.kernel_report()
    xla = jaxinfer.LLM(path, quant="fp8", max_num_seqs=2)
    assert xla.setup.fp8_matmul.impl == "xla" and "awaits its GPU measurement" in xla.setup.fp8_matmul.why
    params = jaxinfer.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [IDS[:7], IDS[3:15]]
    assert [c.token_ids for c in ours.generate(prompts, params)] == [c.token_ids for c in xla.generate(prompts, params)]
    assert rel_err(ours.score(IDS), xla.score(IDS)) < 1e-4
    with pytest.raises(JaxinferError, match=r"fp8_kernel='interpret' runs on one device and this mesh has 2"):
        jaxinfer.LLM(path, quant="fp8", fp8_kernel="interpret", tp=2)
    with pytest.raises(JaxinferError, match=r"fp8_kernel='triton'; use one of auto, pallas, interpret, xla"):
        jaxinfer.LLM(path, quant="fp8", fp8_kernel="triton")
