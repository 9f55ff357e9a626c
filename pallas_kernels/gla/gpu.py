"""The 'pallas_gpu' backend: chunkwise GLA in Pallas kernels lowered through Triton.

This file prepares the kernels' inputs and assembles their outputs; the kernels are in
gpu_forward.py (gate_spans, chunk_states, exact_scores, chunk_outputs) and gpu_backward.py
(state_grads, or backward_walks for chunk_states and state_grads in one launch; score_grads,
value_grads, query_key_grads); block sizes come from tuning.py.

Inputs go to the time-major rows layout [B', Tp, H, D]: the chunk layout's head-major form
transposed back, which XLA folds into nothing for equal-length rows with T a multiple of the chunk
size, so the kernels then read the caller's arrays in place. Head dims are zero-padded to powers of
two (>= 16), which the Triton lowering and tensor-core matmuls need; zero keys, values and log
gates leave the result unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.gla import gpu_backward, gpu_forward, tuning
from pallas_kernels.gla.layout import ChunkLayout, make_layout

MAX_KEY_DIM = 256
MAX_VALUE_DIM = 512
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def padded_dim(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Prepared:
    layout: ChunkLayout
    q: jax.Array  # [B', Tp, H, Kp] in the compute dtype
    k: jax.Array
    v: jax.Array  # [B', Tp, H, Vp]
    g: jax.Array  # [B', Tp, H, Kp] log gates as given
    first_seq: jax.Array  # [B', NC] int32
    last_seq: jax.Array  # [B', NC] int32: the sequence whose last chunk this is, else -1
    key_dim: int
    value_dim: int


def _pad_last(x, size):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _pad_state(state, key_dim, value_dim):
    return jnp.pad(
        state, ((0, 0), (0, 0), (0, key_dim - state.shape[2]), (0, value_dim - state.shape[3]))
    )


def _to_rows(layout: ChunkLayout, x, width):
    return _pad_last(jnp.swapaxes(layout.to_chunked(x), 1, 2), width)


def _from_rows(layout: ChunkLayout, x, width):
    return layout.from_chunked(jnp.swapaxes(x[..., :width], 1, 2))


def compute_dtype(*dtypes):
    return jnp.result_type(*dtypes)


def prepare(q, k, v, g, cu_seqlens, chunk) -> Prepared:
    batch, seq_len, _, key_dim = q.shape
    value_dim = v.shape[-1]
    layout = make_layout(batch, seq_len, chunk, cu_seqlens)
    dtype = compute_dtype(q.dtype, k.dtype, v.dtype)
    kp, vp = padded_dim(key_dim), padded_dim(value_dim)
    q_rows, k_rows = (_to_rows(layout, x.astype(dtype), kp) for x in (q, k))
    v_rows = _to_rows(layout, v.astype(dtype), vp)
    g_rows = _to_rows(layout, g, kp)
    rows, padded_len = g_rows.shape[:2]
    flat = rows * (padded_len // chunk)
    ends = jnp.where(layout.seq_last_chunk >= 0, layout.seq_last_chunk, flat)
    last_seq = (
        jnp.full((flat,), -1, jnp.int32)
        .at[ends]
        .set(jnp.arange(ends.shape[0], dtype=jnp.int32), mode="drop")
    )
    return Prepared(
        layout,
        q_rows,
        k_rows,
        v_rows,
        g_rows,
        layout.chunk_first_seq.astype(jnp.int32),
        last_seq.reshape(rows, -1),
        key_dim,
        value_dim,
    )


def _state_dtype(dtype):
    # Half-precision callers get half-precision chunk states (they feed half-precision matmuls).
    return jnp.float32 if jnp.dtype(dtype) == jnp.float32 else dtype


def _config(p: Prepared, opts, config):
    if config is not None:
        return config
    return tuning.config_for(p.q.shape[-1], p.v.shape[-1], p.q.dtype, opts.interpret)


def _padded_boundary(p: Prepared, state):
    """An [N, H, K, V] initial state or final-state gradient in the kernels' padded dims; None
    (zeros, which the walks skip reading) stays None."""
    if state is None:
        return None
    return _pad_state(state.astype(jnp.float32), p.q.shape[-1], p.v.shape[-1])


def _final_states(p: Prepared, final, initial_state):
    """The walk's boundary output unpadded, None when it wrote none. An empty sequence's final
    state is its initial state (zeros when None)."""
    if final is None:
        return None
    empty = (p.layout.seq_last_chunk < 0)[:, None, None, None]
    initial = 0.0 if initial_state is None else initial_state
    return jnp.where(empty, initial, final[..., : p.key_dim, : p.value_dim])


def _scores(p: Prepared, opts, config):
    """What forward and backward both start from: the chunks' factorization spans, and b and the
    scores A of the chunks that take the exact path."""
    chunk, interpret = opts.chunk_size, opts.interpret
    spans, exact_b = gpu_forward.gate_spans(p.g, chunk=chunk, interpret=interpret)
    exact = gpu_forward.exact_scores(
        p.q, p.k, exact_b, spans, chunk=chunk, scale=opts.scale, config=config, interpret=interpret
    )
    return spans, exact_b, exact


def _sequence_chunks(p: Prepared):
    """[N, 2] int32: each sequence's first chunk and chunk count in the packed row (0, 0 when
    empty)."""
    first, last = p.layout.seq_first_chunk, p.layout.seq_last_chunk
    count = jnp.where(last >= 0, last - first + 1, 0)
    return jnp.stack([jnp.maximum(first, 0), count], axis=1)


def _walk_options(p: Prepared, opts, config):
    packed = p.layout.token_position is not None
    return dict(
        chunk=opts.chunk_size,
        state_dtype=_state_dtype(p.q.dtype),
        config=config,
        interpret=opts.interpret,
        num_seqs=p.layout.seq_last_chunk.shape[0],
        packed=packed,
        seq_chunks=_sequence_chunks(p) if packed and config.sequence_walks else None,
    )


def forward(q, k, v, g, initial_state, cu_seqlens, opts, config=None):
    o, final, _ = forward_keeping_states(q, k, v, g, initial_state, cu_seqlens, opts, config)
    return o, final


def forward_keeping_states(q, k, v, g, initial_state, cu_seqlens, opts, config=None):
    """``forward`` and the states entering every chunk, in the kernels' layout, for
    ``backward(..., states=)``."""
    p = prepare(q, k, v, g, cu_seqlens, opts.chunk_size)
    config = _config(p, opts, config)
    spans, _, exact = _scores(p, opts, config)
    states, final = gpu_forward.chunk_states(
        p.k,
        p.v,
        p.g,
        _padded_boundary(p, initial_state),
        p.first_seq,
        p.last_seq,
        writes_final=opts.output_final_state,
        **_walk_options(p, opts, config),
    )
    o = gpu_forward.chunk_outputs(
        p.q,
        p.k,
        p.g,
        spans,
        states,
        exact,
        p.v,
        chunk=opts.chunk_size,
        scale=opts.scale,
        out_dtype=q.dtype,
        config=config,
        interpret=opts.interpret,
    )
    o = _from_rows(p.layout, o, p.value_dim)
    return o, _final_states(p, final, initial_state), states


def _backward_states(p: Prepared, initial_state, do_rows, dfinal, opts, config, states):
    """The states entering every chunk (``states`` when the forward kept them), dH and dh0 (None
    without an initial state): the backward's two walks, or only the gradients' walk."""
    h0, dfinal_padded = _padded_boundary(p, initial_state), _padded_boundary(p, dfinal)
    walk = _walk_options(p, opts, config)
    writes_dh0 = initial_state is not None
    if states is None and config.paired_walks:
        return gpu_backward.backward_walks(
            p.q,
            p.k,
            p.v,
            do_rows,
            p.g,
            h0,
            dfinal_padded,
            p.first_seq,
            p.last_seq,
            scale=opts.scale,
            writes_dh0=writes_dh0,
            **walk,
        )
    if states is None:
        states, _ = gpu_forward.chunk_states(
            p.k, p.v, p.g, h0, p.first_seq, p.last_seq, writes_final=False, **walk
        )
    dstates, dh0 = gpu_backward.state_grads(
        p.q,
        do_rows,
        p.g,
        dfinal_padded,
        p.first_seq,
        p.last_seq,
        scale=opts.scale,
        writes_dh0=writes_dh0,
        **walk,
    )
    return states, dstates, dh0


def backward(q, k, v, g, initial_state, cu_seqlens, do, dfinal, opts, config=None, states=None):
    p = prepare(q, k, v, g, cu_seqlens, opts.chunk_size)
    config = _config(p, opts, config)
    chunk, scale, interpret = opts.chunk_size, opts.scale, opts.interpret
    spans, exact_b, exact = _scores(p, opts, config)
    do_rows = _to_rows(p.layout, do.astype(p.q.dtype), p.v.shape[-1])
    dscores = gpu_backward.score_grads(
        do_rows, p.v, chunk=chunk, config=config, interpret=interpret
    )
    states, dstates, dh0 = _backward_states(p, initial_state, do_rows, dfinal, opts, config, states)
    dv = gpu_backward.value_grads(
        p.q,
        p.k,
        p.g,
        spans,
        exact,
        do_rows,
        dstates,
        chunk=chunk,
        scale=scale,
        out_dtype=p.v.dtype,
        config=config,
        interpret=interpret,
    )
    dq, dk, dg = gpu_backward.query_key_grads(
        p.q,
        p.k,
        p.g,
        exact_b,
        spans,
        p.v,
        do_rows,
        states,
        dstates,
        dscores,
        chunk=chunk,
        scale=scale,
        dg_dtype=g.dtype,
        config=config,
        interpret=interpret,
    )
    # An empty sequence's final state is its initial state: its gradient passes straight through.
    dh0 = _final_states(p, dh0, None if dfinal is None else dfinal.astype(jnp.float32))
    unpad = lambda x, width: _from_rows(p.layout, x, width)  # noqa: E731
    return (
        unpad(dq, p.key_dim),
        unpad(dk, p.key_dim),
        unpad(dv, p.value_dim),
        unpad(dg, p.key_dim),
        dh0,
    )


class GpuBackend:
    name = "pallas_gpu"
    takes_absent_states = True

    @staticmethod
    def supports(q_shape, v_shape, dtype, opts) -> str | None:
        if jnp.dtype(dtype) not in DTYPES:
            return f"dtype {jnp.dtype(dtype).name} is not float32, bfloat16 or float16"
        key_dim, value_dim = q_shape[-1], v_shape[-1]
        if key_dim > MAX_KEY_DIM:
            return f"K = {key_dim} > {MAX_KEY_DIM}"
        if value_dim > MAX_VALUE_DIM:
            return f"V = {value_dim} > {MAX_VALUE_DIM}"
        if opts.chunk_size < 16:
            return f"chunk_size {opts.chunk_size} < 16 (Triton matmuls need 16)"
        if not opts.interpret and jax.default_backend() not in ("gpu", "cuda", "rocm"):
            return f"needs a GPU or interpret=True (default backend: {jax.default_backend()})"
        return None

    forward = staticmethod(forward)
    forward_keeping_states = staticmethod(forward_keeping_states)
    backward = staticmethod(backward)


BACKEND = GpuBackend
