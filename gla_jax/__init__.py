"""gla-jax: Gated Linear Attention Transformers in JAX."""

from gla_jax.layers import CausalSelfAttention, GatedLinearAttention
from gla_jax.model import (
    GLALM,
    GLAConfig,
    ModelCache,
    TransformerConfig,
    TransformerLM,
    build_model,
)
from gla_jax.ops import chunk_gla, fused_recurrent_gla

__all__ = [
    "GLALM",
    "CausalSelfAttention",
    "GLAConfig",
    "GatedLinearAttention",
    "ModelCache",
    "TransformerConfig",
    "TransformerLM",
    "build_model",
    "chunk_gla",
    "fused_recurrent_gla",
]
