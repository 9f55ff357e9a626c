import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gla_jax import sharding


@pytest.mark.parametrize(
    "spec, devices, expected",
    [
        ("2,2,2", 8, (2, 2, 2)),
        ("-1,1,1", 8, (8, 1, 1)),
        ("1,-1,2", 8, (1, 4, 2)),
        ([1, 1, 1], 1, (1, 1, 1)),
    ],
)
def test_parse_mesh_shape(spec, devices, expected):
    assert sharding.parse_mesh_shape(spec, devices) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("2,2", "needs 3 sizes"),
        ("2,2,1", "has 4 devices but 8"),
        ("3,-1,1", "do not divide"),
        ("a,b,c", "integers"),
        ("-1,-1,2", "positive"),
        ("0,1,1", "positive"),
    ],
)
def test_bad_mesh_specs_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_shape(spec, 8)


class _FakeMesh:
    """Only .shape is read by the logical-axis mapping."""

    def __init__(self, **shape):
        self.shape = shape


def test_logical_axes_map_to_mesh_and_respect_divisibility():
    mesh = _FakeMesh(data=2, fsdp=2, tensor=4)
    spec = sharding.logical_to_mesh_spec(P("embed", "mlp"), (64, 128), mesh)
    assert spec == P("fsdp", "tensor")
    # 6 heads do not divide over 4 tensor devices: that dimension stays replicated.
    assert sharding.logical_to_mesh_spec(P("embed", "heads"), (64, 6), mesh) == P("fsdp", None)
    # Unknown names and unsharded mesh axes replicate.
    assert sharding.logical_to_mesh_spec(P("norm"), (64,), mesh) == P(None)
    assert sharding.logical_to_mesh_spec(
        P("embed"), (64,), _FakeMesh(data=8, fsdp=1, tensor=1)
    ) == P(None)
    # A mesh axis is used once per array.
    assert sharding.logical_to_mesh_spec(P("mlp", "vocab"), (8, 8), mesh) == P("tensor", None)


def test_make_mesh_uses_all_devices():
    mesh = sharding.make_mesh("-1,1,1")
    assert isinstance(mesh, Mesh) and mesh.devices.size == jax.device_count()
    assert mesh.axis_names == sharding.MESH_AXES
    assert np.prod(list(mesh.shape.values())) == jax.device_count()
