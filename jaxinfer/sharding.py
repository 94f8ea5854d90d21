"""Mesh construction and the one table that maps logical dimension names to mesh axes.

Every parameter and cache dimension is declared with a logical name (models/llama.py); this module
is the only place that says which mesh axis splits it. A mesh preset may override entries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ModelConfig, read_json_object
from jaxinfer.errors import JaxinferError

log = logging.getLogger(__name__)

MESH_AXES = ("dp", "pp", "tp", "ep", "sp")

# logical name -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "layers": "pp",
    "vocab": "tp",
    "embed": None,
    "q_heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "experts": "ep",
    "expert_mlp": "tp",  # an expert's hidden size: attention and experts both keep tensor parallelism
    "batch": "dp",
    "seq": "sp",
    "cache_seq": None,
    "cache_heads": "tp",  # kv heads as the cache stores them: repeated up to tp when fewer
    "pages": "sp",  # the serving engine's page pool: each sp rank holds a contiguous range of page ids
}

PRESET_DIR = Path(__file__).resolve().parent.parent / "meshes"


def load_preset(name_or_path: str) -> dict:
    """A preset is JSON: {"axes": {"tp": 4, ...}, "rules": {"vocab": null, ...}} (rules optional)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise JaxinferError(
            f"mesh preset {name_or_path!r} is neither a file nor a known preset; pass the path of an existing "
            f"JSON file or a preset name (known: {', '.join(known)})"
        )
    fix = 'write it as {"axes": {"tp": 4, ...}, "rules": {"vocab": null, ...}} ("rules" optional)'
    preset = read_json_object(path, fix)
    unknown = sorted(set(preset) - {"axes", "rules"})
    if unknown:
        raise JaxinferError(f"mesh preset {path} has unknown keys {unknown}; {fix}")
    axes = preset.get("axes", {})
    if not isinstance(axes, dict):
        raise JaxinferError(f"mesh preset {path}: axes={axes!r} must be an object of axis name -> size; {fix}")
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise JaxinferError(f"mesh preset {path} names unknown axes {sorted(unknown)}; use {MESH_AXES}")
    for name, size in axes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise JaxinferError(f"mesh preset {path}: axes.{name}={size!r} must be a positive integer; {fix}")
    rules = preset.get("rules", {})
    if not isinstance(rules, dict):
        raise JaxinferError(
            f"mesh preset {path}: rules={rules!r} must be an object of logical name -> mesh axis or null; {fix}"
        )
    unknown = set(rules) - set(RULES)
    if unknown:
        raise JaxinferError(f"mesh preset {path} overrides unknown logical names {sorted(unknown)}")
    for name, axis in rules.items():
        if axis is not None and axis not in MESH_AXES:
            raise JaxinferError(
                f"mesh preset {path}: rules.{name}={axis!r} must be one of {list(MESH_AXES)} or null; {fix}"
            )
    return preset


