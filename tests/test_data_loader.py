"""Loader: epochs cover every document once, per-host shards, exact resume, eval passes."""

import collections
import json

import jax
import numpy as np
import pytest

from gla_jax import data
from gla_jax.data import corpora

SEQ_LEN = 32
EOS = data.BYTE_EOS_ID
BOS = data.BYTE_BOS_ID


@pytest.fixture(scope="module")
def corpus_config(tmp_path_factory):
    """40 documents of very different lengths (some longer than several rows)."""
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    docs = []
    for i in range(40):
        length = int(rng.choice([1, 3, 8, 40]))
        docs.append(f"doc{i} " + " ".join(rng.choice(words, size=length)))
    path = tmp / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    config = data.default_data_config()
    config.name = "text_files"
    config.paths = (str(path),)
    config.data_dir = str(tmp / "prepared")
    config.validation_fraction = 0.15
    return config


def split_docs(config, split):
    source, field = corpora.open_split(config, split)
    return [source[i][field].decode() for i in range(len(source))]


def with_changes(config, **changes):
    config = config.copy_and_resolve_references()
    for key, value in changes.items():
        config[key] = value
    return config


def documents_in(batches):
    """Documents read back from the real tokens of consecutive batches, in order."""
    rows = np.concatenate([b["tokens"] for b in batches])
    segments = np.concatenate([b["segment_ids"] for b in batches])
    stream = np.concatenate([row[seg > 0] for row, seg in zip(rows, segments, strict=True)])
    ends = np.flatnonzero(stream == EOS)
    docs, start = [], 0
    for end in ends:
        ids = stream[start:end]
        assert ids[0] == BOS
        docs.append(bytes(ids[1:].astype(np.uint8)).decode())
        start = end + 1
    return docs, stream[start:]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def batches_until_epoch(iterator, epoch):
    out = []
    while iterator.get_state()["epoch"] < epoch:
        out.append(next(iterator))
    return out


@pytest.mark.parametrize("packing, max_segments", [("concat", 0), ("concat", 2), ("pad", 0)])
def test_each_epoch_shows_every_document_once_in_a_new_order(corpus_config, packing, max_segments):
    config = with_changes(corpus_config, packing=packing, max_segments_per_row=max_segments)
    expected = split_docs(config, "train")
    it = data.make_lm_dataset(config, seq_len=SEQ_LEN, global_batch_size=4)
    first = batches_until_epoch(it, 1)
    second = batches_until_epoch(it, 2)
    docs, _ = documents_in(first + second)
    n = len(expected)
    assert collections.Counter(docs[:n]) == collections.Counter(expected)
    assert collections.Counter(docs[n : 2 * n]) == collections.Counter(expected)
    assert docs[:n] != docs[n : 2 * n]  # reshuffled for the second epoch
    assert docs[:n] != expected  # and shuffled at all
    for batch in first:
        assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
        assert all(v.shape == (4, SEQ_LEN) for v in batch.values())
        # Segment ids change exactly after each EOS inside a row.
        tokens, seg = batch["tokens"], batch["segment_ids"]
        after_eos = (tokens[:, :-1] == EOS) & (seg[:, 1:] > 0)
        new_segment = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
        np.testing.assert_array_equal(after_eos, new_segment)
        assert not max_segments or seg.max() <= max_segments


def test_same_seed_same_batches_other_seed_other_order(corpus_config):
    def first_batches(seed):
        it = data.make_lm_dataset(
            with_changes(corpus_config, seed=seed), seq_len=SEQ_LEN, global_batch_size=2
        )
        return np.stack([b["tokens"] for b in take(it, 5)])

    np.testing.assert_array_equal(first_batches(3), first_batches(3))
    assert not np.array_equal(first_batches(3), first_batches(4))


def test_no_shuffle_reads_in_split_order(corpus_config):
    config = with_changes(corpus_config, shuffle=False, packing="pad")
    it = data.make_lm_dataset(config, seq_len=SEQ_LEN, global_batch_size=4)
    docs, _ = documents_in(batches_until_epoch(it, 1))
    expected = split_docs(config, "train")
    assert docs[: len(expected)] == expected


@pytest.mark.parametrize("packing", ["concat", "pad"])
def test_resume_gives_exactly_the_uninterrupted_batches(corpus_config, packing):
    config = with_changes(corpus_config, packing=packing)
    make = lambda: data.make_lm_dataset(config, seq_len=SEQ_LEN, global_batch_size=3)
    reference = take(make(), 60)  # several epochs: resume points cross epoch boundaries
    for stop in (1, 7, 23, 41):
        interrupted = make()
        take(interrupted, stop)
        state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
        resumed = make()
        resumed.set_state(state)
        for want, got in zip(reference[stop:], take(resumed, 60 - stop), strict=True):
            for key in want:
                np.testing.assert_array_equal(want[key], got[key], err_msg=key)
    assert make().docs_per_epoch < 60 * 3 * SEQ_LEN  # the reference spans several epochs
    assert interrupted.get_state()["epoch"] >= 1


