"""The loader: per-host document shards shuffled per epoch, tokenized, packed into batches.

grain's MapDataset decides which record is the k-th document of a host's stream: each host
takes its share of the records (`[process_index::process_count]`, so a host reads only its
own), shuffled by a permutation that changes every epoch but is a pure function of the seed,
repeated endlessly for training. The packer walks that stream with a cursor (k, offset); the
cursor is the iterator's whole state, so resuming is exact and costs nothing.
"""

from __future__ import annotations

import hashlib
import os

import grain
import numpy as np

from gla_jax.data import corpora, packing, tokenizers

STATE_VERSION = 1
# Records read per batched call: large enough to amortize the call, small enough that a block
# of long documents (whole books) stays a few tens of MB.
READ_BLOCK_SIZE = 64


class DocumentReader:
    """`reader(k)`: ids of the k-th document of this host's stream.

    grain maps k to a record index (host share, per-epoch shuffle, repeat); the records are
    read in blocks of consecutive k with one batched call, which is several times faster than
    record-by-record random access. The block is only a cache: what k maps to never depends
    on it, so resuming anywhere reads the same documents.
    """

    def __init__(self, source, record_indices: grain.MapDataset, encode, *, block_size: int):
        self._source, self._record_indices, self._encode = source, record_indices, encode
        self._block_size = block_size
        self._block_start, self._records = -1, []

    def _read_block(self, start: int) -> list:
        stop = min(start + self._block_size, len(self._record_indices))
        indices = [int(self._record_indices[k]) for k in range(start, stop)]
        if hasattr(self._source, "__getitems__"):
            return list(self._source.__getitems__(indices))
        return [self._source[i] for i in indices]

    def __call__(self, k: int) -> np.ndarray:
        start = k - k % self._block_size
        if start != self._block_start:
            self._block_start, self._records = start, self._read_block(start)
        return self._encode(self._records[k - start])


class PackedBatches:
    """Iterator of packed batches with `get_state()` / `set_state()` for checkpoints.

    The state is a small JSON-able dict of ints and strings. Finite (evaluation) iterators stop
    after `num_batches` batches; infinite (training) ones never stop.
    """

    def __init__(
        self,
        doc: DocumentReader,
        *,
        identity: dict,
        seq_len: int,
        rows: int,
        mode: str,
        pad_id: int,
        max_segments: int,
        docs_per_epoch: int,
        num_docs: int | None,
        num_batches: int | None,
    ):
        self._doc = doc
        self._identity = dict(identity)
        self._seq_len, self._rows, self._mode, self._pad_id = seq_len, rows, mode, pad_id
        self._max_segments = max_segments
        self.docs_per_epoch = docs_per_epoch
        self._num_docs = num_docs  # None: an endless stream of epochs
        self._num_batches = num_batches
        self._cursor = packing.Cursor(0, 0)
        self._batches = 0

    def __iter__(self):
        return self

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError("only an iterator with a fixed number of batches has a length")
        return self._num_batches

    def __next__(self) -> dict:
        if self._num_batches is not None and self._batches >= self._num_batches:
            raise StopIteration
        if self._num_batches is None and self._num_docs is not None:
            if self._cursor.doc_index >= self._num_docs:  # one host: stop when its docs are done
                raise StopIteration
        batch, self._cursor = packing.pack_batch(
            self._doc,
            self._cursor,
            num_rows=self._rows,
            seq_len=self._seq_len,
            mode=self._mode,
            pad_id=self._pad_id,
            num_docs=self._num_docs,
            max_segments=self._max_segments,
        )
        self._batches += 1
        return batch

    @property
    def epoch(self) -> int:
        """Epochs of this host's documents fully consumed (the cursor's epoch)."""
        return self._cursor.doc_index // max(self.docs_per_epoch, 1)

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "doc_index": int(self._cursor.doc_index),
            "offset": int(self._cursor.offset),
            "batches": int(self._batches),
            "epoch": self.epoch,
            **self._identity,
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data iterator state has version {state.get('version')!r}, "
                f"this loader reads version {STATE_VERSION}"
            )
        # A key the saved state lacks (saved before it was recorded) is not compared.
        changed = {
            key: (state[key], value)
            for key, value in self._identity.items()
            if key in state and state[key] != value
        }
        if changed:
            detail = ", ".join(
                f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items()
            )
            raise ValueError(
                "the saved data iterator state belongs to a differently configured loader "
                f"({detail}); resuming would not replay the same batches"
            )
        self._cursor = packing.Cursor(int(state["doc_index"]), int(state["offset"]))
        self._batches = int(state["batches"])


def make_tokenizer(config) -> tokenizers.Tokenizer:
    """The tokenizer named by `config.tokenizer` ('byte' or a SentencePiece .model path);
    for the synthetic 'mqar' task, its symbol table (gla_jax/mqar.py)."""
    if config.name == "mqar":
        from gla_jax import mqar  # noqa: PLC0415 - the synthetic task is not a corpus

        return mqar.tokenizer_from_config(config)
    return tokenizers.load_tokenizer(config.tokenizer)


def _split_name(config, split: str) -> str:
    return config.eval_split if split == "validation" else split


