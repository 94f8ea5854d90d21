"""Replicas behind the router: the router's choices in isolation, then a real pool of two worker
processes on a tiny checkpoint (outputs equal to LLM.generate, a worker killed mid-load, drain)."""

import asyncio
import os
import random
import signal
import threading
import time

import pytest

import jaxinfer
from jaxinfer.serving.router import BLOCK, MAX_IMBALANCE_TOKENS, Router

# --- the router alone ----------------------------------------------------------------------------


def test_distinct_prompts_are_balanced_under_load():
    rng = random.Random(0)
    router = Router(2)
    counts, live = [0, 0], []
    for i in range(40):
        prompt = [i + 1] + [rng.randrange(256) for _ in range(rng.randrange(20, 120))]
        choice = router.choose(prompt)
        assert choice.reason == "least_loaded"
        router.assign(f"r{i}", choice.replica, prompt, rng.randrange(16, 256))
        counts[choice.replica] += 1
        live.append(f"r{i}")
        for rid in rng.sample(live, k=min(len(live), rng.randrange(0, 3))):  # others progress or end
            if rng.random() < 0.5:
                router.finish(rid)
                live.remove(rid)
            else:
                router.progress(rid, rng.randrange(1, 32))
    assert abs(counts[0] - counts[1]) <= 0.3 * max(counts), counts
    for rid in live:
        router.finish(rid)
    assert router.load(0) == router.load(1) == 0 and router.in_flight(0) == router.in_flight(1) == 0


def test_repeated_long_prefixes_go_to_the_same_replica():
    rng = random.Random(1)
    router = Router(3)
    shared = [rng.randrange(256) for _ in range(10 * BLOCK)]
    homes, reasons = [], []
    for i in range(12):
        other = [1000 + i] + [rng.randrange(256) for _ in range(40)]  # unrelated traffic in between
        c = router.choose(other)
        router.assign(f"o{i}", c.replica, other, 32)
        prompt = shared + [rng.randrange(256) for _ in range(20)]
        c = router.choose(prompt)
        router.assign(f"p{i}", c.replica, prompt, 32, c.matched_tokens)
        homes.append(c.replica)
        reasons.append(c.reason)
        assert c.matched_tokens == (0 if i == 0 else len(shared))
    assert len(set(homes)) == 1 and reasons[1:] == ["prefix"] * 11
    # a short common header (one block) is not worth following: the least loaded replica takes it
    short = shared[:BLOCK] + [7] * 60
    assert router.choose(short).reason == "least_loaded"


def test_the_imbalance_guard_sends_a_prefix_away_from_an_overloaded_replica():
    router = Router(2)
    prefix = list(range(8 * BLOCK))
    c = router.choose(prefix + [1])
    router.assign("a", c.replica, prefix + [1], 16)
    home, other = c.replica, 1 - c.replica
    # within the bound, the prefix replica keeps it although it is busier
    router.assign("busy", home, [3] * 20, MAX_IMBALANCE_TOKENS // 2)
    c = router.choose(prefix + [2])
    assert (c.replica, c.reason, c.matched_tokens) == (home, "prefix", len(prefix))
    # past both the absolute bound and the ratio, the least loaded replica takes it
    router.assign("busier", home, [4] * 20, 2 * MAX_IMBALANCE_TOKENS)
    c = router.choose(prefix + [2])
    assert (c.replica, c.reason) == (other, "guard")
    # a replica that is down is never chosen; back up, its prefix history is gone (its cache is new)
    router.set_up(other, False)
    assert router.choose(prefix + [2]).replica == home
    router.set_up(home, False)
    assert router.choose(prefix + [2]) is None
    router.set_up(home, True)
    assert router.choose(prefix + [2]).matched_tokens == 0


# --- a real pool ---------------------------------------------------------------------------------

SIZES = dict(max_seq_len=128, max_num_seqs=2, page_size=16, num_pages=40)
GREEDY = jaxinfer.SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=True)
TIMEOUT = 120  # seconds for any one scenario (each worker compiles its shapes on first use)


