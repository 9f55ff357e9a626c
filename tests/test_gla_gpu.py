"""pallas_gpu specifics beyond the shared suite: tiled kernels, large and odd head dims, float16,
dispatch reasons, and that every kernel lowers through Triton (checked on the CPU by exporting for
the 'cuda' platform, which runs the Pallas-to-Triton lowering without a GPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from gla_jax.ops import chunk_gla
from pallas_kernels.gla import api, gpu, gpu_forward, tuning
from tests.gla_backends import GPU_INTERPRET
from tests.gla_oracle import gla_oracle
from tests.test_gla_ops import TOLERANCE, Case, _make_inputs, _rel_err

# Tiles smaller than the head dims: several K and V tiles per state program, several V tiles and K
# pieces (loops) per output and value-gradient program, several K tiles (grid) and V pieces
# (loop) per query/key-gradient program, several V pieces in the score-gradient loop.
SMALL_TILES = tuning.GpuConfig(
    state_block_k=16,
    state_block_v=16,
    state_warps=4,
    state_stages=1,
    scores_warps=4,
    score_block_v=16,
    output_block_v=16,
    output_block_k=16,
    output_warps=4,
    output_stages=1,
    value_block_v=16,
    value_block_k=16,
    value_warps=4,
    value_stages=1,
    grad_block_k=16,
    grad_block_v=16,
    grad_warps=4,
    grad_stages=1,
)
# The backward's two walks in two launches (chunk_states, then state_grads).
UNPAIRED = dict(paired_walks=False)
# Single walks that load each chunk as they reach it (small launches load the next one ahead).
NO_PREFETCH = dict(prefetch_max_programs=0)
# A packed row's walks one program per row, through its sequences in turn (the default is one
# program per sequence).
ROW_WALKS = dict(sequence_walks=False)


# Rows, and packed rows with strong gates and with empty first and last sequences, in tiles
# smaller than their head dims.
SMALL_TILE_CASES = [
    Case(
        "tiled_packed",
        batch=1,
        seq_len=90,
        key_dim=32,
        value_dim=48,
        gates="strong",
        cu_seqlens=(0, 30, 30, 90),
        chunk_size=32,
    ),
    Case("tiled_rows", batch=2, seq_len=40, key_dim=32, value_dim=32, chunk_size=16),
    Case(
        "packed_empty_ends",
        batch=1,
        seq_len=70,
        key_dim=16,
        value_dim=32,
        cu_seqlens=(0, 0, 25, 70, 70),
        chunk_size=16,
    ),
]


def _check_against_oracle(case: Case, seed: int, config=None, keep_states=False):
    """``keep_states``: the backward reads the states the forward kept instead of its own walk.
    A case without an initial state passes None (no dh0 comes back); one without a final-state
    cotangent asks for no final state and passes dfinal None."""
    q, k, v, g, h0, do, dfinal = _make_inputs(case, seed)
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens, jnp.int32)
    scale = case.scale if case.scale is not None else case.key_dim**-0.5
    with_final = case.final_state_cotangent
    opts = api.Options("pallas_gpu", scale, case.chunk_size, True, output_final_state=with_final)
    o, final, states = gpu.forward_keeping_states(q, k, v, g, h0, cu, opts, config)
    states = states if keep_states else None
    given_dfinal = dfinal if with_final else None
    grads = gpu.backward(q, k, v, g, h0, cu, do, given_dfinal, opts, config, states=states)
    expected = gla_oracle(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=h0 if h0 is not None else jnp.zeros(dfinal.shape),
        cu_seqlens=case.cu_seqlens,
        do=do,
        dfinal=dfinal,
    )
    names = ("dq", "dk", "dv", "dg", "dh0")
    actual = dict(o=o, final_state=final, **dict(zip(names, grads, strict=True)))
    for name, needed in (("final_state", with_final), ("dh0", h0 is not None)):
        if not needed:
            assert actual.pop(name) is None, f"{name} came back though nothing asked for it"
    tol = TOLERANCE[case.dtype]
    errors = {key: _rel_err(actual[key], expected[key]) for key in actual}
    assert all(err <= tol for err in errors.values()), errors


@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "switches",
    [
        {},
        UNPAIRED,
        {**UNPAIRED, **NO_PREFETCH},
        ROW_WALKS,
        {**ROW_WALKS, **UNPAIRED},
        {**ROW_WALKS, **UNPAIRED, **NO_PREFETCH},
    ],
    ids=[
        "paired",
        "unpaired",
        "unpaired_no_prefetch",
        "row_walks",
        "row_walks_unpaired",
        "row_walks_unpaired_no_prefetch",
    ],
)
def test_small_tiles_match_oracle(case, switches):
    _check_against_oracle(case, seed=5, config=dataclasses.replace(SMALL_TILES, **switches))


# Packed rows whose sequences start from zeros nobody gave (the walks read no initial state),
# with and without a final state, and a row given an initial state but asked for no final state
# (the gradients' walk reads no dfinal).
ABSENT_STATE_CASES = [
    dataclasses.replace(SMALL_TILE_CASES[0], name="packed_no_states", initial_state=False),
    dataclasses.replace(
        SMALL_TILE_CASES[2],
        name="packed_empty_ends_nothing",
        initial_state=False,
        final_state_cotangent=False,
    ),
    dataclasses.replace(SMALL_TILE_CASES[1], name="rows_no_final", final_state_cotangent=False),
]


@pytest.mark.parametrize("case", ABSENT_STATE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "switches, keep_states",
    [({}, False), (UNPAIRED, False), (ROW_WALKS, False), ({}, True)],
    ids=["paired", "unpaired", "row_walks", "kept"],
)
def test_absent_states_match_oracle(case, switches, keep_states):
    config = dataclasses.replace(SMALL_TILES, **switches)
    _check_against_oracle(case, seed=9, config=config, keep_states=keep_states)


@pytest.mark.parametrize(
    "case",
    [
        *SMALL_TILE_CASES,
        Case("kept_bf16", batch=2, seq_len=80, heads=1, dtype=jnp.bfloat16, chunk_size=16),
    ],
    ids=lambda c: c.name,
)
@pytest.mark.parametrize(
    "switches",
    [{}, ROW_WALKS, UNPAIRED],
    ids=["sequence_walks", "row_walks", "unpaired"],
)
def test_kept_states_match_oracle(case, switches):
    """The backward on the forward's states (only the gradients' walk): per-sequence and
    whole-row walks of packed rows, and with the walks' pairing off (which then has no pair)."""
    config = dataclasses.replace(SMALL_TILES, **switches)
    _check_against_oracle(case, seed=11, config=config, keep_states=True)


