"""Which attention and expert-matmul implementation a model gets, and why: never a silent fallback."""

import logging

import jax
import pytest

import jaxinfer
from jaxinfer import JaxinferError, explain, kernels


def test_auto_on_cpu_takes_xla_and_says_why(tiny_dir):
    llm = jaxinfer.LLM(str(tiny_dir("qwen3")), max_seq_len=64)
    assert llm.setup.attention == kernels.Choice("xla", "no GPU here (cpu): the Pallas kernel compiles for CUDA only")
    report = llm.setup.kernel_report()
    assert report["engine decode attention"].startswith("xla (no GPU here (cpu)")
    assert "expert matmul" not in report


def test_explain_prints_each_steps_implementation(tiny_dir):
    r = explain.explain(str(tiny_dir("mistral")), dict(tp=1), prompt_len=16, gen_len=16)
    assert (
        r["kernels"]["engine decode attention"] == "xla (the kernel has no sliding window (this model's is 8 tokens))"
    )
    assert "engine decode attention: xla (the kernel has no sliding window" in explain.format_report(r)
    r = explain.explain(str(tiny_dir("mixtral")), dict(ep=2), prompt_len=16, gen_len=16, moe_kernel="interpret")
    assert r["kernels"]["expert matmul"].startswith("interpret (Pallas interpret mode was asked for")


def test_bad_or_impossible_requests_fail_before_weights_load(tiny_dir, monkeypatch):
    from jaxinfer import checkpoint

    def no_reads(*a, **k):
        raise AssertionError("weights were read before the kernel request was checked")

    monkeypatch.setattr(checkpoint, "place", no_reads)
    with pytest.raises(JaxinferError, match=r"attention='bogus'; use one of auto, pallas, interpret, xla"):
        jaxinfer.LLM(str(tiny_dir("qwen3")), attention="bogus")
    with pytest.raises(JaxinferError, match=r"attention='pallas' needs a GPU .* this backend is cpu"):
        jaxinfer.LLM(str(tiny_dir("qwen3")), attention="pallas")
    with pytest.raises(JaxinferError, match=r"attention='interpret' cannot serve this model: the kernel has no slid"):
        jaxinfer.LLM(str(tiny_dir("mistral")), attention="interpret")
    with pytest.raises(JaxinferError, match=r"head_dim 8 is not a power of two >= 16"):
        jaxinfer.LLM(str(tiny_dir("llama3")), attention="pallas")


def test_a_kernel_that_fails_on_the_gpu_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def broken():
        raise RuntimeError("triton: out of shared memory")

    with caplog.at_level(logging.WARNING, logger="jaxinfer.kernels"):
        choice = kernels.choose("attention", "auto", broken)
    assert choice.impl == "xla"
    assert "RuntimeError: triton: out of shared memory" in choice.why
    assert "using the XLA path" in caplog.text
    with pytest.raises(JaxinferError, match=r"attention='pallas': the Pallas kernel failed .* use 'auto' or 'xla'"):
        kernels.choose("attention", "pallas", broken)
    assert kernels.choose("attention", "auto", lambda: None) == kernels.Choice(
        "pallas", "compiled and ran at this model's sizes"
    )
