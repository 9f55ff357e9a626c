"""Backward Pallas kernels for chunkwise GLA, lowered through Triton.

The backward recomputes the chunk states with the forward's ``chunk_states`` kernel, then:

* ``state_grads``: per (row, head, K tile, V tile), a reverse walk over the chunks computes dH_c,
  the gradient of the state *leaving* chunk c: ``dfinal[seq]`` where chunk c is a sequence's last
  chunk, else the gradient entering chunk c + 1, which is
  ``exp(b_last) * dH + (q * scale * exp(b))^T @ do``. At a sequence's first chunk that entering
  gradient is the gradient of its initial state.
* ``value_grads``: one program per (16-row sub-chunk, row * head, V tile):
  ``dv_J = (k_J * exp(b_last - b_J)) @ dH + sum_{I >= J} A_IJ^T @ do_I``.
* ``query_key_grads``: one program per (16-row sub-chunk P, row * head), whole K, looping over V
  tiles for ``do_P @ h^T``, ``v_P @ dH^T`` and the rows and columns of P in ``dA = do @ v^T``; then
  the intra-chunk parts of dq_P and dk_P from dA with the forward's secondary-level chunking, and
  dL/db_P for the gate gradient.

The gate gradient. With b the chunk-local cumulative sum of g, every use of b is a factor
exp(+b_i) on a query side or exp(-b_j) on a key side, so dL/db_i = q_i * dq_i - k_i * dk_i
(q scaled; dq, dk the full gradients of the scaled query and the key), plus, at the chunk's last
position, the decay of the whole chunk: rowsum(S_after * dH) with S_after the state leaving the
chunk. Since b_i = sum_{t <= i} g_t, dg_t is the reverse cumulative sum of dL/db over the chunk,
and the last-position term is added to every position of the chunk. gpu.py assembles it
(``chunk_decay_grads``, ``gate_grads``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gla.gpu_forward import (
    F32,
    diagonal_decay,
    diagonal_scores,
    mm,
    mm_nt,
    mm_tn,
    off_diagonal_scores,
    row,
    row_block,
    split_rows,
    state_scan_call,
    sub_block_specs,
    sub_chunk,
)

# --------------------------------------------------------------------------------------------
# state_grads
# --------------------------------------------------------------------------------------------


def _state_grads_kernel(
    first_ref, last_ref, q_ref, do_ref, b_ref, dfinal_ref, dstates_ref, dh0_ref,
    *, chunk, num_chunks, heads, block_k, block_v, scale, dtype,
):
    bh, kt, vt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    batch_row, head = bh // heads, bh % heads
    ks, vs = pl.ds(kt * block_k, block_k), pl.ds(vt * block_v, block_v)

    def step(i, grad):
        c = num_chunks - 1 - i
        seq_end = last_ref[batch_row, c]
        grad = lax.cond(
            seq_end >= 0, lambda: dfinal_ref[jnp.maximum(seq_end, 0), head, ks, vs], lambda: grad
        )
        dstates_ref[c] = grad.astype(dstates_ref.dtype)
        rows = pl.ds(c * chunk, chunk)
        b = b_ref[rows, :]
        b_last = row(b_ref, c * chunk + chunk - 1)
        q_decayed = q_ref[rows, :].astype(F32) * (scale * jnp.exp(b))
        grad = grad * jnp.exp(b_last).T + mm_tn(q_decayed, do_ref[rows, :], dtype)
        seq = first_ref[batch_row, c]

        @pl.when(seq >= 0)
        def _():
            dh0_ref[jnp.maximum(seq, 0), head, ks, vs] = grad

        # The chunk before a sequence's first chunk ends another sequence: nothing flows back.
        return jnp.where(seq >= 0, 0.0, grad)

    lax.fori_loop(0, num_chunks, step, jnp.zeros((block_k, block_v), F32))


def state_grads(q, do, b, dfinal, first_seq, last_seq, *, chunk, scale, state_dtype, config,
                interpret):
    """dH [B', NC, H, K, V] (gradient of the state leaving each chunk) and dh0 [N, H, K, V].

    dh0 rows of empty sequences are left unwritten; the caller fills them with dfinal.
    """
    return state_scan_call(
        _state_grads_kernel, q, do, b, dfinal, first_seq, last_seq, chunk=chunk,
        state_dtype=state_dtype, config=config, interpret=interpret, name="gla_state_grads",
        scale=scale,
    )


# --------------------------------------------------------------------------------------------
# value_grads
# --------------------------------------------------------------------------------------------


def _value_grads_kernel(q_ref, k_ref, b_ref, do_ref, dstate_ref, dv_ref, *, scale, parts,
                        dtype):
    """One program: dv for the S rows of sub-chunk J of one chunk, one V tile.

    dv_J = (k_J exp(b_last - b_J)) @ dH + sum_{I >= J} A_IJ^T @ do_I.
    """
    sub = dv_ref.shape[0]
    chunk = q_ref.shape[0]
    block = pl.program_id(0) % parts
    base = block * sub
    k = row_block(k_ref, base, sub)
    b = row_block(b_ref, base, sub)
    b_last = row(b_ref, chunk - 1)
    dv = mm(k * jnp.exp(b_last - b), dstate_ref[...], dtype)
    for later in range(1, parts):  # sub-chunks after J (masked when later <= J)
        rows = later * sub
        scores = off_diagonal_scores(row_block(q_ref, rows, sub) * scale,
                                     row_block(b_ref, rows, sub), row(b_ref, rows), k, b, dtype)
        contribution = mm_tn(scores, do_ref[pl.ds(rows, sub), :], dtype)
        dv += jnp.where(later > block, contribution, 0.0)
    q = row_block(q_ref, base, sub) * scale
    diagonal = diagonal_scores(q, b, k_ref, b_ref, base, sub)
    dv += mm_tn(diagonal, do_ref[pl.ds(base, sub), :], dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def value_grads(q, k, b, do, dstates, *, chunk, scale, out_dtype, config, interpret):
    rows, padded_len, heads, key_dim = q.shape
    value_dim = do.shape[-1]
    block_v = min(config.output_block_v, value_dim)
    sub = sub_chunk(chunk)
    key, value, state, out_value, _ = sub_block_specs(chunk, heads, key_dim, block_v)
    return pl.pallas_call(
        functools.partial(_value_grads_kernel, scale=scale, parts=chunk // sub, dtype=q.dtype),
        out_shape=jax.ShapeDtypeStruct((rows, padded_len, heads, value_dim), out_dtype),
        grid=(padded_len // sub, rows * heads, value_dim // block_v),
        in_specs=[key, key, key, value, state],
        out_specs=out_value,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.output_warps, num_stages=config.output_stages
        ),
        interpret=interpret,
        name="gla_value_grads",
    )(q, k, b, do, dstates)


# --------------------------------------------------------------------------------------------
# query_key_grads
# --------------------------------------------------------------------------------------------


def _inter_chunk_terms(v_ref, do_ref, h_ref, dstate_ref, base, sub, block_v, dtype):
    """Over all V tiles: do_P @ h^T, v_P @ dH^T, and the dA = do @ v^T rows and columns of
    sub-chunk P (rows P against every column; every row against columns P)."""
    chunk = v_ref.shape[0]
    key_dim = h_ref.shape[0]
    num_tiles = v_ref.shape[-1] // block_v

    def tile(t, carry):
        dq_inter, dk_state, ds_rows, ds_cols = carry
        vs = pl.ds(t * block_v, block_v)
        do_p, v_p = do_ref[pl.ds(base, sub), vs], v_ref[pl.ds(base, sub), vs]
        do, v = do_ref[:, vs], v_ref[:, vs]
        return (
            dq_inter + mm_nt(do_p, h_ref[:, vs], dtype),
            dk_state + mm_nt(v_p, dstate_ref[:, vs], dtype),
            ds_rows + mm_nt(do_p, v, dtype),
            ds_cols + mm_nt(do, v_p, dtype),
        )

    init = (
        jnp.zeros((sub, key_dim), F32),
        jnp.zeros((sub, key_dim), F32),
        jnp.zeros((sub, chunk), F32),
        jnp.zeros((chunk, sub), F32),
    )
    if num_tiles == 1:
        return tile(0, init)
    return lax.fori_loop(0, num_tiles, tile, init)


def _query_key_grads_kernel(
    q_ref, k_ref, b_ref, v_ref, do_ref, h_ref, dstate_ref, dq_ref, dk_ref, db_ref,
    *, scale, parts, block_v, dtype,
):
    """One program: dq, dk and dL/db for the S rows of sub-chunk P of one chunk."""
    sub = dq_ref.shape[0]
    chunk = q_ref.shape[0]
    block = pl.program_id(0) % parts
    base = block * sub
    dq_inter, dk_state, ds_rows, ds_cols = _inter_chunk_terms(
        v_ref, do_ref, h_ref, dstate_ref, base, sub, block_v, dtype
    )
    q = row_block(q_ref, base, sub) * scale
    k = row_block(k_ref, base, sub)
    b = row_block(b_ref, base, sub)
    b_last = row(b_ref, chunk - 1)
    dq = dq_inter * jnp.exp(b)  # gradient of the scaled query
    dk = dk_state * jnp.exp(b_last - b)

    # Off-diagonal: dq_P from columns before P (factorized around P's first position r_P);
    # dk_P from every later sub-chunk I (factorized around r_I).
    cols = lax.broadcasted_iota(jnp.int32, (sub, chunk), 1)
    b_ref_row = row(b_ref, base)
    k_decay = jnp.exp(jnp.minimum(b_ref_row - b_ref[...], 0.0))  # [C, K]
    ds_before = jnp.where(cols < base, ds_rows, 0.0)
    dq += mm(ds_before, k_ref[...].astype(F32) * k_decay, dtype) * jnp.exp(b - b_ref_row)
    for later, ds_block in enumerate(split_rows(ds_cols, parts)):
        if later == 0:
            continue
        rows = later * sub
        r_row = row(b_ref, rows)
        q_hat = row_block(q_ref, rows, sub) * scale * jnp.exp(row_block(b_ref, rows, sub) - r_row)
        contribution = mm_tn(ds_block, q_hat, dtype) * jnp.exp(jnp.minimum(r_row - b, 0.0))
        dk += jnp.where(later > block, contribution, 0.0)

    # Diagonal sub-block, float32 in log space, one (unrolled) column j at a time.
    sub_rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
    dk_diag = jnp.zeros((sub, q.shape[1]), F32)
    for j in range(sub):
        decay = diagonal_decay(b, row(b_ref, base + j), sub, j)
        d_col = jnp.sum(jnp.where(cols == base + j, ds_rows, 0.0), axis=1, keepdims=True)
        weight = d_col * decay  # dA_ij exp(b_i - b_j), zero for i < j
        dq += weight * row(k_ref, base + j)
        dk_diag = jnp.where(sub_rows == j, jnp.sum(weight * q, axis=0, keepdims=True), dk_diag)
    dk += dk_diag

    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    # dL/db for the gate gradient (gpu.py reverse-accumulates it over the chunk).
    db_ref[...] = q * dq - k * dk


def query_key_grads(q, k, b, v, do, states, dstates, *, chunk, scale, config, interpret):
    """dq, dk [B', Tp, H, K] in q's dtype and dL/db [B', Tp, H, K] float32."""
    rows, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    block_v = min(config.grad_block_v, value_dim)
    sub = sub_chunk(chunk)
    key, value, state, _, out_key = sub_block_specs(chunk, heads, key_dim, value_dim)
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        functools.partial(_query_key_grads_kernel, scale=scale, parts=chunk // sub,
                          block_v=block_v, dtype=q.dtype),
        out_shape=(out, out, jax.ShapeDtypeStruct(q.shape, F32)),
        grid=(padded_len // sub, rows * heads, 1),
        in_specs=[key, key, key, value, value, state, state],
        out_specs=(out_key, out_key, out_key),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.grad_warps, num_stages=config.grad_stages
        ),
        interpret=interpret,
        name="gla_query_key_grads",
    )(q, k, b, v, do, states, dstates)
