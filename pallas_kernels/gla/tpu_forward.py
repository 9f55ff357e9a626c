"""Mosaic TPU forward kernels for chunkwise GLA: chunk math shared with the backward, the forward
kernel (outputs and final states) and the states kernel (the state before every chunk, which the
backward recomputes instead of saving).

Every kernel sees one chunk of one (row, head) per grid step, as 2-D [C, D] tiles in VMEM, with
C a multiple of 16 and D a multiple of 128, and carries the running [K, V] state in a float32 VMEM
scratch buffer across the chunk axis (the last grid axis, "arbitrary").

Stability (as in reference.py): b is the chunk-local inclusive cumsum of the log gates, so b is
non-increasing along time. The intra-chunk scores sum_d q_id k_jd exp(b_id - b_jd), j <= i, are
split into sub-chunks of SUB rows. For row sub-chunk I starting at r, the columns j < r are a matmul
of q_i exp(b_i - b_r) against k_j exp(b_r - b_j): both exponents are <= 0. The diagonal sub-block is
computed in log space, one column j at a time on [SUB, K] tiles, with the exponent masked to -inf
above the diagonal *before* exp, so no inf is ever formed.

Matmuls take the input dtype (bf16 stays bf16) with float32 accumulation; float32 inputs ask for
full float32 precision, which TPUs otherwise emulate with a single bf16 pass.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gla.gates import floor_gates

SUB = 16  # secondary chunk: rows of one diagonal sub-block (a bf16 sublane tile)
F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Chunk math on values (no refs): shared by the forward, states and backward kernels
# --------------------------------------------------------------------------------------------


def matmul(a, b, *, contract=(1, 0), precision=None):
    """a @ b contracting a's axis contract[0] with b's axis contract[1]; float32 accumulation."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def exact(a, b, *, contract=(1, 0)):
    """A float32 matmul at full precision (for cumsums and reductions done on the MXU)."""
    return matmul(a.astype(F32), b.astype(F32), contract=contract, precision=lax.Precision.HIGHEST)


