"""Prefill attention over query tiles (models/kv_cache.over_query_tiles): a long prompt's scores are held a
tile of query rows at a time, one device and on the ring alike, with the logits of the untiled program."""

import jax
import numpy as np
import pytest

import jaxinfer
from models import kv_cache
from tests.tiny import rel_err

PROMPT = np.random.default_rng(1).integers(0, 256, 201).tolist()  # 201: the last tile is padded


@pytest.fixture(scope="module")
def llama3(tiny_dir):
    return str(tiny_dir("llama3"))


@pytest.mark.parametrize("axes", [dict(), dict(sp=2)], ids=["one_device", "sp2"])
def test_tiled_scores_equal_untiled(llama3, axes, monkeypatch):
    ref = jaxinfer.LLM(llama3, max_seq_len=256, **axes).score(PROMPT)
    # A few rows per tile: every layer's attention runs as several tiles.
    monkeypatch.setattr(kv_cache, "SCORE_TILE_BYTES", 0)
    monkeypatch.setattr(kv_cache, "QUERY_TILE_ROWS", 24)
    jax.clear_caches()  # the steps are traced again, now in tiles
    got = jaxinfer.LLM(llama3, max_seq_len=256, **axes).score(PROMPT)
    assert rel_err(got, ref) < 1e-5


def test_tile_length_follows_the_budget():
    import jax.numpy as jnp

    seen = []

    def fn(q, q_pos):
        seen.append(q.shape[1])
        return q * 2

    q = jnp.ones((1, 100, 4, 8))
    pos = jnp.broadcast_to(jnp.arange(100), (1, 100))
    out = kv_cache.over_query_tiles(fn, q, pos, keys=64, axis=1)  # 100 KiB of scores: no tiles
    assert seen == [100] and out.shape == q.shape
    old = kv_cache.SCORE_TILE_BYTES, kv_cache.QUERY_TILE_ROWS, kv_cache.MAX_TILE_BYTES
    try:
        kv_cache.SCORE_TILE_BYTES = 50 * 4 * 64 * 4  # past 50 rows' scores (4 heads x 64 keys): tiles
        kv_cache.QUERY_TILE_ROWS = 32
        out = kv_cache.over_query_tiles(fn, q, pos, keys=64, axis=1)
        assert seen[-1] == 32 and out.shape == q.shape
        kv_cache.MAX_TILE_BYTES = 16 * 4 * 64 * 4  # 32 rows' scores would pass it: 16 rows
        out = kv_cache.over_query_tiles(fn, q, pos, keys=64, axis=1)
        assert seen[-1] == 16 and out.shape == q.shape
    finally:
        kv_cache.SCORE_TILE_BYTES, kv_cache.QUERY_TILE_ROWS, kv_cache.MAX_TILE_BYTES = old
    np.testing.assert_array_equal(np.asarray(out), 2 * np.ones(q.shape))


def test_tiles_take_no_collective_on_a_tensor_parallel_mesh(llama3, monkeypatch):
    """The tile loop's buffers are made from the (head-sharded) query tiles elementwise: a prefill in tiles
    on tp=2 has exactly the untiled program's collectives (a scalar taken from the tiles would cost one
    more per layer)."""
    from jaxinfer import explain

    def collectives():
        jax.clear_caches()
        return explain.explain(llama3, dict(tp=2), prompt_len=200, gen_len=8)["steps"]["prefill"]["collectives"]

    ref = collectives()
    monkeypatch.setattr(kv_cache, "SCORE_TILE_BYTES", 0)
    monkeypatch.setattr(kv_cache, "QUERY_TILE_ROWS", 24)
    assert collectives() == ref
