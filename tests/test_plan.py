"""`plan`: the search rules, memory from explain's shardings, collectives from the compiled HLO, the
output's keys, every bad input's message, and the CLI."""

import json
import math
import os
import subprocess
import sys
import tomllib

import pytest

from jaxinfer import config as config_lib
from jaxinfer import explain, hlo, plan
from jaxinfer.errors import JaxinferError
from jaxinfer.runtime import prepare


def _req(model="llama3-8b", **kw):
    base = dict(model=model, gpu="h100-sxm", gpus_per_node=8, nodes=1, isl=1024, osl=256, tpot_ms=50.0)
    return plan.Request(**{**base, **kw})


def _planner(req):
    hw = plan.load_hardware(req.gpu)
    return plan.Planner(req, hw, plan.load_calibration(hw.calibration), "bfloat16")


def test_hardware_table_gives_a_source_for_every_figure():
    table = tomllib.loads(plan.HARDWARE.read_text())
    assert {"h100-sxm", "h100-pcie", "h200", "a100-80gb", "b200", "cpu"} <= set(table)
    for kind, entry in table.items():
        for key in plan._NUMBERS:
            assert key in entry, (kind, key)
            if entry[key] != 0 or key.endswith("tflops") or key.endswith("tops"):
                assert entry["source"].get(key), f"{kind}.{key} has no source"
    h100 = plan.load_hardware("h100-sxm")
    assert (h100.memory, h100.bandwidth, h100.intra_bw) == (80e9, 3.35e12, 450e9)
    assert (h100.flops("fp8"), h100.flops("none"), h100.flops("int8")) == (1979e12, 989e12, 989e12)
    assert plan.load_hardware("a100-80gb").flops("fp8") == 312e12  # no fp8 tensor cores: bf16 rate


def test_search_rules():
    p = _planner(_req("llama3-70b", nodes=2))
    cands, rejected = p.candidates(("none",))
    cfg = p.cfg
    assert cands and all(
        cfg.num_heads % tp == 0 and tp <= 8 and cfg.num_layers % pp == 0 and ep == 1 for tp, ep, pp, *_ in cands
    )
    assert {tp for tp, *_ in cands} == {1, 2, 4, 8}
    assert {pp for tp, _, pp, *_ in cands if tp == 8} == {1, 2}  # 16 GPUs
    assert (1, 1, 16, "none", 1) in cands and (2, 1, 5, "none", 1) not in cands  # 10 GPUs would not be whole nodes
    assert {sp for *_, sp in cands} == {1}  # a prompt of one prefill chunk: sp not searched
    assert rejected[0].startswith("tp=16,32,64: TP across nodes (tp must be <= --gpus_per_node=8)")
    moe = _planner(_req("qwen3-30b-a3b"))
    cands, _ = moe.candidates(("none",))
    assert {ep for _, ep, *_ in cands} == {1, 2, 4, 8}
    assert all(128 % ep == 0 and tp * ep * pp <= 8 and 48 % pp == 0 for tp, ep, pp, *_ in cands)
    # a long prompt: sp in powers of two beside tp and ep inside a node, at every pp (pp may cross nodes)
    long = _planner(_req("llama3-70b", nodes=2, isl=4096))
    cands, _ = long.candidates(("none",))
    assert {(tp, sp) for tp, _, pp, _, sp in cands if sp > 1} == {(1, 2), (1, 4), (1, 8), (2, 2), (2, 4), (4, 2)}
    assert {(tp, pp, sp) for tp, _, pp, _, sp in cands if sp > 1 and tp * sp * pp > 8} == {
        (1, 2, 8),
        (2, 2, 4),
        (4, 2, 2),
        (1, 4, 4),
        (2, 4, 2),
        (1, 8, 2),
    }  # two whole nodes; tp*sp=2 at pp=5 would be 10 GPUs
    assert all(tp * sp * pp <= 16 and 80 % pp == 0 for tp, _, pp, _, sp in cands)
    # tp must divide the heads and divide, or be a multiple of, the kv heads
    odd = config_lib.ModelConfig("llama", 100, 48, 96, 4, 12, 4, 4)
    assert plan.tp_problem(odd, 6) == "neither divides nor is a multiple of the 4 kv heads"
    assert plan.tp_problem(odd, 12) is None and plan.tp_problem(odd, 5).startswith("does not divide the 12")


