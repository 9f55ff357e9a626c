"""Backward Pallas kernels for chunkwise GLA, lowered through Triton.

The backward recomputes the chunks' spans (``gate_spans``), the chunk states (``chunk_states``)
and the exact chunks' scores A (``exact_scores``) with the forward's kernels, then (each kernel
forming the sums of its chunks' log gates that it needs, as in the forward: ``gate_sums``):

* ``state_grads``: per (row, head, K tile, V tile), a reverse walk over the chunks computes dH_c,
  the gradient of the state *leaving* chunk c: ``dfinal[seq]`` where chunk c is a sequence's last
  chunk, else the gradient entering chunk c + 1, which is
  ``exp(b_last) * dH + (q * scale * exp(b))^T @ do``. At a sequence's first chunk that entering
  gradient is the gradient of its initial state. ``backward_walks`` launches it together with
  the recompute of the chunk states: two independent walks, side by side.
* ``score_grads``: ``dA = do @ v^T`` per chunk, causal-masked, in the factors' operand dtype.
* ``value_grads``: ``dv = A^T @ do + (k * exp(b_last - b)) @ dH`` per (chunk, row * head), A^T
  formed in place once per chunk (``scored_tiles_kernel(transposed=True)``), as the forward's
  chunk_outputs forms A, and the decayed keys once for all V tiles.
* ``query_key_grads``: per (K tile, chunk, row * head): the inter-chunk terms ``do @ h^T`` and
  ``v @ dH^T``, then the intra-chunk terms from dA, and the gate gradient dg of the chunk. Like
  the forward's scores, two launches: one factorized matmul pair per chunk where the span allows,
  else secondary-level chunking (sub-chunks of 16; off-diagonal sub-blocks as matmuls around a
  reference row, diagonal sub-blocks factorized or in log space). The forward's exact_scores
  splits a chunk in dyadic levels instead, measured faster under document resets; this kernel
  keeps the sub-chunks.

The gate gradient. With b the chunk-local cumulative sum of g, every use of b is a factor
exp(+b_i) on a query side or exp(-b_j) on a key side, so dL/db_i = q_i * dq_i - k_i * dk_i
(q scaled; dq, dk the full gradients of the scaled query and the key), plus, at the chunk's last
position, the gradient of the chunk's total decay b_last. That one is rowsum(S_after * dH), and
since S_after = exp(b_last) * h + (k * exp(b_last - b))^T v, it equals
``exp(b_last) * rowsum(h * dH) + sum_t k_t * dk_inter_t`` from terms the kernel already has.
Since b_i = sum_{t <= i} g_t, dg_t is the reverse cumulative sum of dL/db over the chunk, plus
the last-position term at every position. Kept chunk-local on purpose: a reverse sum over the
whole sequence accumulates rounding over thousands of positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gla.gpu_forward import (
    F32,
    StateWalk,
    boundary_state,
    causal_mask,
    chunk_rows,
    chunk_spec,
    decay,
    diagonal_span,
    each_exact_chunk,
    exact_group,
    factor_dtype,
    factorizable,
    gate_sums,
    gate_total,
    mm,
    mm_nt,
    mm_tn,
    params,
    row,
    rows,
    safe_decay,
    scored_tiles,
    span_spec,
    split_rows,
    state_spec,
    state_walks,
    states_walk,
    store_boundary_state,
    sub_chunk,
    tile_loop,
    walk_chunks,
    walk_end,
    walk_start,
)

# --------------------------------------------------------------------------------------------
# state_grads
# --------------------------------------------------------------------------------------------


def _state_grads_kernel(
    first_ref,
    last_ref,
    q_ref,
    do_ref,
    g_ref,
    dfinal_ref,
    dstates_ref,
    dh0_ref,
    *,
    row,
    head,
    kt,
    vt,
    chunk,
    chunks,
    block_k,
    block_v,
    scale,
    dtype,
    prefetch,
    walk_seq,
):
    ks, vs = pl.ds(kt * block_k, block_k), pl.ds(vt * block_v, block_v)

    def load(c):
        return chunk_rows((g_ref, q_ref, do_ref), c, chunk)

    def step(c, grad, loaded):
        g, q, do = loaded
        if walk_seq is None:  # where a sequence ends, dfinal replaces the carried gradient
            grad = boundary_state(dfinal_ref, last_ref[row, c], grad, head, ks, vs)
        dstates_ref[c] = grad.astype(dstates_ref.dtype)
        q_decayed = q.astype(F32) * (scale * decay(gate_sums(g, "from_start")))
        grad = grad * decay(gate_total(g)).T + mm_tn(q_decayed, do, dtype)
        if walk_seq is None:
            seq = first_ref[row, c]
            store_boundary_state(dh0_ref, seq, grad, head, ks, vs)
            # The chunk before a sequence's first chunk ends another sequence: nothing flows back.
            grad = jnp.where(seq >= 0, 0.0, grad)
        return grad

    init = walk_start(dfinal_ref, walk_seq, head, ks, vs, block_k, block_v)
    dh0 = walk_chunks(chunks, load, step, init, prefetch=prefetch, reverse=True)
    walk_end(dh0_ref, walk_seq, dh0, head, ks, vs)


def state_grads_walk(q, do, dfinal, scale, writes_dh0):
    """The reverse recurrence as a ``StateWalk``: q, do, dfinal -> dH, dh0."""
    return StateWalk(_state_grads_kernel, q, do, dfinal, writes_dh0, dict(scale=scale))


def state_grads(q, do, g, dfinal, first_seq, last_seq, *, scale, writes_dh0=True, **launch):
    """dH [B', NC, H, K, V] (gradient of the state leaving each chunk) and dh0 [N, H, K, V]
    (None unless ``writes_dh0``); dfinal None: zeros. ``launch``: state_walks' chunk,
    state_dtype, config, interpret, num_seqs, packed and seq_chunks.

    A walk across sequences (a packed row walked whole) leaves the dh0 rows of empty sequences
    unwritten; the caller fills them with dfinal.
    """
    walk = state_grads_walk(q, do, dfinal, scale, writes_dh0)
    (result,) = state_walks([walk], g, first_seq, last_seq, name="gla_state_grads", **launch)
    return result


def backward_walks(
    q, k, v, do, g, h0, dfinal, first_seq, last_seq, *, scale, writes_dh0=True, **launch
):
    """``chunk_states`` and ``state_grads`` in one launch, their programs side by side (they
    read different inputs and neither waits for the other): the states entering every chunk,
    dH and dh0 (as ``state_grads``)."""
    walks = [
        states_walk(k, v, h0, writes_final=False),
        state_grads_walk(q, do, dfinal, scale, writes_dh0),
    ]
    (states, _), (dstates, dh0) = state_walks(
        walks, g, first_seq, last_seq, name="gla_backward_walks", **launch
    )
    return states, dstates, dh0


# --------------------------------------------------------------------------------------------
# score_grads
# --------------------------------------------------------------------------------------------


def _score_grads_kernel(do_ref, v_ref, da_ref, *, block_v, dtype):
    chunk, value_dim = do_ref.shape
    da = jnp.zeros((chunk, chunk), F32)
    for t in range(value_dim // block_v):
        vs = pl.ds(t * block_v, block_v)
        da += mm_nt(do_ref[:, vs], v_ref[:, vs], dtype)
    da_ref[...] = jnp.where(causal_mask(chunk), da, 0.0).astype(da_ref.dtype)


def score_grads(do, v, *, chunk, config, interpret):
    """dA [B', Tp, H, C]: do @ v^T within each chunk, zero above the diagonal, stored in the
    operand dtype of the matmuls that use it (``factor_dtype``: bfloat16 for bfloat16 inputs,
    else float32), which round it to that dtype anyway; half the bytes of float32 to write here
    and to read in each of query_key_grads' K tiles."""
    rows_, padded_len, heads, value_dim = v.shape
    value = chunk_spec(chunk, heads, value_dim)
    return pl.pallas_call(
        functools.partial(
            _score_grads_kernel, block_v=min(config.score_block_v, value_dim), dtype=v.dtype
        ),
        out_shape=jax.ShapeDtypeStruct((rows_, padded_len, heads, chunk), factor_dtype(v.dtype)),
        grid=(padded_len // chunk, rows_ * heads),
        in_specs=[value, value],
        out_specs=chunk_spec(chunk, heads, chunk),
        compiler_params=params(config.scores_warps, 1),
        interpret=interpret,
        name="gla_score_grads",
    )(do, v)


# --------------------------------------------------------------------------------------------
# value_grads
# --------------------------------------------------------------------------------------------


def value_grads(q, k, g, spans, exact, do, dstates, *, chunk, scale, out_dtype, config, interpret):
    """dv [B', Tp, H, V] per (chunk, row * head), V a tile at a time; A as in chunk_outputs
    (formed in place once per chunk, or read from ``exact``)."""
    return scored_tiles(
        q,
        k,
        g,
        spans,
        exact,
        do,
        dstates,
        chunk=chunk,
        scale=scale,
        out_dtype=out_dtype,
        block_v=config.value_block_v,
        block_k=config.value_block_k,
        warps=config.value_warps,
        stages=config.value_stages,
        transposed=True,
        interpret=interpret,
        name="gla_value_grads",
    )


# --------------------------------------------------------------------------------------------
# query_key_grads
# --------------------------------------------------------------------------------------------


def _inter_chunk_grads(v_ref, do_ref, h_ref, dh_ref, block_v, dtype, group_chunk=None):
    """Over all V pieces: do @ h^T, v @ dH^T [C, BK] and rowsum(h * dH) [1, BK].
    ``group_chunk``: None for refs of one chunk, else (c, C): chunk c of refs holding a group of
    chunks (rows [c * C, (c + 1) * C), states [G, BK, V])."""
    value_dim = v_ref.shape[-1]
    block_k = h_ref.shape[-2]
    if group_chunk is None:
        chunk, own, state = v_ref.shape[0], slice(None), ()
    else:
        c, chunk = group_chunk
        own, state = pl.ds(c * chunk, chunk), (c,)

    def v_piece(vs, sums):
        dq, dk, h_dh = sums
        h, dh = h_ref[(*state, slice(None), vs)], dh_ref[(*state, slice(None), vs)]
        dq += mm_nt(do_ref[own, vs], h, dtype)
        dk += mm_nt(v_ref[own, vs], dh, dtype)
        h_dh += jnp.sum(h.astype(F32) * dh.astype(F32), axis=1)[None, :]
        return dq, dk, h_dh

    zeros = (
        jnp.zeros((chunk, block_k), F32),
        jnp.zeros((chunk, block_k), F32),
        jnp.zeros((1, block_k), F32),
    )
    return tile_loop(value_dim, block_v, v_piece, zeros)


def _diagonal_grads(refs, own, q, k, b, *, scale, dtype, first_row=0):
    """dq, dk and dL/db [S, BK] from the diagonal sub-block ``own`` of dA (zero above the diagonal):
    dq_i from columns j <= i, dk_j from rows i >= j. Factorized around the middle row where the
    decay span allows, else in log space one column at a time.

    refs: (q_ref, k_ref, b_ref, da_ref); q, k, b: the sub-block's rows (q scaled). ``own``: the
    sub-block's positions in the chunk, which start at row ``first_row`` of the refs (a chunk of
    a group) while dA's columns are the chunk's own."""
    q_ref, k_ref, b_ref, da_ref = refs
    base, sub = own.start, own.size
    own_rows = pl.ds(first_row + base, sub)

    def factorized():
        from_mid = b - row(b_ref, own_rows.start + sub // 2)
        return _factorized_grads(da_ref[own_rows, own], q, k, from_mid, dtype)

    def column(c, grads):
        dq, dk = grads
        pos, at = base + c, first_row + base + c
        d_col = da_ref[own_rows, pl.ds(pos, 1)].astype(F32)  # dA[i, pos] for the rows i: [S, 1]
        dq += d_col * row(k_ref, at) * safe_decay(b - row(b_ref, at))
        d_row = da_ref[pl.ds(at, 1), own].astype(F32).T  # dA[pos, j] for the columns j: [S, 1]
        dk += d_row * (row(q_ref, at) * scale) * safe_decay(row(b_ref, at) - b)
        return dq, dk

    def log_space():  # a loop with few live values: a register-hungry branch would slow the other
        dq, dk = lax.fori_loop(0, sub, column, (jnp.zeros_like(q), jnp.zeros_like(k)))
        return dq, dk, q * dq - k * dk  # float32 products: the pairs cancel to rounding

    # The span of own_rows, the rows every other read here uses: in a group, the sub-block's
    # position in its chunk would be chunk 0's rows.
    span = diagonal_span(b_ref, own_rows.start, sub)
    return lax.cond(factorizable(span), factorized, log_space)


def _factorized_grads(da, q, k, from_mid, dtype):
    """dq, dk and dL/db of a block of dA factorized around a reference row m, from_mid =
    b - b_m (q scaled).

    dL/db_i sums +t_ij over the block's pairs with i as the query and -t_ji with i as the key, so
    pairs cancel inside a chunk and dg is what remains across it. Rounding the two factors to the
    matmul dtype would break that cancellation (q * dq and k * dk would see different roundings
    of each pair) and strong gates, under which little remains, would amplify it; so dL/db is
    formed from the rounded factors themselves, the same on both sides of every pair."""
    operands = factor_dtype(dtype)
    q_hat = (q * decay(from_mid)).astype(operands).astype(F32)
    k_hat = (k * decay(-from_mid)).astype(operands).astype(F32)
    dq_hat, dk_hat = mm(da, k_hat, operands), mm_tn(da, q_hat, operands)
    return (dq_hat * decay(from_mid), dk_hat * decay(-from_mid), q_hat * dq_hat - k_hat * dk_hat)


def _inter_chunk_start(k, v_ref, do_ref, h_ref, dh_ref, gates, block_v, dtype, group_chunk=None):
    """The inter-chunk parts of dq (for the scaled query) and dk [C, BK], and dL/db_last [1, BK]
    (the chunk's total decay: module docstring). ``gates``: the chunk's b, b_last - b and b_last
    (log2 units). ``group_chunk``: as in ``_inter_chunk_grads``."""
    from_start, to_end, total = gates
    dq_inter, dk_inter, h_dh = _inter_chunk_grads(
        v_ref, do_ref, h_ref, dh_ref, block_v, dtype, group_chunk
    )
    dq_inter = dq_inter * decay(from_start)
    dk_inter = dk_inter * decay(to_end)
    d_last = decay(total) * h_dh + jnp.sum(k * dk_inter, axis=0, keepdims=True)
    return dq_inter, dk_inter, d_last


def _store_grads(rows_, dq, dk, db, carry, dq_ref, dk_ref, dg_ref, scale):
    """Writes dq, dk and dg for ``rows_`` of the chunk (dq of the scaled query). ``carry``: dL/db
    summed over the chunk's later rows plus dL/db_last; returns it with these rows' db added."""
    dq_ref[rows_, :] = (dq * scale).astype(dq_ref.dtype)
    dk_ref[rows_, :] = dk.astype(dk_ref.dtype)
    return _store_gate_grads(rows_, db, carry, dg_ref)


def _store_gate_grads(rows_, db, carry, dg_ref):
    """Writes dg for ``rows_`` from their dL/db and ``carry`` (as in ``_store_grads``)."""
    total = jnp.sum(db, axis=0, keepdims=True)
    dg_ref[rows_, :] = (carry + total - jnp.cumsum(db, axis=0) + db).astype(dg_ref.dtype)
    return carry + total


def _factorized_key_grads_kernel(
    span_ref,
    q_ref,
    k_ref,
    g_ref,
    v_ref,
    do_ref,
    h_ref,
    dh_ref,
    da_ref,
    dq_ref,
    dk_ref,
    dg_ref,
    *,
    scale,
    block_v,
    dtype,
):
    """The whole chunk's intra-chunk terms as two matmuls, factorized around its middle row.

    Ordered for registers, the limit of this kernel (two programs of 4 warps a multiprocessor):
    the chunk's own operands are loaded before the V loop as stored (half the registers of their
    float32 forms), so their loads overlap the loop; what is formed from them (the gate sums,
    the factors) comes after it, one factor at a time, and dq is stored as soon as it is final.
    These are ``_factorized_grads``' products, interleaved with the stores."""

    @pl.when(factorizable(span_ref[...]))
    def _():
        chunk = q_ref.shape[0]
        g, q_in, k_in, da = g_ref[...], q_ref[...], k_ref[...], da_ref[...]
        dq, dk, h_dh = _inter_chunk_grads(v_ref, do_ref, h_ref, dh_ref, block_v, dtype)
        # One gate-sum matmul: b_last - b and b - b_mid follow from b and column sums. A
        # factorizable chunk's gates are all above the floor (``gate_spans``).
        total = gate_total(g, floored=False)
        b = gate_sums(g, "from_start", floored=False)
        dq = dq * decay(b)
        dk = dk * decay(total - b)
        d_last = decay(total) * h_dh + jnp.sum(k_in.astype(F32) * dk, axis=0, keepdims=True)
        from_mid = b - gate_total(g, upto=chunk // 2, floored=False)
        operands = factor_dtype(dtype)
        # dL/db: the inter-chunk terms from dq and dk as they stand, the intra-chunk ones from
        # the rounded factors (``_factorized_grads`` says why).
        db = (q_in.astype(F32) * scale) * dq - k_in.astype(F32) * dk
        k_hat = (k_in.astype(F32) * decay(-from_mid)).astype(operands)
        dq_hat = mm(da, k_hat, operands)
        dq_ref[...] = ((dq + dq_hat * decay(from_mid)) * scale).astype(dq_ref.dtype)
        q_hat = (q_in.astype(F32) * scale * decay(from_mid)).astype(operands)
        db += q_hat.astype(F32) * dq_hat
        dk_hat = mm_tn(da, q_hat, operands)
        db -= k_hat.astype(F32) * dk_hat
        dk_ref[...] = (dk + dk_hat * decay(-from_mid)).astype(dk_ref.dtype)
        _store_gate_grads(pl.ds(0, chunk), db, d_last, dg_ref)


def _exact_key_grads_kernel(
    span_ref,
    q_ref,
    k_ref,
    b_ref,
    v_ref,
    do_ref,
    h_ref,
    dh_ref,
    da_ref,
    _dq_in,
    _dk_in,
    _dg_in,
    dq_ref,
    dk_ref,
    dg_ref,
    *,
    scale,
    block_v,
    dtype,
):
    """Secondary-level chunking, for the chunks the factorized kernel left out: a group of
    consecutive chunks per program (``gpu_forward.exact_group``), passing over the others."""
    chunk = da_ref.shape[-1]

    def grads(c):
        _exact_chunk_grads(
            (q_ref, k_ref, b_ref, v_ref, do_ref, h_ref, dh_ref, da_ref),
            (dq_ref, dk_ref, dg_ref),
            (c, chunk),
            scale=scale,
            block_v=block_v,
            dtype=dtype,
        )

    each_exact_chunk(span_ref, grads)


def _exact_chunk_grads(refs, out_refs, group_chunk, *, scale, block_v, dtype):
    """dq, dk and dg of chunk c of the group, ``group_chunk`` = (c, C): its rows start at row
    c * C of the refs, and dA's columns are the chunk's own."""
    q_ref, k_ref, b_ref, v_ref, do_ref, h_ref, dh_ref, da_ref = refs
    dq_ref, dk_ref, dg_ref = out_refs
    c, chunk = group_chunk
    first = c * chunk  # the chunk's first row in the refs
    sub = sub_chunk(chunk)
    parts = chunk // sub
    b, b_last = rows(b_ref, first, chunk), row(b_ref, first + chunk - 1)
    dq_inter, dk_inter, carry = _inter_chunk_start(
        rows(k_ref, first, chunk),
        v_ref,
        do_ref,
        h_ref,
        dh_ref,
        (b, b_last - b, b_last),
        block_v,
        dtype,
        group_chunk,
    )
    dq_parts, dk_parts = split_rows(dq_inter, parts), split_rows(dk_inter, parts)

    def at(start, size, ref):  # rows [start, start + size) of the chunk, as float32
        return rows(ref, first + start, size)

    def da_block(row_start, col_start):  # dA's [S, S] block at these positions of the chunk
        return da_ref[pl.ds(first + row_start, sub), pl.ds(col_start, sub)]

    for p in reversed(range(parts)):  # last sub-chunk first: dg is a reverse cumsum
        base = p * sub
        q, k, b_p = at(base, sub, q_ref) * scale, at(base, sub, k_ref), at(base, sub, b_ref)
        dq, dk = dq_parts[p], dk_parts[p]
        # Off-diagonal, columns J < P, around r = the first row of P.
        if p > 0:
            b_r = at(base, 1, b_ref)
            acc = jnp.zeros_like(dq)
            for j in range(p):
                k_hat = at(j * sub, sub, k_ref) * safe_decay(b_r - at(j * sub, sub, b_ref))
                acc += mm(da_block(base, j * sub), k_hat, dtype)
            dq += acc * decay(b_p - b_r)
        # Off-diagonal, rows of every later sub-chunk I, around r = the first row of I.
        for i in range(p + 1, parts):
            b_r = at(i * sub, 1, b_ref)
            q_hat = at(i * sub, sub, q_ref) * scale * decay(at(i * sub, sub, b_ref) - b_r)
            dk += mm_tn(da_block(i * sub, base), q_hat, dtype) * safe_decay(b_r - b_p)
        d_dq, d_dk, d_db = _diagonal_grads(
            (q_ref, k_ref, b_ref, da_ref),
            pl.ds(base, sub),
            q,
            k,
            b_p,
            scale=scale,
            dtype=dtype,
            first_row=first,
        )
        carry = _store_grads(
            pl.ds(first + base, sub),
            dq + d_dq,
            dk + d_dk,
            q * dq - k * dk + d_db,
            carry,
            dq_ref,
            dk_ref,
            dg_ref,
            scale,
        )


def _tile_axis_first(spec):
    """The same block, for a grid whose K tile axis comes first: (K tile, chunk, row * head)."""
    return pl.BlockSpec(spec.block_shape, lambda t, c, bh: spec.index_map(c, bh, t))


def query_key_grads(
    q,
    k,
    g,
    exact_b,
    spans,
    v,
    do,
    states,
    dstates,
    dscores,
    *,
    chunk,
    scale,
    dg_dtype,
    config,
    interpret,
):
    """dq, dk [B', Tp, H, K] in q's dtype and dg [B', Tp, H, K] in ``dg_dtype`` (the gates'
    dtype, which the op returns it in: summed in float32, rounded once on the store, so a
    bfloat16 g costs no float32 write and conversion pass).

    Like the forward's scores: a factorized launch, which forms its gate sums from g, then an
    exact launch for the chunks whose span rules the factorization out, which reads their b from
    ``exact_b`` (``gate_spans``), writing into the same buffers."""
    rows_, padded_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    block_k = min(config.grad_block_k, key_dim)
    num_chunks = padded_len // chunk
    kernel_options = dict(scale=scale, block_v=min(config.grad_block_v, value_dim), dtype=q.dtype)
    out_shape = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(q.shape, dg_dtype),
    )

    def launch(kernel, group, *inputs, writes_into=(), **options):
        """A launch over (K tile, chunk or group, row * head): one chunk per program if group is
        None, else ``group`` consecutive chunks (refs [G * C, ...], spans [G], states [G, ...]).
        ``writes_into``: the dq, dk, dg buffers it completes, aliased to its outputs. The K tile
        is the grid's first (fastest-launched) axis: the K tiles of one chunk run side by side
        and share its v, do and dA in L2 instead of reading them from HBM once per tile."""
        rows_per = chunk * (group or 1)
        key = _tile_axis_first(chunk_spec(rows_per, heads, block_k, tiled=True))
        value = _tile_axis_first(chunk_spec(rows_per, heads, value_dim))
        state = _tile_axis_first(state_spec(block_k, value_dim, heads, "k", group))
        in_specs = [
            _tile_axis_first(span_spec(heads, group)),
            key,
            key,
            key,
            value,
            value,
            state,
            state,
            _tile_axis_first(chunk_spec(rows_per, heads, chunk)),
        ]
        return pl.pallas_call(
            functools.partial(kernel, **kernel_options),
            out_shape=out_shape,
            grid=(key_dim // block_k, num_chunks // (group or 1), rows_ * heads),
            in_specs=in_specs + [key] * len(writes_into),
            out_specs=(key, key, key),
            compiler_params=params(config.grad_warps, config.grad_stages),
            interpret=interpret,
            **options,
        )(*inputs, *writes_into)

    others = (v, do, states, dstates, dscores)
    factorized = launch(
        _factorized_key_grads_kernel, None, spans, q, k, g, *others, name="gla_query_key_grads"
    )
    lanes = (key_dim // block_k) * rows_ * heads
    return launch(
        _exact_key_grads_kernel,
        exact_group(num_chunks, lanes, config.exact_min_programs),
        spans,
        q,
        k,
        exact_b,
        *others,
        writes_into=factorized,
        input_output_aliases={9: 0, 10: 1, 11: 2},
        name="gla_query_key_grads_exact",
    )
