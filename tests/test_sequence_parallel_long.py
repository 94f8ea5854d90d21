"""Sequence parallelism on long prompts (issue 14, scope 5): 1k-4k-token prompts on a random-weight tiny
Llama whose max_position_embeddings is 4096, and a ~3,000-token chat prompt on the embedded SmolLM2;
logits, logprobs and greedy tokens equal to one device's. tests/test_sequence_parallel.py covers the
same paths on 200-token prompts, and the errors."""

import numpy as np
import pytest

import jaxinfer
from jaxinfer import hlo, steps
from tests.test_sequence_parallel import ring_chunk_hlo, ring_prefill_hlo
from tests.tiny import rel_err

MAX_SEQ = 4096
PROMPT = np.random.default_rng(1).integers(0, 256, MAX_SEQ).tolist()


@pytest.fixture(scope="module")
def llama3(tiny_dir):
    return str(tiny_dir("llama3", max_position_embeddings=MAX_SEQ))


@pytest.fixture(scope="module")
def one_device(llama3):
    return jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ)


@pytest.fixture(scope="module")
def one_device_score(one_device):
    """score(n) -> one device's logits of the first n tokens of PROMPT, computed once per n."""
    made = {}

    def score(n: int) -> np.ndarray:
        if n not in made:
            made[n] = one_device.score(PROMPT[:n])
        return made[n]

    return score


# One 4k case (sp=4); the others land in the 2048-token bucket.
@pytest.mark.parametrize(
    "axes, n",
    [(dict(sp=2), 1500), (dict(sp=4), 4000), (dict(sp=8), 2048), (dict(sp=2, tp=2), 1200)],
    ids=["sp2-1500", "sp4-4000", "sp8-2048", "sp2xtp2-1200"],
)
def test_long_prompt_logits_match_one_device(llama3, one_device_score, axes, n):
    got = jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ, **axes).score(PROMPT[:n])
    ref = one_device_score(n)
    assert got.shape == ref.shape == (n, 256)
    assert rel_err(got, ref) < 1e-4


def test_a_length_not_a_multiple_of_2sp_scores_and_decodes_as_one_device(llama3, one_device, one_device_score):
    # max_seq_len 3000 makes the prompt bucket 3000 tokens, not a multiple of 2·sp = 16: the layout pads
    # it to 3008, and the K/V of the 8 pad positions past the 3000-token cache is dropped.
    llm = jaxinfer.LLM(llama3, max_seq_len=3000, sp=8)
    assert rel_err(llm.score(PROMPT[:2999]), one_device_score(2999)) < 1e-4
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=True)
    prompts = [PROMPT[:2900], PROMPT[1000:3101]]  # two rows of different lengths, neither a multiple of 16
    ref = one_device.generate_static(prompts, params)
    for got, r in zip(llm.generate_static(prompts, params), ref):
        assert len(got.token_ids) == 64
        assert got.token_ids == r.token_ids
        np.testing.assert_allclose(got.logprobs, r.logprobs, rtol=1e-4, atol=1e-5)


def test_long_prefill_hlo_passes_kv_around_the_ring_and_never_gathers_it(llama3):
    llm = jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ, sp=4, unroll_layers=False)
    cfg = llm.config
    b, t = 1, MAX_SEQ
    ops, in_layer = hlo.layer_collectives(ring_prefill_hlo(llm, t, 4000), cfg.num_layers)
    block = b * (t // 4) * llm.cache_kv_heads * cfg.head_dim * 4  # one rank's K (or V) of one layer, fp32: 1,024 tokens
    # sp - 1 = 3 ring steps pass k and v each, and nothing else crosses devices inside a layer.
    assert [(c.kind, c.bytes) for c in in_layer] == [("collective-permute", block)] * 6
    # The cache is written from the blocks the ring brings: the K/V is never gathered, after the layers either.
    assert [c for c in ops if c.bytes >= block and c not in in_layer] == []


# --- the serving engine over a page pool split over sp ---------------------------------------------

# prefill_chunk 1000: a prompt's first chunk (1000 tokens, the ring's) is not a multiple of 2·sp = 16 at
# sp=8 and ends inside a page; its later chunks attend to the split pages from there.
ENGINE = dict(max_seq_len=MAX_SEQ, max_num_seqs=4, page_size=16, num_pages=512, prefill_chunk=1000)
DECODE = jaxinfer.SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=True, top_logprobs=8)
PROMPTS = [PROMPT[:1500], PROMPT[1000:2203]]  # decoded side by side in one batch
PREFIXED = PROMPT[:1200] + PROMPT[3000:3333]  # its first 75 pages are cached by the first prompt


@pytest.fixture(scope="module")
def engine_ref(llama3):
    llm = jaxinfer.LLM(llama3, **ENGINE)
    return llm.generate(PROMPTS, DECODE) + llm.generate([PREFIXED], DECODE)


def test_a_long_first_chunk_passes_kv_around_the_ring_and_each_rank_writes_its_pages_from_it(llama3):
    llm = jaxinfer.LLM(llama3, **ENGINE, sp=8, unroll_layers=False)
    cfg, t = llm.config, ENGINE["prefill_chunk"]
    ops, in_layer = hlo.layer_collectives(ring_chunk_hlo(llm, t, 64), cfg.num_layers)
    block = (1008 // 8) * llm.cache_kv_heads * cfg.head_dim * 4  # 1,000 tokens padded to 1,008: 126 per rank
    assert [(c.kind, c.bytes) for c in in_layer] == [("collective-permute", block)] * 14  # sp - 1 = 7 steps: k, v
    assert [c for c in ops if c not in in_layer and c.bytes >= block] == []


def _assert_same(got, ref):
    assert len(got.token_ids) == 64
    assert got.token_ids == ref.token_ids
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-4, atol=1e-5)
    for g, r in zip(got.top_logprobs, ref.top_logprobs):  # the 8 most likely tokens' log-softmax of each step
        assert list(g) == list(r)
        assert rel_err(np.array(list(g.values())), np.array(list(r.values()))) < 1e-4


