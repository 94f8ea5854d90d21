"""OpenAI request bodies for /v1/completions and /v1/chat/completions -> token ids and SamplingParams,
and the OpenAI error body.

Every sampling value goes through SamplingParams' own checks (with the model's vocabulary), as the
Python API's do; prompts get the checks LLM applies to its own (not empty, ids inside the vocabulary,
shorter than the context). Anything wrong is an ApiError with status 400 naming the field; nothing is
queued before the whole body has passed.
"""

from __future__ import annotations

import dataclasses
import json
import re

from jaxinfer.errors import JaxinferError
from jaxinfer.outputs import is_token
from jaxinfer.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n: requests one HTTP request may queue


class ApiError(Exception):
    """An OpenAI-style error: `body()` is {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def load_json(raw: bytes) -> dict:
    """The body as a JSON object; ApiError 400 for anything else (NaN and Infinity included)."""

    def constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


@dataclasses.dataclass
class Parsed:
    """A checked request: `prompts[p]` generated `n` times; choice j = p * n + i uses `params[j]`."""

    chat: bool
    model: str | None
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k >= 0: each token's logprob and its k most likely alternatives

    @property
    def choices(self) -> list[tuple[int, list[int], SamplingParams]]:
        """(choice index, prompt ids, params) of every request to run."""
        return [(j, self.prompts[j // self.n], p) for j, p in enumerate(self.params)]


# Fields either kind takes; `_ignored` ones are accepted and have no effect, `_defaults_only` ones are
# accepted at their OpenAI default only (a request that relies on anything else is refused, not
# silently served differently).
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
}
_COMPLETION = _COMMON | {"prompt", "best_of", "echo", "suffix"}
_CHAT = _COMMON | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "functions",
    "function_call",
    "metadata",
    "store",
    "service_tier",
    "modalities",
    "prediction",
    "audio",
    "reasoning_effort",
    "web_search_options",
}
_DEFAULTS_ONLY = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "prediction": (),
    "audio": (),
    "web_search_options": (),
}
# user, metadata, store, service_tier, parallel_tool_calls, reasoning_effort: accepted, no effect.

_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "function_call"}
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; this route takes "
            f"{', '.join(sorted(allowed))}",
            param=unknown[0],
            code="unknown_field",
        )
    for name, defaults in _DEFAULTS_ONLY.items():
        value = body.get(name)
        if value is not None and not any(value == d and type(value) is type(d) for d in defaults):
            told = f" (only {defaults[0]!r}, the default)" if defaults else ""
            raise bad(f"{name}={value!r} is not supported by this server{told}", param=name, code="unsupported")


def _int_field(body: dict, name: str, default, lo: int, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not is_token(value):
        raise bad(f"{name}={value!r} must be an integer", param=name)
    if value < lo or (hi is not None and value > hi):
        raise bad(f"{name}={value} must be between {lo} and {hi}" if hi else f"{name}={value} must be >= {lo}", name)
    return value


def _bool_field(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name}={value!r} must be true or false", param=name)
    return value


def check_prompt(ids: list, what: str, param: str, vocab_size: int, max_seq_len: int) -> list[int]:
    """The Python API's prompt rules (LLM's own check runs again when the request is queued)."""
    if not ids:
        raise bad(f"{what} is empty; give at least one token", param)
    for t in ids:
        if not is_token(t):
            raise bad(f"{what} has {t!r} ({type(t).__name__}) where a token id (an int) belongs", param)
        if not 0 <= t < vocab_size:
            raise bad(f"{what} has token id {t} outside the vocabulary [0, {vocab_size})", param, "token_out_of_vocab")
    if len(ids) >= max_seq_len:
        raise bad(
            f"{what} has {len(ids)} tokens, longer than the context allows (max_seq_len={max_seq_len}, leaving "
            "room for one new token); shorten it",
            param,
            "context_length_exceeded",
        )
    return [int(t) for t in ids]


def _completion_prompts(body: dict, tokenizer) -> list[list]:
    prompt = body.get("prompt")
    fix = "give prompt as a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_token(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad(f"prompt={prompt!r:.80}: {fix}", "prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if tokenizer is None:
                raise bad("this model has no tokenizer; give the prompt as token ids", "prompt")
            out.append(tokenizer.encode(p))
        elif isinstance(p, list):
            out.append(p)
        else:
            raise bad(f"prompt[{i}] is a {type(p).__name__}: {fix}", "prompt")
    return out


def _text_of(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(
                    f"messages[{i}].content[{k}] must be {{'type': 'text', 'text': STRING}} (text only)",
                    "messages",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content is a {type(content).__name__}; give a string or a list of text parts", "messages")


def chat_prompt(messages, tokenizer) -> list[int]:
    """The token ids of `messages` through the model's chat template (as LLM's chat=True renders one)."""
    import jinja2

    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {'role', 'content'} objects", "messages")
    if tokenizer is None or not tokenizer.chat_template:
        raise bad("this model has no chat template; use /v1/completions", "messages", "no_chat_template")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] is a {type(m).__name__}; give an object with role and content", "messages")
        unknown = sorted(set(m) - _MESSAGE_KEYS)
        if unknown:
            raise bad(f"messages[{i}] has unknown field {unknown[0]!r}", "messages", "unknown_field")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"messages[{i}].role={role!r} must be one of {sorted(_ROLES)}", "messages")
        msg = {"role": "system" if role == "developer" else role, "content": _text_of(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        rendered.append(msg)
    try:
        text = tokenizer.render_chat(rendered)
    except JaxinferError as e:
        raise bad(str(e), "messages") from None
    except jinja2.TemplateError as e:
        raise bad(f"the model's chat template failed on these messages: {e}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


_PARAM_OF_MESSAGE = re.compile(r"^(\w+)(?:\[\d+\])?=")


def sampling_params(values: dict, vocab_size: int, renamed: dict[str, str]) -> SamplingParams:
    """SamplingParams(**values) checked against the vocabulary; its JaxinferError becomes a 400 naming
    the OpenAI field (`renamed` maps SamplingParams names back to the body's)."""
    try:
        params = SamplingParams(**values)
        params.validate(vocab_size)
    except JaxinferError as e:
        m = _PARAM_OF_MESSAGE.match(str(e))
        name = m.group(1) if m else None
        raise bad(str(e), renamed.get(name, name)) from None
    return params


def parse(body: dict, *, chat: bool, tokenizer, vocab_size: int, max_seq_len: int) -> Parsed:
    """A checked request from an OpenAI body (load_json's), or ApiError 400 naming what is wrong."""
    _check_fields(body, _CHAT if chat else _COMPLETION)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model={model!r} must be a string", "model")

    if chat:
        ids = chat_prompt(body.get("messages"), tokenizer)
        prompts = [check_prompt(ids, "the messages (after the chat template)", "messages", vocab_size, max_seq_len)]
    else:
        raw = _completion_prompts(body, tokenizer)
        prompts = [
            check_prompt(p, f"prompt {i}" if len(raw) > 1 else "the prompt", "prompt", vocab_size, max_seq_len)
            for i, p in enumerate(raw)
        ]

    n = _int_field(body, "n", 1, 1, MAX_N)
    if n * len(prompts) > MAX_CHOICES:
        raise bad(f"{len(prompts)} prompts x n={n} is {n * len(prompts)} requests; at most {MAX_CHOICES}", "n")
    stream = _bool_field(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options is only allowed with stream=true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad(f"stream_options={options!r} must be {{'include_usage': BOOL}}", "stream_options")
        include_usage = _bool_field(options, "include_usage", False)

    if chat:
        want = _bool_field(body, "logprobs", False)
        top = _int_field(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise bad("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        value = body.get("logprobs")
        if isinstance(value, bool):
            raise bad(f"logprobs={value!r} must be an integer (how many alternatives per token) or null", "logprobs")
        logprobs = _int_field(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)

    # max_tokens: completions default to 16 (as OpenAI's); chat to the rest of the context. Like the
    # Python API, a request may ask for more than the context has left and ends there ("length").
    renamed = {} if chat else {"top_logprobs": "logprobs"}
    max_tokens = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens, renamed["max_tokens"] = body["max_completion_tokens"], "max_completion_tokens"
    if max_tokens is None:
        max_tokens = max_seq_len if chat else 16
    top_k = body.get("top_k")
    if top_k == -1 and is_token(top_k):  # vLLM's spelling of "off"
        top_k = 0
    values = dict(
        max_tokens=max_tokens,
        temperature=1.0 if body.get("temperature") is None else body["temperature"],
        top_p=1.0 if body.get("top_p") is None else body["top_p"],
        top_k=0 if top_k is None else top_k,
        seed=body.get("seed"),
        stop=body.get("stop"),
        stop_token_ids=body.get("stop_token_ids"),
        ignore_eos=_bool_field(body, "ignore_eos", False),
        logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
    )
    first = sampling_params(values, vocab_size, renamed)
    # Choice i of every prompt samples with seed + i: choice 0 is what the Python API gives for `seed`.
    params = []
    for _ in prompts:
        for i in range(n):
            params.append(first if i == 0 or first.seed is None else dataclasses.replace(first, seed=first.seed + i))
    return Parsed(chat, model, prompts, n, params, stream, include_usage, logprobs)
