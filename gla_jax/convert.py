"""Loading GLA checkpoints published for the reference PyTorch library (flash-linear-attention).

That library stores a ``GLAForCausalLM`` as safetensors with PyTorch's [out, in] linear layout:

    model.embeddings.weight                      [vocab, d]
    model.layers.{i}.attn_norm.weight            [d]
    model.layers.{i}.attn.q_proj.weight          [key_dim, d]   (k_proj likewise)
    model.layers.{i}.attn.v_proj.weight          [value_dim, d] (g_proj, the output gate, likewise)
    model.layers.{i}.attn.gk_proj.0.weight       [16, d]        low-rank forget gate, down
    model.layers.{i}.attn.gk_proj.1.weight/bias  [key_dim, 16] / [key_dim]
    model.layers.{i}.attn.g_norm_swish_gate.weight  [head_v_dim] (or attn.g_norm.weight)
    model.layers.{i}.attn.o_proj.weight          [d, value_dim]
    model.layers.{i}.attn.{q,k,v}_conv1d.weight  [dim, 1, conv_size] (with short convolutions)
    model.layers.{i}.mlp_norm.weight             [d]
    model.layers.{i}.mlp.{gate,up}_proj.weight   [intermediate, d] (older files: gate_proj holds
                                                 both, [2 * intermediate, d], gate rows first)
    model.layers.{i}.mlp.down_proj.weight        [d, intermediate]
    model.norm.weight                            [d]
    lm_head.weight                               [vocab, d] (absent or equal when tied)

    cfg = gla_config_from_fla(json.load(open("config.json")))  # scan_layers=True: stacked
    model = GLALM(cfg, rngs=nnx.Rngs(0))   # or nnx.eval_shape(...) then load
    load_fla_state_dict(model, read_safetensors("model.safetensors"))

Missing, extra or mis-shaped tensors raise ValueError naming the tensor and the shapes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from gla_jax.layer_stack import stack_layer_params
from gla_jax.model import GLAConfig

# --------------------------------------------------------------------------------------------
# safetensors: an 8-byte little-endian header size, a JSON header, then raw little-endian bytes.
# Parsed here with numpy rather than adding a dependency for ~30 lines.
# --------------------------------------------------------------------------------------------

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, as numpy arrays (memory-mapped, read-only)."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        size = int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize
        if end - start != size or end > data.size:
            raise ValueError(
                f"{path}: tensor {name} {info['dtype']}{list(info['shape'])} needs {size} bytes, "
                f"its header gives [{start}, {end}) of {data.size}: a truncated or damaged file"
            )
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes numpy arrays in the safetensors format (for tests and exports)."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        blob = array.tobytes()
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for blob in blobs:
            f.write(blob)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def gla_config_from_fla(fla_config: dict, **overrides) -> GLAConfig:
    """The reference library's GLA config.json -> GLAConfig. Unsupported features raise."""
    get = fla_config.get
    unsupported = {
        "attn": (get("attn"), None),
        "feature_map": (get("feature_map"), None),
        "clamp_min": (get("clamp_min"), None),
        "hidden_act": (get("hidden_act", "swish"), "swish"),
        "use_gv": (get("use_gv", False), False),
        "elementwise_affine": (get("elementwise_affine", True), True),
        "conv_bias": (get("conv_bias", False), False),
    }
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(
                f"FLA config {name} = {value!r} is not supported (needs {supported!r})"
            )
    kv_heads = get("num_kv_heads")
    if kv_heads not in (None, get("num_heads", 4)):
        raise ValueError(f"FLA config num_kv_heads = {kv_heads} (grouped keys) is not supported")
    fields = dict(
        vocab_size=int(get("vocab_size", 32000)),
        d_model=int(get("hidden_size", 2048)),
        n_layers=int(get("num_hidden_layers", 24)),
        n_heads=int(get("num_heads", 4)),
        expand_k=float(get("expand_k", 0.5)),
        expand_v=float(get("expand_v", 1.0)),
        hidden_ratio=float(get("hidden_ratio") or 4),
        intermediate_size=get("intermediate_size"),
        use_short_conv=bool(get("use_short_conv", False)),
        conv_size=int(get("conv_size", 4)),
        use_output_gate=bool(get("use_output_gate", True)),
        norm_eps=float(get("norm_eps", 1e-6)),
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        init_std=float(get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return GLAConfig(**fields)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _linear(w):  # torch [out, in] -> our [in, out]
    return np.asarray(w).T


def _conv(w):  # torch depthwise [dim, 1, size] -> our [size, dim] (last tap = current token)
    w = np.asarray(w)
    if w.ndim != 3 or w.shape[1] != 1:
        raise ValueError(f"a depthwise conv weight is [dim, 1, size], got {w.shape}")
    return w[:, 0, :].T


def _half(w, part: int):  # older files' fused [2 * intermediate, d] gate_proj: gate rows first
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] % 2:
        raise ValueError(f"a fused gate_proj is [2 * intermediate, d], got {w.shape}")
    return _linear(np.split(w, 2, axis=0)[part])


def _same(w):
    return np.asarray(w)


def _layer_plan(i: int, cfg: GLAConfig, state_dict) -> list[tuple[str, tuple, object]]:
    """(FLA name, our path, transform) for one block."""
    fla, ours = f"model.layers.{i}.", ("blocks", i)
    plan = [
        (fla + "attn_norm.weight", ours + ("attn_norm", "scale"), _same),
        (fla + "mlp_norm.weight", ours + ("mlp_norm", "scale"), _same),
        (fla + "mlp.down_proj.weight", ours + ("mlp", "down_proj", "kernel"), _linear),
    ]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        plan.append((fla + f"attn.{name}.weight", ours + ("attn", name, "kernel"), _linear))
    if cfg.use_output_gate:
        plan.append((fla + "attn.g_proj.weight", ours + ("attn", "g_proj", "kernel"), _linear))
    plan += [
        (fla + "attn.gk_proj.0.weight", ours + ("attn", "gk_down", "kernel"), _linear),
        (fla + "attn.gk_proj.1.weight", ours + ("attn", "gk_up", "kernel"), _linear),
        (fla + "attn.gk_proj.1.bias", ours + ("attn", "gk_up", "bias"), _same),
    ]
    fused_norm = fla + "attn.g_norm_swish_gate.weight"
    norm_name = fused_norm if fused_norm in state_dict else fla + "attn.g_norm.weight"
    plan.append((norm_name, ours + ("attn", "g_norm", "scale"), _same))
    if cfg.use_short_conv:
        for index, name in enumerate(("q_conv1d", "k_conv1d", "v_conv1d")):
            path = ours + ("attn", "conv", index, "kernel")
            plan.append((fla + f"attn.{name}.weight", path, _conv))
    gate, up = fla + "mlp.gate_proj.weight", fla + "mlp.up_proj.weight"
    if up in state_dict or gate not in state_dict:
        plan.append((gate, ours + ("mlp", "gate_proj", "kernel"), _linear))
        plan.append((up, ours + ("mlp", "up_proj", "kernel"), _linear))
    else:  # older files: one [2 * intermediate, d] matrix, gate rows then up rows
        plan.append((gate, ours + ("mlp", "gate_proj", "kernel"), lambda w: _half(w, 0)))
        plan.append((gate, ours + ("mlp", "up_proj", "kernel"), lambda w: _half(w, 1)))
    return plan


def conversion_plan(cfg: GLAConfig, state_dict) -> list[tuple[str, tuple, object]]:
    if cfg.mixer != "gla":
        raise ValueError(f"only GLA models convert from FLA checkpoints, got mixer={cfg.mixer!r}")
    if cfg.head_norm != "rmsnorm":
        raise ValueError(f"FLA's GLA uses an RMSNorm per head; got head_norm={cfg.head_norm!r}")
    plan = [
        ("model.embeddings.weight", ("embed", "embedding"), _same),
        ("model.norm.weight", ("norm", "scale"), _same),
    ]
    if not cfg.tie_embeddings:
        plan.append(("lm_head.weight", ("lm_head", "kernel"), _linear))
    for i in range(cfg.n_layers):
        plan += _layer_plan(i, cfg, state_dict)
    return plan


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def fla_to_params(state_dict: dict, cfg: GLAConfig) -> dict:
    """FLA tensors -> our parameters as a pure nested dict of float32 numpy arrays.

    The reference stores one tensor per layer; with ``cfg.scan_layers`` each block parameter
    becomes one [n_layers, ...] array (the stacked layout), after every layer is checked.
    """
    from gla_jax.model import GLALM  # noqa: PLC0415 - avoids a cycle at import time

    # The reference's names map onto the per-layer layout; stacking comes last.
    per_layer_cfg = dataclasses.replace(cfg, scan_layers=False)
    abstract = nnx.eval_shape(lambda: GLALM(per_layer_cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    expected = {
        tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]
    }
    plan = conversion_plan(cfg, state_dict)
    missing = sorted({name for name, _, _ in plan if name not in state_dict})
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    used = {name for name, _, _ in plan}
    extra = sorted(set(state_dict) - used)
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        head, embed = state_dict["lm_head.weight"], state_dict["model.embeddings.weight"]
        if head.shape != embed.shape or not np.array_equal(np.asarray(head), np.asarray(embed)):
            raise ValueError(
                f"tie_embeddings is set but lm_head.weight {head.shape} differs from "
                f"model.embeddings.weight {embed.shape}"
            )
        extra.remove("lm_head.weight")
    if extra:
        raise ValueError(f"checkpoint has {len(extra)} tensors the model lacks, e.g. {extra[:5]}")

    converted = {}
    for name, path, transform in plan:
        if path not in expected:
            raise ValueError(f"{name}: no parameter {_path_str(path)} in a model with this config")
        raw = np.asarray(state_dict[name])
        if not jnp.issubdtype(raw.dtype, jnp.floating):
            raise ValueError(f"{name} has dtype {raw.dtype}: weights must be floating-point")
        try:
            value = transform(raw).astype(np.float32)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        if value.shape != expected[path]:
            raise ValueError(
                f"{name} has shape {tuple(state_dict[name].shape)}: converted {value.shape}, but "
                f"{_path_str(path)} needs {expected[path]}"
            )
        converted[path] = value
    unfilled = sorted(_path_str(p) for p in set(expected) - set(converted))
    if unfilled:
        raise ValueError(f"no checkpoint tensor maps to parameters {unfilled[:5]}")
    params = _nest(converted)
    return stack_layer_params(params) if cfg.scan_layers else params


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def load_fla_state_dict(model, state_dict: dict):
    """Overwrites ``model``'s parameters (a GLALM) with a converted FLA state dict."""
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, fla_to_params(state_dict, model.cfg))
    nnx.update(model, params)
    return model


def load_fla_checkpoint(directory: str, **config_overrides):
    """A downloaded FLA model directory (config.json + *.safetensors) -> GLALM."""
    from gla_jax.model import GLALM  # noqa: PLC0415

    with open(os.path.join(directory, "config.json")) as f:
        cfg = gla_config_from_fla(json.load(f), **config_overrides)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    state_dict = {}
    for path in files:
        state_dict.update(read_safetensors(path))
    model = nnx.eval_shape(lambda: GLALM(cfg, rngs=nnx.Rngs(0)))
    params = fla_to_params(state_dict, cfg)
    graphdef, abstract_params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract_params, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, abstract_params, rest)
