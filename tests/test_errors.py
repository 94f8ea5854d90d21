"""Each bad input raises one JaxinferError naming the value and the fix, before any device work."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import jaxinfer
from jaxinfer import JaxinferError
from tests import tiny


@pytest.fixture
def llama_copy(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir("llama2"), tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_mesh_larger_than_devices(tiny_dir):
    with pytest.raises(JaxinferError, match=r"needs 16 devices but 8 cpu devices exist.*device_count=16"):
        jaxinfer.LLM(str(tiny_dir("llama2")), tp=16)


def test_bad_axis_size_and_unknown_preset(tiny_dir):
    with pytest.raises(JaxinferError, match=r"tp=0 must be a positive integer"):
        jaxinfer.LLM(str(tiny_dir("llama2")), tp=0)
    with pytest.raises(JaxinferError, match=r"mesh preset 'nope'.*known: .*tp4"):
        jaxinfer.LLM(str(tiny_dir("llama2")), mesh="nope")


def test_heads_not_divisible_by_tp(tiny_dir):
    with pytest.raises(JaxinferError, match=r"num_attention_heads=8 is not divisible by tp=3"):
        jaxinfer.LLM(str(tiny_dir("llama2")), tp=3)


def test_unknown_architecture(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(JaxinferError, match=r"unknown architecture model_type='gpt_neox'; supported: llama"):
        jaxinfer.LLM(str(llama_copy))


def test_missing_config_and_missing_path(tmp_path):
    with pytest.raises(JaxinferError, match=r"has no config.json"):
        jaxinfer.LLM(str(tmp_path))
    with pytest.raises(JaxinferError, match=r"no such path exists"):
        jaxinfer.LLM(str(tmp_path / "absent"))


def test_truncated_and_corrupt_safetensors(llama_copy):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JaxinferError, match=r"model.safetensors is truncated"):
        jaxinfer.LLM(str(llama_copy))
    path.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(JaxinferError, match=r"model.safetensors is corrupt"):
        jaxinfer.LLM(str(llama_copy))


def test_truncated_gguf(tiny_dir, tmp_path):
    path = tiny.write_gguf(tiny_dir("llama2"), tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(JaxinferError, match=r"m.gguf"):
        jaxinfer.LLM(str(path))
    path.write_bytes(data[:100])
    with pytest.raises(JaxinferError, match=r"not a readable GGUF file"):
        jaxinfer.LLM(str(path))


def test_missing_tensor_is_named(llama_copy):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(llama_copy / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(llama_copy / "model.safetensors"))
    with pytest.raises(JaxinferError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        jaxinfer.LLM(str(llama_copy))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(top_k=-1), r"top_k=-1 must be an integer >= 0"),
        (dict(max_tokens=0), r"max_tokens=0 must be an integer >= 1"),
    ],
)
def test_invalid_sampling_parameters(kwargs, match):
    with pytest.raises(JaxinferError, match=match):
        jaxinfer.SamplingParams(**kwargs)


def test_prompt_longer_than_context_and_ids_outside_vocab(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("llama2")), max_seq_len=32)
    with pytest.raises(JaxinferError, match=r"prompt 0 has 40 tokens, longer than the context.*max_seq_len=32"):
        llm.generate([list(range(40))])
    with pytest.raises(JaxinferError, match=r"token id 256 outside the vocabulary \[0, 256\)"):
        llm.generate([[1, 2, 256]])
    with pytest.raises(JaxinferError, match=r"no tokenizer files; pass prompts as token-id lists"):
        llm.generate("hello")
    with pytest.raises(JaxinferError, match=r"max_seq_len=1000 must be in \[2, 256\]"):
        jaxinfer.LLM(str(tiny_dir("llama2")), max_seq_len=1000)


def test_unknown_generate_argument():
    with pytest.raises(JaxinferError, match=r"unknown arguments \['temprature'\]"):
        jaxinfer.generate("hi", temprature=0.5)


# --- corrupt checkpoint files: one JaxinferError naming the file, the key and the fix, before any weight is read


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fails the test if loading gets as far as reading a weight or creating a device array."""
    import jax

    from jaxinfer import checkpoint

    def forbidden(*args, **kwargs):
        raise AssertionError("a weight was read or a device array made before the corrupt file was reported")

    for name in ("read_shard", "place", "restore_orbax", "random_params"):
        monkeypatch.setattr(checkpoint, name, forbidden)
    monkeypatch.setattr(jax, "make_array_from_callback", forbidden)