def test_chunk_gla_keep_states_gradients_match_oracle():
    case = Case("op_kept", batch=2, seq_len=70, heads=2, key_dim=32, value_dim=16)
    q, k, v, g, h0, do, dfinal = _make_inputs(case, 12)
    scale = case.key_dim**-0.5
    expected = gla_oracle(q, k, v, g, scale=scale, initial_state=h0, do=do, dfinal=dfinal)

    def loss(backend, q, k, v, g, h0):
        o, final = chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=h0,
            output_final_state=True,
            backend=backend,
            interpret=True,
            keep_states=True,
        )
        return jnp.sum(o * do) + jnp.sum(final * dfinal)

    # 'xla' has no kept-states form: the option leaves it as it was.
    for backend in ("pallas_gpu", "xla"):
        grads = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(backend, q, k, v, g, h0)
        for name, grad in zip(("dq", "dk", "dv", "dg", "dh0"), grads, strict=True):
            assert _rel_err(grad, expected[name]) <= TOLERANCE[case.dtype], (backend, name)


def test_unpaired_walks_match_oracle_at_whole_tiles():
    case = Case("unpaired", batch=2, seq_len=100, heads=2, key_dim=32, value_dim=48, gates="strong")
    config = tuning.config_for(32, 64, jnp.float32, interpret=True)
    _check_against_oracle(case, seed=6, config=dataclasses.replace(config, **UNPAIRED))


@pytest.mark.parametrize(
    "case",
    [
        Case("paper_head_dims", batch=1, seq_len=40, heads=1, key_dim=256, value_dim=512),
        Case(
            "odd_head_dims", batch=1, seq_len=33, heads=2, key_dim=20, value_dim=100, gates="strong"
        ),
        Case(
            "fp16_chunk128",
            batch=1,
            seq_len=130,
            heads=1,
            key_dim=32,
            value_dim=32,
            dtype=jnp.float16,
            chunk_size=128,
        ),
    ],
    ids=lambda c: c.name,
)
def test_head_dims_and_dtypes(case):
    _check_against_oracle(case, seed=9)


