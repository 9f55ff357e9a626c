"""The public op names: ``from gla_jax.ops import chunk_gla, fused_recurrent_gla``."""

from pallas_kernels.gla.api import BACKENDS, chunk_gla, fused_recurrent_gla

__all__ = ["BACKENDS", "chunk_gla", "fused_recurrent_gla"]
