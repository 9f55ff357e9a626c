"""Packing: exact layouts on small cases, and invariants on random document streams."""

import numpy as np
import pytest

from gla_jax.data import packing

PAD = 99


def stream(docs):
    return lambda k: np.asarray(docs[k], dtype=np.int32)


def test_concat_exact_layout():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    batch, cursor = packing.pack_batch(
        stream(docs), packing.Cursor(0, 0), num_rows=2, seq_len=4, mode="concat", pad_id=PAD
    )
    np.testing.assert_array_equal(batch["tokens"], [[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(batch["targets"], [[2, 3, 4, PAD], [6, 7, 8, PAD]])
    # No loss across a document boundary nor past the end of a row.
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 0, 0], [1, 1, 1, 0]])
    assert cursor == packing.Cursor(2, 0)
    batch, cursor = packing.pack_batch(
        stream(docs), cursor, num_rows=1, seq_len=4, mode="concat", pad_id=PAD, num_docs=3
    )
    np.testing.assert_array_equal(batch["tokens"], [[9, 10, PAD, PAD]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 0, 0, 0]])
    assert cursor == packing.Cursor(3, 0)


def test_pad_mode_splits_long_documents_and_pads():
    docs = [[1, 2, 3, 4, 5, 6], [7], [8, 9]]
    batch, cursor = packing.pack_batch(
        stream(docs),
        packing.Cursor(0, 0),
        num_rows=4,
        seq_len=4,
        mode="pad",
        pad_id=PAD,
        num_docs=3,
    )
    np.testing.assert_array_equal(
        batch["tokens"], [[1, 2, 3, 4], [5, 6, PAD, PAD], [7, PAD, PAD, PAD], [8, 9, PAD, PAD]]
    )
    np.testing.assert_array_equal(
        batch["segment_ids"], [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["positions"], [[0, 1, 2, 3], [0, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["loss_mask"], [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    )
    assert cursor == packing.Cursor(3, 0)


def test_resuming_mid_document_continues_where_it_stopped():
    docs = [list(range(1, 11))]
    _, cursor = packing.pack_batch(
        stream(docs), packing.Cursor(0, 0), num_rows=1, seq_len=3, mode="concat", pad_id=PAD
    )
    assert cursor == packing.Cursor(0, 3)
    batch, _ = packing.pack_batch(
        stream(docs), cursor, num_rows=1, seq_len=3, mode="concat", pad_id=PAD
    )
    np.testing.assert_array_equal(batch["tokens"], [[4, 5, 6]])


def test_max_segments_closes_a_row_early():
    docs = [[1], [2], [3], [4, 5, 6, 7, 8, 9], [10]]
    batch, cursor = packing.pack_batch(
        stream(docs),
        packing.Cursor(0, 0),
        num_rows=3,
        seq_len=4,
        mode="concat",
        pad_id=PAD,
        num_docs=5,
        max_segments=2,
    )
    np.testing.assert_array_equal(batch["tokens"], [[1, 2, PAD, PAD], [3, 4, 5, 6], [7, 8, 9, 10]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 2, 0, 0], [1, 2, 2, 2], [1, 1, 1, 2]])
    assert cursor == packing.Cursor(5, 0)
    assert packing.count_rows([1, 1, 1, 6, 1], seq_len=4, mode="concat", max_segments=2) == 3


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="data.packing"):
        packing.take_pieces(stream([[1]]), packing.Cursor(0, 0), num_rows=1, seq_len=2, mode="x")


@pytest.mark.parametrize(
    "mode, max_segments", [("concat", 0), ("concat", 2), ("concat", 3), ("pad", 0)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_streams_keep_every_token_once_in_order(mode, max_segments, seed):
    rng = np.random.default_rng(seed)
    seq_len, rows = 16, 3
    docs = [rng.integers(0, 50, size=int(n)).tolist() for n in rng.integers(1, 40, size=25)]
    docs += [[7]] * 10  # a run of one-token documents, to hit the segment limit
    expected_rows = packing.count_rows(
        [len(d) for d in docs], seq_len=seq_len, mode=mode, max_segments=max_segments
    )
    cursor, batches = packing.Cursor(0, 0), []
    while cursor.doc_index < len(docs):
        batch, cursor = packing.pack_batch(
            stream(docs),
            cursor,
            num_rows=rows,
            seq_len=seq_len,
            mode=mode,
            pad_id=PAD,
            num_docs=len(docs),
            max_segments=max_segments,
        )
        batches.append(batch)
    all_rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    seg = all_rows["segment_ids"]
    assert int((seg > 0).any(axis=1).sum()) == expected_rows
    # Reading the real tokens back row by row gives the documents, in order, exactly once.
    pieces = []
    for tokens, segments in zip(all_rows["tokens"], seg, strict=True):
        for s in range(1, segments.max() + 1):
            pieces.append(tokens[segments == s])
    assert np.concatenate(pieces).tolist() == sum(docs, [])
    # Padding only after real tokens, positions count within a segment, targets shift.
    real = seg > 0
    assert not (np.diff(real.astype(int), axis=1) > 0).any()
    for r in range(len(seg)):
        for s in range(1, seg[r].max() + 1):
            np.testing.assert_array_equal(
                all_rows["positions"][r][seg[r] == s], np.arange((seg[r] == s).sum())
            )
    mask = all_rows["loss_mask"].astype(bool)
    np.testing.assert_array_equal(
        all_rows["targets"][:, :-1][mask[:, :-1]], all_rows["tokens"][:, 1:][mask[:, :-1]]
    )
    if mode == "pad":
        assert seg.max() == 1
    if max_segments:
        assert seg.max() == max_segments
