"""Kernel benchmark: one GLA attention-layer op, forward and forward+backward, on a GPU.

Shapes: 32,768 tokens per call (B = 32768 / T), T in 1K..16K; GLA 16 heads with K = V = 128 and the
paper's 1.3B layer (4 heads, K = 256, V = 512); cuDNN causal flash attention (16 heads, head dim
128) through jax.nn.dot_product_attention as the softmax-attention anchor. bf16 inputs, gates
logsigmoid(randn) / 16. Prints a table and writes kernels.json and kernels.png to --out.

  PYTHONPATH=. python -m benchmarks.kernels --out $OUT [--ts 1024,2048,4096,8192,16384] [--check]
  PYTHONPATH=. python -m benchmarks.kernels --breakdown     # each pallas_gpu stage timed alone
  PYTHONPATH=. python -m benchmarks.kernels --gate_regimes  # the 340M layer: mild, resets, strong
  PYTHONPATH=. python -m benchmarks.kernels --profile --ts 2048  # each kernel's time in the op
  ... --packed                    # the GLA calls' rows packed into one with cu_seqlens
  ... --set paired_walks=false,state_block_v=64                # any of these with other settings
  ... --variants ";exact_min_programs=0;grad_warps=8"  # settings side by side
  ncu --clock-control none --kernel-name regex:gla --csv \
      python -m benchmarks.kernels --single_call --ts 2048  # registers, occupancy, stalls
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.gla.api import CHUNK_SIZES, DEFAULT_CHUNK_SIZE, chunk_gla

TOKENS = 32768


def time_ms(fn, *args, reps: int = 10, inner: int = 10) -> float:
    """Median over ``reps`` of the mean time of ``inner`` back-to-back calls (after warm-up)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(samples)


def temp_mib(fn, *args) -> float:
    """Scratch memory XLA allocates for the call beyond its arguments and results (MiB)."""
    analysis = fn.lower(*args).compile().memory_analysis()
    return getattr(analysis, "temp_size_in_bytes", float("nan")) / 2**20


