"""jaxinfer: serve large language models on a JAX device mesh.

The public names load on first use, so `import jaxinfer` (or a kernel, or the config) does not pull
in the whole runtime."""

import importlib

_PUBLIC = {
    "LLM": "jaxinfer.llm",
    "generate": "jaxinfer.llm",
    "AsyncLLM": "jaxinfer.engine",
    "Completion": "jaxinfer.outputs",
    "StreamChunk": "jaxinfer.outputs",
    "JaxinferError": "jaxinfer.errors",
    "SamplingParams": "jaxinfer.sampling",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
