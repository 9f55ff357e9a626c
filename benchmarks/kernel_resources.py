"""Each pallas_gpu kernel's registers, spilled bytes and shared memory on an sm_90 GPU, found
without one. The op's forward+backward is lowered for CUDA on the CPU, each kernel's Triton IR is
compiled for sm_90 by the `triton` package (`pip install -e ".[triton]"`), and cuobjdump reads the
resources from the cubin. So what a launch setting does to a kernel's registers is known before
device time is spent timing it:

  python -m benchmarks.kernel_resources --shapes 16x128x128,4x256x512 --variants ";grad_warps=8"

`--loops` adds the instructions in the body of each loop of a kernel (its conditional blocks
included), counted by class from its machine code (loads, spills, barriers, tensor-core
products, exponentials, shuffles), to compare variants' per-step work; `--sass DIR` writes
the machine code itself, to read where in a loop each thing sits (BENCHMARKS.md, versions 7.12
and 7.13).

A kernel that needs more than its 255 registers a thread keeps the rest in a stack frame in local
memory (the "spill" column, bytes a thread): every access is a round trip through L1 or further.
The compile is the `triton` package's pipeline, not the one built into the GPU jaxlib, so a figure
close to a limit may come out differently there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from benchmarks.kernels import TOKENS, parse_spec
from pallas_kernels.gla import api, gpu, tuning

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size


@dataclasses.dataclass(frozen=True)
class Launch:
    name: str
    num_warps: int
    num_stages: int
    ttir: str  # the kernel's Triton IR, as text


def op_for_cuda(
    batch,
    seq_len,
    heads,
    key_dim,
    value_dim,
    dtype,
    *,
    gate_dtype=None,
    chunk=api.DEFAULT_CHUNK_SIZE,
    settings=None,
    keep_states=False,
):
    """The pallas_gpu op's forward+backward as it lowers for a GPU (not interpreted), jitted, and
    abstract inputs (q, k, v, g, do) of this shape, with no initial state and no final state (as
    the benchmark calls it); g in ``gate_dtype`` (default ``dtype``). ``settings``: GpuConfig
    fields over the tuned or heuristic launch settings; ``keep_states``: the backward reads the
    forward's chunk states (``chunk_gla``'s option)."""
    opts = api.Options("pallas_gpu", key_dim**-0.5, chunk, False, output_final_state=False)
    padded = gpu.padded_dim(key_dim), gpu.padded_dim(value_dim)
    config = tuning.config_for(*padded, dtype, interpret=False)
    config = dataclasses.replace(config, **(settings or {}))

    def forward_and_backward(q, k, v, g, do):
        o, _, states = gpu.forward_keeping_states(q, k, v, g, None, None, opts, config)
        states = states if keep_states else None
        grads = gpu.backward(q, k, v, g, None, None, do, None, opts, config, states=states)
        return o, grads[:4]

    sd = jax.ShapeDtypeStruct
    keys = sd((batch, seq_len, heads, key_dim), dtype)
    values = sd((batch, seq_len, heads, value_dim), dtype)
    gates = sd(keys.shape, gate_dtype or dtype)
    return jax.jit(forward_and_backward), (keys, keys, values, gates, values)


def export_for_cuda(call, args) -> jax.export.Exported:
    """``call`` lowered for CUDA on any machine: the Triton kernels' custom calls, which
    jax.export would refuse as not stable across versions, are allowed."""
    return jax.export.export(
        call,
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)


def pallas_calls(jaxpr):
    """Every pallas_call equation of ``jaxpr``, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for inner in jax_core.jaxprs_in_params(eqn.params):
            yield from pallas_calls(inner)


def _launch_settings(jaxpr) -> dict[str, tuple[int, int]]:
    """name -> (num_warps, num_stages) of every pallas_call in ``jaxpr``."""
    return {
        eqn.params["name"]: (
            eqn.params["compiler_params"].num_warps,
            eqn.params["compiler_params"].num_stages,
        )
        for eqn in pallas_calls(jaxpr)
    }


def kernel_launches(
    seq_len, heads, key_dim, value_dim, settings="", batch=None, chunk=api.DEFAULT_CHUNK_SIZE
):
    """One ``Launch`` per kernel of the op's bfloat16 forward+backward at this shape (B =
    TOKENS // seq_len unless given), under the tuned or heuristic GPU settings with ``settings``
    ("name=json,...", as --set takes them) over them."""
    # Private: the Pallas Triton lowering has no public hook that hands out the IR it builds.
    from jax._src.pallas.triton import lowering

    batch = batch or TOKENS // seq_len
    fields, options = parse_spec(settings)
    call, args = op_for_cuda(
        batch,
        seq_len,
        heads,
        key_dim,
        value_dim,
        jnp.bfloat16,
        chunk=chunk,
        settings=fields,
        keep_states=options.get("keep_states", False),
    )

    modules = {}
    lower = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        result = lower(*a, **kw)
        text = result.module.operation.get_asm(enable_debug_info=False)
        name = re.search(r"tt\.func public @(\w+)", text).group(1)
        modules.setdefault(name, text)
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        export_for_cuda(call, args)
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    launch_settings = _launch_settings(jax.make_jaxpr(call)(*args).jaxpr)
    missing = sorted(set(launch_settings) - set(modules))
    if missing:
        raise RuntimeError(f"no Triton IR was captured for {missing}: did the lowering change?")
    return [Launch(name, *launch_settings[name], modules[name]) for name in sorted(modules)]