HF_FIX = r"; set the published model's value there or re-download the checkpoint"


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: [c], r"config.json holds a JSON array, not an object \{\.\.\.\}" + HF_FIX),
        (
            lambda c: {k: v for k, v in c.items() if k != "hidden_size"},
            r"config.json: the key 'hidden_size' is missing",
        ),
        (lambda c: {**c, "hidden_size": "64"}, r"config.json: hidden_size='64' must be a positive integer" + HF_FIX),
        (lambda c: {**c, "num_attention_heads": 0}, r"config.json: num_attention_heads=0 must be a positive integer"),
        (lambda c: {**c, "num_key_value_heads": 0}, r"config.json: num_key_value_heads=0 must be a positive integer"),
        (lambda c: {**c, "num_hidden_layers": -2}, r"config.json: num_hidden_layers=-2 must be a positive integer"),
        (lambda c: {**c, "vocab_size": 0}, r"config.json: vocab_size=0 must be a positive integer"),
        (lambda c: {**c, "intermediate_size": 12.5}, r"config.json: intermediate_size=12.5 must be a positive integer"),
        (lambda c: {**c, "head_dim": 0}, r"config.json: head_dim=0 must be a positive integer"),
        (lambda c: {**c, "max_position_embeddings": "4k"}, r"max_position_embeddings='4k' must be a positive integer"),
        (lambda c: {**c, "rms_norm_eps": -1e-5}, r"config.json: rms_norm_eps=-1e-05 must be a positive number"),
        (lambda c: {**c, "tie_word_embeddings": "no"}, r"config.json: tie_word_embeddings='no' must be true or false"),
        (lambda c: {**c, "rope_parameters": [1]}, r"config.json: rope_parameters=\[1\] must be an object"),
        (lambda c: {**c, "eos_token_id": "</s>"}, r"config.json: eos_token_id='</s>' must be a token id"),
        (
            lambda c: {**c, "head_dim": None, "num_attention_heads": 128},
            r"config.json: hidden_size=64 is not divisible by num_attention_heads=128 and head_dim is not given",
        ),
    ],
    ids=[
        "array",
        "missing-hidden_size",
        "string-hidden_size",
        "zero-heads",
        "zero-kv-heads",
        "negative-layers",
        "zero-vocab",
        "float-intermediate",
        "zero-head_dim",
        "string-max_pos",
        "negative-eps",
        "string-tie",
        "list-rope",
        "string-eos",
        "heads-over-hidden",
    ],
)
def test_corrupt_config_json_names_file_key_and_fix(llama_copy, no_weight_reads, edit, match):
    path = llama_copy / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(JaxinferError, match=match) as e:
        jaxinfer.LLM(str(llama_copy))
    message = str(e.value)
    assert message.startswith(str(path)) and len(message.splitlines()) == 1
    assert message.endswith("; set the published model's value there or re-download the checkpoint")


def test_invalid_json_in_config_and_generation_config(llama_copy, no_weight_reads):
    (llama_copy / "generation_config.json").write_text('{"eos_token_id": 2,')
    with pytest.raises(
        JaxinferError, match=r"generation_config.json is not valid JSON \(.*\); correct it or delete it"
    ):
        jaxinfer.LLM(str(llama_copy))
    (llama_copy / "generation_config.json").write_text('{"eos_token_id": [2, "x"]}')
    with pytest.raises(JaxinferError, match=r"generation_config.json: eos_token_id=\[2, 'x'\] must be a token id"):
        jaxinfer.LLM(str(llama_copy))
    (llama_copy / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(JaxinferError, match=r"config.json is not valid JSON \(.*\); re-download the checkpoint"):
        jaxinfer.LLM(str(llama_copy))


def _word_level_tokenizer(directory):
    import tokenizers
    from tokenizers import models

    vocab = {f"t{i}": i for i in range(256)}
    tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(directory / "tokenizer.json"))


TOK_FIX = r"; correct it \(the published model's tokenizer_config.json has the right value\) or re-download it"


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"eos_token": "t1",', r"tokenizer_config.json is not valid JSON \(.*\)" + TOK_FIX),
        ('["t1"]', r"tokenizer_config.json holds a JSON array, not an object \{\.\.\.\}" + TOK_FIX),
        ('{"add_bos_token": "yes"}', r"tokenizer_config.json: add_bos_token='yes' must be true or false" + TOK_FIX),
        ('{"eos_token": 2}', r"tokenizer_config.json: eos_token=2 must be a token string or \{\"content\": STRING\}"),
        ('{"bos_token": {"content": 1}}', r"tokenizer_config.json: bos_token=\{'content': 1\} must be a token string"),
        ('{"chat_template": 7}', r"tokenizer_config.json: chat_template=7 must be a Jinja template string" + TOK_FIX),
    ],
    ids=["invalid-json", "array", "string-add_bos", "int-eos", "int-bos-content", "int-template"],
)
def test_corrupt_tokenizer_config_names_file_key_and_fix(llama_copy, no_weight_reads, text, match):
    _word_level_tokenizer(llama_copy)
    (llama_copy / "tokenizer_config.json").write_text(text)
    with pytest.raises(JaxinferError, match=match) as e:
        jaxinfer.LLM(str(llama_copy))
    assert str(e.value).startswith(str(llama_copy / "tokenizer_config.json"))
    assert str(e.value).endswith("or re-download it")


