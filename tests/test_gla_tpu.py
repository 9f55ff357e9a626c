"""The pallas_tpu backend beyond the shared suite (tests/test_gla_ops.py runs every shared case
on it in interpret mode): shapes that only matter for its tiling, what it refuses, that it lowers to
Mosaic, and a run under the TPU-semantics simulator (poisoned memory, race detection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gla_jax.ops import chunk_gla
from pallas_kernels.gla import api, tpu
from tests.gla_oracle import gla_oracle

GRADS = ("dq", "dk", "dv", "dg", "dh0")


def _inputs(batch, seq_len, heads, key_dim, value_dim, num_seqs, seed, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 7)
    q, k, gate_logits = (
        jax.random.normal(keys[i], (batch, seq_len, heads, key_dim)) for i in range(3)
    )
    v = jax.random.normal(keys[3], (batch, seq_len, heads, value_dim))
    g = jax.nn.log_sigmoid(3 * gate_logits)  # strong gates: decays down to ~exp(-10) per step
    h0 = jax.random.normal(keys[4], (num_seqs, heads, key_dim, value_dim))
    do = jax.random.normal(keys[5], v.shape)
    dfinal = jax.random.normal(keys[6], h0.shape)
    q, k, v, do = (x.astype(dtype) for x in (q, k, v, do))
    return q, k, v, g, h0, do, dfinal


def _rel_err(actual, expected):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def _assert_close(actual: dict, expected: dict, tol):
    errors = {key: _rel_err(actual[key], expected[key]) for key in actual}
    bad = {key: err for key, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


# --------------------------------------------------------------------------------------------
# Shapes the shared suite does not reach
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, seq_len, key_dim, value_dim, chunk_size, cu_seqlens, dtype, tol",
    [
        # Head dims over one lane tile and not multiples of it; the largest chunk.
        (1, 200, 160, 136, 128, None, jnp.float32, 2e-4),
        # Empty sequences first, in the middle and last; T an exact multiple of the chunk.
        (1, 64, 32, 16, 16, (0, 0, 30, 30, 64, 64), jnp.float32, 2e-4),
        # bf16 q, k, v with float32 gates (the model's mix).
        (2, 70, 64, 32, 32, None, jnp.bfloat16, 3e-2),
    ],
    ids=["wide_heads_chunk128", "empty_sequences", "bf16_with_f32_gates"],
)
def test_matches_oracle(batch, seq_len, key_dim, value_dim, chunk_size, cu_seqlens, dtype, tol):
    num_seqs = batch if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, h0, do, dfinal = _inputs(
        batch, seq_len, 1, key_dim, value_dim, num_seqs, seed=seq_len, dtype=dtype
    )
    cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens, jnp.int32)

    def run(q, k, v, g, h0):
        return chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=cu,
            chunk_size=chunk_size,
            backend="pallas_tpu",
            interpret=True,
        )

    (o, final), vjp = jax.vjp(run, q, k, v, g, h0)
    grads = dict(zip(GRADS, vjp((do, dfinal)), strict=True))
    expected = gla_oracle(
        q,
        k,
        v,
        g,
        scale=key_dim**-0.5,
        initial_state=h0,
        cu_seqlens=cu_seqlens,
        do=do,
        dfinal=dfinal,
    )
    _assert_close(dict(o=o, final_state=final, **grads), expected, tol)
    assert grads["dg"].dtype == jnp.float32 and grads["dq"].dtype == dtype


# --------------------------------------------------------------------------------------------
# What it refuses
# --------------------------------------------------------------------------------------------


def _opts(chunk_size=64):
    return api.Options(backend="pallas_tpu", scale=1.0, chunk_size=chunk_size, interpret=True)


def test_supports_the_paper_shapes():
    for key_dim, value_dim in ((128, 256), (256, 512)):
        for dtype in (jnp.float32, jnp.bfloat16):
            assert tpu.supports((2, 64, 4, key_dim), (2, 64, 4, value_dim), dtype, _opts()) is None


@pytest.mark.parametrize(
    "key_dim, value_dim, dtype, chunk_size, reason",
    [
        (64, 64, jnp.float16, 64, "float16 is not supported"),
        (2048, 2048, jnp.float32, 64, "must fit in VMEM"),
        (64, 64, jnp.float32, 8, "multiple of 16"),
    ],
)
def test_refusals_give_a_reason(key_dim, value_dim, dtype, chunk_size, reason):
    got = tpu.supports((1, 8, 1, key_dim), (1, 8, 1, value_dim), dtype, _opts(chunk_size))
    assert got is not None and reason in got


def test_explicit_backend_raises_with_the_reason():
    x = jnp.ones((1, 8, 1, 16), jnp.float16)
    with pytest.raises(NotImplementedError, match="pallas_tpu.*float16"):
        chunk_gla(x, x, x, -x, backend="pallas_tpu", interpret=True)


# --------------------------------------------------------------------------------------------
# Mosaic lowering (no TPU needed: Pallas lowers to the Mosaic dialect on any host)
# --------------------------------------------------------------------------------------------


def test_forward_and_backward_lower_to_mosaic():
    q = jnp.ones((2, 100, 2, 64), jnp.bfloat16)
    v = jnp.ones((2, 100, 2, 48), jnp.bfloat16)
    g = -jnp.ones((2, 100, 2, 64), jnp.float32)

    def loss(q, k, v, g):
        o, final = chunk_gla(q, k, v, g, output_final_state=True, backend="pallas_tpu")
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    text = step.trace(q, q, v, g).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, chunk states, backward


# --------------------------------------------------------------------------------------------
# TPU-semantics simulator: uninitialized memory is NaN, races between cores are reported
# --------------------------------------------------------------------------------------------


def _races_module():
    """Where the simulator records races (a private module: skip if this jax moved it)."""
    module = pytest.importorskip(
        "jax._src.pallas.mosaic.interpret.interpret_pallas_call",
        reason="race detector state moved in this jax version",
    )
    if not hasattr(module, "races"):
        pytest.skip("race detector state moved in this jax version")
    return module


def _simulator():
    return pltpu.InterpretParams(
        detect_races=True, uninitialized_memory="nan", num_cores_or_threads=2, random_seed=0
    )


@pytest.mark.slow
def test_race_detector_sees_a_shared_output_block():
    """The check below can fail: two 'parallel' rows writing one block is reported as a race."""
    races = _races_module()
    pltpu.reset_tpu_interpret_mode_state()

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    x = jnp.ones((16, 128), jnp.float32)
    pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        compiler_params=tpu._CompilerParams(dimension_semantics=(tpu._PARALLEL,)),
        interpret=_simulator(),
    )(x).block_until_ready()
    assert races.races.races_found
    pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.slow
@pytest.mark.parametrize("cu_seqlens", [None, (0, 0, 19, 19, 40)], ids=["batch", "packed"])
def test_simulator_no_races_no_uninitialized_reads(cu_seqlens):
    races = _races_module()
    pltpu.reset_tpu_interpret_mode_state()
    batch = 2 if cu_seqlens is None else 1
    num_seqs = batch if cu_seqlens is None else len(cu_seqlens) - 1
    q, k, v, g, h0, do, dfinal = _inputs(batch, 40, 2, 16, 24, num_seqs, seed=1)
    cu = None if cu_seqlens is None else jnp.asarray(cu_seqlens, jnp.int32)
    opts = api.Options(backend="pallas_tpu", scale=0.25, chunk_size=16, interpret=_simulator())

    o, final = tpu.forward(q, k, v, g, h0, cu, opts)
    grads = dict(zip(GRADS, tpu.backward(q, k, v, g, h0, cu, do, dfinal, opts), strict=True))
    assert not races.races.races_found
    expected = gla_oracle(
        q, k, v, g, scale=0.25, initial_state=h0, cu_seqlens=cu_seqlens, do=do, dfinal=dfinal
    )
    # A read of never-written memory would surface as NaN, which _rel_err rejects.
    _assert_close(dict(o=o, final_state=final, **grads), expected, 2e-4)
