"""The trainer's configuration: every field with its default, and an up-front check.

Config files (configs/*.py) start from ``base_config()`` and set the model and what differs.
Every field can be overridden on the command line (``--config.batch_size=16``); unknown fields
are refused by ml_collections before training starts.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    from gla_jax.data import default_data_config  # noqa: PLC0415 - keeps this module light

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.data = default_data_config()
    c.seed = 0
    c.seq_len = 256
    c.batch_size = 8  # global rows per step
    c.grad_accum_steps = 1
    c.steps = 300
    # Optimizer (the paper: AdamW 0.9/0.95, wd 0.01, clip 1.0, cosine to 10% of the peak).
    c.learning_rate = 3e-4
    c.warmup_steps = 30
    c.end_lr_ratio = 0.1
    c.weight_decay = 0.01
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.adam_eps = 1e-8
    c.grad_clip = 1.0
    c.max_nonfinite_steps = 5
    # Devices.
    c.mesh = "-1,1,1"  # data,fsdp,tensor; -1 takes the remaining devices
    c.multihost = "auto"  # auto | on | off
    c.coordinator_address = ""
    c.num_processes = 1
    c.process_id = 0
    c.compilation_cache_dir = ""  # persistent XLA compilation cache; "" = off
    c.peak_tflops = 0.0  # per device, for MFU; 0 = look up the device kind
    # Profiling: trace steps [profile_start_step, + profile_steps) into WORKDIR/profile (0 = off;
    # those steps run slower while traced);
    # `python -m gla_jax.profile_summary WORKDIR/profile` tabulates where the device time went.
    c.profile_start_step = 0
    c.profile_steps = 3
    # Logging, evaluation, checkpoints, samples.
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 4
    c.eval_batch_size = 8
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.keep_period = 0  # also keep every N-th step forever; 0 = off
    c.async_checkpoint = True
    c.num_samples = 2
    c.sample_length = 64
    c.sample_prompt = "And "
    c.sample_temperature = 0.8
    return c


# The paper's recipes (section 5): 340M on 15B tokens in batches of 0.5M tokens (256 x 2048) with
# 0.5B warmup tokens; 1.3B on 100B tokens in batches of 2M tokens (1024 x 2048) with 1B warmup
# tokens, parameters and optimizer state sharded FSDP-style. AdamW 3e-4, cosine to 3e-5.
PAPER_RECIPES = {
    "340m": dict(seq_len=2048, batch_size=256, steps=28_610, warmup_steps=954, mesh="-1,1,1"),
    "1.3b": dict(seq_len=2048, batch_size=1024, steps=47_684, warmup_steps=477, mesh="1,-1,1"),
}


def paper_config(size: str, model: dict) -> ml_collections.ConfigDict:
    """base_config() with the paper's recipe for ``size`` ('340m' | '1.3b') and ``model``.

    Lower batch_size or raise grad_accum_steps to fit smaller machines; point
    data.tokenizer at a 32000-token SentencePiece .model for real runs (byte-level by default).
    """
    c = base_config()
    c.update(PAPER_RECIPES[size])
    c.learning_rate = 3e-4
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.model = ml_collections.ConfigDict(model)
    return c


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config.{field}: {message}")


def _require_int(config, field: str, minimum: int, note: str = "") -> None:
    value = config[field]
    _require(
        isinstance(value, int) and value >= minimum,
        field,
        f"must be an integer >= {minimum}{note}, got {value!r}",
    )


def check_config(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
    """Fails fast, naming the field, on values that would fail (or silently mislead) later."""
    from gla_jax.sharding import parse_mesh_shape  # noqa: PLC0415

    _require("type" in config.model, "model.type", "must be set ('gla' or 'transformer')")
    for field in (
        "steps",
        "seq_len",
        "batch_size",
        "grad_accum_steps",
        "log_every",
        "checkpoint_every",
        "eval_batch_size",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "profile_steps",
    ):
        _require_int(config, field, 1)
    _require_int(config, "profile_start_step", 0, " (0: no profile)")
    if config.profile_start_step:
        last_traced = config.profile_start_step + config.profile_steps - 1
        _require(
            last_traced <= config.steps,
            "profile_steps",
            f"the traced steps {config.profile_start_step}..{last_traced} pass steps = "
            f"{config.steps} (profile_summary divides by profile_steps)",
        )
    _require(config.learning_rate > 0, "learning_rate", f"must be > 0, got {config.learning_rate}")
    _require(config.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {config.warmup_steps}")
    _require(0 <= config.end_lr_ratio <= 1, "end_lr_ratio", "must be in [0, 1]")
    _require_int(config, "keep_period", 0, " (0: off)")
    # clip_by_global_norm(0) zeroes every update and a negative bound reverses it.
    _require(config.grad_clip > 0, "grad_clip", f"must be > 0, got {config.grad_clip}")
    _check_evaluation_and_samples(config)
    _check_document_bound(config)
    _require(config.multihost in ("auto", "on", "off"), "multihost", "must be auto, on or off")
    try:
        data, fsdp, _ = parse_mesh_shape(config.mesh, num_devices)
    except ValueError as err:
        raise ValueError(f"config.mesh: {err}") from None
    batch_shards = data * fsdp
    _require(
        config.batch_size % config.grad_accum_steps == 0,
        "batch_size",
        f"{config.batch_size} rows do not split into grad_accum_steps = {config.grad_accum_steps}",
    )
    micro = config.batch_size // config.grad_accum_steps
    _require(
        micro % batch_shards == 0,
        "batch_size",
        f"micro-batch of {micro} rows (batch_size / grad_accum_steps) does not divide over "
        f"data x fsdp = {batch_shards} devices of mesh {config.mesh!r}",
    )
    _require(
        config.eval_batch_size % batch_shards == 0,
        "eval_batch_size",
        f"{config.eval_batch_size} rows do not divide over data x fsdp = {batch_shards} devices",
    )


def _check_evaluation_and_samples(config) -> None:
    """What would otherwise fail only at the first evaluation or after the last step."""
    if config.eval_every > 0:
        _require_int(config, "eval_batches", 1, " when eval_every > 0")
    _require_int(config, "num_samples", 0, " (0: no samples)")
    if config.num_samples > 0:
        _require_int(config, "sample_length", 1, " when num_samples > 0")
        _require(
            len(config.sample_prompt) > 0,
            "sample_prompt",
            "must not be empty when num_samples > 0 (generation starts from its tokens)",
        )
        _require(
            config.sample_temperature >= 0,
            "sample_temperature",
            f"must be >= 0 (0: greedy), got {config.sample_temperature}",
        )


def _check_document_bound(config) -> None:
    """model.packing='cu_seqlens' gives each row a static number of document slots (traced under
    jit, so more documents than slots would be merged silently): the data must not exceed it."""
    from gla_jax.model import GLAConfig  # noqa: PLC0415 - keeps this module light

    one_per_row = config.data.get("packing") == "pad" or config.data.get("name") == "mqar"
    if config.model.get("type") != "gla" or one_per_row:
        return  # attention masks documents; 'pad' and MQAR rows hold one each
    if config.model.get("packing", GLAConfig.packing) != "cu_seqlens":
        return
    slots = config.model.get("max_segments_per_row", GLAConfig.max_segments_per_row)
    limit = config.data.max_segments_per_row
    _require(
        1 <= limit <= slots,
        "data.max_segments_per_row",
        f"must be in [1, model.max_segments_per_row = {slots}] with model.packing='cu_seqlens' "
        f"(rows with more documents than the model's slots would merge them), got {limit}",
    )
