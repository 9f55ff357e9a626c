"""Tokens per second the input pipeline produces on its own (no model, no device transfer).

    python benchmarks/data_throughput.py --plot=data_throughput.png
    python benchmarks/data_throughput.py --name=kjv_verses --seq-lens=2048   # short documents

Reads the default corpus (KJV chapters, byte tokenizer unless --tokenizer says otherwise),
prepared on first use; prints a table of batch tokens/s and real (non-padding) tokens/s for each
sequence length and packing mode, and draws it to --plot.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from gla_jax import data
from gla_jax.data import corpora


def measure(config, *, seq_len: int, batch_size: int, seconds: float) -> dict:
    """Pulls batches for about `seconds` after one warm-up batch; returns the rates."""
    iterator = data.make_lm_dataset(config, seq_len=seq_len, global_batch_size=batch_size)
    next(iterator)  # opens files and fills caches; not what a long run sees
    batches = real_tokens = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        batch = next(iterator)
        batches += 1
        real_tokens += int(np.count_nonzero(batch["segment_ids"]))
    return {
        "packing": config.packing,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "batches_per_s": batches / elapsed,
        "tokens_per_s": batches * batch_size * seq_len / elapsed,
        "real_tokens_per_s": real_tokens / elapsed,
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'packing':8s} {'seq_len':>8s} {'batch':>6s} {'batches/s':>10s} "
        f"{'tokens/s':>12s} {'real tokens/s':>14s}"
    )
    for r in rows:
        print(
            f"{r['packing']:8s} {r['seq_len']:8d} {r['batch_size']:6d} "
            f"{r['batches_per_s']:10.1f} {r['tokens_per_s']:12,.0f} {r['real_tokens_per_s']:14,.0f}"
        )


def plot(rows: list[dict], path: str, target: float) -> None:
    import matplotlib  # noqa: PLC0415 - only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({r["packing"] for r in rows}):
        mine = [r for r in rows if r["packing"] == mode]
        ax.plot(
            [r["seq_len"] for r in mine],
            [r["real_tokens_per_s"] for r in mine],
            "o-",
            label=f"{mode} (real tokens)",
        )
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target:,.0f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("tokens / s (one process)")
    ax.set_title(f"Input pipeline throughput, batch {rows[0]['batch_size']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def write_kjv_verses(data_dir: str) -> str:
    """The KJV with one verse per document (~130 bytes, like lm1b sentences): the per-document
    costs dominate here, unlike with whole chapters."""
    path = os.path.join(corpora.resolve_data_dir(data_dir), "benchmark", "kjv_verses.txt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        verses = [v for _, ch in corpora.kjv_chapters() for v in ch.splitlines()[1:]]
        with open(path + ".tmp", "w") as f:
            f.write("\n\n".join(verses))
        os.replace(path + ".tmp", path)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="kjv", help="kjv, kjv_verses, text_files, tfds name")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--paths", default="", help="for --name=text_files (comma-separated)")
    parser.add_argument("--doc-split", default="file", choices=["file", "blank_line"])
    parser.add_argument("--tokenizer", default="byte")
    parser.add_argument("--seq-lens", default="512,2048,8192")
    parser.add_argument("--packing", default="concat,pad")
    parser.add_argument("--max-segments-per-row", type=int, default=None, help="0: no limit")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--target", type=float, default=1_000_000)
    parser.add_argument("--plot", default="", help="write the figure here (e.g. a .png)")
    args = parser.parse_args(argv)
    config = data.default_data_config()
    config.name, config.data_dir, config.tokenizer = args.name, args.data_dir, args.tokenizer
    config.paths, config.doc_split = tuple(p for p in args.paths.split(",") if p), args.doc_split
    if args.name == "kjv_verses":
        config.name, config.doc_split = "text_files", "blank_line"
        config.paths = (write_kjv_verses(args.data_dir),)
    if args.max_segments_per_row is not None:
        config.max_segments_per_row = args.max_segments_per_row
    rows = []
    for mode in args.packing.split(","):
        config.packing = mode
        for seq_len in map(int, args.seq_lens.split(",")):
            rows.append(
                measure(config, seq_len=seq_len, batch_size=args.batch_size, seconds=args.seconds)
            )
    print_table(rows)
    if args.plot:
        plot(rows, args.plot, args.target)
    return rows


if __name__ == "__main__":
    main()
