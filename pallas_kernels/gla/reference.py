"""Pure-JAX gated linear attention: the step recurrence and the chunked form.

Both compute, per head, with log forget gates g_t <= 0 (per key dimension):

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = (scale * q_t) S_t.

``recurrent_gla`` is the float32 step-by-step recurrence (the 'reference' backend, and the decoding
step). ``chunked_gla`` is the chunkwise form (the 'xla' backend): chunk states are materialized by a
scan over chunks and every chunk's output is computed in parallel from them.

Numerical stability of the chunked form. Inside a chunk let b_i be the cumulative log gate up to and
including position i. The intra-chunk scores are sum_d q_id k_jd exp(b_id - b_jd) for j <= i. The
naive factorization (q exp(b)) (k exp(-b))^T overflows exp(-b) once a chunk's gates add up past
~-88. Following the paper's secondary-level chunking, the chunk is split into sub-chunks: an
off-diagonal sub-block (rows in sub-chunk I, columns in sub-chunk J < I) is factorized around the
first position r of sub-chunk I, so both factors exp(b_i - b_r) and exp(b_r - b_j) are <= 1 and it
is a plain matmul; a diagonal sub-block is computed in full in log space, with the exponent masked
*before* exp so that no inf (or NaN gradient) is ever formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gla.gates import floor_gates
from pallas_kernels.gla.layout import ChunkLayout

SUB_CHUNK = 16


def _precision(dtype) -> lax.Precision:
    # float32 callers expect float32 accuracy (no TF32 on GPUs); half precision callers do not.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


# --------------------------------------------------------------------------------------------
# Step recurrence ('reference' backend, decoding)
# --------------------------------------------------------------------------------------------


def recurrent_gla(q, k, v, g, *, scale, initial_state, cu_seqlens=None):
    """Float32 step recurrence over [B, T, H, *] inputs.

    initial_state: [N, H, K, V] float32 (N = B, or the number of packed sequences).
    Returns (o [B, T, H, V] float32, final_state [N, H, K, V] float32).
    """
    hp = lax.Precision.HIGHEST
    qf, kf, vf, gf = (x.astype(jnp.float32) for x in (q, k, v, g))
    qf = qf * scale
    steps = tuple(jnp.swapaxes(x, 0, 1) for x in (qf, kf, vf, gf))  # [T, B, H, *]

    def update(state, q_t, k_t, v_t, g_t):
        state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=hp)

    if cu_seqlens is None:

        def step(state, xs):
            return update(state, *xs)

        final, o = lax.scan(step, initial_state, steps)
        return jnp.swapaxes(o, 0, 1), final

    num_seqs = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.astype(jnp.int32)
    seq_len = q.shape[1]
    tokens = jnp.arange(seq_len, dtype=jnp.int32)
    seq_of_token = jnp.clip(jnp.searchsorted(cu[1:], tokens, side="right"), 0, num_seqs - 1)
    is_start = tokens == cu[seq_of_token]
    is_end = tokens == cu[seq_of_token + 1] - 1

    def packed_step(carry, xs):
        state, finals = carry
        seq, start, end, *step_inputs = xs
        state = jnp.where(start, initial_state[seq][None], state)
        state, o_t = update(state, *step_inputs)
        finals = finals.at[seq].set(jnp.where(end, state[0], finals[seq]))
        return (state, finals), o_t

    state0 = jnp.zeros((1,) + initial_state.shape[1:], jnp.float32)
    (_, finals), o = lax.scan(
        packed_step, (state0, initial_state), (seq_of_token, is_start, is_end) + steps
    )
    return jnp.swapaxes(o, 0, 1), finals


# --------------------------------------------------------------------------------------------
# Chunked form ('xla' backend)
# --------------------------------------------------------------------------------------------


def chunk_local_cumsum(g: jax.Array, chunk_size: int) -> jax.Array:
    """[..., T, K] log gates -> inclusive cumulative sums restarted at every chunk (float32), the
    gates floored (``gates.py``)."""
    shape = g.shape
    g = floor_gates(g.astype(jnp.float32))
    g = g.reshape(shape[:-2] + (shape[-2] // chunk_size, chunk_size, shape[-1]))
    return jnp.cumsum(g, axis=-2).reshape(shape)


def chunk_recurrence(k, v, b, initial_state, layout: ChunkLayout, precision):
    """Chunk states. k, b: [B, H, NC, C, K]; v: [B, H, NC, C, V] (b = chunk-local cumsum).

    Returns (states_before [B, NC, H, K, V], states_after [B, NC, H, K, V]), float32.
    """
    b_last = b[..., -1:, :]
    decay_to_end = jnp.exp(b_last - b)  # <= 1
    k_to_end = (k.astype(jnp.float32) * decay_to_end).astype(v.dtype)
    chunk_updates = jnp.einsum(
        "bhnck,bhncv->nbhkv", k_to_end, v, precision=precision, preferred_element_type=jnp.float32
    )
    chunk_decays = jnp.moveaxis(jnp.exp(b_last[..., 0, :]), 2, 0)  # [NC, B, H, K]
    starts, seq_index = layout.chunk_initial_states(initial_state)

    def step(state, xs):
        start, seq, decay, update = xs
        state = jnp.where(start[:, None, None, None], initial_state[seq], state)
        after = decay[..., None] * state + update
        return after, (state, after)

    batch, heads = k.shape[:2]
    state0 = jnp.zeros((batch, heads) + initial_state.shape[2:], jnp.float32)
    _, (before, after) = lax.scan(
        step, state0, (starts.T, seq_index.T, chunk_decays, chunk_updates)
    )
    return jnp.swapaxes(before, 0, 1), jnp.swapaxes(after, 0, 1)


def intra_chunk_scores(q, k, b, precision, sub_chunk: int = SUB_CHUNK):
    """Causal gated scores A[..., i, j] = sum_d q_id k_jd exp(b_id - b_jd), j <= i, per chunk.

    q, k, b: [..., C, K] (q already scaled). Returns [..., C, C] float32.
    """
    *lead, chunk, dim = q.shape
    sub = min(sub_chunk, chunk)
    n_sub = chunk // sub
    qs, ks, bs = (x.astype(jnp.float32).reshape(*lead, n_sub, sub, dim) for x in (q, k, b))

    # Diagonal sub-blocks, in log space.
    causal = jnp.tril(jnp.ones((sub, sub), bool))
    log_decay = bs[..., :, None, :] - bs[..., None, :, :]  # [..., S, i, j, K]
    log_decay = jnp.where(causal[:, :, None], log_decay, -jnp.inf)
    diag = jnp.einsum(
        "...sik,...sjk,...sijk->...sij", qs, ks, jnp.exp(log_decay), precision=precision
    )

    # Off-diagonal sub-blocks (J < I), factorized around the first position of sub-chunk I.
    b_ref = bs[..., :, :1, :]  # [..., I, 1, K]
    q_ref = (qs * jnp.exp(bs - b_ref)).astype(q.dtype)
    below = jnp.tril(jnp.ones((n_sub, n_sub), bool), k=-1)  # [I, J]
    k_log = b_ref[..., :, None, :, :] - bs[..., None, :, :, :]  # [..., I, J, j, K]
    k_log = jnp.where(below[:, :, None, None], k_log, -jnp.inf)
    k_ref = (ks[..., None, :, :, :] * jnp.exp(k_log)).astype(k.dtype)
    off = jnp.einsum(
        "...Iik,...IJjk->...IiJj",
        q_ref,
        k_ref,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    # Blocks are chosen by selects, not by products with 0: the masks above multiply by
    # exp(-inf) = 0, which leaves NaN * 0 = NaN where a later key is not finite, and only a
    # select keeps that from earlier positions' outputs.
    eye = jnp.eye(n_sub, dtype=bool)
    scores = jnp.where(eye[:, None, :, None], diag[..., :, :, None, :], off)
    causal_chunk = jnp.tril(jnp.ones((chunk, chunk), bool))
    return jnp.where(causal_chunk, scores.reshape(*lead, chunk, chunk), 0.0)


def chunked_gla(q, k, v, g, *, scale, initial_state, layout: ChunkLayout):
    """The chunkwise algorithm on the caller's [B, T, H, *] layout.

    Returns (o [B, T, H, V] float32, final_state [N, H, K, V] float32).
    """
    precision = _precision(q.dtype)
    chunk = layout.chunk_size

    def split(x):  # [B', H, Tp, D] -> [B', H, NC, C, D]
        return x.reshape(x.shape[:2] + (layout.num_chunks, chunk, x.shape[-1]))

    q_c, k_c, v_c, g_c = (split(layout.to_chunked(x)) for x in (q, k, v, g))
    b = chunk_local_cumsum(g_c, chunk)
    q_scaled = (q_c.astype(jnp.float32) * scale).astype(q.dtype)

    states_before, states_after = chunk_recurrence(k_c, v_c, b, initial_state, layout, precision)
    q_decayed = (q_scaled.astype(jnp.float32) * jnp.exp(b)).astype(q.dtype)
    o_inter = jnp.einsum(
        "bhnck,bnhkv->bhncv",
        q_decayed,
        states_before.astype(q.dtype) if q.dtype != jnp.float32 else states_before,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    scores = intra_chunk_scores(q_scaled, k_c, b, precision)
    o_intra = jnp.einsum(
        "bhnij,bhnjv->bhniv",
        scores.astype(v.dtype),
        v_c,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    o = (o_inter + o_intra).reshape(o_inter.shape[:2] + (layout.padded_len, v.shape[-1]))
    final_state = layout.gather_final_states(states_after, initial_state)
    return layout.from_chunked(o), final_state
