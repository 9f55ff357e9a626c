"""Multi-query associative recall (MQAR): a synthetic recall task, as a resumable batch stream.

Each row is one sequence of ``seq_len`` tokens. It opens with ``num_kv_pairs`` key-value pairs
``k1 v1 k2 v2 ...``; later, every key is asked once more (in a random order, at random places)
and must be answered by its value::

    k1 v1 k2 v2 k3 v3 . . k2 v2 . . . . k1 v1 . k3 v3 . .     ('.' = filler token 0)

The loss (and accuracy) counts only the answer positions: where the input is a queried key and
the target is its value. Keys and values come from disjoint ranges of the vocabulary, so a
model cannot confuse the two roles, and the keys of a row are distinct, so every answer is
unambiguous:

    0                       filler (between queries, and the pad id)
    1 .. 1 + num_keys       keys      (num_keys = (vocab_size - 1) // 2)
    1 + num_keys .. vocab   values

Batches are dicts of numpy arrays in the loader's format (tokens, targets, segment_ids,
positions, loss_mask), so the trainer trains on them unchanged (``config.data.name = 'mqar'``,
task sizes in ``config.data.mqar``; see configs/mqar.py). Batch ``i`` is a pure function of
(seed, split, i): the iterator's state is the step index, so resuming is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

STATE_VERSION = 1
FILLER_ID = 0
# Evaluation streams without an explicit num_batches stop after this many batches.
DEFAULT_EVAL_BATCHES = 8
# Keeps training and evaluation sequences apart: they come from different random streams.
_SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class MQARTask:
    seq_len: int
    num_kv_pairs: int
    vocab_size: int

    def __post_init__(self):
        if self.num_kv_pairs < 1:
            raise ValueError(f"MQAR num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
        if self.seq_len < 4 * self.num_kv_pairs:
            raise ValueError(
                f"MQAR seq_len = {self.seq_len} cannot hold {self.num_kv_pairs} key-value pairs "
                f"and their queries: it needs seq_len >= 4 * num_kv_pairs = "
                f"{4 * self.num_kv_pairs}"
            )
        if self.num_keys < self.num_kv_pairs:
            raise ValueError(
                f"MQAR vocab_size = {self.vocab_size} gives {self.num_keys} distinct keys, fewer "
                f"than num_kv_pairs = {self.num_kv_pairs}; need vocab_size >= "
                f"{2 * self.num_kv_pairs + 1}"
            )

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - 1) // 2

    @property
    def first_value(self) -> int:
        return 1 + self.num_keys

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.first_value


def generate(task: MQARTask, rows: int, rng: np.random.Generator) -> dict:
    """One batch of ``rows`` MQAR sequences (see the module docstring for the layout)."""
    pairs, seq_len = task.num_kv_pairs, task.seq_len
    # Distinct keys per row: the first `pairs` entries of a random permutation of the key range.
    keys = 1 + np.argsort(rng.random((rows, task.num_keys)), axis=1)[:, :pairs]
    values = task.first_value + rng.integers(0, task.num_values, size=(rows, pairs))
    tokens = np.full((rows, seq_len), FILLER_ID, np.int64)
    tokens[:, 0 : 2 * pairs : 2] = keys
    tokens[:, 1 : 2 * pairs : 2] = values
    # Queries occupy two-token slots after the context; `pairs` distinct slots per row, chosen
    # at random, and key i goes to the i-th chosen slot, so query order is random too.
    num_slots = (seq_len - 2 * pairs) // 2
    slots = np.argsort(rng.random((rows, num_slots)), axis=1)[:, :pairs]
    query_at = 2 * pairs + 2 * slots  # [rows, pairs] position of each queried key
    row_index = np.arange(rows)[:, None]
    tokens[row_index, query_at] = keys
    tokens[row_index, query_at + 1] = values
    loss_mask = np.zeros((rows, seq_len), np.float32)
    loss_mask[row_index, query_at] = 1.0
    targets = np.full((rows, seq_len), FILLER_ID, np.int64)
    targets[:, :-1] = tokens[:, 1:]
    return {
        "tokens": tokens.astype(np.int32),
        "targets": targets.astype(np.int32),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "loss_mask": loss_mask,
    }


class MQARBatches:
    """Iterator of MQAR batches with the loader's ``get_state()`` / ``set_state()``.

    Each step draws the *global* batch from a generator seeded by (seed, split, step) and keeps
    this host's rows, so any number of hosts sees one consistent global batch.
    """

    def __init__(
        self,
        task: MQARTask,
        *,
        seed: int,
        split: str,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        num_batches: int | None = None,
    ):
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"MQAR split must be one of {tuple(_SPLIT_STREAMS)}, got {split!r}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} does not divide over {process_count} "
                "processes"
            )
        if int(seed) < 0:
            raise ValueError(f"data.seed must be >= 0 for MQAR, got {seed}")
        self.task = task
        self._seed, self._split = int(seed), split
        self._global_rows = global_batch_size
        self._rows = global_batch_size // process_count
        self._first_row = process_index * self._rows
        self._num_batches = num_batches
        self._step = 0
        self._identity = {
            "name": "mqar",
            "split": split,
            "seed": self._seed,
            "seq_len": task.seq_len,
            "num_kv_pairs": task.num_kv_pairs,
            "vocab_size": task.vocab_size,
            "rows": self._rows,
            "process_index": int(process_index),
            "process_count": int(process_count),
        }

    def __iter__(self):
        return self

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError("a training stream of MQAR batches is endless and has no length")
        return self._num_batches

    def batch_at(self, step: int) -> dict:
        """This host's rows of global batch ``step`` (a pure function of the step)."""
        rng = np.random.default_rng([self._seed, _SPLIT_STREAMS[self._split], step])
        full = generate(self.task, self._global_rows, rng)
        rows = slice(self._first_row, self._first_row + self._rows)
        return {key: value[rows] for key, value in full.items()}

    def __next__(self) -> dict:
        if self._num_batches is not None and self._step >= self._num_batches:
            raise StopIteration
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self._step, **self._identity}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("name") != "mqar":
            raise ValueError(
                f"data iterator state {state!r} is not an MQAR state of version {STATE_VERSION}"
            )
        changed = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in self._identity.items()
            if state.get(key) != value
        ]
        if changed:
            raise ValueError(
                "the saved MQAR iterator state belongs to a differently configured task ("
                + ", ".join(changed)
                + "); resuming would not replay the same batches"
            )
        self._step = int(state["step"])