def _digest(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _documents_digest(source, field: str) -> str:
    """A digest of the split's first, middle and last documents: a state saved on one corpus and
    resumed on another of the same size is told apart without reading either corpus whole."""
    count = len(source)
    return _digest(source[i][field] for i in sorted({0, count // 2, count - 1}) if count)


def _tokenizer_digest(name: str) -> str:
    """The tokenizer file's contents (a retrained model under the same name differs), or the
    name of a built-in tokenizer."""
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return _digest([f.read()])
    return name


def _document_ids(config, tokenizer, field: str):
    add_bos = bool(config.add_bos)
    return lambda record: tokenizers.encode_document(tokenizer, record[field], add_bos=add_bos)


def _eval_batches(source, field, config, tokenizer, *, seq_len, rows, process_count) -> int:
    """Batches every host needs for its share: the largest share decides, so that all hosts
    run the same number of evaluation steps (a collective would otherwise wait forever)."""
    encode = _document_ids(config, tokenizer, field)
    lengths = np.asarray([len(encode(source[i])) for i in range(len(source))])
    per_host_rows = [
        packing.count_rows(
            lengths[p::process_count],
            seq_len=seq_len,
            mode=config.packing,
            max_segments=int(config.max_segments_per_row),
        )
        for p in range(process_count)
    ]
    return max(-(-r // rows) for r in per_host_rows)


def make_lm_dataset(
    config,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    num_batches: int | None = None,
) -> PackedBatches:
    """Batches of `global_batch_size // process_count` rows of `seq_len` tokens for this host.

    split='train': an endless stream, reshuffled every epoch (when `config.shuffle`).
    Any other split (e.g. 'validation', mapped to `config.eval_split`): one pass in order,
    the last batch padded; with `num_batches`, exactly that many batches (empty rows after
    the data runs out). Across several hosts every host yields the same number of batches.
    `config.name == 'mqar'` yields the synthetic recall task instead (gla_jax/mqar.py).
    """
    if config.name == "mqar":
        from gla_jax import mqar  # noqa: PLC0415 - the synthetic task is not a corpus

        return mqar.make_dataset(
            config,
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
            split=split,
            num_batches=num_batches,
        )
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} does not divide over {process_count} processes"
        )
    if int(config.max_segments_per_row) < 0:
        raise ValueError(
            f"data.max_segments_per_row must be >= 0 (0: no limit), got "
            f"{config.max_segments_per_row}"
        )
    if config.packing not in packing.PACKING_MODES:
        raise ValueError(
            f"data.packing must be one of {packing.PACKING_MODES}, got {config.packing!r}"
        )
    rows = global_batch_size // process_count
    tokenizer = make_tokenizer(config)
    source, field = corpora.open_split(config, _split_name(config, split))
    record_indices = grain.MapDataset.range(len(source))[process_index::process_count]
    training = split == "train"
    # An evaluation share may be empty (a host then yields empty rows, in step with the
    # others); a training stream may not, since it has to go on forever.
    if len(record_indices) == 0 and (training or len(source) == 0):
        raise ValueError(
            f"split {split!r} of {config.name!r} has {len(source)} documents, fewer than the "
            f"{process_count} processes reading it"
        )
    docs_per_epoch = len(record_indices)
    if training:
        if config.shuffle:
            record_indices = record_indices.shuffle(seed=int(config.seed) % 2**32)
        record_indices = record_indices.repeat()
    elif num_batches is None and process_count > 1:
        num_batches = _eval_batches(
            source,
            field,
            config,
            tokenizer,
            seq_len=seq_len,
            rows=rows,
            process_count=process_count,
        )
    encode = _document_ids(config, tokenizer, field)
    doc = DocumentReader(source, record_indices, encode, block_size=READ_BLOCK_SIZE)
    identity = {
        # What makes the token stream: the cursor counts tokens of these documents.
        "name": str(config.name),
        "tokenizer": os.path.basename(str(config.tokenizer)),  # the file, wherever it now lies
        "tokenizer_digest": _tokenizer_digest(str(config.tokenizer)),
        "documents_digest": _documents_digest(source, field),
        "add_bos": bool(config.add_bos),
        "doc_split": str(config.doc_split),
        "text_field": str(config.text_field),
        "split": split,
        "seed": int(config.seed),
        "shuffle": bool(config.shuffle),
        "seq_len": int(seq_len),
        "rows": rows,
        "packing": str(config.packing),
        "max_segments_per_row": int(config.max_segments_per_row),
        "process_index": int(process_index),
        "process_count": int(process_count),
        "docs_per_epoch": docs_per_epoch,
    }
    return PackedBatches(
        doc,
        identity=identity,
        seq_len=seq_len,
        rows=rows,
        mode=config.packing,
        pad_id=tokenizer.pad_id,
        max_segments=int(config.max_segments_per_row),
        docs_per_epoch=docs_per_epoch,
        num_docs=None if training else docs_per_epoch,
        num_batches=num_batches,
    )


def make_eval_dataset(config, **kwargs) -> PackedBatches:
    """`make_lm_dataset(config, split='validation', ...)`: one ordered pass."""
    return make_lm_dataset(config, split="validation", **kwargs)


def make_global_batch(batch: dict, sharding) -> dict:
    """Each host's rows -> global jax.Arrays via `jax.make_array_from_process_local_data`.

    `sharding` is a Sharding, or a Mesh (rows then go over its 'data' and 'fsdp' axes).
    """
    import jax  # noqa: PLC0415 - the loader itself never needs jax

    from gla_jax.sharding import batch_sharding  # noqa: PLC0415

    if isinstance(sharding, jax.sharding.Mesh):
        sharding = batch_sharding(sharding)
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
