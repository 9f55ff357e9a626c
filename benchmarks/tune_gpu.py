"""Searches block sizes and launch settings of the Pallas GPU kernels and writes the tuning table.

Each kernel family is timed on its own, with the others at the heuristic settings:
  state  (chunk_states + state_grads):     state_block_k, state_block_v, state_warps, state_stages
  scores (exact_scores under gates strong enough to take it, + score_grads):
                                           scores_warps, score_block_v
  output (chunk_outputs + value_grads, with their in-place scores):
                                           output_/value_ block_v, block_k, warps, stages
  grad   (query_key_grads):                grad_block_k, grad_block_v, grad_warps, grad_stages
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

import jax
import jax.numpy as jnp

from benchmarks.kernels import gla_inputs, time_ms
from pallas_kernels.gla import gpu, gpu_backward, gpu_forward, tuning

FAMILIES = {
    "state": [
        dict(state_block_k=bk, state_block_v=bv, state_warps=w, state_stages=s)
        for bk, bv, w, s in [
            (64, 64, 4, 2),
            (32, 64, 4, 2),
            (64, 32, 4, 2),
            (64, 128, 8, 2),
            (128, 64, 8, 2),
            (32, 32, 4, 3),
        ]
    ],
    "scores": [
        dict(scores_warps=w, score_block_v=bv) for w, bv in itertools.product((2, 4, 8), (64, 128))
    ],
    "output": [
        dict(
            output_block_v=bv,
            output_block_k=bk,
            output_warps=w,
            output_stages=2,
            value_block_v=bv,
            value_block_k=bk,
            value_warps=w,
            value_stages=2,
        )
        for bv, bk, w in [
            (64, 64, 4),
            (128, 64, 4),
            (128, 64, 8),
            (128, 128, 8),
            (64, 32, 4),
            (128, 32, 4),
        ]
    ],
    "grad": [
        dict(grad_block_k=bk, grad_block_v=bv, grad_warps=w, grad_stages=s)
        for bk, bv, w, s in [
            (64, 64, 4, 1),
            (64, 128, 4, 1),
            (32, 64, 4, 1),
            (32, 128, 4, 1),
            (64, 64, 8, 1),
            (64, 64, 4, 2),
        ]
    ],
}


def family_fn(family, p: gpu.Prepared, do_rows, config, chunk, scale):
    """(jitted call of one kernel family, its arguments). Arrays go in as arguments, not closed
    over: closed-over arrays would be baked into the executable as constants."""
    h0 = jnp.zeros((p.q.shape[0], p.q.shape[2], p.q.shape[-1], p.v.shape[-1]), jnp.float32)
    state_dtype = p.q.dtype
    common = dict(chunk=chunk, config=config, interpret=False)
    b, spans = jax.jit(lambda g: gpu_forward.gate_cumsum(g, chunk=chunk, interpret=False))(p.g)

    def states(k, v, b, h0, first, last):
        return gpu_forward.chunk_states(
            k, v, b, h0, first, last, state_dtype=state_dtype, **common
        )[0]

    def scores(q, k, b, spans):
        return gpu_forward.exact_scores(q, k, b, spans, scale=scale, **common)

    if family == "state":

        def run(q, k, v, b, do, h0, first, last):
            grads = gpu_backward.state_grads(
                q, do, b, h0, first, last, scale=scale, state_dtype=state_dtype, **common
            )
            return states(k, v, b, h0, first, last), grads

        return jax.jit(run), (p.q, p.k, p.v, b, do_rows, h0, p.first_seq, p.last_seq)
    if family == "scores":

        def run(q, k, b, spans, v, do):
            # Spans of +inf send every chunk down the exact path these kernels serve.
            spans = jnp.full_like(spans, jnp.inf)
            return scores(q, k, b, spans), gpu_backward.score_grads(do, v, **common)

        return jax.jit(run), (p.q, p.k, b, spans, p.v, do_rows)
    a = jax.jit(scores)(p.q, p.k, b, spans)
    hs = jax.jit(states)(p.k, p.v, b, h0, p.first_seq, p.last_seq)
    if family == "output":

        def run(q, k, v, b, spans, do, hs, a):
            o = gpu_forward.chunk_outputs(
                q, k, b, spans, hs, a, v, scale=scale, out_dtype=q.dtype, **common
            )
            dv = gpu_backward.value_grads(
                q, k, b, spans, a, do, hs, scale=scale, out_dtype=k.dtype, **common
            )
            return o, dv

        return jax.jit(run), (p.q, p.k, p.v, b, spans, do_rows, hs, a)
    da = jax.jit(lambda do, v: gpu_backward.score_grads(do, v, **common))(do_rows, p.v)

    def run(q, k, v, b, spans, do, hs, da):
        return gpu_backward.query_key_grads(
            q, k, b, spans, v, do, hs, hs, da, scale=scale, **common
        )

    return jax.jit(run), (p.q, p.k, p.v, b, spans, do_rows, hs, da)


def fits(fields, key_dim, value_dim):
    for name, value in fields.items():
        if name.endswith("block_k") and value > key_dim:
            return False
        if name.endswith("block_v") and value > value_dim:
            return False
    return True


def tune_shape(heads, key_dim, value_dim, families, seq_len=2048, chunk=64):
    q, k, v, g, do = gla_inputs(32768 // seq_len, seq_len, heads, key_dim, value_dim)
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
                fn, fn_args = family_fn(family, p, do_rows, config, chunk, key_dim**-0.5)
                ms = time_ms(fn, *fn_args)
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
    parser.add_argument("--families", default="state,scores,output,grad")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    table = {}
    for shape in args.shapes.split(","):
        heads, key_dim, value_dim = (int(x) for x in shape.split("x"))
        table[tuning.table_key(key_dim, value_dim, jnp.bfloat16)] = tune_shape(
            heads, key_dim, value_dim, args.families.split(",")
        )
        # Written after every shape, so a run cut short keeps what it finished.
        with open(os.path.join(args.out, "tuned_gpu.json"), "w") as f:
            json.dump(table, f, indent=1)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
