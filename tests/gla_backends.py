"""The backends that run the shared op suite (tests/test_gla_ops.py).

Each entry is (backend name, interpret). Pallas backends run in interpret mode so that CI, which has
no accelerator, checks every case of every kernel.
"""

import pytest

BACKENDS_UNDER_TEST = [
    pytest.param(("reference", False), id="reference"),
    pytest.param(("xla", False), id="xla"),
    pytest.param(("pallas_tpu", True), id="pallas_tpu_interpret"),
]
