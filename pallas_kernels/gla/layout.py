"""Chunk bookkeeping shared by every chunked backend (xla, pallas_gpu, pallas_tpu).

The chunked algorithm wants every chunk to belong to exactly one sequence. The op's callers give
either a batch of equal-length rows ([B, T, ...]) or, with ``cu_seqlens``, several sequences packed
into one row. ``ChunkLayout`` maps both onto one internal form:

* head-major ``[B', H, Tp, D]`` with ``Tp`` a multiple of the chunk size,
* every sequence starting on a chunk boundary (packed sequences are moved apart; the gaps and the
  tail are zeros, which a zero key/value and a zero log-gate make inert),
* ``chunk_first_seq[b, c]``: the sequence whose first chunk is chunk ``c`` of row ``b`` (its state
  starts from that sequence's initial state), or -1 where the chunk continues the previous one,
* ``seq_first_chunk[n]`` / ``seq_last_chunk[n]``: the flat index ``b * NC + c`` of sequence
  ``n``'s first / last chunk, or -1 when the sequence is empty (its final state is then its
  initial state).

``to_chunked`` is an injective gather (each padded slot reads its caller token, or zero), so its
transpose is ``from_chunked``: a hand-written backward maps output cotangents in with
``to_chunked`` and input gradients out with ``from_chunked``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ChunkLayout(NamedTuple):
    chunk_size: int
    seq_len: int  # T of the caller's arrays
    padded_len: int  # Tp
    # For packed input: the padded position of each caller token, [T], and the caller token of
    # each padded position, [Tp] (T for the gaps and the tail); None when not packed.
    token_position: jax.Array | None
    position_token: jax.Array | None
    chunk_first_seq: jax.Array  # [B', NC] int32
    seq_first_chunk: jax.Array  # [N] int32
    seq_last_chunk: jax.Array  # [N] int32

    @property
    def num_chunks(self) -> int:
        return self.padded_len // self.chunk_size

    def to_chunked(self, x: jax.Array) -> jax.Array:
        """[B, T, H, D] caller layout -> [B', H, Tp, D] chunk-aligned, zero-filled."""
        if self.token_position is None:
            x = jnp.pad(x, ((0, 0), (0, self.padded_len - self.seq_len), (0, 0), (0, 0)))
        else:
            # A gather, one pass writing each slot once; a scatter into a zeroed buffer would write
            # the buffer twice (the zeros, then the tokens).
            x = x.at[:, self.position_token].get(mode="fill", fill_value=0)
        return jnp.swapaxes(x, 1, 2)

    def from_chunked(self, x: jax.Array) -> jax.Array:
        """[B', H, Tp, D] -> [B, T, H, D]; drops the padding."""
        x = jnp.swapaxes(x, 1, 2)
        if self.token_position is None:
            return x[:, : self.seq_len]
        return x[:, self.token_position]

    def gather_final_states(self, states_after: jax.Array, initial_state: jax.Array) -> jax.Array:
        """Final state of every sequence.

        states_after: [B', NC, H, K, V], the state after each chunk; initial_state: [N, H, K, V].
        """
        flat = states_after.reshape((-1,) + states_after.shape[2:])
        last = jnp.maximum(self.seq_last_chunk, 0)
        empty = (self.seq_last_chunk < 0)[:, None, None, None]
        return jnp.where(empty, initial_state, flat[last])

    def chunk_initial_states(self, initial_state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(starts [B', NC] bool, per-chunk initial state index [B', NC] clamped to >= 0)."""
        starts = self.chunk_first_seq >= 0
        return starts, jnp.maximum(self.chunk_first_seq, 0)


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def make_layout(batch: int, seq_len: int, chunk_size: int, cu_seqlens=None) -> ChunkLayout:
    """Builds the chunk layout for B rows of T tokens, or for packed sequences (B == 1)."""
    if cu_seqlens is None:
        padded_len = round_up(max(seq_len, 1), chunk_size)
        num_chunks = padded_len // chunk_size
        chunk_first_seq = jnp.full((batch, num_chunks), -1, jnp.int32)
        chunk_first_seq = chunk_first_seq.at[:, 0].set(jnp.arange(batch, dtype=jnp.int32))
        seq_first_chunk = jnp.arange(batch, dtype=jnp.int32) * num_chunks
        seq_last_chunk = seq_first_chunk + (round_up(seq_len, chunk_size) // chunk_size - 1)
        if seq_len == 0:
            seq_first_chunk = seq_last_chunk = jnp.full((batch,), -1, jnp.int32)
        return ChunkLayout(
            chunk_size,
            seq_len,
            padded_len,
            None,
            None,
            chunk_first_seq,
            seq_first_chunk,
            seq_last_chunk,
        )

    num_seqs = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.astype(jnp.int32)
    lengths = cu[1:] - cu[:-1]
    padded_lengths = (lengths + chunk_size - 1) // chunk_size * chunk_size
    padded_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded_lengths)])
    # Every sequence wastes fewer than chunk_size slots, so this bound is static and sufficient.
    padded_len = round_up(max(seq_len + num_seqs * (chunk_size - 1), 1), chunk_size)
    num_chunks = padded_len // chunk_size

    tokens = jnp.arange(seq_len, dtype=jnp.int32)
    seq_of_token = jnp.clip(jnp.searchsorted(cu[1:], tokens, side="right"), 0, num_seqs - 1)
    token_position = tokens - cu[seq_of_token] + padded_starts[seq_of_token]
    positions = jnp.arange(padded_len, dtype=jnp.int32)
    seq_of_position = jnp.clip(
        jnp.searchsorted(padded_starts[1:], positions, side="right"), 0, num_seqs - 1
    )
    offset = positions - padded_starts[seq_of_position]
    position_token = jnp.where(
        offset < lengths[seq_of_position], cu[seq_of_position] + offset, seq_len
    )

    first_chunk = jnp.where(lengths > 0, padded_starts[:-1] // chunk_size, num_chunks)
    chunk_first_seq = jnp.full((num_chunks,), -1, jnp.int32)
    chunk_first_seq = chunk_first_seq.at[first_chunk].set(
        jnp.arange(num_seqs, dtype=jnp.int32), mode="drop"
    )
    seq_last_chunk = jnp.where(lengths > 0, padded_starts[1:] // chunk_size - 1, -1)
    return ChunkLayout(
        chunk_size,
        seq_len,
        padded_len,
        token_position,
        position_token,
        chunk_first_seq[None, :],
        jnp.where(lengths > 0, first_chunk, -1).astype(jnp.int32),
        seq_last_chunk.astype(jnp.int32),
    )
