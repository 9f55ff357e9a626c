"""The floor that every chunk form puts under the log gates.

The chunk forms take differences of float32 cumulative sums of the gates within a chunk. One
gate of -1e9 would leave those differences nothing but rounding, and -inf (a hard reset, the log
of a zero gate) would make them NaN. A decay of e ** -100 ~ 4e-44 is already zero to float32
(below its smallest normal number), so computing a lower gate as -100 changes no result, while
a chunk's sums stay within 64 * 100 and the first gate of a chunk, the one its factorization
span leaves unbounded, rounds the others' sums by no more than 100 * 2 ** -24. A floored gate's
gradient comes out as 0 or as a gate at the floor would have it (e ** -100 times the state's
terms): zero either way. The step form needs no floor.

Each backend applies it where it reads the gates (a separate pass over g would cost as much as
reading q).
"""

import jax.numpy as jnp

GATE_FLOOR = -100.0


def floor_gates(g):
    """g with every gate below ``GATE_FLOOR`` raised to it, in g's dtype."""
    return jnp.maximum(g, jnp.asarray(GATE_FLOOR, g.dtype))
