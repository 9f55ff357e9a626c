"""Searches block sizes and launch settings of the Pallas GPU kernels and writes the tuning table.

Each kernel family is timed on its own, with the others at the heuristic settings:
  state   (backward_walks; chunk_states + state_grads with paired_walks off):
                                           state_block_k, state_block_v, state_warps, state_stages
  scores  (exact_scores under gates strong enough to take it, + score_grads):
                                           scores_warps, score_block_v
  output  (chunk_outputs, with its in-place scores): output_ block_v, block_k, warps, stages
  value   (value_grads, likewise):          value_ block_v, block_k, warps, stages
  grad    (query_key_grads):               grad_block_k, grad_block_v, grad_warps, grad_stages
The best candidate of each family goes into the table, keyed by padded (K, V, dtype).

  python benchmarks/tune_gpu.py --out $OUT      # writes $OUT/tuned_gpu.json and prints timings
Copy the file to pallas_kernels/gla/tuned_gpu.json to use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import jax.numpy as jnp

from benchmarks.kernels import TOKENS, gla_inputs, kernel_stages, time_ms
from pallas_kernels.gla import gpu, tuning
from pallas_kernels.gla.api import CHUNK_SIZES, DEFAULT_CHUNK_SIZE

# (V tile, K piece, warps, stages) candidates of chunk_outputs and of value_grads.
OUTPUT_TILES = [
    (64, 64, 4, 1),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 64, 8, 2),  # half the registers per thread of the 4-warp tile
    (128, 64, 4, 1),
    (128, 64, 4, 2),
    (128, 64, 4, 3),
    (128, 64, 8, 2),
    (128, 128, 8, 2),
    (64, 32, 4, 2),
    (128, 32, 4, 2),
    # a narrower V tile holds a smaller accumulator and state tile: ncu found value_grads at 186
    # registers a thread, two 4-warp programs a multiprocessor, where 170 would fit three
    (32, 64, 4, 2),
    (32, 64, 4, 3),
]

FAMILIES = {
    "state": [
        dict(state_block_k=bk, state_block_v=bv, state_warps=w, state_stages=s)
        for bk, bv, w, s in [
            (64, 64, 4, 2),
            (32, 64, 4, 2),
            (64, 32, 4, 2),
            (64, 128, 8, 2),
            (64, 128, 4, 2),
            (128, 64, 8, 2),
            (128, 128, 8, 2),
            (32, 32, 4, 3),
            (32, 32, 2, 2),
            # (32 x 128 and 32 x 256 lost 2-13% at both shapes: with 32 K rows the step's state
            # update leaves Hopper's 64-row warpgroup MMA; BENCHMARKS.md, version 7.18.)
            # deeper pipelines: with one program per multiprocessor (long rows, few of them) two
            # chunks in flight may not cover the memory latency
            (64, 64, 4, 3),
            (64, 64, 4, 4),
            (64, 128, 4, 3),
            (64, 128, 4, 4),
        ]
    ],
    "scores": [
        dict(scores_warps=w, score_block_v=bv) for w, bv in itertools.product((2, 4, 8), (64, 128))
    ],
    # chunk_outputs and value_grads loop over V tiles (tile_loop): stages > 1 prefetch the next
    # tile's state and value rows, at the cost of shared memory for each stage in flight.
    "output": [
        dict(output_block_v=bv, output_block_k=bk, output_warps=w, output_stages=s)
        for bv, bk, w, s in OUTPUT_TILES
    ],
    "value": [
        dict(value_block_v=bv, value_block_k=bk, value_warps=w, value_stages=s)
        for bv, bk, w, s in OUTPUT_TILES
    ],
    "grad": [
        dict(grad_block_k=bk, grad_block_v=bv, grad_warps=w, grad_stages=s)
        for bk, bv, w, s in [
            (64, 64, 4, 1),
            (64, 128, 4, 1),
            (32, 64, 4, 1),
            (32, 128, 4, 1),
            # 8 warps: the factorized kernel does not spill (4 spill ~576 bytes a thread:
            # benchmarks/kernel_resources.py), but with 2 stages it ran 21% slower in the op
            # (H100, BENCHMARKS.md, version 7.2): one program per multiprocessor
            (64, 64, 8, 1),
            # the V pieces are a loop: stages > 1 prefetch the next piece of v, do, h and dH
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (32, 64, 4, 2),
            (32, 64, 4, 3),
            (32, 128, 4, 2),
            (64, 128, 4, 2),
            (64, 32, 4, 3),
            # one K tile per chunk at K = 128: v, do and dA read once, at the cost of registers
            (128, 64, 8, 1),
            (128, 64, 4, 1),
            (128, 32, 8, 1),
            (128, 64, 8, 2),
        ]
    ],
}


def family_kernels(family, config):
    """The kernels a family's settings steer under ``config``'s switches, timed one after the
    other per candidate."""
    return {
        "state": ("backward_walks",) if config.paired_walks else ("chunk_states", "state_grads"),
        "scores": ("exact_scores", "score_grads"),
        "output": ("chunk_outputs",),
        "value": ("value_grads",),
        "grad": ("query_key_grads",),
    }[family]


def family_ms(family, p: gpu.Prepared, do_rows, config, chunk, scale):
    """Milliseconds of one family's kernels under ``config``, each alone on prepared inputs."""
    prepared = (p.q, p.k, p.v, p.g, p.first_seq, p.last_seq, do_rows)
    stages = kernel_stages(*prepared, config=config, chunk=chunk, scale=scale, interpret=False)
    if family == "scores":
        # Spans of +inf send every chunk down the exact path these settings serve.
        fn, (q, k, b, spans) = stages["exact_scores"]
        stages["exact_scores"] = (fn, (q, k, b, jnp.full_like(spans, jnp.inf)))
    timed = (stages[name] for name in family_kernels(family, config))
    return sum(time_ms(fn, *args) for fn, args in timed)


