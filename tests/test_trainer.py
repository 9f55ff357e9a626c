"""The trainer end to end on the CPU, each run in its own process (as a user would run it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gla_jax.config_check import base_config, check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small, fast run: tiny model, short rows, every step logged.
SEQ_LEN = 64
FAST = [
    f"--config.seq_len={SEQ_LEN}",
    "--config.batch_size=8",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.num_samples=0",
    "--config.warmup_steps=2",
    "--config.learning_rate=3e-3",
]


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cmd(workdir, *extra):
    return [
        sys.executable,
        "train.py",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        *FAST,
        *extra,
    ]


def _train(workdir, *extra, devices=1, check=True):
    result = subprocess.run(
        _cmd(workdir, *extra),
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _losses(workdir, metric: str = "loss") -> dict[int, float]:
    """``metric`` per step; a step logged twice (re-run after a resume) keeps its last value."""
    losses = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if metric in record:
                losses[record["step"]] = record[metric]
    return losses


def _committed_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _train(workdir, "--config.steps=60", "--config.checkpoint_every=10")
    return _losses(workdir)


def test_loss_falls_and_artifacts_are_written(uninterrupted, tmp_path):
    steps = sorted(uninterrupted)
    assert steps == list(range(1, 61))
    first, last = np.mean([uninterrupted[s] for s in steps[:5]]), uninterrupted[60]
    assert last < 0.8 * first, (first, last)


def test_kill_9_then_rerun_continues_exactly(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    process = subprocess.Popen(
        _cmd(workdir, "--config.steps=60", "--config.checkpoint_every=10"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not _committed_steps(workdir) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(_losses(workdir))
    assert killed_at < 60, "the run finished before it could be killed"
    _train(workdir, "--config.steps=60", "--config.checkpoint_every=10")
    resumed = _losses(workdir)
    assert sorted(resumed) == list(range(1, 61))
    for step in range(1, 61):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), step


def test_sigterm_saves_and_exits_cleanly(uninterrupted, tmp_path):
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        _cmd(workdir, "--config.steps=60", "--config.checkpoint_every=50"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    metrics = workdir / "metrics.jsonl"
    while process.poll() is None and time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = max(_losses(workdir))
    assert _committed_steps(workdir)[-1] == stopped_at < 60
    _train(workdir, "--config.steps=60", "--config.checkpoint_every=50")
    resumed = _losses(workdir)
    for step in range(1, 61):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), step


def test_mesh_2x2x2_on_8_devices_matches_one_device(uninterrupted, tmp_path):
    _train(
        tmp_path,
        "--config.steps=8",
        "--config.checkpoint_every=4",
        "--config.mesh=2,2,2",
        devices=8,
    )
    sharded = _losses(tmp_path)
    one_device = tmp_path / "one"
    _train(one_device, "--config.steps=8", "--config.checkpoint_every=4")
    single = _losses(one_device)
    for step in range(1, 9):
        assert sharded[step] == pytest.approx(single[step], rel=2e-4), step


def test_resume_onto_a_different_mesh(tmp_path):
    _train(
        tmp_path,
        "--config.steps=8",
        "--config.checkpoint_every=4",
        "--config.mesh=8,1,1",
        devices=8,
    )
    reference = _losses(tmp_path)
    # Forget everything after step 4, then continue on another mesh.
    subprocess.run(["rm", "-rf", str(tmp_path / "checkpoints" / "8")], check=True)
    _train(
        tmp_path,
        "--config.steps=8",
        "--config.checkpoint_every=4",
        "--config.mesh=1,4,2",
        devices=8,
    )
    resumed = _losses(tmp_path)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=2e-4), step


def test_scan_layers_run_resumes_onto_another_mesh_and_samples(tmp_path):
    from gla_jax.sampling import load_model_from_workdir

    run = ("--config.steps=6", "--config.checkpoint_every=3", "--config.model.scan_layers=True")
    _train(tmp_path, *run, "--config.mesh=2,2,2", devices=8)
    reference = _losses(tmp_path)
    # Forget everything after step 3, then continue on one device and sample at the end.
    subprocess.run(["rm", "-rf", str(tmp_path / "checkpoints" / "6")], check=True)
    _train(tmp_path, *run, "--config.num_samples=1", "--config.sample_length=4")
    resumed = _losses(tmp_path)
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=2e-4), step
    assert resumed[6] < resumed[1]
    assert (tmp_path / "samples.txt").read_text().startswith("--- sample 0")
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    first_steps = [r for r in records if "first_step_s" in r]
    assert [r["step"] for r in first_steps] == [1, 4]  # each process times its own first step
    assert all(r["first_step_s"] > 0 for r in first_steps)
    # A logged step whose window held the compile reports no throughput; the others do.
    throughput_steps = sorted(r["step"] for r in records if "tokens_per_s" in r)
    assert throughput_steps == [2, 3, 4, 5, 5, 6, 6], throughput_steps  # not 1, nor 4 resumed
    initialized = [r for r in records if "init_s" in r]
    assert [r["step"] for r in initialized] == [0]  # the resumed process restored instead
    assert initialized[0]["init_s"] > 0
    model, _ = load_model_from_workdir(str(tmp_path))
    assert model.cfg.scan_layers and model.blocks.mlp.up_proj.kernel.shape[0] == 2


@pytest.mark.parametrize("scan_layers", [False, True])
def test_run_saved_on_a_2x2x2_mesh_evaluates_on_one_device(scan_layers, tmp_path):
    # Runs are evaluated on whatever devices are at hand: the last checkpoint, written by 8
    # devices, is read by a 1-device process and must score the held-out batches as the trainer
    # did with the same weights in memory (wrong or shuffled weights would move the loss).
    _train(
        tmp_path,
        "--config.steps=3",
        "--config.checkpoint_every=3",
        "--config.eval_every=3",
        f"--config.model.scan_layers={scan_layers}",
        "--config.mesh=2,2,2",
        devices=8,
    )
    trainer_eval_loss = _losses(tmp_path, "eval_loss")[3]
    config = base_config()  # the trainer's evaluation batches, which FAST leaves as they are
    out = tmp_path / "eval"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gla_jax.evaluate",
            f"--workdir={tmp_path}",
            f"--lengths={SEQ_LEN}",
            f"--tokens_per_batch={config.eval_batch_size * SEQ_LEN}",
            f"--max_batches={config.eval_batches}",
            f"--output_dir={out}",
        ],
        cwd=ROOT,
        env=_env(devices=1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = json.loads((out / "perplexity.json").read_text())
    assert run["results"][0]["loss"] == pytest.approx(trainer_eval_loss, rel=1e-5)


def test_dry_run_prints_parameters_without_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/gla_340m.py", "--dry_run"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    count = int(result.stdout.split("parameters:")[1].split()[0])
    assert abs(count - 341e6) / 341e6 < 0.02, count
    assert "per-device memory" in result.stdout


def test_resume_with_another_model_is_refused_and_keeps_the_saved_config(tmp_path):
    _train(tmp_path, "--config.steps=2", "--config.checkpoint_every=2")
    result = _train(tmp_path, "--config.steps=4", "--config.model.d_model=64", check=False)
    assert result.returncode != 0
    assert "config.model differs" in result.stderr and "d_model: 128 -> 64" in result.stderr
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model"]["d_model"] == 128


def test_a_bad_eval_split_fails_before_training(tmp_path):
    result = _train(
        tmp_path,
        "--config.steps=4",
        "--config.eval_every=2",
        "--config.data.eval_split=test",
        check=False,
    )
    assert result.returncode != 0 and "has no split 'test'" in result.stderr
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_unknown_config_field_fails_fast(tmp_path):
    result = _train(tmp_path, "--config.no_such_field=3", check=False)
    assert result.returncode != 0
    assert "no_such_field" in result.stderr


@pytest.mark.parametrize(
    "overrides, devices, field",
    [
        (dict(mesh="2,1,1"), 1, "config.mesh"),
        (dict(mesh="8,1,1", batch_size=4), 8, "config.batch_size"),
        (dict(batch_size=8, grad_accum_steps=3), 1, "config.batch_size"),
        (dict(steps=0), 1, "config.steps"),
        (dict(eval_batch_size=3, mesh="2,1,1"), 2, "config.eval_batch_size"),
        (dict(grad_clip=0.0), 1, "config.grad_clip"),
        (dict(keep_period=-1), 1, "config.keep_period"),
        (dict(steps=4, profile_start_step=3, profile_steps=3), 1, "config.profile_steps"),
        (dict(eval_batches=0), 1, "config.eval_batches"),
        (dict(sample_prompt=""), 1, "config.sample_prompt"),
        (dict(sample_length=0), 1, "config.sample_length"),
        (dict(num_samples=-1), 1, "config.num_samples"),
        (dict(model=dict(packing="cu_seqlens")), 1, "config.data.max_segments_per_row"),
        (
            dict(
                model=dict(packing="cu_seqlens", max_segments_per_row=4),
                data=dict(max_segments_per_row=8),
            ),
            1,
            "config.data.max_segments_per_row",
        ),
    ],
)
def test_bad_configs_name_the_field(overrides, devices, field):
    config = base_config()
    config.model.type = "gla"
    config.update(overrides)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_config(config, num_devices=devices)


def test_gradient_accumulation_equals_one_large_batch():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gla_jax import trainer
    from gla_jax.model import build_model

    config = base_config()
    config.model.update(
        type="gla", vocab_size=64, d_model=32, n_layers=1, n_heads=2, dtype="float32"
    )
    model = build_model(config.model, nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (4, 24)).astype(np.int32)
    mask = np.ones((4, 24), np.float32)
    mask[1, 10:] = 0  # uneven token counts per micro-batch: the mean must still be over tokens
    batch = {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, 1)),
        "loss_mask": jnp.asarray(mask),
        "segment_ids": jnp.ones((4, 24), jnp.int32),
    }
    whole = trainer._accumulated_gradients(graphdef, params, batch, 1)
    split = trainer._accumulated_gradients(graphdef, params, batch, 2)
    assert float(split[0]) == pytest.approx(float(whole[0]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(split[1]), jax.tree.leaves(whole[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("model_type", ["gla", "transformer"])
def test_unrolled_and_scanned_models_start_from_the_same_weights(model_type):
    import jax

    from gla_jax import trainer
    from gla_jax.layer_stack import stack_layer_params

    states = {}
    for scan_layers in (True, False):
        config = base_config()
        config.model.update(
            type=model_type,
            vocab_size=64,
            d_model=32,
            n_layers=3,
            n_heads=2,
            dtype="float32",
            scan_layers=scan_layers,
        )
        run = trainer.build_run(config, jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor")))
        state = trainer.initialize_state(run)
        assert jax.tree.structure(state) == jax.tree.structure(run.abstract_state)
        for array, sharding in zip(
            jax.tree.leaves(state), jax.tree.leaves(run.state_shardings), strict=True
        ):
            assert array.sharding.is_equivalent_to(sharding, array.ndim)
        states[scan_layers] = state
    scanned, unrolled = states[True], states[False]
    assert len(unrolled["params"]["blocks"]) == 3
    stacked = stack_layer_params(unrolled["params"])
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(scanned["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # every layer draws its own weights
    blocks = unrolled["params"]["blocks"]
    first, second = jax.tree.leaves(blocks[0]), jax.tree.leaves(blocks[1])
    assert any(a.size > 1 and not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    # A huge learning rate blows the parameters up after one step; every later step is
    # non-finite, is not applied, and five in a row stop the run with no checkpoint written.
    result = _train(
        tmp_path,
        "--config.steps=30",
        "--config.checkpoint_every=25",
        "--config.learning_rate=1e30",
        "--config.warmup_steps=0",
        check=False,
    )
    assert result.returncode != 0
    assert "non-finite steps in a row" in result.stderr
    assert _committed_steps(tmp_path) == []


def test_logged_learning_rate_is_the_one_applied_after_skipped_steps():
    # A skipped (non-finite) step does not advance the optimizer's schedule count, so the rate
    # logged for each later step must follow that count, not the step number.
    import jax
    import optax

    from gla_jax import sharding as sharding_lib
    from gla_jax import trainer
    from gla_jax.optim import learning_rate_schedule

    config = base_config()
    config.model.update(type="gla", vocab_size=64, d_model=32, n_layers=1, n_heads=2)
    config.update(steps=20, warmup_steps=10, seq_len=16, batch_size=2)
    mesh = sharding_lib.make_mesh(config.mesh)
    run = trainer.build_run(config, mesh)
    state = trainer.initialize_state(run)
    train, _ = trainer.compile_steps(run)
    rng = np.random.default_rng(0)
    schedule = learning_rate_schedule(config)
    for i in range(5):
        tokens = rng.integers(0, 64, (2, 16)).astype(np.int32)
        targets = np.roll(tokens, -1, 1)
        if i in (1, 2):
            targets[0, 0] = 10**6  # a label outside the vocabulary: a NaN loss, a skipped step
        batch = dict(
            tokens=tokens,
            targets=targets,
            segment_ids=np.ones_like(tokens),
            loss_mask=np.ones(tokens.shape, np.float32),
        )
        is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
        (count,) = [  # read before the step: the step donates the state it is given
            int(x.count)
            for x in jax.tree.leaves(state["opt_state"], is_leaf=is_schedule)
            if is_schedule(x)
        ]
        state, metrics = train(state, trainer._global_batch(batch, mesh))
        metrics = jax.device_get(metrics)
        assert metrics["learning_rate"] == pytest.approx(float(schedule(count))), i
    assert int(state["step"]) == 5 and int(metrics["skipped"]) == 2
