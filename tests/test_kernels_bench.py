"""The kernel benchmark's parts that run on the CPU (the timing itself needs a GPU): the gates each
--gate_regimes regime promises, the tuner's candidates, --breakdown in interpret mode, --set and
--profile's trace reading."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks.kernels import RESET_EVERY, gla_inputs, with_gate_regime


def test_gate_regimes_make_the_promised_gates():
    _, _, _, g, _ = gla_inputs(8, 2048, 2, 16, 16)
    assert with_gate_regime(g, "mild") is g
    resets = with_gate_regime(g, "resets")
    starts = resets == -120.0
    # A document start sets every head and K of its token; elsewhere the gates are unchanged.
    assert bool(jnp.all(starts.all(axis=(2, 3)) == starts.any(axis=(2, 3))))
    assert bool(jnp.all(jnp.where(starts, True, resets == g)))
    count = int(starts[..., 0, 0].sum())
    expected = g.shape[0] * g.shape[1] / RESET_EVERY
    assert 0.3 * expected <= count <= 3 * expected
    strong = with_gate_regime(g, "strong").astype(jnp.float32)
    assert bool(jnp.all(jnp.abs(strong - (g.astype(jnp.float32) - 2.0)) <= 0.02))


def test_unknown_gate_regime_is_refused():
    _, _, _, g, _ = gla_inputs(1, 64, 1, 16, 16)
    with pytest.raises(ValueError, match="gate regime"):
        with_gate_regime(g, "weak")


def test_tuner_candidates_are_valid_settings():
    """Every candidate of benchmarks/tune_gpu.py names GpuConfig fields, and every family says
    which kernels it times: a misspelt field would only fail on the GPU, mid-run."""
    import dataclasses

    from benchmarks import kernels, tune_gpu
    from pallas_kernels.gla import tuning

    base = tuning.heuristic(128, 128, jnp.bfloat16)
    for family, candidates in tune_gpu.FAMILIES.items():
        assert candidates, family
        for switches in ({}, dict(paired_walks=False)):
            timed = tune_gpu.family_kernels(family, dataclasses.replace(base, **switches))
            assert timed and set(timed) <= set(kernels.KERNEL_STAGES), (family, timed)
        for fields in candidates:
            dataclasses.replace(base, **fields)


def test_breakdown_times_every_kernel_stage_in_interpret_mode(capsys):
    """``--breakdown --interpret``: every pallas_gpu kernel stage builds and runs on the CPU
    (the tuner times the same stages), each printing one finite time."""
    import json
    import math

    from benchmarks.kernels import KERNEL_STAGES, breakdown

    breakdown(64, 2, 32, 32, interpret=True, tokens=128)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "stage" in line]
    stages = {row["stage"] for row in rows}
    assert stages == {"prepare (XLA: layout)", *KERNEL_STAGES}
    assert len(rows) == len(stages)
    assert all(math.isfinite(row["ms"]) and row["ms"] > 0 for row in rows)


def test_set_overrides_the_launch_settings_and_names_unknown_fields(monkeypatch):
    from benchmarks import kernels
    from pallas_kernels.gla import tuning

    monkeypatch.setattr(tuning, "config_for", tuning.config_for)  # restored after the test
    kernels.override_config("paired_walks=false,state_block_v=32")
    config = tuning.config_for(128, 128, jnp.bfloat16, interpret=False)
    assert config.paired_walks is False and config.state_block_v == 32
    with pytest.raises(SystemExit, match="paired_walk"):
        kernels.override_config("paired_walk=false")


def test_set_carries_op_options_to_the_ops_it_builds(monkeypatch):
    from benchmarks import kernels
    from pallas_kernels.gla import tuning

    monkeypatch.setattr(tuning, "config_for", tuning.config_for)  # restored after the test
    monkeypatch.setattr(kernels, "_op_options", {})
    kernels.override_config("keep_states=true,state_block_v=32,initial_state=true")
    assert kernels._op_options == {"keep_states": True, "initial_state": True}
    assert tuning.config_for(128, 128, jnp.bfloat16, interpret=False).state_block_v == 32
    calls = []
    monkeypatch.setattr(kernels, "chunk_gla", lambda *a, **kw: calls.append(kw) or (a[0], None))
    x, v = jnp.zeros((1, 16, 2, 16)), jnp.zeros((1, 16, 2, 8))
    kernels.gla_fns("pallas_gpu")[0](x, x, v, x)
    kernels.gla_fns("xla")[0](x, x, v, x)
    assert calls[0]["keep_states"] is True and "keep_states" not in calls[1]
    # initial_state=true: a zero [N, H, K, V] state, for pallas_gpu only.
    assert calls[0]["initial_state"].shape == (1, 2, 16, 8) and calls[1]["initial_state"] is None
    kernels.override_config("output_final_state=true")
    assert kernels._op_options == {"output_final_state": True}
    kernels.override_config("")
    assert kernels._op_options == {}


def test_profile_sums_each_kernels_time_per_call():
    """``--profile``: a trace of 2 calls, each launching a twice and b once, gives a's and b's
    time per call, their launches per call and shares, the longest first."""
    from benchmarks.kernels import kernel_times

    events = [("a", 1e6), ("b", 3e6), ("a", 2e6), ("a", 1e6), ("b", 6e6), ("a", 4e6)]
    rows = kernel_times(events, calls=2)
    assert [r["kernel"] for r in rows] == ["b", "a"]
    assert rows[0] == dict(kernel="b", launches=1.0, ms=4.5, share=9 / 17)
    assert rows[1] == dict(kernel="a", launches=2.0, ms=4.0, share=8 / 17)
    assert kernel_times([], calls=3) == []


def test_profile_finds_no_gpu_kernels_in_a_cpu_trace(tmp_path):
    from benchmarks.kernels import traced_kernels

    f = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        f(x).block_until_ready()
    assert list(tmp_path.rglob("*.xplane.pb"))
    assert traced_kernels(str(tmp_path)) == []


def _launch_arrays(jaxpr):
    """(name, input avals, output avals) of every pallas_call in ``jaxpr``, nested ones included."""
    from benchmarks.kernel_resources import pallas_calls

    return [
        (eqn.params["name"], [x.aval for x in eqn.invars], list(eqn.params["out_avals"]))
        for eqn in pallas_calls(jaxpr)
    ]


@pytest.mark.parametrize("settings", ["", "paired_walks=false"])
def test_profile_traffic_model_matches_each_launchs_arrays(settings, monkeypatch):
    """``--profile``'s traffic model (``kernel_bytes``, written by hand) against the arrays that
    each pallas_call of the op's forward+backward takes and gives, read from its jaxpr: every
    launch is modelled, and each figure is the bytes of its arrays less those touched only for
    chunks on the exact path, which mild gates never send there: the per-token float32 arrays
    (b and A of the exact chunks), and all but the spans of the launches that only pass over
    factorizable chunks."""
    from benchmarks import kernels
    from pallas_kernels.gla import tuning

    monkeypatch.setattr(tuning, "config_for", tuning.config_for)  # restored after the test
    kernels.override_config(settings)
    batch, seq_len, heads, key_dim, value_dim = 2, 128, 2, 32, 64
    q, k, v, g, do = gla_inputs(batch, seq_len, heads, key_dim, value_dim)

    def loss(q, k, v, g):
        o, _ = kernels.chunk_gla(q, k, v, g, backend="pallas_gpu", interpret=True)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

    launches = _launch_arrays(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, g))
    model = kernels.kernel_bytes(batch, seq_len, heads, key_dim, value_dim)
    spans_only = {"gla_exact_scores", "gla_query_key_grads_exact"}

    def size(aval):
        return aval.size * aval.dtype.itemsize

    def exact_only(aval):
        return aval.dtype == jnp.float32 and aval.ndim == 4 and aval.shape[1] == seq_len

    names = set()
    for name, inputs, outputs in launches:
        names.add(name)
        if name in spans_only:
            expected = size(inputs[0])
        else:
            expected = sum(size(a) for a in inputs + outputs if not exact_only(a))
        assert model[name] == expected, name
    unpaired = "paired_walks=false" in settings
    walks = {"gla_chunk_states", "gla_state_grads"} if unpaired else {"gla_backward_walks"}
    assert walks <= names and "gla_query_key_grads" in names


def test_packed_rows_hold_the_same_sequences():
    """``--packed``: one row of B sequences, whose cu_seqlens mark the original rows; the op on
    it gives the batched op's outputs."""
    from benchmarks.kernels import gla_fns, gla_inputs, packed

    q, k, v, g, _ = gla_inputs(3, 20, 2, 16, 8)
    (pq, pk, pv, pg), cu = packed(3, 20, q, k, v, g)
    assert pq.shape == (1, 60, 2, 16) and pv.shape == (1, 60, 2, 8)
    assert cu.tolist() == [0, 20, 40, 60]
    batched = gla_fns("xla")[0](q, k, v, g)
    one_row = gla_fns("xla", cu_seqlens=cu)[0](pq, pk, pv, pg)
    err = jnp.max(jnp.abs(one_row.reshape(batched.shape).astype(float) - batched.astype(float)))
    assert float(err) < 2e-2, err