def fits(fields, key_dim, value_dim):
    for name, value in fields.items():
        if name.endswith("block_k") and value > key_dim:
            return False
        if name.endswith("block_v") and value > value_dim:
            return False
    return True


def tune_shape(
    heads, key_dim, value_dim, families, tokens=TOKENS, seq_len=2048, chunk=DEFAULT_CHUNK_SIZE
):
    q, k, v, g, do = gla_inputs(tokens // seq_len, seq_len, heads, key_dim, value_dim)
    p = gpu.prepare(q, k, v, g, None, chunk)
    do_rows = jnp.swapaxes(p.layout.to_chunked(do), 1, 2)
    base = tuning.heuristic(key_dim, value_dim, q.dtype)
    best = {}
    for family in families:
        candidates = FAMILIES[family]
        results = []
        for fields in candidates:
            if not fits(fields, key_dim, value_dim):
                continue
            config = dataclasses.replace(base, **fields)
            try:
                ms = family_ms(family, p, do_rows, config, chunk, key_dim**-0.5)
            except Exception as err:  # a candidate that does not compile is skipped
                print(f"  {family} {fields}: failed {repr(err)[:160]}", flush=True)
                continue
            print(f"  {family} {fields}: {ms:.3f} ms", flush=True)
            results.append((ms, fields))
        if not results:
            continue
        ms, fields = min(results, key=lambda r: r[0])
        print(f"{key_dim}x{value_dim} best {family}: {fields} {ms:.3f} ms", flush=True)
        best.update(fields)
    return dataclasses.asdict(dataclasses.replace(base, **best))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--shapes", default="16x128x128,4x256x512")
    parser.add_argument("--families", default="state,scores,output,value,grad")
    # How many programs the sequential state walks have, and so which tiles win, depends on
    # rows x heads, so tune a model's layer at its own tokens per call (B x T; the 340M layer is
    # 4x128x256 at 16384). Candidates are timed as given, before tuning.py's fill rule.
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--seq_len", type=int, default=2048)
    # The table is keyed by head dims only: a run at another chunk size is for reading timings.
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, choices=CHUNK_SIZES)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    table = {}
    for shape in args.shapes.split(","):
        heads, key_dim, value_dim = (int(x) for x in shape.split("x"))
        table[tuning.table_key(key_dim, value_dim, jnp.bfloat16)] = tune_shape(
            heads,
            key_dim,
            value_dim,
            args.families.split(","),
            args.tokens,
            args.seq_len,
            args.chunk,
        )
        # Written after every shape, so a run cut short keeps what it finished.
        with open(os.path.join(args.out, "tuned_gpu.json"), "w") as f:
            json.dump(table, f, indent=1)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
