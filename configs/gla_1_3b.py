"""The paper's 1.3B GLA Transformer: d 2048, 24 layers, 4 heads, untied embeddings (~1.365B)."""

import ml_collections

from gla_jax.config_check import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    # The paper's 1.3B recipe: 100B tokens in batches of 2M tokens (1024 x 2048), warmup 1B
    # tokens, AdamW 3e-4 cosine to 3e-5; parameters and optimizer state sharded FSDP-style.
    config.seq_len = 2048
    config.batch_size = 1024
    config.steps = 47_684
    config.warmup_steps = 477
    config.learning_rate = 3e-4
    config.mesh = "1,-1,1"
    config.log_every = 50
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.data.tokenizer = "byte"  # point at a 32000-token SentencePiece .model for real runs
    config.model = ml_collections.ConfigDict(
        dict(
            type="gla",
            vocab_size=32000,
            d_model=2048,
            n_layers=24,
            n_heads=4,
            expand_k=0.5,
            expand_v=1.0,
            tie_embeddings=False,
            dtype="bfloat16",
            remat=True,
            backend=None,
            chunk_size=64,
            packing="gate_reset",  # or "cu_seqlens" (see gla_jax/model.py)
        )
    )
    return config
