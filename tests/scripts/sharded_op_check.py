"""Run with 8 host devices: gla_jax.ops.chunk_gla under a (2, 2, 2) mesh equals the plain op."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from gla_jax import ops
from gla_jax.sharding import MESH_AXES, make_mesh
from pallas_kernels.gla import api

backend, interpret = sys.argv[1], sys.argv[2] == "1"
assert jax.device_count() == 8
keys = jax.random.split(jax.random.key(0), 6)
B, T, H, K, V = 4, 40, 2, 16, 32
q, k, g = (jax.random.normal(keys[i], (B, T, H, K)) for i in range(3))
g = jax.nn.log_sigmoid(g)
v = jax.random.normal(keys[3], (B, T, H, V))
h0 = jax.random.normal(keys[4], (B, H, K, V))


def loss(op, q, k, v, g, h0, cu=None, keep=False):
    if cu is not None:
        q, k, v, g = (x.reshape((1, -1) + x.shape[2:]) for x in (q, k, v, g))
    o, final = op(
        q,
        k,
        v,
        g,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=cu,
        backend=backend,
        interpret=interpret,
        keep_states=keep,
    )
    return jnp.sum(o * o) + jnp.sum(final * 0.5), (o, final)


def run(op, cu=None, initial=True, keep=False):
    if initial:
        f = lambda *a: loss(op, *a, cu=cu, keep=keep)  # noqa: E731
        args = (q, k, v, g, h0)
    else:  # no initial state: the op starts from zeros it makes itself
        f = lambda *a: loss(op, *a, None, cu=cu, keep=keep)  # noqa: E731
        args = (q, k, v, g)
    grad = jax.value_and_grad(f, argnums=tuple(range(len(args))), has_aux=True)
    return jax.jit(grad)(*args)


# keep: the sharded op's backward reads the states its forward kept (a per-shard residual).
for cu, initial, keep in (
    (None, True, False),
    (jnp.asarray([0, 40, 77, 120, 160], jnp.int32), True, False),
    (None, False, False),
    (jnp.asarray([0, 40, 77, 120, 160], jnp.int32), True, True),
):
    expected = run(api.chunk_gla, cu, initial)
    with jax.set_mesh(make_mesh("2,2,2")):
        actual = run(ops.chunk_gla, cu, initial, keep)
        hlo = jax.jit(lambda *a, cu=cu: loss(ops.chunk_gla, *a, cu=cu)[0]).lower(q, k, v, g, h0)
        hlo = hlo.as_text()
    assert "manual_computation" in hlo, "the op did not run per shard"
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-5, atol=2e-5)


# A mesh of explicit axes (jax.make_mesh's default) takes replicated inputs too: the op lays
# them out as its shard_map expects.
explicit = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 3)
for cu in (None, jnp.asarray([0, 40, 77, 120, 160], jnp.int32)):
    expected = run(api.chunk_gla, cu)
    with jax.set_mesh(explicit):
        actual = run(ops.chunk_gla, cu)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=2e-5, atol=2e-5)


# Bad arguments under the mesh are reported as the caller passed them, not per shard.
def bad_call_error(q_, k_, v_, g_, h0_=None, cu=None):
    try:
        ops.chunk_gla(
            q_, k_, v_, g_, initial_state=h0_, cu_seqlens=cu, backend=backend, interpret=interpret
        )
    except ValueError as err:
        return str(err)
    raise AssertionError("a bad call ran")


packed = [x.reshape((1, -1) + x.shape[2:]) for x in (q, k, v, g)]
with jax.set_mesh(make_mesh("2,2,2")):
    for cu in ([0, 5, 50], [0, 50, 5, B * T]):
        assert "cu_seqlens must start at 0, end at T = 160" in bad_call_error(
            *packed, cu=jnp.asarray(cu, jnp.int32)
        )
    assert f"[B, T, H] = (4, {T}, 2), got (2, {T}, 2, 32)" in bad_call_error(q, k, v[:2], g)
    assert "(4, 2, 16, 32), got (2, 2, 16, 32)" in bad_call_error(q, k, v, g, h0[:2])
print("sharded op ok")
