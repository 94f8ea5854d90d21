"""A replica spanning processes, run in lock step (jaxinfer/lockstep.py). First a leading and a following
engine in this process over an in-memory stand-in for jax.distributed's key-value store: the follower
ends every request exactly as the leader does. Then the real thing: `jaxinfer serve --pp=2` under
launch/local.py as two processes of one simulated CPU device each, on 127.0.0.1, driven by the
official `openai` client and compared with `llm.generate` on the same checkpoint and mesh shape in
this process. Every wait is bounded."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import jaxinfer
from tests.test_serve_api import write_tiny_chat_model

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(max_seq_len=256, max_num_seqs=4)
START_TIMEOUT_S = 240
PROMPTS = ["Hello, my name is", "The capital of France", "Once upon a time, in a land far"]


class FakeStore:
    """jax.distributed's key-value client, in memory: the calls lockstep.py makes."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.changed = threading.Condition()
        self.fail_with: str | None = None

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        with self.changed:
            assert allow_overwrite or key not in self.values, key
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        with self.changed:
            if self.fail_with:
                raise RuntimeError(self.fail_with)
            if not self.changed.wait_for(lambda: key in self.values, timeout_in_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
            return self.values[key]

    def key_value_dir_get_bytes(self, directory: str) -> list[tuple[str, bytes]]:
        with self.changed:
            return [(k, v) for k, v in self.values.items() if k.startswith(directory + "/")]

    def key_value_delete(self, key: str) -> None:  # a key, or a directory with everything under it
        with self.changed:
            for k in [k for k in self.values if k == key or k.startswith(key + "/")]:
                del self.values[k]


def _recording(engine) -> dict:
    """{request id: Request} of every request `engine`'s scheduler is given from now on."""
    seen, add = {}, engine.scheduler.add

    def recorded(req):
        add(req)
        seen[req.id] = req

    engine.scheduler.add = recorded
    return seen


def test_a_follower_ends_every_request_as_its_leader_does(tiny_dir, monkeypatch):
    import jax

    from jaxinfer import lockstep

    monkeypatch.setattr(lockstep, "BLOCK", 4)  # so that blocks are forgotten within this test
    monkeypatch.setattr(lockstep, "WAIT_MS", 100)  # and the follower waits out idle time in many reads
    sizes = dict(max_seq_len=128, max_num_seqs=2, page_size=16, num_pages=24)
    path, devs = str(tiny_dir("llama3")), jax.devices()
    lead = jaxinfer.LLM(path, tp=2, devices=devs[0:2], **sizes)
    follow = jaxinfer.LLM(path, tp=2, devices=devs[2:4], **sizes)
    store = FakeStore()
    led, followed = _recording(lead.engine), _recording(follow.engine)
    follower = threading.Thread(target=follow.engine.follow, args=(lockstep.Follower(store),), daemon=True)
    follower.start()
    lead.engine.lead(lockstep.Leader(store, peers=1))

    greedy = jaxinfer.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sampled = jaxinfer.SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)  # a key drawn by the leader
    outs = lead.generate([[5, 6, 7], [9] * 12, [3, 1, 4, 1, 5]], [greedy, sampled, greedy])
    stream = lead.generate_stream([8, 8, 8], jaxinfer.SamplingParams(max_tokens=100, ignore_eos=True))
    next(stream)
    stream.close()  # cancelled after its first chunk
    doomed = lead.engine.add([2, 4, 6], greedy)
    lead.engine.step()
    lead.engine.fail(doomed, jaxinfer.JaxinferError("failed on process 0"))
    last = lead.generate([[5, 6, 7, 8]], greedy)[0]
    with pytest.raises(jaxinfer.JaxinferError, match="before any request is queued"):
        lead.engine.lead(lockstep.Leader(store, peers=1))  # a follower starting now would not know the past
    lead.engine.stop_followers()
    follower.join(60)

    assert not follower.is_alive()
    assert [o.finish_reason for o in outs] == ["length"] * 3 and last.finish_reason == "length"
    assert len(led) == 6 and sorted(led) == sorted(followed)
    for rid, req in led.items():
        twin = followed[rid]
        assert (twin.prompt, twin.row.ids, twin.row.finish, twin.row.error) == (
            req.prompt,
            req.row.ids,
            req.row.finish,
            req.row.error,
        ), rid
    assert [led[i].row.finish for i in range(6)] == ["length"] * 3 + ["cancelled", "error", "length"]
    assert len(led[3].row.ids) < 100 and followed[4].row.error == "failed on process 0"
    assert not follow.engine.has_work() and follow.engine.free_pages() == lead.engine.free_pages()
    # the store keeps the blocks some follower may still read: the last two, the follower's ack, no more
    steps = [k for k in store.values if "/ack/" not in k]
    assert len(steps) <= 2 * lockstep.BLOCK and lead.engine._leader.kept > 0, sorted(store.values)


