"""Forward Pallas kernels for chunkwise GLA, lowered through Triton.

All kernels read the time-major rows layout ``[B', Tp, H, D]`` (``gpu.py`` builds it from the chunk
layout; for equal-length rows whose T is a multiple of the chunk size it is the caller's array
itself, so no transpose or copy is made). ``b`` is the chunk-local inclusive cumulative sum of the
log gates in float32, ``[B', Tp, H, K]``.

Two kernels make the forward:

* ``chunk_states``: one program per (row, head, K tile, V tile) walks the chunks in order and
  stores the state entering every chunk (``[B', NC, H, K, V]``), resetting to a sequence's initial
  state at the chunk where it starts and writing each sequence's final state at its last chunk.
* ``chunk_outputs``: fully parallel, one program per (16-row sub-chunk, row * head, V tile): the
  inter-chunk term ``(q * exp(b)) @ h`` plus the intra-chunk term ``A @ v`` with the gated causal
  scores ``A`` of those rows. Small programs keep few values live (no register spills) and give
  the GPU many programs to hide load latency with.

The scores use secondary-level chunking (sub-chunks of 16): an off-diagonal sub-block (rows in
sub-chunk I, columns before it) is factorized around the first position r of sub-chunk I, so both
factors ``exp(b_i - b_r)`` and ``exp(b_r - b_j)`` are <= 1 and it is one tensor-core matmul; only
the diagonal sub-blocks are computed in float32 in log space, one column at a time. Every exponent
is clamped at 0 before ``exp`` so masked entries can never overflow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

SUB_CHUNK = 16
# The marker for a squeezed block dimension (older jax spelled it None).
SQUEEZED = getattr(pl, "squeezed", None) or (pl.Squeezed() if hasattr(pl, "Squeezed") else None)
F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Helpers usable inside kernels (all shapes are powers of two, as the Triton lowering requires)
# --------------------------------------------------------------------------------------------


def _dot(a, b, dims, dtype):
    # float32 callers get IEEE float32 matmuls (the Triton lowering would otherwise pick TF32).
    precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                           precision=precision, preferred_element_type=F32)


def mm(a, b, dtype):
    """a @ b with operands in ``dtype`` and float32 accumulation."""
    return _dot(a, b, ((1,), (0,)), dtype)


def mm_tn(a, b, dtype):
    """a.T @ b."""
    return _dot(a, b, ((0,), (0,)), dtype)


def mm_nt(a, b, dtype):
    """a @ b.T."""
    return _dot(a, b, ((1,), (1,)), dtype)


def split_rows(x, parts: int):
    """Equal row blocks of a value (Triton has no general value slicing, but it has split)."""
    if parts == 1:
        return [x]
    return list(lax.split(x, [x.shape[0] // parts] * parts, axis=0))


def row(ref, index):
    """Row ``index`` of a 2-D ref as a [1, D] float32 value."""
    return ref[pl.ds(index, 1), :].astype(F32)


def sub_chunk(chunk: int) -> int:
    return min(SUB_CHUNK, chunk)


def diagonal_decay(b_rows, b_col, sub: int, col: int):
    """exp(b_i - b_j) for the rows i of a sub-chunk and its column j; zero above the diagonal.

    b_rows: [S, K]; b_col: [1, K]. The exponent is clamped at 0 first, so nothing overflows.
    """
    keep = lax.broadcasted_iota(jnp.int32, (sub, 1), 0) >= col
    return jnp.where(keep, jnp.exp(jnp.minimum(b_rows - b_col, 0.0)), 0.0)


def row_block(ref, base, sub: int):
    """Rows [base, base + sub) of a 2-D ref as float32."""
    return ref[pl.ds(base, sub), :].astype(F32)


def diagonal_scores(q_rows, b_rows, k_ref, b_ref, base, sub: int):
    """The diagonal sub-block A[i, j] = sum_d q_id k_jd exp(b_id - b_jd), j <= i, in float32.

    q_rows, b_rows: [S, K] rows of the block (q scaled); columns are read one row at a time from
    k_ref and b_ref at ``base + j``. The loop is unrolled so all those row loads can be issued
    up front instead of one latency per column. Returns [S, S].
    """
    cols = lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
    scores = jnp.zeros((sub, sub), F32)
    for j in range(sub):
        decay = diagonal_decay(b_rows, row(b_ref, base + j), sub, j)
        column = jnp.sum(q_rows * row(k_ref, base + j) * decay, axis=1, keepdims=True)
        scores = jnp.where(cols == j, column, scores)
    return scores


def off_diagonal_scores(q_rows, b_rows, b_ref_row, k, b, dtype):
    """Scores of block rows against keys ``k`` [N, K] that all come before the block's first
    position r: (q exp(b - b_r)) @ (k exp(b_r - b_k))^T, both factors <= 1. Returns [S, N]."""
    q_hat = q_rows * jnp.exp(b_rows - b_ref_row)
    k_hat = k * jnp.exp(jnp.minimum(b_ref_row - b, 0.0))
    return mm_nt(q_hat, k_hat, dtype)


def whole(shape):
    """A whole-array block (kernels index it with data-dependent sequence numbers)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