def parse_resource_usage(text: str) -> dict:
    """registers and stack (spilled bytes a thread) from cuobjdump's --dump-resource-usage
    output for a one-kernel cubin."""
    line = next(line for line in text.splitlines() if "REG:" in line)
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    return dict(registers=int(fields["REG"]), stack=int(fields["STACK"]))


# The instruction classes ``sass_loops`` counts: global loads (LDG; LDGSTS copies to shared
# memory) and stores, spill reloads and stores (LDL, STL), barriers, tensor-core products
# (HGMMA), special functions such as exp2 (MUFU), cross-lane shuffles, shared-memory traffic.
LOOP_CLASSES = ("LDG", "LDGSTS", "STG", "LDL", "STL", "BAR", "HGMMA", "MUFU", "SHFL", "STS", "LDS")


def sass_loops(sass: str, min_instructions: int = 50) -> list[dict]:
    """Each loop in a kernel's SASS (cuobjdump -sass): a branch back to an earlier address, with
    at least ``min_instructions`` from there to the branch. Gives its address range, instruction
    count and count of each ``LOOP_CLASSES`` class, in address order of the branches. The body's
    conditional blocks are counted, whether or not a given iteration runs them."""
    instructions = [
        (int(address, 16), text.split())
        for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;\n]*);", sass)
    ]

    def opcode(words):  # "@!P0 BRA 0x2480" -> "BRA"; "MUFU.EX2 R1, R2" -> "MUFU"
        return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]

    loops = []
    for address, words in instructions:
        if opcode(words) != "BRA" or not words[-1].startswith("0x"):
            continue
        target = int(words[-1], 16)
        body = [opcode(w) for a, w in instructions if target <= a <= address]
        if target < address and len(body) >= min_instructions:
            counts = {name: body.count(name) for name in LOOP_CLASSES}
            loops.append(dict(start=target, end=address, instructions=len(body), **counts))
    return loops


def compile_resources(launch: Launch, sass_path: str | None = None) -> dict:
    """``launch`` compiled for sm_90: registers and spilled bytes a thread (cuobjdump), the
    shared memory its pipeline stages take (Triton's metadata, bytes) and its loops
    (``sass_loops``). With ``sass_path`` the machine code is also written there."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as err:
        raise SystemExit('needs the triton package: pip install -e ".[triton]"') from err
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, without its warning
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = shutil.which("cuobjdump", path=bundled) or shutil.which("cuobjdump")
    if cuobjdump is None:
        raise SystemExit("cuobjdump not found (the triton package bundles it on Linux x86-64)")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, f"{launch.name}.ttir")
        with open(source, "w") as f:
            f.write(launch.ttir)
        options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
        kernel = triton.compile(source, target=GPUTarget(*SM90), options=options)
        cubin = os.path.join(tmp, f"{launch.name}.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run(
            [cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    if sass_path:
        with open(sass_path, "w") as f:
            f.write(sass)
    return dict(parse_resource_usage(usage), shared=kernel.metadata.shared, loops=sass_loops(sass))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="16x128x128,4x256x512", help="H x K x V, ','-separated")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=api.DEFAULT_CHUNK_SIZE, help="chunk_size")
    parser.add_argument(
        "--variants", default="", help="';'-separated --set specs ('' first: the default)"
    )
    parser.add_argument("--kernels", default="", help="only these kernels (gla_ names, ',')")
    parser.add_argument("--loops", action="store_true", help="also each loop body's instructions")
    parser.add_argument("--sass", default="", help="also write each kernel's SASS to this folder")
    args = parser.parse_args()
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    wanted = set(filter(None, args.kernels.split(",")))
    print("| shape | settings | kernel | warps | stages | registers | spill B | shared KiB |")
    print("|---|---|---|---|---|---|---|---|")
    loop_rows = []
    for shape in args.shapes.split(","):
        heads, key_dim, value_dim = (int(x) for x in shape.split("x"))
        for spec in args.variants.split(";"):
            for launch in kernel_launches(
                args.seq_len, heads, key_dim, value_dim, spec, chunk=args.chunk
            ):
                if wanted and launch.name not in wanted:
                    continue
                sass_path = args.sass and os.path.join(
                    args.sass, f"{shape}-{spec or 'default'}-{launch.name}.sass"
                )
                r = compile_resources(launch, sass_path)
                label = f"| {shape} | {spec or 'default'} | {launch.name} |"
                print(
                    f"{label} {launch.num_warps} | {launch.num_stages} | {r['registers']} | "
                    f"{r['stack']} | {r['shared'] / 1024:.0f} |",
                    flush=True,
                )
                for loop in r["loops"] if args.loops else []:
                    counts = " | ".join(str(loop[name]) for name in LOOP_CLASSES)
                    loop_rows.append(
                        f"{label} {loop['start']:#x}-{loop['end']:#x} | {loop['instructions']} | "
                        f"{counts} |"
                    )
    if args.loops:
        print("\nEach loop body's instructions, by class:\n")
        print(f"| shape | settings | kernel | loop | all | {' | '.join(LOOP_CLASSES)} |")
        print("|---" * (5 + len(LOOP_CLASSES)) + "|")
        print("\n".join(loop_rows))


if __name__ == "__main__":
    main()
