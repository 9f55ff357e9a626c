"""Float64 NumPy oracle for gated linear attention, forward and a hand-derived backward.

Independent of the code under test: a plain per-step loop over each sequence, with the gradient of
the recurrence written out by hand (and itself checked against finite differences in
test_gla_oracle.py).

Forward, per head:  S_t = diag(a_t) S_{t-1} + k_t^T v_t,  a_t = exp(g_t),  o_t = scale q_t S_t.
Backward, walking t from the end with dS the cotangent of S_t:
    dS += scale q_t^T do_t;  dq_t = scale do_t S_t^T;  dk_t = dS v_t;  dv_t = k_t dS;
    dg_t = a_t * rowsum(dS * S_{t-1});  dS <- diag(a_t) dS   (now the cotangent of S_{t-1}).
"""

from __future__ import annotations

import numpy as np


def _sequences(batch, seq_len, cu_seqlens):
    """(row, start, end) per sequence."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    cu = [int(c) for c in cu_seqlens]
    return [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def gla_oracle(q, k, v, g, *, scale, initial_state, cu_seqlens=None, do=None, dfinal=None):
    """Returns dict with o, final_state and, when do is given, dq, dk, dv, dg, dh0 (float64)."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    h0 = np.asarray(initial_state, np.float64)
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    o = np.zeros((batch, seq_len, heads, value_dim))
    final = np.zeros_like(h0)
    grads = do is not None
    if grads:
        do = np.asarray(do, np.float64)
        dfinal = np.zeros_like(h0) if dfinal is None else np.asarray(dfinal, np.float64)
        dq, dk, dv, dg = (np.zeros_like(x) for x in (q, k, v, g))
        dh0 = np.zeros_like(h0)

    for n, (row, start, end) in enumerate(_sequences(batch, seq_len, cu_seqlens)):
        state = h0[n].copy()  # [H, K, V]
        states = [state]
        for t in range(start, end):
            decay = np.exp(g[row, t])  # [H, K]
            state = decay[..., None] * state + k[row, t][..., None] * v[row, t][:, None, :]
            states.append(state)
            o[row, t] = scale * np.einsum("hk,hkv->hv", q[row, t], state)
        final[n] = state
        if not grads:
            continue
        d_state = dfinal[n].copy()
        for t in range(end - 1, start - 1, -1):
            i = t - start
            state, prev = states[i + 1], states[i]
            d_state = d_state + scale * q[row, t][..., None] * do[row, t][:, None, :]
            dq[row, t] = scale * np.einsum("hv,hkv->hk", do[row, t], state)
            dk[row, t] = np.einsum("hkv,hv->hk", d_state, v[row, t])
            dv[row, t] = np.einsum("hk,hkv->hv", k[row, t], d_state)
            decay = np.exp(g[row, t])
            dg[row, t] = decay * np.sum(d_state * prev, axis=-1)
            d_state = decay[..., None] * d_state
        dh0[n] = d_state

    out = {"o": o, "final_state": final}
    if grads:
        out.update(dq=dq, dk=dk, dv=dv, dg=dg, dh0=dh0)
    return out


def gla_quadratic(q, k, v, g, *, scale, initial_state):
    """The same forward without a recurrence (unpacked rows only), for checking the oracle.

    o_t = scale * [ (q_t * exp(G_t)) h0 + sum_{j<=t} sum_d q_td k_jd exp(G_td - G_jd) v_j ],
    with G the inclusive cumulative sum of g over the row.
    """
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    h0 = np.asarray(initial_state, np.float64)
    cum = np.cumsum(g, axis=1)  # [B, T, H, K]
    seq_len = q.shape[1]
    causal = np.tril(np.ones((seq_len, seq_len), bool))
    log_decay = cum[:, :, None] - cum[:, None, :]  # [B, Ti, Tj, H, K]
    log_decay = np.where(causal[None, :, :, None, None], log_decay, -np.inf)
    scores = np.einsum("bihk,bjhk,bijhk->bhij", q, k, np.exp(log_decay))
    o = np.einsum("bhij,bjhv->bihv", scores, v)
    o += np.einsum("bthk,bhkv->bthv", q * np.exp(cum), h0)
    return scale * o
