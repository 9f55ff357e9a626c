"""The shared op suite: every backend in gla_backends.BACKENDS_UNDER_TEST, every case, forward,
final state and all gradients, against the float64 oracle on fresh random inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gla_jax.ops import chunk_gla, fused_recurrent_gla
from tests.gla_backends import BACKENDS_UNDER_TEST
from tests.gla_oracle import gla_oracle

TOLERANCE = {jnp.float32: 2e-4, jnp.bfloat16: 3e-2, jnp.float16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int = 2
    seq_len: int = 100
    heads: int = 2
    key_dim: int = 32
    value_dim: int = 48
    gates: str = "mild"  # mild | strong | zero | resets
    dtype: type = jnp.float32
    cu_seqlens: tuple | None = None
    initial_state: bool = True  # False: initial_state=None (zeros)
    final_state_cotangent: bool = True  # False: output_final_state=False (dfinal = 0)
    chunk_size: int = 64
    scale: float | None = None


CASES = [
    Case("f32_ragged_k_ne_v"),
    Case("f32_strong_gates", seq_len=130, key_dim=32, value_dim=32, gates="strong"),
    Case("f32_zero_gates", seq_len=77, gates="zero", initial_state=False),
    Case("f32_reset_gates", seq_len=140, gates="resets"),
    Case("f32_packed", batch=1, seq_len=150, cu_seqlens=(0, 17, 17, 90, 150), gates="strong"),
    # Every packed sequence, empty ones at the ends included, starts from zeros it is not given.
    Case(
        "f32_packed_no_state",
        batch=1,
        seq_len=150,
        cu_seqlens=(0, 0, 61, 150, 150),
        initial_state=False,
        final_state_cotangent=False,
    ),
    Case(
        "f32_packed_no_final_state",
        batch=1,
        seq_len=110,
        cu_seqlens=(0, 30, 30, 110),
        gates="strong",
        final_state_cotangent=False,
    ),
    Case(
        "f32_short_chunk16",
        batch=1,
        seq_len=5,
        heads=3,
        key_dim=16,
        value_dim=16,
        chunk_size=16,
        scale=0.3,
    ),
    Case(
        "f32_chunk32_no_state",
        seq_len=64,
        chunk_size=32,
        initial_state=False,
        final_state_cotangent=False,
    ),
    Case("bf16_mild", seq_len=96, key_dim=64, value_dim=32, dtype=jnp.bfloat16),
    Case(
        "bf16_strong_packed",
        batch=1,
        seq_len=120,
        cu_seqlens=(0, 50, 51, 120),
        gates="strong",
        dtype=jnp.bfloat16,
    ),
]


def _rel_err(actual, expected):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    assert np.all(np.isfinite(actual)), "non-finite values"
    scale = max(np.linalg.norm(expected), 1e-30)
    return np.linalg.norm(actual - expected) / scale


def _reset_gates(key, gate_logits):
    """Mild gates with hard resets: a tenth of the entries -inf, -1e9 or -3000 (decays of 0 whose
    logs a float32 cumulative sum cannot carry), the first of every later 16-step run at -1e9
    (chunk starts among them), and a run of them longer than a chunk's secondary sub-chunks.
    Step 0 is left to chance, so that the initial state's gradient is not all exactly 0."""
    t = jnp.arange(gate_logits.shape[1])[None, :, None, None]
    # Its own key: drawn from the logits' key, the picks would follow the logits' values.
    pick = jax.random.uniform(jax.random.fold_in(key, 1), gate_logits.shape)
    g = jax.nn.log_sigmoid(gate_logits) / 16
    g = jnp.where(pick < 0.04, -jnp.inf, g)
    g = jnp.where((pick >= 0.04) & (pick < 0.07), -1e9, g)
    g = jnp.where((pick >= 0.07) & (pick < 0.1), -3000.0, g)
    g = jnp.where((t % 16 == 0) & (t > 0), -1e9, g)
    return jnp.where((t >= 70) & (t < 100), -1e9, g)


def _make_inputs(case: Case, seed: int):
    keys = jax.random.split(jax.random.key(seed), 7)
    b, t, h, dk, dv = case.batch, case.seq_len, case.heads, case.key_dim, case.value_dim
    q = jax.random.normal(keys[0], (b, t, h, dk))
    k = jax.random.normal(keys[1], (b, t, h, dk))
    v = jax.random.normal(keys[2], (b, t, h, dv))
    gate_logits = jax.random.normal(keys[3], (b, t, h, dk))
    g = {
        "mild": jax.nn.log_sigmoid(gate_logits) / 16,
        "strong": jax.nn.log_sigmoid(3 * gate_logits),
        "zero": jnp.zeros_like(gate_logits),
        "resets": _reset_gates(keys[3], gate_logits),
    }[case.gates]
    num_seqs = b if case.cu_seqlens is None else len(case.cu_seqlens) - 1
    state_shape = (num_seqs, h, dk, dv)
    h0 = jax.random.normal(keys[4], state_shape) if case.initial_state else None
    do = jax.random.normal(keys[5], (b, t, h, dv)).astype(case.dtype)
    dfinal = (
        jax.random.normal(keys[6], state_shape)
        if case.final_state_cotangent
        else jnp.zeros(state_shape)
    )
    q, k, v, g = (x.astype(case.dtype) for x in (q, k, v, g))
    return q, k, v, g, h0, do, dfinal


