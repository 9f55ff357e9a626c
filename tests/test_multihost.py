"""Two processes on this machine form one run through jax.distributed (CPU collectives over
gloo), each feeding its share of the batch; the run checkpoints and resumes exactly."""

import os
import socket
import subprocess
import sys

import pytest

from tests.test_trainer import ROOT, _committed_steps, _losses

ARGS = [
    "--config.seq_len=64",
    "--config.batch_size=8",
    "--config.steps=6",
    "--config.log_every=1",
    "--config.eval_every=3",
    "--config.checkpoint_every=3",
    "--config.num_samples=0",
    "--config.multihost=on",
    "--config.num_processes=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    address = f"--config.coordinator_address=127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                "--config=configs/tiny.py",
                f"--workdir={workdir}",
                *ARGS,
                address,
                f"--config.process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return [out for out, _ in outputs]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    stdout = _run_two_processes(tmp_path)
    assert "step 6/6" in stdout[0] and "step 6/6" not in stdout[1]  # only process 0 reports
    first = _losses(tmp_path)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    assert _committed_steps(tmp_path) == [3, 6]
    subprocess.run(["rm", "-rf", str(tmp_path / "checkpoints" / "6")], check=True)
    _run_two_processes(tmp_path)
    resumed = _losses(tmp_path)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(first[step], rel=1e-6), step


def test_a_coordinator_address_joins_the_run_under_auto(monkeypatch):
    import jax
    import ml_collections

    from gla_jax import multihost

    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "SLURM_NTASKS",
    ):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    config = ml_collections.ConfigDict(
        dict(multihost="auto", coordinator_address="", num_processes=1, process_id=0)
    )
    multihost.maybe_initialize_distributed(config)
    assert calls == []  # nothing asks for several processes
    config.update(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    multihost.maybe_initialize_distributed(config)
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]
