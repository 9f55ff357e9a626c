"""Input pipeline: corpora built with tensorflow-datasets, tokenizers, packing, resumable loading.

No network is used at run time: corpora come from installed packages or local files, or were
prepared with tfds beforehand; they are read as array_record, so TensorFlow is never needed.

API the trainer calls::

    from gla_jax import data
    config.data = data.default_data_config()          # the `data` ConfigDict section
    tokenizer = data.make_tokenizer(config.data)      # .encode / .decode / .vocab_size
    data.check_vocab(tokenizer, model_vocab_size)     # ValueError if ids would not fit
    it = data.make_lm_dataset(config.data, seq_len=T, global_batch_size=B,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), split="train")
    batch = next(it)                                  # this host's B // process_count rows
    state = it.get_state()                            # small JSON-able dict, for checkpoints
    it.set_state(state)                               # continue exactly where it was
    global_batch = data.make_global_batch(batch, mesh_or_sharding)   # dict of jax.Arrays
    evals = data.make_eval_dataset(config.data, seq_len=T, global_batch_size=B, ...)

`batch` is a dict of numpy arrays, each [B // process_count, T]:
    tokens       int32  input ids
    targets      int32  tokens shifted left by one within the row (pad id in the last column)
    segment_ids  int32  1, 2, ... per document in the row, 0 on padding: the model resets its
                        state where the segment id changes
    positions    int32  position within the document's part in this row, from 0
    loss_mask    float32  1 where targets[t] is the next token of the same document, else 0

Each document is laid out as [BOS] text EOS (BOS unless `add_bos` is False). Training
iterators are endless: epoch e shows every document of this host's share exactly once, in an
order that is a pure function of (seed, e). Evaluation iterators make one ordered pass over
`eval_split`, the last batch padded; with several processes every host yields the same number
of batches (`len(it)`), or exactly `num_batches=` when given. A packed row holds at most
`max_segments_per_row` documents when that is set (for the model's 'cu_seqlens' packing).

Byte tokenizer ids: 0..255 the UTF-8 bytes, 256 PAD, 257 BOS, 258 EOS (vocab_size 259).

Corpora ('kjv', 'text_files') are prepared on first use. With several hosts sharing a data
dir, prepare once beforehand (`python -m gla_jax.data prepare ...`) so that they do not all
write it at the same time. From the trainer's command line a tuple field is overridden with a
Python literal: `--config.data.name=text_files --config.data.paths="('DIR',)"`.

Command line (`python -m gla_jax.data --help`): `prepare` builds a corpus into the data dir,
`inspect` prints a batch, and `train-tokenizer` trains a SentencePiece model offline, e.g.
`python -m gla_jax.data train-tokenizer --output=kjv8k.model --vocab-size=8192`; then set
`data.tokenizer` to that path and `model.vocab_size` to at least its vocab size.
"""

from __future__ import annotations

import ml_collections

from gla_jax.data.loader import (
    PackedBatches,
    make_eval_dataset,
    make_global_batch,
    make_lm_dataset,
    make_tokenizer,
)
from gla_jax.data.tokenizers import (
    BYTE_BOS_ID,
    BYTE_EOS_ID,
    BYTE_PAD_ID,
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
    SentencePieceTokenizer,
    check_vocab,
    load_tokenizer,
    train_sentencepiece,
)


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config, with its defaults."""
    c = ml_collections.ConfigDict()
    # 'kjv' (King James Bible, installed with the project), 'text_files' (data.paths), or a
    # dataset prepared with tfds in data_dir: 'lm1b', 'pg19', 'c4/en:3.1.0', ...; or 'mqar', the
    # synthetic recall task (gla_jax/mqar.py, sizes in data.mqar; see configs/mqar.py).
    c.name = "kjv"
    # '' means $GLA_JAX_DATA_DIR or ~/.cache/gla_jax/datasets for 'kjv' / 'text_files', and
    # $TFDS_DATA_DIR or ~/tensorflow_datasets for datasets prepared with tfds.
    c.data_dir = ""
    c.paths = ()  # for 'text_files': files, directories or globs (or one comma-separated str)
    c.doc_split = "file"  # plain text: 'file' (one document each) or 'blank_line'
    c.text_field = "text"  # JSONL field, or the tfds feature holding the text
    c.validation_fraction = 0.02  # share of documents held out for 'kjv' / 'text_files'
    c.eval_split = "validation"  # the split evaluation reads (lm1b has only 'test')
    c.tokenizer = "byte"  # 'byte' or the path of a SentencePiece .model file
    c.add_bos = True
    c.packing = "concat"  # 'concat' (documents end to end) or 'pad' (one document per row)
    # At most this many documents in a row (0: no limit). With model.packing='cu_seqlens' set it
    # to model.max_segments_per_row, that call's static bound; 'gate_reset' needs no limit, and
    # a limit wastes rows on short documents (16 sentences of lm1b fill a quarter of 2048).
    c.max_segments_per_row = 0
    c.seed = 0
    c.shuffle = True
    return c


__all__ = [
    "BYTE_BOS_ID",
    "BYTE_EOS_ID",
    "BYTE_PAD_ID",
    "BYTE_VOCAB_SIZE",
    "ByteTokenizer",
    "PackedBatches",
    "SentencePieceTokenizer",
    "check_vocab",
    "default_data_config",
    "load_tokenizer",
    "make_eval_dataset",
    "make_global_batch",
    "make_lm_dataset",
    "make_tokenizer",
    "train_sentencepiece",
]
