"""The scheduler alone, on the host: fake step results stand in for the device, no jax is loaded."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.errors import JaxinferError
from jaxinfer.outputs import Row, Stops
from jaxinfer.sampling import SamplingParams, seed_key
from jaxinfer.scheduler import Request, Scheduler

ROOT = Path(__file__).resolve().parent.parent
EOS = 2


def make(num_pages=32, page_size=4, max_num_seqs=4, prefill_chunk=16, decode_steps=4) -> Scheduler:
    return Scheduler(num_pages, page_size, max_num_seqs, prefill_chunk, decode_steps)


def add(s: Scheduler, prompt: list[int], max_tokens: int = 8) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    req = Request(prompt, params, Row(prompt, max_tokens), Stops(None, (EOS,), params))
    req.key = seed_key(0)
    s.add(req)
    return req


def step(s: Scheduler, token: int = 7):
    """One step with every decode row sampling `token`: (the plan, the requests that ended)."""
    out = s.schedule()
    toks = lps = None
    if out.decode is not None:
        toks = np.full((len(out.decode.tokens), out.decode.n_steps), token, np.int32)
        lps = np.zeros(toks.shape, np.float32)
    return out, s.update_from_output(out, toks, lps)


def run_all(s: Scheduler) -> None:
    for _ in range(200):
        if not s.has_work():
            return
        step(s)
    raise AssertionError("the scheduler never finished")


def test_importing_the_scheduler_loads_no_jax():
    code = "import sys, jaxinfer.scheduler; print(sorted(m for m in ('jax', 'flax', 'jaxlib') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_admission_fills_free_slots_lowest_first_and_the_rest_wait():
    s = make(max_num_seqs=2)
    a, b, c = (add(s, [10 + i] * 5) for i in range(3))
    out, _ = step(s)
    assert [r.slot for r in s.running] == [0, 1] and list(s.waiting) == [c]
    assert [ch.req for ch in out.prefills] == [a, b]  # oldest first, within the chunk budget
    run_all(s)
    assert c.row.done and c.row.ids == [7] * 8


def test_chunked_prefill_bookkeeping_and_the_decode_batch():
    s = make(prefill_chunk=16, page_size=4, decode_steps=4)
    req = add(s, list(range(3, 43)), max_tokens=5)  # 40 tokens: the last one goes through decode
    spans, widths = [], []
    for _ in range(3):
        out, _ = step(s)
        (chunk,) = out.prefills
        n = int(chunk.valid.sum())
        spans.append((int(chunk.positions[0, 0]), int(chunk.positions[0, n - 1]) + 1))
        widths.append(chunk.block_tables.shape[1])
        assert chunk.tokens.shape == (1, 16)  # chunk shapes: powers of two, at least 16
        assert list(chunk.tokens[0, :n]) == req.prompt[spans[-1][0] : spans[-1][1]]
    assert spans == [(0, 16), (16, 32), (32, 39)] and widths == [4, 8, 16]  # tables: a power of two of pages
    # The step that prefills the prompt's end decodes it too: its last token at position 39, 4 steps.
    d = out.decode
    assert d.reqs == [req] and d.tokens[0] == req.prompt[-1] and d.positions[0] == 39 and d.greedy_only
    assert d.valid[:, 0].tolist() == [True] and d.block_tables[0, : len(req.pages)].tolist() == req.pages
    assert len(req.pages) * 4 >= 39 + 4 and req.computed == 43 and req.row.ids == [7] * 4
    step(s)
    assert req.row.finish == "length" and req.row.ids == [7] * 5 and not s.has_work()


def test_full_prefix_pages_are_reused_from_the_cache():
    s = make(page_size=4)
    prompt = list(range(3, 22))  # 19 tokens: four full pages before the last token
    a = add(s, prompt)
    run_all(s)
    hits, cached = s.pages.hits, set(s.pages.page_of.values())
    assert len(cached) == 4 and a.pages == []  # a left; its full prompt pages stay cached
    b = add(s, prompt + [5, 6])
    out, _ = step(s)
    assert s.pages.hits == hits + 4 and set(b.pages[:4]) == cached
    (chunk,) = out.prefills
    assert chunk.positions[0, 0] == 16  # the cached 16 tokens are not computed again
    run_all(s)
    assert s.free_pages() == s.num_pages - 1


def test_preemption_takes_the_newest_and_recomputes_it():
    s = make(num_pages=9, page_size=4, decode_steps=4)  # 8 usable pages
    old = add(s, list(range(3, 12)), max_tokens=16)
    new = add(s, list(range(30, 39)), max_tokens=12)  # both fit alone, not together
    preempted = False
    for _ in range(50):
        step(s)
        preempted |= new in s.waiting and old in s.running
        if not s.has_work():
            break
    assert preempted and s.preemptions >= 1
    assert old.row.ids == [7] * 16 and new.row.ids == [7] * 12  # the newest was recomputed
    assert s.free_pages() == s.num_pages - 1 and not s.has_work()


def test_every_page_comes_back_when_all_finish():
    s = make(num_pages=40)
    reqs = [add(s, list(range(3 + i, 20 + i)), max_tokens=6 + i) for i in range(6)]
    run_all(s)
    assert all(r.row.finish == "length" for r in reqs) and all(r.pages == [] for r in reqs)
    assert s.free_pages() == s.num_pages - 1


def test_a_request_that_fails_frees_its_pages_and_the_others_go_on(monkeypatch):
    s = make()
    ok, bad = add(s, list(range(3, 12))), add(s, [44, 45, 46, 47, 48])
    push = Stops.push

    def bad_push(self, row, token, logprob):
        if row.prompt == bad.prompt:
            raise RuntimeError("boom")
        push(self, row, token, logprob)

    monkeypatch.setattr(Stops, "push", bad_push)
    _, ended = step(s)
    assert ended == [bad] and bad.row.finish == "error" and bad.row.error == "RuntimeError: boom"
    assert bad.pages == [] and bad not in s.running and s.failures == 1
    run_all(s)
    assert ok.row.ids == [7] * 8 and s.free_pages() == s.num_pages - 1


def test_a_failed_chunk_is_taken_back_from_the_prefix_cache():
    s = make(page_size=4)
    req = add(s, list(range(3, 22)))
    out = s.schedule()
    (chunk,) = out.prefills
    assert chunk.registered  # its full pages were cached when planned
    s.chunk_failed(chunk, RuntimeError("device"), out)
    assert req.row.finish == "error" and out.failed == [req]
    assert not s.pages.page_of and s.free_pages() == s.num_pages - 1
    again = add(s, list(range(3, 22)))
    hits = s.pages.hits
    s.schedule()
    assert s.pages.hits == hits and again.computed == 16  # nothing reused: its first chunk starts at 0


def test_a_lost_cache_sends_everything_back_to_wait():
    s = make()
    a, b = add(s, list(range(3, 12))), add(s, list(range(20, 30)))
    step(s)
    s.cache_lost()
    assert list(s.waiting) == [a, b] and not s.running and a.computed == 0
    assert s.free_pages() == s.num_pages - 1
    run_all(s)
    assert a.row.done and b.row.done


@pytest.mark.parametrize("slots_in_use, rows", [(1, 1), (2, 2), (3, 4), (5, 8), (9, 8)])
def test_decode_rows_are_powers_of_two_of_the_slots_in_use(slots_in_use, rows):
    assert make(max_num_seqs=8).decode_rows(slots_in_use) == rows


def test_pages_split_over_sp_ranks_are_dealt_round_robin_and_stay_so_from_the_prefix_cache():
    s = Scheduler(16, 4, 4, 16, 4, page_ranks=2)  # rank 0 holds pages 0-7 (0 is the null page), rank 1 pages 8-15
    prompt = list(range(3, 30))  # 27 tokens: 6 full pages cached
    a = add(s, prompt, max_tokens=8)
    held = []
    while s.has_work():
        step(s)
        held = a.pages or held
    assert len(held) == 9 and [p // 8 for p in held] == [i % 2 for i in range(9)]  # 27 + 8 + 4 tokens
    assert s.free_pages() == 15 and [s.pages.available(r) for r in (0, 1)] == [7, 8]
    b = add(s, prompt[:24] + [99, 98, 97], max_tokens=8)
    step(s)
    assert s.pages.hits == 6 and b.pages[:6] == held[:6]
    assert [p // 8 for p in b.pages] == [i % 2 for i in range(len(b.pages))]
    run_all(s)
    assert s.free_pages() == 15


def test_a_request_must_fit_each_sp_rank():
    # 15 usable pages, but a request of 15 pages needs 8 on rank 0, which has 7 (beside the null page).
    s = Scheduler(16, 4, 4, 16, 4, page_ranks=2)
    s.check_fits(44, 8)  # 13 pages: 7 on rank 0
    with pytest.raises(JaxinferError, match=r"15 pages of 4 tokens \(8 on the first of the sp=2 ranks, which holds 7"):
        s.check_fits(48, 8)
    Scheduler(16, 4, 4, 16, 4).check_fits(48, 8)  # one rank: all 15 pages are its own
    with pytest.raises(JaxinferError, match="num_pages=15 does not split over 2 sp ranks"):
        Scheduler(15, 4, 4, 16, 4, page_ranks=2)
