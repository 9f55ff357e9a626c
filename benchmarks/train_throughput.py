"""Training throughput: tokens/s, MFU and peak memory of whole training steps, per config.

Runs the real trainer (real data, AdamW, clipping, checkpoint at the end) for each config and
reads its metrics.jsonl: the first step's wall time (trace + compile + one run) is reported on its
own, and steady-state tokens/s is the median of the logged windows after the first two.

    python benchmarks/train_throughput.py --configs=gla_340m,transformer_340m \
        --batch_size=8 --seq_len=2048 --steps=200 --out=/tmp/throughput

Prints a table and writes throughput.json and throughput.png to --out.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIGS = flags.DEFINE_list("configs", ["gla_340m", "transformer_340m"], "configs/*.py names.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global rows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "Tokens per row.")
_STEPS = flags.DEFINE_integer("steps", 200, "Steps per config.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 20, "Steps per timing window.")
_MESH = flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes.")
_OUT = flags.DEFINE_string("out", "/tmp/throughput", "Folder for the JSON and the plot.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra config overrides, key=python_literal.")


def load_config(name: str):
    import importlib.util  # noqa: PLC0415

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py"
    )
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(name: str) -> dict:
    import ast  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from gla_jax import trainer  # noqa: PLC0415

    config = load_config(name)
    config.unlock()
    config.batch_size = _BATCH.value
    config.seq_len = _SEQ.value
    config.steps = _STEPS.value
    config.log_every = _LOG_EVERY.value
    config.eval_every = 0
    config.num_samples = 0
    config.checkpoint_every = _STEPS.value
    config.mesh = _MESH.value
    for item in _OVERRIDES.value:
        key, value = item.split("=", 1)
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = ast.literal_eval(value)
    workdir = os.path.join(_OUT.value, f"run_{name}_{int(time.time())}")
    start = time.time()
    trainer.main(config, workdir)
    wall = time.time() - start
    all_records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    first_step_s = next((r["first_step_s"] for r in all_records if "first_step_s" in r), None)
    records = [r for r in all_records if "tokens_per_s" in r]
    steady = records[2:] or records[-1:]  # the first windows still warm up
    tokens_per_s = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    mfu = [r["mfu"] for r in steady if r.get("mfu")]
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "config": name,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "steps": config.steps,
        "first_step_s": first_step_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / jax.device_count(),
        "mfu": sorted(mfu)[len(mfu) // 2] if mfu else None,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "wall_s": wall,
    }


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    os.makedirs(_OUT.value, exist_ok=True)
    rows = [measure(name) for name in _CONFIGS.value]
    header = (
        f"{'config':<20} {'dev':>3} {'1st step s':>10} {'tokens/s':>12} {'MFU':>6} "
        f"{'peak GiB':>9} {'loss':>15}"
    )
    print(header)
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "-"
        print(
            f"{r['config']:<20} {r['devices']:>3} {first:>10} {r['tokens_per_s']:>12,.0f} {mfu:>6} "
            f"{r['peak_memory_gib']:>9.1f} {r['first_loss']:>7.3f}->{r['last_loss']:<7.3f}"
        )
    with open(os.path.join(_OUT.value, "throughput.json"), "w") as f:
        json.dump(rows, f, indent=2)
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["config"] for r in rows], [r["tokens_per_s"] for r in rows])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"training throughput, B={_BATCH.value}, T={_SEQ.value}")
        fig.tight_layout()
        fig.savefig(os.path.join(_OUT.value, "throughput.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    app.run(main)
