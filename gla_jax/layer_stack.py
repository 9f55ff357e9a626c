"""Layers stacked on a leading axis: built with ``nnx.vmap``, applied with ``nnx.scan``.

A model of L identical blocks can hold them as a list (unrolled: XLA sees L copies of every fusion
and kernel call) or as one block whose parameters all lead with an [L] axis, applied by a scan (XLA
compiles the block once). Both layouts run through one calling convention,

    x, outputs = apply(step, blocks, x, per_layer, shared)
    step(block, x, layer_input, shared) -> (x, layer_output)

where ``per_layer`` holds one input per layer (a tuple when unrolled, arrays leading with L when
stacked, or None) and ``outputs`` comes back the same way. The stacked axis carries the logical
name ``LAYER_AXIS``, which the sharding rules keep replicated.

Parameter trees differ between the layouts ('blocks/0/attn/...' vs 'blocks/attn/...' of shape
[L, ...]); ``stack_layer_params`` and ``unstack_layer_params`` convert pure dicts between them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_AXIS = "layers"
_LAYER_METADATA = {nnx.PARTITION_NAME: LAYER_AXIS}


def stacked_modules(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs):
    """``count`` modules from ``make(rngs)`` as one, each parameter with a leading [count] axis
    named LAYER_AXIS; every layer draws its own initial values."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYER_METADATA)
    def make_stacked(rngs):
        return make(rngs)

    return make_stacked(rngs)


def apply_stacked(step, blocks: nnx.Module, x, per_layer, shared):
    """x through stacked blocks in order (the module doc's convention); outputs stacked.

    The blocks are only read, so the scan need not write graph updates back; without them it
    also runs inside other traces that close over the model (generate's decode while_loop),
    which the graph-updating form refuses.
    """
    scanned = nnx.scan(
        lambda x, block, layer_input, shared: step(block, x, layer_input, shared),
        in_axes=(nnx.Carry, 0, 0, None),
        out_axes=(nnx.Carry, 0),
        graph_updates=False,
    )
    return scanned(x, _one_layer_metadata(blocks), per_layer, shared)


def _one_layer_metadata(blocks):
    """A copy of the stacked blocks whose variables' sharding names drop the layer axis, as
    each layer's slice inside the scan has none."""
    blocks = nnx.clone(blocks)
    nnx.spmd.remove_axis(nnx.state(blocks), 0, _LAYER_METADATA)
    return blocks


def apply_unrolled(step, blocks, x, per_layer, shared):
    """The unrolled counterpart of ``apply_stacked``: per_layer and the outputs are tuples."""
    per_layer = (None,) * len(blocks) if per_layer is None else per_layer
    outputs = []
    for block, layer_input in zip(blocks, per_layer, strict=True):
        x, output = step(block, x, layer_input, shared)
        outputs.append(output)
    return x, tuple(outputs)


def repeat_layers(tree, count: int):
    """Every array of ``tree`` repeated along a new leading [count] axis (one copy per layer)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), tree)


def layer_slice_shapes(stacked) -> tuple[int, object]:
    """(layer count, the tree of one layer's ShapeDtypeStructs) of a stacked tree.

    ValueError when its arrays disagree on the leading (layer) axis.
    """
    depths = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(stacked)}
    if len(depths) != 1 or None in depths:
        raise ValueError(f"stacked arrays disagree on the layer count: {sorted(depths, key=str)}")
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
    return depths.pop(), one


# --------------------------------------------------------------------------------------------
# Parameter layouts
# --------------------------------------------------------------------------------------------


def _stack(arrays):
    # numpy stays numpy: the converter keeps tensors on the host until the model takes them.
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    return jnp.stack(arrays)


def stack_layer_params(params: dict, key: str = "blocks") -> dict:
    """Pure params of an unrolled model -> the same weights in the stacked layout.

    ``params`` is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (or gradients shaped like
    it); ``params[key]`` maps layer indices (ints, or strings after a checkpoint) to block trees.
    """
    blocks = params[key]
    indices = sorted(blocks, key=int)
    if [int(i) for i in indices] != list(range(len(indices))):
        raise ValueError(f"params[{key!r}] must hold layers 0..{len(indices) - 1}, got {indices}")
    layers = [blocks[index] for index in indices]
    return {**params, key: jax.tree.map(lambda *xs: _stack(xs), *layers)}


def unstack_layer_params(params: dict, key: str = "blocks") -> dict:
    """The inverse of ``stack_layer_params``: stacked ``params[key]`` -> {0: block, 1: ...}."""
    count, _ = layer_slice_shapes(params[key])
    blocks = params[key]
    return {**params, key: {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(count)}}
