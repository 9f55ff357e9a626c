"""The MQAR comparison's third model: GLA without its forget gate (plain linear attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gla_jax.layers import GatedLinearAttention
from gla_jax.model import GLALM, GLAConfig


def _layer(use_forget_gate):
    return GatedLinearAttention(
        32,
        num_heads=2,
        use_forget_gate=use_forget_gate,
        init_std=0.3,
        dtype=jnp.float32,
        rngs=nnx.Rngs(1),
    )


def test_without_forget_gate_the_layer_is_causal_linear_attention():
    layer = _layer(False)
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    assert "gk_down" not in params and "gk_up" not in params
    x = jax.random.normal(jax.random.key(0), (2, 37, 32), jnp.float32)
    # By hand: o_t = scale * sum_{s <= t} (q_t . k_s) v_s per head, then the layer's output path.
    q, k, v = layer._projections(x)
    q, k = (t.reshape(2, 37, 2, 8) for t in (q, k))
    v = v.reshape(2, 37, 2, 16)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * 8**-0.5
    scores = jnp.where(jnp.tril(jnp.ones((37, 37), bool)), scores, 0.0)
    by_hand = layer._output(jnp.einsum("bhts,bshv->bthv", scores, v), x)
    np.testing.assert_allclose(layer(x), by_hand, rtol=2e-4, atol=2e-5)
    # The gated layer with the same projections differs: its decay is not 1.
    assert not np.allclose(_layer(True)(x), by_hand, atol=1e-3)


def test_without_forget_gate_decoding_matches_the_forward_pass():
    cfg = GLAConfig(
        vocab_size=50, d_model=32, n_layers=2, n_heads=2, use_forget_gate=False, dtype="float32"
    )
    model = GLALM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 50)
    full = model(tokens)
    cache = model.init_cache(2)
    for t in range(9):
        logits_t, cache = model.decode_step(tokens[:, t], cache)
        np.testing.assert_allclose(logits_t, full[:, t], rtol=1e-4, atol=1e-4)
