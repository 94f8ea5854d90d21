"""Checkpoints published quantized, loaded as stored: Hugging Face fp8 blocks, compressed-tensors (fp8,
int8, packed int4/int8), GGUF Q8_0/Q4_0 and quantized orbax checkpoints. Values and scales must equal
the stored ones exactly; logits those transformers computes from the dequantized weights."""

import functools
import json
import logging

import gguf
import ml_dtypes
import numpy as np
import pytest

import jaxinfer
from jaxinfer import JaxinferError, checkpoint
from models import llama, quant
from tests import tiny
from tests.tiny import IDS, rel_err

QUANTIZED = ("wq", "wkv", "wo", "w_gate_up", "w_down")
PARTS = {
    "wq": ("q_proj",),
    "wkv": ("k_proj", "v_proj"),
    "wo": ("o_proj",),
    "w_gate_up": ("gate_proj", "up_proj"),
    "w_down": ("down_proj",),
}
MESHES = {"tp1": {}, "tp2": {"tp": 2}, "pp2": {"pp": 2}}


def _llm(path, **kwargs) -> jaxinfer.LLM:
    return jaxinfer.LLM(str(path), dtype="float32", **kwargs)  # the tolerances below are float32's


def _hf_name(part: str, layer: int) -> str:
    return f"model.layers.{layer}.{'mlp' if 'proj' in part and part[0] in 'gud' else 'self_attn'}.{part}.weight"