def test_a_follower_that_loses_process_0_says_so():
    from jaxinfer import lockstep

    store = FakeStore()
    store.fail_with = "UNAVAILABLE: failed to connect to all addresses"
    with pytest.raises(jaxinfer.JaxinferError, match="process 0 lost process 0 while waiting for step 0: UNAVAILABLE"):
        lockstep.Follower(store).next()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_mp"))


@pytest.fixture(scope="module")
def launched(model_dir, tmp_path_factory):
    """(launcher, base url, log path): `serve --pp=2` as two processes, up and answering /health."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve_mp") / "launch.log"
    cmd = [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=1", "--timeout=600", "--"]
    cmd += ["serve", f"--model={model_dir}", "--pp=2", f"--port={port}", "--drain_timeout_s=60"]
    cmd += [f"--{k}={v}" for k, v in SIZES.items()]
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    tail = lambda: "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert launcher.poll() is None, f"the launch exited with {launcher.returncode}:\n{tail()}"
            assert time.monotonic() < deadline, f"no /health in {START_TIMEOUT_S}s:\n{tail()}"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield launcher, url, log
    finally:
        if launcher.poll() is None:  # (the launcher kills every process on a second signal)
            launcher.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(60)


def test_one_replica_over_two_processes_serves_like_generate_then_drains(launched, model_dir):
    launcher, url, log = launched
    tail = lambda: "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = str(model_dir)
    llm = jaxinfer.LLM(model, pp=2, **SIZES)  # the same mesh shape in one process
    greedy = jaxinfer.SamplingParams(max_tokens=16, temperature=0)
    seeded = jaxinfer.SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    want = llm.generate(PROMPTS, greedy)
    want_seeded = llm.generate([PROMPTS[1]], seeded)[0]
    want_long = llm.generate(["1 2 3 4"], jaxinfer.SamplingParams(max_tokens=40, temperature=0))[0]

    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want[0].text, "length"), tail()

    # two at once share the engine's steps (one decode batch on both processes), one of them sampled
    out = {}

    def call(name, **kw):
        out[name] = client.completions.create(model=model, max_tokens=16, **kw).choices[0].text

    threads = [
        threading.Thread(target=call, args=("a",), kwargs=dict(prompt=PROMPTS[2], temperature=0)),
        threading.Thread(target=call, args=("b",), kwargs=dict(prompt=PROMPTS[1], temperature=0.9, top_p=0.95, seed=7)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert out == {"a": want[2].text, "b": want_seeded.text}, tail()

    # a client that leaves mid-stream cancels its request on both processes (or the next step would not
    # be the same program on both: the streamed request after it would hang, and time out)
    stream = client.completions.create(model=model, prompt="1 2 3 4", max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    stream.close()

    chunks = list(client.completions.create(model=model, prompt="1 2 3 4", max_tokens=40, temperature=0, stream=True))
    assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == want_long.text, tail()

    # SIGTERM to the launcher reaches process 0, which drains and stops process 1: every process exits 0
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(90) == 0, tail()
    text = log.read_text(errors="replace")
    assert "draining" in text and "server stopped" in text, tail()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pp=1"], "error: the mesh needs 1 devices but the 2 processes hold 2; a replica spanning processes"),
        (["--pp=2", "--replicas=2"], "error: --replicas=2: in a multi-process run the one replica spans every process"),
    ],
)
def test_a_multi_process_serve_is_one_replica_over_every_device(model_dir, flags, message):
    launched = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=1", "--timeout=150", "--"]
        + ["serve", f"--model={model_dir}", f"--port={_free_port()}", *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=200,
    )
    assert launched.returncode == 1 and message in launched.stderr, launched.stderr[-3000:]
