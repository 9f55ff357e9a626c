"""Pallas kernels for gated linear attention (no Flax, no training code)."""

import os


def _route_no_cpu_fusions_to_ynnpack():
    """XLA:CPU in jaxlib 0.10 hands fused elementwise and reduce work to YNNPACK by default, and
    on AVX2-only x86 hosts (AMD EPYC, 2 cores) the gradient of the op's 'xla' backend then
    crashes the process with a segmentation fault (intra_chunk_scores' key gradient at 2 rows x
    2 heads; a ten-line jax.grad reproduces it). An empty fusion list routes nothing there.

    XLA reads its flags when the first backend starts, so this runs at import, before any
    computation. Only for the jaxlib versions known to have the flag (0.10 here, 0.11 on the GPU
    machines): XLA aborts on a flag it does not know. A caller's own setting is left alone."""
    import jaxlib

    flag = "--xla_cpu_experimental_ynn_fusion_type"
    flags = os.environ.get("XLA_FLAGS", "")
    if jaxlib.__version__.startswith(("0.10.", "0.11.")) and flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}=".strip()


_route_no_cpu_fusions_to_ynnpack()
