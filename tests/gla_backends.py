"""The backends that run the shared op suite (tests/test_gla_ops.py).

Each entry is (backend name, interpret). Pallas backends run in interpret mode so that CI, which has
no accelerator, checks every case of every kernel.
"""

import os

import pytest

# GLA_TEST_NATIVE_GPU=1 runs the Pallas GPU backend natively (on a GPU machine) instead of in
# interpret mode: here and in tests/test_gla_gpu.py's exact-path tests.
GPU_INTERPRET = os.environ.get("GLA_TEST_NATIVE_GPU", "0") != "1"

# GLA_TEST_GPU_SETTINGS="grad_warps=8,..." runs it under these launch settings
# (GpuConfig fields, as `benchmarks/kernels.py --set` takes them): a setting is checked by the
# whole suite, natively or interpreted, before it becomes a default.
if os.environ.get("GLA_TEST_GPU_SETTINGS"):
    from benchmarks.kernels import override_config

    override_config(os.environ["GLA_TEST_GPU_SETTINGS"])

BACKENDS_UNDER_TEST = [
    pytest.param(("reference", False), id="reference"),
    pytest.param(("xla", False), id="xla"),
    pytest.param(("pallas_tpu", True), id="pallas_tpu_interpret"),
    pytest.param(
        ("pallas_gpu", GPU_INTERPRET),
        id="pallas_gpu_interpret" if GPU_INTERPRET else "pallas_gpu_native",
    ),
]
