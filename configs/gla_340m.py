"""The paper's 340M GLA Transformer: d 1024, 24 layers, 4 heads, tied embeddings (~341M)."""

import ml_collections

from gla_jax.config_check import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    # The paper's 340M recipe: 15B tokens in batches of 0.5M tokens (256 x 2048), warmup 0.5B
    # tokens, AdamW 3e-4 cosine to 3e-5. Lower batch_size / raise grad_accum_steps to fit.
    config.seq_len = 2048
    config.batch_size = 256
    config.steps = 28_610
    config.warmup_steps = 954
    config.learning_rate = 3e-4
    config.log_every = 50
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.data.tokenizer = "byte"  # point at a 32000-token SentencePiece .model for real runs
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
