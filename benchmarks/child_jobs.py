"""Child processes for the benchmark drivers: chains of commands (train, then evaluate), several
at once, each with its own log, under a time budget that stops training cleanly and never hangs.

    job = Job("gla", [train_argv, evaluate_argv], "out/logs/gla.log", workdir="out/runs/gla")
    run_jobs([job, ...], concurrency=2, train_deadline=t0 + 300, hard_deadline=t0 + 400)
    job.status  # 'done' | 'failed' | 'skipped'; run_facts(job) says what the run did
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Job:
    name: str
    commands: list  # argv lists, run one after the other; the first is the training run
    log_path: str
    workdir: str = ""  # the training run's workdir, read for progress lines
    steps: int = 0
    env: dict = dataclasses.field(default_factory=dict)
    phases: tuple = ("training", "evaluating")  # what each command is, for progress lines
    # Filled in while running.
    process: subprocess.Popen | None = None
    command_index: int = -1
    command_started_at: float = 0.0
    status: str = "waiting"  # waiting | running | done | failed | skipped
    error: str = ""
    stopped_early: bool = False  # training was stopped by the time budget


def start_next_command(job: Job) -> None:
    job.command_index += 1
    argv = job.commands[job.command_index]
    with open(job.log_path, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        job.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **job.env},
            start_new_session=True,  # its own process group, so a stop reaches only it
        )
    job.command_started_at = time.time()
    job.status = "running"


def log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def latest_metrics(workdir: str) -> dict:
    """The last training record (with a loss) of WORKDIR/metrics.jsonl, or {}."""
    last = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                if "loss" in record:
                    last = record
    except (OSError, ValueError):
        pass
    return last


def phase(job: Job) -> str:
    index = job.command_index
    return job.phases[index] if index < len(job.phases) else f"command {index + 1}"


def describe_progress(job: Job, now: float) -> str:
    if job.status != "running":
        return f"{job.name}: {job.status}"
    elapsed = now - job.command_started_at
    if job.command_index > 0 or not job.workdir:
        return f"{job.name}: {phase(job)} ({elapsed:.0f}s)"
    record = latest_metrics(job.workdir)
    if not record:
        return f"{job.name}: starting/compiling ({elapsed:.0f}s)"
    return (
        f"{job.name}: step {record['step']}/{job.steps} loss {record['loss']:.3f} "
        f"{record.get('tokens_per_s', 0):,.0f} tok/s"
    )


def signal_group(job: Job, sig: int) -> None:
    try:
        os.killpg(job.process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(job: Job, clock) -> None:
    """A running job whose command ended: start its next command, or mark it done or failed."""
    code = job.process.poll()
    if code is None:
        return
    if code != 0:
        job.status, job.error = "failed", f"{phase(job)} exited with {code}"
        print(f"{clock()} FAILED {job.name}: {job.error}; log {job.log_path} ends:", flush=True)
        print(log_tail(job.log_path), flush=True)
    elif job.command_index + 1 < len(job.commands):
        start_next_command(job)
        print(f"{clock()} {job.name}: {phase(job)}", flush=True)
    else:
        job.status = "done"
        print(f"{clock()} {job.name}: done", flush=True)


def _stop_training(jobs: list[Job], clock) -> None:
    """The training deadline: SIGTERM to every first command still running (the trainer then
    checkpoints and exits 0, and the job goes on to evaluate); jobs not started are skipped."""
    for job in jobs:
        if job.status == "waiting":
            job.status, job.error = "skipped", "no time left to train"
        elif job.status == "running" and job.command_index == 0:
            job.stopped_early = True
            signal_group(job, signal.SIGTERM)
            print(f"{clock()} {job.name}: time budget, stopping {phase(job)}", flush=True)


def _kill(jobs: list[Job], clock, *, first_command_only: bool, reason: str) -> None:
    for job in jobs:
        if job.status != "running" or (first_command_only and job.command_index != 0):
            continue
        signal_group(job, signal.SIGKILL)
        job.process.wait()
        job.status, job.error = "failed", f"{phase(job)} {reason}"
        print(f"{clock()} FAILED {job.name}: {job.error}", flush=True)


def run_jobs(
    jobs: list[Job],
    *,
    concurrency: int,
    train_deadline: float,
    hard_deadline: float,
    progress_every_s: float = 30.0,
    poll_s: float = 0.5,
    stop_grace_s: float = 60.0,
    clock_start: float | None = None,
) -> None:
    """Runs every job's commands in order, ``concurrency`` jobs at a time, until all end.

    A job's first command is its training run. At ``train_deadline`` (a time.time() value)
    training commands get SIGTERM and jobs not yet started are skipped; a training command still
    alive ``stop_grace_s`` later is killed. At ``hard_deadline`` everything still running is
    killed and skipped. A command that exits non-zero ends its job as failed; the others go on.
    Progress lines carry the seconds since ``clock_start`` (default: now).
    """
    start = time.time() if clock_start is None else clock_start
    last_progress = time.time()
    term_sent_at = None

    def clock() -> str:
        return f"[{time.time() - start:5.0f}s]"

    try:
        while True:
            now = time.time()
            for job in jobs:
                if job.status == "running":
                    _reap(job, clock)
            if now >= train_deadline and term_sent_at is None:
                term_sent_at = now
                _stop_training(jobs, clock)
            elif term_sent_at is not None and now - term_sent_at >= stop_grace_s:
                _kill(jobs, clock, first_command_only=True, reason="did not stop after SIGTERM")
            if now >= hard_deadline:
                _kill(jobs, clock, first_command_only=False, reason="killed at the time budget")
            running = sum(job.status == "running" for job in jobs)
            for job in jobs:
                if job.status == "waiting" and running < concurrency:
                    start_next_command(job)
                    running += 1
                    print(f"{clock()} {job.name}: {phase(job)}", flush=True)
            if not any(job.status in ("waiting", "running") for job in jobs):
                return
            if now - last_progress >= progress_every_s:
                last_progress = now
                active = [describe_progress(job, now) for job in jobs if job.status == "running"]
                print(f"{clock()} " + " | ".join(active), flush=True)
            time.sleep(poll_s)
    finally:  # an interrupted driver leaves no child behind
        for job in jobs:
            if job.status == "running" and job.process.poll() is None:
                signal_group(job, signal.SIGKILL)


def run_setup(
    name: str, argv: list[str], log_path: str, timeout_s: float, clock_start: float | None = None
) -> None:
    """One command before the jobs (e.g. preparing the corpus once, not in every trainer);
    RuntimeError if it fails or outlasts ``timeout_s``."""
    job = Job("setup", [argv], log_path, phases=(name,))
    deadline = time.time() + timeout_s
    run_jobs(
        [job],
        concurrency=1,
        train_deadline=deadline,
        hard_deadline=deadline,
        stop_grace_s=0,
        clock_start=clock_start,
    )
    if job.status != "done":
        raise RuntimeError(f"{' '.join(argv)} failed ({job.error}); see {log_path}")


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def parameter_count(log_path: str) -> int | None:
    """The trainer's 'parameters: N' line from a job's log."""
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if line.startswith("parameters: "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def run_facts(job: Job) -> dict:
    """What a run did: its status, size, steps and tokens trained, last training loss."""
    record = latest_metrics(job.workdir)
    config = read_json(os.path.join(job.workdir, "config.json")) or {}
    steps = int(record.get("step", 0))
    return {
        "name": job.name,
        "status": job.status,
        "error": job.error,
        "stopped_early": job.stopped_early,
        "parameters": parameter_count(job.log_path),
        "steps": steps,
        "steps_planned": job.steps,
        "tokens": steps * int(config.get("batch_size", 0)) * int(config.get("seq_len", 0)),
        "final_loss": record.get("loss"),
    }
