"""Sequence parallelism (models/ring_attention.py): prefill with the prompt split over `sp` in zigzag order
and ring attention, and the serving engine over a page pool split over `sp`; logits and greedy tokens
equal to one device's."""

import numpy as np
import pytest

import jaxinfer
from jaxinfer import JaxinferError, explain, hlo, steps
from models import moe
from models.kv_cache import PagedKVCache
from models.ring_attention import zigzag_order
from tests.tiny import rel_err

MAX_SEQ = 256  # the tiny checkpoints' max_position_embeddings
PROMPT = np.random.default_rng(0).integers(0, 256, 200).tolist()


@pytest.fixture(scope="module")
def llama3(tiny_dir):
    return str(tiny_dir("llama3"))


@pytest.fixture(scope="module")
def one_device(llama3):
    return jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ)


def test_zigzag_order_gives_rank_i_chunks_i_and_mirror():
    order = zigzag_order(16, 2)  # 4 chunks of 4: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(zigzag_order(24, 4).tolist()) == list(range(24))


@pytest.mark.parametrize("axes", [dict(sp=2), dict(sp=4), dict(sp=2, tp=2)], ids=["sp2", "sp4", "sp2xtp2"])
def test_score_matches_one_device(llama3, one_device, axes):
    ref = one_device.score(PROMPT)
    got = jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ, **axes).score(PROMPT)
    assert got.shape == ref.shape == (len(PROMPT), 256)
    assert rel_err(got, ref) < 1e-4


def test_score_pads_a_length_not_a_multiple_of_2sp_and_short_prompts(llama3, one_device):
    # max_seq_len 250 makes the prompt bucket 250 tokens, not a multiple of 2·sp = 8: padded to 256.
    llm = jaxinfer.LLM(llama3, max_seq_len=250, sp=4)
    prompt = PROMPT[:199]
    assert rel_err(llm.score(prompt), one_device.score(prompt)) < 1e-4
    short = PROMPT[:5]  # fewer tokens than 2·sp
    assert rel_err(llm.score(short), one_device.score(short)) < 1e-4


def test_score_with_an_int8_kv_cache_matches_one_device(llama3):
    ref = jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ, kv_cache_dtype="int8").score(PROMPT)
    got = jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ, kv_cache_dtype="int8", sp=2).score(PROMPT)
    # Not 1e-4: keys computed on another split differ in the last bit, which can move an int8 value
    # across a rounding boundary (one step is 1/127 of that token's largest element).
    assert rel_err(got, ref) < 2e-3


@pytest.mark.parametrize("axes", [dict(sp=2), dict(sp=2, tp=2)], ids=["sp2", "sp2xtp2"])
def test_greedy_generate_static_matches_one_device(llama3, one_device, axes):
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)
    prompts = [PROMPT[:150], PROMPT[50:187]]  # two rows of different lengths
    ref = one_device.generate_static(prompts, params)
    got = jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ, **axes).generate_static(prompts, params)
    for r, g in zip(ref, got):
        assert len(g.token_ids) == 16
        assert g.token_ids == r.token_ids
        np.testing.assert_allclose(g.logprobs, r.logprobs, rtol=1e-4, atol=1e-5)


def ring_prefill_hlo(llm, t: int, length: int) -> str:
    """The compiled static-path prefill of one prompt of `length` tokens in a bucket of t, on the ring."""
    sampling, _ = llm.setup.sampling_arrays(jaxinfer.SamplingParams(temperature=0), 1, 1)
    lowered = steps.prefill.lower(
        llm.graphdef,
        llm.state,
        llm._cache(1, t),
        llm._put(np.zeros((1, t), np.int32)),
        llm._put(np.full(1, length, np.int32)),
        sampling,
        greedy_only=True,
        ring=llm.setup.ring,
    )
    return lowered.compile().as_text()


def ring_chunk_hlo(llm, t: int, width: int, step=steps.prefill_chunk_ring) -> str:
    """The compiled engine step that prefills a first chunk of t tokens on the ring (block table of `width`),
    or with step=steps.prefill_chunk a later chunk."""
    eng = llm.engine
    lowered = step.lower(
        eng.graphdef,
        llm.state,
        eng.cache_k,
        eng.cache_v,
        np.zeros((1, width), np.int32),
        np.ones((1, t), bool),
        np.zeros((1, t), np.int32),
        np.zeros((1, t), np.int32),
        split=llm.setup.page_split,
    )
    return lowered.compile().as_text()


