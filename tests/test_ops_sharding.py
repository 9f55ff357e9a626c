"""gla_jax.ops.chunk_gla under a mesh runs per shard and equals the plain op (8 host devices)."""

import os
import subprocess
import sys

import pytest

from tests.gla_backends import BACKENDS_UNDER_TEST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_sharded_op_matches_plain_op(backend):
    name, interpret = backend
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "tests/scripts/sharded_op_check.py", name, "1" if interpret else "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded op ok" in result.stdout
