"""The public op names: ``from gla_jax.ops import chunk_gla, fused_recurrent_gla``.

Under a mesh (``with jax.set_mesh(mesh):``, as the trainer traces its step) ``chunk_gla`` runs its
kernel inside ``jax.shard_map``: each device computes its own rows (over the mesh's 'data' and
'fsdp' axes) and heads (over 'tensor'). A Pallas kernel is one opaque custom call that XLA's
partitioner cannot split, so without this every device would gather the whole batch. Outside a
mesh, or on a single device, it is the plain op.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

from pallas_kernels.gla import api
from pallas_kernels.gla.api import BACKENDS, DEFAULT_CHUNK_SIZE, fused_recurrent_gla

__all__ = ["BACKENDS", "DEFAULT_CHUNK_SIZE", "chunk_gla", "fused_recurrent_gla"]

_ROW_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def _split_axes(mesh, size: int, axes: tuple[str, ...]):
    """The mesh axes (a subset of ``axes``, in order) over which ``size`` items divide evenly."""
    chosen = []
    for axis in axes:
        if axis in mesh.shape and mesh.shape[axis] > 1:
            if size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]) == 0:
                chosen.append(axis)
    return tuple(chosen)


def _mesh_plan(q, cu_seqlens):
    """(mesh, row axes, head axes) when the op should run per shard, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or getattr(mesh, "manual_axes", ()):
        return None  # no mesh, or already inside a shard_map
    batch, _, heads, _ = q.shape
    rows = () if cu_seqlens is not None else _split_axes(mesh, batch, _ROW_AXES)
    head_axes = _split_axes(mesh, heads, (_HEAD_AXIS,))
    if not rows and not head_axes:
        return None
    return mesh, rows, head_axes


def chunk_gla(
    q, k, v, g, *, initial_state=None, output_final_state=False, cu_seqlens=None, **options
):
    """``pallas_kernels.gla.api.chunk_gla``, split over the current mesh when there is one."""
    plan = _mesh_plan(q, cu_seqlens) if hasattr(q, "shape") and getattr(q, "ndim", 0) == 4 else None
    if plan is None:
        return api.chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            **options,
        )
    # Inside shard_map the op sees a shard's shapes and a traced cu_seqlens, so it checks here
    # first, on the caller's arrays.
    api.check_arguments(q, k, v, g, initial_state, cu_seqlens)
    mesh, rows, head_axes = plan
    row_spec = rows if rows else None
    head_spec = head_axes if head_axes else None
    token_spec = PartitionSpec(row_spec, None, head_spec, None)
    state_spec = PartitionSpec(None if cu_seqlens is not None else row_spec, head_spec, None, None)

    def local(q, k, v, g, initial_state, cu_seqlens):
        return api.chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=initial_state,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
            **options,
        )

    # An absent initial state stays None (made inside the op's custom VJP, not kept as a
    # residual); its spec then covers no array.
    sharded = jax.shard_map(
        local,
        in_specs=(
            token_spec,
            token_spec,
            token_spec,
            token_spec,
            state_spec,
            None if cu_seqlens is None else PartitionSpec(),
        ),
        out_specs=(token_spec, state_spec),
        check_vma=False,
    )
    arrays = (q, k, v, g, initial_state)
    specs = (token_spec,) * 4 + (state_spec,)
    if _has_explicit_axes(mesh):
        # shard_map takes arrays on explicit mesh axes only as they are laid out already; on
        # automatic axes it moves them itself.
        arrays = [
            a if a is None else jax.sharding.reshard(a, spec)
            for a, spec in zip(arrays, specs, strict=True)
        ]
    o, final_state = sharded(*arrays, cu_seqlens)
    return o, (final_state if output_final_state else None)


def _has_explicit_axes(mesh) -> bool:
    return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