def positions(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def inclusive_cumsum(g):
    """[C, K] -> cumulative sums along time, as a lower-triangular matmul (float32)."""
    c = g.shape[0]
    lower = (positions((c, c), 1) <= positions((c, c), 0)).astype(F32)
    return exact(lower, g)


def reverse_cumsum(x):
    """[C, K] -> sums from each position to the end of the chunk (float32)."""
    c = x.shape[0]
    upper = (positions((c, c), 1) >= positions((c, c), 0)).astype(F32)
    return exact(upper, x)


def as_column(row):
    """[1, K] -> [K, 1] without a transpose: an exact matmul with a [1, 1] one."""
    return exact(row, jnp.ones((1, 1), F32), contract=(0, 0))


def row_of(x, j):
    """Row j (traced) of a [R, D] tile as [1, D]: a masked sum, exact, and no dynamic slicing."""
    return jnp.sum(jnp.where(positions(x.shape, 0) == j, x, 0.0), axis=0, keepdims=True)


def diagonal_decay(b, j):
    """exp(b_i - b_j) for the rows i of a sub-block, zero for i < j: [SUB, K].

    The diagonal sub-blocks go one column j at a time on 2-D tiles (a [SUB, SUB, K] tile would
    need relayouts Mosaic handles poorly); the exponent is masked before exp, so it is never
    positive.
    """
    above = positions(b.shape, 0) < j
    return jnp.exp(jnp.where(above, -jnp.inf, b - row_of(b, j)))


class Chunk:
    """Per-chunk quantities every kernel derives from the same tiles (a plain bundle)."""

    def __init__(self, q, k, v, g, *, scale, precision):
        self.dtype = k.dtype  # matmul input dtype
        self.precision = precision
        self.size = k.shape[0]
        self.qs = None if q is None else q.astype(F32) * scale
        self.k = k.astype(F32)
        self.v = v
        self.b = inclusive_cumsum(floor_gates(g.astype(F32)))  # [C, K], non-increasing in time
        self.b_last = row_of(self.b, self.size - 1)  # [1, K]
        self.decay_col = jnp.exp(as_column(self.b_last))  # [K, 1]: chunk decay of the state rows

    def mm(self, a, b, contract=(1, 0)):
        return matmul(
            a.astype(self.dtype), b.astype(self.dtype), contract=contract, precision=self.precision
        )

    def k_to_end(self):
        """k_j exp(b_last - b_j): how each key enters the state after the chunk."""
        return self.k * jnp.exp(self.b_last - self.b)

    def q_from_start(self):
        """q_i exp(b_i): how each query reads the state before the chunk."""
        return self.qs * jnp.exp(self.b)

    def rows(self, block):
        start = block * SUB
        return slice(start, start + SUB)

    def keys_before(self, block):
        """k_j exp(b_r - b_j) for j < r (r = first row of `block`), zero elsewhere: [C, K]."""
        r = block * SUB
        b_ref = self.b[r : r + 1, :]
        before = positions(self.b.shape, 0) < r
        # Zeroed by a select, not by exp(-inf) alone: a NaN key after r times 0 is still NaN.
        return jnp.where(before, self.k * jnp.exp(jnp.where(before, b_ref - self.b, -jnp.inf)), 0.0)

    def queries_after(self, block):
        """q_i exp(b_i - b_r') for i > r' (r' = last row of `block`), zero elsewhere: [C, K]."""
        r = block * SUB + SUB - 1
        b_ref = row_of(self.b, r)  # an unaligned row: selected, not sliced
        after = positions(self.b.shape, 0) > r
        return jnp.where(after, self.qs * jnp.exp(jnp.where(after, self.b - b_ref, -jnp.inf)), 0.0)

    def diagonal_scores(self, block):
        """sum_d q_id k_jd exp(b_id - b_jd) for i >= j in one diagonal sub-block: [SUB, SUB]."""
        rows = self.rows(block)
        qs, k, b = self.qs[rows], self.k[rows], self.b[rows]
        col_ids = positions((SUB, SUB), 1)

        def add_column(j, diag):
            decay = diagonal_decay(b, j)
            column = jnp.sum(qs * row_of(k, j) * decay, axis=1, keepdims=True)  # [SUB, 1]
            causal = positions((SUB, 1), 0) >= j  # rows above j: 0, even where k_j is NaN
            return jnp.where((col_ids == j) & causal, column, diag)

        return lax.fori_loop(0, SUB, add_column, jnp.zeros((SUB, SUB), F32))

    def scores(self, block):
        """Gated causal scores of row sub-block `block`: (off [SUB, C], diag [SUB, SUB]).

        off holds the columns of earlier sub-blocks (zero from the block's first row on); diag
        holds the block's own columns.
        """
        rows = self.rows(block)
        b_ref = self.b[block * SUB : block * SUB + 1, :]
        q_ref = self.qs[rows] * jnp.exp(self.b[rows] - b_ref)
        off = self.mm(q_ref, self.keys_before(block), contract=(1, 1))
        return off, self.diagonal_scores(block)

    def advance(self, state):
        """The state after the chunk from the state before it (float32 [K, V])."""
        update = self.mm(self.k_to_end(), self.v, contract=(0, 0))
        return self.decay_col * state + update


def chunk_output(chunk: Chunk, state):
    """o = (q exp(b)) S_before + sum_{j <= i} scores_ij v_j, float32 [C, V]."""
    inter = chunk.mm(chunk.q_from_start(), state)
    blocks = []
    for block in range(chunk.size // SUB):
        off, diag = chunk.scores(block)
        blocks.append(chunk.mm(off, chunk.v) + chunk.mm(diag, chunk.v[chunk.rows(block)]))
    return inter + jnp.concatenate(blocks, axis=0)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def start_state(first_seq_ref, h0_ref, state_ref, flat_chunk, chunk_index):
    """Zero the state at a row's first chunk; load the initial state where a sequence starts."""

    @pl.when(chunk_index == 0)
    def _():
        state_ref[...] = jnp.zeros_like(state_ref)

    @pl.when(first_seq_ref[flat_chunk] >= 0)
    def _():
        state_ref[...] = h0_ref[0, 0]


def forward_kernel(
    first_seq_ref,
    seq_ref,
    q_ref,
    k_ref,
    v_ref,
    g_ref,
    h0_ref,
    o_ref,
    final_ref,
    state_ref,
    *,
    scale,
    precision,
):
    del seq_ref  # used by the index maps only
    row, chunk_index = pl.program_id(0), pl.program_id(2)
    flat_chunk = row * pl.num_programs(2) + chunk_index
    start_state(first_seq_ref, h0_ref, state_ref, flat_chunk, chunk_index)
    chunk = Chunk(
        q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], g_ref[0, 0], scale=scale, precision=precision
    )
    state = state_ref[...]
    o_ref[0, 0] = chunk_output(chunk, state).astype(o_ref.dtype)
    after = chunk.advance(state)
    state_ref[...] = after
    # Written at every chunk of the sequence: the last write (its last chunk, or a zero-input
    # padding chunk after it, which leaves the state unchanged) is the one that lands in HBM.
    final_ref[0, 0] = after


def states_kernel(
    first_seq_ref, seq_ref, k_ref, v_ref, g_ref, h0_ref, states_ref, state_ref, *, precision
):
    del seq_ref
    row, chunk_index = pl.program_id(0), pl.program_id(2)
    flat_chunk = row * pl.num_programs(2) + chunk_index
    start_state(first_seq_ref, h0_ref, state_ref, flat_chunk, chunk_index)
    chunk = Chunk(None, k_ref[0, 0], v_ref[0, 0], g_ref[0, 0], scale=1.0, precision=precision)
    state = state_ref[...]
    states_ref[0, 0] = state
    state_ref[...] = chunk.advance(state)


def check_chunk_size(chunk_size: int) -> str | None:
    if chunk_size % SUB:
        return f"chunk_size must be a multiple of {SUB} (the sub-chunk), got {chunk_size}"
    return None
