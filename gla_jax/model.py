"""GLA Transformer and Transformer++ language models (Flax NNX), with recurrent decoding.

One block for both: pre-norm RMSNorm -> token mixer -> residual -> RMSNorm -> SwiGLU -> residual.
The mixer is ``GatedLinearAttention`` (``mixer='gla'``, no positional embedding) or causal softmax
attention with RoPE (``mixer='attention'``, the Transformer++ baseline).

    cfg = GLAConfig(vocab_size=32000, d_model=1024, n_layers=24, n_heads=4, tie_embeddings=True)
    model = GLALM(cfg, rngs=nnx.Rngs(0))
    logits = model(tokens, segment_ids=None)             # [B, T] int -> [B, T, vocab] float32
    cache = model.init_cache(batch_size)                 # ModelCache of per-layer NamedTuples
    logits_t, cache = model.decode_step(tokens_t, cache) # [B] -> [B, vocab]
    logits, cache = model.prefill(tokens, lengths)       # right-padded prompts, then decode_step

``segment_ids`` [B, T] int32 marks packed documents: 1, 2, ... per document within a row, 0 for
padding. Tokens attend to (attention) or receive state from (GLA) only their own document; RoPE
positions restart at each document. Padding forms its own segment and its outputs are meaningless.
A new document starts wherever the id changes along the row. GLA separates documents in one of two
ways (``packing``): 'gate_reset' (default) gives each document's first token a forget gate of
exactly zero, so rows stay independent and shard over the mesh's batch axes; 'cu_seqlens' hands
the op the documents as packed sequences of one flattened row (static bound
``max_segments_per_row``, rows not split across devices).

Logical axis names carried by the parameters (the trainer maps them onto its mesh):
  'vocab'      vocabulary rows of the embedding (and untied LM head columns)
  'embed'      the model width d_model
  'heads'      a flattened (heads x head dim) projection axis: q, k, v, output gate, o_proj input,
               the forget gate's output, short-conv channels
  'kv'         the per-head value dim (the shared per-head norm scale)
  'mlp'        the SwiGLU hidden axis
  'gate_rank'  the forget gate's low-rank dim (16)
  'conv'       short-convolution taps
  'norm'       RMSNorm scales over d_model
  'layers'     the leading axis of the stacked blocks (``scan_layers``); never sharded

``scan_layers=True`` builds the blocks once, with every parameter stacked on a leading 'layers'
axis, and applies them with a scan (gla_jax/layer_stack.py): XLA then compiles one block, not
n_layers copies of every fusion and kernel call, so a 24-layer model's first step compiles in a
fraction of the time. The caches are stacked the same way (one GLACache or AttentionCache whose
arrays lead with the layer axis). The parameter tree differs from the unrolled one
('blocks/attn/...' of shape [L, ...] instead of 'blocks/0/attn/...');
``layer_stack.stack_layer_params`` / ``unstack_layer_params`` convert between the layouts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gla_jax.layer_stack import (
    apply_stacked,
    apply_unrolled,
    layer_slice_shapes,
    repeat_layers,
    stacked_modules,
)
from gla_jax.layers import (
    PACKING_MODES,
    AttentionCache,
    CausalSelfAttention,
    GatedLinearAttention,
    GLACache,
    RMSNorm,
    SwiGLU,
    check_document_count,
    check_gate_and_conv,
)
from gla_jax.ops import DEFAULT_CHUNK_SIZE

MIXERS = ("gla", "attention")


@dataclasses.dataclass(frozen=True)
class GLAConfig:
    """Model hyper-parameters; everything but the four sizes defaults to the paper's choices."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    mixer: str = "gla"  # 'gla' | 'attention' (Transformer++)
    # GLA layer
    expand_k: float = 0.5
    expand_v: float = 1.0
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: float = 16.0
    gate_bias_init: float = 0.0  # the forget gate's initial bias (0: the paper's GLA)
    use_output_gate: bool = True
    use_forget_gate: bool = True  # False: plain linear attention (ablation)
    head_norm: str = "rmsnorm"  # 'rmsnorm' | 'layernorm' (as the paper wrote)
    use_short_conv: bool = False
    conv_size: int = 4
    backend: str | None = None  # chunk_gla backend; None = chosen by platform
    chunk_size: int = DEFAULT_CHUNK_SIZE
    # chunk_gla's keep_states: the backward reads the forward's chunk states instead of walking
    # them again (pallas_gpu: ~9-12% of the op's forward+backward), holding them from each
    # layer's forward to its backward (with remat, only inside the rematerialized block).
    keep_chunk_states: bool = False
    packing: str = "gate_reset"  # GLA with segment_ids: 'gate_reset' | 'cu_seqlens' (layers.py)
    max_segments_per_row: int = 16  # static bound on documents per row, 'cu_seqlens' only
    # Attention layer
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # default KV-cache length
    # Shared
    hidden_ratio: float = 4.0
    intermediate_size: int | None = None  # None: 2/3 * hidden_ratio * d, rounded up to 256
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "bfloat16"  # computation dtype; parameters are always float32
    remat: bool = False
    scan_layers: bool = False  # stack the blocks on a 'layers' axis and scan (module doc)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model = {self.d_model} must divide by n_heads = {self.n_heads}")
        if self.mixer == "gla":
            for name, ratio in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
                dim = int(self.d_model * ratio)
                if dim < self.n_heads or dim % self.n_heads:
                    raise ValueError(
                        f"d_model * {name} = {self.d_model} * {ratio} = {dim} must divide by "
                        f"n_heads = {self.n_heads}"
                    )
            check_gate_and_conv(self.gate_logit_normalizer, self.use_short_conv, self.conv_size)
        if self.packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {PACKING_MODES}, got {self.packing!r}")
        jnp.dtype(self.dtype)  # raises on an unknown name

    @property
    def mlp_hidden(self) -> int:
        if self.intermediate_size is not None:
            return int(self.intermediate_size)
        hidden = int(self.d_model * self.hidden_ratio * 2 / 3)
        return 256 * math.ceil(hidden / 256)


