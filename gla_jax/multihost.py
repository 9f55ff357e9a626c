"""Runs of several processes (hosts): joining them, and the per-host data position.

Each host feeds only its own rows, so each has its own data-iterator position; a checkpoint keeps
all of them (gathered onto the primary host, which writes the JSON item) and a resumed host takes
its own back. The mesh may change between runs; the number of hosts may not.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging


def maybe_initialize_distributed(config) -> None:
    """Joins a multi-process run when asked to, or when a launcher's environment says so."""
    mode = config.multihost
    env_says = (
        any(
            os.environ.get(name)
            for name in (
                "JAX_COORDINATOR_ADDRESS",
                "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS",
            )
        )
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )
    # A coordinator address in the config asks for a multi-process run as the launcher's does.
    env_says = env_says or bool(config.coordinator_address)
    if mode == "off" or (mode == "auto" and not env_says):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if config.coordinator_address:
        kwargs = dict(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d", jax.process_index(), jax.process_count())


def gather_data_states(state: dict) -> dict:
    """Every host's loader position, gathered so that the one JSON item holds them all (only
    the primary host writes it)."""
    if jax.process_count() == 1:
        return {"per_process": [state]}
    from jax.experimental import multihost_utils  # noqa: PLC0415

    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return {
        "per_process": [
            json.loads(bytes(row[: int(n)]).decode())
            for row, n in zip(gathered, lengths.reshape(-1), strict=True)
        ]
    }


def this_process_data_state(saved: dict) -> dict:
    states = saved["per_process"]
    if len(states) != jax.process_count():
        raise ValueError(
            f"the checkpoint's data position was saved by {len(states)} processes but "
            f"{jax.process_count()} are running: resume with the same number of hosts (the mesh "
            "may differ)"
        )
    return states[jax.process_index()]
