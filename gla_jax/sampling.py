"""Text generation: one parallel prefill, then a jitted recurrent decode loop.

    new_tokens = generate(model, prompt_tokens, max_new_tokens=64, rng=jax.random.key(0),
                          temperature=0.8, top_k=40, top_p=0.95, eos=2)

Prompts of different lengths are **right-padded**: ``prompt_tokens`` is [B, P] and row b's prompt
is ``prompt_tokens[b, :prompt_lengths[b]]`` (the default is every row full; a list of lists is
padded here). The prefill runs chunk_gla over the padded batch with each prompt as its own packed
sequence, so each row's recurrent state is exactly the state after its last prompt token (KV caches
likewise keep per-row positions). Returns the new tokens [B, max_new_tokens] int32; once a row
emits ``eos`` the rest of that row is ``eos``, and the loop stops early when every row has.

CLI: ``python -m gla_jax.sampling --workdir=DIR [--prompt=TEXT] [--max_new_tokens=N] ...`` loads
the latest checkpoint of a training run and prints samples.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def pad_prompts(prompts, pad_id: int = 0):
    """List of token lists -> (right-padded [B, P] int32, lengths [B] int32)."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.size == 0 or lengths.min() < 1:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths.tolist()}")
    tokens = np.full((len(prompts), int(lengths.max())), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, lengths


def sample_logits(logits, key, temperature: float, top_k: int, top_p: float):
    """Samples one token per row from [B, vocab] float32 logits. temperature 0 = greedy."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # The best logit is 0 before the division, so a tiny temperature sends the others to -inf
    # (nearly greedy) instead of overflowing every logit to +-inf (NaN probabilities).
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k > 0:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest set whose mass reaches top_p: keep tokens while the mass before is < top_p.
        kept = jnp.where(mass_before < top_p, descending, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "eos")
)
def _generate(
    graphdef, state, tokens, lengths, rng, *, max_new_tokens, temperature, top_k, top_p, eos
):
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    logits, cache = model.prefill(tokens, lengths, max_len=tokens.shape[1] + max_new_tokens)
    last_logits = logits[jnp.arange(batch), lengths - 1]
    fill = 0 if eos is None else eos
    out = jnp.full((batch, max_new_tokens), fill, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def keep_going(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry):
        step, out, last_logits, done, cache, rng = carry
        rng, key = jax.random.split(rng)
        token = sample_logits(last_logits, key, temperature, top_k, top_p)
        token = jnp.where(done, fill, token)
        out = out.at[:, step].set(token)
        if eos is not None:
            done = done | (token == eos)
        last_logits, cache = model.decode_step(token, cache)
        return step + 1, out, last_logits, done, cache, rng

    carry = (jnp.int32(0), out, last_logits, done, cache, rng)
    return jax.lax.while_loop(keep_going, step_fn, carry)[1]


def generate(
    model,
    prompt_tokens,
    max_new_tokens: int,
    rng=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos: int | None = None,
    *,
    prompt_lengths=None,
):
    """Samples ``max_new_tokens`` continuations of right-padded prompts; see the module doc."""
    if isinstance(prompt_tokens, list | tuple):
        if prompt_lengths is not None:
            raise ValueError(
                "prompt_lengths is implied by a list of prompts; pass one or the other"
            )
        prompt_tokens, prompt_lengths = pad_prompts(prompt_tokens)
    tokens = jnp.asarray(prompt_tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"prompt_tokens must be [B, P] with P >= 1, got shape {tokens.shape}")
    batch, prompt_len = tokens.shape
    if prompt_lengths is None:
        prompt_lengths = np.full((batch,), prompt_len, np.int32)
    lengths = np.asarray(prompt_lengths, np.int32)
    if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > prompt_len:
        raise ValueError(
            f"prompt_lengths must be [B] = ({batch},) values in [1, {prompt_len}], got {lengths}"
        )
    vocab = model.cfg.vocab_size
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("top_k", top_k, 0)):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if top_k > vocab:
        raise ValueError(f"top_k must be at most the vocabulary ({vocab}), got {top_k}")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"need a finite temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}"
        )
    if eos is not None and not 0 <= eos < vocab:
        raise ValueError(f"eos must be a token id in [0, {vocab}), got {eos}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise ValueError(
            f"prompt token ids must lie in [0, {vocab}), got {tokens.min()}..{tokens.max()}"
        )
    rng = jax.random.key(0) if rng is None else rng
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        tokens,
        jnp.asarray(lengths),
        rng,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos=None if eos is None else int(eos),
    )


# --------------------------------------------------------------------------------------------
# Loading a trained run, and the CLI
# --------------------------------------------------------------------------------------------


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def fill_params(abstract_params, restored_params):
    """Places a restored pure-dict param tree into the model's param state, matching by path.

    (Checkpoints may turn integer list indices into strings, so paths are compared as strings.)
    """
    restored = {
        _path_key(path): value
        for path, value in jax.tree_util.tree_flatten_with_path(restored_params)[0]
    }
    pure = nnx.to_pure_dict(abstract_params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    values = []
    for path, abstract in flat:
        key = _path_key(path)
        if key not in restored:
            raise ValueError(f"checkpoint lacks parameter {'/'.join(key)} {abstract.shape}")
        value = restored.pop(key)
        if tuple(value.shape) != tuple(abstract.shape):
            raise ValueError(
                f"parameter {'/'.join(key)}: checkpoint shape {value.shape}, model {abstract.shape}"
            )
        values.append(jnp.asarray(value, abstract.dtype))
    if restored:
        raise ValueError(f"checkpoint has parameters the model lacks: {sorted(restored)[:8]}")
    nnx.replace_by_pure_dict(abstract_params, jax.tree_util.tree_unflatten(treedef, values))
    return abstract_params


def load_model_from_workdir(workdir: str):
    """(model, config) from WORKDIR/config.json and the latest step in WORKDIR/checkpoints.

    The checkpoint's 'state' item holds ``params``: ``nnx.to_pure_dict(nnx.state(model,
    nnx.Param))`` of the model built from config.model. They are read onto this process's first
    device whatever mesh saved them: evaluation and sampling run on whatever devices are at hand.
    """
    import ml_collections  # noqa: PLC0415 - only the CLI needs these

    from gla_jax.checkpoint import Checkpointer  # noqa: PLC0415
    from gla_jax.model import build_model  # noqa: PLC0415

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint under {directory}")
    checkpointer = Checkpointer(directory, async_save=False)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    first_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = fill_params(params, checkpointer.restore_params(step, first_device))
    checkpointer.close()
    return nnx.merge(graphdef, params, rest), config


def _tokenizer(config):
    """The run's tokenizer when gla_jax.data can build it, else None (ids are printed)."""
    if "data" not in config:
        return None
    try:
        from gla_jax import data as data_lib  # noqa: PLC0415

        return data_lib.make_tokenizer(config.data)
    except Exception as err:  # noqa: BLE001 - printing ids is a fine fallback for a CLI
        print(f"(no tokenizer: {err}; printing token ids)")
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a trained gla-jax run.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--prompt_ids", default=None, help="comma-separated ids (no tokenizer)")
    parser.add_argument("--num_samples", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--eos", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num_samples must be >= 1, got {args.num_samples}")

    model, config = load_model_from_workdir(args.workdir)
    tokenizer = _tokenizer(config)
    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif tokenizer is not None:
        prompt = list(tokenizer.encode(args.prompt))
    else:
        prompt = list(args.prompt.encode("utf-8"))
    out = generate(
        model,
        [prompt] * args.num_samples,
        args.max_new_tokens,
        rng=jax.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos=args.eos,
    )
    for row in np.asarray(out).tolist():
        text = tokenizer.decode(prompt + row) if tokenizer is not None else prompt + row
        print(json.dumps(text) if isinstance(text, str) else text)


if __name__ == "__main__":
    main()
