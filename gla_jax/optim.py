"""The optimizer: AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to ``end_lr_ratio`` of the peak. A run
    no longer than its warmup (a short test run) warms up over all its steps and never decays."""
    warmup = min(config.warmup_steps, config.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * config.end_lr_ratio,
    )


# Leaves are told apart by name, not by rank: under ``scan_layers`` every block parameter carries
# a leading layer axis, so a norm's gain or a bias is 2-D there and a rank test would decay it.
DECAYED = ("kernel", "embedding")
NOT_DECAYED = ("scale", "bias")


def weight_decay_mask(params):
    """Decay weight matrices (``kernel``, ``embedding``); norms' gains and biases are left alone,
    in the stacked layout as in the unrolled one."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in DECAYED:
            return True
        if name in NOT_DECAYED:
            return False
        raise ValueError(
            f"weight_decay_mask: parameter {jax.tree_util.keystr(path)} is named {name!r}, "
            f"neither a weight matrix {DECAYED} nor a gain or bias {NOT_DECAYED}; name it so "
            "that its weight decay is decided"
        )

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        ),
    )
