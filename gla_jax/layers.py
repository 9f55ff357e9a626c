"""Flax NNX layers: norms, the SwiGLU MLP, gated linear attention and causal softmax attention.

Every token mixer has the same three entry points:

* ``__call__(x, segment_ids=None)``: the parallel (training) form over [B, T, d];
* ``prefill(x, lengths, cache)``: the parallel form over right-padded prompts that also returns the
  layer's cache after each row's ``lengths[b]`` tokens;
* ``decode(x_t, positions, cache)``: one token per row, [B, d], in the recurrent form.

Parameters are float32 and carry logical axis names (see ``gla_jax/model.py``); computation runs in
``dtype``. Normalizations, gates and softmax are computed in float32 regardless.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gla_jax.ops import DEFAULT_CHUNK_SIZE, chunk_gla, fused_recurrent_gla


def param_init(std: float, names: tuple[str, ...]):
    """normal(std) carrying logical axis names; placement is left to the trainer's mesh rules."""
    return nnx.with_partitioning(nnx.initializers.normal(std), names, eager_sharding=False)


def dense(d_in, d_out, names, *, std, dtype, rngs, use_bias=False, bias_value=0.0):
    bias_init = nnx.with_partitioning(
        nnx.initializers.constant(bias_value), names[-1:], eager_sharding=False
    )
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        kernel_init=param_init(std, names),
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