def test_state_from_another_configuration_is_refused(corpus_config):
    state = data.make_lm_dataset(corpus_config, seq_len=SEQ_LEN, global_batch_size=2).get_state()
    other = data.make_lm_dataset(
        with_changes(corpus_config, seed=9), seq_len=SEQ_LEN, global_batch_size=2
    )
    with pytest.raises(ValueError, match="seed: saved 0, now 9"):
        other.set_state(state)
    longer = data.make_lm_dataset(corpus_config, seq_len=2 * SEQ_LEN, global_batch_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        longer.set_state(state)
    # The cursor counts tokens: another tokenization of the same documents is another stream.
    no_bos = data.make_lm_dataset(
        with_changes(corpus_config, add_bos=False), seq_len=SEQ_LEN, global_batch_size=2
    )
    with pytest.raises(ValueError, match="add_bos: saved True, now False"):
        no_bos.set_state(state)
    # A state saved before a key was recorded is still taken.
    older = {key: value for key, value in state.items() if key != "add_bos"}
    data.make_lm_dataset(corpus_config, seq_len=SEQ_LEN, global_batch_size=2).set_state(older)


def test_state_from_another_corpus_of_the_same_size_is_refused(corpus_config, tmp_path):
    """The same documents in another folder resume; other documents (every letter rotated) whose
    training split has as many documents do not."""
    state = data.make_lm_dataset(corpus_config, seq_len=SEQ_LEN, global_batch_size=2).get_state()
    (source,) = corpus_config.paths
    records = [json.loads(line) for line in open(source).read().splitlines()]

    def loader(folder, rotation):
        letters = "abcdefghijklmnopqrstuvwxyz"
        rotate = str.maketrans(letters, letters[rotation:] + letters[:rotation])
        folder.mkdir()
        path = folder / "docs.jsonl"
        path.write_text(
            "\n".join(json.dumps({"text": r["text"].translate(rotate)}) for r in records)
        )
        config = with_changes(corpus_config, paths=(str(path),))
        return data.make_lm_dataset(config, seq_len=SEQ_LEN, global_batch_size=2)

    loader(tmp_path / "copy", 0).set_state(state)
    # The split is drawn by each document's checksum: find a rotation that keeps its size, so
    # that only the documents' digest tells the corpora apart.
    others = (loader(tmp_path / f"rot{r}", r) for r in range(1, 26))
    other = next(o for o in others if o.docs_per_epoch == state["docs_per_epoch"])
    with pytest.raises(ValueError, match="documents_digest: saved"):
        other.set_state(state)


def test_state_from_another_tokenizer_file_of_the_same_name_is_refused(tmp_path):
    from gla_jax.data import loader

    first, second = tmp_path / "a" / "tok.model", tmp_path / "b" / "tok.model"
    first.parent.mkdir(), second.parent.mkdir()
    first.write_bytes(b"one model")
    second.write_bytes(b"another model")
    assert loader._tokenizer_digest(str(first)) != loader._tokenizer_digest(str(second))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tok.model").write_bytes(b"one model")
    assert loader._tokenizer_digest(str(first)) == loader._tokenizer_digest(
        str(tmp_path / "c" / "tok.model")
    )
    assert loader._tokenizer_digest("byte") == "byte"


def test_hosts_read_disjoint_shares_that_cover_the_split(corpus_config):
    expected = split_docs(corpus_config, "train")
    per_host = []
    for process_index in range(3):
        it = data.make_lm_dataset(
            corpus_config,
            seq_len=SEQ_LEN,
            global_batch_size=6,
            process_index=process_index,
            process_count=3,
        )
        assert next(it)["tokens"].shape == (2, SEQ_LEN)  # this host's rows only
        it.set_state({**it.get_state(), "doc_index": 0, "offset": 0, "batches": 0})
        docs, _ = documents_in(batches_until_epoch(it, 1))
        per_host.append(docs[: it.docs_per_epoch])
    assert sum(len(d) for d in per_host) == len(expected)
    assert collections.Counter(sum(per_host, [])) == collections.Counter(expected)


@pytest.mark.parametrize("packing, max_segments", [("concat", 0), ("concat", 2), ("pad", 0)])
def test_eval_is_one_ordered_pass(corpus_config, packing, max_segments):
    config = with_changes(corpus_config, packing=packing, max_segments_per_row=max_segments)
    evals = list(data.make_eval_dataset(config, seq_len=SEQ_LEN, global_batch_size=4))
    docs, rest = documents_in(evals)
    assert docs == split_docs(config, "validation") and rest.size == 0
    # Only the last batch may hold padding rows.
    assert all((b["segment_ids"] > 0).any(axis=1).all() for b in evals[:-1])


def test_eval_on_several_hosts_has_one_length(corpus_config):
    lengths, docs, last_has_data = [], [], []
    for process_index in range(2):
        it = data.make_eval_dataset(
            corpus_config,
            seq_len=8,
            global_batch_size=2,
            process_index=process_index,
            process_count=2,
        )
        batches = list(it)
        lengths.append((len(it), len(batches)))
        last_has_data.append(bool(batches[-1]["segment_ids"].any()))
        docs += documents_in(batches)[0]
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1]
    assert any(last_has_data)  # as many batches as the larger share needs, not more
    assert sorted(docs) == sorted(split_docs(corpus_config, "validation"))
    # A host with no validation documents still steps along with the others, on empty rows.
    empty_share = data.make_eval_dataset(
        corpus_config, seq_len=8, global_batch_size=64, process_index=63, process_count=64
    )
    batches = list(empty_share)
    assert len(batches) == len(empty_share) > 0
    assert all(not b["segment_ids"].any() for b in batches)
    fixed = data.make_eval_dataset(corpus_config, seq_len=8, global_batch_size=2, num_batches=500)
    assert len(list(fixed)) == 500  # runs on with empty rows once the data is used up


