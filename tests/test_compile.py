"""The static path compiles once per shape bucket: after warm-up, nothing recompiles (the engine's
own check is in test_engine.py)."""

import jaxinfer
from tests import tiny
from tests.tiny import IDS


def test_no_recompilation_after_warm_up(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("llama3")), tp=2)
    greedy = jaxinfer.SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    sampled = jaxinfer.SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True)
    # Two batch buckets (1, 4) x two prompt buckets (16, 32) x greedy/sampled.
    workloads = [
        ([IDS[:3]], greedy),
        ([IDS[:19] + IDS], greedy),
        ([IDS[:2], IDS[:5], IDS[:7]], sampled),
        ([IDS[:20] + IDS[:5], IDS[:4], IDS[:9]], sampled),
    ]
    for prompts, params in workloads:
        llm.generate_static(prompts, params)
    warm = tiny.compiles()
    for prompts, params in workloads:  # other lengths and batch sizes inside the same buckets
        llm.generate_static([p[1:] for p in prompts] + [IDS[:6]] * (len(prompts) > 1), params)
    assert tiny.compiles() == warm