def gla_inputs(batch, seq_len, heads, key_dim, value_dim, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    dt = jnp.bfloat16
    q = jax.random.normal(keys[0], (batch, seq_len, heads, key_dim), dt)
    k = jax.random.normal(keys[1], (batch, seq_len, heads, key_dim), dt)
    v = jax.random.normal(keys[2], (batch, seq_len, heads, value_dim), dt)
    g = (jax.nn.log_sigmoid(jax.random.normal(keys[3], q.shape, jnp.float32)) / 16).astype(dt)
    do = jax.random.normal(keys[4], v.shape, dt)
    return q, k, v, g, do


# The op of one gla_340m layer at the training shape (B = 8, T = 2K): B, T, H, K, V.
LAYER_340M = (8, 2048, 4, 128, 256)
RESET_EVERY = 3600  # tokens per document start, ~ a KJV chapter in bytes


def with_gate_regime(g, regime, seed=1):
    """The benchmark gates under one regime: 'mild' as they are (every chunk factorized);
    'resets', a document start (log gate -120 at every head and K, as ``gate_reset`` packing
    makes) at ~1 per RESET_EVERY tokens, which sends the chunks holding one to the exact kernels;
    'strong', 2 more per step of decay, which sends every chunk there."""
    if regime == "mild":
        return g
    if regime == "resets":
        batch, seq_len = g.shape[:2]
        starts = jax.random.uniform(jax.random.key(seed), (batch, seq_len, 1, 1)) < 1 / RESET_EVERY
        return jnp.where(starts, jnp.asarray(-120.0, g.dtype), g)
    if regime == "strong":
        return (g.astype(jnp.float32) - 2.0).astype(g.dtype)
    raise ValueError(f"gate regime must be 'mild', 'resets' or 'strong', got {regime!r}")


def gate_regimes(chunk_size=DEFAULT_CHUNK_SIZE):
    """pallas_gpu at the 340M layer's shape under each gate regime: what the exact path costs."""
    batch, seq_len, heads, key_dim, value_dim = LAYER_340M
    q, k, v, g, do = gla_inputs(batch, seq_len, heads, key_dim, value_dim)
    shape = dict(B=batch, T=seq_len, H=heads, K=key_dim, V=value_dim)
    fns = gla_fns("pallas_gpu", chunk_size)  # one compilation: the regimes differ in values only
    for regime in ("mild", "resets", "strong"):
        gates = with_gate_regime(g, regime)
        name = f"{op_name('pallas_gpu', chunk_size)} {regime}"
        measure(name, fns, (q, k, v, gates), (q, k, v, gates, do), **shape)


def op_name(backend, chunk_size):
    """The row's op: the backend, with its chunk size when not the op's default."""
    return backend if chunk_size == DEFAULT_CHUNK_SIZE else f"{backend} C={chunk_size}"


def packed(batch, seq_len, *arrays):
    """The B rows of each [B, T, ...] array as one row of B sequences, and its cu_seqlens."""
    rows = [x.reshape(1, batch * seq_len, *x.shape[2:]) for x in arrays]
    return rows, jnp.arange(batch + 1, dtype=jnp.int32) * seq_len


def gla_shapes(paper):
    """(H, K, V) of the table: 16 heads of 128, and the paper's 1.3B layer."""
    return [(16, 128, 128)] + ([(4, 256, 512)] if paper else [])


def op_inputs(seq_len, heads, key_dim, value_dim, pack):
    """(q, k, v, g, do) of a call of TOKENS tokens, and its cu_seqlens (None unless ``pack``:
    the B rows as one packed row)."""
    batch = TOKENS // seq_len
    arrays = gla_inputs(batch, seq_len, heads, key_dim, value_dim)
    if not pack:
        return arrays, None
    return packed(batch, seq_len, *arrays)


def gla_fns(backend, chunk_size=DEFAULT_CHUNK_SIZE, cu_seqlens=None):
    options = dict(_op_options) if backend == "pallas_gpu" else {}
    given_state = options.pop("initial_state", False)

    def fwd(q, k, v, g):
        h0 = None
        if given_state:
            num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            h0 = jnp.zeros((num_seqs, q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
        o, _ = chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=h0,
            chunk_size=chunk_size,
            backend=backend,
            cu_seqlens=cu_seqlens,
            **options,
        )
        return o

    def fwd_bwd(q, k, v, g, do):
        o, vjp = jax.vjp(fwd, q, k, v, g)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def cudnn_fns():
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def measure(name, fns, fwd_args, bwd_args, **shape):
    fwd, fwd_bwd = fns
    row = dict(op=name, **shape)
    try:
        row["fwd_ms"] = time_ms(fwd, *fwd_args)
        row["fwdbwd_ms"] = time_ms(fwd_bwd, *bwd_args)
        row["fwdbwd_temp_mib"] = temp_mib(fwd_bwd, *bwd_args)
    except Exception as err:  # keep going: one failing shape should not hide the rest
        row["error"] = repr(err)[:400]
    print(json.dumps(row), flush=True)
    return row


def run(ts, backends, paper, chunk_size=DEFAULT_CHUNK_SIZE, pack=False):
    """The table's rows. ``pack``: each GLA call takes its B sequences packed into one row
    (cu_seqlens), as a varlen training batch does; cuDNN's rows stay batched."""
    rows = []
    for seq_len in ts:
        batch = TOKENS // seq_len
        for heads, key_dim, value_dim in gla_shapes(paper):
            (q, k, v, g, do), cu_seqlens = op_inputs(seq_len, heads, key_dim, value_dim, pack)
            shape = dict(B=batch, T=seq_len, H=heads, K=key_dim, V=value_dim)
            for backend in backends:
                fns = gla_fns(backend, chunk_size, cu_seqlens)
                name = op_name(backend, chunk_size) + (" packed" if pack else "")
                rows.append(measure(name, fns, (q, k, v, g), (q, k, v, g, do), **shape))
        q, k, v, _, do = gla_inputs(batch, seq_len, 16, 128, 128)
        rows.append(
            measure(
                "cudnn_flash",
                cudnn_fns(),
                (q, k, v),
                (q, k, v, do),
                B=batch,
                T=seq_len,
                H=16,
                K=128,
                V=128,
            )
        )
    return rows


def check_against_xla(seq_len=1024, batch=2, chunk_size=DEFAULT_CHUNK_SIZE):
    """Relative error of pallas_gpu against the float32 'xla' backend on the benchmark shapes."""
    for heads, key_dim, value_dim in ((16, 128, 128), (4, 256, 512)):
        q, k, v, g, do = gla_inputs(batch, seq_len, heads, key_dim, value_dim, seed=1)
        f32 = [x.astype(jnp.float32) for x in (q, k, v, g, do)]
        (o, grads) = gla_fns("pallas_gpu", chunk_size)[1](q, k, v, g, do)
        (o_ref, grads_ref) = gla_fns("xla")[1](*f32)
        errors = {}
        for name, a, b in zip(
            ("o", "dq", "dk", "dv", "dg"), (o, *grads), (o_ref, *grads_ref), strict=True
        ):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            errors[name] = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        print(
            json.dumps(
                dict(
                    check=f"{op_name('pallas_gpu', chunk_size)} vs xla f32",
                    H=heads,
                    K=key_dim,
                    V=value_dim,
                    T=seq_len,
                    rel_err=errors,
                )
            ),
            flush=True,
        )


# The stages kernel_stages times: every pallas_gpu kernel (the backward runs backward_walks in
# place of chunk_states + state_grads unless paired_walks is off).
KERNEL_STAGES = (
    "gate_spans",
    "chunk_states",
    "exact_scores",
    "backward_walks",
    "chunk_outputs",
    "state_grads",
    "score_grads",
    "value_grads",
    "query_key_grads",
)


def every_chunk_b(g, chunk):
    """b of every chunk (log2 units), as gate_spans writes it for the exact chunks only: the exact
    kernels' input for any spans a caller passes (tune_gpu's scores family sends every chunk
    there)."""
    from pallas_kernels.gla.gpu_forward import LOG2E

    rows, padded_len, heads, key_dim = g.shape
    by_chunk = g.astype(jnp.float32).reshape(rows, padded_len // chunk, chunk, heads, key_dim)
    return (jnp.cumsum(by_chunk, axis=2) * LOG2E).reshape(g.shape)


def kernel_stages(q, k, v, g, first, last, do_rows, *, config, chunk, scale, interpret):
    """{kernel: (jitted call, its arguments)}: each pallas_gpu kernel alone, on inputs already in
    the kernels' layout (``gpu.prepare``'s arrays; ``do_rows`` the output gradient in the same
    layout). Arrays go in as arguments, not closed over: closed-over arrays would be baked into
    the executable as constants. Shared by ``breakdown`` and benchmarks/tune_gpu.py."""
    from pallas_kernels.gla import gpu_backward, gpu_forward

    common = dict(chunk=chunk, config=config, interpret=interpret)
    # The walks as the op runs them for a caller that gives no initial state and asks for no
    # final state (the benchmark's calls): no boundary states in or out.
    walks = dict(common, state_dtype=q.dtype, num_seqs=q.shape[0], packed=False)
    gate_spans = jax.jit(lambda g: gpu_forward.gate_spans(g, chunk=chunk, interpret=interpret))
    spans, _ = gate_spans(g)
    b = jax.jit(every_chunk_b, static_argnums=1)(g, chunk)
    states = jax.jit(
        lambda k, v, g, f, e: gpu_forward.chunk_states(
            k, v, g, None, f, e, writes_final=False, **walks
        )[0]
    )
    hs = states(k, v, g, first, last)
    exact = jax.jit(lambda q, k, b, s: gpu_forward.exact_scores(q, k, b, s, scale=scale, **common))
    a = exact(q, k, b, spans)
    dscores = jax.jit(lambda do, v: gpu_backward.score_grads(do, v, **common))
    da = dscores(do_rows, v)
    return {
        "gate_spans": (gate_spans, (g,)),
        "chunk_states": (states, (k, v, g, first, last)),
        "exact_scores": (exact, (q, k, b, spans)),
        "backward_walks": (
            jax.jit(
                lambda q, k, v, do, g, f, e: gpu_backward.backward_walks(
                    q, k, v, do, g, None, None, f, e, scale=scale, writes_dh0=False, **walks
                )
            ),
            (q, k, v, do_rows, g, first, last),
        ),
        "chunk_outputs": (
            jax.jit(
                lambda q, k, g, s, h, a, v: gpu_forward.chunk_outputs(
                    q, k, g, s, h, a, v, scale=scale, out_dtype=q.dtype, **common
                )
            ),
            (q, k, g, spans, hs, a, v),
        ),
        "state_grads": (
            jax.jit(
                lambda q, do, g, f, e: gpu_backward.state_grads(
                    q, do, g, None, f, e, scale=scale, writes_dh0=False, **walks
                )
            ),
            (q, do_rows, g, first, last),
        ),
        "score_grads": (dscores, (do_rows, v)),
        "value_grads": (
            jax.jit(
                lambda q, k, g, s, a, do, dh: gpu_backward.value_grads(
                    q, k, g, s, a, do, dh, scale=scale, out_dtype=k.dtype, **common
                )
            ),
            (q, k, g, spans, a, do_rows, hs),
        ),
        "query_key_grads": (
            jax.jit(
                lambda q, k, g, b, s, v, do, h, dh, da: gpu_backward.query_key_grads(
                    q, k, g, b, s, v, do, h, dh, da, scale=scale, dg_dtype=g.dtype, **common
                )
            ),
            (q, k, g, b, spans, v, do_rows, hs, hs, da),
        ),
    }


def breakdown(
    seq_len=2048,
    heads=16,
    key_dim=128,
    value_dim=128,
    interpret=False,
    tokens=TOKENS,
    chunk=DEFAULT_CHUNK_SIZE,
):
    """Times each stage of pallas_gpu alone on prepared inputs: where the op's time goes."""
    from pallas_kernels.gla import gpu, tuning

    q, k, v, g, do = gla_inputs(tokens // seq_len, seq_len, heads, key_dim, value_dim)

    def prepare(q, k, v, g, do):
        p = gpu.prepare(q, k, v, g, None, chunk)
        do_rows = jnp.swapaxes(p.layout.to_chunked(do), 1, 2)
        return p.q, p.k, p.v, p.g, p.first_seq, p.last_seq, do_rows

    prepared = jax.jit(prepare)(q, k, v, g, do)
    config = tuning.config_for(prepared[0].shape[-1], prepared[2].shape[-1], q.dtype, interpret)
    stages = {
        "prepare (XLA: layout)": (jax.jit(prepare), (q, k, v, g, do)),
        **kernel_stages(
            *prepared, config=config, chunk=chunk, scale=key_dim**-0.5, interpret=interpret
        ),
    }
    reps = dict(reps=2, inner=1) if interpret else {}
    for name, (fn, args) in stages.items():
        ms = time_ms(fn, *args, **reps)
        print(
            json.dumps(
                dict(stage=name, T=seq_len, H=heads, K=key_dim, V=value_dim, ms=round(ms, 4))
            ),
            flush=True,
        )


def kernel_times(events, calls: int) -> list[dict]:
    """Per-kernel device time of one call from a trace: ``events`` are (name, duration ns) of the
    GPU kernels that ``calls`` calls launched. Rows sorted by time, each with its launches per
    call, its ms per call and its share of the sum."""
    totals, counts = {}, {}
    for name, duration_ns in events:
        totals[name] = totals.get(name, 0.0) + duration_ns
        counts[name] = counts.get(name, 0) + 1
    whole = sum(totals.values()) or 1.0
    return [
        dict(
            kernel=name,
            launches=counts[name] / calls,
            ms=totals[name] / calls / 1e6,
            share=totals[name] / whole,
        )
        for name in sorted(totals, key=totals.get, reverse=True)
    ]


# The copy rate measured on the H200 (ANCHORS.md): what the profile's bandwidth column is read
# against.
COPY_TB_PER_S = 4.3


def kernel_bytes(batch, seq_len, heads, key_dim, value_dim, chunk=DEFAULT_CHUNK_SIZE):
    """Each pallas_gpu kernel's compulsory HBM traffic per launch, in bytes, at the benchmark's
    dtypes (bfloat16 q, k, v, g, do, outputs and chunk states) and under mild gates, where no
    chunk takes the exact path: every array a launch reads or writes, counted once. Re-reads
    (a K tile's keys read once per V tile) are left out; what they cost shows in the profile's
    bandwidth column. The benchmark's calls give no initial state and ask for no final state,
    so the walks move no [N, H, K, V] boundary states."""
    item = 2
    tokens = batch * seq_len
    keys = tokens * heads * key_dim * item  # one [tokens, H, K] array: q, k, g, dq, dk or dg
    values = tokens * heads * value_dim * item  # v, do, o or dv
    chunks = tokens // chunk * heads
    states = chunks * key_dim * value_dim * item  # the states entering the chunks, or dH
    chunk_ids = 2 * tokens // chunk * 4  # the walks' int32 first and last sequence per chunk
    spans = chunks * 4  # float32, one per chunk and head
    scores = tokens * heads * chunk * item  # dA: [C, C] per chunk and head
    return {
        "gla_gate_spans": keys + spans,  # g in; b is written for exact chunks only
        "gla_chunk_states": chunk_ids + 2 * keys + values + states,  # k, g, v in; states out
        "gla_exact_scores": spans,  # reads a span per chunk and passes on
        "gla_chunk_outputs": spans + 3 * keys + values + states + values,  # q, k, g, v, H; o
        "gla_state_grads": chunk_ids + 2 * keys + values + states,  # q, g, do in; dH out
        # both walks' inputs; H and dH out
        "gla_backward_walks": chunk_ids + 3 * keys + 2 * values + 2 * states,
        "gla_score_grads": 2 * values + scores,  # do, v in; dA out
        "gla_value_grads": spans + 3 * keys + values + states + values,  # q, k, g, do, dH; dv
        # q, k, g, v, do, H, dH and dA in; dq, dk, dg out
        "gla_query_key_grads": spans + 6 * keys + 2 * values + 2 * states + scores,
        "gla_query_key_grads_exact": spans,
    }


def modelled_bytes(kernel: str, model: dict) -> int | None:
    """``kernel_bytes``' figure for a traced kernel name: the longest model name it starts with
    (a trace may add a suffix); None for a kernel outside the model (an XLA fusion)."""
    names = [name for name in model if kernel.startswith(name)]
    return model[max(names, key=len)] if names else None


def traced_kernels(trace_dir: str) -> list[tuple[str, float]]:
    """(name, duration ns) of every kernel on a GPU stream in the trace jax.profiler wrote."""
    import glob

    from jax.profiler import ProfileData

    events = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:  # "Stream #n": the kernels; other lines group them again
                if line.name.startswith("Stream"):
                    events += [(event.name, event.duration_ns) for event in line.events]
    return events


def profile(ts, paper, chunk_size=DEFAULT_CHUNK_SIZE, pack=False, calls=10):
    """Where the op's forward+backward spends its time on the device: each kernel's time inside
    the real op (one jitted call, as in the table), not alone, from a jax.profiler trace. Timing
    a kernel alone (``--breakdown``) adds the dispatch of a jitted call, which a short kernel
    cannot hide; inside the op it is queued behind the others. Each kernel's row also gives its
    compulsory traffic (``kernel_bytes``) and the rate that traffic was moved at."""
    import tempfile

    for seq_len in ts:
        for heads, key_dim, value_dim in gla_shapes(paper):
            (q, k, v, g, do), cu_seqlens = op_inputs(seq_len, heads, key_dim, value_dim, pack)
            _, fwd_bwd = gla_fns("pallas_gpu", chunk_size, cu_seqlens)
            wall_ms = time_ms(fwd_bwd, q, k, v, g, do)
            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir):
                    for _ in range(calls):
                        out = fwd_bwd(q, k, v, g, do)
                    jax.block_until_ready(out)
                rows = kernel_times(traced_kernels(trace_dir), calls)
            batch = TOKENS // seq_len
            model = kernel_bytes(batch, seq_len, heads, key_dim, value_dim, chunk_size)
            for r in rows:
                per_launch = modelled_bytes(r["kernel"], model)
                if per_launch is not None:
                    r["model_mb"] = per_launch * r["launches"] / 1e6
                    r["tb_per_s"] = r["model_mb"] / 1e6 / (r["ms"] / 1e3)
            device_ms = sum(r["ms"] for r in rows)
            model_gb = sum(r.get("model_mb", 0.0) for r in rows) / 1e3
            print(
                f"\nT = {seq_len}{' packed' if pack else ''}, {heads} x {key_dim} x {value_dim}: "
                f"fwd+bwd {wall_ms:.3f} ms "
                f"wall, {device_ms:.3f} ms in kernels; the kernels' compulsory traffic "
                f"{model_gb:.2f} GB, {model_gb / COPY_TB_PER_S:.3f} ms at {COPY_TB_PER_S} TB/s\n"
                "| kernel | launches per call | ms per call | share | model MB | TB/s |\n"
                "|---|---|---|---|---|---|"
            )
            for r in rows:
                traffic = f"{r['model_mb']:.0f} | {r['tb_per_s']:.2f}" if "model_mb" in r else " | "
                print(
                    f"| {r['kernel']} | {r['launches']:g} | {r['ms']:.3f} | {r['share']:.1%} "
                    f"| {traffic} |"
                )
            shape = dict(T=seq_len, H=heads, K=key_dim, V=value_dim, packed=pack)
            print(json.dumps(dict(profile=rows, wall_ms=wall_ms, **shape)), flush=True)


def single_call(ts, paper, chunk_size=DEFAULT_CHUNK_SIZE, pack=False):
    """One forward+backward of pallas_gpu per shape, nothing timed: the launches an external
    profiler (Nsight Compute's ncu) records, each kernel once per shape."""
    for seq_len in ts:
        for heads, key_dim, value_dim in gla_shapes(paper):
            (q, k, v, g, do), cu_seqlens = op_inputs(seq_len, heads, key_dim, value_dim, pack)
            _, fwd_bwd = gla_fns("pallas_gpu", chunk_size, cu_seqlens)
            jax.block_until_ready(fwd_bwd(q, k, v, g, do))
            print(f"ran T = {seq_len}, {heads} x {key_dim} x {value_dim}", flush=True)


def table(rows):
    lines = [
        "| op | H | K | V | T | fwd ms | fwd+bwd ms | fwd+bwd temp MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['op']} | {r['H']} | {r['K']} | {r['V']} | {r['T']} | "
                f"error: {r['error'][:60]} | | |"
            )
            continue
        ratio = f" ({r['ratio']:.3f}x)" if "ratio" in r else ""
        lines.append(
            f"| {r['op']} | {r['H']} | {r['K']} | {r['V']} | {r['T']} | "
            f"{r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f}{ratio} | {r['fwdbwd_temp_mib']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "fwd+bwd")):
        series = {}
        for r in rows:
            if key in r:
                label = f"{r['op']} H{r['H']} K{r['K']} V{r['V']}"
                series.setdefault(label, []).append((r["T"], r[key]))
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (32,768 tokens per call)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# chunk_gla keywords a --set or --variants spec may name beside the GpuConfig fields;
# initial_state=true gives the op a zero initial state (a caller's state costs the same).
OP_OPTIONS = ("keep_states", "output_final_state", "initial_state")
# The op options of the last override_config: every pallas_gpu call gla_fns builds takes them.
_op_options: dict = {}


def parse_spec(spec: str) -> tuple[dict, dict]:
    """(GpuConfig fields, op options) from "name=json,..." ('' gives none); unknown names stop
    the run."""
    from pallas_kernels.gla import tuning

    if not spec:
        return {}, {}
    fields = dict(item.split("=", 1) for item in spec.split(","))
    known = {f.name for f in dataclasses.fields(tuning.GpuConfig)}
    unknown = sorted(set(fields) - known - set(OP_OPTIONS))
    if unknown:
        raise SystemExit(
            f"unknown GpuConfig fields {unknown}; known: {sorted(known)}, op options {OP_OPTIONS}"
        )
    values = {name: json.loads(value) for name, value in fields.items()}
    options = {name: values.pop(name) for name in OP_OPTIONS if name in values}
    return values, options


def override_config(spec: str):
    """Every pallas_gpu launch traced in this process from now on takes these GpuConfig fields
    ("name=json,...") over the tuned or heuristic ones, and every pallas_gpu op gla_fns builds
    the spec's op options: variants timed without writing a tuning table. A later call replaces
    the earlier one's fields and options."""
    from pallas_kernels.gla import tuning

    fields, options = parse_spec(spec)
    _op_options.clear()
    _op_options.update(options)
    tuned = getattr(tuning.config_for, "tuned", tuning.config_for)

    def config_for(*args, **kwargs):
        return dataclasses.replace(tuned(*args, **kwargs), **fields)

    config_for.tuned = tuned
    tuning.config_for = config_for
    print(f"pallas_gpu settings: {fields}, op options: {options}", flush=True)


def run_variants(ts, variants, paper, chunk_size=DEFAULT_CHUNK_SIZE, pack=False):
    """pallas_gpu under each of ``variants`` (--set specs; '' = the tuned or heuristic settings),
    one shape after another in one process: each variant's rows sit beside the others', timed
    on the same inputs minutes apart rather than in separate runs, and ``ratio`` is fwd+bwd
    against the first variant's."""
    for spec in variants:  # fail on a misspelt field before anything is timed
        parse_spec(spec)
    rows = []
    for seq_len in ts:
        for heads, key_dim, value_dim in gla_shapes(paper):
            (q, k, v, g, do), cu_seqlens = op_inputs(seq_len, heads, key_dim, value_dim, pack)
            shape = dict(B=TOKENS // seq_len, T=seq_len, H=heads, K=key_dim, V=value_dim)
            first = None
            for spec in variants:
                override_config(spec)
                name = f"{op_name('pallas_gpu', chunk_size)} [{spec or 'default'}]"
                fns = gla_fns("pallas_gpu", chunk_size, cu_seqlens)  # traced under the override
                row = measure(name, fns, (q, k, v, g), (q, k, v, g, do), **shape)
                first = first or row
                if "error" not in row and "error" not in first:
                    row["ratio"] = row["fwdbwd_ms"] / first["fwdbwd_ms"]
                rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--ts", default="1024,2048,4096,8192,16384")
    parser.add_argument("--backends", default="pallas_gpu,xla")
    parser.add_argument("--no-paper", action="store_true")
    parser.add_argument("--check", action="store_true", help="first compare with 'xla' (f32)")
    parser.add_argument(
        "--chunk_size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        choices=CHUNK_SIZES,
        help="the GLA backends' chunk size (table, check, gate regimes)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="only time each pallas_gpu stage alone (T = 2K, both shapes)",
    )
    parser.add_argument(
        "--packed",
        action="store_true",
        help="each GLA call's B sequences packed into one row with cu_seqlens",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only trace pallas_gpu's forward+backward at --ts: each kernel's device time",
    )
    parser.add_argument(
        "--single_call",
        action="store_true",
        help="only run pallas_gpu's forward+backward once per shape at --ts (for ncu)",
    )
    parser.add_argument(
        "--gate_regimes",
        action="store_true",
        help="only time pallas_gpu at the 340M layer's shape: mild gates, resets, strong gates",
    )
    parser.add_argument(
        "--set",
        default="",
        help="pallas_gpu launch settings over the tuned ones, e.g. paired_walks=false,"
        "state_block_v=64 (GpuConfig fields; values in JSON), and op options (keep_states=true)",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="only time pallas_gpu under each of these --set specs, ';'-separated, in one "
        "process ('' first: the default), e.g. ';exact_min_programs=0;grad_warps=8'",
    )
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="with --breakdown: a tiny interpret-mode run (CPU smoke test)",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(jax.devices(), jax.__version__, flush=True)
    if args.set:
        override_config(args.set)
    if args.breakdown:
        if args.interpret:
            breakdown(64, 2, 32, 32, interpret=True, tokens=128)
            return
        breakdown()
        breakdown(heads=4, key_dim=256, value_dim=512)
        return
    ts = [int(t) for t in args.ts.split(",")]
    if args.profile:
        profile(ts, not args.no_paper, args.chunk_size, args.packed)
        return
    if args.single_call:
        single_call(ts, not args.no_paper, args.chunk_size, args.packed)
        return
    if args.gate_regimes:
        gate_regimes(args.chunk_size)
        return
    if args.variants:
        # Each variant's fields go over --set's.
        variants = [",".join(filter(None, (args.set, v))) for v in args.variants.split(";")]
        rows = run_variants(ts, variants, not args.no_paper, args.chunk_size, args.packed)
        print(table(rows))
        with open(os.path.join(args.out, "variants.json"), "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows), f)
        return
    if args.check:
        check_against_xla(chunk_size=args.chunk_size)
    rows = run(ts, args.backends.split(","), not args.no_paper, args.chunk_size, args.packed)
    print(table(rows))
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows), f, indent=1)
    plot(rows, os.path.join(args.out, "kernels.png"))


if __name__ == "__main__":
    main()
