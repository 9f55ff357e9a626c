"""Imported by pytest before any test module: the package's import-time XLA settings
(pallas_kernels/__init__.py) must be in place before any test starts a backend."""

import pallas_kernels  # noqa: F401