def test_bad_arguments_name_the_field(corpus_config):
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        data.make_lm_dataset(corpus_config, seq_len=8, global_batch_size=4, process_count=3)
    with pytest.raises(ValueError, match="global_batch_size 0 does not divide"):
        data.make_lm_dataset(corpus_config, seq_len=8, global_batch_size=0)
    with pytest.raises(ValueError, match="data.packing"):
        data.make_lm_dataset(
            with_changes(corpus_config, packing="best"), seq_len=8, global_batch_size=1
        )
    with pytest.raises(ValueError, match="data.validation_fraction"):
        data.make_lm_dataset(
            with_changes(corpus_config, validation_fraction=0.9), seq_len=8, global_batch_size=1
        )
    with pytest.raises(ValueError, match="fewer than the 64 processes"):
        data.make_lm_dataset(
            corpus_config, seq_len=8, global_batch_size=64, process_index=63, process_count=64
        )


def test_global_batch_on_a_mesh(corpus_config):
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    batch = next(
        data.make_lm_dataset(corpus_config, seq_len=SEQ_LEN, global_batch_size=jax.device_count())
    )
    global_batch = data.make_global_batch(batch, mesh)
    for key, value in batch.items():
        assert global_batch[key].shape == value.shape
        assert global_batch[key].sharding.spec == jax.sharding.PartitionSpec(("data",))
        np.testing.assert_array_equal(np.asarray(global_batch[key]), value)


def test_default_config_fields():
    config = data.default_data_config()
    assert (config.name, config.tokenizer, config.packing) == ("kjv", "byte", "concat")
    assert config.seed == 0 and config.shuffle and config.add_bos


def test_sentencepiece_tokenizer_trained_by_the_command_line(corpus_config, tmp_path, capsys):
    from gla_jax.data.__main__ import main as data_cli  # noqa: PLC0415

    model = tmp_path / "tok.model"
    data_cli(
        [
            "train-tokenizer",
            "--name=text_files",
            f"--paths={corpus_config.paths[0]}",
            f"--data-dir={corpus_config.data_dir}",
            f"--validation-fraction={corpus_config.validation_fraction}",
            f"--output={model}",
            "--vocab-size=300",
        ]
    )
    assert "vocab_size 300" in capsys.readouterr().out
    config = with_changes(corpus_config, tokenizer=str(model), shuffle=False)
    tokenizer = data.make_tokenizer(config)
    data.check_vocab(tokenizer, 300)
    batch = next(data.make_lm_dataset(config, seq_len=256, global_batch_size=1))
    tokens, seg = batch["tokens"][0], batch["segment_ids"][0]
    assert tokens.max() < 300 and tokens[0] == tokenizer.bos_id
    first_doc = tokens[seg == 1]
    assert first_doc[-1] == tokenizer.eos_id
    assert tokenizer.decode(first_doc) == split_docs(config, "train")[0]


def test_data_command_line_reports_bad_input_in_one_line(corpus_config, tmp_path, capsys):
    from gla_jax.data.__main__ import main as data_cli  # noqa: PLC0415

    corpus = [f"--paths={corpus_config.paths[0]}", f"--data-dir={corpus_config.data_dir}"]
    assert data_cli(["prepare", "--name=text_files", *corpus, "--eval-split=nope"]) == 2
    assert "has no split 'nope'" in capsys.readouterr().err
    assert data_cli(["inspect", "--name=text_files", *corpus, "--seq-len=1"]) == 2
    assert "seq_len must be at least 2" in capsys.readouterr().err
    assert data_cli(["prepare", "--name=mqar"]) == 0
    assert "nothing to prepare" in capsys.readouterr().out