def _prompt(i: int) -> list[int]:
    rng = random.Random(100 + i)
    return [rng.randrange(1, 256) for _ in range(rng.randrange(4, 40))]


class _Loop:
    """An event loop in a thread, shared by the pool's tests (the pool lives on one loop)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def served(tiny_dir):
    """(pool, loop, reference): a started pool of two replicas and LLM.generate's outputs to match."""
    from jaxinfer.serving.replicas import ReplicaPool

    path = str(tiny_dir("llama3"))
    loop = _Loop()
    pool = ReplicaPool(dict(model=path, **SIZES), 2, warmup=False, start_timeout_s=TIMEOUT)
    try:
        loop.run(pool.start())
        want = jaxinfer.LLM(path, **SIZES).generate([_prompt(i) for i in range(16)], GREEDY)
        yield pool, loop, want
    finally:
        pids = [p for p in pool.pids() if p is not None]
        try:
            loop.run(pool.close(), timeout=60)
        finally:
            for pid in pids:  # whatever close() could not stop
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            loop.stop()


async def _collect(pool, rid: str, prompt: list[int], params=GREEDY, on_event=None) -> list:
    from jaxinfer.serving.backend import GenRequest

    events = []
    async for ev in pool.generate(GenRequest(rid, prompt, params)):
        events.append(ev)
        if on_event is not None:
            on_event(rid, ev)
    return events


def _tokens(events) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def test_pool_outputs_equal_llm_generate_and_a_bad_request_fails_alone(served):
    pool, loop, want = served
    assert pool.health()["ok"] and pool.vocab_size == 256 and pool.max_seq_len == 128

    async def scenario():
        # the engine refuses (before queueing) what slipped past the server's checks, alone
        bad = _collect(pool, "bad", [5, 999, 7])
        return await asyncio.gather(
            *(_collect(pool, f"g{i}", _prompt(i)) for i in range(6)), bad, return_exceptions=True
        )

    *results, bad = loop.run(scenario())
    for i, events in enumerate(results):
        assert _tokens(events) == want[i].token_ids
        assert [ev.finish_reason for ev in events][-1] == "length"
        assert all(ev.finish_reason is None for ev in events[:-1])
        lps = [x for ev in events for x in ev.logprobs]
        assert lps == pytest.approx(want[i].logprobs, abs=1e-4)
    assert {events[0].replica for events in results} == {0, 1}
    assert isinstance(bad, jaxinfer.JaxinferError) and "token id 999 outside the vocabulary" in str(bad)
    time.sleep(1.0)  # a heartbeat after the load
    stats = pool.stats()
    assert [s["kv_pages_total"] for s in stats] == [39, 39]
    assert all(s["running"] == s["waiting"] == s["kv_pages_used"] == s["outstanding_tokens"] == 0 for s in stats)


