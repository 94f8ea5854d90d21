"""explain's figures against the compiled HLO and against a real load; bench's bookkeeping."""

import re

import numpy as np
import pytest

import jaxinfer
from jaxinfer import bench, checkpoint, explain, hlo, steps
from jaxinfer.runtime import buckets
from jaxinfer.sampling import SamplingParams


def test_llama3_70b_tp8_decode_shows_two_16k_all_reduces_per_layer(monkeypatch):
    texts = []
    report = explain.step_report

    def keep_text(compiled, *args):  # the very programs explain analyses
        texts.append(compiled.as_text())
        return report(compiled, *args)

    monkeypatch.setattr(explain, "step_report", keep_text)
    r = explain.explain("llama3-70b", dict(tp=8), dtype="bfloat16", batch=1, prompt_len=128)
    assert len(texts) == 2  # prefill, decode
    decode_text = texts[1]
    d = 8192
    ar = r["steps"]["decode"]["collectives"]["all-reduce"]
    assert ar["per_layer_count"] == 2 and ar["per_layer_bytes"] == 2 * d * 2  # 2 x (B x D x 2 bytes)
    # Counted here from the HLO text, apart from jaxinfer/hlo.py: every all-reduce instruction, told
    # apart by the jax op that made it. Those in the layer scan (a while nested in the decode loop)
    # run 80 times; the others once per step.
    ops = [
        (m.group(1), m.group(2))
        for m in re.finditer(r"= (\w+\[[\d,]*\])\S* all-reduce(?:-start)?\(.*op_name=\"([^\"]+)\"", decode_text)
    ]
    # XLA:CPU widens the bf16 sums of [B, 1, D] activations to f32; a GPU keeps them bf16.
    ops = [(re.sub(r"^bf16(?=\[1,1,8192\])", "f32", shape), op) for shape, op in ops]
    layer = [(shape, op) for shape, op in ops if "/while/body/closed_call/while/body/" in op]
    outside = sorted(
        (shape, op.rsplit("/", 2)[-2] + "/" + op.rsplit("/", 1)[-1]) for shape, op in ops if (shape, op) not in layer
    )
    assert decode_text.count('"known_trip_count":{"n":"80"}') == 1
    # Per layer: the attention output projection and the MLP down projection, each summing [B, 1, D].
    assert sorted((shape, op.split("/closed_call/")[-1].split("/")[0]) for shape, op in layer) == [
        (f"f32[1,1,{d}]", "attn"),
        (f"f32[1,1,{d}]", "mlp"),
    ]
    # Outside the layers: the vocab-sharded embedding lookup sums the shards' rows (B x D); the chosen
    # token's log-probability sums over the vocabulary shards; the greedy token is the first index
    # holding the largest logit, one int32 min over the shards (no gather of the shards' candidates).
    assert outside == [
        (f"f32[1,1,{d}]", "jit(_take)/gather"),
        ("f32[1,1]", "jit(take_along_axis)/gather"),
        ("f32[1]", "jit(log_softmax)/reduce_sum"),
        ("s32[1]", "closed_call/reduce_min"),
    ]
    # The largest logit over the shards (log_softmax's and the greedy pick's) goes as one all-reduce of a
    # tuple, which the pattern above does not match.
    assert len(re.findall(r"= \(f32\[1\]\{0\}, f32\[1\]\{0\}\) all-reduce", decode_text)) == 1
    assert ar["count"] == 2 * 80 + len(outside) + 1 == 165
    assert ar["bytes"] == 80 * 2 * d * 2 + d * 2 + 5 * 4
    assert set(r["steps"]["decode"]["collectives"]) == {"all-reduce"}
    per_device = r["per_device"]["param_bytes"]
    total = r["total"]["param_bytes"]
    norms = (2 * 80 + 1) * d * 2  # replicated
    assert per_device == (total - norms) // 8 + norms


