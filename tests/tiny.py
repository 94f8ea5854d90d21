"""Random-weight transformers checkpoints of every supported architecture, for numerics tests."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

# A prompt of token ids inside every tiny vocabulary (256), shared by the numerics tests.
IDS = [3, 17, 250, 42, 8, 99, 120, 5, 64, 77, 31, 200, 9, 11, 150, 6, 72, 33, 18, 240]


def rel_err(a, b) -> float:
    """Largest absolute difference, relative to the largest magnitude of the reference `b`."""
    return float(np.abs(a - b).max() / np.abs(b).max())


# The real model's engine sized for the tests' short prompts: a default pool takes a share of the
# host's memory per simulated device, and the suite keeps several models alive at once.
SMALL_ENGINE = dict(max_seq_len=512, max_num_seqs=4)

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    max_position_embeddings=256,
    initializer_range=0.15,
    rms_norm_eps=1e-5,
)

# name -> (transformers config class, its arguments): every switch of models/llama.py appears.
ARCHS = {
    # Llama 2: multi-head attention, untied head.
    "llama2": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=8, head_dim=8)),
    # Llama 3.1: GQA with llama3 rope scaling.
    "llama3": (
        "LlamaConfig",
        dict(
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=8,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    # Llama 3.2 / SmolLM2: tied embeddings, two kv heads (replicated when tp > 2).
    "smollm2": (
        "LlamaConfig",
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
    ),
    # Mistral: GQA with a sliding window shorter than the test sequences.
    "mistral": ("MistralConfig", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=8)),
    # Qwen2: q/k/v bias, multi-query attention.
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16)),
    # Qwen3: per-head q/k RMSNorm, head_dim independent of hidden size.
    "qwen3": ("Qwen3Config", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32)),
}

# Mixture-of-experts checkpoints: 8 experts so that ep runs up to 8.
MOE_ARCHS = {
    # Mixtral: every layer routed, softmax top-2 renormalised, `num_local_experts`.
    "mixtral": (
        "MixtralConfig",
        dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, num_local_experts=8, num_experts_per_tok=2),
    ),
    # Qwen3-MoE: top-3 of 8 without renormalisation, layer 1 a dense MLP, its own expert hidden size.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=48,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    ),
}


def build(arch: str, directory: Path, **overrides) -> Path:
    """A random-weight checkpoint of `arch` in `directory`; `overrides` replace entries of its config
    (max_position_embeddings=4096 for the long-prompt tests: the weights do not depend on it)."""
    import torch
    import transformers

    cls, kwargs = {**ARCHS, **MOE_ARCHS}[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(**{**COMMON, **kwargs, **overrides})
    model = getattr(transformers, cls.replace("Config", "ForCausalLM"))(cfg)
    if arch == "qwen2":  # biases start at zero; make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.3)
    model.save_pretrained(directory)
    return directory


def hf_logits(directory: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def hf_from_gguf(path: Path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return tok, model


def to_transformers4_config(directory: Path) -> None:
    """Rewrites config.json in the transformers 4.x layout (top-level rope_theta / rope_scaling)."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    path.write_text(json.dumps(cfg))


# GGUF tensor types exercised by write_gguf, one per kind of weight.
GGUF_TYPES = {
    "token_embd": "Q8_0",
    "attn_q": "Q4_0",
    "attn_k": "Q4_1",
    "attn_v": "F16",
    "attn_output": "BF16",
    "ffn_gate": "Q8_0",
    "ffn_up": "Q4_1",
    "ffn_down": "Q4_0",
    "output": "F32",
}


def write_gguf(hf_dir: Path, path: Path) -> Path:
    """Writes a transformers Llama checkpoint as GGUF the way llama.cpp's converter does (q/k rows
    permuted for interleaved rotary), quantizing each kind of weight to a different type."""
    return _write_gguf(
        hf_dir, path, lambda hf, name, x: GGUF_TYPES.get(name.split(".")[-2], "F32") if x.ndim == 2 else "F32"
    )


def _write_gguf(hf_dir: Path, path: Path, qtype_of) -> Path:
    """The checkpoint in `hf_dir` as a llama GGUF file, each tensor in the GGML type
    qtype_of(hf_name, gguf_name, array) names (q/k rows permuted as llama.cpp's converter does)."""
    import gguf

    from jaxinfer import checkpoint

    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    for hf_name, x in load_safetensors(hf_dir).items():
        name = checkpoint.gguf_name(hf_name)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in name else kv
            x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        qtype = gguf.GGMLQuantizationType[qtype_of(hf_name, name, x)]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, x.astype(np.float32 if qtype.name == "F32" else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_COMPILES = [0]


def _count_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def compiles() -> int:
    """Programs XLA has compiled in this process so far (every jit, not only our steps)."""
    return _COMPILES[0]


jax.monitoring.register_event_duration_secs_listener(_count_compile)


# --- quantized checkpoints (tests/test_quant_checkpoints.py) ---------------------------------------

# A Llama whose every linear dimension is a multiple of 128, so that fp8 blocks and int4 groups of 128 tile it.
Q128 = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=256,
    initializer_range=0.15,
    rms_norm_eps=1e-5,
)
QUANT_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "int8": "I8",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
}


def build_q128(directory: Path, **overrides) -> Path:
    """A random-weight transformers Llama of Q128's shape (with `overrides`)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**Q128, **overrides}))
    model.save_pretrained(directory)
    return directory


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file written byte by byte, any numpy dtype of SAFETENSORS_DTYPES (float8 and
    bfloat16 from ml_dtypes included)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, x in tensors.items():
        x = np.ascontiguousarray(x)
        header[name] = dict(
            dtype=SAFETENSORS_DTYPES[x.dtype.name], shape=list(x.shape), data_offsets=[offset, offset + x.nbytes]
        )
        offset += x.nbytes
        blobs.append(x.tobytes())
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def load_safetensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "model.safetensors"))


def is_quant_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in QUANT_LINEAR


def fp8_blocks(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face fine-grained fp8: e4m3 values and a float32 scale_inv per block (edge blocks partial)."""
    from models import quant

    bo, bi = block
    grid = (-(-w.shape[0] // bo), -(-w.shape[1] // bi))
    inv = np.zeros(grid, np.float32)
    for r in range(grid[0]):
        for c in range(grid[1]):
            inv[r, c] = np.abs(w[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi]).max() / np.float32(448)
    full = np.repeat(np.repeat(inv, bo, 0), bi, 1)[: w.shape[0], : w.shape[1]]
    return (w / full).astype(quant.FP8), inv


def symmetric(w: np.ndarray, kind: str, strategy: str, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """compressed-tensors-style symmetric values (int8 / fp8 / int4 in int8) and float32 scales:
    channel [out, 1], tensor [1], group [out, in / group]."""
    from models import quant

    qmax = {"int8": 127, "fp8": 448, "int4": 7}[kind]
    if strategy == "tensor":
        scales = np.array([np.abs(w).max() / qmax], np.float32)
        full = scales.reshape(1, 1)
    elif strategy == "channel":
        scales = full = (np.abs(w).max(axis=1, keepdims=True) / qmax).astype(np.float32)
    else:
        scales = (np.abs(w).reshape(w.shape[0], -1, group).max(axis=2) / qmax).astype(np.float32)
        full = np.repeat(scales, group, axis=1)
    x = w / full
    if kind == "fp8":
        return x.astype(quant.FP8), scales
    lo = -8 if kind == "int4" else -127
    return np.clip(np.round(x), lo, qmax).astype(np.int8), scales


def pack_int32(q: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' pack_to_int32 along the inputs: element i of a row at bit i * bits of the
    row's int32 words, stored as q + 2^(bits-1)."""
    u = (q.astype(np.int64) + (1 << (bits - 1))).astype(np.uint64)
    per = 32 // bits
    u = u.reshape(q.shape[0], -1, per)
    words = np.zeros(u.shape[:2], np.uint64)
    for i in range(per):
        words |= u[:, :, i] << np.uint64(bits * i)
    return words.astype(np.uint32).view(np.int32)


def write_float_checkpoint(src: Path, dst: Path, replace: dict[str, np.ndarray]) -> Path:
    """src's config and weights with those in `replace` swapped in, as a plain float32 checkpoint."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = {k: replace.get(k, v).astype(np.float32) for k, v in load_safetensors(src).items()}
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


def write_quantized_checkpoint(src: Path, dst: Path, quantization_config: dict, tensors: dict) -> Path:
    """src's config.json with `quantization_config`, and `tensors` (all of them) as model.safetensors."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg))
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


def write_gguf_as(hf_dir: Path, path: Path, qtype: str) -> Path:
    """A transformers Llama checkpoint as GGUF with every attention and MLP projection in `qtype`
    (Q8_0, Q4_0, ...), q/k rows permuted as llama.cpp's converter does, everything else F32."""
    return _write_gguf(hf_dir, path, lambda hf, name, x: qtype if is_quant_linear(hf) else "F32")
