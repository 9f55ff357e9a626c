"""Public GLA ops: argument checking, backend dispatch and the one custom VJP.

Every backend implements the same two functions on the caller's layout ([B, T, H, *]):

    forward(q, k, v, g, initial_state, cu_seqlens, opts) -> (o float32, final_state float32)
    backward(q, k, v, g, initial_state, cu_seqlens, do, dfinal, opts) -> (dq, dk, dv, dg, dh0)

The custom VJP keeps only the inputs as residuals: every backward recomputes the chunk states it
needs, so memory stays O(T (K + V) + (T / C) K V) per head. Backends without a hand-written
backward get one from ``jax.vjp`` of their forward, recomputed inside the backward pass.

A backend with ``takes_absent_states`` gets None, not zeros, for an absent initial state, and for
dfinal when the final state is not an output (``opts.output_final_state`` False); it may then
return None for the final state and for dh0, and skips reading and writing them. The others get
zeros.

With ``keep_states=True`` a backend that can (one with ``forward_keeping_states``) also keeps the
chunk states its forward wrote, one [K, V] state per chunk and head in its own layout, and its
backward reads them instead of walking them again (``backward(..., states=)``): the same result,
less time, more memory held from the forward to the backward. Other backends ignore the option.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gla import reference
from pallas_kernels.gla.layout import make_layout

BACKENDS = ("pallas_gpu", "pallas_tpu", "xla", "reference")
CHUNK_SIZES = (16, 32, 64, 128)
DEFAULT_CHUNK_SIZE = 64
_PALLAS_MODULES = {"pallas_gpu": "pallas_kernels.gla.gpu", "pallas_tpu": "pallas_kernels.gla.tpu"}
_AUTO = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Options:
    """Static settings of one call (hashable: it is a non-differentiable custom_vjp argument)."""

    backend: str
    scale: float
    chunk_size: int
    interpret: bool
    keep_states: bool = False
    output_final_state: bool = True


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class ReferenceBackend:
    """The float32 step recurrence."""

    name = "reference"

    @staticmethod
    def supports(q_shape, v_shape, dtype, opts) -> str | None:
        return None

    @staticmethod
    def forward(q, k, v, g, initial_state, cu_seqlens, opts):
        return reference.recurrent_gla(
            q, k, v, g, scale=opts.scale, initial_state=initial_state, cu_seqlens=cu_seqlens
        )


class XlaBackend:
    """The chunked form in plain jnp (any platform)."""

    name = "xla"

    @staticmethod
    def supports(q_shape, v_shape, dtype, opts) -> str | None:
        return None

    @staticmethod
    def forward(q, k, v, g, initial_state, cu_seqlens, opts):
        layout = make_layout(q.shape[0], q.shape[1], opts.chunk_size, cu_seqlens)
        return reference.chunked_gla(
            q, k, v, g, scale=opts.scale, initial_state=initial_state, layout=layout
        )


def _load_backend(name: str):
    if name == "reference":
        return ReferenceBackend
    if name == "xla":
        return XlaBackend
    try:
        module = importlib.import_module(_PALLAS_MODULES[name])
    except ModuleNotFoundError as err:
        if err.name != _PALLAS_MODULES[name]:
            raise
        raise NotImplementedError(f"backend={name!r} is not available in this build") from err
    return module.BACKEND


def _recomputed_backward(backend, q, k, v, g, initial_state, cu_seqlens, do, dfinal, opts):
    def forward(q, k, v, g, initial_state):
        return backend.forward(q, k, v, g, initial_state, cu_seqlens, opts)

    _, vjp = jax.vjp(forward, q, k, v, g, initial_state)
    return vjp((do.astype(jnp.float32), dfinal.astype(jnp.float32)))


# --------------------------------------------------------------------------------------------
# The custom VJP
# --------------------------------------------------------------------------------------------


def _state_for(backend, state, q, v, cu_seqlens):
    """An initial state or final-state gradient as ``backend`` takes it: None stays None for one
    that ``takes_absent_states``, else becomes zeros."""
    if getattr(backend, "takes_absent_states", False):
        return state
    return _state_or_zeros(state, q, v, cu_seqlens)


def _forward(opts, q, k, v, g, initial_state, cu_seqlens, keep_states):
    """((o in q's dtype, final state or None unless ``opts.output_final_state``), the chunk
    states if ``keep_states`` and the backend keeps them, else None)."""
    backend = _load_backend(opts.backend)
    h0 = _state_for(backend, initial_state, q, v, cu_seqlens)
    if keep_states and hasattr(backend, "forward_keeping_states"):
        o, final_state, states = backend.forward_keeping_states(q, k, v, g, h0, cu_seqlens, opts)
    else:
        (o, final_state), states = backend.forward(q, k, v, g, h0, cu_seqlens, opts), None
    # Unless asked for, the final state is not an output, so its gradient (dfinal) is None.
    return (o.astype(q.dtype), final_state if opts.output_final_state else None), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gla(opts: Options, q, k, v, g, initial_state, cu_seqlens):
    return _forward(opts, q, k, v, g, initial_state, cu_seqlens, keep_states=False)[0]


def _gla_fwd(opts, q, k, v, g, initial_state, cu_seqlens):
    out, states = _forward(opts, q, k, v, g, initial_state, cu_seqlens, opts.keep_states)
    # An absent initial state stays None here: zeros made outside would be one more [N, H, K, V]
    # float32 residual per call, stacked over the layers of a scanned model.
    return out, (q, k, v, g, initial_state, cu_seqlens, states)


def _gla_bwd(opts, residuals, cotangents):
    q, k, v, g, initial_state, cu_seqlens, states = residuals
    do, dfinal = cotangents
    backend = _load_backend(opts.backend)
    h0 = _state_for(backend, initial_state, q, v, cu_seqlens)
    dfinal = _state_for(backend, dfinal, q, v, cu_seqlens)
    if states is not None:
        grads = backend.backward(q, k, v, g, h0, cu_seqlens, do, dfinal, opts, states=states)
    elif hasattr(backend, "backward"):
        grads = backend.backward(q, k, v, g, h0, cu_seqlens, do, dfinal, opts)
    else:
        grads = _recomputed_backward(backend, q, k, v, g, h0, cu_seqlens, do, dfinal, opts)
    dq, dk, dv, dg = (d.astype(x.dtype) for d, x in zip(grads[:4], (q, k, v, g), strict=True))
    dh0 = None if initial_state is None else grads[4].astype(initial_state.dtype)
    return dq, dk, dv, dg, dh0, None


def _state_shape(q, v, cu_seqlens):
    """[N, H, K, V]: one state per sequence (the rows, or the packed sequences)."""
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (num_seqs, q.shape[2], q.shape[3], v.shape[-1])


def _state_or_zeros(initial_state, q, v, cu_seqlens):
    if initial_state is not None:
        return initial_state
    return jnp.zeros(_state_shape(q, v, cu_seqlens), jnp.float32)


_gla.defvjp(_gla_fwd, _gla_bwd)


# --------------------------------------------------------------------------------------------
# Checking arguments
# --------------------------------------------------------------------------------------------


def _check_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _check_inputs(q, k, v, g):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name} must be [B, T, H, D] (4-D), got shape {getattr(x, 'shape', None)}"
            )
        _check_float(name, x)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {q.shape}, got {k.shape}")
    if g.shape != q.shape:
        raise ValueError(f"g must have q's shape {q.shape} (one log gate per key), got {g.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] with [B, T, H] = {q.shape[:3]}, got {v.shape}")
    # The kernels' matmuls take one input dtype (the output's is q's); the gates are float
    # arithmetic, so g may be float32 beside bfloat16 q, k, v.
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")


def _check_cu_seqlens(cu_seqlens, batch, seq_len):
    if cu_seqlens is None:
        return None
    cu_seqlens = jnp.asarray(cu_seqlens)
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got {cu_seqlens.shape}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be integer, got dtype {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: B must be 1, got B = {batch}")
    try:
        values = np.asarray(cu_seqlens)
    except jax.errors.TracerArrayConversionError:
        return cu_seqlens  # traced: values cannot be checked here
    if values[0] != 0 or values[-1] != seq_len or np.any(np.diff(values) < 0):
        raise ValueError(
            f"cu_seqlens must start at 0, end at T = {seq_len} and never decrease, got {values}"
        )
    return cu_seqlens


def _check_state(name, state, expected):
    if state is None:
        return None
    state = jnp.asarray(state)  # a numpy array could not be indexed by the op's traced indices
    if tuple(state.shape) != expected:
        raise ValueError(f"{name} must have shape [N, H, K, V] = {expected}, got {state.shape}")
    _check_float(name, state)
    return state.astype(jnp.float32)


def _prepare(q, k, v, g, initial_state, cu_seqlens, scale):
    """Checks the arguments both ops share; returns (initial_state float32 or None, cu_seqlens,
    scale)."""
    _check_inputs(q, k, v, g)
    batch, seq_len, _, key_dim = q.shape
    cu_seqlens = _check_cu_seqlens(cu_seqlens, batch, seq_len)
    initial_state = _check_state("initial_state", initial_state, _state_shape(q, v, cu_seqlens))
    try:
        scale = float(key_dim**-0.5 if scale is None else scale)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"scale must be a Python number (static), got {scale!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return initial_state, cu_seqlens, scale


def check_arguments(q, k, v, g, initial_state=None, cu_seqlens=None) -> None:
    """The checks both ops make on their arrays, alone: for callers that split the arrays
    before the op sees them (``gla_jax.ops`` under a mesh), so that an error names the whole
    arrays' shapes and a concrete ``cu_seqlens``' values rather than a shard's."""
    _prepare(q, k, v, g, initial_state, cu_seqlens, None)


def _resolve_backend(backend, q, v, opts_without_backend) -> str:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend is None:
        platform = jax.default_backend()
        candidate = _AUTO.get(platform)
        if candidate is None:
            return "xla"
        try:
            impl = _load_backend(candidate)
            opts = dataclasses.replace(opts_without_backend, backend=candidate)
            reason = impl.supports(q.shape, v.shape, q.dtype, opts)
        except NotImplementedError as err:
            reason = str(err)
        if reason is None:
            return candidate
        log.info("chunk_gla: %s cannot take this call (%s); using 'xla'", candidate, reason)
        return "xla"
    impl = _load_backend(backend)
    opts = dataclasses.replace(opts_without_backend, backend=backend)
    reason = impl.supports(q.shape, v.shape, q.dtype, opts)
    if reason is not None:
        raise NotImplementedError(f"backend={backend!r} cannot take this call: {reason}")
    return backend


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def chunk_gla(
    q,
    k,
    v,
    g,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    backend=None,
    interpret=False,
    keep_states=False,
):
    """Gated linear attention over whole sequences, chunk by chunk.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; g is the log forget gate (<= 0) per key dimension;
    -inf (a hard reset) and other gates below ``gates.GATE_FLOOR`` (-100) are computed as -100
    (``gates.py`` says why).
    Returns (o [B, T, H, V] in q's dtype, final_state [N, H, K, V] float32 or None).
    ``keep_states``: the backward reuses the forward's chunk states instead of recomputing them
    ('pallas_gpu'; the module docstring says what it costs).
    """
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    initial_state, cu_seqlens, scale = _prepare(q, k, v, g, initial_state, cu_seqlens, scale)
    opts = Options(
        backend="",
        scale=scale,
        chunk_size=int(chunk_size),
        interpret=bool(interpret),
        keep_states=bool(keep_states),
        output_final_state=bool(output_final_state),
    )
    opts = dataclasses.replace(opts, backend=_resolve_backend(backend, q, v, opts))
    return _gla(opts, q, k, v, g, initial_state, cu_seqlens)


def fused_recurrent_gla(
    q,
    k,
    v,
    g,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
):
    """The step form (decoding): the float32 recurrence, for small T (usually 1).

    Same shapes and return values as ``chunk_gla``.
    """
    initial_state, cu_seqlens, scale = _prepare(q, k, v, g, initial_state, cu_seqlens, scale)
    o, final_state = reference.recurrent_gla(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=_state_or_zeros(initial_state, q, v, cu_seqlens),
        cu_seqlens=cu_seqlens,
    )
    return o.astype(q.dtype), (final_state if output_final_state else None)
