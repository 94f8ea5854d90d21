"""Which replica takes a request: the one whose KV cache probably holds a long prefix of its prompt,
else the one with the least outstanding work. Pure Python, no processes: the pool (replicas.py) tells
it what it sent where and how far each request got.

Outstanding work of a replica is counted in tokens, from the server's own view of its requests (which
moves with every event, where the workers' heartbeats lag by up to half a second): for each request in
flight there, the prompt tokens not yet prefilled (the prompt minus the prefix it was expected to find
cached, until its first token arrives) plus the max_tokens not yet generated. A request with
max_tokens=2000 that has made 10 counts for 1990: the budget is the only estimate of its remaining
length there is, and an over-estimate only makes that replica look busier than it is.

The prefix tree of a replica is approximate: it is built from what was routed there, not read from
the engine, as a chain of hashes of 16-token blocks (block i's hash covers tokens [0, 16 (i + 1)), so
looking each block up on its own finds the longest cached prefix), kept in an LRU bounded by about
what the replica's KV pool can hold. It forgets a replica's history when the replica restarts.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

BLOCK = 16  # tokens per prefix block: the engine's default page size, its unit of prefix reuse

# A prefix match is worth following when it covers at least MIN_MATCH_TOKENS and at least
# MIN_MATCH_FRACTION of the prompt. Two blocks: one 16-token block is about what a chat template's
# header shares between unrelated prompts, and saving that much prefill is not worth any imbalance.
# Half the prompt (the threshold SGLang's cache-aware router defaults to): below it most of the prefill
# is paid anyway, and a 4,000-token prompt should not follow a replica for its first 40 tokens.
MIN_MATCH_TOKENS = 2 * BLOCK
MIN_MATCH_FRACTION = 0.5

# The imbalance guard: the prefix replica is skipped for the least loaded one when its outstanding work
# exceeds the least loaded one's by more than MAX_IMBALANCE_TOKENS *and* by more than the factor
# MAX_IMBALANCE_RATIO. Under light load the absolute bound decides: continuous batching runs a few more
# requests at almost no cost to each, and 2,048 tokens is a handful of typical requests (a few hundred
# prompt tokens and a few hundred new ones), so sharing a cache is worth that much extra queue. Under
# heavy load the ratio decides: a replica with 50% more work than another finishes a new request
# correspondingly later, which no prefix saving of one prompt makes up for.
MAX_IMBALANCE_TOKENS = 2048
MAX_IMBALANCE_RATIO = 1.5

# Blocks remembered per replica before the pool learns its KV pool's size (set_capacity).
DEFAULT_CAPACITY_BLOCKS = 8192


def block_hashes(prompt_ids: list[int], block: int = BLOCK) -> list[int]:
    """The chained hashes of the prompt's full blocks: hash i stands for tokens [0, block (i + 1))."""
    out, h = [], 0
    for i in range(len(prompt_ids) // block):
        h = hash((h, tuple(prompt_ids[i * block : (i + 1) * block])))
        out.append(h)
    return out


class PrefixIndex:
    """The prompt prefixes recently sent to one replica: an LRU set of chained block hashes."""

    def __init__(self, capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS):
        self.capacity = capacity_blocks
        self.blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` are held."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def insert(self, hashes: list[int]) -> None:
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        self.blocks.clear()


@dataclasses.dataclass
class _Flight:
    replica: int
    prompt_todo: int  # prompt tokens the replica still has to prefill (0 once the first token came)
    budget: int  # max_tokens
    generated: int = 0

    @property
    def work(self) -> int:
        return self.prompt_todo + max(0, self.budget - self.generated)


@dataclasses.dataclass
class Choice:
    replica: int
    matched_tokens: int  # the prompt prefix the chosen replica is expected to hold
    reason: str  # "prefix" | "least_loaded" | "guard" (a prefix replica skipped for its load)


class Router:
    """Chooses replicas and keeps the outstanding work of each. Replicas are 0..n-1; only those marked
    up are chosen. Not thread-safe (the pool calls it from its event loop)."""

    def __init__(
        self,
        n: int,
        *,
        block: int = BLOCK,
        min_match_tokens: int = MIN_MATCH_TOKENS,
        min_match_fraction: float = MIN_MATCH_FRACTION,
        max_imbalance_tokens: int = MAX_IMBALANCE_TOKENS,
        max_imbalance_ratio: float = MAX_IMBALANCE_RATIO,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
    ):
        self.n = n
        self.block = block
        self.min_match_tokens = min_match_tokens
        self.min_match_fraction = min_match_fraction
        self.max_imbalance_tokens = max_imbalance_tokens
        self.max_imbalance_ratio = max_imbalance_ratio
        self.prefixes = [PrefixIndex(capacity_blocks) for _ in range(n)]
        self.up = [True] * n
        self.flights: dict[str, _Flight] = {}
        self._load = [0] * n  # sum of the work of the flights on each replica
        self._count = [0] * n  # flights on each replica
        self._turn = itertools.count()  # rotates ties, so equal replicas take turns

    # --- state -----------------------------------------------------------------------------------

    def set_up(self, replica: int, up: bool) -> None:
        """Marks a replica up or down; one coming back starts with an empty prefix tree (its cache is new)."""
        if up and not self.up[replica]:
            self.prefixes[replica].clear()
        self.up[replica] = up

    def set_capacity(self, replica: int, blocks: int) -> None:
        """Bounds a replica's prefix tree by what its KV pool holds (pages x page size / block)."""
        self.prefixes[replica].capacity = max(1, blocks)

    def load(self, replica: int) -> int:
        """Outstanding tokens on `replica`: prompt tokens not yet prefilled plus tokens not yet generated."""
        return self._load[replica]

    def in_flight(self, replica: int) -> int:
        return self._count[replica]

    # --- routing ---------------------------------------------------------------------------------

    def choose(self, prompt_ids: list[int], exclude: frozenset[int] | set[int] = frozenset()) -> Choice | None:
        """The replica for a prompt (None when no replica is up outside `exclude`): the one holding the
        longest prefix when that match is substantial and the guard allows, else the least loaded."""
        live = [r for r in range(self.n) if self.up[r] and r not in exclude]
        if not live:
            return None
        turn = next(self._turn)
        # Least loaded; ties by fewer requests in flight, then in turn (equal replicas alternate).
        rank = lambda r: (self._load[r], self._count[r], (r - turn) % self.n)
        least = min(live, key=rank)
        hashes = block_hashes(prompt_ids, self.block)
        matched = {r: self.prefixes[r].match(hashes) * self.block for r in live}
        best = min(live, key=lambda r: (-matched[r], rank(r)))
        m = matched[best]
        if m == 0 or m < self.min_match_tokens or m < self.min_match_fraction * len(prompt_ids):
            return Choice(least, matched[least], "least_loaded")
        if best == least or not self._too_busy(self._load[best], self._load[least]):
            return Choice(best, m, "prefix")
        return Choice(least, matched[least], "guard")

    def _too_busy(self, load: int, least: int) -> bool:
        extra = load - least
        return extra > self.max_imbalance_tokens and load > self.max_imbalance_ratio * least

    def assign(
        self, request_id: str, replica: int, prompt_ids: list[int], max_tokens: int, matched_tokens: int = 0
    ) -> None:
        """Records that `request_id` went to `replica` (which will hold its prompt's prefix from now on)."""
        self.finish(request_id)
        self.prefixes[replica].insert(block_hashes(prompt_ids, self.block))
        f = _Flight(replica, max(0, len(prompt_ids) - matched_tokens), max_tokens)
        self.flights[request_id] = f
        self._load[replica] += f.work
        self._count[replica] += 1

    def progress(self, request_id: str, new_tokens: int) -> None:
        """`new_tokens` more tokens of `request_id` arrived (its prompt is prefilled by then)."""
        f = self.flights.get(request_id)
        if f is None:
            return
        before = f.work
        f.prompt_todo = 0
        f.generated += new_tokens
        self._load[f.replica] += f.work - before

    def finish(self, request_id: str) -> None:
        """`request_id` ended (or moves): its work leaves its replica."""
        f = self.flights.pop(request_id, None)
        if f is not None:
            self._load[f.replica] -= f.work
            self._count[f.replica] -= 1

    def flights_on(self, replica: int) -> list[str]:
        return [rid for rid, f in self.flights.items() if f.replica == replica]