def TransformerConfig(**kwargs) -> GLAConfig:  # noqa: N802 - reads as a config class
    """The Transformer++ baseline's config: a GLAConfig with ``mixer='attention'``."""
    return GLAConfig(**{"mixer": "attention", **kwargs})


class ModelCache(NamedTuple):
    # One GLACache or AttentionCache per block; with scan_layers, one whose arrays stack the
    # blocks' caches on a leading [n_layers] axis.
    layers: tuple | GLACache | AttentionCache
    positions: jax.Array  # [B] int32: tokens seen so far by each row


# --------------------------------------------------------------------------------------------
# Blocks and the model
# --------------------------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, cfg: GLAConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # residual outputs, scaled by depth
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        if cfg.mixer == "gla":
            self.attn = GatedLinearAttention(
                cfg.d_model,
                num_heads=cfg.n_heads,
                expand_k=cfg.expand_k,
                expand_v=cfg.expand_v,
                gate_low_rank_dim=cfg.gate_low_rank_dim,
                gate_logit_normalizer=cfg.gate_logit_normalizer,
                gate_bias_init=cfg.gate_bias_init,
                use_output_gate=cfg.use_output_gate,
                use_forget_gate=cfg.use_forget_gate,
                head_norm=cfg.head_norm,
                norm_eps=cfg.norm_eps,
                use_short_conv=cfg.use_short_conv,
                conv_size=cfg.conv_size,
                backend=cfg.backend,
                chunk_size=cfg.chunk_size,
                keep_chunk_states=cfg.keep_chunk_states,
                packing=cfg.packing,
                max_segments_per_row=cfg.max_segments_per_row,
                init_std=cfg.init_std,
                out_init_std=out_std,
                dtype=dtype,
                rngs=rngs,
            )
        else:
            self.attn = CausalSelfAttention(
                cfg.d_model,
                num_heads=cfg.n_heads,
                rope_theta=cfg.rope_theta,
                init_std=cfg.init_std,
                out_init_std=out_std,
                dtype=dtype,
                rngs=rngs,
            )
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = SwiGLU(
            cfg.d_model, cfg.mlp_hidden, std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs
        )

    def _finish(self, x, mixed):
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x))

    def __call__(self, x, segment_ids=None):
        return self._finish(x, self.attn(self.attn_norm(x), segment_ids))

    def prefill(self, x, lengths, cache):
        mixed, cache = self.attn.prefill(self.attn_norm(x), lengths, cache)
        return self._finish(x, mixed), cache

    def decode(self, x_t, positions, cache):
        mixed, cache = self.attn.decode(self.attn_norm(x_t), positions, cache)
        return self._finish(x_t, mixed), cache


def _run_block(block, x, segment_ids):
    return block(x, segment_ids)


_run_block_remat = nnx.remat(_run_block)


def _forward_step(run_block):
    return lambda block, x, _, segment_ids: (run_block(block, x, segment_ids), None)


def _prefill_step(block, x, cache, lengths):
    return block.prefill(x, lengths, cache)


def _decode_step(block, x, cache, positions):
    return block.decode(x, positions, cache)


def _layer_cache(mixer, batch_size: int, max_len: int | None):
    """One block's empty cache; max_len sizes attention's KV buffers (GLA's state has one size)."""
    if isinstance(mixer, GatedLinearAttention):
        return mixer.init_cache(batch_size)
    return mixer.init_cache(batch_size, max_len)


