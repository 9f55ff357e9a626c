"""Tokenizers: byte-level (no files) and SentencePiece (a `.model` file, or one trained offline).

Both expose the same small surface the packer, the trainer and the sampler use:
`encode(text) -> np.ndarray[int32]`, `decode(ids) -> str`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id` and `name`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

import numpy as np

# Byte-level ids: 0..255 are the bytes themselves, so any byte string (valid UTF-8 or not) maps
# to ids and back without loss; the three specials sit just above them.
BYTE_PAD_ID = 256
BYTE_BOS_ID = 257
BYTE_EOS_ID = 258
BYTE_VOCAB_SIZE = 259


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; PAD=256, BOS=257, EOS=258; vocab_size 259."""

    name: str = "byte"
    vocab_size: int = BYTE_VOCAB_SIZE
    pad_id: int = BYTE_PAD_ID
    bos_id: int = BYTE_BOS_ID
    eos_id: int = BYTE_EOS_ID

    def encode(self, text: str | bytes) -> np.ndarray:
        # 'surrogateescape' so that text decoded from invalid bytes encodes back to them.
        raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes behind `ids`; special ids are dropped."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

    def decode(self, ids: Iterable[int]) -> str:
        # Invalid bytes become lone surrogates instead of raising, and encode() turns them
        # back into the same bytes: the round trip is exact for any byte string.
        return self.decode_bytes(ids).decode("utf-8", errors="surrogateescape")


class SentencePieceTokenizer:
    """A SentencePiece `.model` file (for example the 32000-piece LLaMA/Mistral tokenizers)."""

    def __init__(self, model_path: str):
        import sentencepiece  # noqa: PLC0415 - only needed when this tokenizer is chosen

        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"data.tokenizer: SentencePiece model {model_path!r} does not exist; "
                "train one with `python -m gla_jax.data train-tokenizer --output=PATH.model` "
                "or set data.tokenizer='byte'"
            )
        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.name = model_path
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(
                f"data.tokenizer: {model_path!r} has no EOS piece, which packing needs to "
                "separate documents"
            )
        # Many public models (LLaMA's) have no pad piece; padded positions carry segment id 0
        # and loss weight 0, so any valid id will do there.
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else 0

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in specials])


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte' or the path of a SentencePiece `.model` file."""
    if spec in ("byte", "bytes", ""):
        return ByteTokenizer()
    return SentencePieceTokenizer(os.path.expanduser(spec))


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Refuses a tokenizer whose ids would index past the model's embedding table."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has vocab_size {tokenizer.vocab_size} (ids up to "
            f"{tokenizer.vocab_size - 1}) but model.vocab_size is {model_vocab_size}; set "
            f"model.vocab_size >= {tokenizer.vocab_size} or choose another data.tokenizer"
        )


def train_sentencepiece(
    texts: Iterable[str],
    output: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model offline from `texts` (documents) and writes `output`.

    Ids 0..3 are PAD, UNK, BOS, EOS. Normalization is the identity and whitespace is kept, and
    unknown characters fall back to bytes, so decode(encode(text)) == text for any valid UTF-8
    text without U+2581 ('▁', SentencePiece's own space mark, which decodes as a space).
    """
    import sentencepiece  # noqa: PLC0415

    def lines() -> Iterable[str]:
        for text in texts:
            yield from (line for line in text.splitlines() if line.strip())

    prefix = output[: -len(".model")] if output.endswith(".model") else output
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    settings = dict(
        sentence_iterator=iter(lines()),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    try:
        sentencepiece.SentencePieceTrainer.train(**settings)
    except RuntimeError as err:  # e.g. a vocabulary smaller than the corpus' characters
        raise ValueError(f"SentencePiece could not train a tokenizer: {err}") from None
    return SentencePieceTokenizer(prefix + ".model")


def encode_document(tokenizer: Tokenizer, text: str | bytes, *, add_bos: bool) -> np.ndarray:
    """One document's ids as the packer lays them out: [BOS] text EOS."""
    ids = tokenizer.encode(text)
    head: Sequence[int] = (tokenizer.bos_id,) if add_bos and tokenizer.bos_id >= 0 else ()
    out = np.empty(len(head) + len(ids) + 1, dtype=np.int32)
    out[: len(head)] = head
    out[len(head) : len(head) + len(ids)] = ids
    out[-1] = tokenizer.eos_id
    return out