def test_prefill_hlo_passes_kv_around_the_ring_and_writes_the_cache_from_it_with_no_gather(llama3):
    llm = jaxinfer.LLM(llama3, max_seq_len=MAX_SEQ, sp=4, unroll_layers=False)
    cfg = llm.config
    b, t = 1, MAX_SEQ
    ops, in_layer = hlo.layer_collectives(ring_prefill_hlo(llm, t, 200), cfg.num_layers)
    block = b * (t // 4) * llm.cache_kv_heads * cfg.head_dim * 4  # one rank's K (or V) of one layer, fp32
    # sp - 1 = 3 ring steps pass k and v each
    assert sorted(c.kind for c in in_layer) == ["collective-permute"] * 6
    assert all(c.bytes == block for c in in_layer)
    # Each rank writes every block the ring brings into its unsplit cache: no K/V crosses devices otherwise.
    assert [c for c in ops if c not in in_layer and c.bytes >= block] == []


def test_sp_errors(llama3, tiny_dir):
    with pytest.raises(JaxinferError, match="num_pages=30 does not split over sp=4.*num_pages=32"):
        jaxinfer.LLM(llama3, sp=4, num_pages=30)
    with pytest.raises(JaxinferError, match="num_pages=2 does not split over sp=2.*at least 2"):
        jaxinfer.LLM(llama3, sp=2, num_pages=2)
    with pytest.raises(JaxinferError, match="sp=3 does not divide the 8 devices"):
        jaxinfer.LLM(llama3, sp=3)


# --- the serving engine over a page pool split over sp ---------------------------------------------

# 200-token prompts in chunks of 64: prefill runs in four chunks, then 40 tokens of decode (5 calls of 8).
ENGINE = dict(max_seq_len=MAX_SEQ, max_num_seqs=4, page_size=16, num_pages=32, prefill_chunk=64)
DECODE = jaxinfer.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=True, top_logprobs=8)
PROMPTS = [PROMPT, PROMPT[20:190]]  # decoded side by side in one batch
PREFIXED = PROMPT[:160] + PROMPT[:30]  # its first 10 pages are cached by the first prompt


@pytest.fixture(scope="module")
def engine_ref(llama3):
    llm = jaxinfer.LLM(llama3, **ENGINE)
    return llm.generate(PROMPTS, DECODE) + llm.generate([PREFIXED], DECODE)


def _assert_same(got, ref):
    assert len(got.token_ids) == 40
    assert got.token_ids == ref.token_ids
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-4, atol=1e-5)
    for g, r in zip(got.top_logprobs, ref.top_logprobs):  # the 8 most likely tokens' log-softmax of each step
        assert list(g) == list(r)
        assert rel_err(np.array(list(g.values())), np.array(list(r.values()))) < 1e-4


@pytest.mark.parametrize(
    "axes",
    [dict(sp=2), dict(sp=4), dict(sp=2, tp=2), dict(sp=2, dp=2)],
    ids=["sp2", "sp4", "sp2xtp2", "sp2xdp2"],
)
def test_engine_decodes_from_a_split_pool_as_one_device(llama3, engine_ref, axes, monkeypatch):
    llm = jaxinfer.LLM(llama3, **ENGINE, **axes)
    sp = axes["sp"]
    pool = llm.engine.cache_k
    assert pool.sharding.shard_shape(pool.shape)[1] == ENGINE["num_pages"] // sp  # each rank holds 1/sp of the pages
    ring_chunks, later = [], []  # (first position, tokens) of each chunk on the ring, and of the others
    ring_step, chunk_step = steps.prefill_chunk_ring, steps.prefill_chunk
    record = lambda chunks, a: chunks.append((int(a[7][0, 0]), int(a[5].sum())))  # noqa: E731
    monkeypatch.setattr(steps, "prefill_chunk_ring", lambda *a, **k: record(ring_chunks, a) or ring_step(*a, **k))
    monkeypatch.setattr(steps, "prefill_chunk", lambda *a, **k: record(later, a) or chunk_step(*a, **k))
    for got, ref in zip(llm.generate(PROMPTS, DECODE), engine_ref):
        _assert_same(got, ref)
    # Each prompt's first chunk ran split over sp (ring attention); its later chunks split their tokens over
    # sp too (steps.prefill_chunk with the split), attending to the split pages.
    assert [p for p, _ in ring_chunks] == [0, 0]
    assert len(later) >= 4 and all(p > 0 for p, _ in later)  # 199 and 169 tokens, 64 a step shared by the two
    hits = llm.engine.pages.hits
    _assert_same(llm.generate([PREFIXED], DECODE)[0], engine_ref[2])
    assert llm.engine.pages.hits - hits == 10  # the shared prefix came from the cache, from the pages' own ranks
    assert len(ring_chunks) == 2  # a chunk after a cached prefix reads it: not the ring
    assert later[-1] == (160, 29)  # its new tokens after the 160 cached, split over sp