# --------------------------------------------------------------------------------------------
# chunk_states
# --------------------------------------------------------------------------------------------


def _chunk_states_kernel(
    first_ref, last_ref, k_ref, v_ref, b_ref, h0_ref, states_ref, final_ref,
    *, chunk, num_chunks, heads, block_k, block_v, dtype,
):
    bh, kt, vt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    batch_row, head = bh // heads, bh % heads
    ks, vs = pl.ds(kt * block_k, block_k), pl.ds(vt * block_v, block_v)

    def step(c, state):
        seq = first_ref[batch_row, c]
        # A sequence starts here: its initial state replaces the carried one.
        state = lax.cond(
            seq >= 0, lambda: h0_ref[jnp.maximum(seq, 0), head, ks, vs], lambda: state
        )
        states_ref[c] = state.astype(states_ref.dtype)
        rows = pl.ds(c * chunk, chunk)
        b = b_ref[rows, :]
        b_last = row(b_ref, c * chunk + chunk - 1)  # [1, BK]
        k_to_end = k_ref[rows, :].astype(F32) * jnp.exp(b_last - b)  # decays <= 1
        state = state * jnp.exp(b_last).T + mm_tn(k_to_end, v_ref[rows, :], dtype)
        seq_end = last_ref[batch_row, c]

        @pl.when(seq_end >= 0)
        def _():
            final_ref[jnp.maximum(seq_end, 0), head, ks, vs] = state

        return state

    lax.fori_loop(0, num_chunks, step, jnp.zeros((block_k, block_v), F32))


