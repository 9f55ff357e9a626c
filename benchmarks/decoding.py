"""Decoding: per-token latency and memory vs context length, GLA's recurrent step vs a KV cache.

For each model and context length L, the cache is placed as if L tokens had been read (the
KV cache holds L + the timed tokens; GLA's state has one size whatever L is), then one jitted
``decode_step`` per token is timed, each waited for as a generation loop would. Weights are
random: the cost of a step does not depend on their values.

    python benchmarks/decoding.py --models=gla_340m,transformer_340m \
        --contexts=1024,2048,4096,8192,16384,32768,65536 --batch_size=1 --out=/tmp/decoding
    python benchmarks/decoding.py --smoke --out=/tmp/decoding_smoke      # tiny, runs on a CPU

Also times one fused recurrent GLA op call alone (--op_shape=H,K,V; the paper's 1.3B layer is
4,256,512), the per-layer figure the reference library's step is quoted at. Prints a table and
writes decoding.json and decoding.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configs  # noqa: E402 - needs ROOT on the path

SMOKE_MODEL = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=2, dtype="float32")


def model_configs(args) -> dict:
    """name -> GLAConfig for each model to time."""
    from gla_jax.model import GLAConfig, config_from_dict  # noqa: PLC0415

    if args.smoke:
        return {
            "gla": GLAConfig(**SMOKE_MODEL),
            "transformer": GLAConfig(mixer="attention", **SMOKE_MODEL),
        }
    by_name = {}
    for name in args.models.split(","):
        # 'tiny:transformer' is configs/tiny.py's model with its mixer swapped for attention.
        file_name, _, model_type = name.partition(":")
        fields = configs.load(file_name).model.to_dict()
        fields["type"] = model_type or fields.get("type", "gla")
        if args.dtype:
            fields["dtype"] = args.dtype
        by_name[name] = config_from_dict(fields)
    return by_name


def tree_bytes(tree) -> int:
    import jax  # noqa: PLC0415

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def device_bytes_in_use() -> int | None:
    import jax  # noqa: PLC0415

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


def make_step(model):
    """jitted (state, tokens [B], cache) -> (logits, cache), the cache donated."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(model)

    def step(state, tokens, cache):
        return nnx.merge(graphdef, state).decode_step(tokens, cache)

    return jax.jit(step, donate_argnums=(2,)), state


def time_context(model, step, state, context: int, batch: int, warmup: int, steps: int) -> dict:
    """Per-token latency (ms) and cache size of decoding after `context` tokens."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    cache = model.init_cache(batch, max_len=context + warmup + steps)
    cache = cache._replace(positions=jnp.full((batch,), context, jnp.int32))
    cache_bytes = tree_bytes(cache.layers)
    tokens = jnp.zeros((batch,), jnp.int32)
    for _ in range(warmup):
        logits, cache = step(state, tokens, cache)
    jax.block_until_ready(cache)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits, cache = step(state, tokens, cache)
        jax.block_until_ready((logits, cache))
        times.append(time.perf_counter() - start)
    in_use = device_bytes_in_use()
    del cache
    ms = np.asarray(times) * 1e3
    return {
        "context": context,
        "ms_per_token": float(np.median(ms)),
        "ms_p90": float(np.percentile(ms, 90)),
        "cache_mib": cache_bytes / 2**20,
        "device_mib_in_use": None if in_use is None else in_use / 2**20,
    }


def time_recurrent_op(batch: int, heads: int, key_dim: int, value_dim: int, steps: int) -> dict:
    """One fused_recurrent_gla call with T = 1 (bf16 inputs, float32 state), alone."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from gla_jax.ops import fused_recurrent_gla  # noqa: PLC0415

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, g = (jax.random.normal(kk, (batch, 1, heads, key_dim), jnp.bfloat16) for kk in keys[:3])
    g = jax.nn.log_sigmoid(g.astype(jnp.float32)) / 16
    v = jax.random.normal(keys[3], (batch, 1, heads, value_dim), jnp.bfloat16)
    state = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
    op = jax.jit(
        lambda q, k, v, g, s: fused_recurrent_gla(
            q, k, v, g, initial_state=s, output_final_state=True
        )
    )
    jax.block_until_ready(op(q, k, v, g, state))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        o, state = op(q, k, v, g, state)
        jax.block_until_ready((o, state))
        times.append(time.perf_counter() - start)
    return {
        "batch": batch,
        "heads": heads,
        "key_dim": key_dim,
        "value_dim": value_dim,
        "ms_per_call": float(np.median(times) * 1e3),
    }


