"""Checkpoints published quantized, read as stored: which format each keeps its weights in, and each
stored weight's values and scales in the Hugging Face layout [out, in].

- Hugging Face fp8 (`quant_method: fp8`; DeepSeek-V3, Qwen3-FP8): float8_e4m3fn `weight` and a float32
  `weight_scale_inv` per [128, 128] block (weight = fp8 * scale_inv).
- compressed-tensors (llm-compressor): fp8 or int8 `weight` with a `weight_scale` per channel, per tensor,
  per group or per block (float-, int- and naive-quantized), or int4/int8 packed into int32
  `weight_packed` with its `weight_scale` and `weight_shape` (pack-quantized). Activation quantization
  (W8A8) is not applied: those checkpoints run weight-only.
- GGUF Q8_0 and Q4_0: blocks of 32 inputs, each with one float16 scale.
- orbax checkpoints written by `jaxinfer convert --quant`.

A stored weight keeps its values exactly; its scales become one per (output channel, group of inputs),
the layout models/quant.py computes with: a block's scale is repeated on each of its rows, a channel's or
a tensor's on each group. Everything here reads headers and scales only, before any device work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.errors import JaxinferError
from models import llama, quant

HF_METHODS = ("fp8", "compressed-tensors")
CT_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
GGUF_KEPT = {8: "int8", 2: "int4"}  # gguf.GGMLQuantizationType Q8_0, Q4_0 -> the format they are kept in
GGUF_BLOCK = 32
FIX = "re-download the checkpoint"


class QuantMode(str):
    """A quant mode's name ("int8", "fp8", "int4") carrying the exact quant.Format the weights are held in:
    a checkpoint's own group (fp8 blocks of 128, GGUF blocks of 32, a compressed-tensors group_size)
    where it differs from quant.FORMATS'. Compares, prints and serializes as its name."""

    format: quant.Format

    def __new__(cls, fmt: quant.Format) -> QuantMode:
        mode = super().__new__(cls, fmt.name)
        mode.format = fmt
        return mode


def format_of(mode) -> quant.Format | None:
    """The Format of a resolved quant mode (None for "none")."""
    if isinstance(mode, quant.Format):
        return mode
    if mode == "none":
        return None
    if mode == "auto":
        raise ValueError("quant='auto' must be resolved against the checkpoint first (checkpoint.load_mode)")
    return getattr(mode, "format", None) or quant.as_format(mode)


def describe(fmt: quant.Format | None) -> str:
    if fmt is None:
        return "float"
    if fmt.group is None:
        return f"{fmt.name} (per output channel)"
    return f"{fmt.name} (groups of {fmt.group} inputs)"


