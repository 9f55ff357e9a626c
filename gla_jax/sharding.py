"""The device mesh and the map from parameters' logical axis names to it.

Mesh axes: ('data', 'fsdp', 'tensor'). The batch is split over ('data', 'fsdp'); parameters are
split FSDP-style over 'fsdp' along their 'embed' axis and Megatron-style over 'tensor' along heads
and the FFN hidden axis. The model only names its axes (see gla_jax/model.py); this file alone
decides where they go.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or None: replicated). Names the model does not list here are
# replicated; a typo therefore costs memory, never correctness.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "norm": None,
    "gate_rank": None,
    "conv": None,
    "layers": None,  # the stacked blocks' axis (scan_layers): the scan walks it on every device
}


def parse_mesh_shape(spec: str | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """'2,2,2' -> (2, 2, 2). One entry may be -1: it takes the devices left over."""
    if isinstance(spec, str):
        try:
            sizes = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"config.mesh must be 'data,fsdp,tensor' integers, got {spec!r}"
            ) from None
    else:
        sizes = [int(s) for s in spec]
    if len(sizes) != 3:
        raise ValueError(f"config.mesh needs 3 sizes (data,fsdp,tensor), got {spec!r}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be positive (one may be -1), got {spec!r}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {spec!r}: {num_devices} devices do not divide by {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {spec!r} has {math.prod(sizes)} devices but {num_devices} are present"
        )
    return tuple(sizes)


def make_mesh(spec: str | Sequence[int], devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = parse_mesh_shape(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh_spec(logical: PartitionSpec, shape, mesh: Mesh, rules=DEFAULT_RULES):
    """Maps one logical PartitionSpec onto the mesh.

    A dimension that the mesh axes do not divide evenly stays replicated, and a mesh axis is used
    at most once per array (the first dimension that asks for it gets it).
    """
    used: set[str] = set()
    out = []
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    for dim, name in zip(shape, names, strict=True):
        axes = rules.get(name) if isinstance(name, str) else None
        axes_tuple = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes_tuple = tuple(a for a in axes_tuple if a not in used and mesh.shape[a] > 1)
        if not axes_tuple or dim % _axis_size(mesh, axes_tuple):
            out.append(None)
            continue
        used.update(axes_tuple)
        out.append(axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
    return PartitionSpec(*out)


def state_shardings(abstract_state, logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a pytree of arrays, from a matching pytree of logical PartitionSpecs."""

    def one(leaf, logical):
        spec = logical_to_mesh_spec(logical, leaf.shape, mesh, rules)
        return NamedSharding(mesh, spec)

    return jax.tree.map(
        one, abstract_state, logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the mesh's batch axes ('data', 'fsdp', those it has), the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
