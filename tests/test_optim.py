"""The optimizer's weight-decay mask: by name, the same in the stacked and unrolled layouts."""

import jax
import numpy as np
import optax
import pytest

from configs import lm_small
from gla_jax import layer_stack
from gla_jax.optim import make_optimizer, weight_decay_mask
from gla_jax.trainer import _draw_params


def small_config(mixer="gla"):
    config = lm_small.get_config()
    config.model.mixer = mixer
    config.model.n_layers = 2
    return config


def by_block_path(tree):
    """{path with the layer index dropped: leaf} of an unrolled tree's block leaves."""
    return {
        jax.tree_util.keystr(path[:1] + path[2:]): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if path[0].key == "blocks"
    }


@pytest.mark.parametrize("mixer", ["gla", "attention"])
def test_decay_mask_is_the_same_stacked_and_unrolled(mixer):
    stacked = _draw_params(small_config(mixer).model, 0)
    unrolled = layer_stack.unstack_layer_params(stacked)
    unrolled_mask = weight_decay_mask(unrolled)
    names = set()
    for path, decayed in jax.tree_util.tree_leaves_with_path(unrolled_mask):
        names.add(path[-1].key)
        assert decayed == (path[-1].key in ("kernel", "embedding")), jax.tree_util.keystr(path)
    assert {"kernel", "embedding", "scale"} <= names
    stacked_mask = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(weight_decay_mask(stacked))
        if path[0].key == "blocks"
    }
    assert by_block_path(unrolled_mask) == stacked_mask


def test_decay_moves_kernels_and_leaves_stacked_gains_alone():
    config = small_config()
    config.weight_decay, config.warmup_steps = 0.5, 0
    params = _draw_params(config.model, 0)  # the stacked layout: gains are [layers, D]
    optimizer = make_optimizer(config)
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    moved = optax.apply_updates(params, updates)
    seen = set()
    for (path, before), after in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(moved), strict=True
    ):
        name = path[-1].key
        seen.add(name)
        if name in ("scale", "bias"):
            np.testing.assert_array_equal(before, after, err_msg=jax.tree_util.keystr(path))
        else:  # decoupled decay with zero gradients: p -> p (1 - lr * weight_decay)
            np.testing.assert_allclose(
                after, before * (1 - config.learning_rate * 0.5), rtol=1e-5, atol=1e-8
            )
    assert {"kernel", "embedding", "scale", "bias"} <= seen


def test_an_unknown_parameter_name_is_refused():
    with pytest.raises(ValueError, match="'gain'.*weight matrix"):
        weight_decay_mask({"norm": {"gain": np.ones(3)}})
