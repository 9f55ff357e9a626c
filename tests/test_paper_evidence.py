"""benchmarks/paper_evidence.py: the job runner (order, failures, time budget), the tables and
plots, the GPU runs' train.py flags (checked by --dry_run), and the smoke mode end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import child_jobs, evidence_tables, paper_evidence  # noqa: E402


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def run(jobs, *, concurrency=2, train_in=30.0, hard_in=60.0, grace=60.0):
    now = time.time()
    child_jobs.run_jobs(
        jobs,
        concurrency=concurrency,
        train_deadline=now + train_in,
        hard_deadline=now + hard_in,
        stop_grace_s=grace,
        poll_s=0.05,
        progress_every_s=1000,
    )
    return time.time() - now


# A "trainer" that checkpoints on SIGTERM: says so and exits 0, as train.py does.
STOPPABLE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (print('saved and stopped', flush=True), "
    "sys.exit(0)))\n"
    "print('training', flush=True)\n"
    "time.sleep(30)\n"
)


# --------------------------------------------------------------------------------------------
# The job runner
# --------------------------------------------------------------------------------------------


def test_jobs_run_their_commands_in_order_into_one_log(tmp_path):
    log = tmp_path / "a.log"
    job = child_jobs.Job("a", [python("print('one')"), python("print('two')")], str(log))
    run([job])
    assert job.status == "done" and not job.stopped_early
    text = log.read_text()
    assert text.index("one") < text.index("two") and text.count("$ ") == 2


def test_a_failed_command_ends_only_its_own_job(tmp_path):
    bad = child_jobs.Job(
        "bad", [python("raise SystemExit(3)"), python("print('never')")], str(tmp_path / "b.log")
    )
    good = child_jobs.Job("good", [python("print('fine')")], str(tmp_path / "g.log"))
    run([bad, good], concurrency=1)
    assert bad.status == "failed" and bad.error == "training exited with 3"
    assert "never" not in (tmp_path / "b.log").read_text()
    assert good.status == "done"


def test_training_deadline_stops_training_cleanly_then_evaluates(tmp_path):
    log = tmp_path / "t.log"
    job = child_jobs.Job("t", [python(STOPPABLE), python("print('evaluated')")], str(log))
    queued = child_jobs.Job("queued", [python("print('x')")], str(tmp_path / "q.log"))
    elapsed = run([job, queued], concurrency=1, train_in=1.0)
    assert elapsed < 15
    assert job.status == "done" and job.stopped_early
    text = log.read_text()
    assert text.index("saved and stopped") < text.index("evaluated")
    assert queued.status == "skipped"


def test_a_command_that_ignores_the_budget_is_killed(tmp_path):
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    job = child_jobs.Job("s", [python(stubborn)], str(tmp_path / "s.log"))
    elapsed = run([job], train_in=0.5, hard_in=2.0)
    assert elapsed < 15
    assert job.status == "failed" and "killed at the time budget" in job.error


def test_run_facts_read_the_log_and_metrics(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"batch_size": 4, "seq_len": 8}))
    (workdir / "metrics.jsonl").write_text(
        '{"step": 5, "loss": 2.0}\n{"step": 5, "eval_loss": 2.5}\n{"step": 10, "loss": 1.5}\n'
    )
    log = tmp_path / "run.log"
    log.write_text("$ python train.py\nparameters: 1234\nper-device memory: ...\n")
    job = child_jobs.Job("run", [], str(log), workdir=str(workdir), steps=20, status="done")
    facts = child_jobs.run_facts(job)
    assert facts["parameters"] == 1234
    assert (facts["steps"], facts["tokens"], facts["final_loss"]) == (10, 320, 1.5)
    assert evidence_tables.steps_note(facts) == "stopped at 10/20"


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------


def facts(status="done", steps=100, **extra):
    return {
        "status": status,
        "error": "",
        "stopped_early": False,
        "parameters": 1000,
        "steps": steps,
        "steps_planned": 100,
        "tokens": steps * 64,
        **extra,
    }


def perplexity_run(ppl_by_length):
    return {"results": [{"length": n, "perplexity": p} for n, p in ppl_by_length.items()]}


def test_lm_summary_states_both_targets():
    gla = evidence_tables.lm_row("GLA", facts(), perplexity_run({512: 10.4, 8192: 10.0}))
    tfm = evidence_tables.lm_row("Transformer++", facts(), perplexity_run({512: 10.0, 8192: 40}))
    summary = evidence_tables.lm_summary(gla, tfm)
    targets = summary["targets"]
    assert targets["gla_over_transformer_at_train_length"]["value"] == pytest.approx(1.04)
    assert targets["gla_over_transformer_at_train_length"]["met"]
    assert targets["gla_longest_over_train_length"]["value"] == pytest.approx(10.0 / 10.4)
    markdown = evidence_tables.lm_markdown(summary)
    assert "| GLA | 1,000 | 100 |" in markdown and "L=8192" in markdown and "4.000" in markdown
    assert markdown.count(", met") == 2


def test_lm_summary_without_results_says_so():
    gla = evidence_tables.lm_row("GLA", facts("failed", 0, error="training exited with 1"), None)
    tfm = evidence_tables.lm_row("Transformer++", facts(), perplexity_run({512: 10.0}))
    summary = evidence_tables.lm_summary(gla, tfm)
    assert summary["targets"] == {}
    markdown = evidence_tables.lm_markdown(summary)
    assert "failed (training exited with 1)" in markdown and "no result" in markdown


def test_mqar_table_target_and_plot(tmp_path):
    rows = [
        evidence_tables.mqar_row("GLA", 256, 16, facts(), {"accuracy": 0.95}),
        evidence_tables.mqar_row("Transformer++", 256, 16, facts(), {"accuracy": 1.0}),
        evidence_tables.mqar_row("GLA", 512, 64, facts(steps=40, stopped_early=True), None),
    ]
    summary = evidence_tables.mqar_summary(rows, ("GLA", "T=256, 16 pairs"))
    assert summary["targets"]["GLA at T=256, 16 pairs"]["met"]
    markdown = evidence_tables.mqar_markdown(summary)
    assert "| GLA | 95.0% | - (stopped at 40/100) |" in markdown
    assert "| Transformer++ | 100.0% |  |" in markdown
    evidence_tables.plot_mqar_accuracy(summary, str(tmp_path / "bars.png"))
    assert (tmp_path / "bars.png").stat().st_size > 1000
    assert evidence_tables.mqar_summary(rows[1:], ("GLA", "T=256, 16 pairs"))["targets"] == {}


# --------------------------------------------------------------------------------------------
# The GPU runs: every train.py command parses, and the LM pair is matched in size
# --------------------------------------------------------------------------------------------


def test_gpu_train_commands_parse_and_the_lm_pair_matches_in_size(tmp_path):
    lm = paper_evidence.lm_jobs(
        paper_evidence.parse_args(["--experiment=lm", f"--out={tmp_path}"]), steps=1500
    )
    mqar = paper_evidence.mqar_jobs(
        paper_evidence.parse_args(["--experiment=mqar", f"--out={tmp_path}"]), steps=3000
    )
    assert [job.name for job in mqar][:3] == [
        "gla_T256_p16",
        "transformer_T256_p16",
        "gla_no_forget_T256_p16",
    ]
    assert len(mqar) == 12
    # One of each model kind and task size, dry-run in parallel (abstract shapes only).
    chosen = lm + [mqar[2], mqar[-2]]
    processes = [
        subprocess.Popen(
            job.commands[0] + ["--dry_run"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        for job in chosen
    ]
    counts = {}
    for job, process in zip(chosen, processes, strict=True):
        output = process.communicate(timeout=120)[0]
        assert process.returncode == 0, output[-2000:]
        line = next(line for line in output.splitlines() if line.startswith("parameters: "))
        counts[job.name] = int(line.split()[1])
    assert 20e6 < counts["gla"] < 40e6
    assert abs(counts["gla"] / counts["transformer"] - 1) < 0.02


def test_short_conv_goes_to_the_recurrent_mqar_models_only(tmp_path):
    def first_three(*flags):
        args = paper_evidence.parse_args(["--experiment=mqar", f"--out={tmp_path}", *flags])
        return paper_evidence.mqar_jobs(args, steps=10)[:3]

    conv = "--config.model.use_short_conv=True"
    gla, transformer, no_forget = first_three()
    assert conv in gla.commands[0] and conv in no_forget.commands[0]
    assert conv not in transformer.commands[0]
    assert "--label=GLA (gate bias 4) + short conv" in gla.commands[1]
    assert not any(conv in job.commands[0] for job in first_three("--short_conv=false"))
    assert paper_evidence.mqar_target(False, False) == ("GLA (gate bias 4)", "T=256, 16 pairs")


def test_mqar_settings_per_model_come_after_the_shared_recipe(tmp_path):
    """GLA's own lr and gate bias override the recipe (train.py takes the last of a flag)."""
    args = paper_evidence.parse_args(["--experiment=mqar", f"--out={tmp_path}"])
    gla, transformer, no_forget = paper_evidence.mqar_jobs(args, steps=10)[:3]
    lrs = [f for f in gla.commands[0] if f.startswith("--config.learning_rate=")]
    assert lrs[-1] == "--config.learning_rate=0.001"
    assert "--config.model.gate_bias_init=4.0" in gla.commands[0]
    for job in (transformer, no_forget):
        assert "--config.learning_rate=0.003" in job.commands[0]
        assert not any("gate_bias_init" in f for f in job.commands[0])