def test_counts_and_bytes_equal_the_compiled_hlo(tiny_dir):
    path = str(tiny_dir("llama3"))
    r = explain.explain(path, dict(tp=4), batch=2, prompt_len=8, gen_len=8)
    llm = jaxinfer.LLM(path, tp=4)
    cfg = llm.config
    cache = llm._cache(2, r["shapes"]["cache_len"])
    sampling, _ = llm.setup.sampling_arrays(SamplingParams(temperature=0), 2, 2)
    col = llm.setup.put(np.zeros(2, np.int32))
    text = (
        steps.decode.lower(llm.graphdef, llm.state, cache, col, col, sampling, n_steps=1, greedy_only=True)
        .compile()
        .as_text()
    )
    body = [name for name, n in hlo.loop_trip_counts(text).items() if n == cfg.num_layers]
    want: dict[str, list[int]] = {}
    for c in hlo.collectives(text):
        times = cfg.num_layers if c.computation in body else 1
        count_bytes = want.setdefault(c.kind, [0, 0])
        count_bytes[0] += times
        count_bytes[1] += times * c.bytes
    got = {k: [v["count"], v["bytes"]] for k, v in r["steps"]["decode"]["collectives"].items()}
    assert got == want
    assert r["steps"]["decode"]["collectives"]["all-reduce"]["per_layer_bytes"] == 2 * 2 * cfg.hidden_size * 4


def test_per_device_memory_matches_a_real_load(tiny_dir):
    path = str(tiny_dir("smollm2"))
    r = explain.explain(path, dict(tp=4), batch=4, prompt_len=20, gen_len=12)
    llm = jaxinfer.LLM(path, tp=4)
    cache = llm._cache(4, r["shapes"]["cache_len"])
    for device in llm.mesh.devices.flat:
        params = sum(s.data.nbytes for a in llm.params.values() for s in a.addressable_shards if s.device == device)
        kv = sum(s.data.nbytes for a in cache for s in a.addressable_shards if s.device == device)
        assert abs(params - r["per_device"]["param_bytes"]) <= 0.05 * params
        assert abs(kv - r["per_device"]["kv_cache_bytes"]) <= 0.05 * kv
    # XLA's own account of the decode step's inputs: parameters, cache and a few small arrays.
    args = r["steps"]["decode"]["argument_bytes"]
    want = r["per_device"]["param_bytes"] + r["per_device"]["kv_cache_bytes"]
    assert abs(args - want) <= 0.05 * want


def test_bench_counts_the_bytes_a_decode_step_really_reads(tiny_dir):
    """bytes_read per decode step, counted independently from the arrays on the device: every weight
    shard there, less the embedding rows no token looks up (llama2 is untied), plus the KV cache."""
    path = str(tiny_dir("llama2"))
    llm = jaxinfer.LLM(path)
    report = bench.run(llm, [1, 3], prompt_len=6, gen_len=9)
    assert [row["batch"] for row in report["rows"]] == [1, 3]
    device = llm.mesh.devices.flat[0]
    on_device = sum(s.data.nbytes for a in llm.params.values() for s in a.addressable_shards if s.device == device)
    table = llm.params["embed"].nbytes
    vocab = llm.config.vocab_size
    for row in report["rows"]:
        b, _, cache_len = buckets(row["batch"], 6, 9, 1, llm.max_seq_len)
        cache = llm._cache(b, cache_len)
        kv = sum(x.nbytes for x in cache)
        assert row["bytes_read_per_step"] == pytest.approx(on_device - table + table * b / vocab + kv, rel=1e-9)
        r = explain.explain(path, dict(tp=1), batch=row["batch"], prompt_len=6, gen_len=9)
        assert row["bytes_read_per_step"] == r["steps"]["decode"]["bytes_read"]
        assert 0 < row["mbu"] < 2  # a measured time: bounded, not recomputed
    assert set(report["versions"]) == {"jax", "jaxlib", "flax", "orbax-checkpoint"}


def test_pipeline_figures():
    r = explain.explain("llama3-8b", dict(pp=4, tp=2), dtype="float32", batch=8, prompt_len=64)
    p = r["pipeline"]
    assert p["stages"] == 4 and p["layers_per_stage"] == 8
    # a decode batch of 8 rows runs as one micro-batch (pipeline.MIN_MICROBATCH_ROWS); the prefill's
    # 8 x 64 tokens in two of 256
    assert p["microbatches"] == {"prefill": 2, "decode": 1} and p["bubble_fraction"]["decode"] == 3 / 4
    # every hand-over is one micro-batch's [8, 1, 4096] fp32 activations: no weights cross stages
    assert p["boundary_bytes_per_step"]["decode"] == (1 + 4 - 2) * 8 * 4096 * 4
    # each stage holds a quarter of the layers (split again over tp); embedding and head sit on every stage
    vocab = 2 * 128256 * 4096 * 4
    want = (r["total"]["param_bytes"] - vocab) / 8 + vocab / 2
    assert abs(r["per_device"]["param_bytes"] - want) < 0.01 * want
    # bf16 stages compile on CPU too (their final sum runs widened there); XLA:CPU computes bf16 in f32
    # and may hand the activations over in either width
    r16 = explain.explain("llama3-8b", dict(pp=4, tp=2), dtype="bfloat16", batch=8, prompt_len=64)
    assert r16["pipeline"]["boundary_bytes_per_step"]["decode"] in [(1 + 4 - 2) * 8 * 4096 * w for w in (2, 4)]


