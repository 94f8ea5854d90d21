"""Where a pipeline's decode step spends its matmul time on simulated CPU devices: `bench` at batch 1
under jax.profiler, then the mean time of each XLA dot kind in the trace (the head is the slowest).

    python benchmarks/pp_profile.py --pp=1,2,3

For each pp, in its own process: the head's mean time and the sum of the other dot kinds' means. On a
lone device (pp = 1) a matmul has both cores; in a pipeline a stage waiting at the hand-over holds one of
the thread pool's threads (README, "Validation on this machine").
"""

import argparse
import collections
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, jax
pp, out = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_num_cpu_devices", pp)
from jaxinfer import bench
from jaxinfer.llm import LLM
llm = LLM("smollm2-135m", pp=pp, max_seq_len=256, max_num_seqs=4)
bench.run(llm, [1], 64, 33)  # compiles every shape first
with jax.profiler.trace(out):
    r = bench.run(llm, [1], 64, 17)
print(r["rows"][0]["tpot_median_s"])
"""


def dot_means(trace_dir: str) -> dict[str, float]:
    """Mean microseconds of each `dot.N` event in the trace."""
    (path,) = Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz")
    durs = collections.defaultdict(list)
    for e in json.load(gzip.open(path))["traceEvents"]:
        if e.get("ph") == "X" and e.get("name", "").startswith("dot."):
            durs[e["name"]].append(e["dur"])
    return {k: sum(v) / len(v) for k, v in durs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", default="1,2,3")
    args = ap.parse_args()
    env = dict(os.environ, JAXINFER_COMPILATION_CACHE="")
    env.pop("XLA_FLAGS", None)
    print("| pp | TPOT ms (traced) | head dot mean ms | other dot kinds | sum of their means ms |")
    print("|---:|---:|---:|---:|---:|")
    for pp in (int(x) for x in args.pp.split(",")):
        with tempfile.TemporaryDirectory() as out:
            r = subprocess.run(
                [sys.executable, "-c", CHILD, str(pp), out], cwd=ROOT, env=env, capture_output=True, text=True
            )
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            means = dot_means(out)
        head = max(means, key=means.get)
        rest = [v for k, v in means.items() if k != head]
        tpot = float(r.stdout.strip().splitlines()[-1])
        print(
            f"| {pp} | {tpot * 1e3:.1f} | {means[head] / 1e3:.2f} | {len(rest)} | {sum(rest) / 1e3:.2f} |", flush=True
        )


if __name__ == "__main__":
    main()
