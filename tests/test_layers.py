"""Layers: segment bookkeeping, the short convolution, GLA inside Linen, layer-level errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

from gla_jax.layers import (
    CausalSelfAttention,
    GatedLinearAttention,
    ShortConv,
    attention_implementation,
    last_inputs,
    packed_cu_seqlens,
    prompt_cu_seqlens,
    rope,
    segment_positions,
)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_packed_cu_seqlens_keeps_row_starts_and_pads_with_empty_sequences():
    segments = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [3, 0, 0, 4, 4, 4]])
    cu = packed_cu_seqlens(segments, max_segments_per_row=3)
    # Row starts 0, 6, 12; inner starts 2, 5 (row 0), 13, 15 (row 2); then empty sequences.
    np.testing.assert_array_equal(cu, [0, 2, 5, 6, 12, 13, 15, 18, 18, 18])
    traced = jax.jit(lambda s: packed_cu_seqlens(s, 3))(segments)
    np.testing.assert_array_equal(traced, cu)


def test_prompt_cu_seqlens_and_segment_positions():
    np.testing.assert_array_equal(
        prompt_cu_seqlens(jnp.array([3, 5, 1]), 5), [0, 3, 5, 10, 10, 11, 15]
    )
    positions = segment_positions(jnp.array([[1, 1, 2, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5]]))
    np.testing.assert_array_equal(positions, [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6]])


def test_short_conv_is_causal_respects_segments_and_steps_like_the_parallel_form():
    conv = ShortConv(6, 4, std=0.5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 6))
    full = conv(x)
    # Causal: changing the future leaves the past alone.
    changed = conv(x.at[:, 5:].set(0.0))
    np.testing.assert_allclose(changed[:, :5], full[:, :5], rtol=1e-6)
    assert _rel(changed[:, 5:], full[:, 5:]) > 1e-2
    # Segments: the second document starts clean, as if run alone.
    segments = jnp.array([[1] * 4 + [2] * 5] * 2)
    packed = conv(x, segments)
    np.testing.assert_allclose(packed[:, 4:], conv(x[:, 4:]), rtol=1e-5, atol=1e-6)
    # The step form with a history buffer reproduces the parallel form.
    history = jnp.zeros((2, 3, 6))
    for t in range(9):
        y, history = conv.step(x[:, t], history)
        np.testing.assert_allclose(y, full[:, t], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(last_inputs(x, jnp.array([9, 2]), 3)[1, 0], 0.0)
    np.testing.assert_allclose(last_inputs(x, jnp.array([9, 2]), 3)[1, 1:], x[1, :2])


def test_rope_preserves_norms_and_makes_scores_relative():
    q = jax.random.normal(jax.random.key(0), (1, 1, 2, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 2, 8))
    at = lambda x, p: rope(x, jnp.array([[p]]), 10000.0)
    np.testing.assert_allclose(jnp.linalg.norm(at(q, 7)), jnp.linalg.norm(q), rtol=1e-5)
    score = lambda i, j: jnp.sum(at(q, i) * at(k, j))
    np.testing.assert_allclose(score(9, 4), score(15, 10), rtol=1e-4)
    assert abs(float(score(9, 4) - score(9, 5))) > 1e-3


def test_attention_implementation_choice():
    expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert attention_implementation(jnp.bfloat16, 64) == expected
    assert attention_implementation(jnp.float32, 64) == "xla"
    assert attention_implementation(jnp.bfloat16, 256) == "xla"
    assert attention_implementation(jnp.bfloat16, 64, seq_len=511, masked=False) == expected
    assert attention_implementation(jnp.bfloat16, 64, seq_len=511, masked=True) == "xla"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(num_heads=3), ["key dim", "16", "num_heads = 3"]),
        (dict(num_heads=4, expand_v=0.1875), ["value dim", "6", "num_heads = 4"]),
        (dict(head_norm="batchnorm"), ["head_norm", "batchnorm"]),
    ],
)
def test_gla_layer_dimensions_that_do_not_divide_raise(kwargs, words):
    with pytest.raises(ValueError) as err:
        GatedLinearAttention(32, dtype=jnp.float32, rngs=nnx.Rngs(0), **kwargs)
    for word in words:
        assert word in str(err.value)


def test_attention_layer_dimensions_that_do_not_divide_raise():
    with pytest.raises(ValueError, match="d_model = 30.*n_heads = 4"):
        CausalSelfAttention(30, num_heads=4, rngs=nnx.Rngs(0))


class _LinenModel(nn.Module):
    """A Linen model with the NNX GLA layer inside, through the NNX-Linen bridge."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32, name="proj")(x)
        gla = bridge.to_linen(
            GatedLinearAttention, 32, num_heads=4, init_std=0.3, dtype=jnp.float32, name="gla"
        )
        return h, h + gla(h)


