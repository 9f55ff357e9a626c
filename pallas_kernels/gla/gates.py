"""The floor that every chunk form puts under the log gates.

The chunk forms take differences of float32 cumulative sums of the gates within a chunk. One
gate of -1e9 would leave those differences nothing but rounding, and -inf (a hard reset, the log
of a zero gate) would make them NaN. A decay of e ** -30 ~ 1e-13 is below float32's resolution
against anything a state holds, so computing a lower gate as -30 changes no result beyond
rounding, while a chunk's sums stay within 64 * 30 and round to ~1e-4 at worst. Its gradient
comes out as 0 or as a gate at the floor would have it (e ** -30 times the state's terms):
either is within float32's resolution of the true value. The step form needs no floor.

Each backend applies it where it reads the gates (a separate pass over g would cost as much as
reading q).
"""

import jax.numpy as jnp

GATE_FLOOR = -30.0


def floor_gates(g):
    """g with every gate below ``GATE_FLOOR`` raised to it, in g's dtype."""
    return jnp.maximum(g, jnp.asarray(GATE_FLOOR, g.dtype))
