"""Orbax checkpoints of the whole training state, saved asynchronously, restored onto any mesh.

One checkpoint holds two items:
  'state': a pytree of arrays (parameters, optimizer state, step, RNG key data),
  'data':  the input iterator's state as JSON, so a resumed run sees exactly the batches an
           uninterrupted one would have seen.

Every restore names the shardings it wants (Orbax would otherwise recreate the saved ones, which
fails on any other device count): the trainer gives its whole state's, and readers of a run
(evaluation, sampling) read the parameters alone onto the devices they have.

Orbax writes each step into a temporary directory and renames it only once every item is complete,
so a save cut off mid-write (kill -9, power loss) is never listed as a step and never restored.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
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
        if keep_period is not None and keep_period < 0:
            raise ValueError(f"config.keep_period must be >= 0 (0: off), got {keep_period}")
        if "://" in directory:  # os.path would turn gs://... into a local folder
            raise ValueError(
                f"checkpoints go to a local or mounted path, got {directory!r} (mount the bucket "
                "and pass its path)"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = os.path.abspath(directory)
        # The PyTree handler (rather than the Standard one, which writes the same files) can
        # restore part of a tree: readers of a run skip the optimizer state.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Starts saving (returns at once when asynchronous). Refuses a non-finite state."""
        if not tree_is_finite(state):
            raise FloatingPointError(f"refusing to checkpoint a non-finite state at step {step}")
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state):
        """Restores (state, data_state); ``abstract_state`` gives shapes, dtypes and shardings."""
        args = ocp.args.Composite(
            state=_restore_args(abstract_state, partial=False), data=ocp.args.JsonRestore()
        )
        with self._readable(step):
            restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def restore_params(self, step: int, sharding: jax.sharding.Sharding):
        """The 'state' item's ``params`` alone, every array placed with ``sharding`` whatever
        mesh saved it; the tree keeps the checkpoint's keys (integer keys come back as strings)."""
        with self._readable(step):
            saved_params = self._manager.item_metadata(step)["state"]["params"]
            target = {"params": _abstract_arrays(saved_params, sharding)}
            args = ocp.args.Composite(state=_restore_args(target, partial=True))
            return self._manager.restore(step, args=args)["state"]["params"]

    @contextlib.contextmanager
    def _readable(self, step: int):
        """Orbax reports a step folder that lacks its items (an interrupted copy, outside
        damage) as a KeyError naming neither step nor folder."""
        try:
            yield
        except KeyError as err:
            raise FileNotFoundError(
                f"checkpoint step {step} in {self.directory} cannot be read ({err}): an incomplete "
                "step folder; move it aside to resume from the step before"
            ) from err

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract_arrays(array_metadata, sharding: jax.sharding.Sharding):
    """ShapeDtypeStructs of the saved arrays (Orbax metadata), each with ``sharding``."""
    return jax.tree.map(
        lambda saved: jax.ShapeDtypeStruct(saved.shape, saved.dtype, sharding=sharding),
        array_metadata,
    )


def _restore_args(abstract_tree, *, partial: bool) -> ocp.args.PyTreeRestore:
    """Restores ``abstract_tree``'s arrays with its shardings; ``partial``: the checkpoint may
    hold more, which is left unread."""
    return ocp.args.PyTreeRestore(
        item=abstract_tree,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
        partial_restore=partial,
    )


def all_finite(tree) -> jax.Array:
    """True when every floating-point value in ``tree`` is finite (a traceable reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.asarray(True)]))


def tree_is_finite(tree) -> bool:
    """One program over the whole tree (not one per leaf: many small collective programs in
    flight at once can stall the CPU's simulated devices)."""
    return bool(jax.device_get(_all_finite_program(tree)))


_all_finite_program = jax.jit(all_finite)
