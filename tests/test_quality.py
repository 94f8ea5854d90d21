"""benchmarks/quality.py's figures for int8 weights hold on a short text: perplexity within 1% of the
unquantized model and top-1 agreement of at least 96% (the issue's targets), and its scoring sums the
NLL the way a plain log-softmax does."""

import numpy as np

from benchmarks import quality

TOKENS = 512  # one window


def test_next_token_stats_is_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 11)).astype(np.float32) * 4
    ids = [3, 1, 4, 1, 5]
    nll, top1 = quality.next_token_stats(logits, ids)
    x = logits[:-1].astype(np.float64)
    want = -(x - np.log(np.exp(x).sum(-1, keepdims=True)))[np.arange(4), ids[1:]]
    np.testing.assert_allclose(nll, want, rtol=1e-12)
    assert top1.tolist() == logits[:-1].argmax(-1).tolist()
    assert quality.windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert quality.greedy_agreement(
        [{"text": "ab", "token_ids": [1, 2]}, {"text": "ac", "token_ids": [1, 3, 4]}],
        [{"text": "ab", "token_ids": [1, 2]}, {"text": "ab", "token_ids": [1, 2]}],
    ) == (0.5, (1 + 1 / 3) / 2)


def test_int8_weights_meet_targets_on_short_text():
    rows = quality.run(["int8"], ["auto"], TOKENS, TOKENS, max_tokens=0, model="smollm2-135m", prompts=())
    base, int8 = rows
    assert (base["quant"], int8["quant"], int8["status"]) == ("none", "int8", "ok")
    assert base["positions"] == int8["positions"] == TOKENS - 1
    # Measured (x86 CPU, fp32): baseline 17.83, int8 +0.10%, top-1 agreement 97.8% (500 of 511).
    assert 5 < base["perplexity"] < 40, base
    assert abs(int8["delta_pct"]) < 1.0, int8
    assert int8["top1_agreement"] >= 0.96, int8
    assert int8["param_bytes"] < 0.5 * base["param_bytes"]
