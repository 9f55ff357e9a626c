"""The float64 oracle checks itself: forward against the quadratic form, backward against
central finite differences."""

import numpy as np
import pytest

from tests.gla_oracle import gla_oracle, gla_quadratic


def _inputs(rng, batch=2, seq_len=9, heads=2, key_dim=3, value_dim=4):
    q = rng.standard_normal((batch, seq_len, heads, key_dim))
    k = rng.standard_normal((batch, seq_len, heads, key_dim))
    v = rng.standard_normal((batch, seq_len, heads, value_dim))
    g = -np.log1p(np.exp(-rng.standard_normal((batch, seq_len, heads, key_dim))))
    h0 = rng.standard_normal((batch, heads, key_dim, value_dim))
    return q, k, v, g, h0


def test_forward_matches_quadratic_form():
    rng = np.random.default_rng(0)
    q, k, v, g, h0 = _inputs(rng)
    out = gla_oracle(q, k, v, g, scale=0.7, initial_state=h0)
    np.testing.assert_allclose(
        out["o"], gla_quadratic(q, k, v, g, scale=0.7, initial_state=h0), rtol=1e-12, atol=1e-12
    )


def test_packed_equals_separate_rows():
    rng = np.random.default_rng(1)
    q, k, v, g, h0 = _inputs(rng, batch=2, seq_len=6)
    cu = [0, 6, 12]
    packed = [x.reshape((1, 12) + x.shape[2:]) for x in (q, k, v, g)]
    a = gla_oracle(q, k, v, g, scale=0.5, initial_state=h0)
    b = gla_oracle(*packed, scale=0.5, initial_state=h0, cu_seqlens=cu)
    np.testing.assert_allclose(b["o"].reshape(a["o"].shape), a["o"], rtol=1e-12)
    np.testing.assert_allclose(b["final_state"], a["final_state"], rtol=1e-12)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 4, 4, 11, 18]])
def test_backward_matches_finite_differences(cu_seqlens):
    rng = np.random.default_rng(2)
    batch = 2 if cu_seqlens is None else 1
    seq_len = 7 if cu_seqlens is None else 18
    q, k, v, g, _ = _inputs(rng, batch=batch, seq_len=seq_len)
    num_seqs = batch if cu_seqlens is None else len(cu_seqlens) - 1
    h0 = rng.standard_normal((num_seqs,) + (2, 3, 4))
    do = rng.standard_normal(v.shape)
    dfinal = rng.standard_normal(h0.shape)
    scale = 0.8

    def loss(q, k, v, g, h0):
        out = gla_oracle(q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens)
        return np.sum(out["o"] * do) + np.sum(out["final_state"] * dfinal)

    out = gla_oracle(
        q, k, v, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens, do=do, dfinal=dfinal
    )
    args = [q, k, v, g, h0]
    for index, name in enumerate(["dq", "dk", "dv", "dg", "dh0"]):
        numeric = np.zeros_like(args[index])
        flat = numeric.reshape(-1)
        for i in range(flat.size):
            eps = 1e-6
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[index].reshape(-1)[i] += eps
            minus[index].reshape(-1)[i] -= eps
            flat[i] = (loss(*plus) - loss(*minus)) / (2 * eps)
        np.testing.assert_allclose(out[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)
