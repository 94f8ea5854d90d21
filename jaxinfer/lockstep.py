"""One engine over several processes (a replica whose mesh spans hosts: pp across nodes), run in lock
step: process 0 takes the requests, and before each engine step it publishes what changed since the
last one; every other process applies the same changes and runs the same step, so all run the same
deterministic schedule and the same compiled programs.

The channel is jax.distributed's own key-value store (the coordination service process 0 hosts),
not a device collective: publishing costs one small RPC per step and no compiled program, and a
follower waits for the next step in a blocking read with a timeout that it repeats while process 0 is
idle, so an idle server moves nothing and no collective or barrier can time out. Step n's message is
the key `jaxinfer/lockstep/<n // BLOCK>/<n>` (pickled, as the replica workers' pipes are: these
processes are one job and trust each other); each follower writes the block it has reached to
`jaxinfer/lockstep/ack/<process>`, and process 0 deletes a block once every follower is past it, so
the store holds at most a couple of blocks however long the server runs.

A follower's own death is noticed by jax.distributed's heartbeats (distributed.HEARTBEAT_TIMEOUT_S),
which end every process; launch/local.py stops the others at once. Process 0's death ends each
follower's read with an error naming it.
"""

from __future__ import annotations

import logging
import pickle

import jax

from jaxinfer.errors import JaxinferError

log = logging.getLogger(__name__)

PREFIX = "jaxinfer/lockstep"
BLOCK = 256  # steps per key directory: the unit in which process 0 forgets what every follower read
WAIT_MS = 5_000  # a follower's blocking read, repeated while process 0 has nothing to run
STOP = ("stop",)  # the last message: followers leave their loop


def _client():
    from jax._src import distributed  # (the client jax.distributed.initialize made; orbax reads it alike)

    client = distributed.global_state.client
    if client is None or jax.process_count() < 2:
        raise JaxinferError(
            "lock step needs a multi-process run: start it with launch/local.py, or give --coordinator_address, "
            "--num_processes and --process_id"
        )
    return client


def _key(n: int) -> str:
    return f"{PREFIX}/{n // BLOCK}/{n}"


class Leader:
    """Process 0's side: `record` each change as it happens, `publish` them before each step, `stop` once."""

    def __init__(self, client=None, peers: int | None = None):
        self.client = client if client is not None else _client()
        self.peers = jax.process_count() - 1 if peers is None else peers
        self.ops: list[tuple] = []  # changes since the last publish, in order
        self.n = 0  # the next step's number
        self.kept = 0  # the oldest block not deleted yet
        self.stopped = False

    def record(self, op: tuple) -> None:
        self.ops.append(op)

    def publish(self) -> None:
        """Sends the recorded changes as the next step's message (an empty list for a step without any)."""
        if self.stopped:
            raise JaxinferError("this engine stopped its peer processes; it runs no more steps")
        if self.n % BLOCK == 0:
            self._forget()
        self.client.key_value_set_bytes(_key(self.n), pickle.dumps(self.ops, protocol=pickle.HIGHEST_PROTOCOL))
        self.ops = []
        self.n += 1

    def stop(self) -> None:
        """Tells the followers to leave their loop (they exit; process 0 runs no more steps)."""
        if not self.stopped:
            self.ops = [STOP]
            self.publish()
            self.stopped = True

    def _forget(self) -> None:
        """Deletes the blocks every follower has moved past."""
        acks = self.client.key_value_dir_get_bytes(f"{PREFIX}/ack")
        if len(acks) < self.peers:
            return
        reached = min(int(v) for _, v in acks)
        while self.kept < reached:
            self.client.key_value_delete(f"{PREFIX}/{self.kept}")
            self.kept += 1


class Follower:
    """Another process's side: `next()` blocks until process 0 publishes the next step's changes."""

    def __init__(self, client=None):
        self.client = client if client is not None else _client()
        self.n = 0
        self.me = jax.process_index()

    def next(self) -> list[tuple]:
        if self.n % BLOCK == 0:  # process 0 may forget the blocks before this one
            block = str(self.n // BLOCK).encode()
            self.client.key_value_set_bytes(f"{PREFIX}/ack/{self.me}", block, allow_overwrite=True)
        while True:
            try:
                payload = self.client.blocking_key_value_get_bytes(_key(self.n), WAIT_MS)
                break
            except Exception as e:  # (jax's runtime error: only its text tells a timeout from a lost peer)
                if "DEADLINE_EXCEEDED" in str(e):
                    continue  # process 0 is idle
                raise JaxinferError(
                    f"process {self.me} lost process 0 while waiting for step {self.n}: {' '.join(str(e).split())}"
                ) from e
        self.n += 1
        return pickle.loads(payload)
