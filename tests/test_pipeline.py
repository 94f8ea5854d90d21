"""Pipeline parallelism: stages over `pp` give the single-device tokens and logits, and only
activation-sized boundary transfers cross stages."""

import re

import numpy as np
import pytest

import jaxinfer
from jaxinfer import JaxinferError, hlo, pipeline, steps
from tests.tiny import IDS, SMALL_ENGINE, rel_err

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Paris is the capital of"]


@pytest.fixture(scope="module")
def single(smollm2):
    one = jaxinfer.LLM("smollm2-135m", **SMALL_ENGINE)
    params = jaxinfer.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ids = one.tokenizer.encode(PROMPTS[0])
    return one.score(ids), [o.token_ids for o in one.generate(PROMPTS, params)], ids, params


# pp_microbatch_rows=1 cuts the 3 prompts into micro-batches of one (by default a batch this small runs whole)
MICRO = dict(pp_microbatch_rows=1)


@pytest.mark.parametrize("axes", [dict(pp=2), dict(pp=3, **MICRO), dict(pp=5), dict(pp=2, tp=3, **MICRO)], ids=str)
def test_real_model_stages_equal_one_device(single, axes):
    logits, tokens, ids, params = single
    llm = jaxinfer.LLM("smollm2-135m", **axes, **SMALL_ENGINE)
    assert rel_err(llm.score(ids), logits) < 1e-4
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == tokens  # engine, paged cache
    assert [o.token_ids for o in llm.generate_static(PROMPTS, params)] == tokens


def test_each_stage_holds_only_its_layers_and_stages_pass_only_activations(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("llama3")), pp=3, tp=2, **MICRO)  # 3 layers, one per stage
    cfg = llm.config
    wq = llm.params["wq"]
    assert {s.data.shape[0] for s in wq.addressable_shards} == {1}
    batch = 4
    cache = llm._cache(batch, 32)
    sampling, _ = llm.setup.sampling_arrays(jaxinfer.SamplingParams(temperature=0), batch, batch)
    col = llm.setup.put(np.zeros(batch, np.int32))
    text = (
        steps.decode.lower(llm.graphdef, llm.state, cache, col, col, sampling, n_steps=1, greedy_only=True)
        .compile()
        .as_text()
    )
    ops = hlo.collectives(text)
    permutes = [c for c in ops if c.kind == "collective-permute"]
    micro = pipeline.microbatch_count(batch, 3, 1)
    activation = batch // micro * cfg.hidden_size * 4  # one micro-batch's [mb, 1, D] in fp32
    assert permutes and all(c.bytes == activation for c in permutes)
    assert len(permutes) == micro + 3 - 2  # one hand-over after every tick but the last
    smallest_weight = cfg.hidden_size * cfg.head_dim
    assert all(c.bytes < smallest_weight for c in ops if c.kind == "all-gather")


@pytest.mark.parametrize("unroll", [True, False])
def test_stages_read_their_layers_in_place_unless_scanned(tiny_dir, unroll):
    """By default each stage holds its layers as separate buffers (runtime.unstack) and the decode step
    copies no layer's weights; in lax.scan (unroll_layers=False) XLA copies them out of the stack."""
    llm = jaxinfer.LLM(str(tiny_dir("llama3", num_hidden_layers=6)), pp=3, tp=2, unroll_layers=unroll)
    wq = llm.state["params"]["wq"].get_value()
    if unroll:  # 2 arrays of [3 stages, ...], each device holding its stage's one layer
        assert len(wq) == 2 and all({s.data.shape[0] for s in w.addressable_shards} == {1} for w in wq)
    np.testing.assert_array_equal(
        np.asarray(llm.params["wq"]),
        np.asarray(jaxinfer.LLM(str(tiny_dir("llama3", num_hidden_layers=6))).params["wq"]),
    )
    layer = {
        "f32[" + ",".join(map(str, llm.params[n].addressable_shards[0].data.shape[1:])) + "]" for n in llm.setup.stacked
    }
    batch = 4
    sampling, _ = llm.setup.sampling_arrays(jaxinfer.SamplingParams(temperature=0), batch, batch)
    col = llm.setup.put(np.zeros(batch, np.int32))
    args = (llm.graphdef, llm.state, llm._cache(batch, 32), col, col, sampling)
    text = steps.decode.lower(*args, n_steps=1, greedy_only=True).compile().as_text()
    op = r"= (f32\[[0-9,]*\])\{[^}]*\} (dynamic-slice|slice|copy|fusion)\("
    copies = [m.group(1) for m in (re.search(op, line) for line in text.splitlines()) if m and m.group(1) in layer]
    assert (not copies) if unroll else copies


def test_schedule_figures_and_uneven_stages():
    assert pipeline.microbatch_count(6, 4, 1) == 3 and pipeline.microbatch_count(1, 4, 1) == 1
    # by default a micro-batch holds at least 256 rows: smaller batches run whole
    assert [pipeline.microbatch_count(b, 4) for b in (64, 511, 512, 768, 1024)] == [1, 1, 2, 3, 4]
    assert pipeline.microbatch_count(8, 4, tokens=64) == 2  # a prefill of 8 x 64 tokens: micro-batches of 256
    with pytest.raises(JaxinferError, match=r"pp_microbatch_rows=0 must be a positive integer"):
        jaxinfer.LLM("smollm2-135m", pp=2, pp_microbatch_rows=0)
    assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    with pytest.raises(JaxinferError, match=r"num_hidden_layers=30 is not divisible by pp=4.*\[1, 2, 3, 5, 6"):
        jaxinfer.LLM("smollm2-135m", pp=4)


def test_pipeline_with_tiny_checkpoint_equals_transformers(tiny_dir):
    from tests import tiny

    path = tiny_dir("qwen2")
    llm = jaxinfer.LLM(str(path), pp=3)
    assert rel_err(llm.score(IDS), tiny.hf_logits(path, IDS)) < 1e-4
