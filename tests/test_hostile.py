"""Hostile and careless use: one bad request fails alone, never the engine. Bad values are refused
before anything is queued; a request that fails while running ends with an error of its own; streams
carry each piece of text once; consumers that leave cancel; one lock serializes whoever steps."""

import asyncio
import math
import re
import shutil
import threading
import time

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

import jaxinfer
from jaxinfer import JaxinferError, distributed, outputs, sampling, steps
from jaxinfer import engine as engine_module
from jaxinfer.tokenizer import Tokenizer

GREEDY = dict(temperature=0, ignore_eos=True)
P = jaxinfer.SamplingParams


def _byte_level(tokens: list[bytes]) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer whose token i decodes to the bytes tokens[i] (GPT-2's byte alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {"".join(char[b] for b in t): i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    tok = tokenizers.Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def llm(tiny_dir, tmp_path_factory):
    """The tiny llama with a one-byte-per-token tokenizer: text prompts, stop strings and random bytes out."""
    directory = tmp_path_factory.mktemp("llama3_bytes")
    for f in tiny_dir("llama3").iterdir():
        shutil.copy(f, directory)
    _byte_level([bytes([i]) for i in range(256)]).save(str(directory / "tokenizer.json"))
    return jaxinfer.LLM(str(directory), max_seq_len=128, max_num_seqs=4, page_size=4, num_pages=24, prefill_chunk=16)


_solo: dict = {}


def solo(llm, prompt, n: int) -> list[int]:
    """Greedy tokens of `prompt` alone on the engine."""
    key = (tuple(prompt), n)
    if key not in _solo:
        _solo[key] = llm.generate([list(prompt)], P(max_tokens=n, **GREEDY))[0].token_ids
    return _solo[key]


def run(coroutine, timeout: float = 120):
    """asyncio.run, failing instead of hanging when a stream never ends."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def assert_idle(llm):
    engine = llm.engine
    assert not engine.has_work()
    assert engine.free_pages() == engine.num_pages - 1  # every page came back


def _prompt(i: int, length: int = 6) -> list[int]:
    return [(7 * i + 3 * j) % 250 + 3 for j in range(length)]


# --- 1a. every bad value is refused up front, with its name and the fix --------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stop=[5]), r"stop\[0\]=5 is a int, not a string.*stop_token_ids"),
        (dict(stop=[None]), r"stop\[0\]=None is a NoneType, not a string"),
        (dict(stop=5), r"stop=5 is a int; give stop as a non-empty string or a list"),
        (dict(stop=""), r'stop="" would end every completion at once'),
        (dict(stop=["ok", ""]), r'stop\[1\]="" would end every completion at once'),
        (dict(top_k=2**31), r"top_k=2147483648 must be an integer >= 0 and <= 2147483647"),
        (dict(top_k=True), r"top_k=True must be an integer"),
        (dict(top_k=2.0), r"top_k=2.0 must be an integer"),
        (dict(top_p=float("nan")), r"top_p=nan must be in \(0, 1\]"),
        (dict(top_p="0.9"), r"top_p='0.9' is a str; give a number in \(0, 1\]"),
        (dict(temperature=-1), r"temperature=-1 must be >= 0"),
        (dict(temperature=math.inf), r"temperature=inf must be >= 0 \(0 is greedy\) and finite"),
        (dict(temperature=float("nan")), r"temperature=nan must be >= 0"),
        (dict(temperature=True), r"temperature=True is a bool; give a number >= 0"),
        (dict(max_tokens=2.5), r"max_tokens=2.5 must be an integer >= 1"),
        (dict(max_tokens=True), r"max_tokens=True must be an integer >= 1"),
        (dict(seed=1.5), r"seed=1.5 must be an integer"),
        (dict(seed=True), r"seed=True must be an integer"),
        (dict(stop_token_ids=[None]), r"stop_token_ids\[0\]=None is not an integer"),
        (dict(stop_token_ids=7), r"stop_token_ids=7 is a int; give stop_token_ids as a list"),
        (dict(stop_token_ids=[-1]), r"stop_token_ids\[0\]=-1 is outside the vocabulary"),
        (dict(ignore_eos="no"), r"ignore_eos='no' must be True or False"),
    ],
)
def test_bad_sampling_params_are_refused_when_made(kwargs, match):
    with pytest.raises(JaxinferError, match=match):
        P(**kwargs)


def test_params_are_checked_against_the_vocabulary_before_anything_is_queued(llm):
    ok = [3, 4, 5]
    cases = [
        (P(top_k=257), r"top_k=257 must be an integer >= 0 and <= 256 \(the vocabulary size"),
        (P(stop_token_ids=[256]), r"stop_token_ids\[0\]=256 is outside the vocabulary \[0, 256\)"),
        ("greedy", r"params must be jaxinfer.SamplingParams, got str"),
    ]
    tampered = P()
    object.__setattr__(tampered, "stop", [5])  # past the frozen dataclass: caught again when added
    cases.append((tampered, r"stop\[0\]=5 is a int, not a string"))
    for params, match in cases:
        with pytest.raises(JaxinferError, match=match):
            llm.generate([ok], params)
        with pytest.raises(JaxinferError, match=match):
            llm.generate_stream(ok, params)
        with pytest.raises(JaxinferError, match=match):
            llm.engine.add(ok, params)
        assert_idle(llm)
    for prompt, match in [([3, 2.5], r"has 2.5 \(float\) where a token id"), ([3, True], r"has True \(bool\)")]:
        with pytest.raises(JaxinferError, match=match):
            llm.generate([prompt])
    # Stop ids in the vocabulary work, and the engine serves as before.
    want = solo(llm, ok, 6)
    out = llm.generate([ok], P(max_tokens=6, temperature=0, stop_token_ids=[want[2]]))[0]
    assert out.token_ids == want[:3] and out.finish_reason == "stop"
    assert_idle(llm)


def test_greedy_picks_as_argmax_does_on_ties_infinities_and_nans():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 300)).astype(np.float32)
    logits[0, [7, 40]] = 9  # a tie: the first
    logits[1, [3, 250]] = np.inf
    logits[2, [5, 99]] = np.nan  # argmax takes the first NaN
    logits[3] = -np.inf
    logits[4, 299] = 50  # the last
    zeros = np.zeros(6, np.float32)
    tokens, _ = jax.jit(sampling.sample, static_argnames=("greedy_only",))(
        logits, zeros, zeros.astype(np.int32), zeros + 1, None, zeros.astype(np.int32), greedy_only=True
    )
    assert (
        np.asarray(tokens).tolist()
        == np.argmax(logits, axis=-1).tolist()
        == [7, 3, 5, 0, 299, int(np.argmax(logits[5]))]
    )


def test_seeds_of_any_size_are_distinct_and_unseeded_ones_are_drawn_once(llm, monkeypatch):
    for s in (0, 5, 2**32 - 1):
        assert np.array_equal(sampling.seed_key(s), np.asarray(jax.random.key_data(jax.random.key(s))))
    keys = {tuple(sampling.seed_key(s)) for s in (0, 2**32, 2**63, 2**64 - 1, 2**64, -1, -(2**70), 2**200)}
    assert len(keys) == 8  # 2**32 is not seed 0, and nothing above 2**63 overflows
    prompt = [9, 8, 7]
    for seed in (-1, 2**63, 2**64 + 3, 10**30):
        params = P(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
        first, again = llm.generate([prompt, prompt], params)
        assert first.token_ids == again.token_ids == llm.generate([prompt], params)[0].token_ids
    engine = llm.engine
    a, b = engine.add(prompt, P(max_tokens=2)), engine.add(prompt, P(max_tokens=2))
    assert not np.array_equal(a.key, b.key)  # drawn per request, 63 bits
    engine.cancel(a)
    engine.cancel(b)
    # Multi-process: process 0's draw is shared.
    from jax.experimental import multihost_utils

    monkeypatch.setattr(distributed, "_joined", True)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: np.int64(12345))
    c = engine.add(prompt, P(max_tokens=2))
    assert np.array_equal(c.key, sampling.seed_key(12345))
    engine.cancel(c)
    assert_idle(llm)


# --- 1b. a request that fails while running fails alone ----------------------------------------

BAD = [44, 45, 46, 47]


@pytest.fixture
def failing_stops(monkeypatch):
    """Stop handling raises for the prompt BAD once it has two tokens."""
    push = outputs.Stops.push

    def bad_push(self, row, token, logprob):
        if row.prompt == BAD and len(row.ids) >= 2:
            raise RuntimeError("boom in stop handling")
        push(self, row, token, logprob)

    monkeypatch.setattr(outputs.Stops, "push", bad_push)


def test_a_request_that_fails_while_running_fails_alone(llm, failing_stops):
    a, c = _prompt(1, 9), _prompt(2, 5)
    want_a, want_c = solo(llm, a, 12), solo(llm, c, 12)
    engine = llm.engine
    failures = engine.failures
    reqs = [engine.add(p, P(max_tokens=12, **GREEDY)) for p in (a, BAD, c)]
    while engine.has_work():
        engine.step()
    assert reqs[1].row.finish == "error" and "RuntimeError: boom in stop handling" in reqs[1].row.error
    assert [reqs[0].row.ids, reqs[2].row.ids] == [want_a, want_c]
    assert engine.failures == failures + 1
    assert_idle(llm)
    # LLM.generate raises naming the request; the rest of its batch ends; the engine serves the next.
    with pytest.raises(JaxinferError, match=r"request \d+ \(prompt 1\) failed: RuntimeError: boom in stop handling"):
        llm.generate([a, BAD, c], P(max_tokens=12, **GREEDY))
    assert_idle(llm)
    assert llm.generate([c], P(max_tokens=12, **GREEDY))[0].token_ids == want_c
    with pytest.raises(JaxinferError, match=r"request \d+ failed: RuntimeError: boom"):
        list(llm.generate_stream(BAD, P(max_tokens=12, **GREEDY)))
    assert_idle(llm)


def test_a_failing_request_raises_in_its_own_asyncllm_stream_only(llm, failing_stops):
    a, c = _prompt(3, 7), _prompt(4, 8)
    want = [solo(llm, a, 12), solo(llm, c, 12)]

    async def main():
        server = jaxinfer.AsyncLLM(llm)

        async def collect(prompt):
            try:
                return sum([ch.token_ids async for ch in server.generate(prompt, P(max_tokens=12, **GREEDY))], [])
            except JaxinferError as e:
                return e

        got = await asyncio.gather(collect(a), collect(BAD), collect(c))
        after = await collect(a)  # the background task lives on
        return got, after

    (ga, bad, gc), after = run(main())
    assert isinstance(bad, JaxinferError) and re.search(r"request \d+ failed: RuntimeError: boom", str(bad))
    assert [ga, gc] == want and after == want[0]
    assert_idle(llm)


@pytest.mark.parametrize("step", ["decode", "prefill_chunk"])
def test_a_failed_compiled_step_fails_its_requests_and_the_engine_goes_on(llm, monkeypatch, step):
    k = 30 if step == "decode" else 40  # prompts of their own: no prefix of them is in the engine's cache
    short, long_ = _prompt(k, 5), _prompt(k + 1, 40)
    want_short, want_long = (o.token_ids for o in llm.generate_static([short, long_], P(max_tokens=6, **GREEDY)))
    real, calls = getattr(steps, step), []

    def broken(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)  # the cache was donated: it is gone with the failure
        if len(calls) == 1:
            raise RuntimeError("XlaRuntimeError: INTERNAL: simulated device failure")
        return out

    monkeypatch.setattr(steps, step, broken)
    engine = llm.engine
    s = engine.add(short, P(max_tokens=6, **GREEDY))
    g = engine.add(long_, P(max_tokens=6, **GREEDY))  # still reading its prompt when the step fails
    while engine.has_work():
        engine.step()
    assert s.row.finish == "error" and "simulated device failure" in s.row.error
    assert g.row.ids == want_long  # restarted on a fresh cache
    assert_idle(llm)
    assert llm.generate([short], P(max_tokens=6, **GREEDY))[0].token_ids == want_short
    assert_idle(llm)


# --- 2. streamed text: every piece once, split characters and stop strings held back --------------


def _stream(llm, prompt, params):
    chunks = list(llm.generate_stream(prompt, params))
    full = llm.generate([prompt] if not isinstance(prompt, str) else prompt, params)[0]
    assert sum((c.token_ids for c in chunks), []) == full.token_ids
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == full.finish_reason
    return chunks, full


def test_streamed_text_adds_up_to_the_completion_text(llm):
    chunks, full = _stream(llm, "Hello", P(max_tokens=16, **GREEDY))
    assert len(chunks) == 2 and len(full.text) > 8
    assert "".join(c.text for c in chunks) == full.text
    assert_idle(llm)


def test_a_character_split_between_chunks_is_held_back(llm, monkeypatch):
    ids = solo(llm, [1, 2, 3], 16)
    # Each token the model makes ends one two-byte character (U+00C0 and on) and starts the next.
    tokens = [bytes([i]) for i in range(256)]
    for k, t in enumerate(dict.fromkeys(ids)):
        tokens[t] = bytes([0x80 + k, 0xC3])
    monkeypatch.setattr(llm, "tokenizer", Tokenizer(_byte_level(tokens)))
    chunks, full = _stream(llm, [1, 2, 3], P(max_tokens=16, **GREEDY))
    assert len(chunks) == 2 and len(full.text) == 17 and "\ufffd" not in full.text[1:16]
    assert not chunks[0].text.endswith("\ufffd")  # the half character waited for its second byte
    assert "".join(c.text for c in chunks) == full.text
    assert_idle(llm)


def test_a_stop_string_across_chunks_never_shows(llm, monkeypatch):
    prompt = [1, 2, 3]
    ids = solo(llm, prompt, 16)
    monkeypatch.setattr(llm, "tokenizer", Tokenizer(_byte_level([f" t{i}".encode() for i in range(256)])))
    stop = f"{ids[7]} t{ids[8]}"  # the end of the first chunk's last token, the start of the second's first
    text = "".join(f" t{i}" for i in ids)
    assert text.find(stop) == len("".join(f" t{i}" for i in ids[:7])) + 2  # its first occurrence
    chunks, full = _stream(llm, prompt, P(max_tokens=16, stop=["zzz", stop], **GREEDY))
    assert full.finish_reason == "stop" and full.text == text[: text.find(stop)]
    assert len(chunks) == 2 and "".join(c.text for c in chunks) == full.text
    assert_idle(llm)


# --- 3. a consumer that goes away cancels; finished requests are published once -------------------


def test_consumers_that_go_away_cancel_their_requests(llm):
    long_params = P(max_tokens=60, **GREEDY)

    async def idle():
        while llm.engine.has_work():
            await asyncio.sleep(0.01)

    async def main():
        server = jaxinfer.AsyncLLM(llm)
        # A client disconnects: the task iterating the stream is cancelled while it waits.
        req = await server.submit(_prompt(7), long_params)
        first = asyncio.Event()

        async def consume():
            async for _ in server.stream(req):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        await asyncio.wait_for(idle(), 60)
        cancelled = req.row.finish, len(req.row.ids)
        # A closed iterator.
        agen = server.generate(_prompt(8), long_params)
        await agen.__anext__()
        (closed,) = llm.engine.running
        await agen.aclose()
        await asyncio.wait_for(idle(), 60)
        assert closed.row.finish == "cancelled" and len(closed.row.ids) < 60
        # A submitted request never streamed, and one streamed to the end while another runs on: each
        # publishes its chunks once and nothing of them is kept once finished.
        quiet = await server.submit(_prompt(9), P(max_tokens=3, **GREEDY))
        short = await server.submit(_prompt(10), P(max_tokens=3, **GREEDY))
        longer = await server.submit(_prompt(11), P(max_tokens=40, **GREEDY))
        longer_ids = sum([c.token_ids async for c in server.stream(longer)], [])
        short_chunks = [c async for c in server.stream(short)]
        return cancelled, server, quiet, short, short_chunks, longer_ids

    (finish, n), server, quiet, short, short_chunks, longer_ids = run(main())
    assert finish == "cancelled" and n < 60
    assert quiet.row.finish == "length" and not server._open
    assert short.feed.queue.empty() and [c.finish_reason for c in short_chunks] == ["length"]
    assert sum((c.token_ids for c in short_chunks), []) == solo(llm, _prompt(10), 3)
    assert longer_ids == solo(llm, _prompt(11), 40)
    assert_idle(llm)
    # generate_stream: a generator closed early cancels; one never iterated queues nothing.
    gen = llm.generate_stream(_prompt(12), long_params)
    assert not llm.engine.has_work()
    next(gen)
    assert llm.engine.has_work()
    gen.close()
    assert_idle(llm)


# --- 4. float max_seq_len, and a batch with one bad prompt queues nothing -------------------------


def test_max_seq_len_must_be_an_int_and_a_bad_batch_queues_nothing(llm, tiny_dir):
    for bad in (64.5, True, "64"):
        with pytest.raises(JaxinferError, match=rf"max_seq_len={bad!r} must be in \[2, 256\].*an integer"):
            jaxinfer.LLM(str(tiny_dir("llama3")), max_seq_len=bad)
    ok = [_prompt(13), _prompt(14)]
    too_many_pages = list(range(3, 90))  # fits max_seq_len=128 but not the 23 pages with its decode room
    with pytest.raises(JaxinferError, match=r"a prompt of 87 tokens with max_tokens=4 needs 25 pages"):
        llm.generate([*ok, too_many_pages], P(max_tokens=4, **GREEDY))
    assert_idle(llm)
    with pytest.raises(JaxinferError, match=r"top_k=1000 must be an integer >= 0 and <= 256"):
        llm.generate([*ok, ok[0]], [P(max_tokens=4), P(max_tokens=4), P(max_tokens=4, top_k=1000)])
    assert_idle(llm)


# --- 5. one lock, whichever API drives the engine ----------------------------------------------


def test_generate_and_asyncllm_never_step_the_engine_at_once(llm, monkeypatch):
    inside, overlaps = [0], []
    guard = threading.Lock()

    def watched(method):
        def wrapper(self, *args):
            with guard:
                inside[0] += 1
                overlaps.append(inside[0])
            time.sleep(0.005)  # widen the window
            try:
                return method(self, *args)
            finally:
                with guard:
                    inside[0] -= 1

        return wrapper

    for name in ("_prefill", "_decode"):
        monkeypatch.setattr(engine_module.Engine, name, watched(getattr(engine_module.Engine, name)))
    prompts = [_prompt(20 + i, 5 + i) for i in range(6)]
    want = [solo(llm, p, 10) for p in prompts]
    threaded = []

    def in_thread():
        for p in prompts[:3]:
            threaded.append(llm.generate([p], P(max_tokens=10, **GREEDY))[0].token_ids)

    async def main():
        server = jaxinfer.AsyncLLM(llm)
        thread = threading.Thread(target=in_thread)
        thread.start()
        got = [
            sum([c.token_ids async for c in server.generate(p, P(max_tokens=10, **GREEDY))], []) for p in prompts[3:]
        ]
        await asyncio.to_thread(thread.join)
        return got

    got = run(main())
    assert max(overlaps) == 1
    assert threaded + got == want
    assert_idle(llm)


# --- 6. a hostile mix through AsyncLLM ---------------------------------------------------------


def test_a_hostile_mix_through_asyncllm(llm):
    """50 requests: a third invalid (each refused at submit with its own error, nothing queued), a
    third cancelled mid-stream, the rest valid and equal to their greedy outputs alone."""
    tampered = P(max_tokens=4)
    object.__setattr__(tampered, "top_k", 2**31)
    invalid = [  # (prompt, params (made inside the same try as the submit), the error's words)
        ([3, 4], lambda: tampered, r"top_k=2147483648 must be an integer >= 0 and <= 256"),
        ([3, 300], lambda: None, r"token id 300 outside the vocabulary"),
        ([], lambda: None, r"prompt 0 is empty"),
        (list(range(3, 90)), lambda: P(max_tokens=4), r"87 tokens with max_tokens=4 needs 25 pages"),
        (list(range(200)), lambda: None, r"prompt 0 has 200 tokens, longer than the context"),
        ([3, 4], lambda: P(stop_token_ids=[999]), r"stop_token_ids\[0\]=999 is outside the vocabulary"),
        ([3, 4], lambda: P(top_k=300), r"top_k=300 must be an integer >= 0 and <= 256"),
        ([3, 4], lambda: {"max_tokens": 4}, r"params must be jaxinfer.SamplingParams, got dict"),
        ([3, None], lambda: None, r"has None \(NoneType\) where a token id"),
        (3.5, lambda: None, r"prompt 0 is a float; give a str or a list of token ids"),
        ([3, 4], lambda: P(stop=[5]), r"stop\[0\]=5 is a int"),
        ([3, 4], lambda: P(stop=[None]), r"stop\[0\]=None is a NoneType"),
        ([3, 4], lambda: P(stop=""), r'stop="" would end every completion'),
        ([3, 4], lambda: P(top_k=-1), r"top_k=-1 must be an integer >= 0"),
        ([3, 4], lambda: P(temperature=math.nan), r"temperature=nan must be >= 0"),
        ([3, 4], lambda: P(max_tokens=0), r"max_tokens=0 must be an integer >= 1"),
        ([3, 4], lambda: P(seed="7"), r"seed='7' must be an integer"),
    ]
    kinds = (["valid", "invalid", "cancel"] * 17)[:50]
    assert kinds.count("invalid") == len(invalid) == 17
    valid_prompts = {i: _prompt(i, 3 + i % 7) for i, k in enumerate(kinds) if k == "valid"}
    want = {i: solo(llm, p, 5) for i, p in valid_prompts.items()}
    cancel_params = P(max_tokens=40, **GREEDY)

    async def main():
        server = jaxinfer.AsyncLLM(llm)

        async def one(i, kind):
            if kind == "valid":
                return sum(
                    [c.token_ids async for c in server.generate(valid_prompts[i], P(max_tokens=5, **GREEDY))], []
                )
            if kind == "invalid":
                prompt, params, match = invalid[i // 3]
                try:
                    await server.submit(prompt, params())
                except JaxinferError as e:
                    return re.search(match, str(e)) is not None or str(e)
                return "accepted"
            req = await server.submit(_prompt(i, 4), cancel_params)
            first = asyncio.Event()

            async def consume():
                async for _ in server.stream(req):
                    first.set()

            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()
            return req

        results = await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds)))
        while llm.engine.has_work():
            await asyncio.sleep(0.01)
        after = sum([c.token_ids async for c in server.generate(valid_prompts[0], P(max_tokens=5, **GREEDY))], [])
        return results, after, server

    results, after, server = run(main())
    for i, (kind, r) in enumerate(zip(kinds, results)):
        if kind == "valid":
            assert r == want[i], i
        elif kind == "invalid":
            assert r is True, (i, r)
        else:
            assert r.row.finish == "cancelled" and len(r.row.ids) < 40, (i, r.row.finish)
    assert after == want[0] and not server._open
    assert_idle(llm)
