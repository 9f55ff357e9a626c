"""Training throughput: tokens/s, MFU and peak memory of whole training steps, per config and
sequence length.

Runs the real trainer (real data, AdamW, clipping, checkpoint at the end) once per (config,
sequence length), each in its own process so that its peak memory and compile are its own, and
reads its metrics.jsonl: the initialization's and the first step's wall times (compile
included) are reported on their own (init_s in the JSON rows), and steady-state tokens/s is the
median of the logged windows after the first two.

    python benchmarks/train_throughput.py --configs=gla_340m,transformer_340m \
        --batch_size=8 --seq_len=2048 --steps=200 --out=/tmp/throughput

The paper's Figure 6 view (a fixed number of tokens per batch, longer and fewer rows):

    python benchmarks/train_throughput.py --configs=gla_340m,transformer_340m \
        --seq_lens=2048,4096,8192,16384 --tokens_per_batch=16384 --steps=40 --log_every=10 \
        --out=/tmp/throughput

Prints a table and writes throughput.json and throughput.png (tokens/s and peak memory per
sequence length) to --out. A run that fails (out of memory, say) is a row with its error; the
command then exits 1 after the others. A sweep spread over several calls is put together, and
its plot drawn, with --from_json=a/throughput.json,b/throughput.json (runs nothing).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configs  # noqa: E402 - needs ROOT on the path

_CONFIGS = flags.DEFINE_list("configs", ["gla_340m", "transformer_340m"], "configs/*.py names.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global rows per step (see --tokens_per_batch).")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "Tokens per row (see --seq_lens).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", [], "Several sequence lengths; overrides --seq_len.")
_TOKENS = flags.DEFINE_integer(
    "tokens_per_batch",
    0,
    "If set, rows per step = this / sequence length (overrides --batch_size).",
)
_STEPS = flags.DEFINE_integer("steps", 200, "Steps per run.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 20, "Steps per timing window.")
_MESH = flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes.")
_OUT = flags.DEFINE_string("out", "/tmp/throughput", "Folder for the runs, the JSON and the plot.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Extra config overrides, key=python_literal.")
_TIMEOUT = flags.DEFINE_integer("run_timeout", 900, "Seconds one run may take before it is killed.")
_KEEP = flags.DEFINE_bool("keep_checkpoints", False, "Keep each run's final checkpoint.")
_FROM_JSON = flags.DEFINE_list(
    "from_json", [], "Run nothing: merge these throughput.json files (sweeps cut across calls)."
)
_RESULT = flags.DEFINE_string("result", "", "Internal: measure one run here, write its row here.")


def load_config(name: str):
    try:
        return configs.load(name)
    except FileNotFoundError as err:
        raise app.UsageError(f"--configs: {err}") from None


def run_shapes() -> list[tuple[int, int]]:
    """(seq_len, batch_size) of each run, checked: rows must divide --tokens_per_batch."""
    seq_lens = [int(s) for s in _SEQ_LENS.value] or [_SEQ.value]
    shapes = []
    for seq_len in seq_lens:
        if seq_len < 1:
            raise app.UsageError(f"--seq_lens: {seq_len} is not a positive length")
        if _TOKENS.value:
            if _TOKENS.value % seq_len:
                raise app.UsageError(
                    f"--tokens_per_batch={_TOKENS.value} is not a multiple of seq_len {seq_len}"
                )
            shapes.append((seq_len, _TOKENS.value // seq_len))
        else:
            shapes.append((seq_len, _BATCH.value))
    return shapes


def apply_override(config, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        raise app.UsageError(f"--set={item!r}: expected key=value")
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
        target = target[parent]
    try:
        target[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        target[leaf] = value  # a bare string such as --set=model.backend=xla


def peak_memory_gib() -> float:
    """The largest peak of this process's local devices (0 where the backend keeps no stats)."""
    import jax  # noqa: PLC0415

    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
    return max(peaks) / 2**30


def measure(name: str, seq_len: int, batch_size: int, workdir: str) -> dict:
    """Train configs/NAME.py at this shape into WORKDIR; its row of the table."""
    import jax  # noqa: PLC0415

    from gla_jax import trainer  # noqa: PLC0415

    config = load_config(name)
    config.unlock()
    config.batch_size = batch_size
    config.seq_len = seq_len
    config.steps = _STEPS.value
    config.log_every = _LOG_EVERY.value
    config.eval_every = 0
    config.num_samples = 0
    config.checkpoint_every = _STEPS.value
    config.mesh = _MESH.value
    for item in _OVERRIDES.value:
        apply_override(config, item)
    start = time.time()
    trainer.main(config, workdir)
    wall = time.time() - start
    all_records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    first_step_s = next((r["first_step_s"] for r in all_records if "first_step_s" in r), None)
    init_s = next((r["init_s"] for r in all_records if "init_s" in r), None)
    records = [r for r in all_records if "tokens_per_s" in r]
    steady = records[2:] or records[-1:]  # the first windows still warm up
    tokens_per_s = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
    mfu = [r["mfu"] for r in steady if r.get("mfu")]
    return {
        "config": name,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "steps": config.steps,
        "init_s": init_s,
        "first_step_s": first_step_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / jax.device_count(),
        "mfu": sorted(mfu)[len(mfu) // 2] if mfu else None,
        "peak_memory_gib": peak_memory_gib(),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "wall_s": wall,
    }


def child_argv(name: str, seq_len: int, batch_size: int, result: str) -> list[str]:
    """This script, measuring one run in a process of its own."""
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        f"--configs={name}",
        f"--seq_len={seq_len}",
        f"--batch_size={batch_size}",
        f"--steps={_STEPS.value}",
        f"--log_every={_LOG_EVERY.value}",
        f"--mesh={_MESH.value}",
        f"--out={_OUT.value}",
        f"--result={result}",
    ]
    return argv + [f"--set={item}" for item in _OVERRIDES.value]


