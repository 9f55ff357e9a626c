"""The Transformer++ baseline at 340M: d 1024, 24 layers, 16 heads, RoPE, SwiGLU, tied (~341M)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seq_len = 2048
    config.model = ml_collections.ConfigDict(
        dict(
            type="transformer",
            vocab_size=32000,
            d_model=1024,
            n_layers=24,
            n_heads=16,
            rope_theta=10000.0,
            max_seq_len=2048,
            tie_embeddings=True,
            dtype="bfloat16",
            remat=False,
        )
    )
    return config
