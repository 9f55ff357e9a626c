"""benchmarks/train_throughput.py: a process and a row per (config, length); failures kept."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_throughput.py")


def run(tmp_path, *flags):
    return subprocess.run(
        [
            sys.executable,
            SCRIPT,
            f"--out={tmp_path}",
            "--configs=tiny",
            "--steps=4",
            "--log_every=2",
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )


def test_sweep_keeps_tokens_per_batch_and_writes_rows_and_plot(tmp_path):
    done = run(tmp_path, "--seq_lens=32,64", "--tokens_per_batch=128")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "throughput.json").read_text())
    assert [(r["seq_len"], r["batch_size"]) for r in rows] == [(32, 4), (64, 2)]
    for row in rows:
        assert "error" not in row
        assert row["tokens_per_s"] > 0 and row["steps"] == 4
        assert row["first_loss"] > row["last_loss"] > 0  # four steps of a real run
    assert (tmp_path / "throughput.png").stat().st_size > 0
    # Each run's checkpoint is dropped once measured; its metrics stay.
    for row in rows:
        workdir = tmp_path / "runs" / f"tiny_T{row['seq_len']}_B{row['batch_size']}"
        assert (workdir / "metrics.jsonl").is_file()
        assert not (workdir / "checkpoints").exists()


def test_length_not_dividing_tokens_per_batch_is_refused(tmp_path):
    done = run(tmp_path, "--seq_lens=48", "--tokens_per_batch=128")
    assert done.returncode != 0
    assert "tokens_per_batch=128 is not a multiple of seq_len 48" in done.stderr


def test_failed_run_is_a_row_with_its_error(tmp_path):
    done = run(tmp_path, "--seq_len=32", "--batch_size=2", "--set=learning_rate=-1.0")
    assert done.returncode == 1
    rows = json.loads((tmp_path / "throughput.json").read_text())
    assert len(rows) == 1 and rows[0]["error"].startswith("exit 1")
    assert "learning_rate" in (tmp_path / "tiny_T32_B2.log").read_text()
