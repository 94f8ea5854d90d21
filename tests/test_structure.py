"""Sharding as the design promises it, read from the compiled HLO and the placed arrays."""

import numpy as np
import pytest

import jaxinfer
from jaxinfer import hlo, steps


def _decode_hlo(llm, batch=1, cache_len=64, n_steps=1):
    cache = llm._cache(batch, cache_len)
    sampling, _ = llm.setup.sampling_arrays(jaxinfer.SamplingParams(temperature=0), batch, batch)
    zeros = llm._put(np.zeros(batch, np.int32))
    lowered = steps.decode.lower(
        llm.graphdef, llm.state, cache, zeros, zeros, sampling, n_steps=n_steps, greedy_only=True
    )
    return lowered.compile().as_text()


@pytest.mark.parametrize("unroll", [False, True])
def test_decode_has_two_all_reduces_per_layer_and_gathers_no_weights(tiny_dir, unroll):
    llm = jaxinfer.LLM(str(tiny_dir("llama3")), tp=4, unroll_layers=unroll)
    cfg = llm.config
    text = _decode_hlo(llm)
    ops = hlo.collectives(text)
    activation = 1 * cfg.hidden_size * 4  # [B, 1, D] fp32
    if unroll:
        in_layer = [c for c in ops if c.kind == "all-reduce" and c.bytes == activation]
        assert len(in_layer) == 2 * cfg.num_layers + 1  # and one for the vocab-sharded embedding lookup
        outside = [c for c in ops if c not in in_layer]
    else:
        layer_bodies = [b for b, n in hlo.loop_trip_counts(text).items() if n == cfg.num_layers]
        in_layer = [c for c in ops if c.computation in layer_bodies]
        assert [c.kind for c in in_layer] == ["all-reduce", "all-reduce"]
        assert all(c.bytes == activation for c in in_layer)
        outside = [c for c in ops if c.computation not in layer_bodies]
    assert len(outside) <= 8  # embedding lookup, vocab-sharded argmax and logprob
    smallest_weight = cfg.hidden_size * cfg.head_dim  # any weight matrix has at least this many elements
    assert all(c.bytes < smallest_weight for c in ops if c.kind == "all-gather")
    assert not [c for c in ops if c.kind in ("all-to-all", "reduce-scatter", "collective-permute")]


def test_per_device_parameter_bytes_are_total_over_tp(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("llama3")), tp=4)
    total = sum(a.nbytes for a in llm.params.values())
    replicated = sum(a.nbytes for name, a in llm.params.items() if "norm" in name)
    for device in llm.mesh.devices.flat:
        local = sum(s.data.nbytes for a in llm.params.values() for s in a.addressable_shards if s.device == device)
        assert local == (total - replicated) // 4 + replicated


def test_kv_heads_fewer_than_tp_are_replicated_per_shard(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("smollm2")), tp=4)  # 2 kv heads on tp=4
    assert llm.cache_kv_heads == 4
    cache = llm._cache(1, 32)
    assert {s.data.shape[2] for s in cache.k.addressable_shards} == {1}
    assert llm.params["wkv"].sharding.spec[3] is None  # [layers, embed, 2, kv_heads, head_dim]