def test_killing_a_worker_loses_no_request_that_had_not_streamed(served):
    pool, loop, want = served
    victim = 1
    pid = pool.pids()[victim]
    snapshot = {}

    async def scenario():
        hit = asyncio.Event()
        got_from_victim = set()

        def on_event(rid, ev):
            if ev.replica == victim and ev.token_ids:
                got_from_victim.add(rid)
                hit.set()

        tasks = [asyncio.create_task(_collect(pool, f"k{i}", _prompt(i), on_event=on_event)) for i in range(16)]
        await asyncio.wait_for(hit.wait(), TIMEOUT)
        # Freeze the victim mid-load (some of its requests streaming, others waiting), let what it sent
        # arrive, then kill it: what each request had received when it died is then known exactly.
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(0.5)
        snapshot["on_victim"] = set(pool.router.flights_on(victim))
        snapshot["streamed"] = set(got_from_victim)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pool.health()["replicas"][victim]["up"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        snapshot["health"] = pool.health()
        return await asyncio.gather(*tasks)

    results = dict(zip([f"k{i}" for i in range(16)], loop.run(scenario())))
    moved = snapshot["on_victim"] - snapshot["streamed"]
    assert moved, "the victim had no request waiting when it was killed; the test proves nothing"
    for i, (rid, events) in enumerate(results.items()):
        last = events[-1]
        if last.finish_reason == "error":  # only a request that had streamed from the victim may fail
            assert rid in snapshot["streamed"], (rid, last.error)
            assert f"replica {victim}" in last.error and "SIGKILL" in last.error
        else:
            assert (last.finish_reason, _tokens(events)) == ("length", want[i].token_ids), rid
        if rid in moved:
            assert last.finish_reason == "length" and {ev.replica for ev in events} == {1 - victim}
    down = snapshot["health"]
    assert not down["ok"] and not down["replicas"][victim]["up"] and down["replicas"][1 - victim]["up"]
    assert "killed by SIGKILL" in down["replicas"][victim]["detail"]

    deadline = time.monotonic() + TIMEOUT
    while not pool.health()["ok"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = pool.health()
    assert health["ok"], health
    assert pool.pids()[victim] not in (None, pid)

    # the restarted replica serves again: two requests at once go one to each replica
    async def two():
        return await asyncio.gather(*(_collect(pool, f"again{i}", _prompt(i)) for i in range(2)))

    again = loop.run(two())
    assert [_tokens(e) for e in again] == [want[i].token_ids for i in range(2)]
    assert {e[0].replica for e in again} == {0, 1}


def test_a_full_queue_is_refused_and_drain_finishes_what_runs(served):
    from jaxinfer.serving.backend import GenRequest
    from jaxinfer.serving.replicas import Draining, Overloaded

    pool, loop, want = served
    pids = pool.pids()

    async def scenario():
        for p in pids:  # paused workers keep every request in flight while the test looks
            os.kill(p, signal.SIGSTOP)
        try:
            pool.max_queue = 0  # in flight at most what the replicas run at once: 2 x max_num_seqs
            tasks = [asyncio.create_task(_collect(pool, f"d{i}", _prompt(i))) for i in range(4)]
            await asyncio.sleep(0.2)
            with pytest.raises(Overloaded, match="max_queue=0"):
                await anext(aiter(pool.generate(GenRequest("over", _prompt(5), GREEDY))))
            drain = asyncio.create_task(pool.drain(timeout_s=TIMEOUT))
            await asyncio.sleep(0.2)
            with pytest.raises(Draining):
                await anext(aiter(pool.generate(GenRequest("late", _prompt(6), GREEDY))))
        finally:
            for p in pids:
                os.kill(p, signal.SIGCONT)
        results = await asyncio.gather(*tasks)
        await drain
        return results

    results = loop.run(scenario())
    assert [_tokens(e) for e in results] == [want[i].token_ids for i in range(4)]
    health = pool.health()
    assert not health["ok"] and all(r["detail"] == "stopped" for r in health["replicas"])
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)


def test_a_replica_that_cannot_start_fails_start_with_its_reason_and_close_ends_a_start(tiny_dir):
    from jaxinfer.serving.replicas import Draining, ReplicaPool

    bad = ReplicaPool(dict(model=str(tiny_dir("llama3")), num_pages=1), 1, restart=False)
    slow = ReplicaPool(dict(model=str(tiny_dir("llama3")), **SIZES), 1)
    loop = _Loop()
    try:
        with pytest.raises(jaxinfer.JaxinferError, match=r"replica 0 \(pid \d+\) could not start: .*num_pages=1"):
            loop.run(bad.start())
        assert not bad.health()["ok"] and bad.pids() == [None]

        async def close_while_starting():
            start = asyncio.ensure_future(slow.start())
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            await slow.close()
            with pytest.raises(Draining, match="stopped before it was ready"):
                await start
            return time.monotonic() - t0

        assert loop.run(close_while_starting()) < 5  # the starting worker is terminated, not waited for
        assert slow.pids() == [None] and slow.health()["replicas"][0]["detail"] == "stopped"
    finally:
        for pool in (bad, slow):
            loop.run(pool.close(), timeout=60)
        loop.stop()