def test_mixed_dtypes_bf16_inputs_float32_gates():
    case = Case("mixed", batch=1, seq_len=48, dtype=jnp.bfloat16)
    q, k, v, g, h0, _, _ = _make_inputs(case, 2)
    g = g.astype(jnp.float32)
    o, final = chunk_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, backend="pallas_gpu", interpret=True
    )
    expected = gla_oracle(q, k, v, g, scale=case.key_dim**-0.5, initial_state=h0)
    assert o.dtype == jnp.bfloat16
    assert _rel_err(o, expected["o"]) <= TOLERANCE[jnp.bfloat16]
    assert _rel_err(final, expected["final_state"]) <= TOLERANCE[jnp.bfloat16]


def test_unsupported_shapes_give_reasons():
    opts = api.Options("pallas_gpu", 1.0, 64, True)
    assert "K = 300" in gpu.BACKEND.supports((1, 8, 1, 300), (1, 8, 1, 16), jnp.float32, opts)
    assert "V = 600" in gpu.BACKEND.supports((1, 8, 1, 16), (1, 8, 1, 600), jnp.float32, opts)
    assert "float64" in gpu.BACKEND.supports((1, 8, 1, 16), (1, 8, 1, 16), jnp.float64, opts)
    assert gpu.BACKEND.supports((1, 8, 1, 16), (1, 8, 1, 16), jnp.bfloat16, opts) is None
    native = dataclasses.replace(opts, interpret=False)
    if jax.default_backend() == "cpu":
        assert "needs a GPU" in gpu.BACKEND.supports(
            (1, 8, 1, 16), (1, 8, 1, 16), jnp.float32, native
        )


def test_explicit_backend_raises_on_unsupported_shape():
    q = jnp.zeros((1, 8, 1, 300))
    with pytest.raises(NotImplementedError, match="K = 300"):
        chunk_gla(q, q, jnp.zeros((1, 8, 1, 16)), q, backend="pallas_gpu", interpret=True)


def _export_for_cuda(
    batch,
    seq_len,
    heads,
    key_dim,
    value_dim,
    dtype,
    chunk=api.DEFAULT_CHUNK_SIZE,
    switches=None,
    keep_states=False,
):
    from benchmarks.kernel_resources import export_for_cuda, op_for_cuda

    call, args = op_for_cuda(
        batch,
        seq_len,
        heads,
        key_dim,
        value_dim,
        dtype,
        gate_dtype=jnp.float32,
        chunk=chunk,
        settings=switches,
        keep_states=keep_states,
    )
    return export_for_cuda(call, args).mlir_module()


# The kernels of one forward+backward under the default settings (the backward's two walks
# paired), by their launch names.
KERNELS = (
    "gla_gate_spans",
    "gla_chunk_states",
    "gla_exact_scores",
    "gla_chunk_outputs",
    "gla_backward_walks",
    "gla_score_grads",
    "gla_value_grads",
    "gla_query_key_grads",
    "gla_query_key_grads_exact",
)


@pytest.mark.parametrize(
    "shape",
    [
        (32, 1024, 16, 128, 128, jnp.bfloat16),  # the benchmark shapes
        (8, 4096, 4, 256, 512, jnp.bfloat16),
        (2, 100, 2, 20, 48, jnp.float32),  # ragged T, padded head dims, float32 (IEEE matmuls)
        (1, 192, 3, 16, 16, jnp.float16),  # 3 chunks: non-power-of-two whole-sequence blocks
    ],
)
def test_every_kernel_lowers_through_triton(shape):
    module = _export_for_cuda(*shape)
    # Forward: gate_spans, chunk_states, exact_scores, chunk_outputs; backward: gate_spans and
    # exact_scores recomputed, then backward_walks (the states and their gradients), value_grads,
    # score_grads and query_key_grads (factorized and exact).
    assert module.count("__gpu$xla.gpu.triton") == 11
    for name in KERNELS:
        assert name in module