def test_a_good_tokenizer_config_still_loads(llama_copy):
    from jaxinfer import checkpoint

    _word_level_tokenizer(llama_copy)
    cfg = {
        "eos_token": {"content": "t2"},
        "bos_token": "t1",
        "add_bos_token": True,
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
        ],
    }
    (llama_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = checkpoint.resolve(str(llama_copy)).tokenizer
    assert tok.eos_token_ids == (2,) and tok.encode("t5") == [1, 5]
    assert tok.render_chat([{"role": "user", "content": "t7"}]) == "t1t7"


ORBAX_FIX = r"; rewrite the checkpoint with `jaxinfer convert --model=SOURCE --output=DIR`"


@pytest.fixture
def orbax_marker(tiny_dir, tmp_path):
    """An orbax checkpoint directory whose jaxinfer.json holds the tiny llama's real config (params/
    is empty: every corrupt marker must be reported before orbax looks at it)."""
    from jaxinfer import checkpoint, config

    cfg = checkpoint.resolve(str(tiny_dir("llama2"))).config
    (tmp_path / "params").mkdir()
    marker = tmp_path / checkpoint.ORBAX_MARKER
    marker.write_text(json.dumps({"config": config.config_to_dict(cfg), "dtype": "float32"}))
    return marker


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: "{", r"jaxinfer.json is not valid JSON \(.*\)" + ORBAX_FIX),
        (lambda m: [m], r"jaxinfer.json holds a JSON array, not an object \{\.\.\.\}" + ORBAX_FIX),
        (lambda m: _without(m, "config"), r"jaxinfer.json: the key 'config' is missing" + ORBAX_FIX),
        (lambda m: {**m, "config": []}, r"jaxinfer.json: the key 'config' is not an object" + ORBAX_FIX),
        (
            lambda m: {**m, "config": _without(m["config"], "hidden_size")},
            r"jaxinfer.json: config lacks the keys \['hidden_size'\]" + ORBAX_FIX,
        ),
        (
            lambda m: {**m, "config": {**m["config"], "num_kv_heads": 0}},
            r"jaxinfer.json: num_kv_heads=0 must be a positive integer" + ORBAX_FIX,
        ),
        (
            lambda m: {**m, "config": {**m["config"], "hidden_size": "64"}},
            r"jaxinfer.json: hidden_size='64' must be a positive integer" + ORBAX_FIX,
        ),
        (
            lambda m: {**m, "config": {**m["config"], "rope_scaling": {"kind": "llama3"}}},
            r"jaxinfer.json config: rope_scaling has unknown keys \['kind'\]" + ORBAX_FIX,
        ),
        (
            lambda m: {**m, "config": {**m["config"], "eos_token_ids": "2"}},
            r"jaxinfer.json config: eos_token_ids='2' must be a token id",
        ),
        (
            lambda m: {**m, "config": {**m["config"], "heads": 8}},
            r"jaxinfer.json: config has unknown keys \['heads'\]",
        ),
    ],
    ids=[
        "invalid-json",
        "array",
        "no-config",
        "list-config",
        "missing-hidden_size",
        "zero-kv-heads",
        "string-hidden_size",
        "unknown-rope-key",
        "string-eos",
        "unknown-key",
    ],
)
def test_corrupt_orbax_marker_names_file_key_and_fix(orbax_marker, no_weight_reads, edit, match):
    meta = json.loads(orbax_marker.read_text())
    new = edit(meta)
    orbax_marker.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(JaxinferError, match=match) as e:
        jaxinfer.LLM(str(orbax_marker.parent))
    assert str(e.value).startswith(str(orbax_marker))
    assert str(e.value).endswith("; rewrite the checkpoint with `jaxinfer convert --model=SOURCE --output=DIR`")


def test_a_good_orbax_marker_resolves(orbax_marker, tiny_dir):
    from jaxinfer import checkpoint

    assert checkpoint.resolve(str(orbax_marker.parent)).config == checkpoint.resolve(str(tiny_dir("llama2"))).config


