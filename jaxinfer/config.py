"""Model configuration: one frozen dataclass, built from a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxinfer.errors import JaxinferError

# Architectures served by models/llama.py; each maps to its switches on the shared config. The
# mixture-of-experts ones replace the MLP of some or all layers by routed experts (models/moe.py).
MOE_FAMILY = ("mixtral", "qwen3_moe")
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", *MOE_FAMILY)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (num_experts == 0: a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to one
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is routed experts

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise JaxinferError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; the checkpoint's config is inconsistent"
            )
        if self.rope_scaling.rope_type not in SUPPORTED_ROPE_TYPES:
            raise JaxinferError(
                f"rope type {self.rope_scaling.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise JaxinferError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )

    @property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.moe_layers)

    def _count(self, experts: int) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 2 * d
        per_layer += (q + 2 * kv) if self.qkv_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        routers = len(self.moe_layers) * d * self.num_experts
        layers = self.num_layers * per_layer + len(self.dense_layers) * 3 * d * f + routers
        return layers + self.expert_param_count(experts) + v * d * (1 if self.tie_word_embeddings else 2) + d

    def expert_param_count(self, experts: int) -> int:
        """Parameters of `experts` experts in every routed layer (their gate, up and down matrices)."""
        return len(self.moe_layers) * 3 * self.hidden_size * self.moe_intermediate_size * experts

    @property
    def param_count(self) -> int:
        return self._count(self.num_experts)

    @property
    def active_param_count(self) -> int:
        """Parameters one token passes through: only its top-k experts of each MoE layer."""
        return self._count(self.num_experts_per_tok)


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers 5.x folds theta and scaling into `rope_parameters`; 4.x keeps them top level.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kwargs = {k: merged[k] for k in fields if merged.get(k) is not None}
    return float(theta), RopeScaling(rope_type=rope_type, **kwargs)


def _as_tuple(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    return tuple(int(i) for i in ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def from_hf_config(cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Builds a ModelConfig from the dict of a Hugging Face `config.json`."""
    arch = cfg.get("model_type")
    if arch not in LLAMA_FAMILY:
        raise JaxinferError(f"unknown architecture model_type={arch!r}; supported: {', '.join(LLAMA_FAMILY)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise JaxinferError(f"hidden_act={cfg['hidden_act']!r} is not supported; only 'silu' is")
    if cfg.get("mlp_bias"):
        raise JaxinferError("mlp_bias=true is not supported by the Llama family implementation")
    theta, scaling = _rope_from_hf(cfg)
    heads = cfg["num_attention_heads"]
    sliding = cfg.get("sliding_window")
    if arch.startswith("qwen") and not cfg.get("use_sliding_window", False):
        sliding = None
    gen = generation_config or {}
    eos = _as_tuple(gen.get("eos_token_id", cfg.get("eos_token_id")))
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        sliding_window=sliding,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos,
        **_moe_from_hf(arch, cfg),
    )


def _moe_from_hf(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    if arch not in MOE_FAMILY:
        return {}
    # Published checkpoints spell the expert count `num_local_experts` (Mixtral) or `num_experts`
    # (Qwen3-MoE); transformers 5 writes either. Accept both for both.
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if experts < 1:
        raise JaxinferError(f"{arch} config has no expert count (num_local_experts or num_experts)")
    n = cfg["num_hidden_layers"]
    if arch == "mixtral":
        # Every layer is routed; the experts' hidden size is `intermediate_size`; top-k weights renormalised.
        return dict(
            num_experts=experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
            moe_intermediate_size=cfg["intermediate_size"],
            norm_topk_prob=True,
            moe_layers=tuple(range(n)),
        )
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or ())
    return dict(
        num_experts=experts,
        num_experts_per_tok=cfg.get("num_experts_per_tok", 8),
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0),
    )


def load_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise JaxinferError(
            f"{directory} has no config.json; pass a Hugging Face checkpoint directory, "
            "a .gguf file, an orbax checkpoint written by `jaxinfer convert`, or a built-in name"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JaxinferError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
    gen_path = directory / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    return from_hf_config(cfg, gen)


def from_gguf_metadata(meta: dict[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from GGUF key/value metadata (as a plain dict)."""
    arch = meta.get("general.architecture")
    if arch not in LLAMA_FAMILY:
        raise JaxinferError(f"unknown GGUF architecture {arch!r}; supported: {', '.join(LLAMA_FAMILY)}")
    if meta.get(f"{arch}.expert_count"):
        raise JaxinferError(
            f"GGUF mixture-of-experts models are not supported ({arch}, {meta[f'{arch}.expert_count']} experts); "
            "load the Hugging Face safetensors checkpoint instead"
        )

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    scaling = RopeScaling()
    if key("rope.scaling.type") == "linear":
        scaling = RopeScaling(rope_type="linear", factor=key("rope.scaling.factor"))
    return ModelConfig(
        architecture=arch,
        vocab_size=key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"),
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv") or heads,
        head_dim=key("attention.key_length") or hidden // heads,
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=key("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=key("context_length", 4096),
        tie_word_embeddings=not meta.get("_has_output_weight", False),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_tuple(meta.get("tokenizer.ggml.eos_token_id")),
    )


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    d["moe_layers"] = tuple(d.get("moe_layers", ()))
    return ModelConfig(**d)


# Shapes of published models, without weights: for `explain`, and for `--random_weights` runs.
SHAPES = {
    "llama3-8b": ModelConfig(
        "llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    "llama3-70b": ModelConfig(
        "llama",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    "llama3-405b": ModelConfig(
        "llama",
        vocab_size=128256,
        hidden_size=16384,
        intermediate_size=53248,
        num_layers=126,
        num_heads=128,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "qwen3-8b": ModelConfig(
        "qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        qk_norm=True,
        bos_token_id=None,
        eos_token_ids=(151645, 151643),
    ),
    "mixtral-8x7b": ModelConfig(
        "mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_ids=(2,),
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=14336,
        moe_layers=tuple(range(32)),
    ),
    "qwen3-30b-a3b": ModelConfig(
        "qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        qk_norm=True,
        bos_token_id=None,
        eos_token_ids=(151645, 151643),
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        moe_layers=tuple(range(48)),
    ),
}
