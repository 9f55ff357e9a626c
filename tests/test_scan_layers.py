"""scan_layers: stacked blocks applied by a scan compute exactly what the unrolled blocks do.

Each test builds an unrolled model, copies its weights into the stacked layout, and compares
logits, gradients, caches and generated tokens (float32, tight tolerances).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gla_jax import GLALM, GLAConfig, TransformerConfig
from gla_jax.layer_stack import LAYER_AXIS, stack_layer_params, unstack_layer_params
from gla_jax.sampling import generate
from gla_jax.sharding import logical_to_mesh_spec

VOCAB = 61
# chunk_size 16: short rows still span several GLA chunks.
SMALL = dict(
    vocab_size=VOCAB,
    d_model=32,
    n_layers=3,
    n_heads=4,
    dtype="float32",
    init_std=0.3,
    chunk_size=16,
)
MODELS = {
    "gla": lambda **kw: GLAConfig(**{**SMALL, **kw}),
    "gla_conv": lambda **kw: GLAConfig(**{**SMALL, "use_short_conv": True, **kw}),
    "attention": lambda **kw: TransformerConfig(**{**SMALL, **kw}),
}


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _pair(name, **options):
    """(unrolled model, scan_layers model holding the same weights)."""
    unrolled = GLALM(MODELS[name](**options), rngs=nnx.Rngs(0))
    scanned = GLALM(MODELS[name](scan_layers=True, **options), rngs=nnx.Rngs(1))
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, stack_layer_params(_params(unrolled)))
    nnx.update(scanned, state)
    return unrolled, scanned


def _tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def _segments():
    """Two rows of packed documents, boundaries inside and across 16-token chunks."""
    lengths = [[5, 30, 5], [1, 20, 19]]
    return jnp.asarray([np.repeat(np.arange(1, 4), row) for row in lengths], jnp.int32)


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _loss(model, tokens, segment_ids):
    """Next-token loss; segment_ids label the inputs tokens[:, :-1]."""
    logits = model(tokens[:, :-1], segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


loss_and_grads = nnx.jit(nnx.value_and_grad(_loss))
forward = nnx.jit(lambda model, tokens, segment_ids=None: model(tokens, segment_ids=segment_ids))


@pytest.mark.parametrize(
    "name, options, packed",
    [
        ("gla", {}, True),
        ("gla", dict(packing="cu_seqlens", max_segments_per_row=4), True),
        ("gla_conv", dict(remat=True), False),
        ("attention", {}, True),
        ("attention", dict(remat=True), False),
    ],
    ids=["gla_gate_reset", "gla_cu_seqlens", "gla_conv_remat", "attention", "attention_remat"],
)
def test_scan_equals_unrolled_logits_and_gradients(name, options, packed):
    unrolled, scanned = _pair(name, **options)
    tokens = _tokens((2, 41))
    segments = _segments() if packed else None
    _close(forward(scanned, tokens[:, :-1], segments), forward(unrolled, tokens[:, :-1], segments))
    loss_u, grads_u = loss_and_grads(unrolled, tokens, segments)
    loss_s, grads_s = loss_and_grads(scanned, tokens, segments)
    assert float(loss_s) == pytest.approx(float(loss_u), rel=1e-6)
    want = stack_layer_params(nnx.to_pure_dict(grads_u))
    got = nnx.to_pure_dict(grads_s)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    for (path, g), w in zip(flat_got, jax.tree.leaves(want), strict=True):
        assert np.any(np.asarray(w) != 0), path  # every layer's parameters are really used
        assert _rel(g, w) <= 1e-5, path  # float32 sums may differ in order, nothing more


def test_scan_with_remat_is_rematerialized():
    _, scanned = _pair("gla", remat=True)
    graphdef, state = nnx.split(scanned)
    tokens = _tokens((1, 8))
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens).sum())(state))
    assert "remat" in jaxpr or "checkpoint[" in jaxpr
    assert "scan[" in jaxpr  # and the blocks run inside one scan, not unrolled


decode_step = nnx.jit(lambda model, tokens_t, cache: model.decode_step(tokens_t, cache))
prefill = nnx.jit(lambda model, tokens, lengths: model.prefill(tokens, lengths, max_len=40))


@pytest.mark.parametrize("name", ["gla_conv", "attention"])
def test_scan_prefill_decode_and_generate_equal_unrolled(name):
    unrolled, scanned = _pair(name)
    tokens = _tokens((3, 24), seed=1)
    lengths = jnp.array([16, 5, 1])
    logits_u, cache_u = prefill(unrolled, tokens[:, :16], lengths)
    logits_s, cache_s = prefill(scanned, tokens[:, :16], lengths)
    for row, n in enumerate(lengths.tolist()):
        _close(logits_s[row, :n], logits_u[row, :n])
    # The stacked cache holds the unrolled per-layer caches, one slice each.
    assert len(cache_u.layers) == 3 and isinstance(cache_s.layers, type(cache_u.layers[0]))
    for i, layer in enumerate(cache_u.layers):
        jax.tree.map(lambda s, u, i=i: _close(s[i], u), cache_s.layers, layer)
    for step in range(6):
        step_tokens = tokens[jnp.arange(3), lengths + step]
        step_u, cache_u = decode_step(unrolled, step_tokens, cache_u)
        step_s, cache_s = decode_step(scanned, step_tokens, cache_s)
        _close(step_s, step_u)
    prompts = [[5, 9, 2, 30, 11, 7, 1], [3], [8, 8, 15, 22]]
    for options in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, rng=7)):
        np.testing.assert_array_equal(
            generate(scanned, prompts, 8, **options), generate(unrolled, prompts, 8, **options)
        )


def test_scan_cache_is_stacked_and_layouts_do_not_mix():
    unrolled, scanned = _pair("attention")
    cache = scanned.init_cache(2, max_len=10)
    assert cache.layers.k.shape == (3, 2, 10, 4, 8)
    tokens_t = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="stacked over layers.*scan_layers=False"):
        scanned.decode_step(tokens_t, unrolled.init_cache(2))
    with pytest.raises(ValueError, match="tuple of per-layer caches.*scan_layers=True"):
        unrolled.decode_step(tokens_t, cache)
    deeper = GLALM(MODELS["attention"](n_layers=4, scan_layers=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="4 layers.*n_layers = 3"):
        scanned.decode_step(tokens_t, deeper.init_cache(2))
    with pytest.raises(ValueError, match="cache is full"):
        scanned.decode_step(tokens_t, cache._replace(positions=jnp.array([0, 10])))


class _Mesh:
    """Only .shape is read by the logical-axis map."""

    shape = {"data": 2, "fsdp": 2, "tensor": 2}


def test_stacked_parameters_name_a_replicated_layer_axis():
    def specs_and_shapes(**options):
        model = nnx.eval_shape(lambda: GLALM(MODELS["gla_conv"](**options), rngs=nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
        return nnx.to_pure_dict(nnx.get_partition_spec(params)), nnx.to_pure_dict(params)

    is_spec = lambda x: isinstance(x, P)
    specs_u, _ = specs_and_shapes()
    specs_s, shapes_s = specs_and_shapes(scan_layers=True)
    assert specs_s["embed"] == specs_u["embed"]  # outside the blocks nothing changes
    layer_specs = specs_u["blocks"][0]
    assert specs_s["blocks"] == jax.tree.map(
        lambda spec: P(LAYER_AXIS, *spec), layer_specs, is_leaf=is_spec
    )
    for spec, shape in zip(
        jax.tree.leaves(specs_s["blocks"], is_leaf=is_spec),
        jax.tree.leaves(shapes_s["blocks"]),
        strict=True,
    ):
        # Every device holds all layers of its slice; the rest is split as without the scan.
        one_layer = logical_to_mesh_spec(P(*spec[1:]), shape.shape[1:], _Mesh)
        assert logical_to_mesh_spec(spec, shape.shape, _Mesh) == P(None, *one_layer)


def test_layer_params_stack_and_unstack_round_trip():
    unrolled, scanned = _pair("gla")
    params = _params(unrolled)
    as_saved = {**params, "blocks": {str(k): v for k, v in params["blocks"].items()}}
    stacked = stack_layer_params(as_saved)  # checkpoints may hold string layer indices
    assert jax.tree.structure(stacked) == jax.tree.structure(_params(scanned))
    back = unstack_layer_params(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    gap = {**params, "blocks": {0: params["blocks"][0], 2: params["blocks"][1]}}
    with pytest.raises(ValueError, match=r"layers 0..1, got \[0, 2\]"):
        stack_layer_params(gap)
    numpy_params = jax.tree.map(np.asarray, params)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(stack_layer_params(numpy_params)))
