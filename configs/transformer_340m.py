"""The Transformer++ baseline at 340M: d 1024, 24 layers, 16 heads, RoPE, SwiGLU, tied (~341M)."""

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
