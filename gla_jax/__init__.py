"""gla-jax: Gated Linear Attention Transformers in JAX."""

from gla_jax.ops import chunk_gla, fused_recurrent_gla

__all__ = ["chunk_gla", "fused_recurrent_gla"]