def with_group(name: str, group: int | None) -> quant.Format:
    """The Format `name` whose group is `group` (int4: the largest of quant.GROUPS dividing it, so that
    every group found for a weight splits the stored groups exactly)."""
    base = quant.FORMATS[name]
    if group is None:
        return base
    if base.packed:
        fits = [g for g in quant.GROUPS if group % g == 0]
        if not fits:
            raise ValueError(f"int4 groups of {group} inputs: none of {quant.GROUPS} divides it")
        group = fits[0]
    return dataclasses.replace(base, group=group)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One weight as the checkpoint stores it, in the Hugging Face layout [out, in]."""

    kind: str  # "int8" | "fp8" | "int4"
    values: Any  # [out, in]: int8 (int4 unpacked to [-8, 7]) or float8_e4m3fn, sliced as [rows, cols]
    scales: np.ndarray  # float32 [out, ceil(in / group)] ([out, 1] per channel)
    group: int | None  # inputs per stored scale (the last may be partial); None: per output channel
    shape: tuple[int, int]

    def scales_for(self, group: int | None, name: str) -> np.ndarray:
        """The scales [out, in / group] of `group` inputs each (None: [out, 1]), exactly the stored ones
        repeated where one stored scale covers several groups."""
        n = self.shape[1]
        if group is None:
            if self.group is not None:
                raise JaxinferError(f"{name}: stored with groups of {self.group} inputs, not per output channel")
            return self.scales
        if n % group or (self.group is not None and self.group % group):
            raise JaxinferError(
                f"{name}: its stored groups of {self.group or n} inputs do not split into groups of {group}"
            )
        return np.repeat(self.scales, n // group // self.scales.shape[1], axis=1)

    def dequantized(self) -> Dequantized:
        return Dequantized(self.values, self.scales, self.group or self.shape[1], self.shape)


def _cols(key, n: int) -> tuple[slice, range]:
    rows, cols = key if isinstance(key, tuple) else (key, slice(None))
    return rows, range(*cols.indices(n))


@dataclasses.dataclass(frozen=True)
class Dequantized:
    """A stored weight read as float32 (values * scales), sliced as [rows, cols] like a checkpoint tensor."""

    values: Any
    scales: np.ndarray
    group: int
    shape: tuple[int, int]

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = _cols(key, self.shape[1])
        v = np.asarray(self.values[rows, slice(cols.start, cols.stop)]).astype(np.float32)
        return v * self.scales[rows][:, np.asarray(cols) // self.group]


@dataclasses.dataclass(frozen=True)
class Requantized:
    """A float checkpoint tensor quantized slice by slice under its whole-tensor `scales` [out, in / group]
    (values int8, fp8, or int4 unpacked to int8), sliced as [rows, cols] with cols whole groups."""

    tensor: Any
    scales: np.ndarray
    fmt: quant.Format
    shape: tuple[int, int]

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = _cols(key, self.shape[1])
        k = self.scales.shape[1]
        g = self.shape[1] // k
        s = self.scales[rows, slice(cols.start // g, -(-cols.stop // g)) if k > 1 else slice(None)]
        v = quant.values_of(np.asarray(self.tensor[rows, slice(cols.start, cols.stop)], np.float32), s, self.fmt)
        return quant.unpack(v) if self.fmt.packed else v


@dataclasses.dataclass
class Stored:
    """What a checkpoint holds quantized: the formats its weights can be kept in, the one quant="auto"
    keeps, and each Hugging Face-named tensor's stored form (None: stored in float)."""

    method: str  # "fp8", "compressed-tensors", "gguf" or "orbax", for messages
    formats: dict[str, quant.Format]
    auto: str | None
    tensor: Callable[[str], StoredTensor | None]
    cannot_keep: str | None = None  # why the stored tensors cannot be kept as they are, if they cannot
    activations: bool = False  # the checkpoint also quantizes activations (W8A8), which jaxinfer does not

    def format_for(self, mode: str) -> quant.Format | None:
        """The stored format `mode` ("auto" or a format name) keeps, or None where it keeps none."""
        name = self.auto if mode == "auto" else mode
        fmt = self.formats.get(name)
        if fmt is not None and self.cannot_keep:
            raise JaxinferError(self.cannot_keep)
        return fmt


# --- Hugging Face safetensors --------------------------------------------------------------------


def open_hf(directory: Path, config: dict, tensors) -> Stored | None:
    """The quantization of a Hugging Face checkpoint from its config.json `quantization_config` (None
    when it has none). `tensors` is checkpoint._Safetensors: names, shape(), dtype() and slices."""
    qc = config.get("quantization_config") or config.get("compression_config")
    if qc is None:
        return None
    where = f"{directory / 'config.json'}: quantization_config"
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "fp8":
        return _hf_fp8(directory, where, qc, tensors)
    if method == "compressed-tensors":
        return _compressed_tensors(directory, where, qc, tensors)
    raise JaxinferError(
        f"{where}.quant_method={method!r} is not supported; jaxinfer loads {' and '.join(map(repr, HF_METHODS))} "
        f"checkpoints (compressed-tensors formats {', '.join(CT_FORMATS)}) and GGUF files (Q8_0 and Q4_0 kept "
        "as stored, other types dequantized); use an unquantized checkpoint otherwise"
    )


def _read_scales(tensors, name: str) -> np.ndarray:
    return np.asarray(tensors.array(name)).astype(np.float32)


