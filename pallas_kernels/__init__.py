"""Pallas kernels for gated linear attention (no Flax, no training code)."""
