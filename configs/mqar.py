"""MQAR (multi-query associative recall) at T = 256 with 16 key-value pairs: a tiny GLA.

    python train.py --config=configs/mqar.py --workdir=runs/mqar_gla
    python train.py --config=configs/mqar.py --workdir=runs/mqar_tfm --config.model.type=transformer
    python train.py --config=configs/mqar.py --workdir=runs/mqar_lin \
        --config.model.use_forget_gate=False                  # plain linear attention
    python -m gla_jax.evaluate --mqar --workdir=runs/mqar_gla

Other task sizes: --config.seq_len=512 --config.data.mqar.num_kv_pairs=64.
"""

import ml_collections

from gla_jax.config_check import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.data.name = "mqar"
    # Task sizes (the sequence length is config.seq_len); see gla_jax/mqar.py for the layout.
    config.data.mqar = ml_collections.ConfigDict(dict(num_kv_pairs=16, vocab_size=256))
    config.seq_len = 256
    config.batch_size = 32
    config.steps = 2000
    config.warmup_steps = 100
    config.learning_rate = 3e-3
    # Recall is learned abruptly after a plateau; weight decay on embeddings slows it.
    config.weight_decay = 0.0
    config.log_every = 25
    config.eval_every = 250
    config.eval_batches = 4
    config.eval_batch_size = 32
    config.checkpoint_every = 500
    config.num_samples = 0  # samples of a recall task say nothing
    config.model = ml_collections.ConfigDict(
        dict(
            type="gla",  # 'gla' | 'transformer'
            vocab_size=256,  # = data.mqar.vocab_size
            d_model=128,
            n_layers=2,
            n_heads=2,
            use_forget_gate=True,  # False: GLA without gates (plain linear attention)
            use_short_conv=False,  # True: a causal conv on q, k, v (eases recall)
            # The forget gate's initial bias: 0 is the paper's GLA, whose initial decay (0.958 a
            # step) keeps ~2e-4 of a key 200 tokens back; 4 starts at 0.9989 (0.8 after 200).
            gate_bias_init=0.0,
            tie_embeddings=True,
            dtype="float32",
            remat=False,
            chunk_size=64,
        )
    )
    return config
