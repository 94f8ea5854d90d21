"""A replica spanning processes, run in lock step (jaxinfer/lockstep.py): a leading and a following
engine in this process over an in-memory stand-in for jax.distributed's key-value store; the follower
ends every request exactly as the leader does."""

import threading

import pytest

import jaxinfer


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