def test_variants_time_each_setting_under_its_own_override(monkeypatch):
    """``--variants``: every shape is timed once per variant, each traced while its settings are
    in force, and fwd+bwd is given as a ratio to the first variant's."""
    from benchmarks import kernels
    from pallas_kernels.gla import tuning

    monkeypatch.setattr(tuning, "config_for", tuning.config_for)  # restored after the test
    monkeypatch.setattr(kernels, "op_inputs", lambda *shape: ((None,) * 5, None))

    def fake_measure(name, fns, fwd_args, bwd_args, **shape):
        # What a launch traced now would get; fwd+bwd "time" made from it to check the ratio.
        block_v = tuning.config_for(128, 128, jnp.bfloat16, interpret=False).state_block_v
        return dict(op=name, fwd_ms=1.0, fwdbwd_ms=float(block_v), fwdbwd_temp_mib=0.0, **shape)

    monkeypatch.setattr(kernels, "measure", fake_measure)
    rows = kernels.run_variants([1024], ["state_block_v=64", "state_block_v=32"], paper=True)
    assert [(r["T"], r["H"]) for r in rows] == [(1024, 16), (1024, 16), (1024, 4), (1024, 4)]
    assert [r["op"] for r in rows[:2]] == [
        "pallas_gpu [state_block_v=64]",
        "pallas_gpu [state_block_v=32]",
    ]
    assert [r["ratio"] for r in rows] == [1.0, 0.5, 1.0, 0.5]
    assert "(0.500x)" in kernels.table(rows)
    with pytest.raises(SystemExit, match="state_blok_v"):
        kernels.run_variants([1024], ["", "state_blok_v=32"], paper=False)


RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function gla_query_key_grads:
  REG:255 STACK:576 SHARED:1024 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_reads_registers_and_spills():
    from benchmarks.kernel_resources import parse_resource_usage

    assert parse_resource_usage(RESOURCE_USAGE) == dict(registers=255, stack=576)


SASS = """
        Function : gla_demo
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;           /* 0x0000000404027981 */
.L_x_0:
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0000000000007b1d */
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;       /* 0x0000000406087981 */
        /*0040*/                   MUFU.EX2 R3, R3 ;                      /* 0x0000000300037308 */
        /*0050*/              @!P0 BRA 0x70 ;                             /* 0x0000000000008947 */
        /*0060*/                   LDL R9, [R1+0x8] ;                     /* 0x0000080001097983 */
        /*0070*/                   MUFU.EX2 R5, R5 ;                      /* 0x0000000500057308 */
        /*0080*/               @P1 BRA 0x20 ;                             /* 0xfffffffc00fc7947 */
        /*0090*/                   EXIT ;                                 /* 0x000000000000794d */
        /*00a0*/                   BRA 0xa0;                              /* 0xfffffffc00fc7947 */
"""


def test_sass_loops_counts_one_iteration_by_class():
    """``--loops``: the body between a backward branch and its target, counted by class; a
    forward branch, and a branch to itself, are not loops."""
    from benchmarks.kernel_resources import sass_loops

    (loop,) = sass_loops(SASS, min_instructions=2)
    assert (loop["start"], loop["end"], loop["instructions"]) == (0x20, 0x80, 7)
    assert (loop["LDG"], loop["BAR"], loop["MUFU"], loop["LDL"], loop["STG"]) == (1, 1, 2, 1, 0)
    assert sass_loops(SASS, min_instructions=8) == []


def test_kernel_resources_capture_every_kernel_with_its_launch_settings():
    """``benchmarks/kernel_resources.py``: the op lowered for CUDA on the CPU hands over one Triton
    IR module per kernel, each with the warps and stages its launch asks for under --set."""
    from benchmarks.kernel_resources import kernel_launches
    from tests.test_gla_gpu import KERNELS

    launches = kernel_launches(128, 2, 32, 64, "grad_warps=8,scores_warps=2", batch=1)
    by_name = {launch.name: launch for launch in launches}
    assert set(by_name) == set(KERNELS)
    for launch in launches:
        assert f"tt.func public @{launch.name}(" in launch.ttir
    assert by_name["gla_query_key_grads"].num_warps == 8
    assert by_name["gla_query_key_grads_exact"].num_warps == 8
    assert by_name["gla_exact_scores"].num_warps == 2
    assert by_name["gla_chunk_outputs"].num_warps == 4


def test_kernel_resources_compile_for_sm90(tmp_path):
    """The whole chain where the triton extra is installed: a kernel compiled for sm_90, its
    registers read from the cubin and its machine code written out."""
    pytest.importorskip("triton")
    from benchmarks.kernel_resources import compile_resources, kernel_launches

    launch = next(
        launch
        for launch in kernel_launches(128, 2, 32, 64, batch=1)
        if launch.name == "gla_chunk_states"
    )
    sass_path = str(tmp_path / "chunk_states.sass")
    resources = compile_resources(launch, sass_path)
    assert 16 <= resources["registers"] <= 255 and resources["stack"] >= 0
    assert resources["shared"] > 0
    with open(sass_path) as f:
        sass = f.read()
    assert "gla_chunk_states" in sass and "EXIT" in sass
    # The walk over the chunks is one loop, storing a state and taking a matmul a step.
    (walk,) = resources["loops"]
    assert walk["instructions"] >= 50 and walk["STG"] > 0 and walk["HGMMA"] > 0