@dataclasses.dataclass(frozen=True)
class MQARTokenizer:
    """Stands in for a text tokenizer: ids are the task's symbols, printed as numbers."""

    vocab_size: int
    name: str = "mqar"
    pad_id: int = FILLER_ID
    bos_id: int = FILLER_ID
    eos_id: int = FILLER_ID

    def encode(self, text: str) -> np.ndarray:
        return np.asarray([int(t) for t in str(text).split()], np.int32)

    def decode(self, ids) -> str:
        return " ".join(str(int(t)) for t in ids)


def _section(data_config) -> dict:
    section = data_config.get("mqar", None) or {}
    return {
        "num_kv_pairs": int(section.get("num_kv_pairs", 16)),
        "vocab_size": int(section.get("vocab_size", 256)),
    }


def task_from_config(data_config, seq_len: int) -> MQARTask:
    """The task of a data config: sizes in ``data.mqar`` (num_kv_pairs, vocab_size)."""
    return MQARTask(seq_len=int(seq_len), **_section(data_config))


def tokenizer_from_config(data_config) -> MQARTokenizer:
    return MQARTokenizer(_section(data_config)["vocab_size"])


def make_dataset(
    data_config,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    num_batches: int | None = None,
) -> MQARBatches:
    """The loader's ``make_lm_dataset`` for ``data.name = 'mqar'``: endless for 'train',
    ``num_batches`` (default DEFAULT_EVAL_BATCHES) for any other split."""
    if split == "validation":  # the evaluation split, named by data.eval_split as for corpora
        split = data_config.get("eval_split", "validation")
    if split != "train" and num_batches is None:
        num_batches = DEFAULT_EVAL_BATCHES
    return MQARBatches(
        task_from_config(data_config, seq_len),
        seed=int(data_config.get("seed", 0)),
        split=split,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        num_batches=num_batches,
    )


def answer_accuracy(logits: np.ndarray, batch: dict) -> dict:
    """Exact-match accuracy of the greedy prediction on answer tokens (loss_mask == 1).

    Returns counts so that batches add up: ``correct`` / ``answers`` per token, and
    ``rows_all_correct`` / ``rows`` for sequences whose every answer is right.
    """
    predicted = np.argmax(np.asarray(logits), axis=-1)
    is_answer = np.asarray(batch["loss_mask"]) > 0
    hit = (predicted == np.asarray(batch["targets"])) & is_answer
    answers_per_row = is_answer.sum(axis=1)
    rows_with_answers = answers_per_row > 0
    return {
        "correct": int(hit.sum()),
        "answers": int(is_answer.sum()),
        "rows_all_correct": int(((hit.sum(axis=1) == answers_per_row) & rows_with_answers).sum()),
        "rows": int(rows_with_answers.sum()),
    }
