"""GLALM and Transformer++: decoding, prefill, packing, parameter counts, gradients, errors."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from gla_jax import GLALM, GLAConfig, TransformerConfig, build_model
from gla_jax.model import config_from_dict, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 61

# init_std 0.3: large enough that every layer moves the logits (at 0.02 and d = 32 the GLA
# output is ~1e-6 and a broken mixer would pass a relative-error test unnoticed).
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, dtype="float32", init_std=0.3)
MODELS = {
    "gla": lambda **kw: GLAConfig(**{**SMALL, **kw}),
    "gla_conv": lambda **kw: GLAConfig(**{**SMALL, "use_short_conv": True, **kw}),
    "gla_layernorm": lambda **kw: GLAConfig(**{**SMALL, "head_norm": "layernorm", **kw}),
    "attention": lambda **kw: TransformerConfig(**{**SMALL, **kw}),
}


def _model(name, **kw):
    return GLALM(MODELS[name](**kw), rngs=nnx.Rngs(0))


def _tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# Jitted entry points: eager dispatch of the chunked op costs far more than one compile.
forward = nnx.jit(lambda model, tokens, segment_ids=None: model(tokens, segment_ids=segment_ids))
decode_step = nnx.jit(lambda model, tokens_t, cache: model.decode_step(tokens_t, cache))


def _decode_all(model, tokens, cache):
    outs = []
    for t in range(tokens.shape[1]):
        logits, cache = decode_step(model, tokens[:, t], cache)
        outs.append(logits)
    return jnp.stack(outs, axis=1), cache


@pytest.mark.parametrize("name", list(MODELS))
def test_decoding_token_by_token_equals_parallel_forward(name):
    model = _model(name)
    tokens = _tokens((2, 37))  # not a multiple of the chunk size
    full = forward(model, tokens)
    decoded, cache = _decode_all(model, tokens, model.init_cache(2, max_len=40))
    assert _rel(decoded, full) <= 1e-4
    np.testing.assert_array_equal(cache.positions, [37, 37])
    # The cache matters: restarting from an empty cache at the last step changes the logits.
    fresh, _ = model.decode_step(tokens[:, -1], model.init_cache(2, max_len=40))
    assert _rel(fresh, full[:, -1]) > 1e-2


@pytest.mark.parametrize("name", ["gla", "gla_conv", "attention"])
def test_prefill_then_decode_equals_full_forward(name):
    model = _model(name)
    tokens = _tokens((3, 30), seed=1)
    lengths = jnp.array([30, 11, 1])
    prompt_len = 16
    full = forward(model, tokens)
    prompts = jnp.where(
        jnp.arange(prompt_len) < jnp.minimum(lengths, prompt_len)[:, None],
        tokens[:, :prompt_len],
        0,
    )
    prompt_lengths = jnp.minimum(lengths, prompt_len)
    prefill = nnx.jit(lambda m, t, n: m.prefill(t, n, max_len=48))
    logits, cache = prefill(model, prompts, prompt_lengths)
    for row, n in enumerate(prompt_lengths.tolist()):
        assert _rel(logits[row, :n], full[row, :n]) <= 1e-4
    np.testing.assert_array_equal(cache.positions, prompt_lengths)
    # Continue each row from its own prompt end: row b's next inputs are tokens[b, n_b:].
    outs = []
    for i in range(8):
        index = prompt_lengths + i
        step_tokens = tokens[jnp.arange(3), index]
        step_logits, cache = decode_step(model, step_tokens, cache)
        outs.append(step_logits)
        want = full[jnp.arange(3), index]
        assert _rel(step_logits, want) <= 1e-4, (i, _rel(step_logits, want))


@pytest.mark.parametrize(
    "name, options",
    [
        ("gla", {}),
        ("gla", dict(packing="cu_seqlens", max_segments_per_row=4)),
        ("gla_conv", {}),
        ("attention", {}),
    ],
    ids=["gla_gate_reset", "gla_cu_seqlens", "gla_conv", "attention"],
)
def test_packed_rows_equal_documents_run_separately(name, options):
    model = _model(name, **options)
    lengths_per_row = [[5, 70, 3], [78], [1, 40, 20, 17]]  # ragged, crossing chunk boundaries
    seq_len = 78
    tokens = np.zeros((3, seq_len), np.int32)
    segments = np.zeros((3, seq_len), np.int32)
    docs = []
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for doc_id, n in enumerate(lengths, start=1):
            doc = np.asarray(_tokens((1, n), seed=10 * row + doc_id))[0]
            tokens[row, start : start + n] = doc
            # Ids repeat (1, 2, 1, 2, ...): a document starts wherever the id changes.
            segments[row, start : start + n] = 1 + (doc_id - 1) % 2
            docs.append((row, start, doc))
            start += n
    packed = forward(model, jnp.asarray(tokens), jnp.asarray(segments))
    # Every document alone, right-padded into one batch: causality makes the padding inert.
    alone_tokens = np.zeros((len(docs), seq_len), np.int32)
    for i, (_, _, doc) in enumerate(docs):
        alone_tokens[i, : len(doc)] = doc
    alone = forward(model, jnp.asarray(alone_tokens))
    for i, (row, start, doc) in enumerate(docs):
        assert _rel(packed[row, start : start + len(doc)], alone[i, : len(doc)]) <= 1e-4, i
    # Without segment_ids the later documents see the earlier ones.
    unpacked = forward(model, jnp.asarray(tokens))
    row, start, doc = docs[1]
    assert _rel(unpacked[row, start : start + len(doc)], alone[1, : len(doc)]) > 1e-3


def test_remat_and_bfloat16_compute():
    cfg = MODELS["gla"]()
    model = GLALM(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens((2, 20))
    remat = GLALM(MODELS["gla"](remat=True), rngs=nnx.Rngs(0))
    assert _rel(forward(remat, tokens), forward(model, tokens)) <= 1e-6

    def checkpoints(m):  # at the top level: the layers rematerialize pieces inside either way
        graphdef, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens).sum())(state).jaxpr
        # The primitive's name differs by version: remat2, checkpoint.
        return sum(eqn.primitive.name in ("remat2", "checkpoint") for eqn in jaxpr.eqns)

    # remat: one around each block, and the final norm. Without: each block's five pieces (two
    # norms, the log gates, the head norm with the output gate, the swish) and the final norm.
    assert checkpoints(remat) == cfg.n_layers + 1
    assert checkpoints(model) == 5 * cfg.n_layers + 1
    bf16 = GLALM(MODELS["gla"](dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = forward(bf16, tokens)
    assert out.dtype == jnp.float32
    assert bf16.blocks[0].attn.q_proj.kernel[...].dtype == jnp.float32  # params stay float32
    assert _rel(out, forward(model, tokens)) <= 5e-2


def _scatter_adds(jaxpr):
    """Every scatter-add equation of a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scatter-add":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_scatter_adds(sub))
    return found


