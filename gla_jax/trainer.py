"""The training loop: ``main(config, workdir)``.

Flow: check the config -> (multi-host init) -> mesh -> data -> abstract model and state with
shardings -> restore the latest checkpoint or initialize -> jitted, sharded train steps with
logging, evaluation, checkpoints and samples. Rerunning with the same workdir resumes exactly: the
checkpoint holds parameters, optimizer state, step, RNG and the data iterator's position.

MFU counts, per token, 6 FLOPs per weight of every matrix multiply (forward + backward) plus the
sequence mixer's own work (see ``mixer_flops_per_token``), against ``config.peak_tflops`` per
device (or the device's bf16 dense peak when known).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from gla_jax import checkpoint as checkpoint_lib
from gla_jax import data as data_lib
from gla_jax import multihost
from gla_jax import sharding as sharding_lib
from gla_jax.config_check import check_config
from gla_jax.layer_stack import unstack_layer_params
from gla_jax.metrics import MetricsWriter, Progress
from gla_jax.model import build_model
from gla_jax.ops import DEFAULT_CHUNK_SIZE
from gla_jax.optim import learning_rate_schedule, make_optimizer

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v4": 275.0}


@dataclasses.dataclass
class Run:
    """What the loop needs, built once."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state_shardings: dict
    abstract_state: dict
    optimizer: optax.GradientTransformation
    num_params: int


# --------------------------------------------------------------------------------------------
# Model and state
# --------------------------------------------------------------------------------------------


def abstract_model(model_config):
    """The model built abstractly: no parameter is allocated."""
    return nnx.eval_shape(lambda: build_model(model_config, nnx.Rngs(0)))


def _param_shardings(model, mesh):
    """NamedShardings of a (possibly abstract) model's parameters, from their logical axis names."""
    params = nnx.state(model, nnx.Param)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
    return sharding_lib.state_shardings(nnx.to_pure_dict(params), logical, mesh)


def _is_stacked(model_config) -> bool:
    """Whether the model's blocks are stacked on a 'layers' axis (``scan_layers``)."""
    return bool(model_config.get("scan_layers", False))


def _stacked_config(model_config):
    """The model config with its blocks stacked (``scan_layers=True``)."""
    stacked = ml_collections.ConfigDict(model_config.to_dict())
    stacked.scan_layers = True
    return stacked


def _draw_params(model_config, seed):
    """The initial parameters (a pure dict) in the stacked layout, whatever the model's: an
    unrolled model (``scan_layers=False``) takes them through ``unstack_layer_params``, so both
    layouts start from the same weights."""
    model = build_model(_stacked_config(model_config), nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _in_layout(stacked_params, model_config):
    if _is_stacked(model_config):
        return stacked_params
    return unstack_layer_params(stacked_params)


def _state_from(params, optimizer, seed):
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed + 1)),
        # Steps skipped for a non-finite loss or gradient: in total, in the current run of
        # consecutive ones, and the longest such run (read by the host only when it logs).
        "nonfinite": {
            "skipped": jnp.zeros((), jnp.int32),
            "run": jnp.zeros((), jnp.int32),
            "longest_run": jnp.zeros((), jnp.int32),
        },
    }


def _init_state(model_config, optimizer, seed):
    params = _in_layout(_draw_params(model_config, seed), model_config)
    return _state_from(params, optimizer, seed)


def build_run(config, mesh) -> Run:
    model = abstract_model(config.model)
    graphdef, _ = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(config)
    abstract_state = jax.eval_shape(lambda: _init_state(config.model, optimizer, config.seed))
    params_sharding = _param_shardings(model, mesh)
    opt_sharding = _optimizer_shardings(abstract_state, params_sharding, mesh)
    replicated = sharding_lib.replicated(mesh)
    shardings = {
        "params": params_sharding,
        "opt_state": opt_sharding,
        "step": replicated,
        "rng": replicated,
        "nonfinite": jax.tree.map(lambda _: replicated, abstract_state["nonfinite"]),
    }
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
    return Run(config, mesh, graphdef, shardings, abstract_state, optimizer, num_params)


