"""`jaxinfer serve`: a real server process on 127.0.0.1, driven by the official `openai` client and
compared with `llm.generate` on the same checkpoint and engine sizes in this process.

One server serves the whole module; the last test drains it with SIGTERM. Every wait is bounded."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import jaxinfer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-jaxinfer-test"
MODEL = "tiny-chat"  # --served_model_name
SIZES = dict(max_seq_len=256, max_num_seqs=4)  # the server's engine and the reference's alike
MAX_QUEUE = 2  # requests that may wait beyond the 4 the engine runs
MAX_BODY = 65536
PROMPT = "Hello, my name is"
START_TIMEOUT_S = 180


def write_tiny_chat_model(directory: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template (vocabulary 49152): real text,
    chat and stop strings at a fraction of the real model's compile time."""
    from safetensors.numpy import save_file

    from jaxinfer import checkpoint

    v, d, f, layers, heads, kv_heads, head_dim = 49152, 64, 128, 2, 4, 2, 16
    rng = np.random.default_rng(0)
    w = lambda *shape: (rng.standard_normal(shape) * 0.15).astype(np.float32)
    ones = lambda: np.ones(d, np.float32)
    tensors = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": ones()}
    for i in range(layers):
        a = f"model.layers.{i}."
        tensors |= {
            a + "input_layernorm.weight": ones(),
            a + "post_attention_layernorm.weight": ones(),
            a + "self_attn.q_proj.weight": w(heads * head_dim, d),
            a + "self_attn.k_proj.weight": w(kv_heads * head_dim, d),
            a + "self_attn.v_proj.weight": w(kv_heads * head_dim, d),
            a + "self_attn.o_proj.weight": w(d, heads * head_dim),
            a + "mlp.gate_proj.weight": w(f, d),
            a + "mlp.up_proj.weight": w(f, d),
            a + "mlp.down_proj.weight": w(d, f),
        }
    save_file(tensors, str(directory / "model.safetensors"))
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=v,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
    )
    (directory / "config.json").write_text(json.dumps(config))
    checkpoint.resolve("smollm2-135m").tokenizer.save(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.log = proc, log
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=180)
        self.auth = {"Authorization": f"Bearer {KEY}"}

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def post(self, path: str, body, headers=None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **self.auth, **(headers or {})}
        return httpx.post(self.url + path, content=content, headers=hdrs, timeout=180)

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(self.url + "/metrics", headers=self.auth, timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The server: the tiny chat model, an API key, a small queue and a small body limit."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "jaxinfer", "serve", f"--model={model_dir}", f"--served_model_name={MODEL}"]
    cmd += [f"--{k}={v}" for k, v in SIZES.items()] + [f"--port={port}", f"--api_key={KEY}"]
    cmd += [f"--max_queue={MAX_QUEUE}", f"--max_body_bytes={MAX_BODY}", "--drain_timeout_s=120"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    srv = Server(proc, port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{srv.log_tail()}"
            assert time.monotonic() < deadline, f"no /health in {START_TIMEOUT_S}s:\n{srv.log_tail()}"
            try:
                if httpx.get(srv.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def llm(server, model_dir):
    """The reference: the same checkpoint and engine sizes in this process (loaded while the server starts)."""
    return jaxinfer.LLM(str(model_dir), **SIZES)


def _params(**kw):
    return jaxinfer.SamplingParams(**{"max_tokens": 16, **kw})


def _both(server_call, reference_call):
    """(server_call(), reference_call()), run at once: the server and this process compile the same
    step shapes the first time, on two cores."""
    out = {}
    t = threading.Thread(target=lambda: out.update(r=server_call()))
    t.start()
    try:
        want = reference_call()
    finally:
        t.join(300)
    assert "r" in out, "the server call failed (see above)"
    return out["r"], want


def _error(excinfo) -> tuple[int, dict]:
    e = excinfo.value
    return e.status_code, e.body


# --- completions and chat, against llm.generate -------------------------------------------------------


def test_greedy_completion_equals_generate_with_usage(server, llm):
    r, [want] = _both(
        lambda: server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0),
        lambda: llm.generate([PROMPT], _params(temperature=0)),
    )
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-") and r.created > 0
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 16, n_prompt + 16)

    # streamed: the same text in several chunks, a usage chunk with no choices, then [DONE]
    chunks = list(
        server.client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.text and len(texts) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].usage.prompt_tokens == n_prompt


def test_token_id_prompts_and_a_list_of_prompts(server, llm):
    ids = llm.tokenizer.encode(PROMPT)
    want = llm.generate([PROMPT], _params(temperature=0, max_tokens=8))[0]
    r = server.client.completions.create(model=MODEL, prompt=[ids, PROMPT], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [want.text, want.text]
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 16


def test_seeded_sampling_equals_generate_streamed_or_not(server, llm):
    kw = dict(temperature=0.8, top_p=0.9, seed=1234)
    r, [want] = _both(
        lambda: server.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, extra_body={"top_k": 40}, **kw
        ),
        lambda: llm.generate([PROMPT], _params(top_k=40, **kw)),
    )
    assert r.choices[0].text == want.text
    stream = server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, extra_body={"top_k": 40}, stream=True, **kw
    )
    assert "".join(c.choices[0].text for c in stream) == want.text


def test_n_choices_sample_with_seed_plus_index(server, llm):
    r, want = _both(
        lambda: server.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=3
        ),
        lambda: llm.generate([PROMPT] * 3, [_params(temperature=1.0, seed=7 + i) for i in range(3)]),
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    got = {c.index: c.text for c in r.choices}
    assert [got[i] for i in range(3)] == [w.text for w in want]
    assert len(set(got.values())) > 1  # three samples, not one thrice
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)


