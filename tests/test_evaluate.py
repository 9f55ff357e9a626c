"""gla_jax.evaluate on tiny runs trained here: perplexity by length, buckets, MQAR, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from gla_jax import data as data_lib
from gla_jax import eval_plots, evaluate, trainer
from gla_jax.config_check import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_LEN = 32


def _tiny_config(model_type: str, **model):
    config = base_config()
    config.seq_len = TRAIN_LEN
    config.batch_size = 4
    config.steps = 2
    config.warmup_steps = 1
    config.log_every = 1
    config.eval_every = 0
    config.num_samples = 0
    config.checkpoint_every = 2
    config.async_checkpoint = False
    config.model = ml_collections.ConfigDict(
        dict(
            type=model_type,
            vocab_size=260,
            d_model=32,
            n_layers=1,
            n_heads=2,
            tie_embeddings=True,
            dtype="float32",
            **model,
        )
    )
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One GLA and one Transformer++ workdir, each trained for two steps on the KJV corpus."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for model_type in ("gla", "transformer"):
        made[model_type] = str(root / model_type)
        trainer.main(_tiny_config(model_type), made[model_type])
    return made


def test_bucket_sums_add_up_to_the_totals():
    losses = np.arange(12, dtype=np.float64).reshape(2, 6)
    mask = np.ones((2, 6))
    mask[1, 5] = 0
    positions = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 9]])
    sums, counts = evaluate.bucket_losses(losses, mask, positions, bucket_size=2, num_buckets=3)
    # Bucket 0: positions 0-1 -> losses 0, 1, 6, 7, 8, 9; bucket 1: 2, 3, 10; bucket 2: 4, 5
    # (position 9 is masked out; a position past the last bucket would land in it).
    np.testing.assert_array_equal(counts, [6, 3, 2])
    np.testing.assert_array_equal(sums, [31, 15, 9])
    assert sums.sum() == (losses * mask).sum() and counts.sum() == mask.sum()


def test_perplexity_matches_the_trainers_loss_and_buckets_add_up(runs):
    result = evaluate.perplexity_by_length(
        runs["gla"], [TRAIN_LEN, 2 * TRAIN_LEN], max_batches=2, tokens_per_batch=128, bucket_size=8
    )
    assert [r["length"] for r in result["results"]] == [TRAIN_LEN, 2 * TRAIN_LEN]
    assert result["train_seq_len"] == TRAIN_LEN and result["model_type"] == "gla"
    for r in result["results"]:
        weighted = sum(
            loss * n for loss, n in zip(r["bucket_loss"], r["bucket_tokens"], strict=True) if n
        )
        assert sum(r["bucket_tokens"]) == r["tokens"] > 0
        assert weighted / r["tokens"] == pytest.approx(r["loss"], rel=1e-9)
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert len(r["bucket_loss"]) == r["length"] // 8
    # The same batches scored by the trainer's own loss give the same number.
    model, config = evaluate.load_run(runs["gla"])
    graphdef, params = nnx.split(model, nnx.Param)
    batches = data_lib.make_eval_dataset(
        config.data, seq_len=TRAIN_LEN, global_batch_size=4, num_batches=2
    )
    total = count = 0.0
    for batch in batches:
        t, c = trainer.token_losses(graphdef, params, batch)
        total, count = total + float(t), count + float(c)
    assert result["results"][0]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_transformer_is_evaluated_past_its_training_length(runs):
    result = evaluate.perplexity_by_length(
        runs["transformer"], length_multiples="1,4", max_batches=1, tokens_per_batch=128
    )
    longest = result["results"][-1]
    assert longest["length"] == 4 * TRAIN_LEN and math.isfinite(longest["loss"])
    assert longest["bucket_tokens"][-1] > 0, "positions past the training length were scored"


def test_cli_writes_json_and_plot_for_two_runs(runs, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gla_jax.evaluate",
            f"--workdir={runs['gla']}",
            f"--workdir={runs['transformer']}",
            "--lengths=32,64",
            "--max_batches=1",
            f"--output_dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "L=64" in proc.stdout
    saved = json.loads((out / "perplexity.json").read_text())
    assert [run["label"] for run in saved] == ["gla", "transformer"]
    assert (out / "perplexity.png").stat().st_size > 1000


def test_missing_checkpoint_config_and_workdir_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.load_run(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate.load_run(str(tmp_path))
    (tmp_path / "config.json").write_text(_tiny_config("gla").to_json())
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        evaluate.load_run(str(tmp_path))
    (tmp_path / "checkpoints" / "5").mkdir(parents=True)  # a step folder with nothing in it
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        evaluate.load_run(str(tmp_path))


def test_cli_reports_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gla_jax.evaluate", f"--workdir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: workdir" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_lengths_and_unprepared_datasets_are_refused(runs, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate.perplexity_by_length(runs["gla"], [1])
    with pytest.raises(ValueError, match="comma-separated integers"):
        evaluate.parse_ints("512,1k", "--lengths")
    with pytest.raises(FileNotFoundError, match="tfds build lm1b"):
        evaluate.perplexity_by_length(
            runs["gla"], [32], dataset="lm1b", data_dir=str(tmp_path), max_batches=1
        )
    for name in ("tokens_per_batch", "bucket_size", "max_batches"):
        with pytest.raises(ValueError, match=f"{name} must be >= 0"):
            evaluate.perplexity_by_length(runs["gla"], [32], **{name: -1})
    # Lengths come back sorted and unique, whatever order they were given in.
    result = evaluate.perplexity_by_length(runs["gla"], [64, 32, 64], max_batches=1)
    assert [r["length"] for r in result["results"]] == [32, 64]
    monkeypatch.setattr(evaluate, "MAX_ATTENTION_SCORE_BYTES", 2**20)
    with pytest.raises(ValueError, match="evaluation length 1024: softmax attention"):
        evaluate.perplexity_by_length(runs["transformer"], [32, 1024], tokens_per_batch=1024)


def test_mqar_accuracy_of_a_trained_run(tmp_path, runs):
    config = _tiny_config("gla")
    config.data.name = "mqar"
    config.data.mqar = ml_collections.ConfigDict(dict(num_kv_pairs=4, vocab_size=40))
    workdir = str(tmp_path / "mqar")
    trainer.main(config, workdir)
    result = evaluate.mqar_accuracy(workdir, num_batches=2, batch_size=8)
    assert result["answers"] == 2 * 8 * 4 and result["rows"] == 16
    assert 0 <= result["correct"] <= result["answers"]
    assert result["accuracy"] == result["correct"] / result["answers"]
    longer = evaluate.mqar_accuracy(workdir, seq_len=64, num_kv_pairs=8, num_batches=1)
    assert longer["answers"] == 64 * 8 and longer["seq_len"] == 64
    eval_plots.plot_mqar([{"label": "tiny", **result}], str(tmp_path / "mqar.png"))
    assert (tmp_path / "mqar.png").stat().st_size > 1000
    assert eval_plots.training_losses(workdir)[0] == [1, 2], "the curve comes from metrics.jsonl"
    with pytest.raises(ValueError, match="not on 'mqar'"):
        evaluate.mqar_accuracy(runs["gla"])
    with pytest.raises(ValueError, match="num_batches >= 1 and batch_size >= 1, got 0 and 8"):
        evaluate.mqar_accuracy(workdir, num_batches=0, batch_size=8)
