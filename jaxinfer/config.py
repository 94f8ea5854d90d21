"""Model configuration: one frozen dataclass, built from a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.errors import JaxinferError

# Architectures served by models/llama.py; each maps to its switches on the shared config. The
# mixture-of-experts ones replace the MLP of some or all layers by routed experts (models/moe.py).
MOE_FAMILY = ("mixtral", "qwen3_moe")
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", *MOE_FAMILY)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Fields that must be positive integers in every model.
POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_position_embeddings",
)
HF_FIX = "set the published model's value there or re-download the checkpoint"


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return (
        isinstance(x, (int, float, np.integer, np.floating))
        and not isinstance(x, (bool, np.bool_))
        and math.isfinite(x)
    )


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a JaxinferError naming the file and `fix` when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxinferError(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(value, dict):
        raise JaxinferError(f"{path} holds a JSON {_json_type(value)}, not an object {{...}}; {fix}")
    return value


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class Fields:
    """Typed reads of one JSON object: each error names the file, the key, the bad value and the fix."""

    def __init__(self, obj: dict[str, Any], source: str | Path, fix: str):
        self.obj, self.source, self.fix = obj, str(source), fix

    def fail(self, what: str):
        raise JaxinferError(f"{self.source}: {what}; {self.fix}")

    def _get(self, key: str, required: bool) -> Any:
        value = self.obj.get(key)
        if value is None and required:
            self.fail(f"the key {key!r} is missing")
        return value

    def integer(self, key: str, default: Any = None, required: bool = False, minimum: int = 1) -> Any:
        value = self._get(key, required)
        if value is None:
            return default
        if not _is_int(value) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.fail(f"{key}={value!r} must be {kind}")
        return int(value)

    def number(self, key: str, default: Any = None, positive: bool = True) -> Any:
        value = self._get(key, False)
        if value is None:
            return default
        if not _is_number(value) or (positive and value <= 0):
            self.fail(f"{key}={value!r} must be a {'positive ' if positive else ''}number")
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(f"{key}={value!r} must be true or false")
        return value

    def string(self, key: str, default: Any = None) -> Any:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(f"{key}={value!r} must be a string")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._get(key, False)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(f"{key}={value!r} must be an object {{...}}")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self._get(key, False)
        if value is None:
            return ()
        ids = value if isinstance(value, list) else [value]
        if not all(_is_int(i) and i >= 0 for i in ids):
            self.fail(f"{key}={value!r} must be a token id (an integer >= 0) or a list of them")
        return tuple(int(i) for i in ids)

    def int_list(self, key: str) -> tuple[int, ...]:
        value = self._get(key, False)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(_is_int(i) and i >= 0 for i in value):
            self.fail(f"{key}={value!r} must be a list of integers >= 0")
        return tuple(int(i) for i in value)


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
    # A serving choice, not the checkpoint's: a quantized model quantizes its output head (and a tied
    # embedding) too. Kept here because every weight declaration (models/llama.weights) reads the config.
    quantize_head: bool = False

    def __post_init__(self):
        # Checked here too, so that a config from any source (GGUF metadata, an orbax checkpoint's
        # jaxinfer.json) fails with a message instead of a ZeroDivisionError deep in the model.
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise JaxinferError(f"{name}={value!r} must be a positive integer")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise JaxinferError(f"{name}={value!r} must be an integer >= 0")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise JaxinferError(f"{name}={value!r} must be a positive number")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise JaxinferError(f"sliding_window={self.sliding_window!r} must be a positive integer or null")
        if not all(_is_int(i) and 0 <= i < self.num_layers for i in self.moe_layers):
            raise JaxinferError(f"moe_layers={self.moe_layers!r} must list layers in [0, {self.num_layers})")
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
        if self.num_experts and self.moe_layers and self.moe_intermediate_size < 1:
            raise JaxinferError(f"moe_intermediate_size={self.moe_intermediate_size} must be a positive integer")

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


def _rope_from_hf(f: Fields) -> tuple[float, RopeScaling]:
    # transformers 5.x folds theta and scaling into `rope_parameters`; 4.x keeps them top level.
    params = Fields(f.mapping("rope_parameters"), f"{f.source} rope_parameters", f.fix)
    scaling = Fields(f.mapping("rope_scaling"), f"{f.source} rope_scaling", f.fix)
    theta = params.number("rope_theta") or f.number("rope_theta", 10000.0)
    merged = Fields({**scaling.obj, **params.obj}, f"{f.source} rope_parameters", f.fix)
    rope_type = merged.string("rope_type") or merged.string("type", "default")
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(RopeScaling):
        if field.name == "rope_type":
            continue
        if field.name == "original_max_position_embeddings":
            value = merged.integer(field.name)
        else:
            value = merged.number(field.name)
        if value is not None:
            kwargs[field.name] = value
    return float(theta), RopeScaling(rope_type=rope_type, **kwargs)


def from_hf_config(
    cfg: dict[str, Any],
    generation_config: dict[str, Any] | None = None,
    source: str | Path = "config.json",
    generation_source: str | Path = "generation_config.json",
) -> ModelConfig:
    """Builds a ModelConfig from the dict of a Hugging Face `config.json` (`source` names it in errors)."""
    if not isinstance(cfg, dict):
        raise JaxinferError(f"{source} holds a JSON {_json_type(cfg)}, not an object {{...}}; {HF_FIX}")
    f = Fields(cfg, source, HF_FIX)
    arch = cfg.get("model_type")
    if not isinstance(arch, str) or arch not in LLAMA_FAMILY:
        raise JaxinferError(f"{source}: unknown architecture model_type={arch!r}; supported: {', '.join(LLAMA_FAMILY)}")
    if f.string("hidden_act", "silu") != "silu":
        raise JaxinferError(f"{source}: hidden_act={cfg['hidden_act']!r} is not supported; only 'silu' is")
    if f.flag("mlp_bias"):
        raise JaxinferError(f"{source}: mlp_bias=true is not supported by the Llama family implementation")
    theta, scaling = _rope_from_hf(f)
    hidden = f.integer("hidden_size", required=True)
    heads = f.integer("num_attention_heads", required=True)
    head_dim = f.integer("head_dim")
    if head_dim is None:
        if hidden % heads:
            f.fail(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} and head_dim is not given")
        head_dim = hidden // heads
    # Qwen configs carry a sliding_window that only use_sliding_window switches on.
    use_sliding = not arch.startswith("qwen") or f.flag("use_sliding_window")
    sliding = f.integer("sliding_window") if use_sliding else None
    eos = f.token_ids("eos_token_id")
    if generation_config is not None:
        if not isinstance(generation_config, dict):
            raise JaxinferError(
                f"{generation_source} holds a JSON {_json_type(generation_config)}, not an object {{...}}; "
                "correct it or delete it (it is optional)"
            )
        gen = Fields(generation_config, generation_source, "correct it or delete it (it is optional)")
        if gen.obj.get("eos_token_id") is not None:
            eos = gen.token_ids("eos_token_id")
    bos = f.token_ids("bos_token_id")
    kwargs = dict(
        architecture=arch,
        vocab_size=f.integer("vocab_size", required=True),
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size", required=True),
        num_layers=f.integer("num_hidden_layers", required=True),
        num_heads=heads,
        num_kv_heads=f.integer("num_key_value_heads", heads),
        head_dim=head_dim,
        rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=f.integer("max_position_embeddings", 4096),
        tie_word_embeddings=f.flag("tie_word_embeddings"),
        qkv_bias=arch == "qwen2" or f.flag("attention_bias"),
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        sliding_window=sliding,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        **_moe_from_hf(arch, f),
    )
    try:
        return ModelConfig(**kwargs)
    except JaxinferError as e:  # the values are checked above; this is an inconsistency between them
        raise JaxinferError(f"{source}: {e}") from None


def _moe_from_hf(arch: str, f: Fields) -> dict[str, Any]:
    if arch not in MOE_FAMILY:
        return {}
    # Published checkpoints spell the expert count `num_local_experts` (Mixtral) or `num_experts`
    # (Qwen3-MoE); transformers 5 writes either. Accept both for both.
    experts = f.integer("num_local_experts") or f.integer("num_experts")
    if experts is None:
        f.fail(f"{arch} config has no expert count (num_local_experts or num_experts)")
    n = f.integer("num_hidden_layers", required=True)
    if arch == "mixtral":
        # Every layer is routed; the experts' hidden size is `intermediate_size`; top-k weights renormalised.
        return dict(
            num_experts=experts,
            num_experts_per_tok=f.integer("num_experts_per_tok", 2),
            moe_intermediate_size=f.integer("intermediate_size", required=True),
            norm_topk_prob=True,
            moe_layers=tuple(range(n)),
        )
    step = f.integer("decoder_sparse_step", 1, minimum=0) or 1
    dense = set(f.int_list("mlp_only_layers"))
    return dict(
        num_experts=experts,
        num_experts_per_tok=f.integer("num_experts_per_tok", 8),
        moe_intermediate_size=f.integer("moe_intermediate_size", required=True),
        norm_topk_prob=f.flag("norm_topk_prob"),
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxinferError(f"{path} is not valid JSON ({e}); re-download the checkpoint") from e
    gen_path = directory / "generation_config.json"
    gen = None
    if gen_path.is_file():
        gen = read_json_object(gen_path, "correct it or delete it (it is optional)")
    return from_hf_config(cfg, gen, source=path, generation_source=gen_path)


GGUF_FIX = "the file is damaged or was written by an incompatible converter; re-download or re-convert it"


def from_gguf_metadata(meta: dict[str, Any], source: str | Path = "GGUF metadata") -> ModelConfig:
    """Builds a ModelConfig from GGUF key/value metadata (as a plain dict)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in LLAMA_FAMILY:
        raise JaxinferError(f"unknown GGUF architecture {arch!r}; supported: {', '.join(LLAMA_FAMILY)}")
    if meta.get(f"{arch}.expert_count"):
        raise JaxinferError(
            f"GGUF mixture-of-experts models are not supported ({arch}, {meta[f'{arch}.expert_count']} experts); "
            "load the Hugging Face safetensors checkpoint instead"
        )
    f = Fields(meta, source, GGUF_FIX)
    heads = f.integer(f"{arch}.attention.head_count", required=True)
    hidden = f.integer(f"{arch}.embedding_length", required=True)
    scaling = RopeScaling()
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = RopeScaling(rope_type="linear", factor=f.number(f"{arch}.rope.scaling.factor", 1.0))
    vocab = f.integer(f"{arch}.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            f.fail(f"neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
        vocab = len(tokens)
    head_dim = f.integer(f"{arch}.attention.key_length")
    if head_dim is None:
        if hidden % heads:
            f.fail(f"{arch}.embedding_length={hidden} is not divisible by {arch}.attention.head_count={heads}")
        head_dim = hidden // heads
    bos = f.token_ids("tokenizer.ggml.bos_token_id")
    kwargs = dict(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=f.integer(f"{arch}.feed_forward_length", required=True),
        num_layers=f.integer(f"{arch}.block_count", required=True),
        num_heads=heads,
        num_kv_heads=f.integer(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=f.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=f.number(f"{arch}.rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=f.integer(f"{arch}.context_length", 4096),
        tie_word_embeddings=not meta.get("_has_output_weight", False),
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=f.token_ids("tokenizer.ggml.eos_token_id"),
    )
    try:
        return ModelConfig(**kwargs)
    except JaxinferError as e:
        raise JaxinferError(f"{source}: {e}; {GGUF_FIX}") from None


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


ORBAX_FIX = "rewrite the checkpoint with `jaxinfer convert --model=SOURCE --output=DIR`"


def config_from_dict(d: dict[str, Any], source: str | Path = "jaxinfer.json") -> ModelConfig:
    """The inverse of config_to_dict, for the `config` object of an orbax checkpoint's jaxinfer.json."""
    if not isinstance(d, dict):
        raise JaxinferError(f"{source}: config={d!r} must be an object {{...}}; {ORBAX_FIX}")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if d.get(n) is None]
    if missing:
        raise JaxinferError(f"{source}: config lacks the keys {missing}; {ORBAX_FIX}")
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise JaxinferError(
            f"{source}: config has unknown keys {unknown} (written by another jaxinfer version?); {ORBAX_FIX}"
        )
    d = dict(d)
    f = Fields(d, f"{source} config", ORBAX_FIX)
    rope = f.mapping("rope_scaling")
    rope_fields = {x.name for x in dataclasses.fields(RopeScaling)}
    if set(rope) - rope_fields:
        f.fail(f"rope_scaling has unknown keys {sorted(set(rope) - rope_fields)}")
    d["rope_scaling"] = RopeScaling(**rope)
    d["eos_token_ids"] = f.token_ids("eos_token_ids")
    d["moe_layers"] = f.int_list("moe_layers")
    for name in ("architecture",):
        f.string(name)
    for name in ("tie_word_embeddings", "qkv_bias", "qk_norm", "norm_topk_prob", "quantize_head"):
        if name in d:
            d[name] = f.flag(name)
    if d.get("bos_token_id") is not None:
        f.integer("bos_token_id", minimum=0)
    try:
        return ModelConfig(**d)
    except JaxinferError as e:
        raise JaxinferError(f"{source}: {e}; {ORBAX_FIX}") from None


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
# Llama-3.1-8B: Llama-3-8B's shapes with the 128k context of Llama 3.1 (its rope scaled), for long prompts.
SHAPES["llama3.1-8b"] = dataclasses.replace(
    SHAPES["llama3-8b"],
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    max_position_embeddings=131072,
    eos_token_ids=(128001, 128008, 128009),
)
