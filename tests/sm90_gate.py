"""The GPU compile gate: every Pallas kernel, at real model shapes and at every shape the tests use, is
lowered for CUDA under an abstract H100 and its Triton IR compiled to an sm_90 cubin, on a machine
without a GPU.

Run with Python 3.12, jax 0.11.2 (the GPU image's version) and the `triton` package (see
tests/sm90-requirements.txt); `tests/test_sm90_gate.py` builds that venv and runs this:

    python tests/sm90_gate.py --out DIR [--jobs 2] [--only SUBSTRING]

It lowers every case in this process (lowering does not abort), then compiles each case's Triton IR
in its own process (a Triton assertion aborts its process) and writes DIR/results.json: per case,
whether it compiled, the shared memory, registers, spill bytes (ptxas) and local loads/stores (SASS),
and the MMA instructions with their operand types. Proves: it compiles for sm_90 with a Triton close to
the one XLA bundles, without spills, on bf16 tensor cores. Does not prove: speed, or that XLA's own
Triton (the one that runs on the GPU) makes the same choices.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import kernel_shapes as shapes  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"


def cases() -> list[dict]:
    """Every case: a name, the kernel, its argument shapes and dtypes (plain data)."""
    out = []
    for dtype in ("float32", "bfloat16"):
        for b, n, kh, hd, ps, pps in shapes.ATTENTION_TEST:
            pages = b * pps + 3
            out.append(
                _attention(f"test {b}x{n}/{kh}x{hd} page {ps} x{pps} {dtype}", b, n, kh, hd, 2, pages, ps, pps, dtype)
            )
        for name, m, k, n, sizes, blocks in shapes.GROUPED_TEST:
            out.append(_grouped(f"test {name} {m}x{k}x{n} {dtype}", m, k, n, len(sizes), dtype, blocks))
    for name, heads, layers, ps, b, ctx in shapes.ATTENTION_REAL:
        pps = ctx // ps
        out.append(
            _attention(
                f"{name} batch {b} context {ctx} page {ps}", b, heads, 8, 128, layers, b * pps + 1, ps, pps, "bfloat16"
            )
        )
    for name, m, k, n, g in shapes.GROUPED_REAL:
        out.append(_grouped(name, m, k, n, g, "bfloat16"))
    for kv in shapes.KV_QUANT_DTYPES:  # quantized pools with bf16 queries: the matmuls stay on bf16 tensor cores
        for b, n, kh, hd, ps, pps in shapes.ATTENTION_QUANT_TEST:
            name = f"test {b}x{n}/{kh}x{hd} page {ps} x{pps} bfloat16 {kv} cache"
            out.append(_attention(name, b, n, kh, hd, 2, b * pps + 3, ps, pps, "bfloat16", kv))
        for name, heads, layers, ps, b, ctx in shapes.ATTENTION_QUANT_REAL:
            pps = ctx // ps
            name = f"{name} batch {b} context {ctx} page {ps} {kv} cache"
            out.append(_attention(name, b, heads, 8, 128, layers, b * pps + 1, ps, pps, "bfloat16", kv))
    for dtype in ("float32", "bfloat16"):
        for name, m, k, n, bn, bk, splits in shapes.FP8_TEST:
            out.append(_fp8(f"test {name} {m}x{k}x{n} {dtype}", m, k, n, dtype, dict(block_n=bn, block_k=bk, splits=splits)))
    for name, m, k, n in shapes.FP8_REAL:
        out.append(_fp8(f"{name} {m} rows", m, k, n, "bfloat16"))
    for name, n, kh, hd, ps, b, ctx, ranks in shapes.ATTENTION_PARTIAL:
        w = ctx // ps // ranks  # the rank's column of the block table
        pool = [2, b * w + 1, ps, kh, hd]
        args = [([b, n, hd], "bfloat16"), (pool, "bfloat16"), (pool, "bfloat16"), ([b], "int32"), ([b, w], "int32")]
        out.append(
            {
                "name": f"paged_attention_partial {name} batch {b} context {ctx} page {ps} of {ranks} ranks",
                "kernel": "paged_attention_partial",
                "args": args + [([], "int32"), ([], "int32")],  # layer, rank
                "dtype": "bfloat16",
                "kwargs": {"ranks": ranks},
            }
        )
    return out


def _attention(name, b, n, kh, hd, layers, pages, ps, pps, dtype, kv_dtype=None) -> dict:
    """kv_dtype: the pools' dtype when quantized (then float32 scale pools follow the layer index)."""
    pool = [layers, pages, ps, kh, hd]
    stored = kv_dtype or dtype
    args = [([b, n, hd], dtype), (pool, stored), (pool, stored), ([b], "int32"), ([b, pps], "int32"), ([], "int32")]
    if kv_dtype:
        args += [(pool[:4], "float32"), (pool[:4], "float32")]
    return {"name": f"paged_attention {name}", "kernel": "paged_attention", "args": args, "dtype": dtype}


def _grouped(name, m, k, n, g, dtype, blocks=None) -> dict:
    args = [([m, k], dtype), ([g, k, n], dtype), ([g], "int32")]
    kwargs = dict(zip(("block_m", "block_n", "block_k"), blocks)) if blocks else {}
    return {
        "name": f"grouped_matmul {name}",
        "kernel": "grouped_matmul",
        "args": args,
        "dtype": dtype,
        "kwargs": kwargs,
    }


def _fp8(name, m, k, n, dtype, kwargs=None) -> dict:
    args = [([m, k], dtype), ([k, n], "float8_e4m3fn"), ([n], "float32")]
    return {"name": f"fp8_matmul {name}", "kernel": "fp8_matmul", "args": args, "dtype": dtype, "kwargs": kwargs or {}}


