"""Block sizes and launch settings of the Pallas GPU kernels, per (K, V, dtype).

``config_for`` looks the padded head dims up in ``TUNED`` (written by benchmarks/tune_gpu.py from
timings on the GPU, kept in tuned_gpu.json beside this file) and otherwise falls back to a
heuristic. In interpret mode the blocks are as large as possible: there the cost is the number of
grid steps, not the arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp

TUNED_PATH = pathlib.Path(__file__).with_name("tuned_gpu.json")


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    state_block_k: int = 64  # chunk_states / state_grads tiles (one sequential program each)
    state_block_v: int = 64
    state_warps: int = 4
    state_stages: int = 2
    # A state-walk launch halves its tile (V first, down to 32 x 32) until it has at least this
    # many programs (``state_tiles``; why 128: the comment above it).
    state_min_programs: int = 128
    scores_warps: int = 4  # exact_scores / score_grads
    # The exact launches (exact_scores, query_key_grads_exact) loop over up to 8 consecutive
    # chunks per program while a launch keeps at least this many programs
    # (``gpu_forward.exact_group``); 0: one program per chunk.
    exact_min_programs: int = 1024
    score_block_v: int = 64  # V piece of score_grads' do @ v^T loop
    output_block_v: int = 64  # chunk_outputs V tile (a loop: the tiles share the scores)
    output_block_k: int = 64  # K piece of its (q * exp(b)) @ h loop
    output_warps: int = 4
    output_stages: int = 2
    value_block_v: int = 64  # value_grads V tile (a loop, as in chunk_outputs)
    value_block_k: int = 64  # K piece of its k_to_end @ dH loop
    value_warps: int = 4
    value_stages: int = 2
    grad_block_k: int = 64  # query_key_grads K tile (grid axis)
    grad_block_v: int = 64  # V piece of its do @ h^T, v @ dH^T loop
    grad_warps: int = 4
    grad_stages: int = 1
    # The backward's two walks (the state recompute and state_grads) in one launch, side by side.
    paired_walks: bool = True
    # A launch of one walk loads each next chunk ahead (``gpu_forward.walk_chunks``) when it has
    # at most this many programs: one per multiprocessor of the H200. 0: never.
    prefetch_max_programs: int = 132
    # A packed row's state walks: one program per sequence, walking its own chunks (True), or one
    # per row, through every sequence in turn (False). 16 sequences of 2K in one row, 16 x 128
    # (H100, December 5): forward+backward 4.20 ms against 5.05, forward 1.40 against 1.82.
    sequence_walks: bool = True


def _key(key_dim: int, value_dim: int, dtype) -> str:
    return f"{key_dim}x{value_dim}:{jnp.dtype(dtype).name}"


def _load_tuned() -> dict[str, GpuConfig]:
    if not TUNED_PATH.exists():
        return {}
    raw = json.loads(TUNED_PATH.read_text())
    return {key: GpuConfig(**fields) for key, fields in raw.items()}


TUNED = _load_tuned()


def heuristic(key_dim: int, value_dim: int, dtype) -> GpuConfig:
    """Untuned default: tiles that keep every float32 accumulator of a program in registers."""
    # Pipeline stages hold the next V tile's operands in shared memory; 4-byte operands take
    # twice the room, so float32 callers keep one stage (one tile in flight).
    half = jnp.dtype(dtype).itemsize <= 2
    return GpuConfig(
        # The state walks (chunk_states + state_grads alone, T = 2K, H200): a 64 x 128 tile with
        # 4 warps took 0.583 ms at 16 x 128 (64 x 64: 0.861, 128 x 128 with 8 warps: 0.643) and
        # 0.204 ms at the 340M layer's 4 x 128 x 256 (64 x 64: 0.215, 64 x 32: 0.305): k and the
        # gates are read once per V tile, so wide V tiles read less.
        state_block_k=min(key_dim, 64),
        state_block_v=min(value_dim, 128),
        # chunk_outputs and value_grads loop over V tiles (tune_gpu, T = 2K, H100, December 5):
        # 64-wide tiles with 2 stages. chunk_outputs 0.396 ms at 16 x 128 (128 wide: 0.465) and
        # 0.465 at 256 x 512 (0.547); value_grads 0.479 / 0.448 ms (128 wide, 1 stage: 0.479 /
        # 0.476; 0.832 at 256 x 512 before it formed A^T directly, when 2 stages did not fit).
        output_block_v=min(value_dim, 64),
        output_block_k=min(key_dim, 64),
        output_stages=2 if half else 1,
        value_block_v=min(value_dim, 64),
        value_block_k=min(key_dim, 64),
        value_stages=2 if half else 1,
        # query_key_grads, its V pieces a loop (same run): K tile 64, V piece 64, 2 stages at
        # 16 x 128 (0.981 ms; 1 stage 1.086, V piece 128 1.122) and 3 at 256 x 512 (0.745 ms;
        # 2 stages 0.843, 1 stage 0.995, the earlier K tile 32 without stages 1.368).
        grad_block_k=min(key_dim, 64),
        grad_block_v=min(value_dim, 64),
        grad_stages=(3 if value_dim > 128 else 2) if half else 1,
        score_block_v=min(value_dim, 64),
        # exact_scores + score_grads with every chunk on the exact path (16 x 128, T = 2K, H200):
        # 8 warps 1.30 ms, 4 warps 2.12, 2 warps 9.70; the 340M layer under strong gates ran
        # 1.197 ms forward+backward against 1.394 with 4, under mild gates the same (0.724, 0.721).
        scores_warps=8,
    )


# The state walks run one program per (walk, row, head, K tile, V tile); with few long rows (a
# packed cu_seqlens row has only H) that is too few programs to fill the GPU's 132
# multiprocessors, so tiles shrink until a launch has at least state_min_programs (down to
# 32 x 32). Its default, 128, is one per multiprocessor: at the 340M layer's 32 (row, head)
# pairs, 128 programs of 64 x 128 walked faster than 256 of 64 x 64 or 512 of 64 x 32 (above);
# at 16 x 128 with T = 16K (32 pairs, 256 chunks to walk) 128 programs of 64 x 64 took
# 1.057 ms against 1.315 for 64 of 64 x 128 (the forward and backward walks in two launches),
# and the backward's two walks in one launch took 0.677 ms as 128 programs of 64 x 128, against
# 0.764 as 256 of 64 x 64.


def state_tiles(config: GpuConfig, key_dim: int, value_dim: int, walks: int) -> tuple[int, int]:
    """The (K, V) state tile of a launch of ``walks`` (walk, row, head) triples: the configured
    tile, halved (V first) until the launch has ``config.state_min_programs`` programs or the tile
    is 32 x 32.
    """
    block_k, block_v = min(config.state_block_k, key_dim), min(config.state_block_v, value_dim)

    def programs():
        return walks * (key_dim // block_k) * (value_dim // block_v)

    while programs() < config.state_min_programs and max(block_k, block_v) > 32:
        if block_v >= block_k:
            block_v //= 2
        else:
            block_k //= 2
    return block_k, block_v


# The largest state tile (elements) a prefetching walk carries: with the next chunk's [C, BK] keys
# and gates and [C, BV] values held across a step beside the float32 [BK, BV] state, a 64 x 128
# tile spills (below).
PREFETCH_MAX_TILE = 64 * 64


def prefetches(config: GpuConfig, walks: int, programs: int, tile: tuple[int, int]) -> bool:
    """Whether a state-walk launch of ``walks`` walks, ``programs`` programs and (K, V) ``tile``
    loads each next chunk ahead. Timed on the H200 (December 4): the forward walk at 16 x 128,
    T = 16K (one walk, 128 programs of 64 x 64) ran 16% faster with it (0.508 -> 0.424 ms;
    forward 1.008 -> 0.918 ms in the op), but at T = 8K (128 programs of 64 x 128) the forward
    lost 0.31 ms and the paper shape's at 16K (128 of 64 x 128) 0.56; at T = 2K (512 programs)
    0.23, and two walks in one launch (the backward's pair) took twice as long at 16K."""
    return (
        walks == 1
        and programs <= config.prefetch_max_programs
        and tile[0] * tile[1] <= PREFETCH_MAX_TILE
    )


def config_for(key_dim: int, value_dim: int, dtype, interpret: bool) -> GpuConfig:
    """key_dim, value_dim: the padded (power-of-two) head dims."""
    if interpret:  # whole dims: fewer grid steps and loop iterations to interpret
        stages = ("state", "output", "value", "grad")
        whole = {
            f"{stage}_block_{dim}": size
            for stage in stages
            for dim, size in (("k", key_dim), ("v", value_dim))
        }
        return GpuConfig(**whole, score_block_v=value_dim)
    return TUNED.get(_key(key_dim, value_dim, dtype)) or heuristic(key_dim, value_dim, dtype)


def table_key(key_dim: int, value_dim: int, dtype) -> str:
    return _key(key_dim, value_dim, dtype)