@pytest.fixture(params=BACKENDS_UNDER_TEST)
def backend(request):
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_and_gradients_match_oracle(backend, case):
    name, interpret = backend
    seed = abs(hash((name, case.name))) % (2**31)  # fresh inputs per backend and case
    q, k, v, g, h0, do, dfinal = _make_inputs(case, seed)
    cu = None if case.cu_seqlens is None else jnp.asarray(case.cu_seqlens, jnp.int32)

    def run(q, k, v, g, *h0):  # h0: (the initial state,), or () for none
        return chunk_gla(
            q,
            k,
            v,
            g,
            scale=case.scale,
            initial_state=h0[0] if h0 else None,
            output_final_state=case.final_state_cotangent,
            cu_seqlens=cu,
            chunk_size=case.chunk_size,
            backend=name,
            interpret=interpret,
        )

    given = () if h0 is None else (h0,)
    (o, final), vjp = jax.vjp(run, q, k, v, g, *given)
    dq, dk, dv, dg, *dh0 = vjp((do, dfinal if case.final_state_cotangent else None))

    scale = case.scale if case.scale is not None else case.key_dim**-0.5
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
    assert o.dtype == case.dtype and o.shape == (
        case.batch,
        case.seq_len,
        case.heads,
        case.value_dim,
    )
    tol = TOLERANCE[case.dtype]
    actual = dict(o=o, dq=dq, dk=dk, dv=dv, dg=dg)
    if h0 is not None:
        actual["dh0"] = dh0[0]
    if case.final_state_cotangent:
        assert final.dtype == jnp.float32 and final.shape == dfinal.shape
        actual["final_state"] = final
    else:
        assert final is None
    errors = {key: _rel_err(actual[key], expected[key]) for key in actual}
    bad = {key: err for key, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    for grad, primal in ((dq, q), (dk, k), (dv, v), (dg, g)):
        assert grad.dtype == primal.dtype


def test_jit_with_traced_cu_seqlens(backend):
    name, interpret = backend
    case = Case("jit", batch=1, seq_len=70, cu_seqlens=(0, 20, 70), gates="strong")
    q, k, v, g, h0, _, _ = _make_inputs(case, 7)

    @jax.jit
    def run(q, k, v, g, h0, cu):
        return chunk_gla(
            q,
            k,
            v,
            g,
            initial_state=h0,
            output_final_state=True,
            cu_seqlens=cu,
            backend=name,
            interpret=interpret,
        )

    o, final = run(q, k, v, g, h0, jnp.asarray(case.cu_seqlens, jnp.int32))
    expected = gla_oracle(
        q, k, v, g, scale=case.key_dim**-0.5, initial_state=h0, cu_seqlens=case.cu_seqlens
    )
    assert _rel_err(o, expected["o"]) <= 2e-4
    assert _rel_err(final, expected["final_state"]) <= 2e-4


def test_a_non_finite_key_reaches_no_earlier_output(backend):
    # Causality holds for NaN too: a NaN key at position 40 may spoil outputs from 40 on, never
    # before (masking by products with 0 would give NaN * 0 = NaN inside its chunk).
    name, interpret = backend
    case = Case("nan_key", batch=1, seq_len=64, key_dim=16, value_dim=16)
    q, k, v, g, _, _, _ = _make_inputs(case, 3)
    k = k.at[:, 40].set(jnp.nan)
    o, _ = chunk_gla(q, k, v, g, chunk_size=64, backend=name, interpret=interpret)
    finite = np.isfinite(np.asarray(o)).all(axis=(0, 2, 3))
    assert finite[:40].all() and not finite[40:].any(), np.flatnonzero(~finite)


def test_backward_saves_only_inputs(backend):
    """The custom VJP keeps the inputs and recomputes chunk states: no per-step state is saved."""
    name, interpret = backend
    case = Case("residuals", batch=1, seq_len=256, heads=1, key_dim=16, value_dim=16)
    q, k, v, g, h0, _, _ = _make_inputs(case, 3)

    def loss(q, k, v, g, h0):
        o, final = chunk_gla(
            q, k, v, g, initial_state=h0, output_final_state=True, backend=name, interpret=interpret
        )
        return jnp.sum(o) + jnp.sum(final)

    _, vjp = jax.vjp(loss, q, k, v, g, h0)
    saved = sum(x.size for x in jax.tree_util.tree_leaves(vjp))
    inputs = sum(x.size for x in (q, k, v, g, h0))
    per_step_states = case.seq_len * case.key_dim * case.value_dim
    assert saved <= inputs + case.seq_len * case.value_dim, (saved, inputs)
    assert saved < per_step_states


# --------------------------------------------------------------------------------------------
# The step form
# --------------------------------------------------------------------------------------------


def test_fused_recurrent_step_by_step_equals_chunk_gla():
    case = Case("steps", batch=2, seq_len=9, gates="strong")
    q, k, v, g, h0, _, _ = _make_inputs(case, 11)
    o_full, final_full = chunk_gla(
        q, k, v, g, initial_state=h0, output_final_state=True, backend="xla"
    )
    state, outputs = h0, []
    for t in range(case.seq_len):
        sl = slice(t, t + 1)
        o_t, state = fused_recurrent_gla(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], initial_state=state, output_final_state=True
        )
        outputs.append(o_t)
    expected = gla_oracle(q, k, v, g, scale=case.key_dim**-0.5, initial_state=h0)
    assert _rel_err(jnp.concatenate(outputs, axis=1), expected["o"]) <= 2e-4
    assert _rel_err(state, expected["final_state"]) <= 2e-4
    assert _rel_err(o_full, expected["o"]) <= 2e-4
    assert _rel_err(final_full, expected["final_state"]) <= 2e-4


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _small():
    q = jnp.ones((2, 8, 2, 4))
    return q, q, jnp.ones((2, 8, 2, 6)), -jnp.ones((2, 8, 2, 4))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: dict(a, k=a["k"][:, :7]), "k must have q's shape"),
        (lambda a: dict(a, g=a["g"][..., :3]), "g must have q's shape"),
        (lambda a: dict(a, v=a["v"][:, :5]), "v must be"),
        (lambda a: dict(a, q=a["q"][0]), "q must be"),
        (lambda a: dict(a, q=a["q"].astype(jnp.int32)), "q must be a floating-point"),
        (lambda a: dict(a, initial_state=jnp.zeros((2, 2, 4, 5))), "initial_state must have shape"),
        (lambda a: dict(a, cu_seqlens=jnp.array([0, 8])), "B must be 1"),
        (lambda a: dict(a, chunk_size=48), "chunk_size must be one of"),
        (lambda a: dict(a, backend="cuda"), "backend must be one of"),
        (lambda a: dict(a, k=a["k"].astype(jnp.bfloat16)), "k must have q's dtype float32"),
        (lambda a: dict(a, v=a["v"].astype(jnp.float16)), "v must have q's dtype float32"),
        (lambda a: dict(a, scale=0.0), "scale must be finite and > 0, got 0.0"),
        (lambda a: dict(a, scale=float("nan")), "scale must be finite and > 0"),
        (lambda a: dict(a, scale="big"), "scale must be a Python number"),
    ],
)
def test_bad_input_raises_value_error(mutate, message):
    q, k, v, g = _small()
    args = mutate(dict(q=q, k=k, v=v, g=g))
    with pytest.raises(ValueError, match=message):
        chunk_gla(**args)