def test_memory_per_pp_equals_the_sharded_figures():
    p = _planner(_req())
    mem = p.memory_of(2, 1, "fp8")
    real = prepare("llama3-8b", dict(tp=2, pp=2), dtype="bfloat16", random_weights=True, quant="fp8")
    assert mem.weights(2) == explain.per_device_param_bytes(real)
    assert mem.weights(1) == explain.per_device_param_bytes(mem.setup)
    # one token's k and v: 32 layers x 8 kv heads x 128 x 2 x bf16, split over tp and pp
    assert mem.kv_per_token == 32 * 8 * 128 * 2 * 2 // 2
    assert mem.other_read(3) == pytest.approx(explain.step_param_bytes(mem.setup, 3) - mem.stacked_read(3))


def test_collectives_are_read_with_the_mesh_axes_they_cross():
    p = _planner(_req())
    prog = p.program(2, 1, 2)
    assert prog.compiled
    layer = [c for c in prog.decode if c.in_layer]
    assert layer and {c.axes for c in layer} == {frozenset({"tp"})}
    # two all-reduces of B x D per layer (weight: one per layer-loop body)
    assert sum(c.weight for c in layer if c.kind == "all-reduce") == pytest.approx(2)
    assert {c.bytes_per_token for c in layer} == {4096 * 2}
    permutes = [c for c in prog.decode if c.kind == "collective-permute"]
    assert permutes and all(c.axes == frozenset({"pp"}) for c in permutes)
    line = "x = f32[1] all-reduce(y), replica_groups=mesh['axis_0'=2,'axis_1'=3] {'axis_0'}, to_apply=a"
    assert hlo.replica_groups(line) == [[0, 3], [1, 4], [2, 5]]
    line = "x = f32[1] all-reduce(y), replica_groups=mesh['a'=4,'b'=1,'c'=2], device_ids=([2,4]T(1,0)) {'a'}, x"
    assert hlo.replica_groups(line) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo.replica_groups("x = f32[2] all-reduce(y), replica_groups=[2,4]<=[4,2]T(1,0), to_apply=a") == [
        [0, 2, 4, 6],
        [1, 3, 5, 7],
    ]


def test_405b_bf16_needs_two_nodes_fp8_fits_one():
    with pytest.raises(JaxinferError) as e:
        plan.plan(_req("llama3-405b", quant="none", tpot_ms=200))
    msg = str(e.value)
    assert "llama3-405b does not fit 1 node(s) of 8 h100-sxm" in msg
    assert "the smallest cluster that holds it is 2 nodes (tp=8 pp=2 none" in msg and "--nodes=2" in msg
    p = _planner(_req("llama3-405b", tpot_ms=200))
    row = p.evaluate(8, 1, 1, "fp8")  # one node, tp=8
    assert 50e9 < row["weight_bytes_per_gpu"] < 0.9 * 80e9 and row["max_concurrent_seqs"] >= 1
    assert row["meets_targets"] and row["tpot_ms"] <= 200
    assert p.evaluate(8, 1, 1, "none")["max_concurrent_seqs"] == 0