@pytest.mark.parametrize("axes", [dict(sp=4), dict(sp=8)], ids=["sp4", "sp8"])
def test_engine_prefills_long_prompts_and_decodes_64_tokens_as_one_device(llama3, engine_ref, axes, monkeypatch):
    llm = jaxinfer.LLM(llama3, **ENGINE, **axes)
    ring_chunks = []
    ring_step = steps.prefill_chunk_ring
    monkeypatch.setattr(steps, "prefill_chunk_ring", lambda *a, **k: ring_chunks.append(a[5]) or ring_step(*a, **k))
    for got, ref in zip(llm.generate(PROMPTS, DECODE), engine_ref):
        _assert_same(got, ref)
    # Each prompt's first chunk over the ring: the first prompt's 1,000 tokens, then the second's 501 that
    # fill the step's 1,000-token budget after the first prompt's last 499 (those read the split pages).
    assert [int(valid.sum()) for valid in ring_chunks] == [1000, 501]
    hits = llm.engine.pages.hits
    _assert_same(llm.generate([PREFIXED], DECODE)[0], engine_ref[2])
    assert llm.engine.pages.hits - hits == 75  # 1,200 cached tokens read from the pages' own ranks


def test_sp_pp_long_prompt_scores_and_decodes_64_tokens_as_one_device(tiny_dir, monkeypatch):
    """sp=2 x pp=2 (a 4-layer Llama, stages manual over pp and sp): a 1,999-token prompt's logits, and
    the engine's long prefills (first chunks over the ring inside the stages) then 64 greedy tokens."""
    path = str(tiny_dir("llama3", max_position_embeddings=MAX_SEQ, num_hidden_layers=4))
    one, llm = jaxinfer.LLM(path, **ENGINE), jaxinfer.LLM(path, **ENGINE, sp=2, pp=2)
    assert rel_err(llm.score(PROMPT[:1999]), one.score(PROMPT[:1999])) < 1e-4
    ring_chunks, ring_step = [], steps.prefill_chunk_ring
    monkeypatch.setattr(steps, "prefill_chunk_ring", lambda *a, **k: ring_chunks.append(a[5]) or ring_step(*a, **k))
    for got, ref in zip(llm.generate(PROMPTS, DECODE), one.generate(PROMPTS, DECODE)):
        _assert_same(got, ref)
    assert [int(valid.sum()) for valid in ring_chunks] == [1000, 501]


# --- the embedded model ----------------------------------------------------------------------------


def _long_chat_prompt() -> str:
    """Python's own documentation of mappings (about 11,000 characters, cut at a paragraph), then a
    question about it: a natural ~3,000-token prompt that needs no file."""
    from pydoc_data.topics import topics

    text = topics["typesmapping"]
    return text[: text.rfind("\n\n", 0, 11000)] + "\n\nSummarize the text above in one sentence."


def test_embedded_model_answers_a_3000_token_chat_prompt_on_sp4_as_on_one_device(monkeypatch):
    # Scanned layers: loading and compiling 30 unrolled layers twice would double this test's time,
    # and the ring runs the same inside either loop.
    options = dict(max_seq_len=3072, max_num_seqs=1, prefill_chunk=3072, unroll_layers=False)
    prompt = _long_chat_prompt()
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=24, logprobs=True)
    one = jaxinfer.LLM("smollm2-135m", **options)
    n = len(one.tokenizer.encode_chat(prompt))
    assert 2800 <= n <= 3048  # room for the 24 new tokens
    ref = one.generate(prompt, params, chat=True)[0]
    del one
    llm = jaxinfer.LLM("smollm2-135m", sp=4, **options)
    ring_chunks, ring_step = [], steps.prefill_chunk_ring
    monkeypatch.setattr(steps, "prefill_chunk_ring", lambda *a, **k: ring_chunks.append(a[5]) or ring_step(*a, **k))
    got = llm.generate(prompt, params, chat=True)[0]
    assert [int(valid.sum()) for valid in ring_chunks] == [n - 1]  # the whole prompt (but its last token) over the ring
    assert len(ref.token_ids) >= 16
    assert got.token_ids == ref.token_ids
    assert got.text == ref.text
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)


def test_sp_memory_benchmark_reads_both_targets_from_compiled_programs():
    """benchmarks/sp_memory.py on the built-in llama3.1-8b shape (abstract weights: nothing is allocated),
    sp = 1 and 2: both tables print; splitting the prompt over sp=2 holds a longer prompt in the same
    memory beside the weights, and the prefill temporaries that grow with the prompt fall (XLA's memory
    analysis, no timings). At tiny shapes fixed costs decide, so the real shape is compiled."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "sp_memory.py"
    args = ["--sp=1,2", "--prompt_len=2048", "--budget_gib=8", "--step=8192"]
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    temps = [row for row in rows if len(row) == 6 and row[0].strip().isdigit()]
    longest = [row for row in rows if len(row) == 4 and row[0].strip().isdigit()]
    assert [int(row[0]) for row in temps] == [1, 2] and [int(row[0]) for row in longest] == [1, 2]
    growing = [float(row[3].split()[0]) for row in temps]
    assert 0 < growing[1] < growing[0]
    one, two = (int(row[2].split()[0]) for row in longest)
    assert 0 < one and two >= 1.5 * one
