"""Tokenizers from a Hugging Face directory or GGUF metadata, with the model's chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxinfer.config import read_json_object
from jaxinfer.errors import JaxinferError

GGUF_CONTROL = 3  # llama.cpp token type of special tokens


class Tokenizer:
    """Encode, decode and render chat prompts; `eos_token_ids` come from the tokenizer's own files."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
    ):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        i = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        return () if i is None else (i,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token:
            bos = self.tok.token_to_id(self.bos_token)
            if bos is not None and ids[:1] != [bos]:
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.chat_template:
            raise JaxinferError("chat=True but this model has no chat template; pass chat=False")

        def raise_exception(message: str):
            raise JaxinferError(f"chat template: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, prompt: str) -> list[int]:
        # The template writes the special tokens itself, as transformers' apply_chat_template does.
        return self.encode(self.render_chat([{"role": "user", "content": prompt}]), add_special_tokens=False)

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))
        cfg = {
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


TOKENIZER_CONFIG_FIX = "correct it (the published model's tokenizer_config.json has the right value) or re-download it"


def _token_str(cfg: dict[str, Any], key: str, path: Path) -> str | None:
    value = cfg.get(key)
    if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise JaxinferError(
            f'{path}: {key}={cfg.get(key)!r} must be a token string or {{"content": STRING}}; {TOKENIZER_CONFIG_FIX}'
        )
    return value


def _chat_template(cfg: dict[str, Any], path: Path) -> str | None:
    value = cfg.get("chat_template")
    if isinstance(value, list):  # several named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise JaxinferError(
                f"{path}: chat_template is a list without a template named 'default' (names: "
                f"{sorted(map(str, named))}); {TOKENIZER_CONFIG_FIX}"
            )
        value = named["default"]
    if value is not None and not isinstance(value, str):
        raise JaxinferError(f"{path}: chat_template={value!r} must be a Jinja template string; {TOKENIZER_CONFIG_FIX}")
    return value


def from_hf_dir(directory: Path) -> Tokenizer | None:
    """The tokenizer of a Hugging Face directory, or None when it ships no tokenizer.json."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
        raise JaxinferError(f"{path} could not be read ({e}); re-download the tokenizer") from e
    cfg_path = directory / "tokenizer_config.json"
    cfg = read_json_object(cfg_path, TOKENIZER_CONFIG_FIX) if cfg_path.is_file() else {}
    template = _chat_template(cfg, cfg_path)
    jinja_path = directory / "chat_template.jinja"
    if template is None and jinja_path.is_file():
        template = jinja_path.read_text()
    add_bos = cfg.get("add_bos_token", False)
    if not isinstance(add_bos, bool) and add_bos is not None:
        raise JaxinferError(f"{cfg_path}: add_bos_token={add_bos!r} must be true or false; {TOKENIZER_CONFIG_FIX}")
    return Tokenizer(
        tok,
        chat_template=template,
        bos_token=_token_str(cfg, "bos_token", cfg_path),
        eos_token=_token_str(cfg, "eos_token", cfg_path),
        add_bos=bool(add_bos),
    )


def from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer | None:
    """A byte-level BPE tokenizer (llama.cpp's `gpt2` model) rebuilt from GGUF metadata, or None when
    the file carries no tokenizer."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "gpt2":
        raise JaxinferError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    for key, value in (("tokens", tokens), ("merges", merges)):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise JaxinferError(
                f"GGUF tokenizer.ggml.{key} is missing or not a list of strings; the file is damaged: re-download it"
            )
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    specials = [tokens[i] for i, t in enumerate(types) if t == GGUF_CONTROL]
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is None:
            return None
        if not isinstance(i, int) or not 0 <= i < len(tokens):
            raise JaxinferError(
                f"GGUF tokenizer.ggml.{key}_token_id={i!r} is not a token id in [0, {len(tokens)}); "
                "the file is damaged: re-download it"
            )
        return tokens[i]

    return Tokenizer(
        tok,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=token("bos"),
        eos_token=token("eos"),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )
