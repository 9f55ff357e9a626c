"""FLA checkpoint conversion, checked against a float64 numpy forward of the reference model."""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from gla_jax import GLALM
from gla_jax.convert import (
    fla_to_params,
    gla_config_from_fla,
    load_fla_checkpoint,
    load_fla_state_dict,
    read_safetensors,
    write_safetensors,
)

FLA_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_heads=4,
    vocab_size=50,
    expand_k=0.5,
    expand_v=1,
    hidden_ratio=4,
    intermediate_size=None,
    use_short_conv=False,
    conv_size=4,
    norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="swish",
)


# --------------------------------------------------------------------------------------------
# A synthetic checkpoint with the reference library's names and [out, in] layout
# --------------------------------------------------------------------------------------------


def synthetic_state_dict(fla_config, seed=0, fused_mlp=False, norm_key="g_norm_swish_gate"):
    rng = np.random.default_rng(seed)
    d, vocab = fla_config["hidden_size"], fla_config["vocab_size"]
    key_dim, value_dim = int(d * fla_config["expand_k"]), int(d * fla_config["expand_v"])
    head_v = value_dim // fla_config["num_heads"]
    inter = 256 * math.ceil(int(d * fla_config["hidden_ratio"] * 2 / 3) / 256)
    w = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
    scale = lambda n: (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    sd = {"model.embeddings.weight": w(vocab, d), "model.norm.weight": scale(d)}
    if not fla_config["tie_word_embeddings"]:
        sd["lm_head.weight"] = w(vocab, d)
    for i in range(fla_config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "attn_norm.weight"] = scale(d)
        sd[p + "attn.q_proj.weight"] = w(key_dim, d)
        sd[p + "attn.k_proj.weight"] = w(key_dim, d)
        sd[p + "attn.v_proj.weight"] = w(value_dim, d)
        sd[p + "attn.g_proj.weight"] = w(value_dim, d)
        sd[p + "attn.gk_proj.0.weight"] = w(16, d)
        sd[p + "attn.gk_proj.1.weight"] = w(key_dim, 16)
        sd[p + "attn.gk_proj.1.bias"] = (2 + rng.standard_normal(key_dim)).astype(np.float32)
        sd[p + f"attn.{norm_key}.weight"] = scale(head_v)
        sd[p + "attn.o_proj.weight"] = w(d, value_dim)
        if fla_config["use_short_conv"]:
            width = fla_config["conv_size"]
            for name, dim in (("q", key_dim), ("k", key_dim), ("v", value_dim)):
                sd[p + f"attn.{name}_conv1d.weight"] = w(dim, 1, width)
        sd[p + "mlp_norm.weight"] = scale(d)
        if fused_mlp:
            sd[p + "mlp.gate_proj.weight"] = w(2 * inter, d)
        else:
            sd[p + "mlp.gate_proj.weight"] = w(inter, d)
            sd[p + "mlp.up_proj.weight"] = w(inter, d)
        sd[p + "mlp.down_proj.weight"] = w(d, inter)
    return sd


# --------------------------------------------------------------------------------------------
# The reference model's forward, float64 numpy, step recurrence
# --------------------------------------------------------------------------------------------


def _rms(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _silu(x):
    return x / (1 + np.exp(-x))


def _causal_depthwise_conv(x, weight):
    """x [T, D]; torch weight [D, 1, W] with left padding W - 1: tap W - 1 is the current token."""
    width = weight.shape[-1]
    padded = np.concatenate([np.zeros((width - 1, x.shape[1])), x])
    return sum(weight[:, 0, j] * padded[j : j + x.shape[0]] for j in range(width))


def fla_forward(sd, cfg, tokens):
    """Logits [T, vocab] of one sequence."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    eps, heads = cfg["norm_eps"], cfg["num_heads"]
    h = sd["model.embeddings.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "attn_norm.weight"], eps)
        q, k, v = (x @ sd[p + f"attn.{n}_proj.weight"].T for n in "qkv")
        if cfg["use_short_conv"]:
            q, k, v = (
                _silu(_causal_depthwise_conv(t, sd[p + f"attn.{n}_conv1d.weight"]))
                for t, n in zip((q, k, v), "qkv", strict=True)
            )
        gate_logits = (x @ sd[p + "attn.gk_proj.0.weight"].T) @ sd[p + "attn.gk_proj.1.weight"].T
        gate_logits = gate_logits + sd[p + "attn.gk_proj.1.bias"]
        log_gate = -np.logaddexp(0, -gate_logits) / 16  # logsigmoid / 16
        split = lambda t: t.reshape(t.shape[0], heads, -1)
        q, k, v, log_gate = split(q), split(k), split(v), split(log_gate)
        scale = q.shape[-1] ** -0.5
        state = np.zeros((heads, q.shape[-1], v.shape[-1]))
        o = np.zeros_like(v)
        for t in range(len(tokens)):
            state = np.exp(log_gate[t])[..., None] * state + k[t][..., None] * v[t][:, None, :]
            o[t] = np.einsum("hk,hkv->hv", q[t] * scale, state)
        norm_w = sd.get(p + "attn.g_norm_swish_gate.weight", sd.get(p + "attn.g_norm.weight"))
        o = _rms(o, norm_w, eps).reshape(len(tokens), -1)
        o = o * _silu(x @ sd[p + "attn.g_proj.weight"].T)
        h = h + o @ sd[p + "attn.o_proj.weight"].T
        x = _rms(h, sd[p + "mlp_norm.weight"], eps)
        if p + "mlp.up_proj.weight" in sd:
            gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        else:
            gate, up = np.split(x @ sd[p + "mlp.gate_proj.weight"].T, 2, axis=-1)
        h = h + (_silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    h = _rms(h, sd["model.norm.weight"], eps)
    head = sd["model.embeddings.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return h @ head.T


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


forward = nnx.jit(lambda model, tokens: model(tokens))


TOKENS = np.array([[3, 17, 42, 0, 8, 8, 31, 49, 5, 22, 13, 1, 2, 40, 7, 19, 25, 11, 36, 4, 9]])


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(tie_word_embeddings=True, use_short_conv=True),
        dict(fused_mlp=True, norm_key="g_norm"),
    ],
    ids=["untied", "tied_conv", "fused_mlp_g_norm"],
)
def test_converted_logits_match_the_reference_forward(variant):
    fused_mlp = variant.pop("fused_mlp", False)
    norm_key = variant.pop("norm_key", "g_norm_swish_gate")
    fla_config = {**FLA_CONFIG, **variant}
    sd = synthetic_state_dict(fla_config, fused_mlp=fused_mlp, norm_key=norm_key)
    model = GLALM(gla_config_from_fla(fla_config, dtype="float32"), rngs=nnx.Rngs(1))
    before = forward(model, jnp.asarray(TOKENS))
    load_fla_state_dict(model, sd)
    ours = forward(model, jnp.asarray(TOKENS))[0]
    want = fla_forward(sd, fla_config, TOKENS[0])
    assert _rel(ours, want) <= 1e-4
    assert _rel(before[0], want) > 0.5  # the load really replaced the random parameters


def test_scan_layers_model_loads_stacked_weights(tmp_path):
    fla_config = {**FLA_CONFIG, "use_short_conv": True}
    sd = synthetic_state_dict(fla_config, seed=5)
    want = fla_forward(sd, fla_config, TOKENS[0])
    cfg = gla_config_from_fla(fla_config, dtype="float32", scan_layers=True)
    params = fla_to_params(sd, cfg)
    assert params["blocks"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 16)  # [layer, in, out]
    model = load_fla_state_dict(GLALM(cfg, rngs=nnx.Rngs(1)), sd)
    assert _rel(forward(model, jnp.asarray(TOKENS))[0], want) <= 1e-4
    write_safetensors(str(tmp_path / "model.safetensors"), sd)
    (tmp_path / "config.json").write_text(json.dumps(fla_config))
    model = load_fla_checkpoint(str(tmp_path), dtype="float32", scan_layers=True)
    assert model.cfg.scan_layers
    assert _rel(forward(model, jnp.asarray(TOKENS))[0], want) <= 1e-4


def test_safetensors_round_trip_and_checkpoint_directory(tmp_path):
    fla_config = {**FLA_CONFIG, "use_short_conv": True}
    sd = synthetic_state_dict(fla_config, seed=3)
    half = dict(list(sd.items())[: len(sd) // 2])
    rest = dict(list(sd.items())[len(sd) // 2 :])
    write_safetensors(str(tmp_path / "model-00001-of-00002.safetensors"), half)
    write_safetensors(str(tmp_path / "model-00002-of-00002.safetensors"), rest)
    (tmp_path / "config.json").write_text(json.dumps(fla_config))
    back = read_safetensors(str(tmp_path / "model-00001-of-00002.safetensors"))
    assert set(back) == set(half)
    for name, value in half.items():
        np.testing.assert_array_equal(back[name], value)
    model = load_fla_checkpoint(str(tmp_path), dtype="float32")
    ours = forward(model, jnp.asarray(TOKENS))[0]
    assert _rel(ours, fla_forward(sd, fla_config, TOKENS[0])) <= 1e-4

    bf16 = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)}
    write_safetensors(str(tmp_path / "bf16.safetensors"), bf16)
    back = read_safetensors(str(tmp_path / "bf16.safetensors"))["w"]
    assert back.dtype == ml_dtypes.bfloat16 and back.shape == (2, 3)
    np.testing.assert_array_equal(back.astype(np.float32), bf16["w"].astype(np.float32))


# --------------------------------------------------------------------------------------------
# Mismatches
# --------------------------------------------------------------------------------------------


def _cfg(**kw):
    return gla_config_from_fla({**FLA_CONFIG, **kw}, dtype="float32")


def test_missing_tensor_is_named():
    sd = synthetic_state_dict(FLA_CONFIG)
    del sd["model.layers.1.attn.gk_proj.1.bias"]
    with pytest.raises(
        ValueError, match=r"lacks 1 tensors.*model\.layers\.1\.attn\.gk_proj\.1\.bias"
    ):
        fla_to_params(sd, _cfg())


def test_extra_tensor_is_named():
    sd = synthetic_state_dict(FLA_CONFIG)
    sd["model.layers.2.attn_norm.weight"] = np.ones(32, np.float32)  # a third layer
    with pytest.raises(ValueError, match=r"model lacks.*model\.layers\.2\.attn_norm\.weight"):
        fla_to_params(sd, _cfg())


def test_misshaped_tensor_names_tensor_and_shapes():
    sd = synthetic_state_dict(FLA_CONFIG)
    sd["model.layers.0.attn.q_proj.weight"] = np.zeros((8, 32), np.float32)
    with pytest.raises(ValueError, match=r"q_proj\.weight has shape \(8, 32\).*needs \(32, 16\)"):
        fla_to_params(sd, _cfg())


def test_tensors_that_cannot_convert_are_named():
    conv_config = {**FLA_CONFIG, "use_short_conv": True}
    sd = synthetic_state_dict(conv_config)
    name = "model.layers.0.attn.q_conv1d.weight"
    dim, _, size = sd[name].shape
    for bad in (np.zeros((dim, size), np.float32), np.zeros((dim, 2, size), np.float32)):
        with pytest.raises(ValueError, match=r"q_conv1d\.weight: a depthwise conv weight"):
            fla_to_params({**sd, name: bad}, gla_config_from_fla(conv_config, dtype="float32"))
    sd = synthetic_state_dict(FLA_CONFIG)
    fused = "model.layers.0.mlp.gate_proj.weight"
    sd[fused] = np.zeros((2 * sd[fused].shape[0] + 1, sd[fused].shape[1]), np.float32)
    del sd["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"gate_proj\.weight: a fused gate_proj"):
        fla_to_params(sd, _cfg())
    sd = synthetic_state_dict(FLA_CONFIG)
    sd["model.norm.weight"] = sd["model.norm.weight"].astype(np.int8)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has dtype int8"):
        fla_to_params(sd, _cfg())


def test_truncated_safetensors_file_is_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_safetensors(str(path), {"w": np.ones((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"cut\.safetensors: tensor w F32\[4, 4\] needs 64"):
        read_safetensors(str(path))


def test_tied_config_with_a_different_lm_head_raises():
    sd = synthetic_state_dict(FLA_CONFIG)  # untied: lm_head differs from the embeddings
    with pytest.raises(ValueError, match="lm_head.weight.*differs"):
        fla_to_params(sd, _cfg(tie_word_embeddings=True))


@pytest.mark.parametrize(
    "field, value", [("num_kv_heads", 2), ("feature_map", "relu"), ("clamp_min", -5.0)]
)
def test_unsupported_reference_features_raise(field, value):
    with pytest.raises(ValueError, match=field):
        gla_config_from_fla({**FLA_CONFIG, field: value})


# --------------------------------------------------------------------------------------------
# A real published checkpoint, when one is present locally (never downloaded here)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.environ.get("GLA_FLA_CHECKPOINT"),
    reason="set GLA_FLA_CHECKPOINT to a local FLA GLA model directory to run",
)
def test_real_checkpoint_logits_match_the_reference_forward():
    directory = os.environ["GLA_FLA_CHECKPOINT"]
    with open(os.path.join(directory, "config.json")) as f:
        fla_config = {**FLA_CONFIG, **json.load(f)}
    model = load_fla_checkpoint(directory, dtype="float32")
    sd = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            sd.update(read_safetensors(os.path.join(directory, name)))
    tokens = np.array([1, 450, 4996, 17354, 1701, 432, 29879, 975])
    ours = forward(model, jnp.asarray(tokens)[None])[0]
    assert _rel(ours, fla_forward(sd, fla_config, tokens)) <= 1e-3