# --------------------------------------------------------------------------------------------
# Normalization and MLP
# --------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """RMS normalization over the last axis, computed in float32, returned in ``dtype``."""

    def __init__(self, dim: int, *, eps: float, dtype, axis_name: str = "norm"):
        ones = nnx.with_partitioning(nnx.initializers.ones, (axis_name,), eager_sharding=False)
        self.scale = nnx.Param(ones(jax.random.key(0), (dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        # Rematerialized: the backward recomputes the float32 values from x instead of keeping
        # two float32 copies of the input per norm (stacked over the layers under scan_layers).
        return jax.checkpoint(self._normalize)(x, self.scale[...])

    def _normalize(self, x, scale):
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm (with bias) over the last axis, float32 inside: the paper's per-head norm."""

    def __init__(self, dim: int, *, eps: float, dtype, axis_name: str = "norm"):
        ones = nnx.with_partitioning(nnx.initializers.ones, (axis_name,), eager_sharding=False)
        zeros = nnx.with_partitioning(nnx.initializers.zeros, (axis_name,), eager_sharding=False)
        self.scale = nnx.Param(ones(jax.random.key(0), (dim,), jnp.float32))
        self.bias = nnx.Param(zeros(jax.random.key(0), (dim,), jnp.float32))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...] + self.bias[...]).astype(self.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int, *, std: float, out_std: float, dtype, rngs):
        self.gate_proj = dense(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.up_proj = dense(d_model, hidden, ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.down_proj = dense(
            hidden, d_model, ("mlp", "embed"), std=out_std, dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        # Rematerialized with the down projection: the backward keeps the two projections and
        # redoes silu and the product, the down projection's input. Stored, those were four more
        # [B, T, hidden] tensors per layer, each stacked over the layers and copied under
        # scan_layers.
        return jax.checkpoint(self._down_of_swish)(self.gate_proj(x), self.up_proj(x))

    def _down_of_swish(self, gate, up):
        return self.down_proj(jax.nn.silu(gate) * up)


# --------------------------------------------------------------------------------------------
# Segments: packed documents inside a row
# --------------------------------------------------------------------------------------------


def segment_starts(segment_ids):
    """[B, T] bool: the token begins a document (the first token of a row always does)."""
    first = jnp.ones_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def segment_positions(segment_ids):
    """[B, T] int32: each token's position inside its own document (RoPE restarts per document)."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), index, 0), axis=1)
    return (index - start).astype(jnp.int32)


def check_document_count(segment_ids, max_segments_per_row: int) -> int:
    """The slots a row gets (``max_segments_per_row``, at most T); raises if a concrete batch has
    a row of more documents. Traced ids cannot be counted: a model checks its concrete input
    before its blocks run, since a scan or remat over the blocks traces them."""
    slots = max(1, min(max_segments_per_row, segment_ids.shape[1]))
    try:
        count = int(jnp.max(jnp.sum(segment_starts(segment_ids), axis=1)))
    except jax.errors.ConcretizationTypeError:
        return slots
    if count > slots:
        raise ValueError(
            f"segment_ids: a row holds {count} documents but max_segments_per_row = {slots}; "
            f"raise max_segments_per_row (segment_ids shape {segment_ids.shape})"
        )
    return slots


def check_gate_and_conv(gate_logit_normalizer, use_short_conv: bool, conv_size: int) -> None:
    """A normalizer <= 0 gives log gates >= 0 (states that grow) or -inf (erased states)."""
    if not gate_logit_normalizer > 0:
        raise ValueError(f"gate_logit_normalizer must be > 0, got {gate_logit_normalizer}")
    if use_short_conv and int(conv_size) < 1:
        raise ValueError(f"conv_size must be >= 1 with use_short_conv, got {conv_size}")


def packed_cu_seqlens(segment_ids, max_segments_per_row: int):
    """Per-row segments -> ``cu_seqlens`` over the batch flattened into one row of B*T tokens.

    The count must be static: every row gets ``max_segments_per_row`` slots, and unused slots
    become empty sequences (repeated offsets). Row starts are always kept, so rows never share
    state; if a traced row has more documents than slots, the excess documents of the batch merge
    into their predecessors (a concrete batch raises instead).
    """
    batch, seq_len = segment_ids.shape
    slots = check_document_count(segment_ids, max_segments_per_row)
    total = batch * seq_len
    inner = segment_starts(segment_ids).at[:, 0].set(False).reshape(-1)
    (inner_starts,) = jnp.nonzero(inner, size=batch * (slots - 1), fill_value=total)
    row_starts = jnp.arange(batch, dtype=jnp.int32) * seq_len
    offsets = jnp.sort(jnp.concatenate([row_starts, inner_starts.astype(jnp.int32)]))
    return jnp.concatenate([offsets, jnp.full((1,), total, jnp.int32)])


# A log gate whose exp underflows to exactly 0 in float32 (below log(1.4e-45) = -103.3): placed at
# a document's first token it erases the carried state, so a row of packed documents computes each
# document as if alone. It stays within the range of gates the op's chunked forms are built for
# (strong gates reach ~-10 per step, hundreds per chunk), and it keeps rows independent, so under a
# mesh the op still splits rows across devices (one packed cu_seqlens row cannot be split).
RESET_LOG_GATE = -120.0

PACKING_MODES = ("gate_reset", "cu_seqlens")


def reset_gates_at_starts(log_gate, segment_ids):
    """[B, T, K] log gates with every document's first token set to RESET_LOG_GATE."""
    starts = segment_starts(segment_ids)[..., None]
    return jnp.where(starts, jnp.asarray(RESET_LOG_GATE, log_gate.dtype), log_gate)


def prompt_cu_seqlens(lengths, seq_len: int):
    """Right-padded prompts as 2B packed sequences: (prompt b, padding b) for each row."""
    row_starts = jnp.arange(lengths.shape[0], dtype=jnp.int32) * seq_len
    bounds = jnp.stack([row_starts, row_starts + lengths.astype(jnp.int32)], axis=1).reshape(-1)
    return jnp.concatenate([bounds, jnp.full((1,), lengths.shape[0] * seq_len, jnp.int32)])


# --------------------------------------------------------------------------------------------
# Short causal convolution (optional, on q/k/v)
# --------------------------------------------------------------------------------------------


class ShortConv(nnx.Module):
    """Depthwise causal convolution followed by SiLU; taps never cross a document boundary."""

    def __init__(self, dim: int, size: int, *, std: float, dtype, rngs):
        init = param_init(std, ("conv", "heads"))
        self.kernel = nnx.Param(init(rngs.params(), (size, dim), jnp.float32))
        self.size = size
        self.dtype = dtype

    def __call__(self, x, segment_ids=None):
        """x: [B, T, D]. Tap i (0 = current token) reads x[t - i] when it is in t's document."""
        kernel = self.kernel[...].astype(self.dtype)
        out = x * kernel[self.size - 1]
        for lag in range(1, self.size):
            shifted = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, : x.shape[1]]
            if segment_ids is not None:
                seg_shifted = jnp.pad(segment_ids, ((0, 0), (lag, 0)), constant_values=-1)
                same = seg_shifted[:, : x.shape[1]] == segment_ids
                shifted = jnp.where(same[..., None], shifted, 0)
            out = out + shifted * kernel[self.size - 1 - lag]
        return jax.nn.silu(out)

    def step(self, x_t, history):
        """x_t: [B, D]; history: [B, size - 1, D] float32, the previous inputs, oldest first."""
        window = jnp.concatenate([history, x_t[:, None].astype(jnp.float32)], axis=1)
        out = jnp.einsum("bwd,wd->bd", window, self.kernel[...])
        return jax.nn.silu(out).astype(self.dtype), window[:, 1:]


def last_inputs(x, lengths, count: int):
    """The ``count`` inputs before position lengths[b] of each row, zero before the row's start."""
    index = lengths[:, None] - count + jnp.arange(count)[None, :]  # [B, count]
    taken = jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1)[..., None], axis=1)
    return jnp.where((index >= 0)[..., None], taken, 0).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Gated linear attention
# --------------------------------------------------------------------------------------------


class GLACache(NamedTuple):
    state: jax.Array  # [B, H, K, V] float32 recurrent state
    conv: tuple[jax.Array, ...] | None  # (q, k, v) histories [B, conv_size - 1, D] float32


class GatedLinearAttention(nnx.Module):
    """The GLA token mixer: data-dependent per-key-dimension decay, matrix-valued state.

    The forget gate is low rank: logsigmoid(x W1 W2 + b) / gate_logit_normalizer, so that decays
    start close to 1 and the state remembers long contexts from the first step of training;
    ``gate_bias_init`` (b's initial value, 0 in the paper) starts them closer still.
    ``use_forget_gate=False`` fixes the decay at 1 (plain linear attention, the ablation).
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        gate_bias_init: float = 0.0,
        use_output_gate: bool = True,
        use_forget_gate: bool = True,
        head_norm: str = "rmsnorm",
        norm_eps: float = 1e-6,
        use_short_conv: bool = False,
        conv_size: int = 4,
        backend: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        keep_chunk_states: bool = False,
        packing: str = "gate_reset",
        max_segments_per_row: int = 16,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        for name, dim in (("key dim (d_model * expand_k)", key_dim), ("value dim", value_dim)):
            if dim % num_heads:
                raise ValueError(f"GLA {name} = {dim} must divide by num_heads = {num_heads}")
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
        if head_norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"head_norm must be 'rmsnorm' or 'layernorm', got {head_norm!r}")
        check_gate_and_conv(gate_logit_normalizer, use_short_conv, conv_size)
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.head_k, self.head_v = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.use_output_gate = use_output_gate
        self.backend, self.chunk_size = backend, chunk_size
        self.keep_chunk_states = keep_chunk_states
        self.packing, self.max_segments_per_row = packing, max_segments_per_row
        self.dtype = dtype
        out_std = init_std if out_init_std is None else out_init_std
        proj = dict(std=init_std, dtype=dtype, rngs=rngs)
        self.q_proj = dense(d_model, key_dim, ("embed", "heads"), **proj)
        self.k_proj = dense(d_model, key_dim, ("embed", "heads"), **proj)
        self.v_proj = dense(d_model, value_dim, ("embed", "heads"), **proj)
        gate = use_forget_gate  # without it the decay is fixed at 1: no gate parameters
        self.gk_down = (
            dense(d_model, gate_low_rank_dim, ("embed", "gate_rank"), **proj) if gate else None
        )
        # The initial decay per step is sigmoid(gate_bias_init) ** (1 / normalizer): 0.958 at 0
        # (the paper's GLA), whose state keeps ~2e-4 of a key 200 tokens back.
        self.gk_up = (
            dense(
                gate_low_rank_dim,
                key_dim,
                ("gate_rank", "heads"),
                use_bias=True,
                bias_value=gate_bias_init,
                **proj,
            )
            if gate
            else None
        )
        self.g_proj = (
            dense(d_model, value_dim, ("embed", "heads"), **proj) if use_output_gate else None
        )
        norm_cls = RMSNorm if head_norm == "rmsnorm" else LayerNorm
        self.g_norm = norm_cls(self.head_v, eps=norm_eps, dtype=jnp.float32, axis_name="kv")
        self.o_proj = dense(
            value_dim, d_model, ("heads", "embed"), std=out_std, dtype=dtype, rngs=rngs
        )
        conv = dict(std=init_std, dtype=dtype, rngs=rngs)
        self.conv = (
            nnx.List([ShortConv(dim, conv_size, **conv) for dim in (key_dim, key_dim, value_dim)])
            if use_short_conv
            else None
        )
        self.conv_size = conv_size

    # -- pieces shared by every form -------------------------------------------------------

    def _projections(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _log_gate(self, x, reset_at=None):
        """float32 log gates [..., K]; reset_at: segment ids whose document starts get
        RESET_LOG_GATE. Rematerialized from x: the low-rank matmuls, the log-sigmoid and the
        reset are cheap to redo, and stored they were four [B, T, K] tensors per layer."""
        return jax.checkpoint(self._log_gate_from)(x, reset_at)

    def _log_gate_from(self, x, reset_at):
        if self.gk_up is None:  # no forget gate: decay exactly 1 (documents still reset)
            g = jnp.zeros(x.shape[:-1] + (self.key_dim,), jnp.float32)
        else:
            logits = self.gk_up(self.gk_down(x)).astype(jnp.float32)
            g = jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer
        return g if reset_at is None else reset_gates_at_starts(g, reset_at)

    def _heads(self, x, head_dim):
        return x.reshape(x.shape[:-1] + (self.num_heads, head_dim))

    def _output(self, o, x):
        """Per-head norm, output gate swish(x W_r), output projection. o: [..., H, V]."""
        gate = self.g_proj(x) if self.g_proj is not None else None
        # Rematerialized with the output projection: the backward keeps o and the gate's
        # projection (in the model dtype) and redoes the float32 norm and swish and the gated
        # output, the projection's input; stored, those were five float32 [B, T, V] tensors and
        # one more in the model dtype.
        return jax.checkpoint(self._project_output)(o, gate)

    def _project_output(self, o, gate):
        return self.o_proj(self._norm_and_gate(o, gate))

    def _norm_and_gate(self, o, gate):
        o = self.g_norm(o).reshape(o.shape[:-2] + (self.value_dim,))
        if gate is not None:
            o = o * jax.nn.silu(gate.astype(jnp.float32))
        return o.astype(self.dtype)

    def _mix(self, x, q, k, v, cu_seqlens=None, want_state=False, reset_at=None):
        """chunk_gla over [B, T, *] (or packed: then the batch is flattened into one row).

        reset_at: segment ids whose document starts restart the state (gate_reset packing).
        """
        g = self._log_gate(x, reset_at)
        q, k, g = (self._heads(t, self.head_k) for t in (q, k, g))
        v = self._heads(v, self.head_v)
        shape = v.shape
        if cu_seqlens is not None:
            q, k, v, g = (t.reshape((1, -1) + t.shape[2:]) for t in (q, k, v, g))
        o, state = chunk_gla(
            q,
            k,
            v,
            g,
            cu_seqlens=cu_seqlens,
            output_final_state=want_state,
            chunk_size=self.chunk_size,
            backend=self.backend,
            keep_states=self.keep_chunk_states,
        )
        return o.reshape(shape), state

    # -- the three forms --------------------------------------------------------------------

    def __call__(self, x, segment_ids=None):
        q, k, v = self._projections(x)
        if self.conv is not None:
            q, k, v = (conv(t, segment_ids) for conv, t in zip(self.conv, (q, k, v), strict=True))
        if segment_ids is None:
            o, _ = self._mix(x, q, k, v)
        elif self.packing == "gate_reset":
            o, _ = self._mix(x, q, k, v, reset_at=segment_ids)
        else:
            cu_seqlens = packed_cu_seqlens(segment_ids, self.max_segments_per_row)
            o, _ = self._mix(x, q, k, v, cu_seqlens)
        return self._output(o, x)

    def init_cache(self, batch_size: int) -> GLACache:
        state = jnp.zeros((batch_size, self.num_heads, self.head_k, self.head_v), jnp.float32)
        conv = None
        if self.conv is not None:
            conv = tuple(
                jnp.zeros((batch_size, self.conv_size - 1, dim), jnp.float32)
                for dim in (self.key_dim, self.key_dim, self.value_dim)
            )
        return GLACache(state, conv)

    def prefill(self, x, lengths, cache: GLACache):
        """Right-padded prompts [B, T, d]; row b's cache is taken after its lengths[b] tokens.

        Starts from an empty state (``cache`` only fixes the structure).
        """
        del cache
        seq_len = x.shape[1]
        raw = self._projections(x)
        q, k, v = raw
        conv_state = None
        if self.conv is not None:
            q, k, v = (conv(t) for conv, t in zip(self.conv, raw, strict=True))
            conv_state = tuple(last_inputs(t, lengths, self.conv_size - 1) for t in raw)
        cu_seqlens = prompt_cu_seqlens(lengths, seq_len)
        o, states = self._mix(x, q, k, v, cu_seqlens, want_state=True)
        return self._output(o, x), GLACache(states[0::2], conv_state)

    def decode(self, x_t, positions, cache: GLACache):
        """One token per row: x_t [B, d] -> ([B, d], cache). ``positions`` is unused (no RoPE)."""
        del positions
        q, k, v = self._projections(x_t)
        conv_state = None
        if self.conv is not None:
            pairs = [
                conv.step(t, h) for conv, t, h in zip(self.conv, (q, k, v), cache.conv, strict=True)
            ]
            (q, k, v), conv_state = zip(*pairs, strict=True)
            conv_state = tuple(conv_state)
        g = self._log_gate(x_t)
        q, k, g = (self._heads(t, self.head_k)[:, None] for t in (q, k, g))
        v = self._heads(v, self.head_v)[:, None]
        o, state = fused_recurrent_gla(
            q, k, v, g, initial_state=cache.state, output_final_state=True
        )
        return self._output(o[:, 0], x_t), GLACache(state, conv_state)


# --------------------------------------------------------------------------------------------
# Causal softmax attention with RoPE (the Transformer++ mixer)
# --------------------------------------------------------------------------------------------


class AttentionCache(NamedTuple):
    k: jax.Array  # [B, max_len, H, D] keys after RoPE
    v: jax.Array  # [B, max_len, H, D]


def rope(x, positions, theta: float):
    """Rotary embedding (rotate-half form). x: [B, T, H, D]; positions: [B, T]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # [B, T, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_implementation(dtype, head_dim: int, seq_len: int = 2, masked: bool = False) -> str:
    """cuDNN's fused attention on GPU where it applies, else XLA's.

    cuDNN needs half precision and a head dim <= 128 (a multiple of 8); a segment mask reaches it
    as a bias, which its backward accepts only for even sequence lengths.
    """
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    shape_ok = head_dim <= 128 and head_dim % 8 == 0 and not (masked and seq_len % 2)
    return "cudnn" if on_gpu and half and shape_ok else "xla"


class CausalSelfAttention(nnx.Module):
    """Multi-head causal softmax attention with rotary positions and a KV cache."""

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int,
        rope_theta: float = 10000.0,
        init_std: float = 0.02,
        out_init_std: float | None = None,
        dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads:
            raise ValueError(f"d_model = {d_model} must divide by n_heads = {num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(
                f"RoPE needs an even head dim, got d_model / n_heads = {self.head_dim}"
            )
        self.rope_theta, self.dtype = rope_theta, dtype
        out_std = init_std if out_init_std is None else out_init_std
        proj = dict(std=init_std, dtype=dtype, rngs=rngs)
        self.q_proj = dense(d_model, d_model, ("embed", "heads"), **proj)
        self.k_proj = dense(d_model, d_model, ("embed", "heads"), **proj)
        self.v_proj = dense(d_model, d_model, ("embed", "heads"), **proj)
        self.o_proj = dense(
            d_model, d_model, ("heads", "embed"), std=out_std, dtype=dtype, rngs=rngs
        )

    def _qkv(self, x, positions):
        shape = x.shape[:-1] + (self.num_heads, self.head_dim)
        q, k, v = (p(x).reshape(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def _attend(self, q, k, v, segment_ids):
        mask = None
        if segment_ids is not None:
            # Documents are counted, not compared by id: a document starts wherever the id
            # changes (as for GLA and RoPE), so a repeated id later in the row is a new one.
            docs = jnp.cumsum(segment_starts(segment_ids), axis=1)
            mask = (docs[:, None, :, None] == docs[:, None, None, :]) & jnp.tril(
                jnp.ones((q.shape[1], q.shape[1]), bool)
            )
        impl = attention_implementation(q.dtype, self.head_dim, q.shape[1], mask is not None)
        o = jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=mask is None, implementation=impl
        )
        return self.o_proj(o.reshape(o.shape[:-2] + (-1,)))

    def __call__(self, x, segment_ids=None):
        if segment_ids is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        else:
            positions = segment_positions(segment_ids)
        q, k, v = self._qkv(x, positions)
        return self._attend(q, k, v, segment_ids)

    def init_cache(self, batch_size: int, max_len: int) -> AttentionCache:
        shape = (batch_size, max_len, self.num_heads, self.head_dim)
        return AttentionCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def prefill(self, x, lengths, cache: AttentionCache):
        """Right-padded prompts: keys and values of all T positions go into cache[:, :T]."""
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        q, k, v = self._qkv(x, positions)
        # Padding tokens form their own segment, so prompt tokens never see them.
        valid = (positions < lengths[:, None]).astype(jnp.int32)
        out = self._attend(q, k, v, valid)
        k_cache = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, 0, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, 0, 0, 0))
        return out, AttentionCache(k_cache, v_cache)

    def decode(self, x_t, positions, cache: AttentionCache):
        """x_t: [B, d]; positions: [B], the slot (= number of tokens seen) of each row."""
        q, k, v = self._qkv(x_t[:, None], positions[:, None])
        rows = jnp.arange(x_t.shape[0])
        k_cache = cache.k.at[rows, positions].set(k[:, 0].astype(cache.k.dtype))
        v_cache = cache.v.at[rows, positions].set(v[:, 0].astype(cache.v.dtype))
        scores = jnp.einsum(
            "bhd,bshd->bhs", q[:, 0].astype(jnp.float32), k_cache.astype(jnp.float32)
        ) / math.sqrt(self.head_dim)
        visible = jnp.arange(k_cache.shape[1])[None, :] <= positions[:, None]  # [B, S]
        scores = jnp.where(visible[:, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhs,bshd->bhd", probs, v_cache.astype(jnp.float32))
        # A row past the cache had its write dropped: it gets NaN, not attention over stale slots
        # (the model refuses such positions only when they are concrete, not under jit).
        o = jnp.where((positions < k_cache.shape[1])[:, None, None], o, jnp.nan).astype(self.dtype)
        return self.o_proj(o.reshape(o.shape[0], -1)), AttentionCache(k_cache, v_cache)
