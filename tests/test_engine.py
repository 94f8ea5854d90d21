"""The serving engine against the plain static path: same greedy tokens under arrivals over time,
chunked prefill, page pressure (preemption) and shared prefixes; streams, asyncio, cancellation."""

import asyncio
import re

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer import JaxinferError, steps
from models.kv_cache import PagedKVCache
from tests import tiny

GREEDY = dict(temperature=0, ignore_eos=True)


def _prompts(seed: int, n: int, shared: list[int]) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        own = rng.integers(3, 250, int(rng.integers(1, 30))).tolist()
        out.append(shared + own if i % 2 == 0 else own)
    return out


@pytest.fixture(scope="module")
def llm(tiny_dir):
    # Small pages and chunks so that prompts span several chunks and pages run out.
    return jaxinfer.LLM(
        str(tiny_dir("llama3")), tp=2, max_seq_len=128, max_num_seqs=4, page_size=4, num_pages=23, prefill_chunk=16
    )


def test_arrivals_chunks_preemption_and_prefixes_equal_the_static_path(llm):
    shared = list(range(100, 121))  # 21 tokens: five full pages to share
    prompts = _prompts(0, 10, shared)
    lengths = [5, 17, 9, 30, 3, 12, 25, 7, 14, 20]
    want = [
        llm.generate_static([p], jaxinfer.SamplingParams(max_tokens=n, **GREEDY))[0].token_ids
        for p, n in zip(prompts, lengths)
    ]
    engine = llm.engine
    hits, preempted = engine.pages.hits, engine.preemptions
    arrivals = {0: [0, 1, 2], 2: [3, 4], 3: [5], 6: [6, 7, 8], 9: [9]}
    reqs, step = {}, 0
    while step <= max(arrivals) or engine.has_work():
        for i in arrivals.get(step, []):
            reqs[i] = engine.add(prompts[i], jaxinfer.SamplingParams(max_tokens=lengths[i], **GREEDY))
        engine.step()
        step += 1
    assert [reqs[i].row.ids for i in range(10)] == want
    assert engine.preemptions > preempted  # 22 pages cannot hold four 30-60 token sequences
    assert engine.pages.hits > hits  # the shared 21-token prefix was reused
    assert engine.free_pages() == engine.num_pages - 1  # every page came back


def test_generate_takes_one_params_per_prompt_and_nothing_compiles_after_warm_up(llm):
    llm.engine.warmup()
    compiles = tiny.compiles()
    prompts = _prompts(1, 6, list(range(50, 60)))
    params = [jaxinfer.SamplingParams(max_tokens=4 + i, temperature=0.5 * (i % 2), ignore_eos=True) for i in range(6)]
    first = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in first] == [4 + i for i in range(6)]
    assert tiny.compiles() == compiles  # not one program, of any kind


