"""The chunk layout of packed sequences: every token lands in its own sequence's chunks, every
sequence starts on a chunk boundary, and the slots between them are zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla.layout import make_layout


def _padded_by_loop(x, cu, chunk, padded_len):
    """The oracle: each sequence copied to the next chunk boundary, one token at a time."""
    out = np.zeros((1, padded_len) + x.shape[2:], x.dtype)
    start = 0
    for n in range(len(cu) - 1):
        for t in range(cu[n], cu[n + 1]):
            out[0, start + t - cu[n]] = x[0, t]
        start += -(-(cu[n + 1] - cu[n]) // chunk) * chunk
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_tokens_move_to_their_chunks_and_back(seed):
    rng = np.random.default_rng(seed)
    chunk = 16
    lengths = rng.integers(0, 40, size=6)
    lengths[rng.integers(0, 6)] = 0  # an empty sequence among them
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    seq_len = int(cu[-1])
    x = rng.standard_normal((1, seq_len, 2, 3)).astype(np.float32)
    layout = jax.jit(lambda c: make_layout(1, seq_len, chunk, c))(jnp.asarray(cu))

    chunked = layout.to_chunked(jnp.asarray(x))  # [1, H, Tp, D]
    expected = _padded_by_loop(x, cu, chunk, layout.padded_len)
    np.testing.assert_array_equal(np.asarray(jnp.swapaxes(chunked, 1, 2)), expected)
    np.testing.assert_array_equal(np.asarray(layout.from_chunked(chunked)), x)

    # Each sequence's first and last chunk hold its first and last token (-1: empty).
    positions = np.asarray(layout.token_position)
    for n, length in enumerate(lengths):
        first, last = int(layout.seq_first_chunk[n]), int(layout.seq_last_chunk[n])
        if length == 0:
            assert first == last == -1
        else:
            assert first == positions[cu[n]] // chunk and last == positions[cu[n + 1] - 1] // chunk
