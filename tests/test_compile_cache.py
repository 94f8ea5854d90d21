"""The persistent compilation cache: a second process compiles nothing it compiled before."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
for name in ("jax", "jaxinfer"):
    logging.getLogger(name).setLevel(logging.WARNING)
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
logging.getLogger("jaxinfer.compile_cache").setLevel(logging.INFO)
import jaxinfer
llm = jaxinfer.LLM(sys.argv[1], max_seq_len=64, max_num_seqs=2, page_size=8, num_pages=16)
print(llm.generate([[3, 4, 5]], jaxinfer.SamplingParams(max_tokens=4, temperature=0))[0].token_ids)
"""


def _run(model: str, cache: Path | str) -> str:
    env = {**os.environ, "JAXINFER_COMPILATION_CACHE": str(cache), "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-c", RUN, model], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_a_restarted_process_loads_its_steps_from_the_cache(tiny_dir, tmp_path):
    cache = tmp_path / "xla"
    first = _run(str(tiny_dir("llama3")), cache)
    assert f"persistent compilation cache: {cache}" in first
    written = sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_decode"))
    assert written, "the decode step was not written to the cache"
    second = _run(str(tiny_dir("llama3")), cache)
    assert first.splitlines()[-1] == second.splitlines()[-1]  # same tokens
    assert "Persistent compilation cache hit for 'jit_decode'" in second
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit_decode'" not in second
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("jit_decode")) == written


def test_an_empty_directory_turns_the_cache_off(tiny_dir, tmp_path):
    out = _run(str(tiny_dir("llama3")), "")
    assert "persistent compilation cache:" not in out and "Persistent compilation cache hit" not in out
