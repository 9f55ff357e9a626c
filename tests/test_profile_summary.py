"""Profiling a training run and tabulating its trace (CPU backend)."""

from __future__ import annotations

import json
import os

import pytest

from gla_jax import profile_summary
from tests.test_trainer import _train


def test_profiled_run_is_tabulated_per_step(tmp_path):
    workdir = tmp_path / "run"
    result = _train(
        workdir, "--config.steps=5", "--config.profile_start_step=3", "--config.profile_steps=2"
    )
    assert "profiled steps 3-4" in result.stdout + result.stderr
    trace_dir = str(workdir / "profile")
    assert profile_summary.traced_steps(trace_dir) == 2
    ops = profile_summary.summarize(
        profile_summary.device_events(profile_summary.newest_trace(trace_dir))
    )
    # Two traced steps of one compiled step function: the step's ops ran twice each.
    calls = [op.calls for op in ops if op.total_ns > 0]
    assert calls and max(calls) >= 2 and sum(calls) % 2 == 0
    text = profile_summary.table(ops, 2, top=5)
    assert "ms / step" in text and text.count("\n| ") >= 5
    profile_summary.write(ops, 2, str(tmp_path / "out"))
    with open(tmp_path / "out" / "profile_summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 2 and summary["ops"][0]["ms_per_step"] > 0
    assert os.path.getsize(tmp_path / "out" / "profile_summary.png") > 0


def test_missing_trace_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="profile_start_step"):
        profile_summary.newest_trace(str(tmp_path))


@pytest.mark.parametrize(
    "name, kind",
    [
        ("gla_query_key_grads", "GLA kernel"),
        ("cudnn_fmha_fwd", "attention"),
        ("nvjet_hsh_128x256", "matmul"),
        ("all-reduce.3", "collective"),
        ("loop_multiply_fusion", "fusion"),
        ("copy.557", "copy / transpose"),
    ],
)
def test_kinds(name, kind):
    assert profile_summary.kind_of(name) == kind


@pytest.mark.parametrize("field, value", [("profile_steps", 0), ("profile_start_step", -1)])
def test_bad_profile_settings_are_refused(field, value):
    from gla_jax.config_check import base_config, check_config

    config = base_config()
    config.model.type = "gla"
    config[field] = value
    with pytest.raises(ValueError, match=f"config.{field}"):
        check_config(config, num_devices=1)
