"""Tokenizers: exact round trips (including invalid UTF-8 for bytes), special ids, vocab checks."""

import numpy as np
import pytest

from gla_jax import data
from gla_jax.data import tokenizers

TEXTS = [
    "",
    "In the beginning God created the heaven and the earth.",
    "naïve café, Ωμέγα, 漢字, emoji 🙂🏳️‍🌈, combining e\u0301",
    "  leading and trailing spaces, double  spaces,\ttabs\nand\r\nnewlines\n\n",
    "\x00 nul and \x7f del and \u2028 line separator",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip_text(text):
    tok = data.ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe\x00abc", b"caf\xc3", b"\xc3\x28 overlong \xc0\xaf", bytes(range(256))],
)
def test_byte_round_trip_invalid_utf8(raw):
    tok = data.ByteTokenizer()
    ids = tok.encode(raw)
    assert ids.tolist() == list(raw)
    assert tok.decode_bytes(ids) == raw
    # decode() gives a str; encoding that str gives back exactly the same bytes.
    assert tok.encode(tok.decode(ids)).tolist() == list(raw)


def test_byte_special_ids_are_documented_and_dropped_by_decode():
    tok = data.ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
    ids = tokenizers.encode_document(tok, "hi", add_bos=True)
    assert ids.tolist() == [257, ord("h"), ord("i"), 258]
    assert tok.decode(list(ids) + [256, 256]) == "hi"
    assert tokenizers.encode_document(tok, "hi", add_bos=False).tolist() == [104, 105, 258]


def test_check_vocab_names_the_field():
    data.check_vocab(data.ByteTokenizer(), 259)
    data.check_vocab(data.ByteTokenizer(), 512)
    with pytest.raises(ValueError, match=r"model.vocab_size is 256.*>= 259"):
        data.check_vocab(data.ByteTokenizer(), 256)


def test_load_tokenizer_missing_model_names_the_path(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        data.load_tokenizer(missing)
    assert isinstance(data.load_tokenizer("byte"), data.ByteTokenizer)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    corpus = [
        "And God said, Let there be light: and there was light.\n" * 3,
        "The quick brown fox jumps over the lazy dog. 0123456789\n" * 3,
        "Pack my box with five dozen liquor jugs!\n" * 3,
    ] * 20
    path = str(tmp_path_factory.mktemp("spm") / "tiny.model")
    return data.train_sentencepiece(corpus, path, vocab_size=320)


def test_sentencepiece_trained_offline(sentencepiece_model):
    tok = sentencepiece_model
    assert tok.vocab_size == 320
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.name.endswith("tiny.model")
    # Reloading from the file gives the same tokenizer.
    again = data.load_tokenizer(tok.name)
    sample = "Let there be light"
    assert again.encode(sample).tolist() == tok.encode(sample).tolist()
    # Frequent words are merged into pieces rather than spelled out byte by byte.
    assert len(tok.encode("there was light")) < len("there was light")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sentencepiece_model, text):
    tok = sentencepiece_model
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
    assert tok.decode(ids) == text


def test_sentencepiece_training_failure_is_a_value_error(tmp_path):
    corpus = ["".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))]  # 400 distinct characters
    with pytest.raises(ValueError, match="SentencePiece could not train a tokenizer: .*vocab"):
        data.train_sentencepiece(corpus, str(tmp_path / "small.model"), vocab_size=100)
