"""jaxinfer: serve large language models on a JAX device mesh."""

from jaxinfer.engine import AsyncLLM
from jaxinfer.errors import JaxinferError
from jaxinfer.llm import LLM, Completion, StreamChunk, generate
from jaxinfer.sampling import SamplingParams

__all__ = ["LLM", "AsyncLLM", "Completion", "JaxinferError", "SamplingParams", "StreamChunk", "generate"]
__version__ = "0.1.0"
