"""Where a profiled run's device time went: per op and per kind of op, from its jax.profiler trace.

    python train.py --config=configs/gla_340m.py --workdir=runs/p --config.profile_start_step=10
    python -m gla_jax.profile_summary runs/p/profile [--top=25] [--out=runs/p]

Reads the newest ``*.xplane.pb`` under the trace folder. On a GPU it counts the kernels the
device ran (the "XLA Ops" line where the trace has one, else its "Stream" lines); on the CPU
backend, the host threads' XLA op events. Times are per traced step (``profile_steps`` from the
run's config.json, next to the trace folder). Prints a table; with --out writes
profile_summary.json and profile_summary.png there.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re

from absl import app, flags

# Kinds, first match wins: a heuristic on kernel and op names, for orientation only.
KINDS = (
    ("GLA kernel", re.compile(r"gla_", re.I)),
    ("attention", re.compile(r"cudnn|fmha|flash|attention|sdpa", re.I)),
    (
        "collective",
        re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|nccl|collective", re.I),
    ),
    ("matmul", re.compile(r"gemm|cublas|nvjet|xmma|cutlass|matmul|dot|convolution", re.I)),
    ("copy / transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("fusion", re.compile(r"fusion", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


@dataclasses.dataclass
class OpTotal:
    name: str
    kind: str
    calls: int = 0
    total_ns: float = 0.0


def newest_trace(trace_dir: str) -> str:
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(
            f"no *.xplane.pb under {trace_dir!r}: was the run started with "
            "--config.profile_start_step > 0, and did it reach that step?"
        )
    return max(files, key=os.path.getmtime)


def _stat(event, key):
    for name, value in event.stats:
        if name == key:
            return value
    return None


def device_events(path: str):
    """(name, duration_ns) of every op the devices ran in the trace at ``path``."""
    from jax.profiler import ProfileData  # noqa: PLC0415 - loads jaxlib; keep imports light

    data = ProfileData.from_file(path)
    events = []
    device_planes = [p for p in data.planes if p.name.startswith("/device:")]
    for plane in device_planes:
        lines = list(plane.lines)
        chosen = [line for line in lines if line.name == "XLA Ops"] or [
            line for line in lines if line.name.startswith("Stream")
        ]
        for line in chosen:
            events += [(e.name, e.duration_ns) for e in line.events]
    if device_planes:
        return events
    for plane in data.planes:  # the CPU backend: ops run on host threads
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                op = _stat(event, "hlo_op")
                if op is not None and not event.name.startswith("end:"):
                    events.append((str(op), event.duration_ns))
    return events


def summarize(events) -> list[OpTotal]:
    totals: dict[str, OpTotal] = {}
    for name, duration in events:
        total = totals.setdefault(name, OpTotal(name, kind_of(name)))
        total.calls += 1
        total.total_ns += duration
    return sorted(totals.values(), key=lambda t: -t.total_ns)


def traced_steps(trace_dir: str) -> int:
    """profile_steps from the run's config.json beside the trace folder, else 1."""
    path = os.path.join(os.path.dirname(os.path.abspath(trace_dir)), "config.json")
    try:
        with open(path) as f:
            return int(json.load(f).get("profile_steps", 1))
    except (OSError, ValueError, TypeError):
        return 1


def by_kind(ops: list[OpTotal]) -> dict[str, float]:
    kinds = collections.Counter()
    for op in ops:
        kinds[op.kind] += op.total_ns
    return dict(kinds.most_common())


def table(ops: list[OpTotal], steps: int, top: int) -> str:
    total = sum(op.total_ns for op in ops) or 1.0
    per_step = 1e6 * steps
    lines = [
        f"device time per step: {total / per_step:.3f} ms over {steps} traced step(s)",
        "",
        "| kind | ms / step | share |",
        "|---|---|---|",
    ]
    lines += [
        f"| {kind} | {ns / per_step:.3f} | {ns / total:.1%} |" for kind, ns in by_kind(ops).items()
    ]
    lines += ["", "| op | kind | calls / step | ms / step | share |", "|---|---|---|---|---|"]
    lines += [
        f"| {op.name[:60]} | {op.kind} | {op.calls / steps:g} | "
        f"{op.total_ns / per_step:.3f} | {op.total_ns / total:.1%} |"
        for op in ops[:top]
    ]
    return "\n".join(lines)


def write(ops: list[OpTotal], steps: int, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "profile_summary.json"), "w") as f:
        json.dump(
            dict(
                steps=steps,
                by_kind_ms_per_step={k: v / 1e6 / steps for k, v in by_kind(ops).items()},
                ops=[
                    dict(dataclasses.asdict(op), ms_per_step=op.total_ns / 1e6 / steps)
                    for op in ops
                ],
            ),
            f,
            indent=1,
        )
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    kinds = by_kind(ops)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(kinds)[::-1], [v / 1e6 / steps for v in kinds.values()][::-1])
    ax.set_xlabel("device ms per step")
    ax.set_title("where the step's device time goes")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "profile_summary.png"), dpi=120)
    plt.close(fig)


_TOP = flags.DEFINE_integer("top", 25, "Ops listed.")
_OUT = flags.DEFINE_string("out", "", "Folder for profile_summary.json and .png ('' = none).")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m gla_jax.profile_summary TRACE_DIR [--top] [--out]")
    trace_dir = argv[1]
    steps = traced_steps(trace_dir)
    ops = summarize(device_events(newest_trace(trace_dir)))
    if not ops:
        raise SystemExit(f"the trace under {trace_dir!r} holds no device ops")
    print(table(ops, steps, _TOP.value))
    if _OUT.value:
        write(ops, steps, _OUT.value)
        print(f"wrote {_OUT.value}/profile_summary.json and profile_summary.png")


if __name__ == "__main__":
    app.run(main)