def _optimizer_shardings(abstract_state, params_sharding, mesh):
    """Optimizer moments (subtrees shaped like the parameters) mirror the parameters' sharding;
    everything else (step counts) is replicated."""
    params_treedef = jax.tree.structure(abstract_state["params"])

    def is_params_like(node):
        return jax.tree.structure(node) == params_treedef

    return jax.tree.map(
        lambda node: params_sharding if is_params_like(node) else sharding_lib.replicated(mesh),
        abstract_state["opt_state"],
        is_leaf=is_params_like,
    )


def with_shardings(abstract_state, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def initialize_state(run: Run):
    """The initial train state on the run's mesh: ``_init_state`` in separate programs: the
    draw, the unstacking (unrolled models) and the optimizer state. Unstacking in the program
    that draws would let XLA fuse the draw into every layer's slice, one large kernel per layer
    and parameter: the unrolled 340M model's initializer took six minutes to compile on a GPU
    that way."""
    config, shardings = run.config, run.state_shardings
    unrolled = not _is_stacked(config.model)
    stacked_shardings = (
        _param_shardings(abstract_model(_stacked_config(config.model)), run.mesh)
        if unrolled
        else shardings["params"]
    )
    params = jax.jit(
        lambda: _draw_params(config.model, config.seed), out_shardings=stacked_shardings
    )()
    if unrolled:  # rebinding frees the stacked copy
        params = jax.jit(lambda p: _in_layout(p, config.model), out_shardings=shardings["params"])(
            params
        )
    return jax.jit(
        lambda p: _state_from(p, run.optimizer, config.seed),
        out_shardings=shardings,
        donate_argnums=0,
    )(params)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def token_losses(graphdef, params, batch):
    """Summed cross-entropy over the loss mask and the number of tokens it counts."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["tokens"], segment_ids=batch.get("segment_ids"))
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def _accumulated_gradients(graphdef, params, batch, micro_batches: int):
    """Gradient of the mean token loss over the whole batch, summed micro-batch by micro-batch
    so that accumulation gives the same result as one large batch."""

    grad_fn = jax.value_and_grad(
        lambda params, micro: token_losses(graphdef, params, micro), has_aux=True
    )
    if micro_batches == 1:
        (total, count), grads = grad_fn(params, batch)
    else:
        split = jax.tree.map(
            lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:]), batch
        )

        def body(carry, micro):
            grads_acc, total_acc, count_acc = carry
            (total, count), grads = grad_fn(params, micro)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, total_acc + total, count_acc + count), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, total, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), split)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    return total / count, grads, count


def train_step(run: Run, state, batch):
    graphdef, optimizer = run.graphdef, run.optimizer
    loss, grads, tokens = _accumulated_gradients(
        graphdef, state["params"], batch, run.config.grad_accum_steps
    )
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    # A non-finite step is not applied: parameters and optimizer state stay as they were.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "params": keep(new_params, state["params"]),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "step": state["step"] + 1,
        "rng": state["rng"],
        "nonfinite": _count_nonfinite(state["nonfinite"], finite),
    }
    schedule = learning_rate_schedule(run.config)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        # The rate this step applied: the optimizer's count (the schedule's step) advances only
        # on applied steps, so it trails the step by the steps skipped so far.
        "learning_rate": schedule(state["step"] - state["nonfinite"]["skipped"]),
        "tokens": tokens,
        **new_state["nonfinite"],
    }
    return new_state, metrics


def _count_nonfinite(counts, finite):
    run = jnp.where(finite, 0, counts["run"] + 1)
    return {
        "skipped": counts["skipped"] + (~finite).astype(jnp.int32),
        "run": run,
        "longest_run": jnp.maximum(counts["longest_run"], run),
    }


def compile_steps(run: Run):
    batch_sharding = sharding_lib.batch_sharding(run.mesh)
    replicated = sharding_lib.replicated(run.mesh)

    def sharded_train_step(state, batch):
        return train_step(run, state, batch)

    def sharded_eval_step(params, batch):
        return token_losses(run.graphdef, params, batch)

    train_jit = jax.jit(
        sharded_train_step,
        in_shardings=(run.state_shardings, batch_sharding),
        out_shardings=(run.state_shardings, replicated),
        donate_argnums=(0,),
    )
    evaluate_jit = jax.jit(
        sharded_eval_step,
        in_shardings=(run.state_shardings["params"], batch_sharding),
        out_shardings=replicated,
    )

    # Traced under the mesh, so that gla_jax.ops.chunk_gla runs its kernels per shard.
    def train(state, batch):
        with jax.set_mesh(run.mesh):
            return train_jit(state, batch)

    def evaluate(params, batch):
        with jax.set_mesh(run.mesh):
            return evaluate_jit(params, batch)

    return train, evaluate


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def mixer_flops_per_token(model_config, seq_len: int) -> float:
    """Forward + backward FLOPs per token of the sequence mixers, beyond their projections.

    Softmax attention (causal): 2 matmuls of T/2 keys on average, 2 * 2 * (T / 2) * d per layer
    forward. GLA (chunkwise, chunk C): the intra-chunk scores and their product with values cost
    2 * C * (d_k + d_v) per token, and the state read and write 2 * 2 * d_k * d_v / H per token.
    Backward costs twice the forward.
    """
    d = model_config.d_model
    layers = model_config.n_layers
    if model_config.type == "transformer":
        forward = 2 * 2 * (seq_len / 2) * d
    else:
        heads = model_config.n_heads
        d_k = int(d * model_config.get("expand_k", 0.5))
        d_v = int(d * model_config.get("expand_v", 1.0))
        chunk = model_config.get("chunk_size", DEFAULT_CHUNK_SIZE)
        forward = 2 * chunk * (d_k + d_v) + 4 * d_k * d_v / heads
    return 3 * forward * layers


def peak_flops_per_device(config) -> float | None:
    if config.peak_tflops:
        return config.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def describe(run: Run) -> str:
    per_device = {}
    for kind, tree in (
        ("params", run.abstract_state["params"]),
        ("opt", run.abstract_state["opt_state"]),
    ):
        shardings = run.state_shardings["params" if kind == "params" else "opt_state"]
        total = 0
        for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
            shard = sharding.shard_shape(leaf.shape)
            total += int(np.prod(shard)) * leaf.dtype.itemsize
        per_device[kind] = total
    mib = {k: v / 2**20 for k, v in per_device.items()}
    return (
        f"parameters: {run.num_params}\n"
        f"per-device memory: parameters {mib['params']:.1f} MiB, optimizer {mib['opt']:.1f} MiB "
        f"(mesh {dict(run.mesh.shape)})"
    )


def _check_nonfinite(metrics, skipped_before: int, step: int, config) -> int:
    """Warns about skipped steps since the last log and stops the run after too many in a row."""
    skipped = int(metrics["skipped"])
    if skipped > skipped_before:
        logging.warning(
            "%d step(s) up to step %d had a non-finite loss or gradient and were not applied",
            skipped - skipped_before,
            step,
        )
    if int(metrics["longest_run"]) >= config.max_nonfinite_steps:
        raise FloatingPointError(
            f"{config.max_nonfinite_steps} non-finite steps in a row by step {step}: "
            "stopping (lower the learning rate or check the data)"
        )
    return skipped


def _record_first_step(writer, step: int, metrics, step_start: float) -> None:
    """Waits once for the first step of this process, which traces and compiles the step, and
    records its wall time apart, so that the throughput windows after it are steady state."""
    jax.block_until_ready(metrics)
    seconds = time.time() - step_start
    writer.write(step, {"first_step_s": seconds})
    _say(f"first step (trace, compile, run): {seconds:.1f} s")


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


class _Stop:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and exits cleanly."""

    requested = False

    @classmethod
    def install(cls):
        cls.requested = False
        try:
            signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "requested", True))
        except ValueError:  # not the main thread (e.g. called from a test thread)
            pass


