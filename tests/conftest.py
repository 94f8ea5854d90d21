"""Shared fixtures. Eight simulated CPU devices, set before jax starts."""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite compiles hundreds of shapes; one of them once crashed jax's CPU executable serializer
# (a segfault in the cache write). tests/test_compile_cache.py checks the cache in its own processes.
os.environ.setdefault("JAXINFER_COMPILATION_CACHE", "")

import jax  # noqa: E402
import pytest  # noqa: E402

# Start the backend now, so that LLM() does not grow the simulated device count on its own.
assert jax.default_backend() != "cpu" or len(jax.devices()) == 8, "tests expect 8 simulated CPU devices"

from tests import tiny  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_models_between_modules():
    """Each compiled XLA:CPU program holds a few memory mappings of JIT code; the whole suite compiles
    enough of them to reach the kernel's limit of 65,530 mappings per process (vm.max_map_count), after
    which a compile segfaults. Drop the compiled programs and the models (an LLM and its engine refer
    to each other, so only the cyclic collector frees them) when each module ends."""
    yield
    gc.collect()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch, **overrides) -> a directory holding a random-weight transformers checkpoint of that
    arch, its config entries replaced by `overrides` (tiny_dir("llama3", max_position_embeddings=4096))."""
    made = {}

    def make(arch: str, **overrides):
        key = (arch, *sorted(overrides.items()))
        if key not in made:
            made[key] = tiny.build(arch, tmp_path_factory.mktemp(arch), **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2():
    import jaxinfer

    return jaxinfer.LLM("smollm2-135m", tp=3, **tiny.SMALL_ENGINE)


@pytest.fixture(scope="session")
def hf_smollm2():
    from jaxinfer import checkpoint

    path = checkpoint.builtin_path("smollm2-135m")
    return tiny.hf_from_gguf(path)