def test_json_keys_and_the_recommendation_meets_the_targets():
    r = plan.plan(_req(gpus_per_node=2, quant="auto", tpot_ms=30, ttft_ms=1000))
    out = json.loads(plan.to_json(r))
    assert set(out) == {"configs", "recommended", "why", "inputs"}
    assert all(list(c) == list(plan.CONFIG_KEYS) for c in out["configs"])
    rec = out["recommended"]
    assert rec["meets_targets"] and rec["tpot_ms"] <= 30 and rec["ttft_ms"] <= 1000
    meeting = [c for c in out["configs"] if c["meets_targets"]]
    assert rec["tokens_per_s_per_gpu"] == max(c["tokens_per_s_per_gpu"] for c in meeting)
    assert {c["quant"] for c in out["configs"]} == {"none", "fp8", "int8"}
    for c in out["configs"]:
        assert c["gpus_per_replica"] == c["tp"] * c["pp"] * c["ep"] * c["sp"]
        assert c["replicas"] == 2 // c["gpus_per_replica"]
        assert c["kv_bytes_per_gpu"] + c["weight_bytes_per_gpu"] <= 0.9 * 80e9
    assert out["why"].startswith(plan._describe(r["_rows"][0]))
    text = plan.format_plan(r)
    assert "recommended: " in text and "rejected: " in text


def test_bad_input_names_the_value_and_the_fix(tmp_path):
    with pytest.raises(JaxinferError, match=r"--gpu='tpu-v5' is not in .*known: a100-80gb, b200, cpu, h100-pcie"):
        plan.plan(_req(gpu="tpu-v5"))
    with pytest.raises(
        JaxinferError, match=r"--isl=8000 \+ --osl=500 = 8500 tokens exceed llama3-8b's context of 8192"
    ):
        plan.plan(_req(isl=8000, osl=500))
    with pytest.raises(JaxinferError, match=r"--gpu_memory_utilization=1.5 must be in \(0, 1\]"):
        plan.plan(_req(gpu_memory_utilization=1.5))
    with pytest.raises(JaxinferError, match=r"--tpot_ms=0 must be a positive number"):
        plan.plan(_req(tpot_ms=0))
    with pytest.raises(JaxinferError) as e:
        plan.plan(_req(gpus_per_node=2, quant="fp8", tpot_ms=0.5))
    m = str(e.value)
    assert m.startswith("no configuration meets --tpot_ms=0.5: the best achievable is TPOT ")
    best = float(m.split("TPOT ")[1].split(" ms")[0])
    assert best > 0.5 and "with tp=2 pp=1 fp8 at batch 1" in m
    bad = tmp_path / "hw.toml"
    bad.write_text('[mine]\nmemory_gb = "lots"\n')
    with pytest.raises(JaxinferError, match=r"\[mine\]: memory_gb='lots' must be a number"):
        plan.load_hardware("mine", bad)


