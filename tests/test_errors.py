"""Each bad input raises one JaxinferError naming the value and the fix, before any device work."""

import json
import shutil

import pytest

import jaxinfer
from jaxinfer import JaxinferError
from tests import tiny


@pytest.fixture
def llama_copy(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir("llama2"), tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_mesh_larger_than_devices(tiny_dir):
    with pytest.raises(JaxinferError, match=r"needs 16 devices but 8 cpu devices exist.*device_count=16"):
        jaxinfer.LLM(str(tiny_dir("llama2")), tp=16)


def test_bad_axis_size_and_unknown_preset(tiny_dir):
    with pytest.raises(JaxinferError, match=r"tp=0 must be a positive integer"):
        jaxinfer.LLM(str(tiny_dir("llama2")), tp=0)
    with pytest.raises(JaxinferError, match=r"mesh preset 'nope'.*known: .*tp4"):
        jaxinfer.LLM(str(tiny_dir("llama2")), mesh="nope")


def test_heads_not_divisible_by_tp(tiny_dir):
    with pytest.raises(JaxinferError, match=r"num_attention_heads=8 is not divisible by tp=3"):
        jaxinfer.LLM(str(tiny_dir("llama2")), tp=3)


def test_unknown_architecture(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JaxinferError, match=r"unknown architecture model_type='gpt_neox'; supported: llama"):
        jaxinfer.LLM(str(llama_copy))


def test_missing_config_and_missing_path(tmp_path):
    with pytest.raises(JaxinferError, match=r"has no config.json"):
        jaxinfer.LLM(str(tmp_path))
    with pytest.raises(JaxinferError, match=r"no such path exists"):
        jaxinfer.LLM(str(tmp_path / "absent"))


def test_truncated_and_corrupt_safetensors(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JaxinferError, match=r"model.safetensors is truncated"):
        jaxinfer.LLM(str(llama_copy))
    path.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(JaxinferError, match=r"model.safetensors is corrupt"):
        jaxinfer.LLM(str(llama_copy))


def test_truncated_gguf(tiny_dir, tmp_path):
    path = tiny.write_gguf(tiny_dir("llama2"), tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(JaxinferError, match=r"m.gguf"):
        jaxinfer.LLM(str(path))
    path.write_bytes(data[:100])
    with pytest.raises(JaxinferError, match=r"not a readable GGUF file"):
        jaxinfer.LLM(str(path))


def test_missing_tensor_is_named(llama_copy):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(llama_copy / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(JaxinferError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        jaxinfer.LLM(str(llama_copy))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k=-1 must be an integer >= 0"),
        (dict(max_tokens=0), r"max_tokens=0 must be an integer >= 1"),
    ],
)
def test_invalid_sampling_parameters(kwargs, match):
    with pytest.raises(JaxinferError, match=match):
        jaxinfer.SamplingParams(**kwargs)


def test_prompt_longer_than_context_and_ids_outside_vocab(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("llama2")), max_seq_len=32)
    with pytest.raises(JaxinferError, match=r"prompt 0 has 40 tokens, longer than the context.*max_seq_len=32"):
        llm.generate([list(range(40))])
    with pytest.raises(JaxinferError, match=r"token id 256 outside the vocabulary \[0, 256\)"):
        llm.generate([[1, 2, 256]])
    with pytest.raises(JaxinferError, match=r"no tokenizer files; pass prompts as token-id lists"):
        llm.generate("hello")
    with pytest.raises(JaxinferError, match=r"max_seq_len=1000 must be in \[2, 256\]"):
        jaxinfer.LLM(str(tiny_dir("llama2")), max_seq_len=1000)


def test_unknown_generate_argument():
    with pytest.raises(JaxinferError, match=r"unknown arguments \['temprature'\]"):
        jaxinfer.generate("hi", temprature=0.5)