def measure_model(name: str, cfg, args) -> list[dict]:
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from gla_jax.model import GLALM, count_params  # noqa: PLC0415

    model = GLALM(cfg, rngs=nnx.Rngs(0))
    step, state = make_step(model)
    rows = []
    for context in args.contexts:
        row = {
            "model": name,
            "mixer": cfg.mixer,
            "params": count_params(model),
            "batch": args.batch_size,
        }
        try:
            row.update(
                time_context(model, step, state, context, args.batch_size, args.warmup, args.steps)
            )
        except (jax.errors.JaxRuntimeError, MemoryError) as err:  # e.g. a KV cache out of memory
            row.update({"context": context, "error": str(err).splitlines()[0][:200]})
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def format_row(row: dict) -> str:
    head = f"{row['model']:<20} {row['context']:>7}"
    if "error" in row:
        return f"{head}  failed: {row['error']}"
    in_use = row["device_mib_in_use"]
    return (
        f"{head} {row['ms_per_token']:10.3f} {row['ms_p90']:9.3f} {row['cache_mib']:11.3f} "
        f"{'-' if in_use is None else f'{in_use:.0f}':>12}"
    )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for name in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == name and "error" not in r]
        contexts = [r["context"] for r in ok]
        left.plot(contexts, [r["ms_per_token"] for r in ok], "o-", label=name)
        right.plot(contexts, [r["cache_mib"] for r in ok], "o-", label=name)
    left.set(xscale="log", xlabel="context length", ylabel="ms per token", title="latency")
    right.set(
        xscale="log", yscale="log", xlabel="context length", ylabel="MiB", title="decoding cache"
    )
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="gla_340m,transformer_340m",
        help="configs/*.py names; NAME:transformer or NAME:gla overrides model.type",
    )
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768,65536")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="timed tokens per context")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="", help="override the configs' computation dtype")
    parser.add_argument("--op_shape", default="4,256,512", help="H,K,V of the op alone; '' skips")
    parser.add_argument("--out", default="/tmp/decoding")
    parser.add_argument("--smoke", action="store_true", help="tiny models and contexts (CPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.steps, args.warmup = "16,32,64", 3, 1
        args.op_shape = "2,16,32" if args.op_shape else ""
    args.contexts = sorted(int(c) for c in args.contexts.split(","))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax  # noqa: PLC0415

    print(f"device: {jax.devices()[0].device_kind}, batch {args.batch_size}")
    print(
        f"{'model':<20} {'context':>7} {'ms/token':>10} {'p90 ms':>9} {'cache MiB':>11} "
        f"{'in use MiB':>12}"
    )
    rows = []
    for name, cfg in model_configs(args).items():
        rows.extend(measure_model(name, cfg, args))
    op = None
    if args.op_shape:
        heads, key_dim, value_dim = (int(x) for x in args.op_shape.split(","))
        op = time_recurrent_op(args.batch_size, heads, key_dim, value_dim, max(args.steps, 3))
        print(
            f"fused_recurrent_gla alone (B={args.batch_size}, H={heads}, K={key_dim}, "
            f"V={value_dim}): {op['ms_per_call']:.3f} ms per call"
        )
    result = {"device": jax.devices()[0].device_kind, "rows": rows, "recurrent_op": op}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decoding.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.join(args.out, "decoding.png"))
    print(f"wrote {args.out}/decoding.json and decoding.png")
    return result


if __name__ == "__main__":
    main()
