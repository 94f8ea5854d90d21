"""Sequence parallelism's two memory targets, read from compiled programs (XLA's memory analysis of
programs lowered against abstract weights: nothing is allocated, so an 8B model at 128k tokens compiles
on this machine). Float32, because XLA:CPU's bf16 programs keep f32 copies of the weights among their
temporaries.

    python benchmarks/sp_memory.py [--model=llama3.1-8b] [--prompt_len=16384] [--budget_gib=8]

1. Prefill temporaries per device for one `prompt_len` prompt at each sp: the static path's prefill, the
   figure `explain` reports as per_device.prefill_activation_bytes. Beside it, the part that grows with the
   prompt: the same program's temporaries less those it has for a 64-token prompt. That constant part is
   XLA:CPU's copy of one layer's weights, sliced out of the stacked weights by the layer loop (0.8 GiB
   for Llama-3-8B in float32). Target: sp=4 <= 35% of sp=1.
2. The longest prompt the serving engine prefills in `budget_gib` per device beside the weights. The
   prompt is one chunk, so it is the ring at sp > 1 and one device's chunk at sp = 1. The figure is the
   page pool for its tokens (split over sp) plus the chunk program's temporaries. It is found by bisection
   over compiled programs in steps of `--step` tokens, up to the model's context. Target: sp=4 holds
   >= 3.5x sp=1's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

flags.DEFINE_string("model", "llama3.1-8b", "Built-in shape (or checkpoint) to compile.")
flags.DEFINE_list("sp", ["1", "2", "4"], "sp sizes to compare (the first is the baseline).")
flags.DEFINE_integer("prompt_len", 16384, "Prompt tokens for the prefill temporaries.")
flags.DEFINE_float("budget_gib", 8.0, "Bytes per device beside the weights for the longest prompt, GiB.")
flags.DEFINE_integer("step", 1024, "Granularity of the longest-prompt search, tokens.")
FLAGS = flags.FLAGS
GIB = 1 << 30
FIXED_PROMPT = 64


def setup_for(sp: int):
    from jaxinfer.runtime import prepare

    return prepare(FLAGS.model, dict(sp=sp), None, "float32", random_weights=True)


def prefill_temp_bytes(setup, prompt_len: int) -> int:
    """Temporaries of the static path's prefill of one prompt on one device (explain's figure)."""
    from jaxinfer import explain
    from jaxinfer.runtime import buckets

    b, t, cache_len = buckets(1, prompt_len, 1, setup.mesh.shape["dp"], setup.max_seq_len)
    prefill, _ = explain.compile_steps(setup, explain.abstract_cache(setup, b, cache_len), b, t, prompt_len)
    return prefill.memory_analysis().temp_size_in_bytes


def first_chunk_bytes(setup, t: int, page_size: int = 16) -> int:
    """Bytes one device holds to prefill a t-token prompt as the engine's first chunk: its pages of the
    pool (split over sp: a 1/sp share, and each rank's null page) and the chunk program's temporaries."""
    from jaxinfer import steps
    from models import kv_cache

    split, sp = setup.page_split, setup.mesh.shape["sp"]
    pages = -(-t // page_size)
    k, v = setup.cache_layout(setup.page_shape(sp * (-(-pages // sp) + 1), page_size), kv_cache.PAGE_AXES)
    tables, valid = np.zeros((1, pages), np.int32), np.ones((1, t), bool)
    tokens = np.zeros((1, t), np.int32)
    args = (setup.graphdef, setup.abstract, k, v, tables, valid, tokens, tokens)
    step = steps.prefill_chunk if split is None else steps.prefill_chunk_ring
    compiled = step.lower(*args, **({} if split is None else {"split": split})).compile()
    return kv_cache.device_bytes((k, v)) + compiled.memory_analysis().temp_size_in_bytes


def longest_prompt(setup, budget: float, step: int) -> tuple[int, bool]:
    """The longest prompt (a multiple of `step`) whose first chunk fits `budget` bytes per device, and
    whether the search stopped at the model's context rather than at the budget."""
    context = setup.max_seq_len // step * step
    fits = lambda t: first_chunk_bytes(setup, t) <= budget  # noqa: E731
    if not fits(step):
        return 0, False
    lo, hi = step, 2 * step
    while hi <= context and fits(hi):
        lo, hi = hi, 2 * hi
    if hi > context:
        if fits(context):
            return context, True
        hi = context
    while hi - lo > step:  # lo fits, hi does not
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def main(_):
    from jaxinfer import explain
    from jaxinfer.runtime import ensure_devices

    sps = [int(s) for s in FLAGS.sp]
    ensure_devices(max(sps))
    print(f"{FLAGS.model}, float32, compiled on {max(sps)} simulated CPU devices (XLA's memory analysis)", flush=True)
    print(
        f"\n1. static prefill of {FLAGS.prompt_len} tokens, temporaries per device\n"
        f"| sp | temporaries | for {FIXED_PROMPT} tokens | growing with the prompt | vs sp={sps[0]} (all) "
        f"| vs sp={sps[0]} (growing) |\n|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    base = None
    for sp in sps:
        setup = setup_for(sp)
        whole, fixed = prefill_temp_bytes(setup, FLAGS.prompt_len), prefill_temp_bytes(setup, FIXED_PROMPT)
        base = base or (whole, whole - fixed)
        print(
            f"| {sp} | {whole / GIB:.2f} GiB | {fixed / GIB:.2f} GiB | {(whole - fixed) / GIB:.2f} GiB | "
            f"{whole / base[0]:.0%} | {(whole - fixed) / base[1]:.0%} |",
            flush=True,
        )
    print(
        f"\n2. the longest prompt prefilled as one engine chunk in {FLAGS.budget_gib:g} GiB per device beside the "
        f"weights (pool share + chunk temporaries)\n| sp | weights per device | longest prompt | vs sp={sps[0]} |"
        "\n|---:|---:|---:|---:|",
        flush=True,
    )
    first = None
    for sp in sps:
        setup = setup_for(sp)
        t, capped = longest_prompt(setup, FLAGS.budget_gib * GIB, FLAGS.step)
        first = first or t
        shown = f"{t}{' (the context: more would fit)' if capped else ''}"
        params = explain.per_device_param_bytes(setup)
        print(f"| {sp} | {params / GIB:.1f} GiB | {shown} | {t / first:.2f}x |", flush=True)


if __name__ == "__main__":
    app.run(main)
