"""What quantization costs in quality on the embedded model (SmolLM2-135M-Instruct), per weight format
and KV-cache dtype, against the unquantized model (quant "none", kv_cache_dtype "auto").

    python benchmarks/quality.py [--tokens=8192] [--window=512] [--json=quality.json]

For each combination the installed jaxinfer builds (the others print "not built"):
- perplexity of the first --tokens tokens of a fixed English text that ships with Python
  (pydoc_data.topics: its help texts joined in sorted-key order, encoded without special tokens),
  scored in non-overlapping windows of --window tokens: each window starts with no context, and every
  token after a window's first is predicted from the tokens before it in that window (NLL in float64);
- top-1 agreement: the fraction of those positions where the argmax next token equals the baseline's;
- greedy agreement on PROMPTS (chat template, temperature 0): the fraction of completions equal to the
  baseline's text, and the mean fraction of leading tokens that match (over the longer completion);
- the weights' bytes per device, and the targets with met / missed.

The baseline is the Q4_1 GGUF dequantized (the only weights shipped), so the int4 row requantizes
weights that were already 4-bit: symmetric groups of 128 (64 where the input is 576 wide) over Q4_1's
asymmetric blocks of 32, about 11-14% relative error per weight where an asymmetric block-32 format
would reproduce them exactly. Its loss adds to Q4_1's own loss against the bf16 model, which cannot be
measured here.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time

import jax
import numpy as np
from absl import app, flags

import jaxinfer
from jaxinfer import explain


def define_flags() -> None:
    """The program's flags, defined when it runs (not on import: tests import its functions beside
    jaxinfer.cli, whose --model would clash)."""
    flags.DEFINE_string("model", "smollm2-135m", "Model to measure.")
    flags.DEFINE_integer("tokens", 8192, "Tokens of the text to score.")
    flags.DEFINE_integer("window", 512, "Tokens per scoring window (non-overlapping, no context carried over).")
    flags.DEFINE_integer("max_tokens", 32, "New tokens per greedy completion.")
    flags.DEFINE_list("quants", ["none", "int8", "fp8", "int4"], "Weight quantization modes.")
    flags.DEFINE_list("kv_cache_dtypes", ["auto", "int8", "fp8"], "KV-cache dtypes.")
    flags.DEFINE_string("json", None, "Write the rows to this JSON file.")


FLAGS = flags.FLAGS

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
    "What is 12 times 7?",
    "Explain what a computer virus is in one sentence.",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "List the days of the week.",
)

PROMPT_ROOM = 256  # tokens a chat-templated prompt of PROMPTS may take, for sizing the page pool

# (quant, kv_cache_dtype) -> (largest perplexity increase in %, smallest top-1 agreement or None)
TARGETS = {
    ("int8", "auto"): (1.0, 0.96),
    ("fp8", "auto"): (4.0, 0.90),
    ("none", "int8"): (1.0, None),
    ("none", "fp8"): (2.0, None),
}
BASELINE = ("none", "auto")
TEXT_NAME = f"pydoc_data.topics (Python {platform.python_version()}), values joined in sorted-key order"


def corpus_text() -> str:
    """The help texts that ship with Python, concatenated in sorted-key order."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def corpus_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of corpus_text (no BOS: windows cut the stream anywhere anyway)."""
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    if len(ids) < n:
        raise ValueError(f"--tokens={n} but the text has only {len(ids)} tokens; ask for at most that")
    return ids[:n]