@pytest.mark.parametrize("shape", [(4, 1024, 16, 128, 128), (2, 100, 2, 20, 48)])
def test_unpaired_walks_lower_through_triton(shape):
    module = _export_for_cuda(*shape, jnp.bfloat16, switches=UNPAIRED)
    # The backward's chunk_states and state_grads in two launches: one more than paired.
    assert module.count("__gpu$xla.gpu.triton") == 12
    assert "gla_state_grads" in module and "gla_backward_walks" not in module


@pytest.mark.parametrize("shape", [(32, 1024, 16, 128, 128), (8, 4096, 4, 256, 512)])
def test_kept_states_lower_through_triton(shape):
    module = _export_for_cuda(*shape, jnp.bfloat16, keep_states=True)
    # The backward's states walk is gone: state_grads alone in place of the paired walks.
    assert module.count("__gpu$xla.gpu.triton") == 11
    assert "gla_state_grads" in module and "gla_backward_walks" not in module


@pytest.mark.parametrize("shape", [(16, 2048, 16, 128, 128), (16, 2048, 4, 256, 512)])
def test_every_kernel_lowers_through_triton_at_chunk_128(shape):
    """The benchmark shapes at chunk size 128 (``benchmarks/kernels.py --chunk_size 128``)."""
    module = _export_for_cuda(*shape, jnp.bfloat16, chunk=128)
    assert module.count("__gpu$xla.gpu.triton") == 11


def test_gate_gradient_stays_accurate_over_long_bf16_sequences():
    """dg sums dL/db inside each chunk only (plus the chunk's decay term). A reverse sum over the
    whole sequence is equal in exact arithmetic but its bf16 rounding grows with T: at T = 2048 it
    gave 1.8e-2 here, this gives ~4e-3."""
    case = Case(
        "long_bf16",
        batch=1,
        seq_len=2048,
        heads=1,
        key_dim=32,
        value_dim=32,
        dtype=jnp.bfloat16,
        initial_state=False,
    )
    q, k, v, g, _, do, dfinal = _make_inputs(case, 4)
    h0 = jnp.zeros(dfinal.shape)
    opts = api.Options("pallas_gpu", case.key_dim**-0.5, 64, True)
    dg = gpu.backward(q, k, v, g, h0, None, do, dfinal, opts)[3]
    expected = gla_oracle(
        q, k, v, g, scale=case.key_dim**-0.5, initial_state=h0, do=do, dfinal=dfinal
    )
    assert _rel_err(dg, expected["dg"]) <= 8e-3


FILLS = ["nan", "zeros"] if GPU_INTERPRET else ["native"]


@pytest.fixture(params=FILLS)
def unwritten_memory(request, monkeypatch):
    """What interpret mode's kernels read where nothing was written: NaN (jax's fill), then
    zeros; natively (GLA_TEST_NATIVE_GPU=1), whatever the GPU's memory holds. NaN flows into
    any output it reaches, but a branch that tests it can take its safe side (a NaN span takes
    the exact path) and hide a read of unwritten memory; zeros, what a GPU's fresh buffers
    often hold, take the other side, as on the GPU. (Private API: ``interpret=True`` has no
    public fill setting, unlike the Mosaic interpreters' InterpretParams. If jax moves it,
    setattr raises and the tests fail, rather than run with NaN twice.)"""
    if request.param == "zeros":
        from jax._src.pallas import primitives  # noqa: PLC0415

        nan_fill = primitives.uninitialized_value

        def zero_fill(shape, dtype):
            if jnp.issubdtype(dtype, jnp.floating):
                return jnp.zeros(shape, dtype)
            return nan_fill(shape, dtype)

        monkeypatch.setattr(primitives, "uninitialized_value", zero_fill)
        jax.clear_caches()  # no kernel compiled under NaN is reused, nor kept after
        yield request.param
        jax.clear_caches()
    else:
        yield request.param


def _chunk_spans(g, chunk=64):
    prepared = gpu.prepare(g, g, g, g, None, chunk)
    return gpu_forward.gate_spans(prepared.g, chunk=chunk, interpret=True)[0]


