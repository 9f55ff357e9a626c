"""Where training metrics go: metrics.jsonl, TensorBoard event files, and the terminal."""

from __future__ import annotations

import json
import os
import sys
import time

from absl import logging


class MetricsWriter:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and mirrors scalars to
    TensorBoard (tensorboardX writes event files without TensorFlow). Only process 0 writes."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the record.
            logging.warning("tensorboardX is not installed: no TensorBoard event files")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    try:
        return float(value) if not isinstance(value, (str, bool, type(None))) else value
    except (TypeError, ValueError):
        return str(value)


class Progress:
    """A one-line progress bar with ETA on a terminal; plain log lines otherwise."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float | None) -> None:
        """``tokens_per_s`` None: not known yet (the window held the compile)."""
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - step)
        speed = "" if tokens_per_s is None else f" {tokens_per_s:,.0f} tok/s"
        line = f"step {step}/{self.total} loss {loss:.4f}{speed} eta {_duration(eta)}"
        if self.tty:
            width = 30
            filled = int(width * step / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}   ")
            sys.stderr.flush()
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