def test_later_chunks_not_a_multiple_of_sp_are_padded_and_their_pads_write_no_real_page(llama3, monkeypatch):
    """Chunks of 10 tokens over sp=4: each later chunk runs padded to 12, split 3 per rank; its pad tokens
    are not valid, so they write only the null page, and decoding after them matches one device."""
    opts = dict(ENGINE, prefill_chunk=10)
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True)
    ref = jaxinfer.LLM(llama3, **opts).generate([PROMPT[:60]], params)[0]
    llm = jaxinfer.LLM(llama3, **opts, sp=4)
    later, chunk_step = [], steps.prefill_chunk
    monkeypatch.setattr(steps, "prefill_chunk", lambda *a, **k: later.append(a[7].shape) or chunk_step(*a, **k))
    got = llm.generate([PROMPT[:60]], params)[0]
    assert later == [(1, 10)] * 5  # 59 tokens prefilled: a first chunk on the ring, then five split over sp
    assert got.token_ids == ref.token_ids
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=1e-4, atol=1e-5)


def test_decode_hlo_merges_partials_with_one_small_all_gather_per_layer(llama3):
    llm = jaxinfer.LLM(llama3, **ENGINE, sp=2, unroll_layers=False)
    cfg, eng, s, w = llm.config, llm.engine, 4, 16
    sampling, _ = llm.setup.sampling_arrays(jaxinfer.SamplingParams(temperature=0), s, s)
    tables, valid = np.zeros((s, w), np.int32), np.ones((s, 1), bool)
    cache = PagedKVCache(eng.cache_k, eng.cache_v, tables, valid, llm.setup.page_split)
    col = llm._put(np.zeros(s, np.int32))
    text = (
        steps.decode.lower(eng.graphdef, llm.state, cache, col, col, sampling, n_steps=8, greedy_only=True)
        .compile()
        .as_text()
    )
    ops, in_layer = hlo.layer_collectives(text, cfg.num_layers)
    # out, max and sum of every (row, head) from each of the 2 ranks: [2, B, 1, N, H + 2] float32
    assert [(c.kind, c.bytes) for c in in_layer] == [("all-gather", 2 * s * cfg.num_heads * (cfg.head_dim + 2) * 4)]
    assert len(ops) == 1  # nothing else crosses devices; no K/V page is ever gathered


