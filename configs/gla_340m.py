"""The paper's 340M GLA Transformer: d 1024, 24 layers, 4 heads, tied embeddings (~341M)."""

from gla_jax.config_check import paper_config


def get_config():
    return paper_config(
        "340m",
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
            scan_layers=True,  # one compiled block scanned over the 24 layers: fast compile
            backend=None,
            chunk_size=64,
            packing="gate_reset",  # or "cu_seqlens" (see gla_jax/model.py)
        ),
    )