def test_sampled_tokens_do_not_depend_on_batch_composition(llm):
    prompts = _prompts(2, 4, [])
    params = jaxinfer.SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    together = llm.generate(prompts, params)
    alone = [llm.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_cancel_frees_pages_and_stream_concatenates_to_the_result(llm):
    engine = llm.engine
    a = engine.add(list(range(3, 40)), jaxinfer.SamplingParams(max_tokens=30, **GREEDY))
    b = engine.add(list(range(5, 20)), jaxinfer.SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.free_pages() < engine.num_pages - 1
    engine.cancel(a)
    engine.cancel(b)
    assert a.row.finish == "cancelled" and not engine.has_work()
    assert engine.free_pages() == engine.num_pages - 1
    prompt = list(range(7, 30))
    params = jaxinfer.SamplingParams(max_tokens=19, **GREEDY)
    chunks = list(llm.generate_stream(prompt, params))
    assert len(chunks) > 1 and chunks[-1].finish_reason == "length"
    assert sum((c.token_ids for c in chunks), []) == llm.generate([prompt], params)[0].token_ids


def test_asyncio_streams_concurrent_requests_and_cancels(llm):
    async def main():
        server = jaxinfer.AsyncLLM(llm)
        params = jaxinfer.SamplingParams(max_tokens=12, **GREEDY)

        async def collect(prompt):
            return sum([c.token_ids async for c in server.generate(prompt, params)], [])

        long_req = await server.submit(list(range(9, 25)), jaxinfer.SamplingParams(max_tokens=60, **GREEDY))
        results = await asyncio.gather(collect(list(range(3, 14))), collect(list(range(20, 27))))
        await server.cancel(long_req)
        return results, long_req

    results, long_req = asyncio.run(main())
    want = llm.generate([list(range(3, 14)), list(range(20, 27))], jaxinfer.SamplingParams(max_tokens=12, **GREEDY))
    assert results == [o.token_ids for o in want]
    assert long_req.row.finish == "cancelled"
    assert llm.engine.free_pages() == llm.engine.num_pages - 1


@pytest.mark.parametrize("mesh", [dict(tp=2), dict(pp=3, tp=2)], ids=["tp2", "pp3-tp2"])
def test_pallas_kernel_in_the_engine_equals_the_xla_path(tiny_dir, mesh):
    path = str(tiny_dir("qwen3"))
    kwargs = dict(**mesh, max_seq_len=64, max_num_seqs=2, page_size=8, num_pages=16, prefill_chunk=16)
    prompts = [list(range(3, 23)), list(range(40, 45))]
    params = jaxinfer.SamplingParams(max_tokens=6, **GREEDY)
    xla = jaxinfer.LLM(path, attention="xla", **kwargs).generate(prompts, params)
    kernel = jaxinfer.LLM(path, attention="interpret", **kwargs).generate(prompts, params)
    assert [o.token_ids for o in kernel] == [o.token_ids for o in xla]


@pytest.mark.parametrize("attention", ["xla", "interpret"])
def test_decode_reads_the_page_pool_in_place(tiny_dir, attention):
    """No layer is sliced out of the pool (a copy of that layer's pages every step) and the pool is never
    copied whole: attention gathers the pages it needs from [layers, pages, ...] at the layer index."""
    llm = jaxinfer.LLM(
        str(tiny_dir("qwen3")), max_seq_len=64, max_num_seqs=2, page_size=8, num_pages=16, attention=attention
    )
    eng, put, s = llm.engine, llm.setup.put, 2
    cache = PagedKVCache(eng.cache_k, eng.cache_v, np.zeros((s, 4), np.int32), np.ones((s, 1), bool))
    sampling = tuple(
        put(a) for a in (np.zeros(s, np.float32), np.zeros(s, np.int32), np.ones(s, np.float32), np.zeros((s, 2), "u4"))
    )
    hlo = (
        steps.decode.lower(
            eng.graphdef,
            llm.state,
            cache,
            put(np.zeros(s, "i4")),
            put(np.zeros(s, "i4")),
            sampling,
            n_steps=2,
            greedy_only=True,
        )
        .compile()
        .as_text()
    )
    layers, pages, page, heads, dim = eng.cache_k.shape
    assert (layers, pages) == (3, 16)
    one_layer = f"f32[{pages},{page},{heads},{dim}]"
    assert not re.search(re.escape(one_layer) + r"[{ ]", hlo), "a layer of the pool is sliced out"
    whole = f"f32[{layers},{pages},{page},{heads},{dim}]"
    assert not [line for line in hlo.splitlines() if re.search(re.escape(whole) + r"\S* copy\(", line)]
    # The kernel, when used, takes the whole pool and the layer index.
    if attention == "interpret":
        jaxpr = jax.make_jaxpr(lambda *a: steps.decode(*a, n_steps=1, greedy_only=True), static_argnums=0)(
            eng.graphdef, llm.state, cache, put(np.zeros(s, "i4")), put(np.zeros(s, "i4")), sampling
        )
        shapes = [
            tuple(v.aval.shape) for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "pallas_call" for v in e.invars
        ]
        assert shapes and eng.cache_k.shape in shapes


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for param in e.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


def test_requests_that_can_never_fit_and_bad_engine_settings(tiny_dir, llm):
    with pytest.raises(
        JaxinferError, match=r"80 tokens with max_tokens=4 needs 23 pages of 4 tokens but the cache has 22"
    ):
        llm.engine.add(list(range(3, 83)), jaxinfer.SamplingParams(max_tokens=4))
    with pytest.raises(JaxinferError, match=r"page_size=0 must be a positive integer"):
        jaxinfer.LLM(str(tiny_dir("llama3")), page_size=0)
    with pytest.raises(JaxinferError, match=r"max_num_seqs=True must be a positive integer"):
        jaxinfer.LLM(str(tiny_dir("llama3")), max_num_seqs=True)
    with pytest.raises(JaxinferError, match=r"got 2 SamplingParams for 3 prompts"):
        llm.generate([[1], [2], [3]], [jaxinfer.SamplingParams()] * 2)