@pytest.mark.parametrize("sp", [2, 4])
def test_a_later_chunk_splits_its_tokens_over_sp_and_hands_each_rank_its_own_partials(llama3, sp):
    """A chunk after the first (or after a cached prefix) keeps its tokens split on seq outside attention:
    every matmul of the projections and the MLP is [T/sp, ...] on a device. Per layer: the queries and the
    new K/V gathered over sp (every query may see keys on every rank; a new token's page may lie on any),
    and one all-to-all of the partials, each rank keeping its own tokens' (1/sp of an all-gather's bytes)."""
    llm = jaxinfer.LLM(llama3, **ENGINE, sp=sp, unroll_layers=False)
    cfg, t = llm.config, 64
    n, k, hd = cfg.num_heads, llm.cache_kv_heads, cfg.head_dim
    text = ring_chunk_hlo(llm, t, 16, step=steps.prefill_chunk)
    projections = ("btd,dnh->btnh", "btd,dckh->btckh", "btf,fd->btd", "btd,dcf->btcf")  # q, kv, o and down, gate_up
    layer_dots = [(shape, name) for shape, name in hlo.dots(text) if name.split("/")[-2] in projections]
    assert len(layer_dots) == 5
    assert all(shape[0] == t // sp for shape, _ in layer_dots), layer_dots  # [T/sp, out] (B = 1 folded)
    ops, in_layer = hlo.layer_collectives(text, cfg.num_layers)
    assert sorted((c.kind, c.bytes, c.axes(llm.mesh)) for c in in_layer) == sorted(
        [
            ("all-gather", t * n * hd * 4, {"sp"}),  # the queries [1, T, N, H]
            ("all-gather", t * k * hd * 4, {"sp"}),  # the new keys
            ("all-gather", t * k * hd * 4, {"sp"}),  # and values
            ("all-to-all", t * n * (hd + 2) * 4, {"sp"}),  # partials [1, T, N, H + 2] out, T/sp of every rank's in
        ]
    )
    # Outside the layers only the chunk's positions, pages and offsets [1, T] are gathered (int32).
    assert sorted((c.kind, c.bytes) for c in ops if c not in in_layer) == [("all-gather", t * 4)] * 3


def test_explain_kv_bytes_per_token_fall_with_sp(llama3):
    one = explain.explain(llama3, dict(), prompt_len=64, gen_len=16)["per_device"]["kv_cache_bytes_per_token"]
    four = explain.explain(llama3, dict(sp=4), prompt_len=64, gen_len=16)["per_device"]["kv_cache_bytes_per_token"]
    assert one == 2 * 3 * 4 * 8 * 4  # k and v, 3 layers, 4 kv heads of 8, float32
    assert four * 4 == one


def test_engine_over_sp_with_the_pallas_kernel_in_interpret_mode(llama3, engine_ref):
    """Decode steps take the kernel's partials (its rank's column of the block table, unnormalised output,
    max and sum), merged across sp as the XLA path's are."""
    llm = jaxinfer.LLM(llama3, **ENGINE, sp=2, attention="interpret")
    assert llm.setup.page_split.decode_kernel == "interpret"
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)
    got = llm.generate([PROMPTS[1]], params)[0]
    assert got.token_ids == engine_ref[1].token_ids[:16]
    np.testing.assert_allclose(got.logprobs, engine_ref[1].logprobs[:16], rtol=1e-4, atol=1e-5)


def test_a_first_chunk_passes_kv_around_the_ring_and_each_rank_writes_its_pages_from_it(llama3):
    llm = jaxinfer.LLM(llama3, **ENGINE, sp=2, unroll_layers=False)
    cfg, t = llm.config, 64
    ops, in_layer = hlo.layer_collectives(ring_chunk_hlo(llm, t, 16), cfg.num_layers)
    block = (t // 2) * llm.cache_kv_heads * cfg.head_dim * 4  # one rank's K (or V) of the chunk, one layer
    assert [(c.kind, c.bytes) for c in in_layer] == [("collective-permute", block)] * 2  # sp - 1 = 1 step: k, v
    # Each rank keeps the tokens of its own pages from the blocks the ring brings: nothing else is moved.
    assert [c for c in ops if c not in in_layer and c.bytes >= block] == []


@pytest.mark.parametrize(
    "arch, options, tol",
    [("mistral", {}, 1e-4), ("llama3", dict(kv_cache_dtype="int8"), 2e-3)],
    ids=["sliding-window", "int8-kv"],
)
def test_engine_over_sp_with_a_sliding_window_or_an_int8_cache(tiny_dir, arch, options, tol):
    """The split pool's masks follow a sliding window (8 tokens here, much shorter than the prompt), and
    its scales come with the pages. int8: not 1e-4, see test_score_with_an_int8_kv_cache_matches_one_device."""
    path = str(tiny_dir(arch))
    params = jaxinfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)
    prompts = [PROMPT[:150], PROMPT[100:177]]
    ref = jaxinfer.LLM(path, **ENGINE, **options).generate(prompts, params)
    got = jaxinfer.LLM(path, **ENGINE, **options, sp=2).generate(prompts, params)
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
        np.testing.assert_allclose(g.logprobs, r.logprobs, rtol=tol, atol=tol)