def test_a_chunk_whose_first_gate_is_below_the_floor_is_not_factorizable():
    """The factorized kernels read their gates unfloored (``gate_sums(floored=False)``), which is
    sound only if every gate of a factorizable chunk is above the floor. The span leaves out the
    chunk's first gate, so gate_spans must rule such a chunk out itself."""
    g = jnp.full((1, 256, 1, 16), -0.01, jnp.float32)
    g = g.at[0, 64].set(-jnp.inf).at[0, 128].set(-1e9).at[0, 192].set(-99.0)
    spans = _chunk_spans(g)[0, :, 0]
    assert [bool(s) for s in gpu_forward.factorizable(spans)] == [True, False, False, True]


# Every dtype under the first fill; the path a chunk takes does not hang on the dtype, so the
# other fills run at float32 only.
FACTORIZATION_RUNS = [(dtype, FILLS[0]) for dtype in (jnp.float32, jnp.bfloat16, jnp.float16)]
FACTORIZATION_RUNS += [(jnp.float32, fill) for fill in FILLS[1:]]


@pytest.mark.parametrize(
    "dtype, unwritten_memory", FACTORIZATION_RUNS, indirect=["unwritten_memory"]
)
def test_every_factorization_path_matches_oracle(dtype, unwritten_memory):
    """Three gate regimes, each checked against the oracle, forward and gradients:
    - mild gates, and gates of -0.9 per step (spans just under FACTORIZE_SPAN, where the gate
      gradient hangs on cancellation inside the chunk): every chunk is one matmul factorized
      around its middle row;
    - strong gates (log gate -2 per step): chunk spans exceed FACTORIZE_SPAN, so the exact
      kernels run: the forward's dyadic levels, and the gradients' sub-chunks whose diagonal
      blocks (spans of 15 steps) are factorized;
    - resets (log gate -120 inside sub-chunks): the exact kernels again, the gradients' diagonal
      blocks in log space.
    The mild and reset gates are mixed in one batch, so both launches write parts of one buffer.
    float16 factorized operands would overflow at these spans: they are float32."""
    case = Case("resets", batch=2, seq_len=128, heads=2, key_dim=32, value_dim=32, dtype=dtype)
    q, k, v, g, h0, do, dfinal = _make_inputs(case, 11)
    resets = jnp.zeros(g.shape[1], bool).at[jnp.array([5, 37, 70, 100])].set(True)
    in_second_row = (jnp.arange(case.batch) == 1)[:, None, None, None]
    g_reset = jnp.where(
        resets[None, :, None, None] & in_second_row, -120.0, g.astype(jnp.float32)
    ).astype(dtype)
    g_strong = (jnp.full(g.shape, -2.0) + 0.1 * g.astype(jnp.float32)).astype(dtype)
    g_near = (jnp.full(g.shape, -0.9) + 0.1 * g.astype(jnp.float32)).astype(dtype)
    limit = gpu_forward.FACTORIZE_SPAN
    assert bool(jnp.all(_chunk_spans(g) <= limit)) and bool(jnp.all(_chunk_spans(g_near) <= limit))
    assert float(jnp.max(_chunk_spans(g_near))) > 0.8 * limit
    reset_spans = _chunk_spans(g_reset)
    assert bool(jnp.all(reset_spans[0] <= limit)) and bool(jnp.all(reset_spans[1] > limit))
    assert bool(jnp.all(_chunk_spans(g_strong) > limit))
    assert 15 * 2.1 * 1.4427 <= limit < 120 * 1.4427  # strong: factorized diagonals; resets: not
    scale = case.key_dim**-0.5
    opts = api.Options("pallas_gpu", scale, 64, GPU_INTERPRET)
    for gates in (g, g_near, g_strong, g_reset):
        o, final = gpu.forward(q, k, v, gates, h0, None, opts)
        grads = gpu.backward(q, k, v, gates, h0, None, do, dfinal, opts)
        expected = gla_oracle(q, k, v, gates, scale=scale, initial_state=h0, do=do, dfinal=dfinal)
        actual = dict(
            o=o, final_state=final, **dict(zip(("dq", "dk", "dv", "dg", "dh0"), grads, strict=True))
        )
        errors = {key: _rel_err(actual[key], expected[key]) for key in actual}
        assert all(err <= TOLERANCE[dtype] for err in errors.values()), errors


