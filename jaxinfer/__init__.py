"""jaxinfer: serve large language models on a JAX device mesh."""

from jaxinfer.errors import JaxinferError
from jaxinfer.llm import LLM, Completion, generate
from jaxinfer.sampling import SamplingParams

__all__ = ["LLM", "Completion", "JaxinferError", "SamplingParams", "generate"]
__version__ = "0.1.0"