def mesh_shape(dp: int = 1, pp: int = 1, tp: int = 1, ep: int = 1, sp: int = 1) -> dict[str, int]:
    shape = dict(dp=dp, pp=pp, tp=tp, ep=ep, sp=sp)
    for name, size in shape.items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise JaxinferError(f"mesh axis {name}={size!r} must be a positive integer")
    return shape


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    need = int(np.prod(list(shape.values())))
    if need > len(devices):
        platform = devices[0].platform if devices else "none"
        hint = (
            f"on CPU, simulate more devices with XLA_FLAGS=--xla_force_host_platform_device_count={need} "
            f'or jax.config.update("jax_num_cpu_devices", {need}) before jax starts'
            if platform == "cpu"
            else "shrink the mesh"
        )
        dims = " x ".join(f"{k}={v}" for k, v in shape.items() if v > 1) or "1"
        raise JaxinferError(f"mesh {dims} needs {need} devices but {len(devices)} {platform} devices exist; {hint}")
    dev = np.array(devices[:need]).reshape([shape[a] for a in MESH_AXES])
    return Mesh(dev, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_rules(cfg: ModelConfig, mesh: Mesh, overrides: Mapping[str, str | None] | None = None) -> dict:
    """The rules table for this model on this mesh; checks every divisibility it relies on."""
    rules = {**RULES, **(overrides or {})}
    tp = mesh.shape["tp"]
    if cfg.num_heads % tp:
        raise JaxinferError(
            f"num_attention_heads={cfg.num_heads} is not divisible by tp={tp}; "
            f"choose tp from the divisors of {cfg.num_heads}"
        )
    if cfg.num_kv_heads % tp:
        if tp % cfg.num_kv_heads:
            raise JaxinferError(
                f"num_key_value_heads={cfg.num_kv_heads} and tp={tp}: tp must divide the kv heads "
                "or be a multiple of them"
            )
        rules["kv_heads"] = None  # fewer kv heads than tp: replicate them (see models/llama.py)
    if cfg.dense_layers and cfg.intermediate_size % tp:
        raise JaxinferError(f"intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
    ep = mesh.shape["ep"]
    if cfg.num_experts:
        if rules["experts"] != "ep":
            raise JaxinferError(f"the experts dimension must lie on the ep mesh axis, not {rules['experts']!r}")
        if cfg.num_experts % ep:
            divisors = [d for d in range(1, cfg.num_experts + 1) if cfg.num_experts % d == 0]
            raise JaxinferError(
                f"num_experts={cfg.num_experts} is not divisible by ep={ep}; each device holds an equal share "
                f"of the experts: choose ep from {divisors}"
            )
        if cfg.moe_intermediate_size % tp:
            raise JaxinferError(f"the experts' hidden size {cfg.moe_intermediate_size} is not divisible by tp={tp}")
    elif ep > 1:
        raise JaxinferError(f"ep={ep}: {cfg.architecture} is a dense model without experts; set ep=1")
    if cfg.vocab_size % tp:
        log.warning("vocab_size=%d is not divisible by tp=%d: vocabulary replicated", cfg.vocab_size, tp)
        rules["vocab"] = None
    pp = mesh.shape["pp"]
    if cfg.num_layers % pp:
        divisors = [d for d in range(1, cfg.num_layers + 1) if cfg.num_layers % d == 0]
        raise JaxinferError(
            f"num_hidden_layers={cfg.num_layers} is not divisible by pp={pp}; stages must hold equal layer "
            f"counts: choose pp from {divisors}"
        )
    if pp > 1 and cfg.moe_layers and cfg.dense_layers:
        raise JaxinferError(
            f"pp={pp}: this model mixes dense layers {list(cfg.dense_layers)} with routed ones, so its stages "
            "would differ; serve it with pp=1"
        )
    sp = mesh.shape["sp"]
    if sp > 1:
        if rules["seq"] != "sp":
            raise JaxinferError(f"sp={sp}: the seq dimension must lie on the sp mesh axis, not {rules['seq']!r}")
        if rules["pages"] != "sp":
            raise JaxinferError(f"sp={sp}: the pages dimension must lie on the sp mesh axis, not {rules['pages']!r}")
    return rules


def spec(logical_axes: Sequence[str | None], rules: Mapping[str, str | None]) -> P:
    """PartitionSpec for a tensor with these logical axes; two dimensions may not share a mesh axis."""
    axes = [rules.get(name) if name else None for name in logical_axes]
    used = [a for a in axes if a is not None]
    if len(used) != len(set(used)):
        raise JaxinferError(f"logical axes {tuple(logical_axes)} map two dimensions onto one mesh axis: {axes}")
    return P(*axes)


def named(mesh: Mesh, logical_axes: Sequence[str | None], rules: Mapping[str, str | None]) -> NamedSharding:
    return NamedSharding(mesh, spec(logical_axes, rules))


WIDENED_SCOPE = "psum_widened_for_cpu"


def psum(x: jax.Array, axes) -> jax.Array:
    """`lax.psum` inside `shard_map`. On CPU a low-precision sum runs in float32: XLA:CPU widens such
    all-reduces anyway, and aborts doing it itself inside a partly manual shard_map ("Invalid binary
    instruction opcode copy"). The named scope lets `explain` count it at the program's dtype."""
    if jax.default_backend() == "cpu" and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
        with jax.named_scope(WIDENED_SCOPE):
            return jax.lax.psum(x.astype(jnp.float32), axes).astype(x.dtype)
    return jax.lax.psum(x, axes)


def shard_map(body, mesh: Mesh, in_specs, out_specs, axis_names=None):
    """`jax.shard_map(body)` manual over `axis_names` (default: every mesh axis), usable both at the top
    of a step and inside another shard_map (a pipeline stage, manual over pp or over pp and sp). Inside
    one, it runs on the context mesh and leaves out the axes already manual there: their arrays arrive as
    per-rank shards already, so those axes are dropped from the specs, and the body's collectives over
    them (a ring's ppermute over sp) still name them."""
    axis_names = set(mesh.axis_names if axis_names is None else axis_names)
    done = manual_axes()
    if done:
        mesh = jax.sharding.get_abstract_mesh()
        axis_names -= done
        in_specs, out_specs = (
            jax.tree.map(lambda s: _without(s, done), x, is_leaf=_is_spec) for x in (in_specs, out_specs)
        )
        if not axis_names:  # nothing left to split by hand: the body is per-rank code already
            return body
    return jax.shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=axis_names, check_vma=False
    )


def manual_axes() -> set[str]:
    """The mesh axes already manual where this is traced (inside a shard_map over them), else none."""
    context = jax.sharding.get_abstract_mesh()
    return set() if context.empty else set(context.manual_axes)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _without(spec: P, axes: set[str]) -> P:
    """`spec` with the mesh axes in `axes` removed (a dimension split over none of the rest: unsplit)."""

    def keep(entry):
        if entry is None:
            return None
        names = [a for a in (entry if isinstance(entry, tuple) else (entry,)) if a not in axes]
        return None if not names else names[0] if len(names) == 1 else tuple(names)

    return P(*(keep(e) for e in spec))
