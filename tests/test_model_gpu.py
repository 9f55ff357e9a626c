"""The models on a GPU: the auto-selected GLA backend and cuDNN attention (skipped elsewhere)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gla_jax.layers as layers_module
from gla_jax import GLALM, GLAConfig
from gla_jax.layers import CausalSelfAttention
from gla_jax.sampling import generate

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

VOCAB = 1000
SIZES = dict(vocab_size=VOCAB, d_model=256, n_layers=2, n_heads=4, init_std=0.1)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


forward = nnx.jit(lambda m, t, s=None: m(t, segment_ids=s))


@pytest.mark.parametrize("mixer", ["gla", "attention"])
def test_float32_decoding_equals_forward_on_gpu(mixer):
    with jax.default_matmul_precision("highest"):  # no TF32: compare float32 with float32
        model = GLALM(GLAConfig(**SIZES, mixer=mixer, dtype="float32"), rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(0), (2, 150), 0, VOCAB)
        full = forward(model, tokens)
        step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
        cache, outs = model.init_cache(2, 160), []
        for t in range(150):
            logits, cache = step(model, tokens[:, t], cache)
            outs.append(logits)
        assert _rel(jnp.stack(outs, 1), full) <= 1e-4


@pytest.mark.parametrize("mixer", ["gla", "attention"])
@pytest.mark.parametrize("length", [512, 511])  # cuDNN's masked backward wants even lengths
def test_bfloat16_packed_training_step_on_gpu(mixer, length):
    model = GLALM(GLAConfig(**SIZES, mixer=mixer), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (4, length + 1), 0, VOCAB)
    document = np.minimum(np.arange(length + 1) // 128, 3) + 1
    segments = jnp.asarray(np.broadcast_to(document, (4, length + 1)))

    def loss(model):
        logits = model(tokens[:, :-1], segment_ids=segments[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    # Packed documents equal the documents alone (bf16 tolerance).
    packed = forward(model, tokens, segments)
    alone = forward(model, tokens[:, 128:256])
    assert _rel(packed[:, 128:256], alone) <= 3e-2


def test_cudnn_attention_matches_xla_with_and_without_segments(monkeypatch):
    assert layers_module.attention_implementation(jnp.bfloat16, 128) == "cudnn"
    layer = CausalSelfAttention(512, num_heads=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 256, 512), jnp.bfloat16)
    segments = jnp.asarray(np.repeat([[1, 2], [1, 1]], 128, axis=1))
    apply = lambda: nnx.jit(lambda m, x, s: m(x, s))  # a fresh jit traces again
    fast = [apply()(layer, x, seg) for seg in (None, segments)]
    monkeypatch.setattr(layers_module, "attention_implementation", lambda *args: "xla")
    slow = [apply()(layer, x, seg) for seg in (None, segments)]
    for a, b in zip(fast, slow, strict=True):
        assert _rel(a, b) <= 2e-2


def test_generate_on_gpu():
    model = GLALM(GLAConfig(**SIZES), rngs=nnx.Rngs(0))
    out = generate(model, [[1, 2, 3], [4]], 16, rng=jax.random.key(0), temperature=0.8, top_p=0.9)
    assert out.shape == (2, 16)
