"""jaxinfer beside its peers on the same weights, prompts and lengths (greedy, fp32 on CPU).

Each engine runs in its own process, engines alternate for --rounds rounds, and the median of each is
printed with its ratio to jaxinfer and to the memory roofline (weights read once per decode step).
Peers: Hugging Face transformers (loads the same GGUF, dequantized), and llama.cpp through
llama-cpp-python when it is installed (the `bench` extra), on the embedded model rewritten as an F32
GGUF so it reads the same fp32 weights. llama.cpp runs batch 1 only.

--quant=int8 gives the 8-bit rows instead: jaxinfer with quant="int8", quantize_head=True (int8 values,
one fp32 scale per output channel, the head included) against llama.cpp on the model rewritten as a
Q8_0 GGUF (int8 in blocks of 32 with an fp16 scale each, its head too), both quantized from the same
dequantized weights; transformers has no 8-bit CPU path of the same kind and is left out. The roofline
counts the bytes jaxinfer's parameters take (values and scales).

What runs where for jaxinfer int8 on this one-device CPU mesh: every contraction with an int8 weight at
up to models/quant.KERNEL_MAX_ROWS activation rows (all of decode, and this prefill of 32 tokens) is one
call of the C++ kernel cpu_kernels/int8_matmul (the head included); the rest of the step (norms,
rotary, attention over the cache, sampling) is XLA's. JAXINFER_CPU_KERNELS=0 gives XLA's int8 path
(the weight converted to a float copy before each dot) for comparison.

    python benchmarks/compare.py --batch_sizes=1,16 --gen_len=64
    python benchmarks/compare.py --quant=int8 --batch_sizes=1 --gen_len=64
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
flags.DEFINE_enum("quant", "none", ["none", "int8"], "Weights: fp32 (none) or the 8-bit rows (int8 / Q8_0).")
flags.DEFINE_string("gguf", None, "Internal: path of the GGUF (F32 or Q8_0) for llama.cpp.")
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

    int8 = FLAGS.quant == "int8"
    llm = jaxinfer.LLM("smollm2-135m", quant=FLAGS.quant, quantize_head=int8)
    ids = prompts(llm.tokenizer.encode(TEXT), batch, FLAGS.prompt_len)
    params = jaxinfer.SamplingParams(max_tokens=FLAGS.gen_len, temperature=0, ignore_eos=True)
    # The static-batch path, as the peers run: one padded batch. (The engine's generate() meets shapes
    # of its own on a second call, prefix-cache hits among them, and would time their compilation.)
    llm.generate_static(ids, params)  # compile
    t0 = time.perf_counter()
    outs = llm.generate_static(ids, params)
    dt = time.perf_counter() - t0
    from jaxinfer import explain

    return {"seconds": dt, "first": outs[0].token_ids, "param_bytes": explain.total_param_bytes(llm.setup)}


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
    llm = llama_cpp.Llama(FLAGS.gguf, n_ctx=256, n_threads=FLAGS.threads, n_batch=256, verbose=False)
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


def write_gguf(path: Path, quant: str) -> None:
    """The embedded model with every tensor dequantized to F32 (quant "none") or requantized from
    that to Q8_0 (quant "int8": the 2-D weights; norms stay F32, as llama.cpp's quantizer leaves
    them), metadata unchanged."""
    import gguf
    import numpy as np

    from jaxinfer import checkpoint

    reader = gguf.GGUFReader(str(checkpoint.builtin_path("smollm2-135m")))
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    q8 = gguf.GGMLQuantizationType.Q8_0
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
        data = np.ascontiguousarray(data, np.float32)
        if quant == "int8" and data.ndim == 2:
            writer.add_tensor(t.name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


ENGINES = {"jaxinfer": run_jaxinfer, "transformers": run_transformers, "llama.cpp": run_llama_cpp}


def installed(engine: str) -> bool:
    import importlib.util

    if engine == "transformers" and FLAGS.quant != "none":
        return False
    return engine != "llama.cpp" or importlib.util.find_spec("llama_cpp") is not None


def roofline_tok_s(batch: int, step_bytes: int) -> tuple[float, float, float]:
    """(peak GB/s, GB read per decode step, tokens/s at the roofline) on one CPU device, when a decode
    step reads `step_bytes` of weights."""
    import jax

    from jaxinfer import bench

    peak = bench.peak_bandwidth(jax.devices()[0])
    return peak / 1e9, step_bytes / 1e9, batch * peak / step_bytes


def main(argv):
    del argv
    if FLAGS.engine:
        print(json.dumps(ENGINES[FLAGS.engine](FLAGS.batch)))
        return
    engines = [e for e in FLAGS.engines if installed(e)]
    peer_gguf = Path(tempfile.mkdtemp()) / f"smollm2-135m-{'q8_0' if FLAGS.quant == 'int8' else 'f32'}.gguf"
    if "llama.cpp" in engines:
        write_gguf(peer_gguf, FLAGS.quant)
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
                    f"--gguf={peer_gguf}",
                    f"--quant={FLAGS.quant}",
                    f"--prompt_len={FLAGS.prompt_len}",
                    f"--gen_len={FLAGS.gen_len}",
                    f"--threads={FLAGS.threads}",
                ]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
                if r.returncode:
                    sys.exit(f"{engine} failed:\n{r.stderr[-3000:]}")
                results.setdefault((engine, batch), []).append(json.loads(r.stdout.strip().splitlines()[-1]))
    import platform

    weights = (
        "int8 per-channel (jaxinfer, head included) / Q8_0 (llama.cpp)"
        if FLAGS.quant == "int8"
        else "Q4_1 GGUF dequantized, fp32"
    )
    print(
        f"SmolLM2-135M-Instruct ({weights}), greedy, prompt {FLAGS.prompt_len}, "
        f"{FLAGS.gen_len} new tokens, {FLAGS.threads} threads, median of {FLAGS.rounds} alternating runs; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print("| batch | engine | tok/s | vs jaxinfer | roofline tok/s | of roofline | same greedy tokens |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for batch in map(int, FLAGS.batch_sizes):
        peak, step, roof = roofline_tok_s(batch, results[("jaxinfer", batch)][0]["param_bytes"])
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
