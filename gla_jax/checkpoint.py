"""Orbax checkpoints of the whole training state, saved asynchronously, restored onto any mesh.

One checkpoint holds two items:
  'state': a pytree of arrays (parameters, optimizer state, step, RNG key data),
  'data':  the input iterator's state as JSON, so a resumed run sees exactly the batches an
           uninterrupted one would have seen.

Orbax writes each step into a temporary directory and renames it only once every item is complete,
so a save cut off mid-write (kill -9, power loss) is never listed as a step and never restored.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for (state, data-iterator state) pairs."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"config.keep_checkpoints must be >= 1, got {keep}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state, data_state: dict, *, force: bool = False, finite: bool | None = None
    ) -> bool:
        """Starts saving (returns at once when asynchronous). Refuses a non-finite state.

        ``finite``: whether every float in ``state`` is finite, when the caller already knows
        (the train step computes it in the same program, so no extra collective is launched).
        """
        if finite is None:
            finite = tree_is_finite(state)
        if not finite:
            raise FloatingPointError(f"refusing to checkpoint a non-finite state at step {step}")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state):
        """Restores (state, data_state); ``abstract_state`` gives shapes, dtypes and shardings."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def restore_item(self, step: int, item: str, args):
        return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def tree_is_finite(tree) -> bool:
    """One program over the whole tree (not one per leaf: many small collective programs in
    flight at once can stall the CPU's simulated devices)."""
    return bool(jax.device_get(_all_finite(tree)))


@jax.jit
def _all_finite(tree):
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, np.floating)]
    result = jax.numpy.asarray(True)
    for x in leaves:
        result = result & jax.numpy.all(jax.numpy.isfinite(x))
    return result