def lower(case: dict) -> list[dict]:
    """The Triton IR text and launch parameters of every pallas_call in the case's jitted kernel."""
    import jax
    from jax._src.pallas.triton import lowering
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from pallas_kernels import fp8_matmul, moe, paged_attention

    fn = {
        "fp8_matmul": fp8_matmul.fp8_matmul,
        "paged_attention": paged_attention.paged_attention,
        "paged_attention_partial": paged_attention.paged_attention_partial,
        "grouped_matmul": moe.grouped_matmul,
    }[case["kernel"]]
    fn = functools.partial(fn, **case.get("kwargs", {}))
    modules = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    device = AbstractDevice(device_kind=H100, num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=device)
    args = [jax.ShapeDtypeStruct(tuple(s), d) for s, d in case["args"]]
    lowering.lower_jaxpr_to_triton_module = capture
    try:
        with use_abstract_mesh(mesh):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    params = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
    if len(params) != len(modules):
        raise RuntimeError(f"found {len(modules)} Triton modules but {len(params)} launch configurations")
    return [{"ttir": m, "num_stages": int(s), "num_warps": int(w)} for m, (s, w) in zip(modules, params)]


def compile_ttir(path: str, num_warps: int, num_stages: int) -> dict:
    """Compiles one .ttir for sm_90 (in this process) and reads its resources from ptxas and the SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    kernel = triton.compile(
        path, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        cubin_path.write_bytes(cubin)
        arch = re.search(r"^\.target (\S+)", ptx, re.M).group(1)
        info = subprocess.run(
            # Triton's own ptxas flags (make_cubin), so the figures are those of the cubin above.
            [get_ptxas(90).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(ptx_path)]
            + ["-o", str(Path(tmp) / "v.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = subprocess.run(
            [str(bin_dir / "cuobjdump"), "-sass", str(cubin_path)], capture_output=True, text=True, check=True
        ).stdout
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    regs = re.search(r"Used (\d+) registers", info)
    mma = sorted(set(re.findall(r"(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)))
    return {
        "arch": arch,
        "shared_bytes": int(kernel.metadata.shared),
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": sum(spills),
        "local_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "mma": mma,
        "triton": triton.__version__,
    }


def check(case: dict, result: dict) -> list[str]:
    """What is wrong with a compiled case ([] when nothing): spills, and bf16 matmuls off bf16 tensor cores."""
    problems = []
    if result["spill_bytes"] or result["local_ops"]:
        problems.append(f"spills: {result['spill_bytes']} bytes (ptxas), {result['local_ops']} LDL/STL in SASS")
    if not result["mma"]:
        problems.append("no tensor-core instruction (wgmma or mma.sync) in the PTX")
    elif case["dtype"] == "bfloat16" and not all("bf16" in m for m in result["mma"]):
        problems.append(f"bf16 case uses non-bf16 MMAs: {result['mma']}")
    return problems


def _compile_in_child(job: tuple[int, int, dict, str]) -> dict:
    index, part, module, tmp = job
    path = Path(tmp) / f"case{index}_{part}.ttir"
    path.write_text(module["ttir"])
    command = [sys.executable, __file__, "--compile", str(path), "--num_warps", str(module["num_warps"])]
    command += ["--num_stages", str(module["num_stages"])]
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}  # Triton 3.9's default, stated to silence its warning
    r = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    return {
        **json.loads(lines[-1][len("RESULT ") :]),
        "num_warps": module["num_warps"],
        "num_stages": module["num_stages"],
    }


def run(out: Path, jobs: int, only: str | None) -> list[dict]:
    selected = [c for c in cases() if only is None or only in c["name"]]
    results = []
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = []
        for i, case in enumerate(selected):
            try:
                modules = lower(case)
            except Exception as e:  # a lowering failure is this case's result
                results.append({**case, "compiled": False, "error": f"lowering: {type(e).__name__}: {e}"[:2000]})
                continue
            futures.append((case, [pool.submit(_compile_in_child, (i, j, m, tmp)) for j, m in enumerate(modules)]))
        for case, parts in futures:
            compiled = [f.result() for f in parts]
            errors = [p["error"] for p in compiled if "error" in p]
            entry = {**case, "compiled": not errors, "kernels": compiled}
            if errors:
                entry["error"] = "; ".join(errors)
            else:
                entry["problems"] = [p for r in compiled for p in check(case, r)]
            results.append(entry)
            print(row(entry), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def row(entry: dict) -> str:
    if not entry["compiled"]:
        return f"FAIL {entry['name']}: {entry['error']}"
    k = entry["kernels"]
    desc = "; ".join(
        f"smem {r['shared_bytes']} B, {r['registers']} regs, spills {r['spill_bytes']} B/{r['local_ops']} LDL+STL, "
        f"warps {r['num_warps']} stages {r['num_stages']}, {' '.join(r['mma'])}"
        for r in k
    )
    return f"{'ok  ' if not entry['problems'] else 'BAD '} {entry['name']}: {desc}" + (
        f"  <- {'; '.join(entry['problems'])}" if entry["problems"] else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", default=None, help="only cases whose name contains this")
    parser.add_argument("--compile", help="(internal) compile this .ttir and print its resources")
    parser.add_argument("--num_warps", type=int, default=4)
    parser.add_argument("--num_stages", type=int, default=3)
    args = parser.parse_args()
    if args.compile:
        print("RESULT " + json.dumps(compile_ttir(args.compile, args.num_warps, args.num_stages)))
        return
    if args.out is None:
        parser.error("--out is required")
    results = run(args.out, args.jobs, args.only)
    bad = [r for r in results if not r["compiled"] or r["problems"]]
    print(f"{len(results) - len(bad)} of {len(results)} cases compiled for sm_90 without problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