# --- sp x pp: pipeline stages manual over pp and sp (jaxinfer/pipeline.py) --------------------------


@pytest.fixture(scope="module")
def llama4(tiny_dir):
    """tiny.py's Llama-3 with 4 layers, so that pp=2 splits it."""
    return str(tiny_dir("llama3", num_hidden_layers=4))


@pytest.mark.parametrize(
    "axes",
    [dict(sp=2, pp=2), dict(sp=2, pp=2, tp=2), dict(sp=2, pp=2, dp=2)],
    ids=["sp2xpp2", "sp2xpp2xtp2", "sp2xpp2xdp2"],
)
def test_sp_pp_score_matches_one_device(llama4, axes):
    # 199 tokens in a bucket of 250 (max_seq_len), neither a multiple of 2·sp = 4: padded to 252.
    prompt = PROMPT[:199]
    ref = jaxinfer.LLM(llama4, max_seq_len=250).score(prompt)
    got = jaxinfer.LLM(llama4, max_seq_len=250, **axes).score(prompt)
    assert got.shape == ref.shape == (199, 256)
    assert rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("axes", [dict(sp=2, pp=2), dict(sp=2, pp=2, tp=2)], ids=["sp2xpp2", "sp2xpp2xtp2"])
def test_sp_pp_engine_and_static_greedy_match_one_device(llama4, axes, monkeypatch):
    """generate_static prefills over the ring inside the stages and decodes from the unsplit cache; the
    engine's first chunks run the ring inside the stages, its later chunks (split over sp too) and decode
    read the split pool there, and a cached prefix comes from the pages' own ranks."""
    one, llm = jaxinfer.LLM(llama4, **ENGINE), jaxinfer.LLM(llama4, **ENGINE, **axes)
    ring_chunks, ring_step = [], steps.prefill_chunk_ring
    monkeypatch.setattr(steps, "prefill_chunk_ring", lambda *a, **k: ring_chunks.append(a[7]) or ring_step(*a, **k))
    for run in ("generate_static", "generate"):
        for got, ref in zip(getattr(llm, run)(PROMPTS, DECODE), getattr(one, run)(PROMPTS, DECODE)):
            _assert_same(got, ref)
    assert len(ring_chunks) == 2  # each prompt's first chunk over the ring
    hits = llm.engine.pages.hits
    _assert_same(llm.generate([PREFIXED], DECODE)[0], one.generate([PREFIXED], DECODE)[0])
    assert llm.engine.pages.hits - hits == 10


