"""Evaluation of trained runs: perplexity by context length, loss by token position, MQAR recall.

    python -m gla_jax.evaluate --workdir=runs/gla --workdir=runs/tfm --length_multiples=1,2,4,8
    python -m gla_jax.evaluate --workdir=runs/gla --lengths=512,1024,2048,4096 --max_batches=8
    python -m gla_jax.evaluate --mqar --workdir=runs/mqar_gla [--mqar_num_kv_pairs=64]

Perplexity: for each length L the run's held-out split (``data.eval_split`` of its own data
config, or --dataset) is packed into rows of L tokens and scored with the same masked
cross-entropy as training. The loss is also summed per bucket of token position -- the
position inside the token's document within the row, i.e. how much context the model had --
which is the length-extrapolation view: a model that extrapolates keeps a flat curve past its
training length. Transformer++ gets RoPE positions beyond its training length as they come
(its ``max_seq_len`` only sizes decode caches). Results go to OUTPUT/perplexity.json and
OUTPUT/perplexity.png (OUTPUT: --output_dir, default the first workdir's eval/).

MQAR: exact-match accuracy of greedy predictions on answer tokens (gla_jax/mqar.py), on the
run's task or on another sequence length / number of pairs; OUTPUT/mqar.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from gla_jax import data as data_lib
from gla_jax import mqar
from gla_jax.eval_plots import plot_mqar, plot_perplexity

# On the CPU, XLA's attention materializes [rows, heads, L, L] float32 scores; past this many
# bytes an evaluation length is refused rather than left to exhaust the host's memory.
MAX_ATTENTION_SCORE_BYTES = 16 * 2**30


# --------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------


def load_run(workdir: str):
    """(model, config) of a training run, with errors that say what is missing."""
    from gla_jax.sampling import load_model_from_workdir  # noqa: PLC0415 - heavy imports

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(
            f"workdir {workdir!r} has no config.json: it is not a training run's workdir"
        )
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        raise FileNotFoundError(
            f"workdir {workdir!r} has no checkpoint under {checkpoints}: train it first "
            "(python train.py --config=... --workdir=...)"
        )
    return load_model_from_workdir(workdir)


# --------------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------------


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def eval_lengths(train_len: int, lengths: str, multiples: str) -> list[int]:
    """Explicit --lengths, else --length_multiples of the training length; sorted, unique."""
    if lengths:
        chosen = parse_ints(lengths, "--lengths")
    else:
        chosen = [m * train_len for m in parse_ints(multiples, "--length_multiples")]
    return sorted(set(chosen))


def rows_for_length(length: int, tokens_per_batch: int) -> int:
    """Rows per batch at this length: a fixed token budget, at least one row."""
    return max(1, tokens_per_batch // length)


def check_length(model_cfg, length: int, rows: int) -> None:
    """ValueError naming the length when the model cannot be evaluated on it."""
    if length < 2:
        raise ValueError(f"evaluation length {length}: a row needs at least 2 tokens")
    if model_cfg.mixer == "attention" and jax.default_backend() == "cpu":
        score_bytes = rows * model_cfg.n_heads * length * length * 4
        if score_bytes > MAX_ATTENTION_SCORE_BYTES:
            raise ValueError(
                f"evaluation length {length}: softmax attention on the CPU would hold "
                f"{score_bytes / 2**30:.1f} GiB of scores per layer for {rows} row(s) "
                f"(limit {MAX_ATTENTION_SCORE_BYTES / 2**30:.0f} GiB); lower the length or "
                "--tokens_per_batch, or evaluate on a GPU"
            )


# --------------------------------------------------------------------------------------------
# Losses per token, and their buckets
# --------------------------------------------------------------------------------------------


def make_token_loss_fn(model, use_segments: bool):
    """jitted (tokens, segment_ids, targets) -> per-token cross-entropy [B, L] float32."""
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(model)

    @jax.jit
    def token_loss(state, tokens, segment_ids, targets):
        model = nnx.merge(graphdef, state)
        logits = model(tokens, segment_ids=segment_ids if use_segments else None)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)

    return lambda batch: token_loss(state, batch["tokens"], batch["segment_ids"], batch["targets"])


def bucket_losses(losses, mask, positions, bucket_size: int, num_buckets: int):
    """(loss sums, token counts), each [num_buckets]: tokens binned by position // bucket_size.

    Every masked token lands in exactly one bucket, so the sums add up to the overall totals.
    """
    weights = np.asarray(mask, np.float64).reshape(-1)
    index = np.minimum(np.asarray(positions).reshape(-1) // bucket_size, num_buckets - 1)
    losses = np.asarray(losses, np.float64).reshape(-1)
    sums = np.bincount(index, weights=losses * weights, minlength=num_buckets)
    counts = np.bincount(index, weights=weights, minlength=num_buckets)
    return sums, counts


_last_progress_line = [0.0]


def _progress(message: str, final: bool = False) -> None:
    """One rewritten line on a terminal; in a log, a line every 10 s and the final one."""
    if sys.stderr.isatty():
        sys.stderr.write("\r" + message + ("\n" if final else "   "))
    elif final or time.time() - _last_progress_line[0] >= 10:
        sys.stderr.write(message + "\n")
        _last_progress_line[0] = time.time()
    sys.stderr.flush()


def evaluate_length(
    model,
    data_config,
    length: int,
    *,
    rows: int,
    max_batches: int | None,
    bucket_size: int,
    context: str = "document",
    label: str = "",
) -> dict:
    """Loss, perplexity and position buckets of one run at one length (one pass, or
    ``max_batches`` batches, over the held-out split)."""
    iterator = data_lib.make_eval_dataset(
        data_config, seq_len=length, global_batch_size=rows, num_batches=max_batches
    )
    token_loss = make_token_loss_fn(model, use_segments=context == "document")
    num_buckets = -(-length // bucket_size)
    sums, counts = np.zeros(num_buckets), np.zeros(num_buckets)
    start, batches = time.time(), 0
    for batch in iterator:
        losses = np.asarray(token_loss(batch))
        positions = batch["positions"] if context == "document" else _columns(batch["tokens"])
        s, c = bucket_losses(losses, batch["loss_mask"], positions, bucket_size, num_buckets)
        sums, counts, batches = sums + s, counts + c, batches + 1
        of = f"/{max_batches}" if max_batches else ""
        _progress(
            f"{label} L={length}: batch {batches}{of}, {int(counts.sum()):,} tokens, "
            f"loss {sums.sum() / max(counts.sum(), 1):.4f}, {time.time() - start:.0f}s"
        )
    total, count = float(sums.sum()), float(counts.sum())
    if count == 0:
        raise ValueError(
            f"the evaluation split of {data_config.name!r} gave no scored tokens at length {length}"
        )
    _progress(f"{label} L={length}: {batches} batches, {int(count):,} tokens", final=True)
    loss = total / count
    return {
        "length": int(length),
        "rows_per_batch": int(rows),
        "batches": batches,
        "tokens": int(count),
        "loss": loss,
        "perplexity": math.exp(loss),
        "bucket_size": int(bucket_size),
        "bucket_start": [i * bucket_size for i in range(num_buckets)],
        "bucket_loss": [float(s / c) if c else None for s, c in zip(sums, counts, strict=True)],
        "bucket_tokens": [int(c) for c in counts],
    }


def _columns(tokens):
    return np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)


def data_config_for_eval(config, dataset: str = "", data_dir: str = "", split: str = ""):
    """The run's data config, optionally pointed at another dataset, data dir or split."""
    data_config = config.data.copy_and_resolve_references()
    with data_config.unlocked():
        if dataset:
            data_config.name = dataset
        if data_dir:
            data_config.data_dir = data_dir
        if split:
            data_config.eval_split = split
    return data_config