# --------------------------------------------------------------------------------------------
# Smoke mode, end to end (tiny models on the CPU)
# --------------------------------------------------------------------------------------------


def test_smoke_lm_trains_evaluates_and_summarizes(tmp_path):
    summary = paper_evidence.main(["--experiment=lm", "--smoke", "--steps=4", f"--out={tmp_path}"])
    assert summary["failed"] == []
    assert [row["steps"] for row in summary["rows"]] == [4, 4]
    assert all(len(row["perplexity"]) == 5 for row in summary["rows"])
    assert set(summary["targets"]) == {
        "gla_over_transformer_at_train_length",
        "gla_longest_over_train_length",
    }
    for name in ("summary.md", "summary.json", "perplexity.json", "perplexity.png"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "runs" / "gla" / "checkpoints").exists()
    assert (tmp_path / "logs" / "transformer.log").read_text().count("$ ") == 2


def test_smoke_mqar_one_run(tmp_path):
    summary = paper_evidence.main(
        ["--experiment=mqar", "--smoke", "--steps=3", "--runs=gla_T32_p4", f"--out={tmp_path}"]
    )
    assert summary["failed"] == []
    (row,) = summary["rows"]
    assert row["name"] == "gla_T32_p4" and 0.0 <= row["accuracy"] <= 1.0
    assert "GLA (gate bias 4) + short conv at T=32, 4 pairs" in summary["targets"]
    for name in ("summary.md", "mqar_accuracy.png", "mqar_T32_p4.png"):
        assert (tmp_path / name).is_file(), name
