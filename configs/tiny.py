"""A CPU-sized GLA language model for smoke runs and tests (about 0.6M parameters)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seq_len = 256
    config.model = ml_collections.ConfigDict(
        dict(
            type="gla",  # 'gla' | 'transformer'
            vocab_size=512,  # byte tokenizer plus specials, rounded up
            d_model=128,
            n_layers=2,
            n_heads=4,
            tie_embeddings=True,
            dtype="float32",  # CPUs have no fast bfloat16 matmuls
            remat=False,
            backend=None,  # chunk_gla backend; None = chosen by platform
            chunk_size=64,
            packing="gate_reset",  # or "cu_seqlens" (see gla_jax/model.py)
        )
    )
    return config