@pytest.mark.parametrize("name", ["gla", "attention"])
def test_embedding_gradient_accumulates_in_float32(name):
    """A bfloat16 model's embedding gradient is a float32 scatter-add: in bfloat16 GPUs add with
    compare-and-swap loops, which serialize on frequent ids (a whole step's time on an H200)."""
    model = build_model(MODELS[name](dtype="bfloat16"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = _tokens((2, 20))
    loss = lambda s: nnx.merge(graphdef, s)(tokens).sum()
    scatters = _scatter_adds(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    assert scatters, "the embedding gradient should be a scatter-add"
    assert {eqn.invars[0].aval.dtype for eqn in scatters} == {jnp.dtype(jnp.float32)}
    assert forward(model, tokens).dtype == jnp.float32


@pytest.mark.parametrize(
    "name, target",
    [
        ("gla_340m", 341e6),
        ("gla_1_3b", 1.365e9),
        ("transformer_340m", 341e6),
        ("transformer_1_3b", 1.365e9),
    ],
)
def test_paper_config_parameter_counts(name, target):
    config = configs.load(name)
    assert config.seq_len == 2048
    model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    assert abs(count_params(model) - target) / target <= 0.02, count_params(model)
    expected_type = "gla" if name.startswith("gla") else "transformer"
    assert config.model.type == expected_type
    # Scanned layers compile one block; the 340M configs unroll their 24 for speed.
    assert config.model.scan_layers == (not name.endswith("_340m"))


def test_tiny_config_builds_and_runs():
    config = configs.load("tiny")
    model = build_model(config.model, nnx.Rngs(0))
    assert count_params(model) < 2e6
    assert forward(model, jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, config.model.vocab_size)


def test_every_parameter_has_logical_axis_names():
    model = nnx.eval_shape(lambda: _model("gla_conv", tie_embeddings=False))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]
    names = set()
    for path, spec in flat:
        assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) > 0, path
        names.update(spec)
    assert names == {"vocab", "embed", "heads", "kv", "mlp", "gate_rank", "conv", "norm"}


@pytest.mark.parametrize("name", ["gla_conv", "attention"])
def test_gradients_finite_and_nonzero_for_every_parameter(name):
    model = _model(name, init_std=0.1)
    tokens = _tokens((2, 24))
    segments = jnp.asarray(np.repeat([[1, 2], [1, 1]], 12, axis=1))

    def loss_fn(model):
        logits = model(tokens[:, :-1], segment_ids=segments[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    for path, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), path


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(d_model=30, n_heads=4), ["d_model", "30", "n_heads", "4"]),
        (dict(d_model=24, n_heads=4, expand_k=0.25), ["expand_k", "6", "n_heads"]),
        (dict(mixer="rnn"), ["mixer", "rnn"]),
        (dict(packing="flat"), ["packing", "flat"]),
        (dict(n_layers=0), ["n_layers", "0"]),
    ],
)
def test_config_dimensions_that_do_not_divide_raise(kwargs, words):
    with pytest.raises(ValueError) as err:
        GLAConfig(**{**SMALL, **kwargs})
    for word in words:
        assert word in str(err.value)


