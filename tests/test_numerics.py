"""Logits and greedy tokens equal transformers' on the same weights, for every architecture and mesh."""

import pytest

import jaxinfer
from tests import tiny
from tests.tiny import IDS, rel_err


@pytest.mark.parametrize("tp", [1, 2, 4], ids=lambda tp: f"tp{tp}")
@pytest.mark.parametrize("arch", sorted(tiny.ARCHS))
def test_logits_equal_transformers(tiny_dir, arch, tp):
    path = tiny_dir(arch)
    ref = tiny.hf_logits(path, IDS)
    llm = jaxinfer.LLM(str(path), tp=tp)
    assert rel_err(llm.score(IDS), ref) < 1e-4


def test_transformers4_config_layout(tiny_dir, tmp_path):
    import shutil

    src = tiny_dir("llama3")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    tiny.to_transformers4_config(tmp_path)
    llm = jaxinfer.LLM(str(tmp_path))
    assert llm.config.rope_scaling.rope_type == "llama3"
    assert rel_err(llm.score(IDS), tiny.hf_logits(src, IDS)) < 1e-4


def test_sharded_safetensors_index(tiny_dir, tmp_path):
    import torch
    import transformers

    src = tiny_dir("qwen3")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    llm = jaxinfer.LLM(str(tmp_path), tp=2)
    assert rel_err(llm.score(IDS), tiny.hf_logits(src, IDS)) < 1e-4


@pytest.mark.parametrize("arch,tp", [("llama3", 2), ("mistral", 1), ("qwen2", 4)])
def test_batched_greedy_equals_transformers(tiny_dir, arch, tp):
    import torch
    import transformers

    path = tiny_dir(arch)
    prompts = [IDS[:3], IDS[:11], IDS[4:9], IDS[2:20]]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = [tiny.hf_greedy(model, p, 12) for p in prompts]
    llm = jaxinfer.LLM(str(path), tp=tp)
    outs = llm.generate(prompts, jaxinfer.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)


def test_dp_tp_mesh_equals_single_device(tiny_dir):
    path = str(tiny_dir("llama3"))
    prompts = [IDS[:5], IDS[:9], IDS[3:7]]
    params = jaxinfer.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    one = jaxinfer.LLM(path).generate(prompts, params)
    many = jaxinfer.LLM(path, dp=2, tp=4)
    assert [o.token_ids for o in many.generate(prompts, params)] == [o.token_ids for o in one]
    assert many.generate(prompts[1:2], params)[0].token_ids == one[1].token_ids  # one request on two dp shards
