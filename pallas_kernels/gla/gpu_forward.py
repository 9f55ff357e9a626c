"""Forward Pallas kernels for chunkwise GLA, lowered through Triton.

All kernels read the time-major rows layout ``[B', Tp, H, D]`` (``gpu.py`` builds it from the chunk
layout; for equal-length rows whose T is a multiple of the chunk size it is the caller's array
itself, so no transpose or copy is made). One program owns one chunk of one (row, head), or a tile
of it, so every chunk is read from HBM once per kernel and the chunk axis is parallel.

Four kernels make the forward. None reads a precomputed cumulative sum of the gates: each forms
the sums of its chunk's log gates that it needs (b, the chunk-local inclusive cumulative sum, and
its differences), in float32 and in log2 units (``b = log2(e) * cumsum(g)``), as tensor-core
matmuls of the gates with constant matrices of 0s, 1s and -1s (``gate_sums``), so that every
decay is one ``exp2``: the hardware's fast exponential, where ``exp`` would be a multi-instruction
library routine.

* ``gate_spans``: each chunk's span, the largest ``|b_i - b_mid|`` over its positions and K, which
  decides whether its intra-chunk scores are factorized; and b for the chunks that are not, which
  the exact kernels read (they index b by row, which a value in registers cannot be).
* ``chunk_states``: one program per (row, head, K tile, V tile) walks the chunks in order and
  stores the state entering every chunk (``[B', NC, H, K, V]``), resetting to a sequence's initial
  state at the chunk where it starts and writing each sequence's final state at its last chunk.
* ``exact_scores``: the gated causal scores ``A [B', Tp, H, C]`` (float32, scale included) of the
  chunks whose span exceeds ``FACTORIZE_SPAN`` (strong gates, resets), with secondary-level
  chunking taken all the way down (dyadic levels): the chunk's later half against its earlier
  half, then within each half its later quarter against its earlier one, and so on to single
  rows. Every pair (i, j) of a level has a reference row r between its positions, the first row
  of the later part, so both factors ``exp(b_i - b_r)`` and ``exp(b_r - b_j)`` are <= 1 for any
  gates, and each level is one tensor-core matmul over the whole chunk (six at C = 64, per K
  piece of 64). That replaced 16-row sub-chunks with log-space diagonal blocks, whose many small
  products and column loop made an exact chunk slow: under document resets at the 340M layer's
  shape the forward's extra time over mild gates fell from 0.079 to 0.040 ms (H200). A program
  takes a group of up to 8 consecutive chunks and passes over the factorizable ones
  (``exact_group``).
* ``chunk_outputs``: ``o = (q * scale * exp(b)) @ h + A @ v`` per (chunk, row * head), V a tile at a
  time. For a chunk whose span is at most ``FACTORIZE_SPAN`` (every chunk under ordinary gates) A is
  computed in place as one tensor-core matmul, ``(q * exp(b - b_mid)) @ (k * exp(b_mid - b))^T``,
  both factors within 2 ** +-48, and never stored (``chunk_scores``); for the others it is
  read from ``exact_scores``; either way once per chunk, shared by the V tiles. A separate launch
  for the exact path rather than a branch that computes it: a kernel's registers are allocated for
  its widest branch, and the exact path's would slow the common one (measured: one kernel with both
  took 1.63 ms where the whole-chunk matmul takes 0.27 ms, T = 2K, 16 x 128, H200).

Every exponent that could be positive for a masked entry is clamped at 0 first, so nothing
overflows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gla import tuning
from pallas_kernels.gla.gates import GATE_FLOOR, floor_gates

SUB_CHUNK = 16
LOG2E = math.log2(math.e)
# The marker for a squeezed block dimension (older jax spelled it None).
SQUEEZED = getattr(pl, "squeezed", None) or (pl.Squeezed() if hasattr(pl, "Squeezed") else None)
F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Helpers usable inside kernels (all shapes are powers of two, as the Triton lowering requires)
# --------------------------------------------------------------------------------------------


def _dot(a, b, dims, dtype):
    # float32 callers get IEEE float32 matmuls (the Triton lowering would otherwise pick TF32).
    precision = lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None
    return lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (dims, ((), ())),
        precision=precision,
        preferred_element_type=F32,
    )


def mm(a, b, dtype):
    """a @ b with operands in ``dtype`` and float32 accumulation."""
    return _dot(a, b, ((1,), (0,)), dtype)


def mm_tn(a, b, dtype):
    """a.T @ b."""
    return _dot(a, b, ((0,), (0,)), dtype)


def mm_nt(a, b, dtype):
    """a @ b.T."""
    return _dot(a, b, ((1,), (1,)), dtype)


def decay(x):
    """2 ** x for log2-unit gate differences (the fast hardware exponential)."""
    return jnp.exp2(x)


def safe_decay(x):
    """2 ** min(x, 0): a decay that is <= 1 where it is used and harmless where it is masked."""
    return jnp.exp2(jnp.minimum(x, 0.0))


def split_rows(x, parts: int):
    """Equal row blocks of a value (Triton has no general value slicing, but it has split)."""
    if parts == 1:
        return [x]
    return list(lax.split(x, [x.shape[0] // parts] * parts, axis=0))


def rows(ref, start, size, cols=slice(None)):
    """Rows [start, start + size) of a 2-D ref as float32."""
    return ref[pl.ds(start, size), cols].astype(F32)


def row(ref, index, cols=slice(None)):
    """Row ``index`` of a 2-D ref as a [1, D] float32 value."""
    return rows(ref, index, 1, cols)


def sub_chunk(chunk: int) -> int:
    return min(SUB_CHUNK, chunk)


def whole(shape):
    """A whole-array block (kernels index it with data-dependent sequence numbers)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def chunk_spec(chunk, heads, width, tiled=False):
    """[C, width] blocks of a [B', Tp, H, D] array, for a grid (chunk, row * head[, tile])."""
    if tiled:
        return pl.BlockSpec(
            (SQUEEZED, chunk, SQUEEZED, width), lambda c, bh, t: (bh // heads, c, bh % heads, t)
        )
    return pl.BlockSpec(
        (SQUEEZED, chunk, SQUEEZED, width), lambda c, bh, *_: (bh // heads, c, bh % heads, 0)
    )


def state_spec(key_block, value_block, heads, tile_axis=None, group=None):
    """The [BK, BV] block of a chunk's state in [B', NC, H, K, V], for a grid (chunk, row * head,
    tile); ``tile_axis`` says which of K or V the grid's third axis tiles. With ``group``, the
    [G, BK, BV] blocks of a group of consecutive chunks, for a grid (group, row * head, tile)."""

    def index(c, bh, t=0):
        kt, vt = (t, 0) if tile_axis == "k" else (0, t) if tile_axis == "v" else (0, 0)
        return (bh // heads, c, bh % heads, kt, vt)

    chunks = SQUEEZED if group is None else group
    return pl.BlockSpec((SQUEEZED, chunks, SQUEEZED, key_block, value_block), index)


def span_spec(heads, group=None):
    """The scalar span of one chunk in [B', NC, H], for a grid (chunk, row * head, ...); with
    ``group``, the [G] spans of a group of consecutive chunks, for a grid (group, row * head,
    ...)."""
    block = SQUEEZED if group is None else group
    return pl.BlockSpec((SQUEEZED, block, SQUEEZED), lambda c, bh, *_: (bh // heads, c, bh % heads))


def tile_loop(size: int, block: int, body, carry=None):
    """carry = body(slice, carry) over the [block]-wide tiles of [0, size). Several tiles run as
    a loop, not unrolled: its loads then index by the loop counter, and Triton's pipeliner (the
    launch's ``num_stages``) issues the next tile's loads while the current one computes; unrolled
    tiles wait on each load in turn."""
    count = size // block
    if count == 1:
        return body(pl.ds(0, block), carry)

    def step(t, carry):
        return body(pl.ds(pl.multiple_of(t * block, block), block), carry)

    return lax.fori_loop(0, count, step, carry)


def key_pieces(key_dim: int, block_k: int):
    """The static K slices of a loop over K pieces (unrolled: each piece's value is kept)."""
    return [pl.ds(t * block_k, block_k) for t in range(key_dim // block_k)]


def causal_mask(size, transposed=False):
    """[size, size]: row >= column (the scores' positions j <= i), or row <= column for A^T."""
    rows_, cols = (lax.broadcasted_iota(jnp.int32, (size, size), axis) for axis in (0, 1))
    return rows_ <= cols if transposed else rows_ >= cols


def params(warps, stages):
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


# --------------------------------------------------------------------------------------------
# Gate sums, formed where they are used; gate_spans
# --------------------------------------------------------------------------------------------

# Every kernel needs sums of a chunk's log gates along time: b_i from the chunk's start,
# b_last - b_i to its end, b_i - b_mid from its middle row, and b_last. Each [C, BK] sum is one
# tensor-core matmul of a constant [C, C] matrix of 0s, 1s and -1s with the gates, so the kernels
# read the log gates as given (bfloat16 for bfloat16 callers) rather than a float32 b that a
# separate pass wrote and every kernel read back: twice the gates' bytes, read by five launches.
# The products are exact and the sums float32, as a float32 cumulative sum; gates of other dtypes
# go in as three bfloat16 parts whose sum is exactly the float32 gate.
GATE_SUMS = ("from_start", "to_end", "from_mid")


def _time_weights(chunk: int, kind: str):
    """[C, C] bfloat16: row i weighs the gates at the positions t that ``kind``'s sum takes."""
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    t = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    if kind == "from_start":  # b_i = sum_{t <= i} g_t
        weights = (t <= i).astype(F32)
    elif kind == "to_end":  # b_last - b_i = sum_{t > i} g_t
        weights = (t > i).astype(F32)
    elif kind == "from_mid":  # b_i - b_mid
        weights = (t <= i).astype(F32) - (t <= chunk // 2).astype(F32)
    else:
        raise ValueError(f"gate sum must be one of {GATE_SUMS}, got {kind!r}")
    return weights.astype(jnp.bfloat16)


def _bfloat16_parts(g):
    """bfloat16 values that add up to g exactly (three carry float32's 24 significant bits)."""
    if g.dtype == jnp.bfloat16:
        return [g]
    rest, parts = g.astype(F32), []
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(F32)
    return parts


def gate_sums(g, kind: str, floored=True):
    """[C, BK] float32 sums along time of a chunk's log gates g [C, BK], in log2 units (so each
    decay is one ``exp2``): ``kind`` is 'from_start' (b), 'to_end' (b_last - b, <= 0) or
    'from_mid' (b - b_mid, the factorizations' exponent). The gates floored (``gates.py``),
    unless ``floored`` is False: for a factorizable chunk, whose gates are all above the floor
    (``gate_spans``), where the floor's registers would cost a kernel its speed."""
    weights = _time_weights(g.shape[0], kind)
    total = None
    for part in _bfloat16_parts(floor_gates(g) if floored else g):
        term = mm(weights, part, jnp.bfloat16)
        total = term if total is None else total + term
    return total * LOG2E


def gate_total(g, upto=None, floored=True):
    """[1, BK] float32: b_last, the chunk's whole decay in log2 units; or with ``upto``, b at
    that row (the sum of the gates up to and including it). The gates floored, unless
    ``floored`` is False (as in ``gate_sums``)."""
    g = g.astype(F32)
    g = floor_gates(g) if floored else g
    if upto is not None:
        g = jnp.where(lax.broadcasted_iota(jnp.int32, g.shape, 0) <= upto, g, 0.0)
    return jnp.sum(g, axis=0, keepdims=True) * LOG2E


def _gate_spans_kernel(g_ref, span_ref, b_ref):
    g = g_ref[...]
    # The chunk's factorization span: the largest |b_i - b_mid| over positions and K; infinite
    # where the first gate, which the span leaves out, is below the floor, so that every gate of
    # a factorizable chunk is above it (``gate_sums(floored=False)`` relies on that).
    span = jnp.max(jnp.abs(gate_sums(g, "from_mid")))
    span = jnp.where(jnp.min(row(g_ref, 0)) < GATE_FLOOR, jnp.inf, span)
    span_ref[...] = span

    @pl.when(jnp.logical_not(factorizable(span)))
    def _():
        b_ref[...] = gate_sums(g, "from_start")


def gate_spans(g, *, chunk, interpret):
    """spans [B', NC, H] float32: each chunk's largest |b_i - b_mid| (see ``factorizable``); and
    exact_b [B', Tp, H, K] float32, b in log2 units, written for the chunks that are not
    factorizable only: the exact kernels read it there; every other kernel forms its own gate
    sums, and the other rows of this buffer are left unwritten."""
    rows_, padded_len, heads, key_dim = g.shape
    spec = chunk_spec(chunk, heads, key_dim)
    return pl.pallas_call(
        _gate_spans_kernel,
        out_shape=(
            jax.ShapeDtypeStruct((rows_, padded_len // chunk, heads), F32),
            jax.ShapeDtypeStruct(g.shape, F32),
        ),
        grid=(padded_len // chunk, rows_ * heads),
        in_specs=[spec],
        out_specs=(span_spec(heads), spec),
        compiler_params=params(4, 1),
        interpret=interpret,
        name="gla_gate_spans",
    )(g)


# --------------------------------------------------------------------------------------------
# chunk_states
# --------------------------------------------------------------------------------------------


def _chunk_states_kernel(
    first_ref,
    last_ref,
    k_ref,
    v_ref,
    g_ref,
    h0_ref,
    states_ref,
    final_ref,
    *,
    row,
    head,
    kt,
    vt,
    chunk,
    chunks,
    block_k,
    block_v,
    dtype,
    prefetch,
    walk_seq,
):
    ks, vs = pl.ds(kt * block_k, block_k), pl.ds(vt * block_v, block_v)

    def load(c):
        return chunk_rows((g_ref, k_ref, v_ref), c, chunk)

    def step(c, state, loaded):
        g, k, v = loaded
        if walk_seq is None:  # where a sequence starts, its initial state replaces the carried one
            state = boundary_state(h0_ref, first_ref[row, c], state, head, ks, vs)
        states_ref[c] = state.astype(states_ref.dtype)
        k_to_end = k.astype(F32) * decay(gate_sums(g, "to_end"))
        state = state * decay(gate_total(g)).T + mm_tn(k_to_end, v, dtype)
        if walk_seq is None:
            store_boundary_state(final_ref, last_ref[row, c], state, head, ks, vs)
        return state

    init = walk_start(h0_ref, walk_seq, head, ks, vs, block_k, block_v)
    final = walk_chunks(chunks, load, step, init, prefetch=prefetch)
    walk_end(final_ref, walk_seq, final, head, ks, vs)


def walk_start(ref, walk_seq, head, ks, vs, block_k, block_v):
    """The state tile a walk starts from: its sequence's boundary state from ``ref``
    [N, H, K, V] for a walk of one sequence (``walk_seq``), else zeros (no state given, or the
    walk's sequences load theirs as they start)."""
    if ref is None or walk_seq is None:
        return jnp.zeros((block_k, block_v), F32)
    return ref[walk_seq, head, ks, vs]


def walk_end(ref, walk_seq, state, head, ks, vs):
    """Stores the state tile a walk of one sequence ends with, unless ``ref`` is None (nothing
    reads it). An empty sequence's walk takes no step and stores what it started from."""
    if ref is not None and walk_seq is not None:
        ref[walk_seq, head, ks, vs] = state


def boundary_state(ref, seq, carried, head, ks, vs):
    """For a walk across sequences, the state tile a step starts from: ``carried``, but where a
    sequence starts (``seq`` >= 0) that sequence's boundary state from ``ref`` [N, H, K, V], or
    zeros when ``ref`` is None (no state given)."""
    if ref is None:
        return jnp.where(seq >= 0, 0.0, carried)
    return lax.cond(seq >= 0, lambda: ref[jnp.maximum(seq, 0), head, ks, vs], lambda: carried)


def store_boundary_state(ref, seq, state, head, ks, vs):
    """For a walk across sequences, stores the state tile a sequence ends with where one ends
    (``seq`` >= 0), unless ``ref`` is None (nothing reads it)."""
    if ref is None:
        return

    @pl.when(seq >= 0)
    def _():
        ref[jnp.maximum(seq, 0), head, ks, vs] = state


def chunk_rows(refs, c, chunk):
    """Chunk c's rows of each [Tp, width] ref, as stored."""
    return tuple(ref[pl.ds(c * chunk, chunk), :] for ref in refs)


def walk_chunks(chunks, load, step, init, *, prefetch, reverse=False):
    """Runs carry = step(c, carry, load(c)) over the chunks ``chunks`` = (first, count, in_row)
    names in order (reverse: the last first): ``count`` chunks from ``first``, of a row of
    ``in_row``. first and count are static for whole rows, data for a packed row's sequences.

    With ``prefetch`` each step issues the next chunk's loads before its own arithmetic and
    carries them into the next step, so the walk waits on memory once rather than once per
    chunk. Only worth it where nothing else hides that wait: a walk is one chain of dependent
    steps, and a launch of one program per multiprocessor (long rows, few of them) has nothing to
    switch to; where several programs share a multiprocessor, the carried tiles cost the
    registers that let them (``tuning.prefetches``)."""
    first, count, in_row = chunks

    def chunk_at(i):
        return first + (count - 1 - i if reverse else i)

    def load_at(c):
        if isinstance(count, int):  # a whole row: every chunk index is in it
            return load(c)
        return load(jnp.clip(c, 0, in_row - 1))  # an empty sequence reads nothing outside the row

    if not prefetch:
        return lax.fori_loop(
            0, count, lambda i, carry: step(chunk_at(i), carry, load_at(chunk_at(i))), init
        )

    def ahead_step(i, carry_and_loaded):
        carry, loaded = carry_and_loaded
        ahead = load_at(chunk_at(jnp.minimum(i + 1, count - 1)))
        return step(chunk_at(i), carry, loaded), ahead

    return lax.fori_loop(0, count, ahead_step, (init, load_at(chunk_at(0))))[0]


@dataclasses.dataclass(frozen=True)
class StateWalk:
    """One walk over the chunks for ``state_walks``.

    body(first_ref, last_ref, key_ref, value_ref, g_ref, boundary_ref, per_chunk_ref,
    boundary_out_ref, *, row, head, kt, vt, chunk, chunks, block_k, block_v, dtype, prefetch,
    walk_seq, **options) walks the chunks ``chunks`` (``walk_chunks``) of row ``row`` and head
    ``head`` for the state tile (kt, vt). ``walk_seq``: the one sequence the walk covers (a whole
    unpacked row, or one sequence of a packed row), whose boundary states it loads before its
    first step and stores after its last; None for a walk across sequences (a packed row walked
    whole), which resets its state, and reads and writes boundary states, inside the loop where
    sequences start and end. Inside the loop they cost every step: the branch's tile must come
    out in the carried state's register layout (35-42% more instructions a step, BENCHMARKS.md
    7.16).

    key_side [B', Tp, H, K] and value_side [B', Tp, H, V] are its inputs; so is boundary
    [N, H, K, V] float32, the state each sequence's walk starts from (the initial state, or the
    final state's gradient), unless None (zeros: the body gets boundary_ref None).
    ``writes_boundary``: the walk also returns the state it ends each sequence with (the final
    state, or dh0); without it the body gets boundary_out_ref None. Neither a zero boundary nor
    an unread one is worth its [N, H, K, V] of traffic: at T = 1K each is 34-67 MB, read or
    written beside walks that are short of bandwidth already."""

    body: Callable
    key_side: jax.Array
    value_side: jax.Array
    boundary: jax.Array | None
    writes_boundary: bool = True
    options: dict = dataclasses.field(default_factory=dict)


def state_walks(
    walks,
    g,
    first_seq,
    last_seq,
    *,
    chunk,
    state_dtype,
    config,
    interpret,
    name,
    num_seqs,
    packed,
    seq_chunks=None,
):
    """Launches walks over the chunks of every (row, head, K tile, V tile), one program each, and
    returns each walk's (per-chunk [B', NC, H, K, V] in ``state_dtype``, boundary [N, H, K, V]
    float32 or None unless it ``writes_boundary``) outputs; N = ``num_seqs``; ``packed``: the
    rows hold several sequences each (cu_seqlens). ``seq_chunks`` [N, 2] int32 (first chunk,
    chunk count of each sequence of a packed row, B' = 1): one program per sequence instead,
    walking only its own chunks, so the sequences of a packed row are walked side by side rather
    than as one chain (the states reset at each sequence's start anyway); the chunks after the
    last sequence are left unwritten (their outputs are padding, dropped).

    The forward state recurrence (k, v, h0 -> states, final states) and its reverse (q, do,
    dfinal -> state gradients, dh0) share this launch. Several independent walks go in one launch,
    their programs interleaved: a walk is a chain of dependent steps that keeps a multiprocessor
    far from busy, and with few long sequences one walk alone has too few programs to fill the
    GPU, so two walks side by side take about the time of one."""
    first = walks[0].key_side
    rows_, padded_len, heads, key_dim = first.shape
    value_dim = walks[0].value_side.shape[-1]
    num_chunks = padded_len // chunk
    count = len(walks)
    per_sequence = seq_chunks is not None
    if per_sequence and rows_ != 1:
        raise ValueError(f"seq_chunks is for one packed row, got {rows_} rows")
    lanes = seq_chunks.shape[0] if per_sequence else rows_  # walks per head
    if interpret:  # the tiles as configured: shrinking only adds grid steps to interpret
        block_k, block_v = min(config.state_block_k, key_dim), min(config.state_block_v, value_dim)
    else:
        block_k, block_v = tuning.state_tiles(config, key_dim, value_dim, count * lanes * heads)
    programs = count * lanes * heads * (key_dim // block_k) * (value_dim // block_v)

    def row_of(i):  # program i's row: its lane's, or the packed row
        return 0 if per_sequence else (i // count) // heads

    def seq_spec(width_block, tile_axis):
        def index(kt, vt, i):
            return (row_of(i), 0, (i // count) % heads, kt if tile_axis == "k" else vt)

        return pl.BlockSpec((SQUEEZED, padded_len, SQUEEZED, width_block), index)

    per_chunk_spec = pl.BlockSpec(
        (SQUEEZED, num_chunks, SQUEEZED, block_k, block_v),
        lambda kt, vt, i: (row_of(i), 0, (i // count) % heads, kt, vt),
    )
    common = dict(
        chunk=chunk,
        block_k=block_k,
        block_v=block_v,
        dtype=first.dtype,
        prefetch=tuning.prefetches(config, count, programs, (block_k, block_v)),
    )
    crosses_sequences = packed and not per_sequence
    # Each walk reads its key and value sides, and its boundary state when it has one.
    num_inputs = sum(2 + (walk.boundary is not None) for walk in walks)

    def kernel(first_ref, last_ref, *refs):
        kt, vt, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        if per_sequence:
            chunks_ref, g_ref, *refs = refs
            lane = (i // count) // heads
            chunks = (chunks_ref[lane, 0], chunks_ref[lane, 1], num_chunks)
        else:
            g_ref, *refs = refs
            chunks = (0, num_chunks, num_chunks)
        inputs, outputs = iter(refs[:num_inputs]), iter(refs[num_inputs:])
        for w, walk in enumerate(walks):
            key_ref, value_ref = next(inputs), next(inputs)
            boundary_ref = None if walk.boundary is None else next(inputs)
            per_chunk_ref = next(outputs)
            boundary_out_ref = next(outputs) if walk.writes_boundary else None

            def run(
                walk=walk,
                refs=(key_ref, value_ref, g_ref, boundary_ref, per_chunk_ref, boundary_out_ref),
            ):
                walk.body(
                    first_ref,
                    last_ref,
                    *refs,
                    row=row_of(i),
                    # One sequence a lane (the row, or one sequence of the packed row) or not.
                    walk_seq=None if crosses_sequences else (i // count) // heads,
                    head=(i // count) % heads,
                    kt=kt,
                    vt=vt,
                    chunks=chunks,
                    **common,
                    **walk.options,
                )

            if count == 1:
                run()
            else:
                pl.when(i % count == w)(run)

    boundary_shape = (num_seqs, heads, key_dim, value_dim)
    in_specs, inputs, out_specs, out_shape = [], [], [], []
    for walk in walks:
        in_specs += [seq_spec(block_k, "k"), seq_spec(block_v, "v")]
        inputs += [walk.key_side, walk.value_side]
        if walk.boundary is not None:
            in_specs.append(whole(boundary_shape))
            inputs.append(walk.boundary)
        out_specs.append(per_chunk_spec)
        out_shape.append(
            jax.ShapeDtypeStruct((rows_, num_chunks, heads, key_dim, value_dim), state_dtype)
        )
        if walk.writes_boundary:
            out_specs.append(whole(boundary_shape))
            out_shape.append(jax.ShapeDtypeStruct(boundary_shape, F32))
    ranges = [seq_chunks] if per_sequence else []
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        # The tiles first (CUDA launches grid axis 0 fastest): the tiles of one (walk, row, head)
        # run side by side, so the K tiles share each chunk's values and the V tiles its keys
        # and gates in L2, each read from HBM about once. With the tiles last, a launch of more
        # programs than fit at once ran the tiles of one head in different waves, and the
        # V tiles each read the keys and gates again.
        grid=(key_dim // block_k, value_dim // block_v, count * lanes * heads),
        in_specs=[
            whole(first_seq.shape),
            whole(last_seq.shape),
            *[whole(r.shape) for r in ranges],
            seq_spec(block_k, "k"),
            *in_specs,
        ],
        out_specs=tuple(out_specs),
        compiler_params=params(config.state_warps, config.state_stages),
        interpret=interpret,
        name=name,
    )(first_seq, last_seq, *ranges, g, *inputs)
    outs = iter(outs)
    return [(next(outs), next(outs) if walk.writes_boundary else None) for walk in walks]


def states_walk(k, v, h0, writes_final=True):
    """The forward state recurrence as a ``StateWalk``: k, v, h0 -> states, final states."""
    return StateWalk(_chunk_states_kernel, k, v, h0, writes_final)


def chunk_states(k, v, g, h0, first_seq, last_seq, *, writes_final=True, **launch):
    """States entering every chunk [B', NC, H, K, V] and final states [N, H, K, V] float32 (None
    unless ``writes_final``); h0 None: every sequence starts from zeros. ``launch``:
    state_walks' chunk, state_dtype, config, interpret, num_seqs, packed and seq_chunks."""
    walk = states_walk(k, v, h0, writes_final)
    (result,) = state_walks([walk], g, first_seq, last_seq, name="gla_chunk_states", **launch)
    return result


# --------------------------------------------------------------------------------------------
# Intra-chunk scores: exact_scores, chunk_scores, transposed_scores_and_decayed_keys
# --------------------------------------------------------------------------------------------


# The largest log2 decay a factorization may put into one factor. A block of scores is factorized
# around a reference row m as (q_i * 2 ** (b_i - b_m)) . (k_j * 2 ** (b_m - b_j)); while every
# |b - b_m| is at most this, the factors stay within 2 ** +-48, far from bfloat16 and float32
# overflow and underflow, and each product is as accurate as the unfactorized term. Wider spans
# (strong gates, document resets) take the exact path.
FACTORIZE_SPAN = 48.0


def factorizable(span):
    """Whether a chunk of this span takes the factorized path. NaN spans take the exact path: the
    two paths test this same predicate, so exactly one of them writes every chunk."""
    return span <= FACTORIZE_SPAN


def factor_dtype(dtype):
    """Operand dtype of a factorized matmul. float16 ends at 2 ** 16, short of the factors' range,
    so float16 callers get float32 operands."""
    return F32 if jnp.dtype(dtype) == jnp.float16 else dtype


def factorized_scores(q, k, from_mid, dtype):
    """Unmasked scores sum_d q_id k_jd 2 ** (b_id - b_jd) of a block as one matmul around a
    reference row m, from_mid = b - b_m (the caller has checked the span: ``factorizable``)."""
    return mm_nt(q * decay(from_mid), k * decay(-from_mid), factor_dtype(dtype))


def diagonal_span(b_ref, base, sub):
    """The largest decay (log2 units) across sub-chunk [base, base + sub), over K: a scalar."""
    return jnp.max(row(b_ref, base) - row(b_ref, base + sub - 1))


def dyadic_levels(size: int):
    """Half-widths h = size / 2, ..., 2, 1 of the levels that split a chunk's pairs."""
    return [size >> level for level in range(1, size.bit_length())]


def dyadic_pairs(size: int, h: int):
    """[size, size] mask of level h's pairs: (i, j) in one block of 2h rows, i in its later half
    and j in its earlier half. Every pair i > j belongs to exactly one level: the one of the
    highest bit in which i and j differ."""
    i = lax.broadcasted_iota(jnp.int32, (size, size), 0)
    j = lax.broadcasted_iota(jnp.int32, (size, size), 1)
    return (i // (2 * h) == j // (2 * h)) & (i % (2 * h) >= h) & (j % (2 * h) < h)


def dyadic_reference(b_ref, size: int, h: int, cols, base=0):
    """[size, BK]: for each row of the block at rows [base, base + size) of ``b_ref``, b at its
    level-h reference position, the first row of its 2h-block's later half (a strided load,
    repeated over each block). With gates <= 0, b falls along the chunk, so for a level-h pair
    b_i <= b_ref <= b_j: both factors 2 ** (b_i - b_ref) and 2 ** (b_ref - b_j) are <= 1
    whatever the gates, and their product is the pair's decay."""
    blocks = size // (2 * h)
    references = b_ref[pl.ds(base + h, blocks, stride=2 * h), cols]
    width = references.shape[-1]
    repeated = jnp.broadcast_to(references[:, None, :], (blocks, 2 * h, width))
    return repeated.reshape(size, width)


# K piece of exact_scores' loop: [C, 64] float32 tiles of q, k, b and both factors fit registers.
EXACT_BLOCK_K = 64


def each_exact_chunk(span_ref, body):
    """body(c) for each chunk c of the program's group (``exact_group``; span_ref [G]) whose
    span rules the factorization out: a loop, so the body is compiled once. The group's spans
    are first read in one load and the loop skipped when none is exact, as for nearly every
    group under ordinary gates: the loop reads one span per step, each read waiting on the
    last."""
    exact_count = jnp.sum(jnp.where(factorizable(span_ref[...]), 0, 1))  # NaN counts as exact

    @pl.when(exact_count > 0)
    def _():
        def one_chunk(c, carry):
            pl.when(jnp.logical_not(factorizable(span_ref[c])))(lambda: body(c))
            return carry

        lax.fori_loop(0, span_ref.shape[0], one_chunk, 0)


def _exact_scores_kernel(span_ref, q_ref, k_ref, b_ref, a_ref, *, scale, block_k, dtype):
    """The scores of each of the program's chunks whose span rules the factorization out."""
    chunk = a_ref.shape[-1]

    def store(c):
        a_ref[pl.ds(c * chunk, chunk), :] = dyadic_scores(
            (q_ref, k_ref, b_ref), c * chunk, chunk, scale=scale, block_k=block_k, dtype=dtype
        )

    each_exact_chunk(span_ref, store)


def dyadic_scores(refs, base, chunk, *, scale, block_k, dtype):
    """[C, C] float32 scores of the chunk at rows [base, base + C) of (q_ref, k_ref, b_ref), in
    dyadic levels: the diagonal (decay 1) elementwise and each level's pairs as one tensor-core
    matmul of factors that are at most 1: six matmuls per K piece at C = 64, whatever the gates."""
    q_ref, k_ref, b_ref = refs
    on_diagonal = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) == (
        lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    )
    scores = jnp.zeros((chunk, chunk), F32)
    for ks in key_pieces(q_ref.shape[-1], block_k):
        q = rows(q_ref, base, chunk, ks) * scale
        k = rows(k_ref, base, chunk, ks)
        b = rows(b_ref, base, chunk, ks)
        scores += jnp.where(on_diagonal, jnp.sum(q * k, axis=1, keepdims=True), 0.0)
        for h in dyadic_levels(chunk):
            b_r = dyadic_reference(b_ref, chunk, h, ks, base)
            level = mm_nt(q * safe_decay(b - b_r), k * safe_decay(b_r - b), factor_dtype(dtype))
            scores += jnp.where(dyadic_pairs(chunk, h), level, 0.0)
    return scores


# The exact launches take up to this many consecutive chunks per program (a loop).
EXACT_GROUP = 32


def exact_group(num_chunks: int, lanes: int, min_programs: int) -> int:
    """Chunks per program of the exact launches (exact_scores, query_key_grads_exact): the
    largest power of two up to EXACT_GROUP that divides a row's ``num_chunks`` and leaves the
    launch at least ``min_programs`` programs of its ``lanes`` ((row, head) pairs, times K tiles
    where the grid has them); 1 (a program per chunk) when ``min_programs`` is 0.

    Most chunks are factorizable, and a group with no exact chunk is skipped after one read of
    its spans (``each_exact_chunk``): such a launch takes 0.003-0.006 ms (H100), where reading
    the spans one chunk at a time took 0.020-0.027 ms with or without grouping (BENCHMARKS.md,
    versions 7.2 and 7.4). Enough programs are kept that a launch where every chunk takes this
    path (strong gates) still fills the GPU several times over; 32 chunks a program timed the
    same as 8 under ordinary gates."""
    group = 1
    while (
        min_programs > 0
        and group < EXACT_GROUP
        and num_chunks % (2 * group) == 0
        and num_chunks // (2 * group) * lanes >= min_programs
    ):
        group *= 2
    return group


def exact_scores(q, k, b, spans, *, chunk, scale, config, interpret):
    """A [B', Tp, H, C] float32, scale * sum_d q_id k_jd exp(b_id - b_jd) for j <= i, written for
    the chunks that are not ``factorizable`` only: the kernels that use A compute it themselves
    for the others (``chunk_scores``, ``transposed_scores_and_decayed_keys``), and those rows of
    this buffer are left unwritten. Each program loops over a group of consecutive chunks
    (``exact_group``), passing over the others after reading their spans."""
    rows_, padded_len, heads, key_dim = q.shape
    num_chunks = padded_len // chunk
    group = exact_group(num_chunks, rows_ * heads, config.exact_min_programs)
    key = chunk_spec(group * chunk, heads, key_dim)
    return pl.pallas_call(
        functools.partial(
            _exact_scores_kernel,
            scale=scale,
            block_k=min(EXACT_BLOCK_K, key_dim),
            dtype=q.dtype,
        ),
        out_shape=jax.ShapeDtypeStruct((rows_, padded_len, heads, chunk), F32),
        grid=(num_chunks // group, rows_ * heads),
        in_specs=[span_spec(heads, group), key, key, key],
        out_specs=chunk_spec(group * chunk, heads, chunk),
        compiler_params=params(config.scores_warps, 1),
        interpret=interpret,
        name="gla_exact_scores",
    )(spans, q, k, b)


def chunk_scores(span, q_ref, k_ref, g_ref, exact_ref, *, scale, block_k, dtype):
    """Inside chunk_outputs, the chunk's causal scores A [C, C] (zero above the diagonal): where
    ``span`` allows, one matmul factorized around the middle row, K a piece at a time; else the
    rows ``exact_scores`` wrote. The load branch is light, so the common path keeps its
    registers."""
    chunk, key_dim = q_ref.shape

    def factorized():
        scores = jnp.zeros((chunk, chunk), F32)
        for ks in key_pieces(key_dim, block_k):
            q = q_ref[:, ks].astype(F32) * scale
            from_mid = gate_sums(g_ref[:, ks], "from_mid", floored=False)  # factorizable
            scores += factorized_scores(q, k_ref[:, ks].astype(F32), from_mid, dtype)
        return jnp.where(causal_mask(chunk), scores, 0.0)

    return lax.cond(factorizable(span), factorized, lambda: exact_ref[...])


def decayed_queries(q_ref, g_ref, *, scale, block_k, dtype):
    """chunk_outputs' factors q * scale * exp(b) [C, BK] in ``dtype``, one per K piece."""
    return [
        (q_ref[:, ks].astype(F32) * (scale * decay(gate_sums(g_ref[:, ks], "from_start")))).astype(
            dtype
        )
        for ks in key_pieces(q_ref.shape[1], block_k)
    ]


def transposed_scores_and_decayed_keys(
    span, q_ref, k_ref, g_ref, exact_ref, *, scale, block_k, dtype
):
    """Inside value_grads, A^T [C, C] (zero below the diagonal; formed as such, keys on the left,
    rather than transposed afterwards) and the keys decayed to the chunk's end,
    k * exp(b_last - b) [C, BK] in ``dtype``, one per K piece.

    One pass over the K pieces, each piece's q, k and g read once (BENCHMARKS.md, version 7.9:
    two passes re-read them and waited on them; loading the next piece ahead was slower where it
    spilled). Per piece one gate-sum matmul forms b_last - b (as its own sum, not as a
    difference, which would lose its small values to the rounding of large ones under strong
    gates), and b - b_mid follows from it and column sums (as in query_key_grads' factorized
    kernel; the column sums hold the chunk's first gate, the one gate the span does not bound,
    but their rounding is the same for every row of a column and cancels in each product of the
    two factors; ``gates.GATE_FLOOR`` bounds it anyway). Where ``span`` allows, A^T is the sum of
    the pieces' factorized terms around the middle row; else the rows ``exact_scores`` wrote, and
    the factorized terms formed for such a chunk are discarded, their exponents clamped so that
    nothing overflows."""
    chunk, key_dim = q_ref.shape
    mid = chunk // 2
    scores, factors = jnp.zeros((chunk, chunk), F32), []
    for ks in key_pieces(key_dim, block_k):
        q, k, g = q_ref[:, ks], k_ref[:, ks], g_ref[:, ks]
        q, k = q.astype(F32) * scale, k.astype(F32)
        to_end = gate_sums(g, "to_end")
        factors.append((k * decay(to_end)).astype(dtype))
        from_mid = gate_total(g) - gate_total(g, upto=mid) - to_end
        from_mid = jnp.clip(from_mid, -FACTORIZE_SPAN, FACTORIZE_SPAN)
        scores += factorized_scores(k, q, -from_mid, dtype)  # the same factors, keys on the left

    def factorized():
        return jnp.where(causal_mask(chunk, transposed=True), scores, 0.0)

    return lax.cond(factorizable(span), factorized, lambda: exact_ref[...].T), factors


# --------------------------------------------------------------------------------------------
# chunk_outputs
# --------------------------------------------------------------------------------------------


def scored_tiles_kernel(
    span_ref,
    q_ref,
    k_ref,
    g_ref,
    exact_ref,
    rows_ref,
    state_ref,
    out_ref,
    *,
    scale,
    block_v,
    block_k,
    dtype,
    transposed=False,
):
    """out = scores @ rows + sum over K pieces of factor @ state[piece], a V tile at a time (a
    ``tile_loop``): chunk_outputs' o = A @ v + (q * scale * exp(b)) @ h, or with ``transposed``
    value_grads' dv = A^T @ do + (k * exp(b_last - b)) @ dH. The scores and the per-piece
    factors are formed once and shared by the tiles."""
    span = span_ref[...]
    sizes = dict(scale=scale, block_k=block_k, dtype=dtype)
    if transposed:
        scores, factors = transposed_scores_and_decayed_keys(
            span, q_ref, k_ref, g_ref, exact_ref, **sizes
        )
    else:  # two passes: the one-pass order was slower here (BENCHMARKS.md, version 7.10)
        scores = chunk_scores(span, q_ref, k_ref, g_ref, exact_ref, **sizes)
        factors = decayed_queries(q_ref, g_ref, **sizes)
    scores = scores.astype(dtype)
    pieces = key_pieces(q_ref.shape[1], block_k)

    def v_tile(vs, carry):
        out = mm(scores, rows_ref[:, vs], dtype)  # intra-chunk
        for ks, factor in zip(pieces, factors, strict=True):  # inter-chunk, through the state
            out += mm(factor, state_ref[ks, vs], dtype)
        out_ref[:, vs] = out.astype(out_ref.dtype)
        return carry

    tile_loop(rows_ref.shape[1], block_v, v_tile)


def scored_tiles(
    q,
    k,
    g,
    spans,
    exact,
    rows_in,
    states,
    *,
    chunk,
    scale,
    out_dtype,
    block_v,
    block_k,
    warps,
    stages,
    transposed,
    interpret,
    name,
):
    """``scored_tiles_kernel`` launched per (chunk, row * head): [B', Tp, H, V] from
    ``rows_in`` (v or do) and the per-chunk ``states`` (states or dH), its V tile and K piece at
    most ``block_v`` and ``block_k``."""
    rows_, padded_len, heads, key_dim = q.shape
    value_dim = rows_in.shape[-1]
    key = chunk_spec(chunk, heads, key_dim)
    value = chunk_spec(chunk, heads, value_dim)
    kernel = functools.partial(
        scored_tiles_kernel,
        scale=scale,
        block_v=min(block_v, value_dim),
        block_k=min(block_k, key_dim),
        dtype=q.dtype,
        transposed=transposed,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows_, padded_len, heads, value_dim), out_dtype),
        grid=(padded_len // chunk, rows_ * heads),
        in_specs=[
            span_spec(heads),
            key,
            key,
            key,
            chunk_spec(chunk, heads, chunk),
            value,
            state_spec(key_dim, value_dim, heads),
        ],
        out_specs=value,
        compiler_params=params(warps, stages),
        interpret=interpret,
        name=name,
    )(spans, q, k, g, exact, rows_in, states)


def chunk_outputs(q, k, g, spans, states, exact, v, *, chunk, scale, out_dtype, config, interpret):
    """o [B', Tp, H, V] per (chunk, row * head), V a tile at a time, from the states entering each
    chunk and the intra-chunk scores (``exact``: ``exact_scores``' output, read only for the
    chunks that are not factorizable)."""
    return scored_tiles(
        q,
        k,
        g,
        spans,
        exact,
        v,
        states,
        chunk=chunk,
        scale=scale,
        out_dtype=out_dtype,
        block_v=config.output_block_v,
        block_k=config.output_block_k,
        warps=config.output_warps,
        stages=config.output_stages,
        transposed=False,
        interpret=interpret,
        name="gla_chunk_outputs",
    )
