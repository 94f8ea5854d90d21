"""Every GPU-only check in one call: tests on the GPU, the H100 benchmark, and the transformers peer.

Run from the repository root on a GPU machine (no package registry needed):

    PYTHONPATH=. python benchmarks/gpu_check.py

It prints the versions it found first and a summary table last. Llama-3-8B shapes with random
weights in bf16 (real weights do not travel to the GPU machine); batch 1, 16 and 64. Then the MoE
grouped-matmul kernel (TFLOP/s against the bf16 peak) and Qwen3-30B-A3B shapes (61 GB of bf16
weights, one device) at batch 1 and 16.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, GEN, BATCHES = 128, 128, (1, 16, 64)


def versions() -> str:
    out = []
    for pkg in ("jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "torch"):
        try:
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{pkg} absent")
    return ", ".join(out)


def run(cmd: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return r.returncode, r.stdout + r.stderr


def gpu_tests() -> tuple[str, str]:
    # Single-device numerics against transformers on the GPU (fp32) and the compiled Pallas kernel.
    results = []
    for args in (
        ["tests/test_numerics.py::test_logits_equal_transformers", "-k", "tp1"],
        ["tests/test_paged_attention.py"],
        ["tests/test_moe_kernel.py"],
    ):
        rc, out = run([sys.executable, "-m", "pytest", "-q", *args], 300)
        last = [line for line in out.splitlines() if " passed" in line or " failed" in line or "error" in line]
        results.append((rc, f"{args[0]}: {last[-1] if last else out[-200:]}"))
    ok = all(rc == 0 for rc, _ in results)
    return ("pass" if ok else "FAIL"), "; ".join(d for _, d in results)


def kernel_bench(module: str, lines: int = 1) -> str:
    rc, out = run([sys.executable, "-m", module], 200)
    return " / ".join(out.strip().splitlines()[-lines:]) if rc == 0 and out.strip() else f"FAIL: {out[-300:]}"


def bench_ours(unroll: bool, model: str = "llama3-8b", batches=BATCHES) -> dict:
    code = (
        "import json, jaxinfer; from jaxinfer import bench;"
        f"llm = jaxinfer.LLM({model!r}, random_weights=True, dtype='bfloat16', max_seq_len=1024,"
        f" unroll_layers={unroll});"
        f"print(json.dumps(bench.run(llm, {list(batches)}, {PROMPT}, {GEN})))"
    )
    rc, out = run([sys.executable, "-c", code], 420)
    if rc:
        raise RuntimeError(out[-2000:])
    return (
        json.loads(out.strip().splitlines()[-1])
        if out.strip().startswith("{")
        else json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    )


def bench_transformers() -> dict[int, float]:
    code = f"""
import json, time, torch, transformers
from jaxinfer.config import SHAPES
c = SHAPES["llama3-8b"]
cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
    intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
    num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps)
with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
out = {{}}
for b in {list(BATCHES)}:
    ids = torch.randint(0, c.vocab_size, (b, {PROMPT}), device="cuda")
    kw = dict(max_new_tokens={GEN}, min_new_tokens={GEN}, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw); torch.cuda.synchronize()
        t = time.perf_counter(); model.generate(ids, **kw); torch.cuda.synchronize()
    out[b] = b * {GEN} / (time.perf_counter() - t)
print(json.dumps(out))
"""
    rc, out = run([sys.executable, "-c", code], 420)
    if rc:
        return {}
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    print("versions:", versions(), flush=True)
    t0 = time.time()
    rows = []
    status, detail = gpu_tests()
    rows.append(("tests on GPU (numerics vs transformers, tp=1; Pallas kernel compiled)", status, detail))
    kb = kernel_bench("pallas_kernels.paged_attention")
    rows.append(("paged attention kernel, batch 16, context 4096 (target 2.5 TB/s)", "see detail", kb))
    rows.append(
        (
            "MoE grouped matmul vs ragged_dot, bf16 (H100 peak 989 TFLOP/s)",
            "see detail",
            kernel_bench("pallas_kernels.moe", 2),
        )
    )
    results = {}
    for unroll in (False, True):
        try:
            results[unroll] = bench_ours(unroll)
        except RuntimeError as e:
            rows.append((f"bench llama3-8b unroll={unroll}", "FAIL", str(e)[-300:]))
    peer = bench_transformers()
    from jaxinfer.bench import format_table

    for unroll, r in results.items():
        print(format_table(r), flush=True)
        for row in r["rows"]:
            b = row["batch"]
            ratio = f", transformers {peer[b]:.0f} tok/s ({row['generate_tok_s'] / peer[b]:.2f}x)" if b in peer else ""
            rows.append(
                (
                    f"llama3-8b bf16 batch {b} ({'unrolled' if unroll else 'scan'})",
                    f"MBU {row['mbu']:.0%}" + (" ok" if b != 1 or row["mbu"] >= 0.75 else " below 75% target"),
                    f"TPOT {row['tpot_median_s'] * 1e3:.2f} ms, {row['decode_tok_s']:.0f} tok/s decode, "
                    f"{row['generate_tok_s']:.0f} tok/s generate(){ratio}; peak {r['peak_bandwidth_gb_s']:.0f} GB/s",
                )
            )
    try:
        moe = bench_ours(False, "qwen3-30b-a3b", (1, 16))
        print(format_table(moe), flush=True)
        for row in moe["rows"]:
            rows.append(
                (
                    f"qwen3-30b-a3b bf16 batch {row['batch']} (one device)",
                    f"MBU {row['mbu']:.0%}",
                    f"TPOT {row['tpot_median_s'] * 1e3:.2f} ms, {row['decode_tok_s']:.0f} tok/s decode; "
                    f"reads {row['bytes_read_per_step'] / 1e9:.1f} GB per step (touched experts only)",
                )
            )
    except RuntimeError as e:
        rows.append(("bench qwen3-30b-a3b", "FAIL", str(e)[-300:]))
    print(f"\nsummary ({time.time() - t0:.0f} s; {versions()})")
    print("| check | result | detail |\n|---|---|---|")
    for name, result, detail in rows:
        print(f"| {name} | {result} | {detail} |")


if __name__ == "__main__":
    main()
