"""The embedded SmolLM2-135M-Instruct (GGUF, Q4_1) against transformers loading the same file."""

import numpy as np

import jaxinfer
from tests import tiny

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Paris is the capital of", "1, 2, 3, 4,"]


def test_chat_answers_paris(smollm2):
    out = smollm2.generate(
        "What is the capital of France?", jaxinfer.SamplingParams(max_tokens=24, temperature=0), chat=True
    )[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in smollm2.eos_token_ids


def test_tokenizer_and_chat_template_equal_transformers(smollm2, hf_smollm2):
    tok, _ = hf_smollm2
    for text in PROMPTS + ["  spaces,\ttabs and ünïcødé 1234567 <|im_start|>"]:
        assert smollm2.tokenizer.encode(text) == tok(text)["input_ids"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert smollm2.tokenizer.render_chat(messages) == want
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert smollm2.tokenizer.encode_chat(messages[0]["content"]) == list(ids)


def test_greedy_tokens_equal_transformers(smollm2, hf_smollm2):
    tok, model = hf_smollm2
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    want = [tiny.hf_greedy(model, p, 16) for p in ids]
    outs = smollm2.generate(PROMPTS, jaxinfer.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert [o.text for o in outs] == [tok.decode(w, skip_special_tokens=True) for w in want]


def test_logits_equal_transformers(smollm2, hf_smollm2):
    import torch

    tok, model = hf_smollm2
    ids = tok("The capital of France is Paris, and the capital of Italy is")["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = smollm2.score(ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_sampling_is_reproducible_and_logprobs_are_consistent(smollm2):
    params = jaxinfer.SamplingParams(
        max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=7, logprobs=True, ignore_eos=True
    )
    a = smollm2.generate(PROMPTS[:2], params)
    b = smollm2.generate(PROMPTS[:2], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = smollm2.generate(PROMPTS[:2], jaxinfer.SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # The logprob of a sampled token equals the log-softmax of the full-sequence logits at its position.
    out = a[0]
    prompt = smollm2.tokenizer.encode(PROMPTS[0])
    logits = smollm2.score(prompt + out.token_ids)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids)]
    np.testing.assert_allclose(out.logprobs, want, atol=2e-4)


def test_top_k_one_is_greedy_and_stop_strings_cut_text(smollm2):
    greedy = smollm2.generate(PROMPTS[2], jaxinfer.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    topk1 = smollm2.generate(
        PROMPTS[2], jaxinfer.SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    )[0]
    assert topk1.token_ids == greedy.token_ids
    word = greedy.text.split()[1]
    cut = smollm2.generate(PROMPTS[2], jaxinfer.SamplingParams(max_tokens=10, temperature=0, stop=[word]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == greedy.text[: greedy.text.index(word)]
    first = greedy.token_ids[1]
    by_id = smollm2.generate(PROMPTS[2], jaxinfer.SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[first]))[
        0
    ]
    assert by_id.token_ids == greedy.token_ids[:2] and by_id.finish_reason == "stop"