def test_sp_pp_prefill_hlo_rings_over_sp_in_each_stage_and_hands_over_split_activations(llama4):
    """Inside each stage's layer loop only the ring's collective-permutes over sp; between stages one
    permute over pp of a micro-batch's activations, still split over sp; the K/V never gathered (each
    rank writes its stage's cache from the blocks the ring brings). The stages scan their layers here, so
    that one layer's collectives sit in a loop body of their own."""
    llm = jaxinfer.LLM(llama4, max_seq_len=MAX_SEQ, sp=2, pp=2, unroll_layers=False)
    cfg, t, sp, pp = llm.config, MAX_SEQ, 2, 2
    ops, in_layer = hlo.layer_collectives(ring_prefill_hlo(llm, t, 199), cfg.num_layers // pp)
    block = (t // sp) * llm.cache_kv_heads * cfg.head_dim * 4  # one rank's K (or V) of one layer, fp32
    ticks = 1 + pp - 1  # one micro-batch: a layer loop per tick
    assert [(c.kind, c.bytes, c.axes(llm.mesh)) for c in in_layer] == [
        ("collective-permute", block, {"sp"})
    ] * 2 * ticks
    hand_over = [c for c in ops if "pp" in c.axes(llm.mesh) and c.kind == "collective-permute"]
    assert [c.bytes for c in hand_over] == [(t // sp) * cfg.hidden_size * 4]
    assert [c for c in ops if c.kind == "all-gather" and c.bytes >= block] == []
    assert not [c for c in in_layer if c.kind == "all-gather"]


def test_sp_pp_decode_hlo_merges_partials_over_sp_in_each_stage_and_gathers_no_pages(llama4):
    # scanned stages (a layer loop to find one layer's collectives in), cut into micro-batches of 2 rows
    llm = jaxinfer.LLM(llama4, **ENGINE, sp=2, pp=2, unroll_layers=False, pp_microbatch_rows=2)
    cfg, eng, s, w = llm.config, llm.engine, 4, 16
    sampling, _ = llm.setup.sampling_arrays(jaxinfer.SamplingParams(temperature=0), s, s)
    cache = PagedKVCache(
        eng.cache_k, eng.cache_v, np.zeros((s, w), np.int32), np.ones((s, 1), bool), llm.setup.page_split
    )
    col = llm._put(np.zeros(s, np.int32))
    lowered = steps.decode.lower(eng.graphdef, llm.state, cache, col, col, sampling, n_steps=8, greedy_only=True)
    ops, in_layer = hlo.layer_collectives(lowered.compile().as_text(), cfg.num_layers // 2)
    mb = s // 2  # two micro-batches of two rows: three ticks, a layer loop in each
    partials = 2 * mb * cfg.num_heads * (cfg.head_dim + 2) * 4  # out, max and sum from each of the 2 sp ranks
    assert [(c.kind, c.bytes, c.axes(llm.mesh)) for c in in_layer] == [("all-gather", partials, {"sp"})] * 3
    rest = [(c.kind, c.bytes, c.axes(llm.mesh)) for c in ops if c not in in_layer]
    hand_over = ("collective-permute", mb * cfg.hidden_size * 4, {"pp"})  # one micro-batch's [2, 1, D]
    assert rest == [hand_over, hand_over, ("all-reduce", s * cfg.hidden_size * 4, {"pp"})]  # the stages' sum


def test_sp_pp_explain_counts_the_ring_and_only_the_stage_hand_overs(llama4):
    r = explain.explain(llama4, dict(sp=2, pp=2), prompt_len=200, gen_len=16)
    t, d = 256, 64  # the prompt bucket; the hidden size
    block = (t // 2) * 4 * 8 * 4  # one rank's K (or V) of one layer: 4 kv heads of 8, fp32
    assert r["ring"] == {"sp": 2, "collective_permutes_per_layer": 2, "bytes_per_layer": 2 * block}
    # the ring's permutes are not stage hand-overs: prefill hands [1, T/sp, D] over once, decode [1, 1, D]
    assert r["pipeline"]["boundary_bytes_per_step"] == {"prefill": (t // 2) * d * 4, "decode": d * 4}
    assert "ring attention over sp=2: 2 collective-permutes per layer" in explain.format_report(r)


def test_sp_pp_moe_score_matches_one_device(tiny_dir):
    """Routed experts inside stages manual over pp and sp: each (sp, ep) shard dispatches its own tokens."""
    path = str(tiny_dir("mixtral", num_hidden_layers=4))
    ref = jaxinfer.LLM(path, max_seq_len=MAX_SEQ).score(PROMPT)
    got = jaxinfer.LLM(path, max_seq_len=MAX_SEQ, sp=2, pp=2, ep=2, moe_dispatch="all_to_all").score(PROMPT)
    assert rel_err(got, ref) < 1e-4


# --- a mixture-of-experts model over sp: each (dp, sp) shard dispatches its own tokens ---------------

MOE_MESHES = [
    ("mixtral", dict(sp=2), "auto"),
    ("mixtral", dict(sp=2, ep=2), "psum"),
    ("mixtral", dict(sp=2, ep=2), "all_to_all"),
    ("mixtral", dict(sp=2, ep=2, tp=2), "all_to_all"),
    ("qwen3_moe", dict(sp=2, ep=2), "all_to_all"),  # a dense layer between two routed ones
    ("qwen3_moe", dict(sp=2, ep=2, tp=2), "psum"),
    ("mixtral", dict(sp=2, dp=2, ep=2), "all_to_all"),  # (dp, sp) shards: the batch padded to 2 rows, split over dp
]
MOE_IDS = ["-".join([arch, "x".join(f"{k}{v}" for k, v in axes.items()), mode]) for arch, axes, mode in MOE_MESHES]


@pytest.fixture(scope="module")
def moe_one_device(tiny_dir):
    return {arch: jaxinfer.LLM(str(tiny_dir(arch)), max_seq_len=MAX_SEQ) for arch in ("mixtral", "qwen3_moe")}


@pytest.mark.parametrize("arch, axes, dispatch", MOE_MESHES, ids=MOE_IDS)
def test_moe_score_matches_one_device(tiny_dir, moe_one_device, arch, axes, dispatch):
    ref = moe_one_device[arch].score(PROMPT)
    got = jaxinfer.LLM(str(tiny_dir(arch)), max_seq_len=MAX_SEQ, moe_dispatch=dispatch, **axes).score(PROMPT)
    assert rel_err(got, ref) < 1e-4


MOE_PROMPTS = [PROMPT[:150], PROMPT[100:177]]
MOE_DECODE = jaxinfer.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def moe_greedy_ref(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("mixtral")), **ENGINE)
    return {run: getattr(llm, run)(MOE_PROMPTS, MOE_DECODE) for run in ("generate", "generate_static")}


@pytest.mark.parametrize(
    "arch, axes, dispatch", [MOE_MESHES[i] for i in (0, 2, 3)], ids=[MOE_IDS[i] for i in (0, 2, 3)]
)
def test_moe_engine_and_static_greedy_match_one_device(tiny_dir, moe_greedy_ref, arch, axes, dispatch, monkeypatch):
    """The engine's first chunk routes its tokens split over sp (ring attention), its later chunks split over
    sp as well, decode replicated over sp; generate_static prefills split and decodes from the unsplit cache."""
    llm = jaxinfer.LLM(str(tiny_dir(arch)), **ENGINE, moe_dispatch=dispatch, **axes)
    ring_chunks = []
    ring_step = steps.prefill_chunk_ring
    monkeypatch.setattr(steps, "prefill_chunk_ring", lambda *a, **k: ring_chunks.append(a[7]) or ring_step(*a, **k))
    for run, ref in moe_greedy_ref.items():
        for g, r in zip(getattr(llm, run)(MOE_PROMPTS, MOE_DECODE), ref):
            assert len(g.token_ids) == 16
            assert g.token_ids == r.token_ids
            np.testing.assert_allclose(g.logprobs, r.logprobs, rtol=1e-4, atol=1e-5)
    assert len(ring_chunks) == 2  # each prompt's first chunk ran split over sp


@pytest.mark.parametrize("dispatch", ["all_to_all", "psum"])
def test_moe_explain_over_sp_dispatches_each_ranks_share_of_the_prompt(tiny_dir, dispatch):
    """No collective gathers the tokens over sp: the prefill's dispatch moves T/sp tokens per device, the
    same bytes as a T/sp-token prompt at sp=1, and the ring passes K/V as for a dense model."""
    path, t, sp, ep = str(tiny_dir("mixtral")), 64, 2, 2
    r = explain.explain(path, dict(sp=sp, ep=ep), prompt_len=t, gen_len=8, moe_dispatch=dispatch)
    alone = explain.explain(path, dict(ep=ep), prompt_len=t // sp, gen_len=8, moe_dispatch=dispatch)
    m, d, k = r["moe"]["steps"]["prefill"], 64, 2
    assert m["tokens"] == t // sp and m["mode"] == dispatch
    got, want = r["steps"]["prefill"]["collectives"], alone["steps"]["prefill"]["collectives"]
    if dispatch == "all_to_all":
        n = t // (sp * ep)  # tokens each device routes
        slots = ep * moe.capacity(n, ep, k)
        assert got["all-to-all"]["per_layer_count"] == 2
        assert got["all-to-all"]["per_layer_bytes"] == slots * ((d + 2 * k) * 4 + d * 4)
        assert got["all-gather"]["per_layer_bytes"] == (t // sp) * d * 4  # over ep, within one sp rank
    else:
        assert got["all-reduce"]["per_layer_bytes"] == (t // sp) * d * 4  # one psum over ep of the rank's tokens
    for kind in ("all-to-all", "all-gather", "all-reduce"):
        assert got.get(kind, {}).get("per_layer_bytes", 0) == want.get(kind, {}).get("per_layer_bytes", 0), kind
    assert r["ring"]["collective_permutes_per_layer"] == 2  # k and v, sp - 1 = 1 step
