"""Chunkwise gated linear attention: public ops in ``api``, backends beside it."""

from pallas_kernels.gla.api import BACKENDS, chunk_gla, fused_recurrent_gla

__all__ = ["BACKENDS", "chunk_gla", "fused_recurrent_gla"]