def windows(ids: list[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of `window` tokens (the last may be shorter; one of a single token predicts
    nothing and is dropped)."""
    if window < 2:
        raise ValueError(f"--window={window}: a window needs at least 2 tokens to predict one")
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


def score_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] (float32); the keys and values are read back from a cache stored as
    llm's kv_cache_dtype (LLM.score allocates its cache that way)."""
    return llm.score(ids)


def next_token_stats(logits: np.ndarray, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """From logits [T, V] over tokens ids [T]: the NLL of each next token ids[1:] (float64) and the
    argmax prediction at each of those positions, both [T - 1]."""
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    target = np.asarray(ids[1:])
    nll = lse - x[np.arange(len(target)), target]
    return nll, logits[:-1].argmax(axis=-1)


def evaluate_text(llm, wins: list[list[int]]) -> dict:
    """NLL and argmax of every predicted position over all windows, concatenated."""
    nll, top1 = [], []
    for w in wins:
        n, a = next_token_stats(score_logits(llm, w), w)
        nll.append(n)
        top1.append(a)
    return {"nll": np.concatenate(nll), "top1": np.concatenate(top1)}


def greedy(llm, prompts=PROMPTS, max_tokens: int = 32) -> list[dict]:
    params = jaxinfer.SamplingParams(max_tokens=max_tokens, temperature=0)
    return [{"text": c.text, "token_ids": list(c.token_ids)} for c in llm.generate(list(prompts), params, chat=True)]


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(nll.mean()))


def top1_agreement(top1: np.ndarray, base_top1: np.ndarray) -> float:
    return float((top1 == base_top1).mean())


def greedy_agreement(outs: list[dict], base: list[dict]) -> tuple[float, float]:
    """(fraction of completions whose text equals the baseline's, mean fraction of matching leading
    tokens over the longer of the two completions); NaN for no prompts."""
    if not base:
        return float("nan"), float("nan")
    exact = np.mean([o["text"] == b["text"] for o, b in zip(outs, base)])
    prefix = []
    for o, b in zip(outs, base):
        a, c = o["token_ids"], b["token_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), min(len(a), len(c)))
        prefix.append(same / max(len(a), len(c), 1))
    return float(exact), float(np.mean(prefix))


def verdict(quant: str, kv: str, delta_pct: float, top1: float) -> str:
    if quant == "int4":
        return "no target: requantizes the Q4_1 weights the baseline already is"
    if (quant, kv) not in TARGETS:
        return "-"
    max_delta, min_top1 = TARGETS[(quant, kv)]
    ok = delta_pct <= max_delta and (min_top1 is None or top1 >= min_top1)
    want = f"ppl +{max_delta:g}%" + (f", top-1 >= {min_top1:.0%}" if min_top1 is not None else "")
    return f"{want}: {'met' if ok else 'MISSED'}"


def compare(text: dict, outs: list[dict], base: dict) -> dict:
    """A row's figures against the baseline's (`base`: its perplexity, argmax and completions)."""
    ppl = perplexity(text["nll"])
    exact, prefix = greedy_agreement(outs, base["greedy"])
    return {
        "perplexity": ppl,
        "positions": int(text["nll"].size),
        "delta_pct": 100 * (ppl / base["perplexity"] - 1),
        "top1_agreement": top1_agreement(text["top1"], base["top1"]),
        "greedy_exact": exact,
        "greedy_prefix": prefix,
    }


def free() -> None:
    """Drop the compiled programs and whatever model was just deleted (an LLM and its engine refer to
    each other, so only the cyclic collector frees them)."""
    gc.collect()
    jax.clear_caches()
    gc.collect()


def run(quants, kvs, n_tokens: int, window: int, max_tokens: int, model: str, prompts=PROMPTS) -> list[dict]:
    """Every (quant, kv_cache_dtype) row, the baseline first. A JaxinferError while building a model
    means that combination is not built. The baseline's argmax and completions stay in memory; each
    model is freed before the next is built."""
    combos = [BASELINE] + [(q, k) for q in quants for k in kvs if (q, k) != BASELINE]
    rows, base, wins = [], None, None
    for quant, kv in combos:
        row = {"quant": quant, "kv_cache_dtype": kv}
        t0 = time.perf_counter()
        try:
            # A page pool for the prompts only (the default takes half the free memory, up to 16 full contexts).
            pages = 1 + max(1, len(prompts)) * -(-(PROMPT_ROOM + max_tokens) // 16)
            llm = jaxinfer.LLM(model, quant=quant, kv_cache_dtype=kv, page_size=16, num_pages=pages)
        except jaxinfer.JaxinferError as e:
            if (quant, kv) == BASELINE:
                raise
            rows.append({**row, "status": "not built", "error": str(e)})
            print(format_row(rows[-1]), flush=True)
            continue
        except Exception as e:  # a combination that crashes is reported, and the sweep goes on
            if (quant, kv) == BASELINE:
                raise
            rows.append({**row, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            print(format_row(rows[-1]), flush=True)
            continue
        try:
            if wins is None:
                wins = windows(corpus_ids(llm.tokenizer, n_tokens), window)
            text = evaluate_text(llm, wins)
            outs = greedy(llm, prompts, max_tokens) if prompts else []
            row.update(status="ok", param_bytes=int(explain.per_device_param_bytes(llm.setup)))
        except Exception as e:
            if (quant, kv) == BASELINE:
                raise
            rows.append({**row, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            print(format_row(rows[-1]), flush=True)
            continue
        finally:
            del llm
            free()
        if base is None:
            base = {"perplexity": perplexity(text["nll"]), "top1": text["top1"], "greedy": outs}
        row.update(compare(text, outs, base))
        row["target"] = verdict(quant, kv, row["delta_pct"], row["top1_agreement"])
        row["completions"] = [o["text"] for o in outs]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    if r["status"] != "ok":
        why = r["error"].splitlines()[0][:100] if r["status"] == "failed" else ""
        return f"| {r['quant']} | {r['kv_cache_dtype']} | {r['status']} | | | | | | {why} |"
    return (
        f"| {r['quant']} | {r['kv_cache_dtype']} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f} | "
        f"{r['top1_agreement']:.2%} | {r['greedy_exact']:.0%} | {r['greedy_prefix']:.1%} | "
        f"{r['param_bytes'] / 2**20:.1f} MiB | {r['target']} |"
    )


HEADER = (
    "| quant | kv_cache_dtype | perplexity | delta vs baseline (%) | top-1 agreement | greedy exact | "
    "greedy prefix | weights per device | target |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def main(argv):
    del argv
    t0 = time.perf_counter()
    n_windows = len(range(0, FLAGS.tokens, FLAGS.window))
    print(
        f"{FLAGS.model}{' (Q4_1 GGUF dequantized)' if FLAGS.model == 'smollm2-135m' else ''}, "
        f"jax {jax.default_backend()}; text: the first {FLAGS.tokens} tokens of {TEXT_NAME}, in {n_windows} "
        f"non-overlapping windows of {FLAGS.window} (no context carried across windows; each window's first "
        f"token is not scored); greedy: {len(PROMPTS)} chat prompts, {FLAGS.max_tokens} new tokens, temperature 0; "
        "baseline: quant=none, kv_cache_dtype=auto",
        flush=True,
    )
    print(HEADER, flush=True)
    rows = run(FLAGS.quants, FLAGS.kv_cache_dtypes, FLAGS.tokens, FLAGS.window, FLAGS.max_tokens, FLAGS.model)
    wall = time.perf_counter() - t0
    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))
    for status in ("not built", "failed"):
        missing = [f"{r['quant']}/{r['kv_cache_dtype']}" for r in rows if r["status"] == status]
        if missing:
            print(f"{status}: {', '.join(missing)}")
    print(
        "int4 requantizes the already-4-bit Q4_1 weights (the baseline is that file dequantized): its loss adds "
        "to Q4_1's own loss against the bf16 model, which cannot be measured here (no bf16 weights ship)."
    )
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dtype}, wall {wall:.0f} s")
    if FLAGS.json:
        meta = {
            "model": FLAGS.model,
            "text": TEXT_NAME,
            "tokens": FLAGS.tokens,
            "window": FLAGS.window,
            "max_tokens": FLAGS.max_tokens,
            "prompts": list(PROMPTS),
            "backend": jax.default_backend(),
            "dtype": dtype,
            "wall_s": wall,
        }
        with open(FLAGS.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
