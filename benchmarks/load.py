"""Load generator: Poisson arrivals with mixed prompt and output lengths (fixed seed), served by the
engine (continuous batching) and by the static-batch path, on the same model and requests.

    python benchmarks/load.py --requests=32 --rate=2 [--model=smollm2-135m]

Reports throughput and TTFT / TPOT percentiles. For the static path a batch takes every request that
has arrived (up to max_num_seqs) when the previous batch returns, and its tokens are visible when it
returns.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

import jaxinfer

flags.DEFINE_string("model", "smollm2-135m", "Model to serve.")
flags.DEFINE_integer("requests", 32, "Number of requests.")
flags.DEFINE_float("rate", 2.0, "Mean arrivals per second (Poisson).")
flags.DEFINE_integer("max_num_seqs", 16, "Engine slots, and the static path's batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the arrival times and lengths.")
FLAGS = flags.FLAGS


def workload(n: int, rate: float, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    prompts = [rng.integers(3, vocab, int(rng.integers(8, 200))).tolist() for _ in range(n)]
    outputs = [int(rng.integers(8, 96)) for _ in range(n)]
    return arrivals, prompts, outputs


def percentiles(xs) -> str:
    return " / ".join(f"{np.percentile(xs, q) * 1e3:.0f}" for q in (50, 90, 99))


def run_engine(llm, arrivals, prompts, outputs) -> dict:
    engine = llm.engine
    first, done, reqs = {}, {}, {}
    t0 = time.perf_counter()
    i = 0
    while i < len(prompts) or engine.has_work():
        now = time.perf_counter() - t0
        while i < len(prompts) and arrivals[i] <= now:
            reqs[i] = engine.add(
                prompts[i], jaxinfer.SamplingParams(max_tokens=outputs[i], temperature=0, ignore_eos=True)
            )
            i += 1
        if not engine.has_work():
            time.sleep(max(0.0, arrivals[i] - now))
            continue
        engine.step()
        now = time.perf_counter() - t0
        for k, r in reqs.items():
            if r.row.ids and k not in first:
                first[k] = now
            if r.row.done and k not in done:
                done[k] = now
    return summarize(arrivals, outputs, first, done, time.perf_counter() - t0)


def run_static(llm, arrivals, prompts, outputs) -> dict:
    first, done = {}, {}
    t0 = time.perf_counter()
    i, n = 0, len(prompts)
    while i < n:
        now = time.perf_counter() - t0
        if arrivals[i] > now:
            time.sleep(arrivals[i] - now)
            now = arrivals[i]
        batch = [k for k in range(i, min(n, i + FLAGS.max_num_seqs)) if arrivals[k] <= now] or [i]
        params = jaxinfer.SamplingParams(max_tokens=max(outputs[k] for k in batch), temperature=0, ignore_eos=True)
        llm.generate_static([prompts[k] for k in batch], params)
        end = time.perf_counter() - t0
        for k in batch:
            first[k] = done[k] = end
        i = batch[-1] + 1
    return summarize(arrivals, outputs, first, done, time.perf_counter() - t0)


def summarize(arrivals, outputs, first, done, wall) -> dict:
    ttft = [first[k] - arrivals[k] for k in first]
    tpot = [(done[k] - first[k]) / max(1, outputs[k] - 1) for k in done if done[k] > first[k]]
    return {"tok_s": sum(outputs) / wall, "ttft": ttft, "tpot": tpot or [0.0], "wall": wall}


def main(argv):
    del argv
    # Scanned layers: each of the engine's ~70 shapes compiles in about a second (unrolled: several).
    llm = jaxinfer.LLM(FLAGS.model, max_num_seqs=FLAGS.max_num_seqs, max_seq_len=512, unroll_layers=False)
    arrivals, prompts, outputs = workload(FLAGS.requests, FLAGS.rate, llm.config.vocab_size, FLAGS.seed)
    t0 = time.perf_counter()
    shapes = llm.engine.warmup()  # every engine shape, compiled ahead of traffic
    print(f"engine warm-up: {shapes} shapes compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    run_static(llm, *workload(FLAGS.max_num_seqs, 100.0, llm.config.vocab_size, FLAGS.seed + 1))
    rows = {
        "engine (continuous batching)": run_engine(llm, arrivals, prompts, outputs),
        "static batches": run_static(llm, arrivals, prompts, outputs),
    }
    print(
        f"{FLAGS.model}, {FLAGS.requests} requests, Poisson {FLAGS.rate}/s, prompts 8-200, outputs 8-96 tokens, "
        f"{FLAGS.max_num_seqs} slots"
    )
    print("| path | output tok/s | TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 | wall s |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['tok_s']:.1f} | {percentiles(r['ttft'])} | {percentiles(r['tpot'])} | {r['wall']:.1f} |")


if __name__ == "__main__":
    app.run(main)