def _expand_rows(blocks: np.ndarray, rows: int, out: int) -> np.ndarray:
    return np.repeat(blocks, rows, axis=0)[:out]


def _block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def _check_2d(directory: Path, name: str, shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2:
        raise JaxinferError(
            f"{directory}: {what} tensor {name!r} has shape {shape}; a quantized linear weight is [out, in]"
        )


def _hf_fp8(directory: Path, where: str, qc: dict, tensors) -> Stored:
    if qc.get("fmt", "e4m3") != "e4m3":
        raise JaxinferError(f"{where}.fmt={qc.get('fmt')!r}: only float8 e4m3 weights are supported")
    block = qc.get("weight_block_size")
    if block is not None and (
        not isinstance(block, (list, tuple)) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise JaxinferError(f"{where}.weight_block_size={block!r}; expected two positive integers like [128, 128]")
    weights = {}  # name -> scale name
    partial = []
    for name in tensors.names:
        if not (name.endswith(".weight") and tensors.dtype(name) == "F8_E4M3"):
            continue
        shape = tensors.shape(name)
        _check_2d(directory, name, shape, "float8")
        scale = name + "_scale_inv"
        if scale not in tensors:
            raise JaxinferError(f"{directory}: tensor {name!r} is float8 but its scale {scale!r} is missing; {FIX}")
        want = _block_grid(shape, block) if block else (1,)
        got = tensors.shape(scale)
        if tuple(got) != tuple(want) and not (block is None and math.prod(got) == 1):
            what = f"blocks of {block[0]}x{block[1]}" if block else "one scale per tensor"
            raise JaxinferError(
                f"{directory}: scale {scale!r} has shape {tuple(got)}; {name} {shape} in {what} needs {want}; {FIX}"
            )
        if block and shape[1] % block[1]:
            partial.append(f"{name} ({shape[1]} inputs)")
        weights[name] = scale
    group = block[1] if block else None
    fmt = with_group("fp8", group)

    def tensor(name: str) -> StoredTensor | None:
        if name not in weights:
            return None
        shape = tuple(tensors.shape(name))
        inv = _read_scales(tensors, weights[name])
        scales = _expand_rows(inv, block[0], shape[0]) if block else np.full((shape[0], 1), inv.reshape(-1)[0])
        return StoredTensor("fp8", tensors(name), scales, group, shape)

    cannot = None
    if partial:
        cannot = (
            f"{directory}: {', '.join(partial[:3])} {'is' if len(partial) == 1 else 'are'} not a whole number of "
            f"fp8 blocks of {group} inputs, so the blocks cannot be kept as stored; load it with quant='none' "
            "(dequantized) or quant='int8' (requantized)"
        )
    return Stored("fp8", {"fp8": fmt}, "fp8", tensor, cannot)


def _ct_scheme(where: str, qc: dict) -> dict:
    """The one weight scheme of a compressed-tensors config (its config_groups), checked."""
    top = qc.get("format")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise JaxinferError(
            f"{where}.sparsity_config format {sparsity.get('format')!r}: sparse checkpoints are not supported"
        )
    schemes = []
    for gname, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") if isinstance(group, dict) else None
        if w:
            schemes.append(dict(w, format=group.get("format") or top, _group=gname))
    if not schemes:
        raise JaxinferError(f"{where}.config_groups has no group quantizing weights; nothing to load quantized")
    keys = ("num_bits", "type", "strategy", "group_size", "block_structure", "symmetric", "format")
    if len({tuple(str(s.get(k)) for k in keys) for s in schemes}) > 1:
        raise JaxinferError(
            f"{where}.config_groups {[s['_group'] for s in schemes]} quantize weights in different schemes; "
            "one weight scheme per checkpoint is supported"
        )
    s = schemes[0]
    if s["format"] not in CT_FORMATS:
        raise JaxinferError(
            f"{where}.format={s['format']!r} is not supported; compressed-tensors formats read: {', '.join(CT_FORMATS)}"
        )
    kind = {(8, "float"): "fp8", (8, "int"): "int8", (4, "int"): "int4"}.get((s.get("num_bits"), s.get("type")))
    if kind is None:
        raise JaxinferError(
            f"{where}: weights of {s.get('num_bits')}-bit {s.get('type')!r} are not supported; "
            "supported: 8-bit float (fp8 e4m3), 8-bit int, 4-bit int"
        )
    if not s.get("symmetric", True):
        raise JaxinferError(f"{where}: asymmetric weights (zero points) are not supported; only symmetric ones")
    strategy = s.get("strategy")
    if strategy not in ("channel", "tensor", "group", "block"):
        raise JaxinferError(
            f"{where}: weight strategy {strategy!r} is not supported; supported: channel, tensor, group, block"
        )
    packed = s["format"] == "pack-quantized"
    if packed != (kind == "int4") and not (packed and kind == "int8"):
        raise JaxinferError(f"{where}: {kind} weights in format {s['format']!r}; int4 weights come pack-quantized")
    g = s.get("group_size")
    b = s.get("block_structure")
    if strategy == "group" and not (isinstance(g, int) and g > 0):
        raise JaxinferError(f"{where}: strategy 'group' with group_size={g!r}; expected a positive integer")
    if strategy == "block" and not (
        isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)
    ):
        raise JaxinferError(f"{where}: strategy 'block' with block_structure={b!r}; expected two positive integers")
    return dict(
        kind=kind,
        strategy=strategy,
        group=g,
        block=tuple(b) if b else None,
        packed=packed,
        bits=s["num_bits"],
        activations=any(isinstance(gr, dict) and gr.get("input_activations") for gr in qc["config_groups"].values()),
    )


def _unpack_int32(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """compressed-tensors' unpack_from_int32 for 4 and 8 bits: element i of a row sits at bit i * bits of
    the row's little-endian int32 words, stored as value + 2^(bits-1)."""
    b = np.ascontiguousarray(words).astype("<i4", copy=False).view(np.uint8)
    if bits == 4:
        b = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1)
    return (b[:, :n].astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class _Packed:
    """An int32 `weight_packed` [out, ceil(in * bits / 32)] read as int8 values [out, in]."""

    words: Any
    bits: int
    shape: tuple[int, int]

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = _cols(key, self.shape[1])
        per = 32 // self.bits
        first, last = cols.start // per, -(-cols.stop // per)
        v = _unpack_int32(np.asarray(self.words[rows, slice(first, last)]), self.bits, (last - first) * per)
        return v[:, cols.start - first * per : cols.stop - first * per]


def _compressed_tensors(directory: Path, where: str, qc: dict, tensors) -> Stored:
    s = _ct_scheme(where, qc)
    kind, strategy = s["kind"], s["strategy"]
    entries = {}  # "x.weight" -> (values tensor name, scale name, [out, in])
    partial = []
    for scale in tensors.names:
        if not scale.endswith(".weight_scale"):
            continue
        base = scale[: -len("_scale")]
        if s["packed"]:
            packed, shape_name = base + "_packed", base + "_shape"
            for need in (packed, shape_name):
                if need not in tensors:
                    raise JaxinferError(f"{directory}: {scale!r} has no {need!r} beside it; {FIX}")
            shape = tuple(int(x) for x in np.asarray(tensors.array(shape_name)).reshape(-1))
            _check_2d(directory, shape_name, shape, "pack-quantized")
            want = (shape[0], -(-shape[1] * s["bits"] // 32))
            if tuple(tensors.shape(packed)) != want or tensors.dtype(packed) != "I32":
                raise JaxinferError(
                    f"{directory}: {packed!r} is {tensors.dtype(packed)} {tuple(tensors.shape(packed))}; "
                    f"{s['bits']}-bit weights of shape {shape} pack into I32 {want}; {FIX}"
                )
            entries[base] = (packed, scale, shape)
        else:
            if base not in tensors:
                raise JaxinferError(f"{directory}: {scale!r} has no weight {base!r} beside it; {FIX}")
            shape = tuple(tensors.shape(base))
            _check_2d(directory, base, shape, kind)
            entries[base] = (base, scale, shape)
    stored_dtype = {"fp8": "F8_E4M3", "int8": "I8"}.get(kind)
    for name in tensors.names:  # a quantized weight whose scale is missing
        if name.endswith(".weight_packed") and name[: -len("_packed")] not in entries:
            raise JaxinferError(
                f"{directory}: {name!r} is packed but its scale {name[:-7] + '_scale'!r} is missing; {FIX}"
            )
        if name.endswith(".weight") and name not in entries and tensors.dtype(name) in ("F8_E4M3", "I8"):
            raise JaxinferError(
                f"{directory}: tensor {name!r} is stored {tensors.dtype(name)} but its scale "
                f"{name + '_scale'!r} is missing; {FIX}"
            )
    group = None
    for base, (values, scale, shape) in entries.items():
        if not s["packed"] and tensors.dtype(values) != stored_dtype:
            raise JaxinferError(
                f"{directory}: {values!r} is {tensors.dtype(values)}; {kind} weights ({s['format']}) are "
                f"stored {stored_dtype}; {FIX}"
            )
        got = tuple(tensors.shape(scale))
        if strategy == "channel":
            ok, want = got in ((shape[0], 1), (shape[0],)), (shape[0], 1)
        elif strategy == "tensor":
            ok, want = math.prod(got) == 1, (1,)
        elif strategy == "group":
            want = (shape[0], -(-shape[1] // s["group"]))
            ok, group = got == want, s["group"]
        else:
            want = _block_grid(shape, s["block"])
            ok, group = got == want, s["block"][1]
        if not ok:
            raise JaxinferError(
                f"{directory}: scale {scale!r} has shape {got}; {base} {shape} with strategy {strategy!r} "
                f"needs {want}; {FIX}"
            )
        if group and shape[1] % group:
            partial.append(f"{base} ({shape[1]} inputs)")
    fmt = with_group(kind, group)

    def tensor(name: str) -> StoredTensor | None:
        if name not in entries:
            return None
        values, scale, shape = entries[name]
        sc = _read_scales(tensors, scale)
        if strategy == "tensor":
            sc = np.full((shape[0], 1), sc.reshape(-1)[0], np.float32)
        elif strategy == "channel":
            sc = sc.reshape(shape[0], 1)
        elif strategy == "block":
            sc = _expand_rows(sc, s["block"][0], shape[0])
        v = _Packed(tensors(values), s["bits"], shape) if s["packed"] else tensors(values)
        return StoredTensor(kind, v, sc, group, shape)

    cannot = None
    if partial:
        cannot = (
            f"{directory}: {', '.join(partial[:3])} {'is' if len(partial) == 1 else 'are'} not a whole number of "
            f"groups of {group} inputs, so the weights cannot be kept as stored; load with quant='none' (dequantized)"
        )
    return Stored("compressed-tensors", {kind: fmt}, kind, tensor, cannot, s["activations"])


# --- GGUF ----------------------------------------------------------------------------------------


def interleaved_to_hf(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k rows (each head's rotary halves interleaved) in Hugging Face's order; any
    trailing dimensions (values or their block scales) move with their row."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_split(raw: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.asarray(raw).reshape(raw.shape[0], cols // GGUF_BLOCK, -1)
    return blocks[..., :2], blocks[..., 2:]


def gguf_scales(raw: np.ndarray, cols: int) -> np.ndarray:
    """The float16 scale d of each Q8_0/Q4_0 block (its first two bytes) as float32 [rows, cols / 32]."""
    d, _ = _gguf_split(raw, cols)
    return np.ascontiguousarray(d).view(np.float16)[..., 0].astype(np.float32)


def gguf_values(qtype: int, raw: np.ndarray, cols: int) -> np.ndarray:
    """The int8 values [rows, cols] of Q8_0 blocks (d, then 32 int8) or Q4_0 blocks (d, then 16 bytes
    whose low nibbles are weights 0..15 and high nibbles 16..31, each q in 0..15 standing for q - 8)."""
    _, q = _gguf_split(raw, cols)
    q = np.ascontiguousarray(q)
    if GGUF_KEPT[qtype] == "int8":
        return q.view(np.int8).reshape(q.shape[0], cols)
    v = np.concatenate([q & 0xF, q >> 4], axis=-1).astype(np.int16) - 8
    return v.astype(np.int8).reshape(q.shape[0], cols)


@dataclasses.dataclass(frozen=True)
class _GGUFValues:
    """The values of a Q8_0/Q4_0 tensor, decoded from the rows a [rows, cols] slice needs."""

    raw: Any  # uint8 [rows, bytes per row], llama.cpp's row order
    qtype: int
    order: np.ndarray | None  # the llama.cpp row of each Hugging Face row (q and k), or None
    shape: tuple[int, int]

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = _cols(key, self.shape[1])
        raw = self.raw[rows] if self.order is None else self.raw[self.order[rows]]
        return gguf_values(self.qtype, raw, self.shape[1])[:, cols.start : cols.stop]


def gguf_stored(
    qtypes: dict[str, int], raw: Callable[[str], np.ndarray], cols: Callable[[str], int], heads
) -> Stored | None:
    """The Q8_0/Q4_0 tensors of a GGUF file among `qtypes` (Hugging Face name -> GGML type of each
    quantizable weight). "auto" keeps Q8_0 or Q4_0 only when every one of them is stored so (else dtype);
    quant="int8"/"int4" keeps the tensors stored in that kind and requantizes the others into it.
    q and k rows come back in Hugging Face order (`heads`: the heads llama.cpp interleaved, or None)."""
    counts = {kind: sum(GGUF_KEPT.get(t) == kind for t in qtypes.values()) for kind in ("int8", "int4")}
    formats = {kind: with_group(kind, GGUF_BLOCK) for kind, n in counts.items() if n}
    if not formats:
        return None

    def tensor(name: str) -> StoredTensor | None:
        kind = GGUF_KEPT.get(qtypes.get(name))
        if kind is None:
            return None
        blocks, n = raw(name), cols(name)
        h = heads(name)
        order = interleaved_to_hf(np.arange(blocks.shape[0]), h) if h else None
        d = gguf_scales(blocks, n)
        values = _GGUFValues(blocks, qtypes[name], order, (blocks.shape[0], n))
        return StoredTensor(kind, values, d if order is None else d[order], GGUF_BLOCK, values.shape)

    # "auto" keeps a kind only when every projection is stored in it: requantizing the others (Q4_1,
    # K-quants, F16) into it would round them again, which "auto" never does; a mixed file loads at dtype.
    whole = [kind for kind, n in counts.items() if n == len(qtypes)]
    return Stored("gguf", formats, whole[0] if whole else None, tensor)


def quantizable_names(cfg) -> list[str]:
    """The checkpoint tensors of every weight the model can hold quantized."""
    out = []
    for w in llama.weights(cfg).values():
        if not w.quant:
            continue
        ws = [w.expert(e) for e in range(w.shape[1 if w.stacked else 0])] if w.experts else [w]
        ws = [x.part(h) for x in ws for h in x.hf] if w.fused is not None else ws
        out += [x.checkpoint_name(j) for x in ws for j in range(w.shape[0] if w.stacked else 1)]
    return out


# --- orbax ---------------------------------------------------------------------------------------


def format_to_json(fmt: quant.Format | None) -> dict | None:
    return None if fmt is None else {"format": fmt.name, "group": fmt.group}


def orbax_stored(meta: Any, marker: Path, fix: str) -> Stored | None:
    """The format an orbax checkpoint's jaxinfer.json records for its quantized weights."""
    if meta is None:
        return None
    name = meta.get("format") if isinstance(meta, dict) else None
    group = meta.get("group") if isinstance(meta, dict) else None
    if name not in quant.FORMATS or not (group is None or (isinstance(group, int) and group > 0)):
        raise JaxinferError(
            f'{marker}: \'quant\' is {meta!r}; expected {{"format": one of {list(quant.FORMATS)}, "group": an '
            f"integer or null}}; {fix}"
        )
    fmt = dataclasses.replace(quant.FORMATS[name], group=group)
    return Stored("orbax", {name: fmt}, name, lambda _: None)
