"""The CLI as a user runs it: a fresh process, completions on stdout, logs on stderr."""

import os
import subprocess
import sys

import jaxinfer
from jaxinfer import cli
from jaxinfer.cli import FLAGS


def _run(*args, xla_flags=None):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the CLI must simulate the devices the mesh needs by itself
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run(
        [sys.executable, "-m", "jaxinfer", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_demo_chat_on_three_simulated_devices():
    r = _run("generate", "--tp=3", "--chat", "--prompt=What is the capital of France?", "--max_tokens=24")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."
    assert "loaded smollm2-135m on mesh" in r.stderr and "'tp': 3" in r.stderr


def test_token_ids_and_convert_round_trip(tiny_dir, tmp_path):
    path = str(tiny_dir("qwen2"))
    ids = "3,17,250,42,8"
    direct = _run("generate", f"--model={path}", "--tp=2", f"--prompt_ids={ids}", "--max_tokens=6", "--ignore_eos")
    assert direct.returncode == 0, direct.stderr
    api = jaxinfer.LLM(path).generate(
        [[3, 17, 250, 42, 8]], jaxinfer.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )
    assert direct.stdout.split() == [str(t) for t in api[0].token_ids]
    out = tmp_path / "orbax"
    conv = _run("convert", f"--model={path}", f"--output={out}")
    assert conv.returncode == 0, conv.stderr
    again = _run("generate", f"--model={out}", "--tp=4", f"--prompt_ids={ids}", "--max_tokens=6", "--ignore_eos")
    assert again.returncode == 0, again.stderr
    assert again.stdout == direct.stdout


def test_help_lists_every_flag_and_bad_input_is_one_line():
    r = _run("--help")
    assert r.returncode == 0
    defined = FLAGS.get_flags_for_module(cli)
    assert len(defined) >= 20
    for flag in defined:
        assert f"--{flag.name}:" in r.stdout or f"--[no]{flag.name}:" in r.stdout
    bad = _run("generate", "--tp=2", "--top_p=2", "--prompt=hi")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == "error: top_p=2.0 must be in (0, 1] (1 disables it)"


def test_moe_on_an_expert_parallel_mesh(tiny_dir):
    path = str(tiny_dir("mixtral"))
    args = ("generate", f"--model={path}", "--prompt_ids=3,17,250,42,8", "--max_tokens=6", "--ignore_eos")
    r = _run(*args, "--ep=4", "--tp=2", "--moe_dispatch=all_to_all")
    assert r.returncode == 0, r.stderr
    api = jaxinfer.LLM(path).generate(
        [[3, 17, 250, 42, 8]], jaxinfer.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )
    assert r.stdout.split() == [str(t) for t in api[0].token_ids]
    assert "'ep': 4" in r.stderr
    bad = _run(*args, "--ep=3")
    assert bad.returncode == 1 and "num_experts=8 is not divisible by ep=3" in bad.stderr.strip().splitlines()[-1]
