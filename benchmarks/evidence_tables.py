"""Tables and plots of benchmarks/paper_evidence.py, from plain dicts: each run's facts
(``child_jobs.run_facts``) and its ``gla_jax.evaluate`` result (None when it has none)."""

from __future__ import annotations

LM_TARGET_RATIO = 1.05  # GLA / Transformer++ perplexity at the training length, at most
LM_TARGET_EXTRAPOLATION = 1.10  # GLA perplexity at the longest length / at the training length
MQAR_TARGET_ACCURACY = 0.90  # GLA at T = 256 with 16 pairs, at least


def steps_note(facts: dict) -> str:
    """'' for a run that finished as planned, else what happened to it."""
    if facts["status"] != "done":
        return facts["status"] + (f" ({facts['error']})" if facts["error"] else "")
    if facts["stopped_early"] or facts["steps"] < facts["steps_planned"]:
        return f"stopped at {facts['steps']}/{facts['steps_planned']}"
    return ""


def _ratio_target(value: float, bound: float) -> dict:
    return {"value": value, "bound": bound, "met": value <= bound}


# --------------------------------------------------------------------------------------------
# Language models: perplexity by length
# --------------------------------------------------------------------------------------------


def lm_row(label: str, facts: dict, run: dict | None) -> dict:
    by_length = {r["length"]: r["perplexity"] for r in run["results"]} if run else {}
    lengths = sorted(by_length)
    return {
        "model": label,
        **facts,
        "perplexity": {str(n): by_length[n] for n in lengths},
        "extrapolation_ratio": by_length[lengths[-1]] / by_length[lengths[0]] if lengths else None,
    }


def lm_summary(gla: dict, transformer: dict) -> dict:
    """The two rows (``lm_row``) -> the summary with the issue's two targets, where measured."""
    targets = {}
    shared = set(gla["perplexity"]) & set(transformer["perplexity"])
    if shared:
        train_len = str(min(int(n) for n in shared))
        ratio = gla["perplexity"][train_len] / transformer["perplexity"][train_len]
        targets["gla_over_transformer_at_train_length"] = _ratio_target(ratio, LM_TARGET_RATIO)
    if gla["extrapolation_ratio"] is not None:
        targets["gla_longest_over_train_length"] = _ratio_target(
            gla["extrapolation_ratio"], LM_TARGET_EXTRAPOLATION
        )
    return {"experiment": "lm", "rows": [gla, transformer], "targets": targets}


LM_TARGET_TEXT = {
    "gla_over_transformer_at_train_length": "GLA / Transformer++ perplexity at the training length",
    "gla_longest_over_train_length": "GLA perplexity at the longest length / at training length",
}


def lm_markdown(summary: dict) -> str:
    rows = summary["rows"]
    lengths = sorted({int(n) for row in rows for n in row["perplexity"]})
    head = ["model", "parameters", "steps", "tokens", *(f"L={n}" for n in lengths)]
    head += ["longest / train", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ppl = row["perplexity"]
        cells = [
            row["model"],
            f"{row['parameters']:,}" if row["parameters"] else "?",
            str(row["steps"]),
            f"{row['tokens'] / 1e6:.1f}M",
            *(f"{ppl[str(n)]:.3f}" if str(n) in ppl else "-" for n in lengths),
            f"{row['extrapolation_ratio']:.3f}" if row["extrapolation_ratio"] else "-",
            steps_note(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key, text in LM_TARGET_TEXT.items():
        target = summary["targets"].get(key)
        if target is None:
            lines.append(f"- {text}: no result")
        else:
            verdict = "met" if target["met"] else "NOT met"
            lines.append(f"- {text}: {target['value']:.3f} (<= {target['bound']}), {verdict}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# MQAR: accuracy per task and model
# --------------------------------------------------------------------------------------------


def mqar_task_label(seq_len: int, pairs: int) -> str:
    return f"T={seq_len}, {pairs} pairs"


def mqar_row(label: str, seq_len: int, pairs: int, facts: dict, result: dict | None) -> dict:
    result = result or {}
    return {
        "model": label,
        "task": mqar_task_label(seq_len, pairs),
        "seq_len": seq_len,
        "num_kv_pairs": pairs,
        **facts,
        "accuracy": result.get("accuracy"),
        "sequence_accuracy": result.get("sequence_accuracy"),
    }


def mqar_summary(rows: list[dict], target: tuple[str, str]) -> dict:
    """Rows (``mqar_row``) and the (model, task) labels of the target run -> the summary; the
    target is left out when that run is not among the rows."""
    targets = {}
    for row in rows:
        if (row["model"], row["task"]) == tuple(target):
            accuracy = row["accuracy"]
            targets[f"{row['model']} at {row['task']}"] = {
                "value": accuracy,
                "bound": MQAR_TARGET_ACCURACY,
                "met": accuracy is not None and accuracy >= MQAR_TARGET_ACCURACY,
            }
    return {"experiment": "mqar", "rows": rows, "targets": targets}


def mqar_markdown(summary: dict) -> str:
    rows = summary["rows"]
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    models = list(dict.fromkeys(row["model"] for row in rows))
    by_cell = {(row["model"], row["task"]): row for row in rows}
    lines = ["| model | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for model in models:
        cells = []
        for task in tasks:
            row = by_cell.get((model, task))
            if row is None:
                cells.append("")
                continue
            value = f"{row['accuracy']:.1%}" if row["accuracy"] is not None else "-"
            note = steps_note(row)
            cells.append(f"{value} ({note})" if note else value)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    steps = sorted({row["steps"] for row in rows})
    lines.append(f"Answer accuracy on fresh validation sequences; training steps per run: {steps}.")
    for name, target in summary["targets"].items():
        value = f"{target['value']:.1%}" if target["value"] is not None else "no result"
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"- {name} >= {target['bound']:.0%}: {value}, {verdict}")
    return "\n".join(lines) + "\n"


def plot_mqar_accuracy(summary: dict, path: str, title: str = "MQAR") -> None:
    """Grouped bars: accuracy per task, one bar per model; a run without a result shows none."""
    import matplotlib  # noqa: PLC0415 - only the summary draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = summary["rows"]
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    models = list(dict.fromkeys(row["model"] for row in rows))
    accuracy = {(r["model"], r["task"]): r["accuracy"] or 0.0 for r in rows}
    width = 0.8 / len(models)
    fig, axis = plt.subplots(figsize=(7, 3.8), dpi=90)
    for i, model in enumerate(models):
        xs = [t + (i - (len(models) - 1) / 2) * width for t in range(len(tasks))]
        axis.bar(xs, [accuracy.get((model, task), 0.0) for task in tasks], width, label=model)
    axis.axhline(MQAR_TARGET_ACCURACY, color="gray", ls=":", lw=1)
    axis.set_xticks(range(len(tasks)), tasks)
    axis.set(ylabel="answer accuracy", ylim=(0, 1.02), title=title)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
