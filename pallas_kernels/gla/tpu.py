"""The 'pallas_tpu' backend: chunkwise GLA as Mosaic TPU ``pl.pallas_call`` kernels.

Three kernels, each over the grid (row, head, chunk) with the chunk axis last and "arbitrary" (it
carries the running state in a VMEM scratch buffer) and the row and head axes "parallel":

* forward (tpu_forward.forward_kernel): outputs and final states in one pass over the chunks;
* states (tpu_forward.states_kernel): the state before every chunk, recomputed for the backward;
* backward (tpu_backward.backward_kernel): walks the chunks in reverse with the state cotangent in
  VMEM scratch and writes dq, dk, dv, dg and the initial-state cotangents.

Shapes follow Mosaic's (8, 128) tiling rule without asking anything of the caller: the chunk
bookkeeping and time padding come from layout.make_layout (shared with the other chunked
backends), and the head dims are zero-padded to multiples of 128 here (zero keys, values and log
gates leave the state and outputs unchanged). Which sequence a chunk belongs to, and where
sequences start and end, reach the kernels as scalar-prefetch arrays in SMEM that both the kernels
and the block index maps read, so the initial/final-state blocks follow packed sequences.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gla import tpu_backward, tpu_forward
from pallas_kernels.gla.layout import ChunkLayout, make_layout, round_up

LANES = 128
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Above this estimate a kernel would not fit the VMEM of every TPU generation (64 MiB on the
# smallest) with room for Mosaic's own buffers.
VMEM_BUDGET = 40 * 2**20

# The class was named TPUCompilerParams in older releases.
_CompilerParams = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_ARBITRARY = getattr(pltpu, "ARBITRARY", "arbitrary")


# --------------------------------------------------------------------------------------------
# What the backend can take
# --------------------------------------------------------------------------------------------


def vmem_bytes(chunk: int, key_dim: int, value_dim: int, itemsize: int) -> int:
    """A generous estimate of the VMEM the backward kernel (the largest) needs."""
    kp, vp = round_up(key_dim, LANES), round_up(value_dim, LANES)
    state = kp * vp * 4
    states = 7 * state  # scratch, and double-buffered state-in, dfinal and dh0 blocks
    inputs = 2 * chunk * (3 * kp + 2 * vp) * itemsize  # q, k, g, v, do, double-buffered
    outputs = 2 * chunk * (3 * kp + vp) * 4
    temporaries = 4 * tpu_forward.SUB**2 * kp * 4 + 12 * chunk * max(kp, vp, chunk) * 4
    return states + inputs + outputs + temporaries


def supports(q_shape, v_shape, dtype, opts) -> str | None:
    if jnp.dtype(dtype) not in DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not supported (float32 or bfloat16)"
    reason = tpu_forward.check_chunk_size(opts.chunk_size)
    if reason is not None:
        return reason
    key_dim, value_dim = q_shape[-1], v_shape[-1]
    need = vmem_bytes(opts.chunk_size, key_dim, value_dim, jnp.dtype(dtype).itemsize)
    if need > VMEM_BUDGET:
        return (
            f"K = {key_dim}, V = {value_dim} need ~{need / 2**20:.0f} MiB of VMEM per kernel "
            f"(budget {VMEM_BUDGET / 2**20:.0f} MiB): the [K, V] state must fit in VMEM"
        )
    return None


# --------------------------------------------------------------------------------------------
# Layout: chunk bookkeeping (shared), head-dim padding and the scalar-prefetch arrays
# --------------------------------------------------------------------------------------------


class ChunkIndex(NamedTuple):
    """Per-chunk int32 arrays, flat over (row, chunk), read from SMEM by kernels and index maps."""

    first_seq: jax.Array  # sequence whose initial state starts at this chunk, or -1
    seq: jax.Array  # sequence this chunk belongs to (selects its state blocks)
    last_of_seq: jax.Array  # sequence whose last chunk this is, or -1


class Plan(NamedTuple):
    layout: ChunkLayout
    index: ChunkIndex
    rows: int
    heads: int
    key_pad: int
    value_pad: int
    dtype: jnp.dtype


def chunk_index(layout: ChunkLayout) -> ChunkIndex:
    first_seq = layout.chunk_first_seq
    # A chunk belongs to the latest sequence started at or before it on its row (padding chunks
    # after a row's last sequence continue it with zero inputs; none precede the first).
    seq = jnp.maximum(lax.cummax(first_seq, axis=1), 0).reshape(-1)
    flat = first_seq.size
    last = jnp.where(layout.seq_last_chunk >= 0, layout.seq_last_chunk, flat)
    num_seqs = layout.seq_last_chunk.shape[0]
    last_of_seq = (
        jnp.full((flat,), -1, jnp.int32)
        .at[last]
        .set(jnp.arange(num_seqs, dtype=jnp.int32), mode="drop")
    )
    return ChunkIndex(first_seq.reshape(-1).astype(jnp.int32), seq.astype(jnp.int32), last_of_seq)


def make_plan(q, v, cu_seqlens, opts) -> Plan:
    layout = make_layout(q.shape[0], q.shape[1], opts.chunk_size, cu_seqlens)
    rows = layout.chunk_first_seq.shape[0]
    return Plan(
        layout,
        chunk_index(layout),
        rows,
        q.shape[2],
        round_up(q.shape[-1], LANES),
        round_up(v.shape[-1], LANES),
        jnp.dtype(q.dtype),
    )


def pad_last(x, width):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def to_tiles(plan: Plan, x, width, dtype=None):
    """[B, T, H, D] -> [B', H, Tp, width]: chunk-aligned (layout) and lane-padded."""
    x = x if dtype is None else x.astype(dtype)
    return pad_last(plan.layout.to_chunked(x), width)


def from_tiles(plan: Plan, x, width):
    return plan.layout.from_chunked(x[..., :width])


def pad_state(x, plan: Plan):
    return jnp.pad(
        x, ((0, 0), (0, 0), (0, plan.key_pad - x.shape[2]), (0, plan.value_pad - x.shape[3]))
    )


def fill_empty_sequences(plan: Plan, from_kernel, fallback):
    """Sequences with no tokens have no chunk, so their state blocks are never written."""
    empty = (plan.layout.seq_last_chunk < 0)[:, None, None, None]
    return jnp.where(empty, fallback, from_kernel)


# --------------------------------------------------------------------------------------------
# Block specs and calls
# --------------------------------------------------------------------------------------------


def _chunk_of(c, num_chunks, reverse):
    return num_chunks - 1 - c if reverse else c


def tile_spec(plan: Plan, width, *, reverse=False):
    """One [C, width] tile of a [B', H, Tp, width] array per grid step."""
    nc = plan.layout.num_chunks
    return pl.BlockSpec(
        (1, 1, plan.layout.chunk_size, width),
        lambda r, h, c, *_: (r, h, _chunk_of(c, nc, reverse), 0),
    )


def state_spec(plan: Plan, *, reverse=False):
    """The [K, V] state block of the sequence the current chunk belongs to ([N, H, Kp, Vp])."""
    nc = plan.layout.num_chunks

    def index_map(r, h, c, first_seq, seq, *_):
        return seq[r * nc + _chunk_of(c, nc, reverse)], h, 0, 0

    return pl.BlockSpec((1, 1, plan.key_pad, plan.value_pad), index_map)


def chunk_state_spec(plan: Plan, *, reverse=False):
    """The state before the current chunk in a [B', H, NC * Kp, Vp] array."""
    nc = plan.layout.num_chunks
    return pl.BlockSpec(
        (1, 1, plan.key_pad, plan.value_pad),
        lambda r, h, c, *_: (r, h, _chunk_of(c, nc, reverse), 0),
    )


def call(kernel, plan: Plan, opts, *, scalars, inputs, in_specs, out_shape, out_specs):
    """Runs `kernel` over (row, head, chunk) with one [Kp, Vp] float32 VMEM scratch buffer."""
    grid = (plan.rows, plan.heads, plan.layout.num_chunks)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((plan.key_pad, plan.value_pad), jnp.float32)],
    )
    need = vmem_bytes(plan.layout.chunk_size, plan.key_pad, plan.value_pad, plan.dtype.itemsize)
    # Twice the estimate for Mosaic's own buffers, at least the usual default, and at most 48 MiB
    # so that it stays under the 64 MiB VMEM of the smallest TPU generation.
    vmem_limit = int(min(max(2 * need, 32 * 2**20), 48 * 2**20))
    params = _CompilerParams(
        dimension_semantics=(_PARALLEL, _PARALLEL, _ARBITRARY), vmem_limit_bytes=vmem_limit
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=grid_spec,
        compiler_params=params,
        interpret=opts.interpret,
    )(*scalars, *inputs)


def precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def chunk_states(plan: Plan, k, v, g, h0, opts):
    """The float32 state before every chunk: [B', H, NC * Kp, Vp] (k, v, g already tiled)."""
    kp, vp, nc = plan.key_pad, plan.value_pad, plan.layout.num_chunks
    kernel = functools.partial(tpu_forward.states_kernel, precision=precision(plan.dtype))
    return call(
        kernel,
        plan,
        opts,
        scalars=(plan.index.first_seq, plan.index.seq),
        inputs=(k, v, g, h0),
        in_specs=[tile_spec(plan, kp), tile_spec(plan, vp), tile_spec(plan, kp), state_spec(plan)],
        out_shape=jax.ShapeDtypeStruct((plan.rows, plan.heads, nc * kp, vp), jnp.float32),
        out_specs=chunk_state_spec(plan),
    )


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def forward(q, k, v, g, initial_state, cu_seqlens, opts):
    plan = make_plan(q, v, cu_seqlens, opts)
    kp, vp, dtype = plan.key_pad, plan.value_pad, plan.dtype
    q_t, k_t, g_t = (
        to_tiles(plan, q, kp, dtype),
        to_tiles(plan, k, kp, dtype),
        to_tiles(plan, g, kp, jnp.float32),
    )
    v_t = to_tiles(plan, v, vp, dtype)
    h0 = pad_state(initial_state, plan)
    kernel = functools.partial(
        tpu_forward.forward_kernel, scale=opts.scale, precision=precision(dtype)
    )
    o, final = call(
        kernel,
        plan,
        opts,
        scalars=(plan.index.first_seq, plan.index.seq),
        inputs=(q_t, k_t, v_t, g_t, h0),
        in_specs=[
            tile_spec(plan, kp),
            tile_spec(plan, kp),
            tile_spec(plan, vp),
            tile_spec(plan, kp),
            state_spec(plan),
        ],
        out_shape=(
            jax.ShapeDtypeStruct(v_t.shape, dtype),
            jax.ShapeDtypeStruct(h0.shape, jnp.float32),
        ),
        out_specs=(tile_spec(plan, vp), state_spec(plan)),
    )
    final = final[:, :, : q.shape[-1], : v.shape[-1]]
    return from_tiles(plan, o, v.shape[-1]), fill_empty_sequences(plan, final, initial_state)