def test_token_ids_outside_the_vocabulary_raise():
    model = _model("gla")
    with pytest.raises(ValueError, match=r"vocab_size = 61.*max 61"):
        model(jnp.full((1, 4), VOCAB, jnp.int32))
    with pytest.raises(ValueError, match="min -1"):
        model.decode_step(jnp.array([-1, 0]), model.init_cache(2))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 4), jnp.float32))


def test_cache_for_another_batch_or_model_raises():
    gla, attention = _model("gla"), _model("attention")
    with pytest.raises(ValueError, match=r"batch size \(3,\).*batch 2"):
        gla.decode_step(jnp.zeros((2,), jnp.int32), gla.init_cache(3))
    with pytest.raises(ValueError, match="GLACache.*AttentionCache"):
        attention.decode_step(jnp.zeros((2,), jnp.int32), gla.init_cache(2))
    wider = GLALM(MODELS["gla"](d_model=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"cache.layers\[0\] has shapes"):
        gla.decode_step(jnp.zeros((2,), jnp.int32), wider.init_cache(2))
    full = attention.init_cache(2, max_len=1)._replace(positions=jnp.array([0, 1]))
    with pytest.raises(ValueError, match="cache is full.*max_len = 1"):
        attention.decode_step(jnp.zeros((2,), jnp.int32), full)
    # Under jit the positions are traced: the full row's logits are NaN, the other row's not.
    logits, _ = decode_step(attention, jnp.zeros((2,), jnp.int32), full)
    assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1]))
    deeper = GLALM(MODELS["gla"](n_layers=3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="3 layers.*n_layers = 2"):
        gla.decode_step(jnp.zeros((2,), jnp.int32), deeper.init_cache(2))


@pytest.mark.parametrize("name", ["gla", "attention"])
def test_prefill_lengths_outside_the_prompts_raise(name):
    model = _model(name)
    prompts = jnp.zeros((2, 8), jnp.int32)
    for lengths in ([8, 12], [8, -2]):
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, T = 8\]"):
            model.prefill(prompts, jnp.array(lengths))
    with pytest.raises(ValueError, match="lengths must be integers, got dtype float32"):
        model.prefill(prompts, jnp.array([2.9, 8.0]))


@pytest.mark.parametrize("layout", [dict(), dict(scan_layers=True), dict(remat=True)])
def test_segment_ids_with_too_many_documents_or_wrong_shape_raise(layout):
    """A scan or remat over the blocks traces the ids: the model counts them before."""
    model = _model("gla", packing="cu_seqlens", max_segments_per_row=2, **layout)
    tokens = _tokens((1, 9))
    with pytest.raises(ValueError, match="3 documents.*max_segments_per_row = 2"):
        model(tokens, segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 3, 3, 3]]))
    with pytest.raises(ValueError, match=r"segment_ids.*\(1, 9\).*\(1, 8\)"):
        model(tokens, segment_ids=jnp.ones((1, 8), jnp.int32))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(gate_logit_normalizer=0.0), "gate_logit_normalizer must be > 0, got 0.0"),
        (dict(gate_logit_normalizer=-16.0), "gate_logit_normalizer must be > 0, got -16.0"),
        (dict(use_short_conv=True, conv_size=0), "conv_size must be >= 1 with use_short_conv"),
    ],
)
def test_gla_settings_that_break_the_gates_or_conv_are_refused(fields, message):
    base = dict(vocab_size=8, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match=message):
        GLAConfig(**base, **fields)
    from gla_jax.layers import GatedLinearAttention  # noqa: PLC0415

    with pytest.raises(ValueError, match=message):
        GatedLinearAttention(16, num_heads=2, rngs=nnx.Rngs(0), **fields)


def test_build_model_rejects_unknown_fields_and_types():
    with pytest.raises(ValueError, match="unknown fields.*d_modle"):
        config_from_dict({"type": "gla", "vocab_size": 8, "d_modle": 8, "n_layers": 1})
    with pytest.raises(ValueError, match="model.type.*mamba"):
        config_from_dict({"type": "mamba", "vocab_size": 8, "d_model": 8, "n_layers": 1})
