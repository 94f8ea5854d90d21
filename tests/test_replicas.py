"""Engines on disjoint devices in one process: the ground replicas stand on."""

import threading

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer import JaxinferError

GREEDY = jaxinfer.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SIZES = dict(max_seq_len=64, max_num_seqs=2, page_size=8, num_pages=16)


def _device_ids(tree) -> set[int]:
    return {d.id for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) for d in x.devices()}


def test_two_engines_on_disjoint_devices_run_at_once(tiny_dir):
    path = str(tiny_dir("llama3"))
    devs = jax.devices()
    a = jaxinfer.LLM(path, tp=2, devices=devs[0:2], **SIZES)
    b = jaxinfer.LLM(path, tp=4, devices=devs[4:8], **SIZES)
    prompts = [list(range(3, 15)), list(range(30, 37))]
    want = jaxinfer.LLM(path, **SIZES).generate(prompts, GREEDY)
    results = {}
    threads = [
        threading.Thread(target=lambda k=k, m=m: results.update({k: m.generate(prompts, GREEDY)}))
        for k, m in (("a", a), ("b", b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in "ab":
        assert [o.token_ids for o in results[k]] == [o.token_ids for o in want]
    assert _device_ids(a.params) == {0, 1} and _device_ids((a.engine.cache_k, a.engine.cache_v)) == {0, 1}
    assert _device_ids(b.params) == {4, 5, 6, 7} and _device_ids(b.engine.cache_k) == {4, 5, 6, 7}
    assert np.asarray(a.mesh.devices).size == 2


def test_a_device_list_that_does_not_fit_the_mesh_is_refused(tiny_dir):
    with pytest.raises(JaxinferError, match=r"devices= lists 3 devices \(3 distinct\) but the mesh .* needs exactly 2"):
        jaxinfer.LLM(str(tiny_dir("llama3")), tp=2, devices=jax.devices()[:3])
    with pytest.raises(JaxinferError, match=r"lists 2 devices \(1 distinct\)"):
        jaxinfer.LLM(str(tiny_dir("llama3")), tp=2, devices=[jax.devices()[0]] * 2)


def test_replica_workers_get_disjoint_gpu_groups_from_cuda_visible_devices(monkeypatch):
    """`jaxinfer serve --replicas` on a GPU machine: each worker's CUDA_VISIBLE_DEVICES is its own group of
    the GPUs the server may use (read without starting jax); too few GPUs is one clear error; without
    GPUs the workers simulate CPU devices."""
    from jaxinfer.serving.replicas import device_envs

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert device_envs(4, 2) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("0,1", "2,3", "4,5", "6,7")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")  # a server restricted to some GPUs splits only those
    assert device_envs(3, 1) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("3", "5", "6")]
    with pytest.raises(JaxinferError, match=r"2 replicas of 2 GPUs need 4 GPUs but 3 are visible \(3, 5, 6\)"):
        device_envs(2, 2)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # no GPU platform: simulated devices, whatever is visible
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x")
    envs = device_envs(2, 3)
    assert (
        envs
        == [{"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=3"}] * 2
    )