def run_child(name: str, seq_len: int, batch_size: int) -> dict:
    """One run in a child process; its row, or a row that says why it failed."""
    tag = f"{name}_T{seq_len}_B{batch_size}"
    result = os.path.join(_OUT.value, f"{tag}.json")
    log_path = os.path.join(_OUT.value, f"{tag}.log")
    row = {"config": name, "seq_len": seq_len, "batch_size": batch_size}
    print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", flush=True)
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                child_argv(name, seq_len, batch_size, result),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=_TIMEOUT.value,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {_TIMEOUT.value} s"
    if code == 0 and os.path.isfile(result):
        with open(result) as f:
            return json.load(f)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-600:]
    memory = "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()
    row["error"] = ("out of memory" if memory else f"exit {code}") + f"; log {log_path}"
    print(f"  failed: {row['error']}\n{tail}", flush=True)
    return row


HEADER = (
    f"{'config':<20} {'T':>6} {'B':>4} {'dev':>3} {'1st step s':>10} {'tokens/s':>12} "
    f"{'MFU':>6} {'peak GiB':>9} {'loss':>15}"
)


def format_row(r: dict) -> str:
    head = f"{r['config']:<20} {r['seq_len']:>6} {r['batch_size']:>4}"
    if "error" in r:
        return f"{head}  FAILED: {r['error']}"
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
    first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "-"
    return (
        f"{head} {r['devices']:>3} {first:>10} {r['tokens_per_s']:>12,.0f} {mfu:>6} "
        f"{r['peak_memory_gib']:>9.1f} {r['first_loss']:>7.3f}->{r['last_loss']:<7.3f}"
    )


def line_label(row: dict) -> str:
    devices = row.get("devices") or 1
    return row["config"] + (f" ({devices} devices)" if devices > 1 else "")


def plot(rows: list[dict], path: str) -> None:
    """Tokens/s and peak memory against sequence length, one line per config (and device count)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    done = [r for r in rows if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in dict.fromkeys(line_label(r) for r in done):
        line = sorted((r for r in done if line_label(r) == label), key=lambda r: r["seq_len"])
        seq_lens = [r["seq_len"] for r in line]
        axes[0].plot(seq_lens, [r["tokens_per_s"] for r in line], "o-", label=label)
        axes[1].plot(seq_lens, [r["peak_memory_gib"] for r in line], "o-", label=label)
    for ax, label in zip(axes, ("tokens / s", "peak memory (GiB per device)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    tokens = {r["seq_len"] * r["batch_size"] for r in rows}
    batch = f"{tokens.pop():,} tokens per batch" if len(tokens) == 1 else "several batch sizes"
    fig.suptitle(f"training throughput, {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _RESULT.value:  # a child: one run
        name, seq_len, batch_size = _CONFIGS.value[0], _SEQ.value, _BATCH.value
        workdir = os.path.join(_OUT.value, "runs", f"{name}_T{seq_len}_B{batch_size}")
        shutil.rmtree(workdir, ignore_errors=True)  # a run measures from step 0
        row = measure(name, seq_len, batch_size, workdir)
        if not _KEEP.value:
            shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        with open(_RESULT.value, "w") as f:
            json.dump(row, f, indent=2)
        return
    if _FROM_JSON.value:
        rows = merged_rows(_FROM_JSON.value)
        os.makedirs(_OUT.value, exist_ok=True)
        write_table(rows)
        return
    for name in _CONFIGS.value:
        load_config(name)  # a misspelt config fails before any run
    # A stop from outside (timeout, SIGTERM) unwinds through subprocess.run, which then kills the
    # running child: left alive, it would keep its GPU memory and starve whatever comes next.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shapes = run_shapes()
    os.makedirs(_OUT.value, exist_ok=True)
    rows = []
    # Length by length, so a sweep stopped early still has every config at the shorter lengths;
    # the JSON is rewritten after each run for the same reason.
    for shape in shapes:
        for name in _CONFIGS.value:
            rows.append(run_child(name, *shape))
            print(format_row(rows[-1]), flush=True)
            with open(os.path.join(_OUT.value, "throughput.json"), "w") as f:
                json.dump(rows, f, indent=2)
    write_table(rows)
    if any("error" in r for r in rows):
        sys.exit(1)


def merged_rows(paths: list[str]) -> list[dict]:
    """Rows of several throughput.json files, a later file's row replacing an earlier one of
    the same (config, length, batch, devices) and failed rows dropped where one succeeded."""
    by_key = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f):
                key = (row["config"], row["seq_len"], row["batch_size"], row.get("devices"))
                same_run = [k for k in by_key if k[:3] == key[:3]]
                if "error" in row:
                    if any("error" not in by_key[k] for k in same_run):
                        continue
                else:  # a failed row has no device count: drop it when a success comes
                    for k in same_run:
                        if "error" in by_key[k]:
                            del by_key[k]
                by_key[key] = row
    return sorted(by_key.values(), key=lambda r: (r["config"], r["seq_len"]))


def write_table(rows: list[dict]) -> None:
    """Print the table; write throughput.json and throughput.png to --out."""
    print(f"\n{HEADER}")
    for r in rows:
        print(format_row(r))
    with open(os.path.join(_OUT.value, "throughput.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(_OUT.value, "throughput.png"))
    print(f"wrote {_OUT.value}/throughput.json and throughput.png", flush=True)


if __name__ == "__main__":
    app.run(main)
