"""Packing tokenized documents into fixed-length rows (pure numpy, no I/O).

A document stream is a function `doc(k) -> int32 ids` (already `[BOS] text EOS`) over
k = 0, 1, 2, ...; a `Cursor` (k, offset) says where the next row starts. Packing a batch is a
pure function of the stream and the cursor, which is what makes the loader resumable: its
whole state is the cursor.

Two modes:
- 'concat': documents laid end to end; rows are cut every `seq_len` tokens, so a document can
  continue in the next row. No padding except at the end of a finite stream, or where a row
  reached `max_segments` documents (a static bound the model's packed kernel call may need).
- 'pad': each row holds part of one document only; a document longer than `seq_len` fills
  several rows and its last row is padded.

Row layout: `segment_ids` number the documents in a row from 1 (0 is padding), `positions`
count from 0 at each segment's first token in the row, `targets[t] = tokens[t + 1]` and
`loss_mask[t] = 1` only where tokens t and t + 1 belong to the same segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

PACKING_MODES = ("concat", "pad")


class Cursor(NamedTuple):
    doc_index: int
    offset: int


def take_pieces(
    doc: Callable[[int], np.ndarray],
    cursor: Cursor,
    *,
    num_rows: int,
    seq_len: int,
    mode: str,
    num_docs: int | None = None,
    max_segments: int = 0,
) -> tuple[list[list[np.ndarray]], Cursor]:
    """Slices of documents for each of `num_rows` rows, and the cursor after them.

    `num_docs` bounds a finite stream: once it is used up, remaining rows stay empty.
    `max_segments` (0: no limit) closes a row, padded, once it holds that many documents.
    """
    if mode not in PACKING_MODES:
        raise ValueError(f"data.packing must be one of {PACKING_MODES}, got {mode!r}")
    rows: list[list[np.ndarray]] = []
    k, offset = cursor
    ids = doc(k) if num_docs is None or k < num_docs else None
    for _ in range(num_rows):
        row, room = [], seq_len
        while room > 0 and ids is not None and not (max_segments and len(row) >= max_segments):
            piece = ids[offset : offset + room]
            row.append(piece)
            room -= len(piece)
            offset += len(piece)
            if offset >= len(ids):  # document finished: move on to the next one
                k, offset = k + 1, 0
                ids = doc(k) if num_docs is None or k < num_docs else None
                if mode == "pad":
                    break
            elif mode == "pad":
                break
        rows.append(row)
    return rows, Cursor(k, offset)


def rows_to_arrays(
    rows: list[list[np.ndarray]], *, seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment_ids), both int32 [len(rows), seq_len]."""
    tokens = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    segment_ids = np.zeros((len(rows), seq_len), dtype=np.int32)
    for r, pieces in enumerate(rows):
        if not pieces:
            continue
        lengths = [len(p) for p in pieces]
        used = sum(lengths)
        tokens[r, :used] = np.concatenate(pieces)
        segment_ids[r, :used] = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
    return tokens, segment_ids


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Index of each token within its segment in the row (0 on padding)."""
    num_rows, seq_len = segment_ids.shape
    column = np.broadcast_to(np.arange(seq_len, dtype=np.int32), segment_ids.shape)
    starts = np.ones(segment_ids.shape, dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    return np.where(segment_ids > 0, column - segment_start, 0).astype(np.int32)


def make_batch(tokens: np.ndarray, segment_ids: np.ndarray, *, pad_id: int) -> dict:
    """The batch dict: tokens, targets, segment_ids, positions (int32), loss_mask (float32)."""
    targets = np.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    same_segment = np.zeros(tokens.shape, dtype=bool)
    same_segment[:, :-1] = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
    return {
        "tokens": tokens,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions_from_segments(segment_ids),
        "loss_mask": same_segment.astype(np.float32),
    }


def pack_batch(
    doc: Callable[[int], np.ndarray],
    cursor: Cursor,
    *,
    num_rows: int,
    seq_len: int,
    mode: str,
    pad_id: int,
    num_docs: int | None = None,
    max_segments: int = 0,
) -> tuple[dict, Cursor]:
    """One batch of `num_rows` rows starting at `cursor`, and the cursor after it."""
    rows, cursor = take_pieces(
        doc,
        cursor,
        num_rows=num_rows,
        seq_len=seq_len,
        mode=mode,
        num_docs=num_docs,
        max_segments=max_segments,
    )
    tokens, segment_ids = rows_to_arrays(rows, seq_len=seq_len, pad_id=pad_id)
    return make_batch(tokens, segment_ids, pad_id=pad_id), cursor


def count_rows(lengths: Sequence[int], *, seq_len: int, mode: str, max_segments: int = 0) -> int:
    """Rows that a finite stream of documents with these lengths packs into."""
    if mode == "pad":
        return sum(-(-int(n) // seq_len) for n in lengths)
    if not max_segments:
        return -(-sum(int(n) for n in lengths) // seq_len)
    rows, room, pieces = 0, 0, 0
    for n in lengths:
        n = int(n)
        while n > 0:
            if room == 0 or pieces == max_segments:  # open a new row
                rows, room, pieces = rows + 1, seq_len, 0
            taken = min(room, n)
            n, room, pieces = n - taken, room - taken, pieces + 1
    return rows