GROUPED_EXACT_CASES = [
    # chunk, log gate of the resets, their positions, the strong chunk and its per-step gate,
    # the exact chunks of the first row, chunks per program (the whole row: 8 or 32)
    pytest.param(64, (5, 100, 150), 6, -2.0, [0, 1, 2, 6], 8, id="8-of-64"),
    pytest.param(16, (100, 330), 27, -8.0, [6, 20, 27], 32, id="32-of-16"),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "chunk, resets, strong, strong_gate, exact_chunks, group", GROUPED_EXACT_CASES
)
def test_grouped_exact_launches_match_oracle(
    dtype, chunk, resets, strong, strong_gate, exact_chunks, group, unwritten_memory
):
    """The exact launches (exact_scores, query_key_grads_exact) with a whole row of chunks per
    program (``exact_group``), only some of them past FACTORIZE_SPAN: in the first row, resets
    (the gradients' diagonal blocks in log space) and strong gates over one chunk (their diagonal
    blocks factorized); the second row has none, so its programs skip their group after reading
    its spans. Each program must write its exact chunks at their own rows and states and leave
    its factorizable chunks to the factorized kernels."""
    case = Case("grouped", batch=2, seq_len=512, heads=2, key_dim=32, value_dim=32, dtype=dtype)
    q, k, v, g, h0, do, dfinal = _make_inputs(case, 12)
    position = jnp.arange(case.seq_len)[None, :, None, None]
    first_row = (jnp.arange(case.batch) == 0)[:, None, None, None]
    g = g.astype(jnp.float32)
    g = jnp.where(first_row & jnp.isin(position, jnp.array(resets)), -120.0, g)
    g = jnp.where(first_row & (position // chunk == strong), strong_gate + 0.1 * g, g).astype(dtype)
    exact = _chunk_spans(g, chunk) > gpu_forward.FACTORIZE_SPAN  # [B, NC, H]
    num_chunks = case.seq_len // chunk
    assert exact.shape[1] == num_chunks and not bool(jnp.any(exact[1]))
    assert [int(c) for c in jnp.nonzero(jnp.all(exact[0], axis=1))[0]] == exact_chunks
    assert int(jnp.sum(jnp.any(exact[0], axis=1))) == len(exact_chunks)
    config = dataclasses.replace(
        tuning.config_for(32, 32, dtype, interpret=GPU_INTERPRET), exact_min_programs=1
    )
    lanes = case.batch * case.heads
    assert gpu_forward.exact_group(num_chunks, lanes, config.exact_min_programs) == group
    scale = case.key_dim**-0.5
    opts = api.Options("pallas_gpu", scale, chunk, GPU_INTERPRET)
    o, final = gpu.forward(q, k, v, g, h0, None, opts, config)
    grads = gpu.backward(q, k, v, g, h0, None, do, dfinal, opts, config)
    expected = gla_oracle(q, k, v, g, scale=scale, initial_state=h0, do=do, dfinal=dfinal)
    actual = dict(
        o=o, final_state=final, **dict(zip(("dq", "dk", "dv", "dg", "dh0"), grads, strict=True))
    )
    errors = {key: _rel_err(actual[key], expected[key]) for key in actual}
    assert all(err <= TOLERANCE[dtype] for err in errors.values()), errors


@pytest.mark.parametrize(
    "num_chunks, lanes, min_programs, expected",
    [
        (32, 256, 1024, 8),  # 16 x 128 at T = 2K: 8192 chunks, 1024 programs of 8
        (32, 64, 1024, 2),  # the paper shape at 2K: 2048 chunks, 1024 programs of 2
        (32, 256, 256, 32),  # at most EXACT_GROUP chunks a program
        (256, 2, 1024, 1),  # few long rows: a program per chunk keeps the GPU filled
        (12, 64, 1, 4),  # the group divides the row's chunk count
        (7, 64, 1, 1),
        (32, 256, 0, 1),  # 0: grouping off
    ],
)
def test_exact_group_keeps_enough_programs(num_chunks, lanes, min_programs, expected):
    assert gpu_forward.exact_group(num_chunks, lanes, min_programs) == expected


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_dyadic_levels_cover_every_pair_below_the_diagonal_once(size):
    """exact_scores sums one matmul per dyadic level: the levels' pairs must partition the
    strictly lower triangle, or a pair would be lost or counted twice."""
    levels = gpu_forward.dyadic_levels(size)
    assert levels[0] == size // 2 and levels[-1] == 1
    counts = sum(gpu_forward.dyadic_pairs(size, h).astype(jnp.int32) for h in levels)
    below = jnp.tril(jnp.ones((size, size), jnp.int32), k=-1)
    assert bool(jnp.all(counts == below))


@pytest.mark.parametrize(
    "walks, expected",
    [
        (256, (64, 128)),  # 16 heads x 16 rows: 512 programs, the measured best tile
        (64, (64, 128)),  # T = 16K's 32 (row, head) pairs, both backward walks: 128 programs
        (32, (64, 64)),  # the forward walk alone there: 64 x 128 gives 64 programs; V halves
        (4, (32, 32)),  # a packed cu_seqlens row of 4 heads: shrinks to the 32 x 32 floor
    ],
)
def test_state_tiles_shrink_until_a_launch_fills_the_gpu(walks, expected):
    config = tuning.config_for(128, 128, jnp.bfloat16, interpret=False)
    tiles = tuning.state_tiles(config, 128, 128, walks)
    assert tiles == expected
    programs = walks * (128 // tiles[0]) * (128 // tiles[1])
    assert programs >= config.state_min_programs or tiles == (32, 32)


def test_state_min_programs_sets_the_floor():
    # T = 8K's 64 (row, head) pairs at 16 x 128: 128 programs of 64 x 128 meet the default floor;
    # a floor of 256 halves the V tile, 512 halves it again.
    config = tuning.config_for(128, 128, jnp.bfloat16, interpret=False)
    floors = {floor: dataclasses.replace(config, state_min_programs=floor) for floor in (256, 512)}
    assert tuning.state_tiles(config, 128, 128, 64) == (64, 128)
    assert tuning.state_tiles(floors[256], 128, 128, 64) == (64, 64)
    assert tuning.state_tiles(floors[512], 128, 128, 64) == (64, 32)


@pytest.mark.parametrize(
    "walks, programs, tile, expected",
    [
        (1, 128, (64, 64), True),  # T = 16K's forward walk at 16 x 128: one per multiprocessor
        (1, 512, (64, 128), False),  # T = 2K's: four per multiprocessor hide the loads' wait
        (1, 128, (64, 128), False),  # T = 8K's: a wider tile's carried loads spill
        (2, 128, (64, 64), False),  # the backward's pair: two walks' carried tiles spill
    ],
)
def test_only_small_single_walk_launches_prefetch(walks, programs, tile, expected):
    config = tuning.config_for(128, 128, jnp.bfloat16, interpret=False)
    assert tuning.prefetches(config, walks, programs, tile) is expected
    assert not tuning.prefetches(dataclasses.replace(config, **NO_PREFETCH), walks, programs, tile)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no_prefetch"])
def test_sequence_walks_lower_through_triton(prefetch):
    """A packed row's walks, one program per sequence: loops whose bounds are data (the
    sequence's chunk range) lower through Triton, with and without the prefetching walk."""
    from benchmarks.kernel_resources import export_for_cuda

    heads, dim, num_seqs = 4, 128, 3
    opts = api.Options("pallas_gpu", dim**-0.5, api.DEFAULT_CHUNK_SIZE, False)
    config = dataclasses.replace(
        tuning.config_for(dim, dim, jnp.bfloat16, interpret=False),
        sequence_walks=True,
        prefetch_max_programs=1024 if prefetch else 0,  # the forward's 192 programs of 32 x 32
    )

    def forward_and_backward(q, k, v, g, h0, do, dfinal, cu_seqlens):
        out = gpu.forward(q, k, v, g, h0, cu_seqlens, opts, config)
        return out, gpu.backward(q, k, v, g, h0, cu_seqlens, do, dfinal, opts, config)

    sd = jax.ShapeDtypeStruct
    keys = sd((1, 1000, heads, dim), jnp.bfloat16)
    state = sd((num_seqs, heads, dim, dim), jnp.float32)
    args = (keys, keys, keys, sd(keys.shape, jnp.float32), state, keys, state, sd((4,), jnp.int32))
    module = export_for_cuda(jax.jit(forward_and_backward), args).mlir_module()
    assert "gla_chunk_states" in module and "gla_backward_walks" in module
