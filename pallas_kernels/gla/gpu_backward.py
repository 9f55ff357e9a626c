"""Backward Pallas kernels for chunkwise GLA, lowered through Triton.

The backward recomputes the chunk states with the forward's ``chunk_states`` kernel, then:

* ``state_grads``: per (row, head, K tile, V tile), a reverse walk over the chunks computes dH_c,
  the gradient of the state *leaving* chunk c: ``dfinal[seq]`` where chunk c is a sequence's last
  chunk, else the gradient entering chunk c + 1, which is
  ``exp(b_last) * dH + (q * scale * exp(b))^T @ do``. At a sequence's first chunk that entering
  gradient is the gradient of its initial state.
* ``value_grads``: parallel over (chunk, row * head, V tile):
  ``dv = A^T @ do + (k * exp(b_last - b)) @ dH``.
* ``query_key_gate_grads``: parallel over (chunk, row * head), whole K, looping over V tiles for
  ``do @ h^T``, ``v @ dH^T`` and ``dA = do @ v^T``; then the intra-chunk parts of dq and dk from
  dA with the same secondary-level chunking as the forward, and the gate gradient.

The gate gradient. With b the chunk-local cumulative sum of g, every use of b is a factor
exp(+b_i) on a query side or exp(-b_j) on a key side, so dL/db_i = q_i * dq_i - k_i * dk_i
(q scaled; dq, dk the full gradients of the scaled query and the key), plus, at the chunk's last
position, the decay of the whole chunk: sum_v S_after[d, v] * dH[d, v], where
S_after = exp(b_last) * h + sum_j (k_j exp(b_last - b_j))^T v_j; the second part equals
sum_j k_j * dk_state_j. Since b_i = sum_{t <= i} g_t, dg_t is the reverse cumulative sum of
dL/db over the chunk, so the last-position term is added to every position of the chunk.
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
    SQUEEZED,
    diagonal_decay,
    gated_score_blocks,
    mm,
    mm_nt,
    mm_tn,
    off_diagonal_factors,
    row,
    split_rows,
    sub_chunk,
    whole,
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
    rows, padded_len, heads, key_dim = q.shape
    value_dim = do.shape[-1]
    num_chunks = padded_len // chunk
    block_k, block_v = min(config.state_block_k, key_dim), min(config.state_block_v, value_dim)

    def seq_spec(width_block, tile_axis):
        def index(bh, kt, vt):
            return (bh // heads, 0, bh % heads, kt if tile_axis == "k" else vt)

        return pl.BlockSpec((SQUEEZED, padded_len, SQUEEZED, width_block), index)

    kernel = functools.partial(
        _state_grads_kernel, chunk=chunk, num_chunks=num_chunks, heads=heads,
        block_k=block_k, block_v=block_v, scale=scale, dtype=q.dtype,
    )
    states_spec = pl.BlockSpec(
        (SQUEEZED, num_chunks, SQUEEZED, block_k, block_v),
        lambda bh, kt, vt: (bh // heads, 0, bh % heads, kt, vt),
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((rows, num_chunks, heads, key_dim, value_dim), state_dtype),
            jax.ShapeDtypeStruct(dfinal.shape, F32),
        ),
        grid=(rows * heads, key_dim // block_k, value_dim // block_v),
        in_specs=[
            whole(first_seq.shape), whole(last_seq.shape),
            seq_spec(block_k, "k"), seq_spec(block_v, "v"), seq_spec(block_k, "k"),
            whole(dfinal.shape),
        ],
        out_specs=(states_spec, whole(dfinal.shape)),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.state_warps, num_stages=config.state_stages
        ),
        interpret=interpret,
        name="gla_state_grads",
    )(first_seq, last_seq, q, do, b, dfinal)


# --------------------------------------------------------------------------------------------
# value_grads
# --------------------------------------------------------------------------------------------


def _value_grads_kernel(q_ref, k_ref, b_ref, do_ref, dstate_ref, dv_ref, *, scale, dtype):
    q = q_ref[...].astype(F32) * scale
    k = k_ref[...].astype(F32)
    b = b_ref[...]
    chunk = q.shape[0]
    b_last = row(b_ref, chunk - 1)
    dv = mm(k * jnp.exp(b_last - b), dstate_ref[...], dtype)
    scores = gated_score_blocks(q, k, b, k_ref, b_ref, dtype)
    for block, do_rows in zip(scores, split_rows(do_ref[...], len(scores)), strict=True):
        dv = dv + mm_tn(block, do_rows, dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _chunk_specs(chunk, heads, key_dim, block_v):
    key = pl.BlockSpec(
        (SQUEEZED, chunk, SQUEEZED, key_dim), lambda c, bh, vt: (bh // heads, c, bh % heads, 0)
    )
    value = pl.BlockSpec(
        (SQUEEZED, chunk, SQUEEZED, block_v), lambda c, bh, vt: (bh // heads, c, bh % heads, vt)
    )
    state = pl.BlockSpec(
        (SQUEEZED, SQUEEZED, SQUEEZED, key_dim, block_v),
        lambda c, bh, vt: (bh // heads, c, bh % heads, 0, vt),
    )
    return key, value, state


def value_grads(q, k, b, do, dstates, *, chunk, scale, out_dtype, config, interpret):
    rows, padded_len, heads, key_dim = q.shape
    value_dim = do.shape[-1]
    block_v = min(config.output_block_v, value_dim)
    key, value, state = _chunk_specs(chunk, heads, key_dim, block_v)
    return pl.pallas_call(
        functools.partial(_value_grads_kernel, scale=scale, dtype=q.dtype),
        out_shape=jax.ShapeDtypeStruct((rows, padded_len, heads, value_dim), out_dtype),
        grid=(padded_len // chunk, rows * heads, value_dim // block_v),
        in_specs=[key, key, key, value, state],
        out_specs=value,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.output_warps, num_stages=config.output_stages
        ),
        interpret=interpret,
        name="gla_value_grads",
    )(q, k, b, do, dstates)


# --------------------------------------------------------------------------------------------
# query_key_gate_grads
# --------------------------------------------------------------------------------------------


def _inter_chunk_terms(v_ref, do_ref, h_ref, dstate_ref, *, chunk, key_dim, block_v, dtype):
    """do @ h^T, v @ dH^T, the causal dA = do @ v^T and rowsum(h * dH), over all V tiles."""
    num_tiles = v_ref.shape[-1] // block_v

    def tile(t, carry):
        dq_inter, dk_state, dscores, decay_grad = carry
        vs = pl.ds(t * block_v, block_v)
        do, v = do_ref[:, vs], v_ref[:, vs]
        h, dh = h_ref[:, vs], dstate_ref[:, vs]
        return (
            dq_inter + mm_nt(do, h, dtype),
            dk_state + mm_nt(v, dh, dtype),
            dscores + mm_nt(do, v, dtype),
            decay_grad + jnp.sum(h.astype(F32) * dh.astype(F32), axis=1, keepdims=True),
        )

    init = (
        jnp.zeros((chunk, key_dim), F32),
        jnp.zeros((chunk, key_dim), F32),
        jnp.zeros((chunk, chunk), F32),
        jnp.zeros((key_dim, 1), F32),
    )
    return lax.fori_loop(0, num_tiles, tile, init)


def _query_key_gate_grads_kernel(
    q_ref, k_ref, b_ref, v_ref, do_ref, h_ref, dstate_ref, dq_ref, dk_ref, dg_ref,
    *, scale, block_v, dtype,
):
    q = q_ref[...].astype(F32) * scale
    k = k_ref[...].astype(F32)
    b = b_ref[...]
    chunk, key_dim = q.shape
    sub = sub_chunk(chunk)
    parts = chunk // sub
    b_last = row(b_ref, chunk - 1)
    dq_inter, dk_state, dscores, decay_grad = _inter_chunk_terms(
        v_ref, do_ref, h_ref, dstate_ref, chunk=chunk, key_dim=key_dim, block_v=block_v,
        dtype=dtype,
    )
    causal = (lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
              >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1))
    dscores = jnp.where(causal, dscores, 0.0)
    dk_state = dk_state * jnp.exp(b_last - b)
    # Gradient of the chunk's total decay exp(b_last): sum_v S_after * dH, split in two parts.
    d_last = jnp.exp(b_last) * decay_grad.T + jnp.sum(k * dk_state, axis=0, keepdims=True)
    dq_inter = dq_inter * jnp.exp(b)

    q_blocks, b_blocks = split_rows(q, parts), split_rows(b, parts)
    ds_blocks = split_rows(dscores, parts)
    cols = lax.broadcasted_iota(jnp.int32, (sub, chunk), 1)
    sub_rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
    dk_off = jnp.zeros((chunk, key_dim), F32)
    dq_blocks, dk_diag_blocks = [], []
    for i in range(parts):
        base = i * sub
        dq_i = jnp.zeros((sub, key_dim), F32)
        if i > 0:
            q_hat, k_hat, q_decay, k_decay = off_diagonal_factors(
                q_blocks[i], b_blocks[i], k, b, row(b_ref, base)
            )
            ds_off = jnp.where(cols < base, ds_blocks[i], 0.0)
            dq_i = mm(ds_off, k_hat, dtype) * q_decay
            dk_off = dk_off + mm_tn(ds_off, q_hat, dtype) * k_decay

        def diagonal_column(j, carry, i=i, base=base):
            dq_i, dk_i = carry
            decay = diagonal_decay(b_blocks[i], row(b_ref, base + j), sub, j)
            d_col = jnp.sum(jnp.where(cols == base + j, ds_blocks[i], 0.0), axis=1, keepdims=True)
            weight = d_col * decay  # [S, K]: dA_ij exp(b_i - b_j), zero for i < j
            dq_i = dq_i + weight * row(k_ref, base + j)
            dk_row = jnp.sum(weight * q_blocks[i], axis=0, keepdims=True)
            return dq_i, jnp.where(sub_rows == j, dk_row, dk_i)

        dq_i, dk_diag = lax.fori_loop(
            0, sub, diagonal_column, (dq_i, jnp.zeros((sub, key_dim), F32))
        )
        dq_blocks.append(dq_i)
        dk_diag_blocks.append(dk_diag)

    dq_inter_blocks = split_rows(dq_inter, parts)
    dk_blocks = split_rows(dk_state + dk_off, parts)
    k_blocks = split_rows(k, parts)
    db_blocks = []
    for i in range(parts):
        dq_i = dq_blocks[i] + dq_inter_blocks[i]  # gradient of the scaled query
        dk_i = dk_blocks[i] + dk_diag_blocks[i]
        dq_ref[pl.ds(i * sub, sub), :] = (dq_i * scale).astype(dq_ref.dtype)
        dk_ref[pl.ds(i * sub, sub), :] = dk_i.astype(dk_ref.dtype)
        db_blocks.append(q_blocks[i] * dq_i - k_blocks[i] * dk_i)

    # dg_t = sum_{i >= t} db_i + d_last: reverse cumulative sum, one sub-chunk at a time.
    later = d_last
    for i in reversed(range(parts)):
        db = db_blocks[i]
        total = jnp.sum(db, axis=0, keepdims=True)
        dg = total - jnp.cumsum(db, axis=0) + db + later
        dg_ref[pl.ds(i * sub, sub), :] = dg.astype(dg_ref.dtype)
        later = later + total


def query_key_gate_grads(q, k, b, v, do, states, dstates, *, chunk, scale, config, interpret):
    """dq, dk [B', Tp, H, K] in q's dtype and dg [B', Tp, H, K] float32."""
    rows, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    block_v = min(config.grad_block_v, value_dim)
    key, value, state = _chunk_specs(chunk, heads, key_dim, value_dim)
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        functools.partial(_query_key_gate_grads_kernel, scale=scale, block_v=block_v,
                          dtype=q.dtype),
        out_shape=(out, out, jax.ShapeDtypeStruct(q.shape, F32)),
        grid=(padded_len // chunk, rows * heads, 1),
        in_specs=[key, key, key, value, value, state, state],
        out_specs=(key, key, key),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.grad_warps, num_stages=config.grad_stages
        ),
        interpret=interpret,
        name="gla_query_key_gate_grads",
    )(q, k, b, v, do, states, dstates)