def test_a_step_reads_one_embedding_row_per_token_unless_the_table_is_the_head(tiny_dir):
    from jaxinfer.runtime import prepare

    untied = prepare(str(tiny_dir("llama2")), dict(tp=1))
    whole = explain.per_device_param_bytes(untied)
    table = explain.per_device_param_bytes(untied, ("embed",))
    vocab = untied.config.vocab_size
    assert table == vocab * untied.config.hidden_size * 4
    assert explain.step_param_bytes(untied, 3) == whole - table + table * 3 / vocab
    assert explain.step_param_bytes(untied, 10 * vocab) == whole
    tied = prepare(str(tiny_dir("smollm2")), dict(tp=1))
    assert explain.step_param_bytes(tied, 1) == explain.per_device_param_bytes(tied)


def test_bench_and_explain_say_which_implementation_ran(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("llama2")), max_seq_len=32)
    report = bench.run(llm, [1], prompt_len=4, gen_len=4)
    assert report["kernels"]["engine decode attention"].startswith("xla (head_dim 8 is not a power of two")
    assert "engine decode attention: xla (head_dim 8" in bench.format_table(report)


def test_sequence_parallel_prefill_activations_fall_with_sp_and_the_ring_is_counted():
    """A 4k-token prefill of the embedded model's shapes: XLA's temporary bytes per device fall on sp=4,
    the part that grows with the prompt close to 1/sp, and the ring's collective-permutes (k and v at
    each of the sp - 1 steps) are read from the compiled HLO. What does not grow with the prompt (the
    same program's temporaries for 64 tokens: XLA:CPU's copy of one layer's weights in the layer loop)
    is the same on both."""
    one = explain.explain("smollm2-135m", {}, prompt_len=4096, gen_len=16)
    four = explain.explain("smollm2-135m", dict(sp=4), prompt_len=4096, gen_len=16)
    a1, a4 = one["per_device"]["prefill_activation_bytes"], four["per_device"]["prefill_activation_bytes"]
    f1, f4 = (
        explain.explain("smollm2-135m", axes, prompt_len=64, gen_len=16)["per_device"]["prefill_activation_bytes"]
        for axes in ({}, dict(sp=4))
    )
    assert a4 < a1 / 2 and a4 - f4 < 0.4 * (a1 - f1), (a1, a4, f1, f4)  # measured: 92 and 41 MiB, 14 fixed
    assert "ring" not in one
    assert four["ring"]["collective_permutes_per_layer"] == 2 * (4 - 1)
    # each permute passes one rank's K (or V) block: 1024 tokens x kv heads x head_dim floats
    cfg = checkpoint.open_gguf(checkpoint.builtin_path("smollm2-135m")).config
    block = 1024 * cfg.num_kv_heads * cfg.head_dim * 4
    assert four["ring"]["bytes_per_layer"] == 2 * (4 - 1) * block
    assert four["steps"]["prefill"]["flops"] == pytest.approx(one["steps"]["prefill"]["flops"] / 4)
    assert "ring attention over sp=4: 6 collective-permutes per layer" in explain.format_report(four)


def test_bench_prefill_sweep_measures_each_sp_and_prompt_length(tiny_dir):
    path = str(tiny_dir("llama3"))
    r = bench.prefill_sweep(lambda sp: jaxinfer.LLM(path, sp=sp, max_seq_len=256), [1, 2], [64, 200], reps=1)
    assert [(x["sp"], x["prompt_len"]) for x in r["rows"]] == [(1, 64), (1, 200), (2, 64), (2, 200)]
    assert all(x["prefill_s"] > 0 and x["temp_bytes_per_device"] > 0 for x in r["rows"])
    table = bench.format_prefill_sweep(r)
    assert table.count("\n| 2 | ") == 2 and "XLA temp bytes per device" in table