def test_gated_linear_attention_inside_linen_through_the_bridge():
    x = jax.random.normal(jax.random.key(0), (2, 21, 8))
    model = _LinenModel()
    variables = jax.jit(model.init)(jax.random.key(1), x)
    h, out = jax.jit(model.apply)(variables, x)
    # Logical axis names survive the bridge.
    specs = nn.get_partition_spec(variables)["params"]["gla"]
    assert specs["q_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
    # Same numbers as the NNX layer given the Linen parameters.
    layer = GatedLinearAttention(32, num_heads=4, init_std=0.3, dtype=jnp.float32, rngs=nnx.Rngs(5))
    params = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(params, nn.meta.unbox(variables["params"]["gla"]))
    nnx.update(layer, params)
    assert _rel(out - h, nnx.jit(lambda m, h: m(h))(layer, h)) <= 1e-5
    # And it trains: gradients reach the gate parameters.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)[1] ** 2)))(
        variables["params"]
    )
    gate_grad = nn.meta.unbox(grads)["gla"]["gk_up"]["bias"]
    assert np.all(np.isfinite(gate_grad)) and np.any(gate_grad != 0)


@pytest.mark.parametrize("bias", [0.0, 4.0])
def test_gate_bias_init_sets_the_initial_decay(bias):
    """With zero gate weights the log decay is exactly logsigmoid(bias) / normalizer."""
    layer = GatedLinearAttention(
        32, num_heads=2, gate_bias_init=bias, dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    np.testing.assert_array_equal(np.asarray(layer.gk_up.bias[...]), np.full(16, bias))
    layer.gk_up.kernel[...] = jnp.zeros_like(layer.gk_up.kernel[...])
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    expected = np.log(1 / (1 + np.exp(-bias))) / 16
    np.testing.assert_allclose(np.asarray(layer._log_gate(x)), expected, rtol=1e-6)


def _per_token_residuals(module, x, *args):
    """The [B, T, ...] values (shape and dtype) the backward of module(x, *args) keeps, as
    ``jax.ad_checkpoint.print_saved_residuals`` lists them."""
    from jax._src.ad_checkpoint import saved_residuals

    graphdef, state = nnx.split(module)
    kept = saved_residuals(lambda s, x: nnx.merge(graphdef, s)(x, *args), state, x)
    return [aval for aval, _ in kept if aval.ndim >= 3 and aval.shape[:2] == x.shape[:2]]


def test_gla_block_backward_keeps_only_the_log_gates_in_float32():
    """The float32 values of the gates, norms, output gate and swish are recomputed in the
    backward, not stored: under scan_layers every stored tensor is stacked over the layers (the
    340M block kept 191.7 MiB per 2,048 tokens before, 69.5 after). What stays float32 is the
    op's log-gate input, which its backward needs."""
    from gla_jax.model import Block, GLAConfig

    cfg = GLAConfig(
        vocab_size=32, d_model=64, n_layers=1, n_heads=2, dtype="bfloat16", backend="xla"
    )
    x = jax.random.normal(jax.random.key(0), (2, 32, 64), jnp.bfloat16)
    segment_ids = jnp.ones((2, 32), jnp.int32)
    kept = _per_token_residuals(Block(cfg, rngs=nnx.Rngs(0)), x, segment_ids)
    float32 = [leaf.shape for leaf in kept if leaf.dtype == jnp.float32]
    assert float32 == [(2, 32, 2, 16)], float32  # g, split into heads
    assert all(leaf.dtype in (jnp.bfloat16, jnp.float32) for leaf in kept)


def test_block_backward_rebuilds_the_inputs_of_the_down_and_output_projections():
    """The SwiGLU product (the down projection's input) and the gated per-head-norm output
    (o_proj's input) are rebuilt in the backward from tensors it keeps anyway: of the
    [B, T, hidden] tensors only the gate and up projections stay, and of the [B, T, d]
    tensors only the block input, the attention norm, the output gate's projection, the
    residual sum and the MLP norm."""
    from gla_jax.model import Block, GLAConfig

    cfg = GLAConfig(
        vocab_size=32, d_model=64, n_layers=1, n_heads=2, dtype="bfloat16", backend="xla"
    )
    x = jax.random.normal(jax.random.key(1), (2, 32, 64), jnp.bfloat16)
    kept = _per_token_residuals(Block(cfg, rngs=nnx.Rngs(0)), x)
    widths = sorted(leaf.shape[-1] for leaf in kept if leaf.ndim == 3)
    assert widths.count(cfg.mlp_hidden) == 2, widths
    assert widths.count(cfg.d_model) == 5, widths


def test_op_without_initial_state_keeps_no_state_for_the_backward():
    """An absent initial state is made inside the custom VJP: zeros made outside were one more
    [N, H, K, V] float32 residual per call (per layer, under scan_layers)."""
    from gla_jax.ops import chunk_gla

    keys = jax.random.split(jax.random.key(2), 4)
    q, k, g = (jax.random.normal(key, (2, 32, 2, 16)) for key in keys[:3])
    v = jax.random.normal(keys[3], (2, 32, 2, 24))
    g = jax.nn.log_sigmoid(g)
    state_shape = (2, 2, 16, 24)

    def residual_shapes(initial_state):
        def f(q, k, v, g):
            return chunk_gla(q, k, v, g, initial_state=initial_state, backend="xla")[0]

        _, vjp = jax.vjp(f, q, k, v, g)
        return [leaf.shape for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "shape")]

    assert state_shape not in residual_shapes(None)
    assert state_shape in residual_shapes(jnp.ones(state_shape))  # the check can fail


