"""Checkpoint formats: GGUF quantizations, orbax round trips onto other meshes."""

import gguf
import numpy as np
import pytest

import jaxinfer
from jaxinfer import checkpoint
from tests import tiny
from tests.test_numerics import IDS, rel_err


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "BF16", "F16"])
def test_dequantization_follows_llama_cpp_block_formulas(qtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(x, t) if qtype not in ("F16",) else x.astype(np.float16)
    got = gguf.quants.dequantize(raw, t) if qtype != "F16" else raw.astype(np.float32)
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[t][1]) if qtype not in ("F16", "BF16") else None
    if qtype == "Q8_0":  # 2-byte fp16 scale, 32 int8
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        want = d * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif qtype in ("Q4_0", "Q4_1"):  # scale (and min), then 16 bytes of nibbles: low nibbles first
        off = 2 if qtype == "Q4_0" else 4
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([blocks[:, off:] & 0xF, blocks[:, off:] >> 4], axis=1).astype(np.float32)
        if qtype == "Q4_0":
            want = d * (q - 8)
        else:
            m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            want = d * q + m
    elif qtype == "BF16":
        want = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        want = raw.astype(np.float32)
    np.testing.assert_array_equal(got.reshape(-1), want.reshape(-1))
    assert np.abs(got.reshape(x.shape) - x).max() < (0.2 if qtype.startswith("Q4") else 0.02)


def test_quantized_gguf_equals_transformers(tiny_dir, tmp_path):
    import torch
    import transformers

    path = tiny.write_gguf(tiny_dir("llama2"), tmp_path / "tiny.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    for tp in (1, 2):
        llm = jaxinfer.LLM(str(path), tp=tp)
        assert llm.tokenizer is None
        assert rel_err(llm.score(IDS), ref) < 1e-4


def test_orbax_checkpoint_loads_onto_other_meshes(tiny_dir, tmp_path):
    src = tiny_dir("qwen3")
    ref = tiny.hf_logits(src, IDS)
    llm = jaxinfer.LLM(str(src), tp=2)
    checkpoint.save_orbax(tmp_path / "ckpt", llm.config, llm.params, llm.tokenizer)
    for tp in (1, 4):
        restored = jaxinfer.LLM(str(tmp_path / "ckpt"), tp=tp)
        assert restored.mesh.shape["tp"] == tp and restored.params["wq"].sharding.spec[2] == "tp"
        assert rel_err(restored.score(IDS), ref) < 1e-4


def test_loading_reads_only_each_devices_shard(tiny_dir, monkeypatch):
    reads = []
    original = checkpoint.read_shard

    def spy(w, read, layer, index):
        out = original(w, read, layer, index)
        reads.append((w.hf, out.size))
        return out

    monkeypatch.setattr(checkpoint, "read_shard", spy)
    llm = jaxinfer.LLM(str(tiny_dir("llama2")), tp=4)
    cfg = llm.config
    q_reads = [n for name, n in reads if "q_proj" in name]
    assert q_reads and all(n == cfg.hidden_size * cfg.num_heads * cfg.head_dim // 4 for n in q_reads)