# --- the CLI: a bad flag value prints one `error: ...` line on stderr (no traceback) and exits 1


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "jaxinfer", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _one_error_line(r) -> str:
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    "args,want",
    [
        (
            ["generate", "--prompt_ids=1,a"],
            "error: --prompt_ids=1,a: 'a' is not a token id; give comma-separated integers >= 0, "
            "e.g. --prompt_ids=1,2,3",
        ),
        (
            ["generate", "--prompt_ids=4,-1"],
            "error: --prompt_ids=4,-1: '-1' is not a token id; give comma-separated integers >= 0, "
            "e.g. --prompt_ids=1,2,3",
        ),
        (
            ["bench", "--batch_sizes=a"],
            "error: --batch_sizes=a: 'a' is not a batch size; give comma-separated integers >= 1, "
            "e.g. --batch_sizes=1,16,64",
        ),
        (
            ["bench", "--batch_sizes=1,0"],
            "error: --batch_sizes=1,0: '0' is not a batch size; give comma-separated integers >= 1, "
            "e.g. --batch_sizes=1,16,64",
        ),
        (
            ["bench", "--batch_sizes=4,-2"],
            "error: --batch_sizes=4,-2: '-2' is not a batch size; give comma-separated integers >= 1, "
            "e.g. --batch_sizes=1,16,64",
        ),
        (["explain", "--model=llama3-8b", "--batch=0"], "error: --batch=0 must be an integer >= 1"),
        (["bench", "--gen_len=-3"], "error: --gen_len=-3 must be an integer >= 1"),
    ],
    ids=[
        "prompt_ids-letter",
        "prompt_ids-negative",
        "batch_sizes-letter",
        "batch_sizes-zero",
        "batch_sizes-negative",
        "explain-batch-zero",
        "bench-gen_len-negative",
    ],
)
def test_cli_bad_integer_lists(args, want):
    assert _one_error_line(_cli(*args)) == want


MESH_FIX = 'write it as {"axes": {"tp": 4, ...}, "rules": {"vocab": null, ...}} ("rules" optional)'


@pytest.mark.parametrize(
    "text,want",
    [
        (
            None,
            "error: mesh preset '{path}' is neither a file nor a known preset; pass the path of an existing JSON "
            "file or a preset name (known: dp2-tp4, tp1, tp2, tp4, tp8)",
        ),
        (
            '{"axes": {"tp": 2}',
            "error: {path} is not valid JSON (Expecting ',' delimiter: line 1 column 19 (char 18)); " + MESH_FIX,
        ),
        ('[{"tp": 2}]', "error: {path} holds a JSON array, not an object {...}; " + MESH_FIX),
        ('{"axes": [2]}', "error: mesh preset {path}: axes=[2] must be an object of axis name -> size; " + MESH_FIX),
        ('{"axes": {"tp": "2"}}', "error: mesh preset {path}: axes.tp='2' must be a positive integer; " + MESH_FIX),
        ('{"axes": {"tp": 0}}', "error: mesh preset {path}: axes.tp=0 must be a positive integer; " + MESH_FIX),
        (
            '{"axes": {"tp": 2}, "rules": {"vocab": "xx"}}',
            "error: mesh preset {path}: rules.vocab='xx' must be one of ['dp', 'pp', 'tp', 'ep', 'sp'] or null; "
            + MESH_FIX,
        ),
        ('{"axis": {"tp": 2}}', "error: mesh preset {path} has unknown keys ['axis']; " + MESH_FIX),
    ],
    ids=["missing", "invalid-json", "array", "axes-list", "axes-string", "axes-zero", "rules-axis", "unknown-key"],
)
def test_cli_bad_mesh_file(tmp_path, text, want):
    path = tmp_path / "bad.json"
    if text is not None:
        path.write_text(text)
    r = _cli("generate", "--prompt_ids=1,2", f"--mesh={path}")
    assert _one_error_line(r) == want.replace("{path}", str(path))


def test_cli_empty_stop_string_and_corrupt_checkpoint(llama_copy):
    line = _one_error_line(_cli("generate", "--prompt_ids=1,2", "--stop="))
    assert line.startswith("error: stop=") and '""' in line
    (llama_copy / "config.json").write_text("[]")
    line = _one_error_line(_cli("generate", f"--model={llama_copy}", "--prompt_ids=1,2"))
    assert line == (
        f"error: {llama_copy / 'config.json'} holds a JSON array, not an object {{...}}; set the published model's "
        "value there or re-download the checkpoint"
    )