def state_scan_call(
    kernel_body, key_side, value_side, b, boundary, first_seq, last_seq, *, chunk, state_dtype,
    config, interpret, name, **kernel_options,
):
    """Launches a walk over the chunks of every (row, head, K tile, V tile), in one program each.

    The forward state recurrence (k, v, h0 -> states, final states) and its reverse (q, do,
    dfinal -> state gradients, dh0) share this launch: [B', Tp, H, K]- and [B', Tp, H, V]-shaped
    inputs, the gates, one [N, H, K, V] boundary input and output, [B', NC, H, K, V] per chunk.
    """
    rows, padded_len, heads, key_dim = key_side.shape
    value_dim = value_side.shape[-1]
    num_chunks = padded_len // chunk
    block_k, block_v = min(config.state_block_k, key_dim), min(config.state_block_v, value_dim)

    def seq_spec(width_block, tile_axis):
        def index(bh, kt, vt):
            return (bh // heads, 0, bh % heads, kt if tile_axis == "k" else vt)

        return pl.BlockSpec((SQUEEZED, padded_len, SQUEEZED, width_block), index)

    kernel = functools.partial(
        kernel_body, chunk=chunk, num_chunks=num_chunks, heads=heads,
        block_k=block_k, block_v=block_v, dtype=key_side.dtype, **kernel_options,
    )
    states_spec = pl.BlockSpec(
        (SQUEEZED, num_chunks, SQUEEZED, block_k, block_v),
        lambda bh, kt, vt: (bh // heads, 0, bh % heads, kt, vt),
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((rows, num_chunks, heads, key_dim, value_dim), state_dtype),
            jax.ShapeDtypeStruct(boundary.shape, F32),
        ),
        grid=(rows * heads, key_dim // block_k, value_dim // block_v),
        in_specs=[
            whole(first_seq.shape), whole(last_seq.shape),
            seq_spec(block_k, "k"), seq_spec(block_v, "v"), seq_spec(block_k, "k"),
            whole(boundary.shape),
        ],
        out_specs=(states_spec, whole(boundary.shape)),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.state_warps, num_stages=config.state_stages
        ),
        interpret=interpret,
        name=name,
    )(first_seq, last_seq, key_side, value_side, b, boundary)


def chunk_states(k, v, b, h0, first_seq, last_seq, *, chunk, state_dtype, config, interpret):
    """States entering every chunk [B', NC, H, K, V] and final states [N, H, K, V] float32."""
    return state_scan_call(
        _chunk_states_kernel, k, v, b, h0, first_seq, last_seq, chunk=chunk,
        state_dtype=state_dtype, config=config, interpret=interpret, name="gla_chunk_states",
    )


# --------------------------------------------------------------------------------------------
# chunk_outputs
# --------------------------------------------------------------------------------------------


def _chunk_outputs_kernel(q_ref, k_ref, v_ref, b_ref, h_ref, o_ref, *, scale, parts, dtype):
    """One program: the S output rows of sub-chunk ``block`` of one chunk, one V tile."""
    sub = o_ref.shape[0]
    chunk = q_ref.shape[0]
    base = (pl.program_id(0) % parts) * sub
    q = row_block(q_ref, base, sub) * scale
    b = row_block(b_ref, base, sub)
    out = mm(q * jnp.exp(b), h_ref[...], dtype)  # inter-chunk: [S, BV]
    # Earlier sub-chunks of this chunk (masked to columns before this block; none for block 0).
    cols = lax.broadcasted_iota(jnp.int32, (sub, chunk), 1)
    earlier = off_diagonal_scores(q, b, row(b_ref, base), k_ref[...].astype(F32), b_ref[...],
                                  dtype)
    out += mm(jnp.where(cols < base, earlier, 0.0), v_ref[...], dtype)
    diagonal = diagonal_scores(q, b, k_ref, b_ref, base, sub)
    out += mm(diagonal, v_ref[pl.ds(base, sub), :], dtype)
    o_ref[...] = out.astype(o_ref.dtype)


def sub_block_specs(chunk, heads, key_dim, block_v):
    """Specs for a grid (chunk * parts, row * heads, V tile) of one-sub-chunk programs: whole
    chunks of inputs, the state of the chunk, and the program's own S rows of the output."""
    parts = chunk // sub_chunk(chunk)

    def chunk_of(p, bh):
        return (bh // heads, p // parts, bh % heads)

    key = pl.BlockSpec((SQUEEZED, chunk, SQUEEZED, key_dim),
                       lambda p, bh, vt: (*chunk_of(p, bh), 0))
    value = pl.BlockSpec((SQUEEZED, chunk, SQUEEZED, block_v),
                         lambda p, bh, vt: (*chunk_of(p, bh), vt))
    state = pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, key_dim, block_v),
                         lambda p, bh, vt: (bh // heads, p // parts, bh % heads, 0, vt))
    sub = sub_chunk(chunk)
    out_value = pl.BlockSpec((SQUEEZED, sub, SQUEEZED, block_v),
                             lambda p, bh, vt: (bh // heads, p, bh % heads, vt))
    out_key = pl.BlockSpec((SQUEEZED, sub, SQUEEZED, key_dim),
                           lambda p, bh, vt: (bh // heads, p, bh % heads, 0))
    return key, value, state, out_value, out_key


def chunk_outputs(q, k, v, b, states, *, chunk, scale, out_dtype, config, interpret):
    """o [B', Tp, H, V] from the inputs and the states entering each chunk."""
    rows, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    block_v = min(config.output_block_v, value_dim)
    sub = sub_chunk(chunk)
    key, value, state, out_value, _ = sub_block_specs(chunk, heads, key_dim, block_v)
    kernel = functools.partial(_chunk_outputs_kernel, scale=scale, parts=chunk // sub,
                               dtype=q.dtype)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, padded_len, heads, value_dim), out_dtype),
        grid=(padded_len // sub, rows * heads, value_dim // block_v),
        in_specs=[key, key, value, key, state],
        out_specs=out_value,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.output_warps, num_stages=config.output_stages
        ),
        interpret=interpret,
        name="gla_chunk_outputs",
    )(q, k, v, b, states)