@pytest.mark.parametrize(
    "cu, message",
    [
        ([0, 3, 7], "end at T = 8"),
        ([1, 3, 8], "start at 0"),
        ([0, 5, 3, 8], "never decrease"),
        ([[0, 8]], "1-D"),
        ([0.0, 8.0], "integer"),
    ],
)
def test_bad_cu_seqlens(cu, message):
    q, k, v, g = (x[:1] for x in _small())
    with pytest.raises(ValueError, match=message):
        chunk_gla(q, k, v, g, cu_seqlens=jnp.asarray(cu))


def test_gates_may_be_float32_beside_half_precision_inputs_and_states_may_be_numpy():
    q, k, v, g = _small()
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    o, _ = chunk_gla(*half, g, backend="xla")
    assert o.dtype == jnp.bfloat16
    h0 = np.ones((2, 2, 4, 6), np.float32)  # indexed by traced sequence ids inside the op
    o_numpy, final = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_jax, _ = chunk_gla(q, k, v, g, initial_state=jnp.asarray(h0))
    np.testing.assert_allclose(o_numpy, o_jax)
    assert final.shape == h0.shape


def test_fused_recurrent_checks_its_inputs_too():
    q, k, v, g = _small()
    with pytest.raises(ValueError, match="initial_state must have shape"):
        fused_recurrent_gla(q, k, v, g, initial_state=jnp.zeros((3, 2, 4, 6)))
