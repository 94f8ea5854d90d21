"""Mixture-of-experts models: logits and tokens equal transformers' on ep, ep x tp and ep x pp meshes in
both dispatch modes; dropless under any routing; the collectives and memory the design promises."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

import jaxinfer
from jaxinfer import JaxinferError, config, explain, sharding
from jaxinfer.config import ModelConfig
from models import moe
from tests import tiny

IDS = [3, 17, 250, 42, 8, 99, 120, 5, 64, 77, 31, 200, 9, 11, 150, 6, 72, 33, 18, 240]
MESHES = [dict(ep=1), dict(ep=2), dict(ep=4), dict(ep=8), dict(ep=2, tp=2), dict(ep=4, tp=2)]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference(tiny_dir):
    made = {}

    def ref(arch):
        if arch not in made:
            made[arch] = tiny.hf_logits(tiny_dir(arch), IDS)
        return made[arch]

    return ref


@pytest.mark.parametrize("dispatch", ["psum", "all_to_all"])
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
@pytest.mark.parametrize("arch", sorted(tiny.MOE_ARCHS))
def test_logits_equal_transformers(tiny_dir, reference, arch, mesh, dispatch):
    llm = jaxinfer.LLM(str(tiny_dir(arch)), moe_dispatch=dispatch, **mesh)
    assert rel_err(llm.score(IDS), reference(arch)) < 1e-4


def test_pipeline_stages_with_experts(tiny_dir, reference):
    llm = jaxinfer.LLM(str(tiny_dir("mixtral")), pp=3, ep=2, moe_dispatch="all_to_all")
    assert rel_err(llm.score(IDS), reference("mixtral")) < 1e-4


def test_pallas_expert_kernel_in_the_model(tiny_dir, reference):
    llm = jaxinfer.LLM(str(tiny_dir("qwen3_moe")), ep=2, tp=2, moe_kernel="interpret")
    assert rel_err(llm.score(IDS), reference("qwen3_moe")) < 1e-4


def test_num_experts_spelling(tiny_dir, reference, tmp_path):
    # Published Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts.
    shutil.copytree(tiny_dir("qwen3_moe"), tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    llm = jaxinfer.LLM(str(tmp_path), ep=4)
    assert llm.config.num_experts == 8 and llm.config.moe_layers == (0, 2)
    assert rel_err(llm.score(IDS), reference("qwen3_moe")) < 1e-4


@pytest.mark.parametrize("arch,mesh", [("mixtral", dict(ep=4)), ("qwen3_moe", dict(ep=2, tp=2))])
def test_greedy_equals_transformers(tiny_dir, arch, mesh):
    import torch
    import transformers

    path = tiny_dir(arch)
    prompts = [IDS[:3], IDS[:11], IDS[4:9], IDS[2:20]]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = [tiny.hf_greedy(model, p, 10) for p in prompts]
    llm = jaxinfer.LLM(str(path), moe_dispatch="all_to_all", **mesh)
    params = jaxinfer.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert [o.token_ids for o in llm.generate_static(prompts, params)] == want


# --- the routed block alone, against a dense numpy computation --------------------------------------

CFG = ModelConfig(
    "mixtral",
    vocab_size=16,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    moe_layers=(0,),
)


def dense_moe(x, router, w_gate_up, w_down, cfg):
    x, router = np.asarray(x, np.float64), np.asarray(router, np.float64)
    w_gate_up, w_down = np.asarray(w_gate_up, np.float64), np.asarray(w_down, np.float64)
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, : cfg.num_experts_per_tok]
    out = np.zeros_like(x)
    for n in range(len(x)):
        w = probs[n, top[n]]
        w = w / w.sum() if cfg.norm_topk_prob else w
        for e, we in zip(top[n], w):
            gate, up = x[n] @ w_gate_up[e, :, 0], x[n] @ w_gate_up[e, :, 1]
            out[n] += we * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out, top


def run_block(params, h, mesh_axes, **options):
    mesh = sharding.make_mesh(sharding.mesh_shape(**mesh_axes))
    rules = sharding.resolve_rules(CFG, mesh)
    axes = {"router": ("embed", None), "we_gate_up": ("experts", "embed", None, "expert_mlp")}
    axes["we_down"] = ("experts", "expert_mlp", "embed")
    placed = {k: jax.device_put(v, sharding.named(mesh, axes[k], rules)) for k, v in params.items()}
    h = jax.device_put(h, NamedSharding(mesh, sharding.spec(("batch", None, "embed"), rules)))
    block = moe.MoE(mesh, tuple(sorted(rules.items())), **options)
    return np.asarray(jax.jit(lambda p, h: block(p, h, CFG))(placed, h))


def random_block(seed, tokens, hot_expert=None):
    rng = np.random.default_rng(seed)
    d, e, f = CFG.hidden_size, CFG.num_experts, CFG.moe_intermediate_size
    h = rng.normal(size=(2, tokens // 2, d)).astype(np.float32)
    router = rng.normal(size=(d, e)).astype(np.float32)
    if hot_expert is not None:  # positive tokens and one router column far ahead: all choose it first
        h = np.abs(h)
        router[:, hot_expert] = 10.0
    params = dict(
        router=router,
        we_gate_up=(0.3 * rng.normal(size=(e, d, 2, f))).astype(np.float32),
        we_down=(0.3 * rng.normal(size=(e, f, d))).astype(np.float32),
    )
    return params, h


@pytest.mark.parametrize("capacity_factor", [moe.CAPACITY_FACTOR, 8.0], ids=["default_capacity", "ample"])
@pytest.mark.parametrize("mesh", [dict(ep=2), dict(ep=8), dict(ep=4, tp=2)], ids=["ep2", "ep8", "ep4xtp2"])
def test_dispatch_equals_dense_computation(mesh, capacity_factor):
    params, h = random_block(0, 48)
    want, _ = dense_moe(h.reshape(-1, CFG.hidden_size), *params.values(), CFG)
    got = run_block(params, h, mesh, dispatch="all_to_all", capacity_factor=capacity_factor)
    assert rel_err(got.reshape(want.shape), want) < 1e-5


@pytest.mark.parametrize("dispatch", ["psum", "all_to_all"])
@pytest.mark.parametrize("capacity_factor", [moe.CAPACITY_FACTOR, 8.0], ids=["default_capacity", "ample"])
def test_every_token_picks_the_same_expert(dispatch, capacity_factor):
    """All 40 tokens choose expert 5 first: with the default capacity the all-to-all path must take its
    psum fallback, with an ample one it sends every token to one device; either way nothing is dropped."""
    params, h = random_block(1, 40, hot_expert=5)
    want, top = dense_moe(h.reshape(-1, CFG.hidden_size), *params.values(), CFG)
    assert (top[:, 0] == 5).all()
    got = run_block(params, h, dict(ep=4), dispatch=dispatch, capacity_factor=capacity_factor, kernel="interpret")
    assert rel_err(got.reshape(want.shape), want) < 1e-5


def test_capacity_decides_the_fallback():
    # 40 tokens over ep=4: 10 per rank; a hot expert sends all 10 of a rank's tokens to one device
    assert moe.capacity(10, 4, 2) < 10 <= moe.capacity(10, 4, 2, factor=8.0)


# --- structure: collectives in the compiled HLO, memory per device ---------------------------------


def test_two_all_to_alls_per_moe_layer(tiny_dir):
    path = str(tiny_dir("mixtral"))
    r = explain.explain(path, dict(ep=4), batch=4, prompt_len=16, gen_len=8, moe_dispatch="all_to_all")
    for step in ("prefill", "decode"):
        a2a = r["steps"][step]["collectives"]["all-to-all"]
        assert a2a["per_layer_count"] == 2 and a2a["count"] == 2 * 3
        assert r["moe"]["steps"][step]["all_to_all_per_layer"] == 2
    # decode: 4 tokens, 1 per rank, so one slot per destination: [ep, 1, D + 2k packed] out, [ep, 1, D] back
    d, k = 64, 2
    assert r["steps"]["decode"]["collectives"]["all-to-all"]["per_layer_bytes"] == 4 * (d + 2 * k) * 4 + 4 * d * 4
    p = explain.explain(path, dict(ep=4), batch=4, prompt_len=16, gen_len=8, moe_dispatch="psum")
    assert "all-to-all" not in p["steps"]["decode"]["collectives"]
    assert p["steps"]["decode"]["collectives"]["all-reduce"]["per_layer_count"] == 1  # one psum over (ep, tp)


@pytest.mark.parametrize("mesh", [dict(ep=4), dict(ep=2, tp=2), dict(ep=8)])
def test_expert_bytes_per_device_are_total_over_ep(tiny_dir, mesh):
    llm = jaxinfer.LLM(str(tiny_dir("mixtral")), **mesh)
    ep, tp = mesh["ep"], mesh.get("tp", 1)
    for name in ("we_gate_up", "we_down"):
        a = llm.params[name]
        assert {s.data.nbytes for s in a.addressable_shards} == {a.nbytes // (ep * tp)}
    assert llm.params["router"].addressable_shards[0].data.nbytes == llm.params["router"].nbytes


def test_builtin_moe_shapes_explain():
    r = explain.explain("mixtral-8x7b", dict(ep=8), dtype="bfloat16", batch=1, prompt_len=128)
    m = r["moe"]
    assert m["expert_param_bytes"]["total"] == 32 * 8 * 3 * 4096 * 14336 * 2
    assert m["expert_param_bytes"]["per_device"] == m["expert_param_bytes"]["total"] // 8
    assert m["steps"]["decode"]["mode"] == "psum"  # one token: a single all-reduce is cheaper
    assert m["steps"]["prefill"]["mode"] == "all_to_all"  # 128 tokens over 8 ranks of top-2 experts
    q = explain.explain("qwen3-30b-a3b", dict(ep=4, tp=2), dtype="bfloat16", batch=1, prompt_len=128)
    assert q["moe"]["expert_param_bytes"]["per_device"] == 48 * 128 * 3 * 2048 * 768 * 2 // 8
    assert q["moe"]["steps"]["prefill"]["mode"] == "psum"  # top-8 of 128: most tokens reach every device
    # on pipeline stages each stage's layer loop holds one psum of its micro-batch, here the whole decode
    # batch (under pipeline.MIN_MICROBATCH_ROWS): 8 tokens x D in bf16
    staged = explain.explain("qwen3-30b-a3b", dict(pp=2, ep=4), dtype="bfloat16", batch=8, prompt_len=128)
    assert staged["pipeline"]["microbatches"]["decode"] == 1
    ar = staged["steps"]["decode"]["collectives"]["all-reduce"]
    assert ar["per_layer_count"] == 1 and ar["per_layer_bytes"] == 8 * 2048 * 2


def test_errors(tiny_dir):
    path = str(tiny_dir("mixtral"))
    with pytest.raises(JaxinferError, match=r"num_experts=8 is not divisible by ep=3.*\[1, 2, 4, 8\]"):
        jaxinfer.LLM(path, ep=3)
    with pytest.raises(JaxinferError, match=r"dense model without experts; set ep=1"):
        jaxinfer.LLM(str(tiny_dir("llama3")), ep=2)
    with pytest.raises(JaxinferError, match=r"mixes dense layers \[1\] with routed ones"):
        jaxinfer.LLM(str(tiny_dir("qwen3_moe")), pp=3)
    with pytest.raises(JaxinferError, match=r"moe_dispatch='ring'"):
        jaxinfer.LLM(path, moe_dispatch="ring")
    with pytest.raises(JaxinferError, match=r"num_experts_per_tok=9 must be in \[1, num_experts=8\]"):
        dataclasses.replace(CFG, num_experts_per_tok=9)
    with pytest.raises(JaxinferError, match=r"GGUF mixture-of-experts models are not supported .*safetensors"):
        config.from_gguf_metadata({"general.architecture": "llama", "llama.expert_count": 8})


def test_each_device_reads_only_its_experts(tiny_dir, monkeypatch):
    from jaxinfer import checkpoint

    reads = []
    original = checkpoint.read_shard

    def spy(w, read, layer, index):
        out = original(w, read, layer, index)
        if not w.experts and "experts." in str(w.hf) and w.fused is None:
            reads.append((w.checkpoint_name(layer), out.size))
        return out

    monkeypatch.setattr(checkpoint, "read_shard", spy)
    llm = jaxinfer.LLM(str(tiny_dir("mixtral")), ep=4, tp=2)
    cfg = llm.config
    down = [(name, n) for name, n in reads if name.endswith("w2.weight")]
    # every expert tensor of every layer read in tp halves, each half once: nothing read twice
    assert all(n == cfg.moe_intermediate_size * cfg.hidden_size // 2 for _, n in down)
    assert len(down) == cfg.num_layers * cfg.num_experts * 2


def test_orbax_round_trip_onto_another_ep(tiny_dir, reference, tmp_path):
    from jaxinfer import checkpoint

    llm = jaxinfer.LLM(str(tiny_dir("qwen3_moe")), ep=2)
    checkpoint.save_orbax(tmp_path / "ckpt", llm.config, llm.params, llm.tokenizer)
    restored = jaxinfer.LLM(str(tmp_path / "ckpt"), ep=8)
    assert restored.config == llm.config
    assert rel_err(restored.score(IDS), reference("qwen3_moe")) < 1e-4


@pytest.mark.parametrize("dispatch", ["psum", "all_to_all"])
def test_dp_ep_tp_mesh_equals_one_device(tiny_dir, dispatch):
    # three prompts over dp=2: decode batches split over dp, single prefill chunks do not
    path = str(tiny_dir("mixtral"))
    prompts = [IDS[:3], IDS[:11], IDS[4:9]]
    params = jaxinfer.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in jaxinfer.LLM(path).generate(prompts, params)]
    llm = jaxinfer.LLM(path, dp=2, ep=2, tp=2, moe_dispatch=dispatch)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert [o.token_ids for o in llm.generate_static(prompts, params)] == want


@pytest.mark.parametrize("dispatch", ["psum", "all_to_all"])
def test_bfloat16_dispatch(tiny_dir, reference, dispatch):
    # bf16 rows carry the routing as bit-cast pairs; sums on CPU run widened (sharding.psum)
    llm = jaxinfer.LLM(str(tiny_dir("mixtral")), ep=4, tp=2, dtype="bfloat16", moe_dispatch=dispatch)
    assert rel_err(llm.score(IDS), reference("mixtral")) < 5e-2


def test_sparse_step_and_dense_layers_from_config():
    base = dict(
        model_type="qwen3_moe",
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    cfg = config.from_hf_config({**base, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert cfg.moe_layers == (1, 5) and cfg.dense_layers == (0, 2, 3, 4) and not cfg.norm_topk_prob
    mixtral = config.from_hf_config({**base, "model_type": "mixtral", "num_local_experts": 4})
    assert mixtral.num_experts == 4 and mixtral.moe_layers == tuple(range(6)) and mixtral.norm_topk_prob
    assert mixtral.moe_intermediate_size == 64  # Mixtral's experts use intermediate_size


def test_bench_reports_expert_memory_and_dispatch(tiny_dir):
    from jaxinfer import bench

    llm = jaxinfer.LLM(str(tiny_dir("mixtral")), ep=4)
    r = bench.run(llm, [1], prompt_len=6, gen_len=9)
    cfg = llm.config
    total = cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    assert r["expert_param_bytes_per_device"] == total // 4
    row = r["rows"][0]
    assert row["moe_decode_mode"] == "psum" and row["moe_bytes_sent_per_token_per_layer"] == 2 * 3 / 4 * 64 * 4
    assert "expert weights per device" in bench.format_table(r)