def test_a_custom_hardware_file(tmp_path):
    table = tomllib.loads(plan.HARDWARE.read_text())
    mine = dict(table["h100-sxm"], memory_gb=16)
    path = tmp_path / "hw.toml"
    path.write_text("[small]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in mine.items() if k != "source"))
    with pytest.raises(JaxinferError, match=r"the smallest cluster that holds it is 2 nodes"):
        plan.plan(_req(gpu="small", hardware=str(path), gpus_per_node=1, quant="none"))


def test_calibration_fit_recovers_the_fractions_it_was_made_with():
    req = _req(gpus_per_node=1)
    hw = plan.load_hardware("h100-sxm")
    truth = plan.Calibration(bandwidth_fraction=0.5, flops_fraction=0.3, step_overhead_s=1e-3)
    p = plan.Planner(req, hw, truth, "bfloat16")
    mem, prog = p.memory_of(1, 1, "none"), p.program(1, 1, 1)
    from jaxinfer.runtime import buckets

    rows = []
    for b in (1, 64, 512):
        bb, _, cache = buckets(b, 128, 128, 1, 8192)
        rows.append({"batch": b, "tpot_median_s": p.step_time(mem, prog, 1, bb, 128 + 64, True, 1)})
    report = {"mesh": {"tp": 1}, "prompt_len": 128, "gen_len": 128, "rows": rows}
    got = plan.fit(report, req, hw, "bfloat16", "synthetic")
    for name in ("bandwidth_fraction", "flops_fraction"):
        assert math.isclose(getattr(got, name), getattr(truth, name), rel_tol=0.12), (name, got)


def test_a_measured_overhead_is_kept_and_the_fractions_fitted_around_it():
    """One mesh at two batches cannot tell a fixed cost per step from slower weight reads; given the
    overhead (measured apart), the fit keeps it and finds the fractions the rows were made with."""
    req = _req(gpus_per_node=1)
    hw = plan.load_hardware("h100-sxm")
    truth = plan.Calibration(bandwidth_fraction=0.5, flops_fraction=0.3, step_overhead_s=1e-3)
    p = plan.Planner(req, hw, truth, "bfloat16")
    mem, prog = p.memory_of(1, 1, "none"), p.program(1, 1, 1)
    rows = [{"batch": b, "tpot_median_s": p.step_time(mem, prog, 1, b, 128 + 64, True, 1)} for b in (1, 64, 512)]
    report = {"mesh": {"tp": 1}, "prompt_len": 128, "gen_len": 128, "rows": rows}
    got = plan.fit(report, req, hw, "bfloat16", "synthetic", overhead=1e-3)
    assert got.step_overhead_s == 1e-3
    for name in ("bandwidth_fraction", "flops_fraction"):
        assert math.isclose(getattr(got, name), getattr(truth, name), rel_tol=0.03), (name, got)


def test_cli_plan_json():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    args = ["--model=qwen3-8b", "--gpu=h200", "--gpus_per_node=1", "--isl=512", "--tpot_ms=20", "--quant=fp8"]
    r = subprocess.run(
        [sys.executable, "-m", "jaxinfer", "plan", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"configs", "recommended", "why", "inputs"}
    assert out["inputs"]["gpu"] == "h200" and out["recommended"]["quant"] == "fp8"
    assert [(c["tp"], c["pp"], c["replicas"]) for c in out["configs"]] == [(1, 1, 1)]
    bad = subprocess.run(
        [sys.executable, "-m", "jaxinfer", "plan", "--gpu=v100"], capture_output=True, text=True, env=env, timeout=600
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --gpu='v100' is not in ")


def test_a_config_json_alone_plans_like_the_built_in_shape(tmp_path):
    hf = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    shapes = dict(config_lib.SHAPES)
    mine, builtin = _planner(_req(str(path))), _planner(_req())
    for tp in (1, 4):
        a, b = mine.memory_of(tp, 1, "int8"), builtin.memory_of(tp, 1, "int8")
        assert (a.stacked, a.other, a.kv_per_token) == (b.stacked, b.other, b.kv_per_token)
    assert config_lib.SHAPES == shapes  # prepare took the config itself: nothing registered under a made-up name
    with pytest.raises(JaxinferError, match=r"exceed .*config.json's context of 8192"):
        plan.check_request(_req(str(path), isl=8192))


def test_a_long_prompt_with_a_tight_ttft_takes_sequence_parallelism(tmp_path):
    """A 64k-token prompt on a small model whose 2 heads cap tp at 2, with 4 GPUs per node: splitting
    the prompt over sp as well is the only way to the TTFT asked, and the planner says so; sp rows hold
    the weights whole on every sp rank (fewer tokens/s per GPU) and 1/sp of the KV pool, and an sp x pp
    row 1/pp of both, with the ring inside each stage and the stages' hand-overs between them."""
    hf = {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 1024,
        "max_position_embeddings": 131072,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    req = _req(str(path), gpus_per_node=4, isl=65536, quant="none", ttft_ms=45)
    r = plan.plan(req)
    rows = {(x["tp"], x["pp"], x["sp"]): x for x in r["_rows"]}
    assert set(rows) == {(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (1, 1, 4), (2, 1, 2), (1, 2, 2)}
    rec = r["recommended"]
    assert (rec["tp"], rec["pp"], rec["sp"], rec["gpus_per_replica"]) == (2, 1, 2, 4)
    assert r["why"].startswith("tp=2 pp=1 sp=2 unquantized x 1 replicas")
    assert "splitting each prompt over sp=2 gives a TTFT of " in r["why"]
    one, two = rows[(2, 1, 1)], rows[(2, 1, 2)]
    assert two["ttft_ms"] <= 45 < min(x["ttft_ms"] for x in r["_rows"] if x["sp"] == 1)
    assert rows[(1, 1, 4)]["ttft_ms"] < rows[(1, 1, 2)]["ttft_ms"] < rows[(1, 1, 1)]["ttft_ms"]
    # without the TTFT target tp alone gives more tokens/s per GPU: sp ranks each read the whole weights
    assert one["tokens_per_s_per_gpu"] > two["tokens_per_s_per_gpu"] and not one["meets_targets"]
    # memory: the weights are whole on every sp rank, the page pool is split over sp
    p = _planner(req)
    for tp in (1, 2):
        whole, split = p.memory_of(tp, 1, "none"), p.memory_of(tp, 1, "none", sp=2)
        assert split.weights(1) == whole.weights(1) and split.kv_per_token * 2 == whole.kv_per_token
    assert two["weight_bytes_per_gpu"] == one["weight_bytes_per_gpu"]
    assert two["max_concurrent_seqs"] >= 2 * one["max_concurrent_seqs"]  # 4 GPUs' pool against 2 GPUs'
    # the engine's programs: decode merges the sp ranks' partials with one all-gather per layer; the
    # first chunk's ring passes k and v at each of the sp - 1 steps
    prog = p.program(2, 1, 1, sp=2)
    over_sp = [c for c in prog.decode if c.in_layer and c.axes == frozenset({"sp"})]
    assert [c.kind for c in over_sp] == ["all-gather"] and sum(c.weight for c in over_sp) == 1
    permutes = [c for c in prog.ring if c.in_layer and c.kind == "collective-permute"]
    assert sum(c.weight for c in permutes) == 2 * (2 - 1) and all(c.axes == frozenset({"sp"}) for c in permutes)
    # a later chunk, its tokens split over sp, gathers its q, k and v and returns the partials by one
    # all-to-all per layer, all over sp: inside a node even when the replica's stages span nodes
    later = [c for c in prog.prefill if c.in_layer and c.axes != frozenset({"tp"})]  # tp's all-reduces aside
    assert sorted(c.kind for c in later) == ["all-gather"] * 3 + ["all-to-all"]
    assert all(c.axes == frozenset({"sp"}) and c.size == 2 for c in later)
    assert all(p._link(c.axes, 2) == p._link(frozenset({"tp"}), 2) != p._link(frozenset({"pp"}), 2) for c in later)
    # its matmuls and attention split over sp as the ring chunk's do: the same work per rank, half the
    # unsplit chunk's (a compute-bound chunk deep in the prompt; the head's one token is not split)
    bare = plan.Program(1, [], [], 0, True, ring=[])
    split = p.memory_of(2, 1, "none", sp=2)
    later_s, ring_s = (p.step_time(split, bare, 1, 2048, 65536, False, 1, ring=r) for r in (False, True))
    assert later_s == ring_s
    assert math.isclose(
        later_s, p.step_time(p.memory_of(2, 1, "none"), bare, 1, 2048, 65536, False, 1) / 2, rel_tol=0.02
    )
    assert "sp > 1: searched at every pp, inside a node (tp*ep*sp <= 4" in plan.format_plan(r)
    out = json.loads(plan.to_json(r))
    assert out["recommended"]["sp"] == 2 and {c["sp"] for c in out["configs"]} == {1, 2, 4}
    assert all(c["gpus_per_replica"] == c["tp"] * c["pp"] * c["ep"] * c["sp"] for c in out["configs"])

    # sp x pp: each of the 2 stages holds half the layers' weights and its layers' share of the pool
    staged, flat = rows[(1, 2, 2)], rows[(1, 1, 2)]
    real = prepare(p.cfg, dict(sp=2, pp=2), dtype="bfloat16", random_weights=True, quant="none")
    assert staged["weight_bytes_per_gpu"] == explain.per_device_param_bytes(real) < flat["weight_bytes_per_gpu"]
    kv = explain.pool_bytes_per_token(real)
    assert kv * 2 * 2 == p.memory_of(1, 1, "none").kv_per_token  # 1/sp of the pages, 1/pp of the layers
    assert staged["kv_bytes_per_gpu"] == staged["max_concurrent_seqs"] * kv * (65536 + 256)
    assert staged["max_concurrent_seqs"] >= 2 * flat["max_concurrent_seqs"]
    # one prompt gains nothing from stages (its chunks cross them in turn); over sp it is still faster
    assert flat["ttft_ms"] < staged["ttft_ms"] < rows[(1, 2, 1)]["ttft_ms"]
    # the ring and the split pool's merge inside the stages, as at pp = 1, and the hand-overs between
    # them: a prefill chunk (ring or later) hands on its tokens split over sp, decode its tokens whole
    prog, flat_prog = p.program(1, 1, 2, sp=2), p.program(1, 1, 1, sp=2)
    assert [c for c in prog.ring if "pp" not in c.axes] == flat_prog.ring
    assert [c for c in prog.decode if "pp" not in c.axes] == flat_prog.decode
    permutes = [c for c in prog.ring if c.in_layer and c.kind == "collective-permute"]
    assert sum(c.weight for c in permutes) == 2 and all(c.axes == frozenset({"sp"}) for c in permutes)
    hand = {
        name: [c.bytes_per_token for c in getattr(prog, name) if c.kind == "collective-permute" and "pp" in c.axes]
        for name in ("ring", "prefill", "decode")
    }
    assert hand["ring"] == hand["prefill"] == [hand["decode"][0] / 2]
    assert hand["decode"][0] in (2048 * 2, 2048 * 4)  # one token's hidden state: bf16 (XLA:CPU moves it as f32)


def test_weight_only_fp8_reads_count_the_calibrated_passes(tmp_path):
    """On GPU a decode step's fp8 weights take the weight-only path (quant.FP8_NATIVE_MIN_ROWS), which
    the calibration prices at weight_only_passes reads of their bytes; a long prefill chunk's native fp8
    GEMM keeps one; and stage p of gpu_check recovers the passes from a measured TPOT."""
    import dataclasses

    req = _req(gpus_per_node=1)
    hw = plan.load_hardware("h100-sxm")
    base = plan.Calibration(bandwidth_fraction=0.5, flops_fraction=0.5)
    p = plan.Planner(req, hw, base, "bfloat16")
    mem, prog = p.memory_of(1, 1, "fp8"), p.program(1, 1, 1)
    slow = plan.Planner(req, hw, dataclasses.replace(base, weight_only_passes=(("fp8", 2.0),)), "bfloat16")
    decode = [q.step_time(mem, prog, 1, 1, 192, True, 1) for q in (p, slow)]
    assert 1.8 < decode[1] / decode[0] < 2.0  # the layers' weights are most of a batch-1 step's reads
    prefill = [q.step_time(mem, prog, 1, 2048, 2048, False, 1) for q in (p, slow)]
    assert prefill[0] == prefill[1]
    assert math.isclose(plan.fit_weight_only_passes(p, mem, prog, 1, 192, decode[1]), 2.0, rel_tol=1e-4)
    assert plan.load_calibration("gpu.json").weight_passes("fp8", 1) > 1  # measured on an H200
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps({"weight_only_passes": {"fp9": 2}}))
    with pytest.raises(JaxinferError, match=r"weight_only_passes=\{'fp9': 2\}: expected an object of positive numbers"):
        plan.load_calibration(bad)
