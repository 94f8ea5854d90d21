"""Joining a multi-process run: from explicit flags, or from the cluster environment JAX detects."""

from __future__ import annotations

import logging
import os
import secrets

import jax
import numpy as np

from jaxinfer.errors import JaxinferError

log = logging.getLogger(__name__)

# Variables by which JAX's cluster detection recognises SLURM, Open MPI and a Kubernetes indexed Job.
CLUSTER_VARIABLES = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JOB_COMPLETION_INDEX")
HEARTBEAT_TIMEOUT_S = 15  # a dead peer is noticed within this; collectives then fail instead of hanging
_joined = False


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Starts jax.distributed when asked to (or when a cluster launched us); returns whether it did."""
    if coordinator_address is None and (num_processes, process_id) != (None, None):
        raise JaxinferError("--num_processes/--process_id need --coordinator_address=HOST:PORT too")
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise JaxinferError("--coordinator_address needs --num_processes and --process_id too")
    if coordinator_address is None and not any(v in os.environ for v in CLUSTER_VARIABLES):
        return False
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise JaxinferError(f"--process_id={process_id} must be in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
    global _joined
    _joined = True
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=30,
    )
    log.info(
        "process %d of %d; %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def joined() -> bool:
    """Whether this process is one of a multi-process run (without starting jax's backend)."""
    return _joined


def draw_seed() -> int:
    """A fresh 63-bit seed, process 0's on every process of a multi-process run, so that all run the
    same schedule."""
    seed = secrets.randbits(63)
    if not _joined:  # (asking jax.process_count() would start the backend before the mesh sizes it)
        return seed
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(seed)))


def min_over_processes(value: int) -> int:
    """The smallest of every process's `value` in a multi-process run (a collective: all must call it)."""
    if not _joined:
        return value
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(value))))
