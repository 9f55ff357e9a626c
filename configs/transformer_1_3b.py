"""The Transformer++ baseline at 1.3B: d 2048, 24 layers, 16 heads, untied (~1.364B)."""

from gla_jax.config_check import paper_config


def get_config():
    return paper_config(
        "1.3b",
        dict(
            type="transformer",
            vocab_size=32000,
            d_model=2048,
            n_layers=24,
            n_heads=16,
            rope_theta=10000.0,
            max_seq_len=2048,
            tie_embeddings=False,
            dtype="bfloat16",
            remat=True,
            scan_layers=True,  # one compiled block scanned over the 24 layers: fast compile
        ),
    )
