"""K replicas of one model, each an engine in its own worker process on its own device group, behind
the router: the `Backend` the HTTP app serves from.

Processes. Workers are started with multiprocessing's "spawn" context (a fresh interpreter: no forked
jax state, and one crashing takes no other down). Before jax starts in a worker, its device group is
set: on GPU, CUDA_VISIBLE_DEVICES lists the replica's `devices_per_replica` GPUs; on CPU, the worker
simulates that many devices of its own (XLA_FLAGS=--xla_force_host_platform_device_count). The server
process holds the tokenizer (read without weights), so prompts travel as token ids.

Channel: one multiprocessing Pipe per worker (a Unix socket pair carrying pickled tuples). The server
reads it from its event loop (`loop.add_reader`), so a worker's death is its end-of-file, noticed at
once; the worker reads it in a thread of its own, so the server's sends never wait on a busy step.
  server -> worker: ("submit", request_id, prompt_ids, SamplingParams), ("cancel", request_id),
                    ("stop",) (cancel what is open, exit). Draining is the server's alone: it stops
                    admitting, lets the workers finish what they hold (a request retried meanwhile
                    must still be taken), then stops them; a worker needs no message for it.
  worker -> server: ("ready", info), ("events", [(request_id, text, token_ids, logprobs,
                    finish_reason, error), ...]) once per engine step, ("refused", request_id, error)
                    when the engine's checks turn a request down (nothing queued), ("stats", {...})
                    every HEARTBEAT_S, ("fatal", message) before a worker exits on an error of its own.

Failures. A worker that dies (its pipe closes): each of its requests that has not streamed a token is
sent to another replica (at most `max_retries` times, so a request that kills every replica it lands on
cannot take them all down); the others end with Event(finish_reason="error"). The router stops sending
to it, `health()` shows it down with what happened, and it is restarted (`restart=True`). A request
the engine refuses or fails (bad input that slipped past validation) ends alone with its error.

A replica spanning processes (pp across hosts) is not a worker of this pool: it is a whole
multi-process launch of `jaxinfer serve` (one replica per launch), process 0 serving HTTP from an
InProcessBackend and leading its peers in lock step (jaxinfer/lockstep.py, Engine.lead/follow).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
from pathlib import Path

from jaxinfer.errors import JaxinferError
from jaxinfer.outputs import StreamText, drain
from jaxinfer.serving import backend
from jaxinfer.serving.backend import Event, GenRequest, Unavailable
from jaxinfer.serving.router import BLOCK, Router

__all__ = ["Draining", "Overloaded", "ReplicaPool", "device_envs"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # how often a worker sends its stats
STALE_S = 10.0  # a heartbeat older than this is mentioned in health()
STOP_WAIT_S = 10.0  # how long a stopped worker gets to exit before it is terminated, then killed


class Overloaded(backend.Overloaded):
    """The pool's queue is full (`max_queue`): the request was not taken (HTTP 429, as for one engine)."""


class Draining(Unavailable):
    """The pool is draining or closed and takes no new request (HTTP 503)."""


# --- device groups -------------------------------------------------------------------------------


