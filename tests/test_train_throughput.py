"""benchmarks/train_throughput.py: a process and a row per (config, length); failures kept."""

import json
import os
import signal
import subprocess
import sys
import time

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
        assert row["init_s"] > 0 and row["first_step_s"] > 0
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


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_sigterm_stops_the_running_child_too(tmp_path):
    """A driver stopped from outside must not leave its run behind holding the device."""
    parent = subprocess.Popen(
        [sys.executable, SCRIPT, f"--out={tmp_path}", "--configs=tiny", "--steps=100000"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = f"--result={tmp_path}"
    deadline = time.time() + 120
    while not [p for p in _processes_mentioning(marker) if p != parent.pid]:
        assert time.time() < deadline and parent.poll() is None, "the run never started"
        time.sleep(0.2)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 143
    deadline = time.time() + 30
    while _processes_mentioning(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(marker) == []


def test_from_json_merges_sweeps_and_keeps_successes(tmp_path):
    """Rows of several calls in one table; a later success replaces a failed row."""
    row = dict(devices=1, first_step_s=1.0, tokens_per_s=10.0, mfu=None, peak_memory_gib=1.0)
    row.update(first_loss=5.0, last_loss=4.0, batch_size=2)
    first = [
        {**row, "config": "a", "seq_len": 64},
        {"config": "b", "seq_len": 64, "batch_size": 2, "error": "out of memory"},
    ]
    second = [{**row, "config": "b", "seq_len": 64, "tokens_per_s": 20.0}]
    (tmp_path / "1.json").write_text(json.dumps(first))
    (tmp_path / "2.json").write_text(json.dumps(second))
    out = tmp_path / "merged"
    done = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            f"--from_json={tmp_path}/1.json,{tmp_path}/2.json",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "throughput.json").read_text())
    assert [(r["config"], r["tokens_per_s"]) for r in rows] == [("a", 10.0), ("b", 20.0)]
    assert (out / "throughput.png").stat().st_size > 0