def test_chat_equals_generate_chat_with_logprobs(server, llm):
    question = "What is the capital of France?"
    messages = [{"role": "user", "content": question}]
    r, [want] = _both(
        lambda: server.client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
        ),
        lambda: llm.generate(
            [question], _params(temperature=0, max_tokens=12, logprobs=True, top_logprobs=2), chat=True
        ),
    )
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant" and c.message.content == want.text
    assert c.finish_reason == ("stop" if len(want.token_ids) < 12 else "length")
    assert [t.token for t in c.logprobs.content] == [llm.tokenizer.decode([i]) for i in want.token_ids]
    assert [t.logprob for t in c.logprobs.content] == pytest.approx(want.logprobs, abs=1e-4)
    decode = lambda i: llm.tokenizer.decode([i])
    got = [[(a.token, a.logprob) for a in t.top_logprobs] for t in c.logprobs.content]
    assert [[a[0] for a in top] for top in got] == [[decode(i) for i in top] for top in want.top_logprobs]
    assert [[a[1] for a in top] for top in got] == [
        pytest.approx(list(top.values()), abs=1e-4) for top in want.top_logprobs
    ]
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode_chat(question))

    # max_completion_tokens is max_tokens' newer name; streamed deltas add up to the same text
    stream = server.client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == c.finish_reason


def test_completion_logprobs_with_alternatives(server, llm):
    want = llm.generate([PROMPT], _params(temperature=0, max_tokens=6, logprobs=True, top_logprobs=3))[0]
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    decode = lambda i: llm.tokenizer.decode([i])
    assert lp.tokens == [decode(i) for i in want.token_ids] and lp.text_offset[0] == 0
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-4) and all(x <= 0 for x in lp.token_logprobs)
    assert len(lp.top_logprobs) == 6 and all(len(top) == 3 for top in want.top_logprobs)
    for got, top, token, chosen in zip(lp.top_logprobs, want.top_logprobs, want.token_ids, want.logprobs):
        assert got == pytest.approx({decode(i): v for i, v in top.items()}, abs=1e-4)
        assert max(top, key=top.get) == token and top[token] == pytest.approx(chosen)  # greedy: the best one
    # logprobs=0: the sampled tokens' logprobs, no alternatives
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    assert r.choices[0].logprobs.top_logprobs is None
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_stop_strings_never_leak_across_chunks(server, llm):
    stream = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream]
    full, boundary = "".join(pieces), len(pieces[0])
    assert len(pieces) >= 2 and len(full) > boundary + 3
    # Stop strings that begin in the first chunk (the first engine step's tokens) and end in the next,
    # so the first chunk ends in a partial match that must be held back.
    for back in (1, 3, 6):
        stop = full[boundary - back : boundary + 3]
        want = llm.generate([PROMPT], _params(temperature=0, max_tokens=24, stop=stop))[0]
        assert want.finish_reason == "stop" and stop not in want.text and full.startswith(want.text)
        r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == len(want.token_ids)
        stream = server.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
        )
        sent = ""
        for chunk in stream:
            sent += chunk.choices[0].text
            assert want.text.startswith(sent), f"stop={stop!r}: streamed {sent!r} beyond {want.text!r}"
        assert sent == want.text