def _visible_gpus() -> list[str]:
    """The NVIDIA GPUs this process may use, without starting jax (which would take GPU memory in the
    server): CUDA_VISIBLE_DEVICES when set, else the driver's list; none when JAX_PLATFORMS names no GPU."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    gpus = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(gpus.iterdir())))] if gpus.is_dir() else []


def device_envs(replicas: int, devices_per_replica: int) -> list[dict[str, str]]:
    """The environment of each replica's worker: its own group of `devices_per_replica` GPUs, or, on a
    machine without GPUs, that many simulated CPU devices."""
    gpus = _visible_gpus()
    if not gpus:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
        flags = f"{flags} --xla_force_host_platform_device_count={devices_per_replica}".strip()
        return [{"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags} for _ in range(replicas)]
    need = replicas * devices_per_replica
    if need > len(gpus):
        raise JaxinferError(
            f"{replicas} replicas of {devices_per_replica} GPUs need {need} GPUs but {len(gpus)} are visible "
            f"({', '.join(gpus)}); lower --replicas or the mesh axes, or make more GPUs visible"
        )
    groups = [gpus[i * devices_per_replica : (i + 1) * devices_per_replica] for i in range(replicas)]
    return [{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups]


def mesh_size(model_kwargs: dict) -> int:
    """Devices one replica's mesh needs: the product of its axes (or of its mesh preset's)."""
    from jaxinfer import sharding

    if model_kwargs.get("mesh") is not None:
        axes = sharding.load_preset(model_kwargs["mesh"]).get("axes", {})
    else:
        axes = {k: model_kwargs[k] for k in ("dp", "pp", "tp", "ep", "sp") if model_kwargs.get(k) is not None}
    return math.prod(sharding.mesh_shape(**axes).values())


# --- the worker process --------------------------------------------------------------------------


def _worker_main(conn, replica: int, model_kwargs: dict, env: dict[str, str], warmup: bool, log_level: int) -> None:
    """A replica's process: loads the model on its devices, says ready, then serves until stopped."""
    os.environ.update(env)  # before jax starts (imported or not, its backend is not up yet)
    # A spawned process starts without the server's logging setup: log to stderr like it, marked.
    logging.basicConfig(level=log_level, format=f"%(asctime)s replica {replica} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle (it drains, then stops us)
    try:
        import jax

        if env.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_platforms", "cpu")  # (read from the environment when jax was imported)
        from jaxinfer.llm import LLM

        llm = LLM(**model_kwargs)
        engine = llm.engine
        if warmup:
            engine.warmup()
        worker = _Worker(conn, llm)
        conn.send(("ready", {"pid": os.getpid(), "devices": [str(d) for d in llm.mesh.devices.flat], **worker.stats()}))
    except BaseException as e:
        _send_fatal(conn, f"could not start: {type(e).__name__}: {e}")
        os._exit(1)
    try:
        worker.run()
    except BaseException as e:
        log.exception("replica %d failed", replica)
        _send_fatal(conn, f"failed: {type(e).__name__}: {e}")
        os._exit(1)


def _send_fatal(conn, message: str) -> None:
    try:
        conn.send(("fatal", message))
    except OSError:
        pass


@dataclasses.dataclass(eq=False)
class _Open:
    req: object  # the engine's Request
    text: object  # its StreamText


class _Worker:
    """The serving loop of one worker: messages in, one engine step, the step's events out."""

    def __init__(self, conn, llm):
        self.conn = conn
        self.llm = llm
        self.engine = llm.engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.open: dict[str, _Open] = {}

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the server is gone
                self.inbox.put(("stop",))
                return
            self.inbox.put(msg)

    def run(self) -> None:
        threading.Thread(target=self._read, daemon=True, name="pipe-reader").start()
        next_beat = 0.0
        while True:
            busy = self.engine.has_work()
            wait = 0.0 if busy else max(0.0, next_beat - time.monotonic())
            try:
                msgs = [self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()]
            except queue.Empty:
                msgs = []
            while True:
                try:
                    msgs.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            events = []
            for msg in msgs:
                if msg[0] == "stop":
                    for o in self.open.values():
                        self.engine.cancel(o.req)
                    return
                self._handle(msg)
            if self.engine.has_work():
                self.engine.step()
            self._collect(events)
            if events:
                self.conn.send(("events", events))
            if time.monotonic() >= next_beat:
                self.conn.send(("stats", self.stats()))
                next_beat = time.monotonic() + HEARTBEAT_S

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, prompt_ids, params = msg
            try:
                if rid in self.open:
                    raise JaxinferError(f"request id {rid!r} is in flight already")
                req = self.engine.request(prompt_ids, params)
                self.engine.queue([req])
            except Exception as e:  # (JaxinferError for bad input): this request fails, alone, unqueued
                error = str(e) if isinstance(e, JaxinferError) else f"{type(e).__name__}: {e}"
                self.conn.send(("refused", rid, error))
                return
            self.open[rid] = _Open(req, StreamText(req))
        elif kind == "cancel":
            o = self.open.pop(msg[1], None)
            if o is not None:
                self.engine.cancel(o.req)  # frees its pages now; the server has stopped listening
        else:
            log.error("replica worker: unknown message %r", kind)

    def _collect(self, events: list) -> None:
        """The new text and tokens of each open request since the last step; finished ones leave."""
        for rid, o in list(self.open.items()):
            row = o.req.row
            sent = o.text.ids
            try:
                item = o.text.next(row)
            except Exception as e:  # its text could not be made: it fails, alone
                self.engine.fail(o.req, e)
                item = o.text.error(row)
            if item is None:
                continue
            if isinstance(item, BaseException):
                events.append((rid, "", [], None, "error", row.error or str(item)))
                del self.open[rid]
                continue
            logprobs = row.logprobs[sent : sent + len(item.token_ids)] if o.req.params.logprobs else None
            events.append((rid, item.text, list(item.token_ids), logprobs, item.finish_reason, None))
            if item.finish_reason is not None:
                del self.open[rid]

    def stats(self) -> dict:
        """What the heartbeat reports: the engine's own figures (Engine.stats)."""
        return self.engine.stats()


# --- the server side -----------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Replica:
    id: int
    env: dict[str, str]
    proc: multiprocessing.Process | None = None
    conn: object = None
    state: str = "stopped"  # "starting" | "up" | "down" | "stopped"
    detail: str = "not started"
    stats: dict = dataclasses.field(default_factory=dict)
    ready: asyncio.Future | None = None
    fatal: str | None = None  # the worker's last words, if it sent any
    death: str = ""  # how its last worker ended
    beat: float = 0.0  # when its last stats came (time.monotonic)
    restarts: int = 0
    restarter: asyncio.Task | None = None


@dataclasses.dataclass(eq=False)
class _Flight:
    req: GenRequest
    queue: asyncio.Queue  # Events for the consumer (or the JaxinferError of a refused request)
    replica: int | None = None
    streamed: bool = False  # a token went to the consumer: the request can no longer move
    died_on: list[int] = dataclasses.field(default_factory=list)  # replicas that died under it


class ReplicaPool:
    """`replicas` copies of `jaxinfer.LLM(**model_kwargs)`, each in its own worker process on
    `devices_per_replica` devices (default: what its mesh needs), behind a load- and prefix-aware
    router (router.py). Implements the serving Backend: start, generate, health, stats, drain, close.

    max_queue: how many requests may wait beyond those the replicas that are up run at once
    (max_num_seqs each); past it `generate` raises Overloaded. None: no bound.
    restart: restart a worker that dies. start_timeout_s bounds a worker's start (model load and, with
    `warmup`, compiling every step shape ahead of traffic: minutes on CPU, so off by default, as in the
    one-engine backend; shapes compile on first use and land in the persistent compilation cache, so a
    restarted worker finds them there). max_retries: how often a request that had
    streamed nothing moves to another replica when its own dies. router_options go to Router.

    Workers are started with multiprocessing's "spawn", which imports the main module again in each:
    a script that makes a pool must keep its own work under `if __name__ == "__main__":` (as
    `python -m jaxinfer serve` does).
    """

    def __init__(
        self,
        model_kwargs: dict,
        replicas: int,
        devices_per_replica: int | None = None,
        *,
        max_queue: int | None = None,
        restart: bool = True,
        start_timeout_s: float = 900.0,
        warmup: bool = False,
        max_retries: int = 2,
        router_options: dict | None = None,
    ):
        from jaxinfer import checkpoint

        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise JaxinferError(f"replicas={replicas!r} must be a positive integer")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
            raise JaxinferError(f"max_queue={max_queue!r} must be an integer >= 0, or None for no bound")
        self.model_kwargs = dict(model_kwargs)
        self.model_kwargs.setdefault("model", "smollm2-135m")
        self.model_name = str(self.model_kwargs["model"])
        source = checkpoint.resolve(self.model_name)  # config and tokenizer only: the workers read the weights
        self.tokenizer = source.tokenizer
        self.vocab_size = source.config.vocab_size
        self.max_seq_len = self.model_kwargs.get("max_seq_len") or source.config.max_position_embeddings
        self.eos_token_ids = source.config.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.max_queue = max_queue
        per = devices_per_replica or mesh_size(self.model_kwargs)
        self.devices_per_replica = per
        self.restart = restart
        self.start_timeout_s = start_timeout_s
        self.warmup = warmup
        self.max_retries = max_retries
        self.router = Router(replicas, **(router_options or {}))
        for i in range(replicas):
            self.router.set_up(i, False)
        self._replicas = [_Replica(i, env) for i, env in enumerate(device_envs(replicas, per))]
        self._flights: dict[str, _Flight] = {}
        self._ctx = multiprocessing.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts every worker and waits until all are ready; raises JaxinferError (and stops them all)
        when one cannot start."""
        self._loop = asyncio.get_running_loop()
        for rep in self._replicas:
            self._spawn(rep)
        try:
            await asyncio.wait_for(asyncio.gather(*(rep.ready for rep in self._replicas)), timeout=self.start_timeout_s)
        except BaseException as e:
            await self.close()
            if isinstance(e, TimeoutError):
                slow = [r.id for r in self._replicas if not r.ready.done()]
                raise JaxinferError(
                    f"replicas {slow} were not ready after {self.start_timeout_s:g}s; raise start_timeout_s"
                ) from None
            raise

    def _spawn(self, rep: _Replica) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, rep.id, self.model_kwargs, rep.env, self.warmup, logging.getLogger().getEffectiveLevel()),
            name=f"jaxinfer-replica-{rep.id}",
            daemon=True,  # never outlives the server
        )
        proc.start()
        child.close()  # only the worker holds its end now, so its exit is our end-of-file
        rep.proc, rep.conn, rep.fatal, rep.stats = proc, parent, None, {}
        rep.state, rep.detail = "starting", f"starting (pid {proc.pid})"
        rep.ready = self._loop.create_future()
        rep.ready.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)  # (retrieved)
        self._loop.add_reader(parent.fileno(), self._readable, rep, parent)

    async def _restart(self, rep: _Replica, dead: multiprocessing.Process | None) -> None:
        """Restarts a dead worker until one comes up, backing off after failed starts."""
        if dead is not None:
            await asyncio.to_thread(dead.join, STOP_WAIT_S)
            if dead.is_alive():
                dead.kill()
                await asyncio.to_thread(dead.join, STOP_WAIT_S)
        fails = 0
        while not (self._closed or self._draining):
            await asyncio.sleep(min(30.0, 0.5 * 2**fails))
            if self._closed or self._draining:
                return
            rep.restarts += 1
            log.warning("restarting replica %d (restart %d)", rep.id, rep.restarts)
            self._spawn(rep)
            rep.detail = f"restarting (pid {rep.proc.pid}, restart {rep.restarts}) after: {rep.death}"
            try:
                await asyncio.wait_for(asyncio.shield(rep.ready), timeout=self.start_timeout_s)
                return
            except (TimeoutError, JaxinferError) as e:
                fails += 1
                log.error("replica %d did not restart: %s", rep.id, e)
                await self._stop_worker(rep, kill=True)
                rep.state, rep.detail = "down", f"restart {rep.restarts} failed: {e}; retrying"

    async def drain(self, timeout_s: float) -> None:
        """Stops admitting (generate raises Draining), waits up to `timeout_s` for the requests in flight,
        ends those still open with an error, and stops the workers."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._flights:
            log.warning("drain: %d requests still open after %.1fs; ending them", len(self._flights), timeout_s)
        await self.close()

    async def close(self) -> None:
        """Stops every worker (a stop message, then terminate, then kill) and ends what is open."""
        self._draining = self._closed = True
        for rep in self._replicas:
            if rep.restarter is not None:
                rep.restarter.cancel()
            if rep.ready is not None and not rep.ready.done():  # a start() waiting on it returns now
                rep.ready.set_exception(Draining(f"replica {rep.id} was stopped before it was ready"))
        await asyncio.gather(*(self._stop_worker(rep) for rep in self._replicas))
        for f in list(self._flights.values()):
            self._end(f, "the server is shutting down", None)

    async def _stop_worker(self, rep: _Replica, kill: bool = False) -> None:
        """Stops `rep`'s worker: one that is up gets a stop message and STOP_WAIT_S to exit (it cancels
        what it holds); one still starting (it reads no messages yet) is terminated; then killed."""
        proc, conn, polite = rep.proc, rep.conn, rep.state == "up" and not kill
        if self._closed:
            rep.state = "stopped"
        self._drop_conn(rep)
        if proc is not None:
            if polite:
                try:
                    conn.send(("stop",))
                except OSError:
                    pass
                await asyncio.to_thread(proc.join, STOP_WAIT_S)
            for end in (proc.kill,) if kill else (proc.terminate, proc.kill):
                if proc.is_alive():
                    end()
                    await asyncio.to_thread(proc.join, STOP_WAIT_S)
        if conn is not None:
            conn.close()
        if self._closed:
            rep.detail = "stopped"
        rep.proc = None

    def _drop_conn(self, rep: _Replica) -> None:
        if rep.conn is not None:
            try:
                self._loop.remove_reader(rep.conn.fileno())
            except (OSError, ValueError):
                pass
        rep.conn = None

    # --- messages from workers -------------------------------------------------------------------

    def _readable(self, rep: _Replica, conn) -> None:
        if rep.conn is not conn:  # a stale callback of a connection already dropped
            return
        while True:
            try:
                if not conn.poll():
                    return
                msg = conn.recv()
            except (EOFError, OSError):
                self._lost(rep)
                return
            self._on_message(rep, msg)
            if rep.conn is not conn:
                return

    def _on_message(self, rep: _Replica, msg: tuple) -> None:
        kind = msg[0]
        if kind == "events":
            for rid, text, token_ids, logprobs, finish, error in msg[1]:
                f = self._flights.get(rid)
                if f is None or f.replica != rep.id:
                    continue  # cancelled, or moved to another replica
                if token_ids:
                    f.streamed = True
                    self.router.progress(rid, len(token_ids))
                if finish is not None:
                    self.router.finish(rid)
                    del self._flights[rid]
                f.queue.put_nowait(
                    Event(
                        text=text,
                        token_ids=token_ids,
                        logprobs=logprobs,
                        top_logprobs=None,
                        finish_reason=finish,
                        error=error,
                        replica=rep.id,
                    )
                )
        elif kind == "refused":  # the engine's own checks turned it down; nothing was queued
            _, rid, error = msg
            f = self._flights.get(rid)
            if f is not None and f.replica == rep.id:
                self.router.finish(rid)
                del self._flights[rid]
                f.queue.put_nowait(JaxinferError(error))
        elif kind == "stats":
            rep.stats, rep.beat = msg[1], time.monotonic()
        elif kind == "ready":
            info = msg[1]
            rep.stats = {k: v for k, v in info.items() if k not in ("pid", "devices")}
            rep.state, rep.detail = "up", f"up (pid {info['pid']}, devices {', '.join(info['devices'])})"
            rep.beat = time.monotonic()
            self.router.set_up(rep.id, True)
            self.router.set_capacity(rep.id, info["kv_pages_total"] * info["page_size"] // BLOCK)
            log.info("replica %d: %s", rep.id, rep.detail)
            if not rep.ready.done():
                rep.ready.set_result(None)
        elif kind == "fatal":
            rep.fatal = msg[1]
            log.error("replica %d %s", rep.id, msg[1])
        else:
            log.error("replica %d sent an unknown message %r", rep.id, kind)

    def _lost(self, rep: _Replica) -> None:
        """The worker's pipe closed: it exited or was killed."""
        proc = rep.proc
        self._drop_conn(rep)
        if self._closed:
            return
        was = rep.state
        rep.state = "down"
        self.router.set_up(rep.id, False)
        how = rep.fatal or "its pipe closed"
        if proc is not None:
            proc.join(timeout=0.2)  # it has closed its end, so it is exiting (_restart waits for the rest)
            how = rep.fatal or _exit_text(proc.exitcode)
        rep.detail = f"replica {rep.id} (pid {proc.pid if proc else '?'}) {how} at {time.strftime('%H:%M:%S')}"
        rep.death = rep.detail
        log.error("%s; %d requests in flight there", rep.detail, len(self.router.flights_on(rep.id)))
        for rid in self.router.flights_on(rep.id):
            f = self._flights.get(rid)
            self.router.finish(rid)
            if f is None:
                continue
            f.died_on.append(rep.id)
            if not f.streamed and len(f.died_on) <= self.max_retries and not self._closed:
                f.replica = None
                self._loop.create_task(self._dispatch(f))
            else:
                why = "it had streamed already" if f.streamed else f"it was retried {self.max_retries} times"
                self._end(f, f"{rep.detail} while running this request ({why})", rep.id)
        if rep.ready is not None and not rep.ready.done():
            rep.ready.set_exception(JaxinferError(f"{rep.detail} before it was ready"))
        if was == "up" and self.restart and not self._draining:
            rep.detail += "; restarting"
            rep.restarter = self._loop.create_task(self._restart(rep, proc))

    # --- requests --------------------------------------------------------------------------------

    async def generate(self, req: GenRequest):
        """The Events of one request, the last with its finish_reason ("error" with `error` when it
        failed). On first iteration raises Draining, Overloaded or Unavailable (no replica is up) before
        taking it, and JaxinferError when the engine refuses it (nothing was queued: the message says
        why). Closing the iterator early cancels it."""
        if self._draining:
            raise Draining("the server is shutting down and takes no new requests")
        if not any(r.state == "up" for r in self._replicas):
            down = "; ".join(r.detail for r in self._replicas)
            raise Unavailable(f"no replica is up to take a request ({down}); retry later")
        if req.request_id in self._flights:
            raise JaxinferError(f"request id {req.request_id!r} is in flight already")
        if self.max_queue is not None:
            slots = sum(r.stats.get("max_num_seqs", 0) for r in self._replicas if r.state == "up")
            if len(self._flights) >= slots + self.max_queue:
                raise Overloaded(
                    f"{len(self._flights)} requests are in flight, {slots} running at most and max_queue="
                    f"{self.max_queue} waiting; retry later"
                )
        f = _Flight(req, asyncio.Queue())
        self._flights[req.request_id] = f
        try:
            await self._dispatch(f)
        except BaseException:  # left (or failed) before it reached a replica: nothing must stay behind
            self._abandon(f)
            raise
        async with contextlib.aclosing(drain(f.queue, lambda: self._abandon(f))) as events:
            async for ev in events:
                yield ev

    async def _dispatch(self, f: _Flight) -> None:
        """Routes `f` to a replica (preferring ones it has not died on) and submits it; waits for a
        replica to come up when none is, up to start_timeout_s."""
        deadline = time.monotonic() + self.start_timeout_s
        while self._flights.get(f.req.request_id) is f:
            ids = f.req.prompt_ids
            choice = self.router.choose(ids, exclude=set(f.died_on)) or self.router.choose(ids)
            if choice is not None:
                rep = self._replicas[choice.replica]
                self.router.assign(f.req.request_id, rep.id, ids, f.req.params.max_tokens, choice.matched_tokens)
                f.replica = rep.id
                # A broken pipe shows up as the reader's end-of-file, which retries `f` from there.
                self._send(rep, ("submit", f.req.request_id, ids, f.req.params))
                return
            if time.monotonic() > deadline or self._closed:
                self._end(f, "no replica is up to take this request", None)
                return
            await asyncio.sleep(0.1)

    def _send(self, rep: _Replica, msg: tuple) -> None:
        if rep.conn is None:
            return
        try:
            rep.conn.send(msg)
        except OSError as e:
            log.warning("replica %d: send failed (%s); waiting for its end", rep.id, e)

    def _abandon(self, f: _Flight) -> None:
        """The consumer left before the last event: cancel the request where it runs."""
        rid = f.req.request_id
        if self._flights.get(rid) is not f:
            return
        del self._flights[rid]
        self.router.finish(rid)
        if f.replica is not None:
            self._send(self._replicas[f.replica], ("cancel", rid))

    def _end(self, f: _Flight, error: str, replica: int | None) -> None:
        """Ends `f` with an error event (its consumer reads it as the last one)."""
        rid = f.req.request_id
        if self._flights.get(rid) is f:
            del self._flights[rid]
        self.router.finish(rid)
        f.queue.put_nowait(
            Event(
                text="",
                token_ids=[],
                logprobs=None,
                top_logprobs=None,
                finish_reason="error",
                error=error,
                replica=replica if replica is not None else (f.died_on or [f.replica or 0])[-1],
            )
        )

    # --- state -----------------------------------------------------------------------------------

    def health(self) -> dict:
        """Each replica up or not, with what it is doing or how it ended. A worker that is up but has
        not sent its stats for STALE_S says so in its detail (one step compiling a new shape, or hung):
        it stays up, since only its process ending is certain."""
        reps = []
        for r in self._replicas:
            detail, quiet = r.detail, time.monotonic() - r.beat
            if r.state == "up" and quiet > STALE_S:
                detail += f"; no heartbeat for {quiet:.0f}s"
            reps.append({"id": r.id, "up": r.state == "up", "detail": detail})
        return {"ok": all(r["up"] for r in reps), "replicas": reps}

    def stats(self) -> list[dict]:
        out = []
        for r in self._replicas:
            s = {"running": 0, "waiting": 0, "kv_pages_used": 0, "kv_pages_total": 0, "prefix_cache_hit_rate": 0.0}
            s.update({k: r.stats[k] for k in s if k in r.stats})
            s.update(id=r.id, up=r.state == "up", in_flight=self.router.in_flight(r.id))
            s["outstanding_tokens"] = self.router.load(r.id)
            out.append(s)
        return out

    def pids(self) -> list[int | None]:
        """The worker process of each replica (None while it has none)."""
        return [r.proc.pid if r.proc is not None else None for r in self._replicas]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "closed its pipe and is still exiting"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"was killed by signal {-code} (exit code {code})"
    return f"exited with code {code}"
