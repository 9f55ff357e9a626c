"""A CPU-sized GLA language model for smoke runs and tests (about 0.6M parameters)."""

import ml_collections

from gla_jax.config_check import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    # CPU-sized run on the embedded corpus: a few hundred steps in a few minutes.
    config.seq_len = 256
    config.batch_size = 8
    config.steps = 300
    config.warmup_steps = 30
    config.learning_rate = 3e-3
    config.log_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
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
            scan_layers=False,  # True: blocks stacked and scanned (faster compile, deep models)
            backend=None,  # chunk_gla backend; None = chosen by platform
            chunk_size=64,
            packing="gate_reset",  # or "cu_seqlens" (see gla_jax/model.py)
        )
    )
    return config