def _concrete(x):
    """x as a numpy array, or None while tracing."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


class GLALM(nnx.Module):
    """Embedding, blocks, final RMSNorm, LM head (tied or untied). The mixer is ``cfg.mixer``."""

    def __init__(self, cfg: GLAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        embed_init = nnx.with_partitioning(
            nnx.initializers.normal(cfg.init_std), ("vocab", "embed"), eager_sharding=False
        )
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=embed_init,
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        if cfg.scan_layers:
            self.blocks = stacked_modules(lambda r: Block(cfg, rngs=r), cfg.n_layers, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype)
        head_init = nnx.with_partitioning(
            nnx.initializers.normal(cfg.init_std), ("embed", "vocab"), eager_sharding=False
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                kernel_init=head_init,
                dtype=dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )
        )

    # -- helpers ------------------------------------------------------------------------------

    def _check_tokens(self, tokens, ndim: int, name: str):
        if getattr(tokens, "ndim", None) != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"{name} must be an integer array with {ndim} dims, got shape "
                f"{getattr(tokens, 'shape', None)} dtype {getattr(tokens, 'dtype', None)}"
            )
        values = _concrete(tokens)
        if values is not None and values.size:
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(
                    f"{name} ids must lie in [0, vocab_size = {self.cfg.vocab_size}), "
                    f"got min {low} max {high} (shape {tokens.shape})"
                )

    def _apply_blocks(self, step, x, per_layer=None, shared=None):
        """(x after every block, per-block outputs), stacked or a tuple as the blocks are."""
        apply = apply_stacked if self.cfg.scan_layers else apply_unrolled
        return apply(step, self.blocks, x, per_layer, shared)

    def _mixers(self) -> list:
        """One token mixer per layer (with scan_layers the stacked one stands for every layer:
        cache shapes depend only on its static sizes)."""
        if self.cfg.scan_layers:
            return [self.blocks.attn] * self.cfg.n_layers
        return [block.attn for block in self.blocks]

    def _embed(self, tokens):
        """Rows of the float32 table, cast after the gather. Casting the table first (what
        ``nnx.Embed`` does) makes the gradient a scatter-add into bfloat16, which GPUs do with
        compare-and-swap loops: with a few frequent ids (bytes, MQAR's filler) those serialize,
        141 ms of a 142 ms step on an H200. A float32 scatter-add is a native atomic."""
        rows = jnp.take(self.embed.embedding[...], tokens, axis=0)
        return rows.astype(self.embed.dtype)

    def _logits(self, x):
        x = self.norm(x)
        if self.lm_head is None:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    # -- forward --------------------------------------------------------------------------------

    def __call__(self, tokens, segment_ids=None):
        """tokens [B, T] int -> logits [B, T, vocab] float32."""
        self._check_tokens(tokens, 2, "tokens")
        if segment_ids is not None:
            if segment_ids.shape != tokens.shape:
                raise ValueError(
                    f"segment_ids must have tokens' shape {tokens.shape}, got {segment_ids.shape}"
                )
            segment_ids = segment_ids.astype(jnp.int32)
            if self.cfg.packing == "cu_seqlens" and self.cfg.mixer == "gla":
                check_document_count(segment_ids, self.cfg.max_segments_per_row)
        run = _run_block_remat if self.cfg.remat else _run_block
        x, _ = self._apply_blocks(_forward_step(run), self._embed(tokens), shared=segment_ids)
        return self._logits(x)

    # -- generation -----------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int | None = None) -> ModelCache:
        """Empty per-layer caches: float32 GLA states (and conv histories), or KV buffers of
        ``max_len`` (default cfg.max_seq_len) positions for attention."""
        max_len = self.cfg.max_seq_len if max_len is None else int(max_len)
        if self.cfg.scan_layers:
            one = _layer_cache(self.blocks.attn, batch_size, max_len)
            layers = repeat_layers(one, self.cfg.n_layers)
        else:
            layers = tuple(_layer_cache(m, batch_size, max_len) for m in self._mixers())
        return ModelCache(layers, jnp.zeros((batch_size,), jnp.int32))

    def _cache_per_layer(self, layers) -> list:
        """The cache's entries layer by layer; a stacked cache gives shape-only views of its
        slices. ValueError when the layout (stacked or not) is not the model's."""
        stacked = isinstance(layers, GLACache | AttentionCache)
        if not self.cfg.scan_layers:
            if stacked or not isinstance(layers, tuple):
                raise ValueError(
                    f"cache.layers must be a tuple of per-layer caches (scan_layers=False), got "
                    f"{type(layers).__name__}: was the cache built for a scan_layers=True model?"
                )
            return list(layers)
        if not stacked:
            raise ValueError(
                f"cache.layers must be one GLACache or AttentionCache stacked over layers "
                f"(scan_layers=True), got {type(layers).__name__}: was the cache built for a "
                "scan_layers=False model?"
            )
        count, one_layer = layer_slice_shapes(layers)
        return [one_layer] * count

    def check_cache(self, cache, batch_size: int):
        """ValueError naming the mismatch when ``cache`` was built for another batch or model."""
        if not isinstance(cache, ModelCache):
            raise ValueError(f"cache must be a ModelCache from init_cache, got {type(cache)}")
        layers = self._cache_per_layer(cache.layers)
        if len(layers) != self.cfg.n_layers:
            raise ValueError(
                f"cache has {len(layers)} layers, the model has n_layers = {self.cfg.n_layers}"
            )
        if cache.positions.shape != (batch_size,):
            raise ValueError(
                f"cache was built for batch size {cache.positions.shape}, tokens have batch "
                f"{batch_size}"
            )
        for i, (mixer, layer) in enumerate(zip(self._mixers(), layers, strict=True)):
            is_gla = isinstance(mixer, GatedLinearAttention)
            expected_type = GLACache if is_gla else AttentionCache
            if not isinstance(layer, expected_type):
                raise ValueError(
                    f"cache.layers[{i}] is a {type(layer).__name__}, the model needs "
                    f"{expected_type.__name__}"
                )
            max_len = None if is_gla else layer.k.shape[1]
            expected = jax.eval_shape(functools.partial(_layer_cache, mixer, batch_size, max_len))
            got = jax.tree.map(lambda x: x.shape, layer)
            want = jax.tree.map(lambda x: x.shape, expected)
            if got != want:
                raise ValueError(f"cache.layers[{i}] has shapes {got}, the model needs {want}")
            positions = _concrete(cache.positions)
            if max_len is not None and positions is not None and positions.max() >= max_len:
                raise ValueError(
                    f"cache is full: positions reach {int(positions.max())} but the KV cache "
                    f"holds max_len = {max_len} tokens (init_cache(batch_size, max_len))"
                )

    def prefill(self, tokens, lengths=None, max_len: int | None = None):
        """Right-padded prompts [B, T] (row b's prompt is tokens[b, :lengths[b]]).

        Returns (logits [B, T, vocab], cache positioned after each prompt). Logits at positions
        >= lengths[b] are meaningless. GLA states come from chunk_gla's final states. Lengths
        outside [0, T] raise, unless they are traced (under jit), where they are not checked.
        """
        self._check_tokens(tokens, 2, "tokens")
        batch, seq_len = tokens.shape
        if lengths is None:
            lengths = jnp.full((batch,), seq_len, jnp.int32)
        lengths = jnp.asarray(lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
        lengths = lengths.astype(jnp.int32)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
        values = _concrete(lengths)  # traced lengths (under jit) cannot be checked here
        if values is not None and ((values < 0) | (values > seq_len)).any():
            raise ValueError(
                f"lengths must lie in [0, T = {seq_len}] (the prompts' padded length), got "
                f"{values.tolist()}"
            )
        max_len = max(seq_len, self.cfg.max_seq_len if max_len is None else int(max_len))
        cache = self.init_cache(batch, max_len)
        x, layers = self._apply_blocks(_prefill_step, self._embed(tokens), cache.layers, lengths)
        return self._logits(x), ModelCache(layers, lengths)

    def decode_step(self, tokens_t, cache: ModelCache):
        """One token per row: tokens_t [B] -> (logits [B, vocab] float32, updated cache)."""
        self._check_tokens(tokens_t, 1, "tokens_t")
        self.check_cache(cache, tokens_t.shape[0])
        x, layers = self._apply_blocks(
            _decode_step, self._embed(tokens_t), cache.layers, cache.positions
        )
        return self._logits(x), ModelCache(layers, cache.positions + 1)


TransformerLM = GLALM  # the same class; the baseline differs only by cfg.mixer = 'attention'


# --------------------------------------------------------------------------------------------
# From ml_collections configs
# --------------------------------------------------------------------------------------------

_TYPE_TO_MIXER = {"gla": "gla", "transformer": "attention"}


def config_from_dict(model_config) -> GLAConfig:
    """A ConfigDict / mapping with ``type`` ('gla' | 'transformer') and GLAConfig fields."""
    fields = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    model_type = fields.pop("type", "gla")
    if model_type not in _TYPE_TO_MIXER:
        raise ValueError(f"model.type must be one of {tuple(_TYPE_TO_MIXER)}, got {model_type!r}")
    known = {f.name for f in dataclasses.fields(GLAConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model config has unknown fields {unknown}; known: {sorted(known)}")
    fields["mixer"] = _TYPE_TO_MIXER[model_type]
    return GLAConfig(**fields)


def build_model(model_config, rngs: nnx.Rngs) -> GLALM:
    """The trainer's factory: a model config (ConfigDict with ``type``) -> GLALM."""
    cfg = model_config if isinstance(model_config, GLAConfig) else config_from_dict(model_config)
    return GLALM(cfg, rngs=rngs)


def count_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