def backward(q, k, v, g, initial_state, cu_seqlens, do, dfinal, opts):
    plan = make_plan(q, v, cu_seqlens, opts)
    kp, vp, dtype = plan.key_pad, plan.value_pad, plan.dtype
    q_t, k_t, g_t = (
        to_tiles(plan, q, kp, dtype),
        to_tiles(plan, k, kp, dtype),
        to_tiles(plan, g, kp, jnp.float32),
    )
    v_t, do_t = to_tiles(plan, v, vp, dtype), to_tiles(plan, do, vp, dtype)
    h0, dfinal_p = pad_state(initial_state, plan), pad_state(dfinal.astype(jnp.float32), plan)
    states = chunk_states(plan, k_t, v_t, g_t, h0, opts)
    kernel = functools.partial(
        tpu_backward.backward_kernel, scale=opts.scale, precision=precision(dtype)
    )
    tiles_k = jax.ShapeDtypeStruct(q_t.shape, jnp.float32)
    dq, dk, dv, dg, dh0 = call(
        kernel,
        plan,
        opts,
        scalars=tuple(plan.index),
        inputs=(q_t, k_t, v_t, g_t, do_t, states, dfinal_p),
        in_specs=[tile_spec(plan, w, reverse=True) for w in (kp, kp, vp, kp, vp)]
        + [chunk_state_spec(plan, reverse=True), state_spec(plan, reverse=True)],
        out_shape=(
            tiles_k,
            tiles_k,
            jax.ShapeDtypeStruct(v_t.shape, jnp.float32),
            tiles_k,
            jax.ShapeDtypeStruct(h0.shape, jnp.float32),
        ),
        out_specs=tuple(tile_spec(plan, w, reverse=True) for w in (kp, kp, vp, kp))
        + (state_spec(plan, reverse=True),),
    )
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    dh0 = fill_empty_sequences(plan, dh0[:, :, :key_dim, :value_dim], dfinal.astype(jnp.float32))
    dq, dk, dg = (from_tiles(plan, x, key_dim) for x in (dq, dk, dg))
    return dq, dk, from_tiles(plan, dv, value_dim), dg, dh0


class TpuBackend:
    name = "pallas_tpu"
    supports = staticmethod(supports)
    forward = staticmethod(forward)
    backward = staticmethod(backward)


BACKEND = TpuBackend
