"""The paper's 1.3B GLA Transformer: d 2048, 24 layers, 4 heads, untied embeddings (~1.365B)."""

from gla_jax.config_check import paper_config


def get_config():
    return paper_config(
        "1.3b",
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
            scan_layers=True,  # one compiled block scanned over the 24 layers: fast compile
            backend=None,
            chunk_size=64,
            keep_chunk_states=False,  # True: less op time, more memory (gla_jax/model.py)
            packing="gate_reset",  # or "cu_seqlens" (see gla_jax/model.py)
        ),
    )
