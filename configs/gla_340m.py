"""The paper's 340M GLA Transformer: d 1024, 24 layers, 4 heads, tied embeddings (~341M)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seq_len = 2048
    config.model = ml_collections.ConfigDict(
        dict(
            type="gla",
            vocab_size=32000,
            d_model=1024,
            n_layers=24,
            n_heads=4,
            expand_k=0.5,
            expand_v=1.0,
            tie_embeddings=True,
            dtype="bfloat16",
            remat=False,
            backend=None,
            chunk_size=64,
            packing="gate_reset",  # or "cu_seqlens" (see gla_jax/model.py)
        )
    )
    return config
