import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gla_jax.checkpoint import Checkpointer


def _state(value=1.0):
    return {"params": {"w": jnp.full((4, 3), value)}, "step": jnp.asarray(7, jnp.int32)}


def test_round_trip_with_data_state_and_retention(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)), {"epoch": 0, "index": step * 10})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
    state, data = ckpt.restore(3, abstract)
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 3.0))
    assert data == {"epoch": 0, "index": 30}
    ckpt.close()


def test_keep_period_keeps_milestones(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=1, keep_period=2, async_save=False)
    for step in range(1, 6):
        ckpt.save(step, _state(), {"i": step})
    ckpt.close()
    assert ckpt.all_steps() == [2, 4, 5]


def test_refuses_a_negative_keep_period_and_a_url(tmp_path):
    with pytest.raises(ValueError, match="keep_period must be >= 0"):
        Checkpointer(str(tmp_path), keep_period=-1)
    with pytest.raises(ValueError, match="local or mounted path"):
        Checkpointer("gs://bucket/run/checkpoints")


def test_refuses_non_finite_state(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(FloatingPointError, match="non-finite"):
        ckpt.save(1, _state(float("nan")), {})
    assert ckpt.latest_step() is None
    ckpt.close()


def test_restore_params_reads_only_the_parameters_onto_the_given_sharding(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    state = {
        "params": {"block": {"w": jnp.arange(6.0).reshape(2, 3)}, "b": jnp.ones(3)},
        "opt_state": {"mu": jnp.full((2, 3), 9.0)},
        "step": jnp.asarray(4, jnp.int32),
    }
    ckpt.save(4, state, {})
    ckpt.close()
    reader = Checkpointer(str(tmp_path), async_save=False)  # a fresh process's view of the run
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = reader.restore_params(4, device)
    reader.close()
    assert set(params) == {"block", "b"}
    np.testing.assert_array_equal(params["block"]["w"], np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(params["b"], np.ones(3))
    assert all(leaf.sharding == device for leaf in jax.tree.leaves(params))


def test_an_incomplete_step_folder_is_named(tmp_path):
    first = Checkpointer(str(tmp_path), async_save=False)
    first.save(1, _state(), {"i": 1})
    first.close()
    (tmp_path / "2").mkdir()  # a step folder with nothing in it (an interrupted copy)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.latest_step() == 2
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state())
    with pytest.raises(FileNotFoundError, match=r"checkpoint step 2 in .* cannot be read"):
        ckpt.restore(2, abstract)
    ckpt.close()