def _global_batch(batch, mesh):
    keys = ("tokens", "targets", "segment_ids", "loss_mask")
    return data_lib.make_global_batch({k: batch[k] for k in keys if k in batch}, mesh)


def _changed_model_fields(config, workdir) -> str:
    """'field: saved -> given' for each config.model field that differs from WORKDIR/config.json
    ('' when it matches or there is no saved config)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        saved = json.load(f).get("model", {})
    given = json.loads(config.model.to_json_best_effort())  # as config.json spells values
    return ", ".join(
        f"{key}: {saved.get(key, '(unset)')!r} -> {given.get(key, '(unset)')!r}"
        for key in sorted(set(saved) | set(given))
        if saved.get(key) != given.get(key)
    )


def _save_config(config, workdir):
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def eval_batches(config):
    """One ordered pass over the eval split: ``config.eval_batches`` batches for this host."""
    return data_lib.make_eval_dataset(
        config.data,
        seq_len=config.seq_len,
        global_batch_size=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_batches=config.eval_batches,
    )


def evaluate_loss(run: Run, evaluate, params, config) -> float:
    iterator = eval_batches(config)
    total = count = 0.0
    for _ in range(config.eval_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        t, c = evaluate(params, _global_batch(batch, run.mesh))
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


class StepProfiler:
    """Traces steps [start, start + count) with jax.profiler into ``trace_dir`` (start 0: off).

    The trace stops after the last traced step's results are ready, so it holds whole steps."""

    def __init__(self, start: int, count: int, trace_dir: str):
        self.start, self.end, self.trace_dir = start, start + count, trace_dir
        self.active = False

    def before_step(self, step: int) -> None:
        if self.start and step == self.start:
            os.makedirs(self.trace_dir, exist_ok=True)
            jax.profiler.start_trace(self.trace_dir)
            self.active = True

    def after_step(self, step: int, state) -> None:
        if self.active and step == self.end - 1:
            jax.block_until_ready(state)
            self.close()
            _say(
                f"profiled steps {self.start}-{step} into {self.trace_dir} "
                f"(python -m gla_jax.profile_summary {self.trace_dir})"
            )

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def main(config: ml_collections.ConfigDict, workdir: str, *, dry_run: bool = False) -> dict:
    """Trains (or, with dry_run, only describes) the model; returns the last logged metrics."""
    multihost.maybe_initialize_distributed(config)
    if config.compilation_cache_dir:
        # Large models compile for minutes; a persistent cache makes reruns and resumes start fast.
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    check_config(config, num_devices=jax.device_count())
    mesh = sharding_lib.make_mesh(config.mesh)
    run = build_run(config, mesh)
    print(describe(run), flush=True)
    if dry_run:
        return {"parameters": run.num_params}

    data_lib.check_vocab(data_lib.make_tokenizer(config.data), config.model.vocab_size)
    # The checkpointer refuses a workdir it cannot keep (a URL) before anything is written.
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.keep_checkpoints,
        keep_period=config.keep_period,
        async_save=config.async_checkpoint,
    )
    os.makedirs(workdir, exist_ok=True)
    train_iter = data_lib.make_lm_dataset(
        config.data,
        seq_len=config.seq_len,
        global_batch_size=config.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        split="train",
    )
    if config.eval_every:
        eval_batches(config)  # a bad eval split fails now, not after eval_every steps
    latest = checkpointer.latest_step()
    init_s = None
    if latest is None:
        _say("initializing the parameters and the optimizer state (compile included)")
        started = time.time()
        state = jax.block_until_ready(initialize_state(run))
        init_s = time.time() - started
        _say(f"initialized a new run in {workdir} ({init_s:.1f} s)")
    else:
        abstract = with_shardings(run.abstract_state, run.state_shardings)
        try:
            state, data_state = checkpointer.restore(latest, abstract)
        except Exception as err:
            changed = _changed_model_fields(config, workdir)
            if not changed:
                raise
            raise ValueError(
                f"cannot resume {workdir} at step {latest}: config.model differs from the run's "
                f"config.json ({changed}); resume with the saved model settings or use a new "
                "workdir"
            ) from err
        train_iter.set_state(multihost.this_process_data_state(data_state))
        _say(f"resumed from step {latest} in {workdir}")
    # Written only once the state is restored or made, so a refused resume keeps the run's own.
    _save_config(config, workdir)

    train, evaluate = compile_steps(run)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    start_step = int(state["step"])
    if init_s is not None:
        writer.write(start_step, {"init_s": init_s})
    progress = Progress(config.steps, start_step)
    peak = peak_flops_per_device(config)
    flops_per_token = 6 * run.num_params + mixer_flops_per_token(config.model, config.seq_len)
    tokens_per_step = config.batch_size * config.seq_len
    _Stop.install()
    last = {}
    skipped_before = int(state["nonfinite"]["skipped"])
    window_start, window_steps = time.time(), 0
    step = start_step
    profiler = StepProfiler(
        config.profile_start_step, config.profile_steps, os.path.join(workdir, "profile")
    )
    try:
        while step < config.steps:
            batch = _global_batch(next(train_iter), mesh)
            profiler.before_step(step + 1)
            step_start = time.time()
            state, metrics = train(state, batch)
            step += 1
            profiler.after_step(step, state)
            window_steps += 1
            # The host reads the step's results only when it logs, so steps stay queued on the
            # devices; a non-finite step was already left unapplied inside the step itself.
            if step % config.log_every == 0 or step == config.steps:
                metrics = jax.device_get(metrics)
                skipped_before = _check_nonfinite(metrics, skipped_before, step, config)
                elapsed = time.time() - window_start
                last = {
                    "loss": float(metrics["loss"]),
                    "learning_rate": float(metrics["learning_rate"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "skipped_steps": int(metrics["skipped"]),
                }
                # A window holding this process's first step holds its compile too (recorded
                # apart as first_step_s), so it reports no throughput.
                tokens_per_s = None
                if step > start_step + 1:
                    tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                    last["tokens_per_s"] = tokens_per_s
                    last["mfu"] = (
                        tokens_per_s * flops_per_token / (peak * jax.device_count())
                        if peak
                        else None
                    )
                writer.write(step, last)
                if jax.process_index() == 0:
                    progress.update(step, last["loss"], tokens_per_s)
                window_start, window_steps = time.time(), 0
            if step == start_step + 1:
                _record_first_step(writer, step, metrics, step_start)
                window_start, window_steps = time.time(), 0
            if step % config.checkpoint_every == 0 or step == config.steps or _Stop.requested:
                checkpointer.save(
                    step,
                    state,
                    multihost.gather_data_states(train_iter.get_state()),
                    force=True,
                )
            if _Stop.requested:
                _say(f"SIGTERM: checkpoint saved at step {step}; exiting")
                break
            # After the save: a failing evaluation then loses no training.
            if config.eval_every and step % config.eval_every == 0:
                eval_loss = evaluate_loss(run, evaluate, state["params"], config)
                writer.write(step, {"eval_loss": eval_loss})
                window_start, window_steps = time.time(), 0
    finally:
        profiler.close()
        checkpointer.close()
        progress.close()
        writer.close()
    if step >= config.steps and config.num_samples and jax.process_index() == 0:
        write_samples(run, state["params"], config, workdir)
    return last


def write_samples(run: Run, params, config, workdir) -> None:
    """A few continuations of the corpus's first characters, into WORKDIR/samples.txt."""
    from gla_jax.sampling import generate  # noqa: PLC0415 - sampling is only needed here

    tokenizer = data_lib.make_tokenizer(config.data)
    model = nnx.merge(run.graphdef, params)
    prompt = np.asarray([tokenizer.encode(config.sample_prompt)] * config.num_samples, np.int32)
    out = generate(
        model,
        jnp.asarray(prompt),
        max_new_tokens=config.sample_length,
        rng=jax.random.key(config.seed),
        temperature=config.sample_temperature,
    )
    texts = [tokenizer.decode([int(t) for t in row]) for row in np.asarray(out)]
    with open(os.path.join(workdir, "samples.txt"), "w", errors="replace") as f:
        for i, text in enumerate(texts):
            f.write(
                f"--- sample {i} (step {config.steps}, temperature "
                f"{config.sample_temperature})\n{text}\n"
            )
    _say(f"samples written to {os.path.join(workdir, 'samples.txt')}")
