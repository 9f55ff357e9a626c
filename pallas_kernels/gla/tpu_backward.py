"""Mosaic TPU backward kernel for chunkwise GLA.

The grid walks each (row, head) chunk by chunk in reverse, carrying the cotangent of the state
after the current chunk in a float32 VMEM scratch buffer. The state before the chunk comes from the
states kernel (recomputed, never saved by the forward). Per chunk, with b the chunk-local cumsum of
the log gates, S the state before and dS the cotangent of the state after:

    dv = A^T do + (k exp(b_last - b)) dS                  A: the gated causal scores
    dq = scale [exp(b) (do S^T) + intra(dA) ],            dA = (do v^T) on j <= i
    dk = intra^T(dA) + exp(b_last - b) (v dS^T)
    dS_before = exp(b_last) dS + (q exp(b))^T do

and the gate gradient follows from how b enters: every term depends on b_i - b_j or b_last - b_j,
so dL/db = q * dq - k * dk, plus at the last position the terms that go through b_last, namely
exp(b_last) * rowsum(dS * S) + sum_j k_j * dk_state_j. As b is a cumsum of g, dg is the reverse
cumsum of dL/db. The intra-chunk pieces reuse the forward's secondary-level chunking: off-diagonal
sub-blocks as matmuls factorized around a reference point (the first row of a row block for dq, the
last row of a column block for dk) so both exp factors are <= 1, diagonal sub-blocks in log space.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gla.tpu_forward import (
    SUB,
    Chunk,
    diagonal_decay,
    exact,
    positions,
    reverse_cumsum,
    row_of,
)

F32 = jnp.float32


def _diagonal_gradients(chunk: Chunk, do_rows, v_rows, block):
    """Query and key gradients through one diagonal sub-block, in log space: ([SUB, K], [SUB, K]).

    Column j of the block contributes dA_ij k_j exp(b_i - b_j) to query row i, and its key row j
    gets sum_i dA_ij q_i exp(b_i - b_j), with dA_ij = do_i . v_j; the decays are zero for i < j.
    """
    rows = chunk.rows(block)
    qs, k, b = chunk.qs[rows], chunk.k[rows], chunk.b[rows]
    do_rows, v_rows = do_rows.astype(F32), v_rows.astype(F32)
    row_ids = positions(qs.shape, 0)

    def add_column(j, grads):
        dq, dk = grads
        decay = diagonal_decay(b, j)
        d_column = jnp.sum(do_rows * row_of(v_rows, j), axis=1, keepdims=True)  # [SUB, 1]
        dq = dq + d_column * row_of(k, j) * decay
        dk_row = jnp.sum(d_column * qs * decay, axis=0, keepdims=True)  # [1, K]
        return dq, jnp.where(row_ids == j, dk_row, dk)

    return lax.fori_loop(0, SUB, add_column, (jnp.zeros_like(qs), jnp.zeros_like(k)))


def _intra_block_gradients(chunk: Chunk, do, block):
    """Gradients through row/column sub-block `block` of the scores.

    Returns (dv_off [C, V], dv_diag [SUB, V], dq_intra [SUB, K], dk_intra [SUB, K]), float32, with
    dq_intra the gradient of the block's (scaled) queries and dk_intra that of its keys.
    """
    c, r = chunk.size, block * SUB
    rows = chunk.rows(block)
    do_rows, v_rows = do[rows], chunk.v[rows]
    off, diag = chunk.scores(block)
    dv_off = chunk.mm(off, do_rows, contract=(0, 0))
    dv_diag = chunk.mm(diag, do_rows, contract=(0, 0))

    # This block's rows against earlier columns, factorized around its first row r.
    d_scores = chunk.mm(do_rows, chunk.v, contract=(1, 1))  # [SUB, C]: do_i . v_j
    d_scores = jnp.where(positions((SUB, c), 1) < r, d_scores, 0.0)
    q_to_ref = jnp.exp(chunk.b[rows] - chunk.b[r : r + 1, :])
    dq_off = q_to_ref * chunk.mm(d_scores, chunk.keys_before(block))

    # This block's columns against later rows, factorized around its last row r_end.
    r_end = r + SUB - 1
    d_scores_t = chunk.mm(v_rows, do, contract=(1, 1))  # [SUB, C]: v_j . do_i
    d_scores_t = jnp.where(positions((SUB, c), 1) > r_end, d_scores_t, 0.0)
    k_to_ref = jnp.exp(row_of(chunk.b, r_end) - chunk.b[rows])
    dk_off = k_to_ref * chunk.mm(d_scores_t, chunk.queries_after(block))

    dq_diag, dk_diag = _diagonal_gradients(chunk, do_rows, v_rows, block)
    return dv_off, dv_diag, dq_off + dq_diag, dk_off + dk_diag


def chunk_gradients(chunk: Chunk, do, state, d_after, *, scale):
    """Gradients of one chunk. state: S before it; d_after: cotangent of S after it ([K, V] f32).

    Returns (dq, dk, dv, dg, d_before), float32.
    """
    dv = chunk.mm(chunk.k_to_end(), d_after)
    dqs = jnp.exp(chunk.b) * chunk.mm(do, state, contract=(1, 1))
    dk_state = jnp.exp(chunk.b_last - chunk.b) * chunk.mm(chunk.v, d_after, contract=(1, 1))
    dv_diag, dq_intra, dk_intra = [], [], []
    for block in range(chunk.size // SUB):
        dv_off, dv_block, dq_block, dk_block = _intra_block_gradients(chunk, do, block)
        dv = dv + dv_off
        dv_diag.append(dv_block)
        dq_intra.append(dq_block)
        dk_intra.append(dk_block)
    dv = dv + jnp.concatenate(dv_diag, axis=0)
    dqs = dqs + jnp.concatenate(dq_intra, axis=0)
    dk = dk_state + jnp.concatenate(dk_intra, axis=0)

    d_before = chunk.decay_col * d_after + chunk.mm(chunk.q_from_start(), do, contract=(0, 0))
    value_ones = jnp.ones((1, d_after.shape[1]), F32)
    state_term = jnp.exp(chunk.b_last) * exact(value_ones, d_after * state, contract=(1, 1))
    through_last = state_term + jnp.sum(chunk.k * dk_state, axis=0, keepdims=True)
    dg = reverse_cumsum(chunk.qs * dqs - chunk.k * dk) + through_last
    return dqs * scale, dk, dv, dg, d_before


def backward_kernel(
    first_seq_ref,
    seq_ref,
    last_of_seq_ref,
    q_ref,
    k_ref,
    v_ref,
    g_ref,
    do_ref,
    states_ref,
    dfinal_ref,
    dq_ref,
    dk_ref,
    dv_ref,
    dg_ref,
    dh0_ref,
    d_state_ref,
    *,
    scale,
    precision,
):
    del first_seq_ref, seq_ref  # used by the index maps only
    row, step = pl.program_id(0), pl.program_id(2)
    num_chunks = pl.num_programs(2)
    flat_chunk = row * num_chunks + (num_chunks - 1 - step)

    @pl.when(step == 0)
    def _():
        d_state_ref[...] = jnp.zeros_like(d_state_ref)

    # A sequence's last chunk starts its cotangent from dfinal; whatever followed on the row (the
    # next sequence, or zero padding) does not depend on this state.
    @pl.when(last_of_seq_ref[flat_chunk] >= 0)
    def _():
        d_state_ref[...] = dfinal_ref[0, 0]

    chunk = Chunk(
        q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], g_ref[0, 0], scale=scale, precision=precision
    )
    dq, dk, dv, dg, d_before = chunk_gradients(
        chunk, do_ref[0, 0], states_ref[0, 0], d_state_ref[...], scale=scale
    )
    dq_ref[0, 0] = dq
    dk_ref[0, 0] = dk
    dv_ref[0, 0] = dv
    dg_ref[0, 0] = dg
    # A chunk that starts a sequence hands d_before to the initial state. Written at every chunk:
    # the sequence's first chunk comes last in the reverse walk, so its write is the one kept.
    d_state_ref[...] = d_before
    dh0_ref[0, 0] = d_before
