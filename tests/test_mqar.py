"""MQAR: the generator's invariants, determinism and resume, the loader hook, accuracy."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from gla_jax import data as data_lib
from gla_jax import mqar


def _data_config(pairs=8, vocab=64, seed=3):
    config = data_lib.default_data_config()
    config.name = "mqar"
    config.seed = seed
    config.mqar = ml_collections.ConfigDict(dict(num_kv_pairs=pairs, vocab_size=vocab))
    return config


def _check_row(tokens, targets, mask, task):
    pairs = task.num_kv_pairs
    keys, values = tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2]
    assert len(set(keys.tolist())) == pairs, "keys of a row must be distinct"
    assert np.all((keys >= 1) & (keys < task.first_value))
    assert np.all((values >= task.first_value) & (values < task.vocab_size))
    answer_at = np.flatnonzero(mask)
    assert len(answer_at) == pairs, "every key is asked exactly once"
    assert answer_at.min() >= 2 * pairs, "queries come after the key-value context"
    lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
    for t in answer_at:
        assert targets[t] == lookup[int(tokens[t])], "the target of a query is its key's value"
        assert tokens[t + 1] == targets[t]
    assert sorted(tokens[answer_at].tolist()) == sorted(keys.tolist())
    rest = np.ones(len(tokens), bool)
    rest[: 2 * pairs] = False
    rest[answer_at] = rest[answer_at + 1] = False
    assert np.all(tokens[rest] == mqar.FILLER_ID)


def test_batches_hold_correct_answers_only_under_the_mask():
    task = mqar.MQARTask(seq_len=96, num_kv_pairs=8, vocab_size=64)
    batch = mqar.generate(task, 16, np.random.default_rng(0))
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
    for row in range(16):
        _check_row(batch["tokens"][row], batch["targets"][row], batch["loss_mask"][row], task)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    np.testing.assert_array_equal(batch["positions"][3], np.arange(96))
    assert np.all(batch["segment_ids"] == 1)


def test_the_tightest_task_fills_every_slot():
    task = mqar.MQARTask(seq_len=16, num_kv_pairs=4, vocab_size=9)  # 4 keys, 4 values
    batch = mqar.generate(task, 8, np.random.default_rng(1))
    for row in range(8):
        _check_row(batch["tokens"][row], batch["targets"][row], batch["loss_mask"][row], task)
    assert np.all(batch["tokens"] != mqar.FILLER_ID), "no room is left for filler"


def test_stream_is_deterministic_resumable_and_split_apart():
    config = _data_config()
    first = data_lib.make_lm_dataset(config, seq_len=64, global_batch_size=4)
    batches = [next(first) for _ in range(5)]
    again = data_lib.make_lm_dataset(config, seq_len=64, global_batch_size=4)
    np.testing.assert_array_equal(next(again)["tokens"], batches[0]["tokens"])
    resumed = data_lib.make_lm_dataset(config, seq_len=64, global_batch_size=4)
    state = dict(first.get_state())
    assert state["step"] == 5
    for _ in range(2):
        next(first)
    resumed.set_state({**state})
    resumed.set_state(dict(resumed.get_state(), step=3))
    for step in (3, 4):
        np.testing.assert_array_equal(next(resumed)["tokens"], batches[step]["tokens"])
    assert not np.array_equal(batches[0]["tokens"], batches[1]["tokens"])
    validation = data_lib.make_eval_dataset(config, seq_len=64, global_batch_size=4)
    validation_tokens = next(validation)["tokens"]
    assert not np.array_equal(validation_tokens, batches[0]["tokens"])
    # data.eval_split names the evaluation stream; a name that is no stream is refused.
    with config.unlocked():
        config.eval_split = "test"
    test = next(data_lib.make_eval_dataset(config, seq_len=64, global_batch_size=4))["tokens"]
    assert not np.array_equal(test, validation_tokens)
    with config.unlocked():
        config.eval_split = "tset"
    with pytest.raises(ValueError, match="MQAR split must be one of"):
        data_lib.make_eval_dataset(config, seq_len=64, global_batch_size=4)
    other_seed = data_lib.make_lm_dataset(_data_config(seed=4), seq_len=64, global_batch_size=4)
    assert not np.array_equal(next(other_seed)["tokens"], batches[0]["tokens"])


def test_hosts_split_one_global_batch():
    config = _data_config()
    whole = next(data_lib.make_lm_dataset(config, seq_len=64, global_batch_size=4))
    for index in range(2):
        part = data_lib.make_lm_dataset(
            config, seq_len=64, global_batch_size=4, process_index=index, process_count=2
        )
        np.testing.assert_array_equal(
            next(part)["tokens"], whole["tokens"][2 * index : 2 * index + 2]
        )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(process_index=2, process_count=2), r"process_index 2 is not in \[0, 2\)"),
        (dict(global_batch_size=0), "global_batch_size 0 does not divide"),
        (dict(seed=-1), "data.seed must be >= 0"),
    ],
)
def test_bad_stream_settings_are_refused(changes, message):
    config = _data_config(seed=changes.pop("seed", 3))
    settings = dict(seq_len=64, global_batch_size=4) | changes
    with pytest.raises(ValueError, match=message):
        data_lib.make_lm_dataset(config, **settings)


def test_state_of_another_task_is_refused():
    stream = data_lib.make_lm_dataset(_data_config(pairs=8), seq_len=64, global_batch_size=4)
    other = data_lib.make_lm_dataset(_data_config(pairs=4), seq_len=64, global_batch_size=4)
    with pytest.raises(ValueError, match="num_kv_pairs: saved 8, now 4"):
        other.set_state(stream.get_state())
    with pytest.raises(ValueError, match="not an MQAR state"):
        other.set_state({"version": 1, "doc_index": 0})


def test_evaluation_streams_are_finite():
    stream = data_lib.make_eval_dataset(_data_config(), seq_len=64, global_batch_size=2)
    assert len(stream) == mqar.DEFAULT_EVAL_BATCHES == len(list(stream))
    assert (
        len(
            list(
                data_lib.make_eval_dataset(
                    _data_config(), seq_len=64, global_batch_size=2, num_batches=3
                )
            )
        )
        == 3
    )


def test_tokenizer_reports_the_task_vocab():
    tokenizer = data_lib.make_tokenizer(_data_config(vocab=300))
    assert tokenizer.vocab_size == 300
    data_lib.check_vocab(tokenizer, 300)
    with pytest.raises(ValueError, match="vocab_size 300"):
        data_lib.check_vocab(tokenizer, 256)
    assert tokenizer.decode(tokenizer.encode("5 17 3")) == "5 17 3"


@pytest.mark.parametrize(
    "seq_len, pairs, vocab, message",
    [
        (31, 8, 64, "seq_len >= 4 \\* num_kv_pairs = 32"),
        (64, 8, 16, "vocab_size >= 17"),
        (64, 0, 64, "num_kv_pairs must be >= 1"),
    ],
)
def test_impossible_tasks_are_refused(seq_len, pairs, vocab, message):
    with pytest.raises(ValueError, match=message):
        mqar.MQARTask(seq_len=seq_len, num_kv_pairs=pairs, vocab_size=vocab)


def test_accuracy_counts_answer_tokens_only():
    targets = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    mask = np.array([[0, 1, 0, 1], [0, 0, 1, 1]], np.float32)
    predicted = np.array([[0, 6, 0, 8], [1, 2, 3, 0]])  # row 0: both right; row 1: one of two
    logits = np.eye(10)[predicted]
    counts = mqar.answer_accuracy(logits, {"targets": targets, "loss_mask": mask})
    assert counts == {"correct": 3, "answers": 4, "rows_all_correct": 1, "rows": 2}
    perfect = mqar.answer_accuracy(np.eye(10)[targets], {"targets": targets, "loss_mask": mask})
    assert perfect["correct"] == perfect["answers"] == 4 and perfect["rows_all_correct"] == 2