def perplexity_by_length(
    workdir: str,
    lengths: list[int] | None = None,
    *,
    length_multiples: str = "1,2,4,8",
    tokens_per_batch: int = 0,
    max_batches: int | None = None,
    bucket_size: int = 0,
    context: str = "document",
    dataset: str = "",
    data_dir: str = "",
    split: str = "",
    label: str = "",
) -> dict:
    """Perplexity of one run at each length; see the module docstring."""
    if context not in ("document", "row"):
        raise ValueError(f"context must be 'document' or 'row', got {context!r}")
    for name, value in (
        ("tokens_per_batch", tokens_per_batch),
        ("bucket_size", bucket_size),
        ("max_batches", max_batches or 0),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: the default), got {value}")
    model, config = load_run(workdir)
    train_len = int(config.seq_len)
    # Sorted and unique, as the plots take the last result for the longest length.
    lengths = sorted(set(lengths)) if lengths else eval_lengths(train_len, "", length_multiples)
    tokens_per_batch = tokens_per_batch or int(config.eval_batch_size) * train_len
    bucket_size = bucket_size or max(1, train_len // 4)
    data_config = data_config_for_eval(config, dataset, data_dir, split)
    data_lib.check_vocab(data_lib.make_tokenizer(data_config), model.cfg.vocab_size)
    for length in lengths:  # refuse a bad length before spending time on the good ones
        check_length(model.cfg, length, rows_for_length(length, tokens_per_batch))
    label = label or os.path.basename(os.path.normpath(workdir))
    results = [
        evaluate_length(
            model,
            data_config,
            length,
            rows=rows_for_length(length, tokens_per_batch),
            max_batches=max_batches,
            bucket_size=bucket_size,
            context=context,
            label=label,
        )
        for length in lengths
    ]
    return {
        "workdir": os.path.abspath(workdir),
        "label": label,
        "model_type": str(config.model.get("type", "gla")),
        "train_seq_len": train_len,
        "dataset": data_config.name,
        "split": data_config.eval_split,
        "context": context,
        "results": results,
    }


# --------------------------------------------------------------------------------------------
# MQAR
# --------------------------------------------------------------------------------------------


def mqar_accuracy(
    workdir: str,
    *,
    seq_len: int = 0,
    num_kv_pairs: int = 0,
    num_batches: int = 8,
    batch_size: int = 64,
) -> dict:
    """Answer-token accuracy of a run trained on MQAR, on its task or a resized one."""
    from flax import nnx  # noqa: PLC0415

    if num_batches < 1 or batch_size < 1:
        raise ValueError(
            f"MQAR needs num_batches >= 1 and batch_size >= 1, got {num_batches} and {batch_size}"
        )
    model, config = load_run(workdir)
    if config.data.name != "mqar":
        raise ValueError(f"workdir {workdir!r} was trained on {config.data.name!r}, not on 'mqar'")
    seq_len = seq_len or int(config.seq_len)
    trained = mqar.task_from_config(config.data, int(config.seq_len))
    task = mqar.MQARTask(seq_len, num_kv_pairs or trained.num_kv_pairs, trained.vocab_size)
    if task.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"MQAR vocab_size {task.vocab_size} exceeds the model's vocab_size "
            f"{model.cfg.vocab_size}"
        )
    # Validation sequences: a random stream apart from the training one.
    batches = mqar.MQARBatches(
        task,
        seed=int(config.data.seed),
        split="validation",
        global_batch_size=batch_size,
        num_batches=num_batches,
    )
    graphdef, state = nnx.split(model)
    logits_fn = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    totals = {"correct": 0, "answers": 0, "rows_all_correct": 0, "rows": 0}
    for i, batch in enumerate(batches):
        counts = mqar.answer_accuracy(np.asarray(logits_fn(state, batch["tokens"])), batch)
        totals = {k: totals[k] + counts[k] for k in totals}
        _progress(f"mqar {workdir}: batch {i + 1}/{num_batches}", final=i + 1 == num_batches)
    return {
        "workdir": os.path.abspath(workdir),
        "model_type": str(config.model.get("type", "gla")),
        "use_forget_gate": bool(config.model.get("use_forget_gate", True)),
        "seq_len": seq_len,
        "num_kv_pairs": task.num_kv_pairs,
        "vocab_size": task.vocab_size,
        **totals,
        "accuracy": totals["correct"] / max(totals["answers"], 1),
        "sequence_accuracy": totals["rows_all_correct"] / max(totals["rows"], 1),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def print_table(runs: list[dict]) -> None:
    lengths = sorted({r["length"] for run in runs for r in run["results"]})
    print(f"{'perplexity':<17}" + "".join(f"{f'L={n}':>12}" for n in lengths))
    for run in runs:
        by_length = {r["length"]: r["perplexity"] for r in run["results"]}
        cells = "".join(f"{by_length[n]:12.3f}" if n in by_length else f"{'':>12}" for n in lengths)
        print(f"{run['label'][:16]:<17}{cells}")


def write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "A training run's workdir (repeatable).")
_LABEL = flags.DEFINE_multi_string("label", None, "A name per --workdir for tables and plots.")
_LENGTHS = flags.DEFINE_string("lengths", "", "Evaluation lengths, e.g. 512,1024,2048,4096.")
_MULTIPLES = flags.DEFINE_string(
    "length_multiples", "1,2,4,8", "Multiples of each run's training length (without --lengths)."
)
_TOKENS = flags.DEFINE_integer(
    "tokens_per_batch", 0, "Tokens per batch at every length (default eval_batch_size x seq_len)."
)
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", 0, "Batches per length (0: one whole pass over the split)."
)
_BUCKET = flags.DEFINE_integer("bucket_size", 0, "Positions per bucket (default seq_len / 4).")
_CONTEXT = flags.DEFINE_enum(
    "context",
    "document",
    ["document", "row"],
    "document: tokens see only their own document (as in training); row: a row is one stream.",
)
_DATASET = flags.DEFINE_string("dataset", "", "Evaluate on this data.name instead of the run's.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Override data.data_dir.")
_SPLIT = flags.DEFINE_string("split", "", "Override data.eval_split.")
_OUTPUT = flags.DEFINE_string("output_dir", "", "Where JSON and plots go (default WORKDIR/eval).")
_MQAR = flags.DEFINE_bool("mqar", False, "MQAR answer accuracy instead of perplexity.")
_MQAR_LEN = flags.DEFINE_integer("mqar_seq_len", 0, "MQAR sequence length (default: the run's).")
_MQAR_PAIRS = flags.DEFINE_integer("mqar_num_kv_pairs", 0, "MQAR pairs (default: the run's).")
_MQAR_BATCHES = flags.DEFINE_integer("mqar_batches", 8, "MQAR evaluation batches.")
_MQAR_BATCH_SIZE = flags.DEFINE_integer("mqar_batch_size", 64, "MQAR rows per batch.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every file at INFO
    workdirs = _WORKDIR.value or []
    if not workdirs:
        raise app.UsageError("--workdir is required")
    labels = _LABEL.value or [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(labels) != len(workdirs):
        raise app.UsageError(f"{len(labels)} --label for {len(workdirs)} --workdir")
    output_dir = _OUTPUT.value or os.path.join(workdirs[0], "eval")
    if _MQAR.value:
        results = []
        for workdir, label in zip(workdirs, labels, strict=True):
            result = mqar_accuracy(
                workdir,
                seq_len=_MQAR_LEN.value,
                num_kv_pairs=_MQAR_PAIRS.value,
                num_batches=_MQAR_BATCHES.value,
                batch_size=_MQAR_BATCH_SIZE.value,
            )
            results.append({"label": label, **result})
            print(
                f"{label}: accuracy {result['accuracy']:.4f} ({result['correct']}/"
                f"{result['answers']} answers), all answers right in "
                f"{result['sequence_accuracy']:.3f} of sequences "
                f"(T={result['seq_len']}, {result['num_kv_pairs']} pairs)"
            )
        write_json(results, os.path.join(output_dir, "mqar.json"))
        plot_mqar(results, os.path.join(output_dir, "mqar.png"))
        print(f"wrote {output_dir}/mqar.json and mqar.png")
        return
    explicit = parse_ints(_LENGTHS.value, "--lengths") if _LENGTHS.value else None
    runs = [
        perplexity_by_length(
            workdir,
            explicit,
            length_multiples=_MULTIPLES.value,
            tokens_per_batch=_TOKENS.value,
            max_batches=_MAX_BATCHES.value or None,
            bucket_size=_BUCKET.value,
            context=_CONTEXT.value,
            dataset=_DATASET.value,
            data_dir=_DATA_DIR.value,
            split=_SPLIT.value,
            label=label,
        )
        for workdir, label in zip(workdirs, labels, strict=True)
    ]
    print_table(runs)
    write_json(runs, os.path.join(output_dir, "perplexity.json"))
    plot_perplexity(runs, os.path.join(output_dir, "perplexity.png"))
    print(f"wrote {output_dir}/perplexity.json and perplexity.png")


def run() -> None:
    """Entry point that turns the expected failures into one clear line instead of a trace."""
    try:
        app.run(main)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
