"""Plots for gla_jax.evaluate: perplexity by length and position, MQAR training curves."""

from __future__ import annotations

import json
import math
import os

from gla_jax import mqar


def _pyplot():
    import matplotlib  # noqa: PLC0415 - only the CLI draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return matplotlib, plt


def plot_perplexity(runs: list[dict], path: str) -> None:
    """Two panels: perplexity vs evaluation length, and loss by token position (the longest
    length of each run), with the training length marked."""
    matplotlib, plt = _pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90)
    for run in runs:
        lengths = [r["length"] for r in run["results"]]
        (line,) = left.plot(
            lengths, [r["perplexity"] for r in run["results"]], "o-", label=run["label"]
        )
        longest = run["results"][-1]
        centers = [s + longest["bucket_size"] / 2 for s in longest["bucket_start"]]
        right.plot(
            centers,
            longest["bucket_loss"],
            "-",
            color=line.get_color(),
            label=f"{run['label']} (L={longest['length']})",
        )
        for axis in (left, right):
            axis.axvline(run["train_seq_len"], color=line.get_color(), ls=":", lw=1)
    left.set(
        xscale="log",
        xlabel="evaluation length (tokens)",
        ylabel="perplexity",
        title="perplexity by length (dotted: training length)",
    )
    left.set_xticks(sorted({r["length"] for run in runs for r in run["results"]}))
    left.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set(
        xlabel="token position in its document", ylabel="loss (nats)", title="loss by position"
    )
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def training_losses(workdir: str) -> tuple[list[int], list[float]]:
    """(steps, losses) from WORKDIR/metrics.jsonl; a step logged twice keeps its last value."""
    losses = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if "loss" in record:
                    losses[int(record["step"])] = float(record["loss"])
    steps = sorted(losses)
    return steps, [losses[s] for s in steps]


def plot_mqar(results: list[dict], path: str) -> None:
    """Training loss of each MQAR run, labelled with its answer accuracy."""
    _, plt = _pyplot()

    fig, axis = plt.subplots(figsize=(6, 3.8), dpi=90)
    for result in results:
        steps, losses = training_losses(result["workdir"])
        label = f"{result['label']}: accuracy {result['accuracy']:.1%}"
        axis.plot(steps, losses, "-", label=label)
    first = results[0]
    # A model that knows only which tokens are values scores log(number of values).
    task = mqar.MQARTask(first["seq_len"], first["num_kv_pairs"], first["vocab_size"])
    chance = math.log(task.num_values)
    axis.axhline(chance, color="gray", ls=":", lw=1, label="uniform over values")
    # One step further: any of the row's values, without knowing which key it was bound to.
    axis.axhline(
        math.log(task.num_kv_pairs),
        color="gray",
        ls="--",
        lw=1,
        label="uniform over the row's values",
    )
    axis.set(
        xlabel="training step",
        ylabel="training loss (answer tokens)",
        title=f"MQAR, T={first['seq_len']}, {first['num_kv_pairs']} pairs",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