# --- errors ------------------------------------------------------------------------------------------


def test_bad_requests_get_400_with_the_openai_error_body(server):
    c = server.client
    cases = [
        (dict(prompt=PROMPT, extra_body={"frobnicate": 1}), "frobnicate", "frobnicate"),
        (dict(prompt=PROMPT, temperature="hot"), "temperature", "temperature='hot'"),
        (dict(prompt=PROMPT, top_p=0), "top_p", "top_p=0"),
        (dict(prompt=PROMPT, max_tokens=0), "max_tokens", "max_tokens=0"),
        (dict(prompt=PROMPT, stop=[""]), "stop", "stop"),
        (dict(prompt=PROMPT, extra_body={"top_k": 10**6}), "top_k", "vocabulary"),
        (dict(prompt=[1] * 300), "prompt", "300 tokens, longer than the context"),
        (dict(prompt=[5, 49152]), "prompt", "token id 49152 outside the vocabulary [0, 49152)"),
        (dict(prompt=""), "prompt", "empty"),
        (dict(prompt=PROMPT, n=17), "n", "n=17"),
        (dict(prompt=PROMPT, logprobs=30), "logprobs", "logprobs=30"),
        (dict(prompt=PROMPT, frequency_penalty=0.5), "frequency_penalty", "not supported"),
        (dict(prompt=PROMPT, stream_options={"include_usage": True}), "stream_options", "stream"),
    ]
    for kw, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL, max_tokens=kw.pop("max_tokens", 4), **kw)
        status, body = _error(e)
        assert status == 400 and body["param"] == param and words in body["message"], (kw, body)
        assert body["type"] == "invalid_request_error" and set(body) == {"message", "type", "param", "code"}
    for messages, words in (
        ([], "non-empty list"),
        ([{"role": "wizard", "content": "hi"}], "role='wizard'"),
        ([{"role": "user", "content": "hi", "mood": "x"}], "unknown field 'mood'"),
        ([{"role": "user", "content": "word " * 300}], "longer than the context"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        status, body = _error(e)
        assert status == 400 and body["param"] == "messages" and words in body["message"], body


def test_bad_json_big_bodies_unknown_models_and_routes(server):
    r = server.post("/v1/completions", b'{"model": "tiny-chat", "prompt": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = server.post("/v1/completions", b'{"prompt": "x", "temperature": NaN}')
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = server.post("/v1/completions", {"model": MODEL, "prompt": "x" * (MAX_BODY + 1)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=2)
    status, body = _error(e)
    assert status == 404 and body["code"] == "model_not_found" and body["param"] == "model"
    r = httpx.get(server.url + "/v1/engines", headers=server.auth)
    assert r.status_code == 404 and "no route GET /v1/engines" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions", headers=server.auth)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_auth_health_and_models(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/metrics", headers=headers).status_code == 401
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(server.url + "/health")  # open: no key
    assert r.status_code == 200 and r.json() == {
        "status": "ok",
        "replicas": [{"id": 0, "up": True, "detail": "serving"}],
    }
    models = server.client.models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "jaxinfer"


# --- metrics, queue, cancellation, drain -------------------------------------------------------------


def test_metrics_move(server):
    ok = ("jaxinfer_requests_total", (("route", "/v1/completions"), ("status", "200")))
    bad = ("jaxinfer_requests_total", (("route", "/v1/completions"), ("status", "400")))
    gen, prompt = ("jaxinfer_generation_tokens_total", ()), ("jaxinfer_prompt_tokens_total", ())
    ttft = ("jaxinfer_time_to_first_token_seconds_count", ())
    before = server.metrics()
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    after = server.metrics()
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    assert after[gen] == before[gen] + r.usage.completion_tokens
    assert after[prompt] == before[prompt] + r.usage.prompt_tokens
    assert after[ttft] == before[ttft] + 1
    assert after[("jaxinfer_inter_token_latency_seconds_count", ())] > 0
    replica = (("replica", "0"),)
    assert after[("jaxinfer_kv_cache_pages_total", replica)] == 64  # 4 sequences x 256 / 16
    assert after[("jaxinfer_replica_up", replica)] == 1
    assert after[("jaxinfer_running_requests", replica)] == 0
    assert 0 <= after[("jaxinfer_prefix_cache_hit_rate", replica)] <= 1


def _wait_until(check, timeout_s: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_full_queue_gets_429_and_a_client_that_leaves_frees_its_pages(server):
    replica = (("replica", "0"),)
    # More choices than the engine runs (4) plus what may wait (MAX_QUEUE): the last ones are refused,
    # and the whole request with them (the others are cancelled).
    with pytest.raises(openai.RateLimitError) as e:
        server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=4 + MAX_QUEUE + 1)
    status, body = _error(e)
    assert status == 429 and body["code"] == "queue_full" and body["type"] == "rate_limit_error"

    # Four long requests (each new block-table width compiles on the way: seconds, not milliseconds)
    tokens_before = server.metrics()[("jaxinfer_generation_tokens_total", ())]
    stream = server.client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=240, temperature=0, n=4, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    with pytest.raises(openai.RateLimitError):  # four run, two may wait: three more do not fit
        server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=MAX_QUEUE + 1)
    stream.close()  # the client goes away: its four requests are cancelled, their pages freed
    m = {}
    _wait_until(
        lambda: (
            (m.update(server.metrics()) or m[("jaxinfer_running_requests", replica)] == 0)
            and m[("jaxinfer_kv_cache_pages_used", replica)] == 0
        ),
        what="the cancelled requests to leave the engine",
    )
    assert m[("jaxinfer_generation_tokens_total", ())] - tokens_before < 4 * 240
    _wait_until(lambda: "finish=cancelled,cancelled,cancelled,cancelled" in server.log.read_text(), 10, "the log")
    # and the server goes on
    r = server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, n=MAX_QUEUE + 1)
    assert len(r.choices) == 3


def test_sigterm_drains_then_exits_0(server, llm):
    """Last in the module: it stops the server."""
    replica = (("replica", "0"),)
    # A prompt and length whose step shapes nothing compiled yet: the request runs for seconds.
    prompt = llm.tokenizer.encode("word " * 200)[:150]
    result = {}

    def long_request():
        result["r"] = server.client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=90, temperature=0, extra_body={"ignore_eos": True}
        )

    t = threading.Thread(target=long_request)
    t.start()
    _wait_until(lambda: server.metrics()[("jaxinfer_running_requests", replica)] == 1, what="the request to run")
    server.proc.send_signal(signal.SIGTERM)
    _wait_until(lambda: httpx.get(server.url + "/health").status_code == 503, 10, "/health to say draining")
    assert httpx.get(server.url + "/health").json()["status"] == "draining"
    with pytest.raises(openai.APIStatusError) as e:
        server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    status, body = _error(e)
    assert status == 503 and body["code"] == "draining"
    t.join(120)
    assert not t.is_alive() and "r" in result
    r = result["r"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 90
    assert server.proc.wait(60) == 0, server.log_tail()
    log = server.log.read_text()
    assert "draining" in log and "prompt_tokens=150 output_tokens=90" in log and "server stopped" in log
