"""jaxinfer beside its peers on the same weights, prompts and lengths (greedy, fp32 on CPU).

Each engine runs in its own process, engines alternate for --rounds rounds, and the median of each is
printed with its ratio to jaxinfer and to the memory roofline (weights read once per decode step).
Peers: Hugging Face transformers (loads the same GGUF, dequantized), and llama.cpp through
llama-cpp-python when it is installed (the `bench` extra), on the embedded model rewritten as an F32
GGUF so it reads the same fp32 weights. llama.cpp runs batch 1 only.

    python benchmarks/compare.py --batch_sizes=1,16 --gen_len=64
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes (llama.cpp: 1 only).")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per sequence.")
flags.DEFINE_integer("gen_len", 64, "New tokens per sequence.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds per engine.")
flags.DEFINE_integer("threads", os.cpu_count() or 1, "CPU threads for every engine.")
flags.DEFINE_list("engines", ["jaxinfer", "transformers", "llama.cpp"], "Engines to run, when installed.")
flags.DEFINE_string("engine", None, "Internal: run one engine in this process and print JSON.")
flags.DEFINE_integer("batch", 1, "Internal: batch size for --engine.")
flags.DEFINE_string("f32_gguf", None, "Internal: path of the F32 GGUF for llama.cpp.")
FLAGS = flags.FLAGS

TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "salt, grain and cloth. Over the centuries it grew into a port, then a capital, and its libraries "
    "drew scholars from every corner of the continent."
)


def prompts(tok_ids: list[int], batch: int, length: int) -> list[list[int]]:
    return [(tok_ids * 4)[i : i + length] for i in range(batch)]


def run_jaxinfer(batch: int) -> dict:
    import jaxinfer

    llm = jaxinfer.LLM("smollm2-135m")
    ids = prompts(llm.tokenizer.encode(TEXT), batch, FLAGS.prompt_len)
    params = jaxinfer.SamplingParams(max_tokens=FLAGS.gen_len, temperature=0, ignore_eos=True)
    # The static-batch path, as the peers run: one padded batch. (The engine's generate() meets shapes
    # of its own on a second call, prefix-cache hits among them, and would time their compilation.)
    llm.generate_static(ids, params)  # compile
    t0 = time.perf_counter()
    outs = llm.generate_static(ids, params)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "first": outs[0].token_ids}


def run_transformers(batch: int) -> dict:
    import torch

    from jaxinfer import checkpoint
    from tests import tiny

    torch.set_num_threads(FLAGS.threads)
    tok, model = tiny.hf_from_gguf(checkpoint.builtin_path("smollm2-135m"))
    ids = torch.tensor(prompts(tok(TEXT)["input_ids"], batch, FLAGS.prompt_len))
    kwargs = dict(max_new_tokens=FLAGS.gen_len, min_new_tokens=FLAGS.gen_len, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kwargs)
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
    return {"seconds": time.perf_counter() - t0, "first": out[0, ids.shape[1] :].tolist()}


def run_llama_cpp(batch: int) -> dict:
    import llama_cpp

    from jaxinfer import checkpoint

    tok = checkpoint.open_gguf(checkpoint.builtin_path("smollm2-135m")).tokenizer
    ids = prompts(tok.encode(TEXT), 1, FLAGS.prompt_len)[0]
    llm = llama_cpp.Llama(FLAGS.f32_gguf, n_ctx=256, n_threads=FLAGS.threads, n_batch=256, verbose=False)
    eos = llm.token_eos()

    def generate():
        llm.reset()
        out = llm.create_completion(ids, max_tokens=FLAGS.gen_len, temperature=0.0, top_k=1, logit_bias={eos: -1e9})
        return out

    generate()
    t0 = time.perf_counter()
    out = generate()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "first": tok.encode(out["choices"][0]["text"])[: FLAGS.gen_len]}


def write_f32_gguf(path: Path) -> None:
    """The embedded model with every tensor dequantized to F32, metadata unchanged."""
    import gguf
    import numpy as np

    from jaxinfer import checkpoint

    reader = gguf.GGUFReader(str(checkpoint.builtin_path("smollm2-135m")))
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), kind)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        writer.add_tensor(t.name, np.ascontiguousarray(data, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


ENGINES = {"jaxinfer": run_jaxinfer, "transformers": run_transformers, "llama.cpp": run_llama_cpp}


def installed(engine: str) -> bool:
    import importlib.util

    return engine != "llama.cpp" or importlib.util.find_spec("llama_cpp") is not None


def roofline_tok_s(batch: int) -> tuple[float, float, float]:
    """(peak GB/s, GB read per decode step, tokens/s at the roofline) on one CPU device."""
    import jax

    from jaxinfer import bench, checkpoint

    cfg = checkpoint.open_gguf(checkpoint.builtin_path("smollm2-135m")).config
    peak = bench.peak_bandwidth(jax.devices()[0])
    step = cfg.param_count * 4
    return peak / 1e9, step / 1e9, batch * peak / step


def main(argv):
    del argv
    if FLAGS.engine:
        print(json.dumps(ENGINES[FLAGS.engine](FLAGS.batch)))
        return
    engines = [e for e in FLAGS.engines if installed(e)]
    f32 = Path(tempfile.mkdtemp()) / "smollm2-135m-f32.gguf"
    if "llama.cpp" in engines:
        write_f32_gguf(f32)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[tuple[str, int], list[dict]] = {}
    for batch in map(int, FLAGS.batch_sizes):
        for _ in range(FLAGS.rounds):
            for engine in engines:
                if engine == "llama.cpp" and batch != 1:
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    f"--engine={engine}",
                    f"--batch={batch}",
                    f"--f32_gguf={f32}",
                    f"--prompt_len={FLAGS.prompt_len}",
                    f"--gen_len={FLAGS.gen_len}",
                    f"--threads={FLAGS.threads}",
                ]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
                if r.returncode:
                    sys.exit(f"{engine} failed:\n{r.stderr[-3000:]}")
                results.setdefault((engine, batch), []).append(json.loads(r.stdout.strip().splitlines()[-1]))
    import platform

    print(
        f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32), greedy, prompt {FLAGS.prompt_len}, "
        f"{FLAGS.gen_len} new tokens, {FLAGS.threads} threads, median of {FLAGS.rounds} alternating runs; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print("| batch | engine | tok/s | vs jaxinfer | roofline tok/s | of roofline | same greedy tokens |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for batch in map(int, FLAGS.batch_sizes):
        peak, step, roof = roofline_tok_s(batch)
        ours = None
        for engine in engines:
            runs = results.get((engine, batch))
            if not runs:
                continue
            tok_s = batch * FLAGS.gen_len / statistics.median(r["seconds"] for r in runs)
            ours = ours or tok_s
            same = runs[0]["first"] == results[("jaxinfer", batch)][0]["first"]
            print(
                f"| {batch} | {engine} | {tok_s:.1f} | {tok_s / ours:.2f} | {roof:.1f} | {tok_s / roof:.0%} | "
                f"{'yes' if same else 'no'} |"
            )
    print(f"roofline: {step:.3f} GB of weights read per decode step at {peak:.1f} GB/s measured peak")


if __name__ == "__main__":
    app.run(main)