def _ours(name: str, per_hf: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Hugging Face [out, in]-layout arrays (values, or scales [out, in / group]) of parameter `name`
    laid out as ours, [layers, in..., (2,) out...] of `shape`: transposed, fused pieces on axis 1."""
    layers = []
    for i in range(shape[0]):
        parts = [per_hf[_hf_name(p, i)].T for p in PARTS[name]]
        if len(parts) == 1:
            layers.append(parts[0].reshape(shape[1:]))
        else:
            layers.append(np.stack([p.reshape(shape[1:2] + shape[3:]) for p in parts], axis=1))
    return np.stack(layers)


def _variant_tensors(src, kind: str):
    """The tensors, quantization_config, stored values/scales [out, in / group] and dequantized weights of
    one way of publishing `src` quantized."""
    tensors, stored, deq = {}, {}, {}
    qc = None
    for k, w in tiny.load_safetensors(src).items():
        if not tiny.is_quant_linear(k):
            tensors[k] = w
            continue
        if kind.startswith("fp8-block"):
            block = (128, 128) if kind == "fp8-block" else (96, 128)
            q, inv = tiny.fp8_blocks(w, block)
            tensors[k], tensors[k + "_scale_inv"] = q, inv
            scales = np.repeat(inv, block[0], axis=0)[: w.shape[0]]
            qc = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": list(block),
                "activation_scheme": "dynamic",
            }
        else:
            fmt, strategy, group = {
                "ct-fp8-channel": ("fp8", "channel", None),
                "ct-int8-tensor": ("int8", "tensor", None),
                "ct-int4-group": ("int4", "group", 128),
                "ct-int8-packed": ("int8", "group", 128),
            }[kind]
            q, scales = tiny.symmetric(w, fmt, strategy, group)
            packed = kind in ("ct-int4-group", "ct-int8-packed")
            bits = 4 if fmt == "int4" else 8
            if packed:
                tensors[k + "_packed"] = tiny.pack_int32(q, bits)
                tensors[k + "_shape"] = np.array(w.shape, np.int64)
            else:
                tensors[k] = q
            # fp8 channel scales stored bfloat16 (as llm-compressor writes them): read exactly
            stored_scales = scales.astype(ml_dtypes.bfloat16) if fmt == "fp8" else scales
            tensors[k + "_scale"] = stored_scales
            scales = stored_scales.astype(np.float32)
            if strategy == "tensor":
                scales = np.full((w.shape[0], 1), scales[0], np.float32)
            weights = dict(num_bits=bits, type="float" if fmt == "fp8" else "int", strategy=strategy, symmetric=True)
            weights["group_size"] = group
            group0 = {"targets": ["Linear"], "weights": weights}
            if kind == "ct-int8-tensor":  # W8A8: activations quantized per token, which jaxinfer leaves out
                group0["input_activations"] = dict(num_bits=8, type="int", strategy="token", dynamic=True)
            qc = {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized" if packed else {"fp8": "float-quantized", "int8": "int-quantized"}[fmt],
                "config_groups": {"group_0": group0},
                "ignore": ["lm_head"],
                "quantization_status": "compressed",
            }
        g = w.shape[1] // scales.shape[1]
        stored[k] = (q, scales)
        deq[k] = q.astype(np.float32) * np.repeat(scales, g, axis=1)
    return qc, tensors, stored, deq


@functools.cache
def _base(root) -> object:
    return tiny.build_q128(root / "base")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("qckpt")


@pytest.fixture(scope="module")
def variant(root):
    """variant(kind) -> (quantized checkpoint path, stored {hf name: (values, scales)}, reference logits)."""
    made = {}

    def make(kind: str):
        if kind not in made:
            base = _base(root)
            if kind.startswith("gguf-"):
                path = tiny.write_gguf_as(base, root / f"{kind}.gguf", kind[5:])
                stored = _gguf_stored(path)
                ref = _hf_gguf_logits(path)
            else:
                qc, tensors, stored, deq = _variant_tensors(base, kind)
                path = tiny.write_quantized_checkpoint(base, root / kind, qc, tensors)
                ref = tiny.hf_logits(tiny.write_float_checkpoint(base, root / f"{kind}-dequantized", deq), IDS)
            made[kind] = (path, stored, ref)
        return made[kind]

    return make


# --- GGUF blocks decoded by hand -----------------------------------------------------------------


def _llama_cpp_rows(n_rows: int, heads: int) -> np.ndarray:
    """For each Hugging Face row of q/k, the llama.cpp row holding it: HF row h*hd + k*hd/2 + j is
    llama.cpp's h*hd + 2*j + k."""
    hd = n_rows // heads
    src = np.empty(n_rows, np.int64)
    for h in range(heads):
        for k in range(2):
            for j in range(hd // 2):
                src[h * hd + k * hd // 2 + j] = h * hd + 2 * j + k
    return src


def _gguf_stored(path) -> dict:
    """Each projection's int8 values (Q4_0: q - 8) and float32 block scales [out, in / 32], decoded from
    the file's raw blocks and put in Hugging Face row order."""
    reader = gguf.GGUFReader(str(path))
    cfg = tiny.Q128
    out = {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type).name
        if qtype not in ("Q8_0", "Q4_0"):
            continue
        cols = int(t.shape[0])
        raw = np.asarray(t.data).reshape(-1, cols // 32, 34 if qtype == "Q8_0" else 18)
        d = raw[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
        if qtype == "Q8_0":
            q = raw[:, :, 2:].copy().view(np.int8)
        else:
            nib = raw[:, :, 2:]
            q = np.concatenate([nib & 0x0F, nib >> 4], axis=2).astype(np.int8) - 8
        q = q.reshape(-1, cols)
        layer, piece = t.name.split(".")[1], t.name.split(".")[2]
        part = {v: k for k, v in llama.GGUF_NAMES.items()}[piece].split(".")[-1]
        if piece in ("attn_q", "attn_k"):
            rows = _llama_cpp_rows(
                q.shape[0], cfg["num_attention_heads"] if piece == "attn_q" else cfg["num_key_value_heads"]
            )
            q, d = q[rows], d[rows]
        out[_hf_name(part, int(layer))] = (q, d)
    return out


def _hf_gguf_logits(path) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


# --- kept as stored ------------------------------------------------------------------------------


def _check_kept(llm, stored: dict, kind: str, group: int | None) -> None:
    assert llm.setup.quant == kind and llm.setup.quant.format.group == group
    for name in QUANTIZED:
        p = llm.params[name]
        assert isinstance(p, quant.QArray), name
        values = _ours(name, {k: v for k, (v, _) in stored.items()}, p.shape)
        scales = _ours(name, {k: s for k, (_, s) in stored.items()}, p.scales.shape)
        if kind == "int4":
            assert p.values.dtype == np.uint8 and np.array_equal(np.asarray(quant.unpack(np.asarray(p.values))), values)
            values = quant.pack(values)
        got = np.asarray(p.values)
        assert got.dtype == values.dtype and np.array_equal(got.view(np.uint8), values.view(np.uint8)), name
        assert np.array_equal(np.asarray(p.scales), scales), name
    for name in ("embed", "lm_head", "final_norm", "attn_norm"):
        assert not isinstance(llm.params[name], quant.QArray) and llm.params[name].dtype == np.float32


KEPT = [
    # (checkpoint, mesh, quant asked, format kept, its group)
    ("fp8-block", "tp1", "auto", "fp8", 128),
    ("fp8-block", "tp2", "fp8", "fp8", 128),
    ("fp8-block", "pp2", "auto", "fp8", 128),
    ("fp8-block-96", "tp2", "auto", "fp8", 128),  # 96-row blocks: partial edge blocks along the outputs
    ("ct-fp8-channel", "tp2", "auto", "fp8", None),
    ("ct-int8-tensor", "tp2", "int8", "int8", None),
    ("ct-int4-group", "tp2", "auto", "int4", 128),
    ("ct-int8-packed", "tp1", "auto", "int8", 128),
    ("gguf-Q8_0", "tp2", "int8", "int8", 32),
    ("gguf-Q4_0", "tp2", "auto", "int4", 32),
]


@pytest.mark.parametrize("ckpt,mesh,asked,kind,group", KEPT)
def test_kept_as_stored_and_logits_equal_the_dequantized_model(variant, ckpt, mesh, asked, kind, group):
    path, stored, ref = variant(ckpt)
    llm = _llm(path, quant=asked, **MESHES[mesh])
    _check_kept(llm, stored, kind, group)
    # On a GPU per-channel fp8 weights meet fp8 activations (quantized per token) in one native matmul.
    native = kind == "fp8" and group is None and quant.native_fp8()
    assert rel_err(llm.score(IDS), ref) < (0.06 if native else 1e-4)


def test_none_dequantizes_and_another_format_requantizes(variant, caplog):
    path, stored, ref = variant("fp8-block")
    plain = _llm(path, tp=2, quant="none")  # every weight float, dequantized
    assert plain.setup.quant == "none"
    assert not any(isinstance(x, quant.QArray) for x in plain.params.values())
    assert rel_err(plain.score(IDS), ref) < 1e-4
    with caplog.at_level(logging.INFO, logger="jaxinfer.checkpoint"):
        q = _llm(path, tp=2, quant="int8")
    assert "dequantizing and requantizing them to int8 (per output channel)" in caplog.text
    spec = llama.weights(q.config)
    for name in QUANTIZED:  # int8 per channel, quantized from the dequantized fp8 weights
        want = quant.quantize(np.asarray(plain.params[name]), spec[name].in_axes, "int8")
        assert np.array_equal(np.asarray(q.params[name].values), want.values), name
        assert np.array_equal(np.asarray(q.params[name].scales), want.scales), name
    gg, _, gref = variant("gguf-Q8_0")
    assert rel_err(_llm(gg, quant="none").score(IDS), gref) < 1e-4  # GGUF dequantized
    fp8 = _llm(gg, quant="fp8")  # Q8_0 blocks requantized to fp8 per channel
    assert fp8.params["wq"].values.dtype == quant.FP8 and fp8.params["wq"].scales.shape == (2, 1, 4, 64)


def test_gguf_int8_on_a_q4_0_file_quantizes_per_channel(variant):
    path, _, ref = variant("gguf-Q4_0")
    llm = _llm(path, quant="int8")  # nothing stored Q8_0: int8 per channel from the floats
    assert llm.params["wq"].values.dtype == np.int8 and llm.params["wq"].scales.shape == (2, 1, 4, 64)
    assert rel_err(llm.score(IDS), ref) < 0.05


# --- orbax ---------------------------------------------------------------------------------------


def test_convert_writes_a_quantized_orbax_that_restores_onto_another_mesh(variant, tmp_path):
    from absl.testing import flagsaver

    from jaxinfer import cli

    path, stored, ref = variant("fp8-block")
    if not cli.FLAGS.is_parsed():
        cli.FLAGS(["jaxinfer"])
    out = tmp_path / "fp8-orbax"
    with flagsaver.flagsaver(model=str(path), output=str(out), quant="auto", tp=1, dtype="float32"):
        cli.cmd_convert()
    meta = json.loads((out / checkpoint.ORBAX_MARKER).read_text())
    assert meta["quant"] == {"format": "fp8", "group": 128}
    restored = _llm(out, tp=2, quant="auto")
    _check_kept(restored, stored, "fp8", 128)
    assert restored.params["wq"].values.sharding.spec[2] == "tp"
    assert rel_err(restored.score(IDS), ref) < 1e-4
    same = _llm(out, pp=2, quant="fp8")  # the recorded mode, named
    _check_kept(same, stored, "fp8", 128)
    plain = _llm(out, tp=2, quant="none")  # dequantized on the devices
    assert not any(isinstance(x, quant.QArray) for x in plain.params.values())
    assert rel_err(plain.score(IDS), ref) < 1e-4


def test_orbax_keeps_gguf_groups_and_quantizes_float_checkpoints_on_the_devices(variant, tmp_path):
    path, stored, ref = variant("gguf-Q4_0")
    llm = _llm(path, quant="int4")
    checkpoint.save_orbax(tmp_path / "q4", llm.config, llm.params, None)  # the format read off the params
    assert json.loads((tmp_path / "q4" / checkpoint.ORBAX_MARKER).read_text())["quant"] == {
        "format": "int4",
        "group": 32,
    }
    restored = _llm(tmp_path / "q4", tp=2, quant="int4")
    _check_kept(restored, stored, "int4", 32)
    assert rel_err(restored.score(IDS), ref) < 1e-4
    # a float orbax checkpoint loaded with quant="int8": quantized on the devices exactly as while loading
    base = _base(path.parent)
    plain = _llm(base)
    checkpoint.save_orbax(tmp_path / "float", plain.config, plain.params, None)
    on_load = _llm(base, quant="int8", tp=2)
    on_device = _llm(tmp_path / "float", quant="int8", tp=2)
    for name in QUANTIZED:
        assert np.array_equal(np.asarray(on_device.params[name].values), np.asarray(on_load.params[name].values))
        assert np.array_equal(np.asarray(on_device.params[name].scales), np.asarray(on_load.params[name].scales))


# --- bad input: one clear error before any weight is read -------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch):
    import jax

    def forbidden(*args, **kwargs):
        raise AssertionError("a weight was read or a device array made before the bad checkpoint was reported")

    for name in ("read_shard", "place", "restore_orbax", "random_params"):
        monkeypatch.setattr(checkpoint, name, forbidden)
    monkeypatch.setattr(jax, "make_array_from_callback", forbidden)


def _edited(root, kind: str, name: str, qc=None, tensors=None, drop=()):
    """Checkpoint `kind` written again with its quantization_config updated by `qc` and tensors replaced
    or dropped."""
    base = _base(root)
    config, all_tensors, _, _ = _variant_tensors(base, kind)
    all_tensors = {k: v for k, v in all_tensors.items() if k not in drop} | (tensors or {})
    return tiny.write_quantized_checkpoint(base, root / name, {**config, **(qc or {})}, all_tensors)


def _fp8_blocks_of_96_inputs(root) -> dict:
    tensors = {}
    for k, w in tiny.load_safetensors(_base(root)).items():
        tensors[k] = w
        if tiny.is_quant_linear(k):
            tensors[k], tensors[k + "_scale_inv"] = tiny.fp8_blocks(w, (128, 96))
    return tensors


L0 = "model.layers.0.self_attn.q_proj.weight"
ERRORS = {
    "unknown-method": (
        "fp8-block",
        dict(qc={"quant_method": "gptq"}),
        r"quant_method='gptq' is not supported; jaxinfer loads 'fp8' and 'compressed-tensors' checkpoints",
    ),
    "fp8-missing-scale": (
        "fp8-block",
        dict(drop=(L0 + "_scale_inv",)),
        rf"tensor '{L0}' is float8 but its scale '{L0}_scale_inv' is missing",
    ),
    "fp8-misshapen-scale": (
        "fp8-block",
        dict(tensors={L0 + "_scale_inv": np.ones((2, 1), np.float32)}),
        rf"scale '{L0}_scale_inv' has shape \(2, 1\); {L0} \(256, 256\) in blocks of 128x128 needs \(2, 2\)",
    ),
    "fp8-partial-input-blocks": (
        "fp8-block",
        dict(qc={"weight_block_size": [128, 96]}, tensors={}),
        r"not a whole number of fp8 blocks of 96 inputs, so the blocks cannot be kept as stored; load it with "
        r"quant='none'",
    ),
    "ct-missing-scale": (
        "ct-int8-tensor",
        dict(drop=(L0 + "_scale",)),
        rf"tensor '{L0}' is stored I8 but its scale '{L0}_scale' is missing",
    ),
    "ct-misshapen-group-scale": (
        "ct-int4-group",
        dict(tensors={L0 + "_scale": np.ones((256, 1), np.float32)}),
        rf"scale '{L0}_scale' has shape \(256, 1\); {L0} \(256, 256\) with strategy 'group' needs \(256, 2\)",
    ),
    "ct-asymmetric": (
        "ct-int4-group",
        dict(
            qc={
                "config_groups": {
                    "g": {
                        "targets": ["Linear"],
                        "weights": dict(num_bits=4, type="int", strategy="group", group_size=128, symmetric=False),
                    }
                }
            }
        ),
        r"asymmetric weights \(zero points\) are not supported",
    ),
    "ct-unknown-format": (
        "ct-int4-group",
        dict(qc={"format": "nvfp4-pack-quantized"}),
        r"format='nvfp4-pack-quantized' is not supported; compressed-tensors formats read: float-quantized, "
        r"int-quantized, naive-quantized, pack-quantized",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_checkpoints_fail_before_any_weight_is_read(root, no_weight_reads, case):
    kind, edit, match = ERRORS[case]
    if case == "fp8-partial-input-blocks":
        edit = dict(edit, tensors=_fp8_blocks_of_96_inputs(root))
    with pytest.raises(JaxinferError, match=match):
        _llm(_edited(root, kind, case, **edit), quant="auto")


def test_partial_input_blocks_still_load_dequantized(variant, root):
    base = _base(root)
    tensors, deq = {}, {}
    for k, w in tiny.load_safetensors(base).items():
        tensors[k] = w
        if tiny.is_quant_linear(k):
            q, inv = tiny.fp8_blocks(w, (128, 96))
            tensors[k], tensors[k + "_scale_inv"] = q, inv
            deq[k] = q.astype(np.float32) * np.repeat(np.repeat(inv, 128, 0), 96, 1)[: w.shape[0], : w.shape[1]]
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 96]}
    path = tiny.write_quantized_checkpoint(base, root / "fp8-in96", qc, tensors)
    ref = tiny.hf_logits(tiny.write_float_checkpoint(base, root / "fp8-in96-dequantized", deq), IDS)
    assert rel_err(_llm(path, quant="none").score(IDS), ref) < 1e-4


@pytest.mark.parametrize("kind", ["fp8-block", "ct-int4-group"])
def test_groups_crossing_a_tp_shard_name_the_sizes_that_work(root, no_weight_reads, kind):
    # intermediate 384: w_down's inputs are 3 groups of 128, which tp=2 would split mid-group
    base = root / "i384"
    if not (base / "config.json").exists():
        tiny.build_q128(base, intermediate_size=384)
    qc, tensors, _, _ = _variant_tensors(base, kind)
    path = tiny.write_quantized_checkpoint(base, root / f"i384-{kind}", qc, tensors)
    with pytest.raises(JaxinferError) as e:
        _llm(path, quant="auto", tp=2)
    prefix = "quant='fp8' (the checkpoint's fp8 (groups of 128 inputs))" if kind == "fp8-block" else "quant='int4'"
    assert str(e.value).startswith(
        f"{prefix}: w_down dim 1 (384 inputs in 3 groups, 384 stored) cannot be split 2 ways over tp without a "
        "group or a packed byte crossing a shard; tp sizes that work: [1, 3]"
    ), str(e.value)