def test_rematerialized_pieces_keep_the_parameter_gradients():
    """The rematerialized functions read parameters (the gate projections, the norms' scales)
    from the modules: their gradients must still flow. Reverse mode against finite differences,
    for the parameters and the input."""
    from jax.test_util import check_grads

    from gla_jax.model import Block, GLAConfig

    cfg = GLAConfig(
        vocab_size=32, d_model=32, n_layers=1, n_heads=2, dtype="float32", backend="xla"
    )
    graphdef, state = nnx.split(Block(cfg, rngs=nnx.Rngs(3)))
    x = jax.random.normal(jax.random.key(4), (1, 8, 32))

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

    check_grads(loss, (state, x), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
    grads = jax.grad(loss)(state, x)
    for path in (("attn", "gk_up", "kernel"), ("attn", "g_norm", "scale"), ("mlp_norm", "scale")):
        leaf = grads
        for key in path:
            leaf = leaf[key]
        assert float(jnp.abs(leaf[...]).max()) > 0, path


@pytest.mark.parametrize("keep", [False, True])
def test_keep_chunk_states_reaches_every_layers_op(keep, monkeypatch):
    """GLAConfig.keep_chunk_states is chunk_gla's keep_states in every block (the op's kept
    states are checked against the oracle in tests/test_gla_gpu.py)."""
    from gla_jax import layers
    from gla_jax.model import GLALM, GLAConfig

    seen, real = [], layers.chunk_gla

    def spy(*args, **kwargs):
        seen.append(kwargs["keep_states"])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "chunk_gla", spy)
    cfg = GLAConfig(
        vocab_size=32,
        d_model=32,
        n_layers=2,
        n_heads=2,
        dtype="float32",
        backend="xla",
        keep_chunk_states=keep,
    )
    GLALM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 16), jnp.int32))
    assert seen == [keep, keep]
