"""What a request produces and how it ends: Completion and StreamChunk (public), the per-request
bookkeeping the static path and the engine share (Row, Stops), the settled text a stream sends and
how a consumer reads a stream's queue (`drain`)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

import numpy as np

from jaxinfer.errors import JaxinferError
from jaxinfer.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length" | "cancelled" ("error" is raised as JaxinferError instead)
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None  # per token, with SamplingParams.top_logprobs


@dataclasses.dataclass
class StreamChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new token ids since the previous chunk
    finish_reason: str | None  # set on the last chunk


def is_token(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


@dataclasses.dataclass
class Row:
    prompt: list[int]
    budget: int
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)  # when asked for
    text: str | None = None  # the final text, once done
    finish: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # what went wrong, with finish "error"

    @property
    def done(self) -> bool:
        return self.finish is not None


class Stops:
    """Host-side end-of-sequence rules: stop ids, eos ids, stop strings and the token budget."""

    def __init__(self, tokenizer, eos_token_ids, params: SamplingParams):
        self.params = params
        self.tokenizer = tokenizer
        ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            ids |= set(eos_token_ids)
        self.stop_ids = ids
        self.stop_strings = params.stop_strings
        if self.stop_strings and self.tokenizer is None:
            raise JaxinferError("stop strings need a tokenizer; this checkpoint has none, use stop_token_ids")

    def push(self, row: Row, token: int, logprob: float, alternatives=None) -> None:
        """Appends one token; `alternatives`: the step's most likely (ids, logprobs), best first."""
        row.ids.append(token)
        row.logprobs.append(logprob)
        k = self.params.top_logprobs
        if k and alternatives is not None:
            ids, lps = alternatives
            row.top_logprobs.append({int(i): float(lp) for i, lp in zip(ids[:k], lps[:k])})
        if token in self.stop_ids:
            row.finish = "stop"
            return
        if self.stop_strings:
            text = self.tokenizer.decode(row.ids)
            hits = [text.find(s) for s in self.stop_strings if s in text]
            if hits:
                row.text, row.finish = text[: min(hits)], "stop"
                return
        if len(row.ids) >= row.budget:
            row.finish = "length"

    def text(self, row: Row) -> str:
        """The final text of a finished row."""
        if row.text is None:
            ids = row.ids
            visible = ids[:-1] if ids and ids[-1] in self.stop_ids and row.finish == "stop" else ids
            text = self.tokenizer.decode(visible) if self.tokenizer else ""
            if not row.done:
                return text
            row.text = text
        return row.text

    def settled_text(self, row: Row) -> str:
        """The text of an unfinished row that no later token can change: without a trailing incomplete
        UTF-8 sequence (decoded as U+FFFD) or a suffix that may be the start of a stop string."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(row.ids).rstrip("\ufffd")
        hold = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[: len(text) - hold]

    def completion(self, row: Row) -> Completion:
        return Completion(
            text=self.text(row),
            token_ids=list(row.ids),
            logprobs=list(row.logprobs) if self.params.logprobs else None,
            finish_reason=row.finish,
            prompt_token_ids=row.prompt,
            top_logprobs=list(row.top_logprobs) if self.params.top_logprobs else None,
        )


class StreamText:
    """What one stream has sent of a request: `next` gives the new token ids and the new text that is
    settled, so that the chunks' texts add up to the completion's text exactly."""

    def __init__(self, req):
        self.req = req
        self.ids = 0
        self.text = ""

    def error(self, row: Row) -> JaxinferError:
        return JaxinferError(f"request {self.req.id} failed: {row.error}")

    def next(self, row: Row) -> StreamChunk | JaxinferError | None:
        """The next chunk, None when there is nothing new, or the error of a failed request."""
        if row.finish == "error":
            return self.error(row)
        done = row.done
        if len(row.ids) == self.ids and not done:
            return None
        stops = self.req.stops
        text = stops.text(row) if done else stops.settled_text(row)
        if text.startswith(self.text):
            new = text[len(self.text) :]
        else:  # the tokenizer decoded settled text differently later; what was sent cannot be taken back
            log.warning("request %d: the decoded text changed under the streamed text", self.req.id)
            new = ""
        ids = row.ids[self.ids :]
        self.ids, self.text = self.ids + len(ids), self.text + new
        return StreamChunk(new, ids, row.finish if done else None)


async def drain(queue: asyncio.Queue, abandon: Callable[[], None]) -> AsyncIterator:
    """The items of one request's `queue` up to the one with a finish_reason (yielded, then the end);
    an exception found in the queue is raised instead. A consumer that leaves before the end (its task
    cancelled, the iterator closed) calls `abandon`, which must cancel the request where it runs."""
    finished = False
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = item.finish_reason is not None
            yield item
            if finished:
                return
    finally:
        if not finished:
            abandon()
