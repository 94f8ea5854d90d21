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


def build(arch: str, directory: Path) -> Path:
    import torch
    import transformers

    cls, kwargs = {**ARCHS, **MOE_ARCHS}[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls)(**COMMON, **kwargs)
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
    import gguf
    from safetensors.numpy import load_file

    from jaxinfer import checkpoint

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
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

    def permute(x, n):
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for hf_name, x in tensors.items():
        name = checkpoint.gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            x = permute(x, heads)
        elif name.endswith("attn_k.weight"):
            x = permute(x, kv)
        base = name.split(".")[-2]
        qtype = gguf.GGMLQuantizationType[GGUF_TYPES.get(base, "F32") if x.ndim == 2 else "F32"]
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
