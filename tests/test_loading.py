"""Checkpoint formats: GGUF quantizations, orbax round trips onto other meshes."""

import gguf
import numpy as np

import jaxinfer
from jaxinfer import checkpoint
from tests import tiny
from tests.tiny import IDS, rel_err

# llama.cpp's block formulas, written out here: a block is 32 weights; `d` and `m` are float16.
BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}


def _random_blocks(rng, qtype: str, rows: int, cols: int) -> np.ndarray:
    """Raw bytes [rows, cols / 32 * block bytes] of random blocks (finite float16 scales)."""
    n = rows * cols // 32
    d = rng.normal(0, 0.05, n).astype(np.float16)
    parts = [d.view(np.uint8).reshape(n, 2)]
    if qtype == "Q4_1":
        parts.append(rng.normal(0, 0.5, n).astype(np.float16).view(np.uint8).reshape(n, 2))
    if qtype == "Q8_0":
        parts.append(rng.integers(-128, 128, (n, 32)).astype(np.int8).view(np.uint8))
    else:
        parts.append(rng.integers(0, 256, (n, 16)).astype(np.uint8))
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def _dequantize_by_hand(qtype: str, raw: np.ndarray, cols: int) -> np.ndarray:
    out = np.empty((raw.shape[0], cols), np.float32)
    size = BLOCK_BYTES[qtype]
    for r in range(raw.shape[0]):
        for b in range(cols // 32):
            block = raw[r, b * size : (b + 1) * size]
            d = np.float32(block[:2].view(np.float16)[0])
            if qtype == "Q8_0":  # x = d * q, q int8
                x = d * block[2:].view(np.int8).astype(np.float32)
            else:  # 16 bytes of nibbles: the low nibbles are weights 0..15, the high ones 16..31
                nibbles = block[-16:]
                q = np.concatenate([nibbles & 0x0F, nibbles >> 4]).astype(np.float32)
                if qtype == "Q4_0":  # x = d * (q - 8)
                    x = d * (q - np.float32(8))
                else:  # Q4_1: x = d * q + m
                    x = d * q + np.float32(block[2:4].view(np.float16)[0])
            out[r, b * 32 : (b + 1) * 32] = x
    return out


def _hf_rows_from_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores each q/k head's rows interleaved (rotary pairs side by side): its row
    h * hd + 2 * j + k is Hugging Face's row h * hd + k * hd / 2 + j."""
    hd = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for j in range(hd // 2):
            for k in range(2):
                out[h * hd + k * hd // 2 + j] = w[h * hd + 2 * j + k]
    return out


def test_gguf_tensors_load_by_llama_cpp_block_formulas(tmp_path):
    """Our GGUF reader (checkpoint.open_gguf) on raw blocks we wrote: Q8_0, Q4_0, Q4_1 and F16 tensors
    come back as float32 [out, in] equal to the block formulas, q and k rows in Hugging Face order."""
    rng = np.random.default_rng(0)
    hidden, ffn, vocab, heads, kv_heads = 64, 96, 40, 4, 2
    hd = hidden // heads
    w = gguf.GGUFWriter(str(tmp_path / "blocks.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_vocab_size(vocab)
    # HF name -> (type, rows, cols, heads whose rows llama.cpp interleaves or None)
    tensors = {
        "model.embed_tokens.weight": ("Q8_0", vocab, hidden, None),
        "model.layers.0.self_attn.q_proj.weight": ("Q4_0", hidden, hidden, heads),
        "model.layers.0.self_attn.k_proj.weight": ("Q4_1", kv_heads * hd, hidden, kv_heads),
        "model.layers.0.self_attn.v_proj.weight": ("Q8_0", kv_heads * hd, hidden, None),
        "model.layers.0.mlp.gate_proj.weight": ("Q4_1", ffn, hidden, None),
        "model.layers.0.mlp.down_proj.weight": ("Q4_0", hidden, ffn, None),
        "model.layers.0.mlp.up_proj.weight": ("F16", ffn, hidden, None),
    }
    want = {}
    for name, (qtype, rows, cols, interleaved) in tensors.items():
        if qtype == "F16":
            x = rng.normal(size=(rows, cols)).astype(np.float16)
            w.add_tensor(checkpoint.gguf_name(name), x)
            stored = x.astype(np.float32)
        else:
            raw = _random_blocks(rng, qtype, rows, cols)
            w.add_tensor(checkpoint.gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
            stored = _dequantize_by_hand(qtype, raw, cols)
        want[name] = _hf_rows_from_llama_cpp(stored, interleaved) if interleaved else stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    source = checkpoint.open_gguf(tmp_path / "blocks.gguf")
    assert (source.config.num_heads, source.config.num_kv_heads, source.config.head_dim) == (heads, kv_heads, hd)
    for name, expected in want.items():
        got = source.read(name)
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    # The hand formulas themselves, on one block each: d = 0.5 (m = -1), byte 0 = 0x2F, int8 q[0] = -3.
    half, minus_one = np.float16([0.5]).view(np.uint8), np.float16([-1]).view(np.uint8)
    nibbles = np.array([0x2F] + [0x88] * 15, np.uint8)
    q4_0 = _dequantize_by_hand("Q4_0", np.concatenate([half, nibbles])[None], 32)[0]
    q4_1 = _dequantize_by_hand("Q4_1", np.concatenate([half, minus_one, nibbles])[None], 32)[0]
    q8_0 = _dequantize_by_hand("Q8_0", np.concatenate([half, np.int8([-3] * 32).view(np.uint8)])[None], 32)[0]
    assert (q4_0[0], q4_0[16], q4_0[1]) == (0.5 * (15 - 8), 0.5 * (2 - 8), 0.0)
    assert (q4_1[0], q4_1[16], q4_1[1]) == (0.5 * 15 - 1, 0.5 * 2 - 1, 0.5 * 8 - 1)
    assert q8_0[0] == -1.5


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
