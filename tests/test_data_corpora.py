"""Corpora: tfds builds of local text and of the KJV, read without TensorFlow; bad input."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from gla_jax import data
from gla_jax.data import corpora


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content)
    return path


def text_config(tmp_path, paths, **overrides):
    config = data.default_data_config()
    config.name = "text_files"
    config.data_dir = str(tmp_path / "prepared")
    config.paths = tuple(str(p) for p in paths)
    for key, value in overrides.items():
        config[key] = value
    return config


def read_split(config, split):
    source, field = corpora.open_split(config, split)
    return [source[i][field].decode("utf-8") for i in range(len(source))]


@pytest.fixture
def mixed_corpus(tmp_path):
    root = tmp_path / "corpus"
    write(root / "a.txt", "First paragraph.\n\nSecond paragraph\nstill second.\n  \n\nThird.\n")
    write(root / "b" / "c.txt", "Another file's only paragraph.")
    write(root / "windows.txt", "Windows one.\r\n\r\nWindows\r\ntwo.\r\n")
    write(root / ".git" / "HEAD", "ref: refs/heads/main\n")  # hidden folders are not read
    write(root / ".hidden.txt", "a hidden file")
    write(root / "empty.txt", "")
    write(root / "blank.txt", "\n \n\t\n")
    write(root / "latin1.txt", "caf\xe9 au lait".encode("latin-1"))
    records = [{"text": "json one"}, {"text": "json two", "id": 2}, {"text": "   "}]
    lines = [json.dumps(r) for r in records] + ['{"text": "lone \\ud800 surrogate"}']
    write(root / "d.jsonl", "\n".join(lines) + "\n\n")
    expected = {
        "First paragraph.",
        "Second paragraph\nstill second.",
        "Third.",
        "Another file's only paragraph.",
        "Windows one.",
        "Windows\ntwo.",
        "caf\ufffd au lait",
        "json one",
        "json two",
        "lone \ufffd surrogate",
    }
    return root, expected


def test_text_files_split_into_train_and_validation_exactly(tmp_path, mixed_corpus, caplog):
    root, expected = mixed_corpus
    config = text_config(tmp_path, [root], doc_split="blank_line", validation_fraction=0.2)
    train, validation = read_split(config, "train"), read_split(config, "validation")
    assert sorted(train + validation) == sorted(expected)  # nothing lost, nothing twice
    assert validation and train
    # Bad files are named in the log: empty ones skipped, invalid bytes replaced.
    messages = "\n".join(caplog.messages)
    assert "empty.txt: no documents (empty or blank); skipped" in messages
    assert "blank.txt: no documents (empty or blank); skipped" in messages
    assert messages.count("latin1.txt") == 1  # once, though preparing reads files repeatedly
    assert "latin1.txt: not valid UTF-8" in messages
    assert "d.jsonl:4: unpaired surrogates replaced" in messages


def test_split_depends_only_on_document_text(tmp_path, mixed_corpus):
    root, _ = mixed_corpus
    first = text_config(tmp_path / "one", [root], doc_split="blank_line")
    copy = tmp_path / "elsewhere"
    for path in sorted(root.rglob("*")):  # same files, other names, reversed order
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if path.is_file() and not hidden:
            write(
                copy / f"z{len(list(copy.glob('*'))) if copy.exists() else 0}_{path.name}",
                path.read_bytes(),
            )
    second = text_config(tmp_path / "two", [copy], doc_split="blank_line")
    for split in ("train", "validation"):
        assert sorted(read_split(first, split)) == sorted(read_split(second, split))


def test_one_document_per_file_and_rebuild_on_change(tmp_path):
    root = tmp_path / "docs"
    for i in range(6):
        write(root / f"{i}.txt", f"document {i}\n\nwith a blank line inside")
    config = text_config(tmp_path, [root / "*.txt"])
    docs = read_split(config, "train") + read_split(config, "validation")
    assert sorted(docs) == sorted(f"document {i}\n\nwith a blank line inside" for i in range(6))
    write(root / "6.txt", "a new document")  # a changed corpus is prepared again, not reused
    docs = read_split(config, "train") + read_split(config, "validation")
    assert "a new document" in docs and len(docs) == 7


def test_missing_paths_and_bad_jsonl_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        read_split(text_config(tmp_path, [tmp_path / "nowhere.txt"]), "train")
    with pytest.raises(FileNotFoundError, match=r"\*.md.*matches no files"):
        read_split(text_config(tmp_path, [tmp_path / "*.md"]), "train")
    with pytest.raises(ValueError, match="data.paths is empty"):
        read_split(text_config(tmp_path, []), "train")
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text'"):
        read_split(text_config(tmp_path, [bad]), "train")
    broken = write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        read_split(text_config(tmp_path, [broken]), "train")
    lonely = write(tmp_path / "one.txt", "only one document")
    with pytest.raises(ValueError, match="at least 2"):
        read_split(text_config(tmp_path, [lonely]), "train")


def test_prepared_tfds_dataset_by_name_and_missing_ones(tmp_path, mixed_corpus):
    root, expected = mixed_corpus
    built = corpora.prepare_local(text_config(tmp_path, [root], doc_split="blank_line"))
    config = data.default_data_config()
    config.data_dir = str(tmp_path / "prepared")
    config.name = f"{built.name}/{built.builder_config.name}"
    assert sorted(read_split(config, "train") + read_split(config, "validation")) == sorted(
        expected
    )
    # A build killed midway leaves a folder that is no version; the latest version is read.
    prepared = os.path.join(built.data_dir, os.pardir)
    write(pathlib.Path(prepared) / "incomplete.A1B2_1.0.0" / "dataset_info.json", "{}")
    assert len(read_split(config, "train")) == len(built.as_data_source("train"))
    config.name += ":1.0.0"
    assert len(read_split(config, "train")) == len(built.as_data_source("train"))
    config.name = "lm1b"
    with pytest.raises(FileNotFoundError, match=r"tfds build lm1b .*--file_format=array_record"):
        read_split(config, "train")
    config.name = built.name  # several configs could be meant: ask for one
    with pytest.raises(ValueError, match="name one of its build configs"):
        read_split(config, "train")
    config.name = f"{built.name}/{built.builder_config.name}:9.9.9"
    with pytest.raises(FileNotFoundError, match="version 9.9.9 not prepared"):
        read_split(config, "train")


def test_kjv_corpus(tmp_path):
    config = data.default_data_config()
    config.data_dir = str(tmp_path)
    train, validation = read_split(config, "train"), read_split(config, "validation")
    assert len(train) + len(validation) == 1189  # chapters of the King James Bible
    assert 0.01 < len(validation) / 1189 < 0.04
    genesis = next(d for d in train + validation if d.startswith("Genesis 1\n"))
    assert genesis.splitlines()[1].startswith("In the beginning God created")
    assert not any(":" in line[:6] and line[0].isdigit() for line in genesis.splitlines())


def test_builds_and_reads_without_importing_tensorflow(tmp_path, mixed_corpus):
    root, _ = mixed_corpus
    script = textwrap.dedent(
        f"""
        import sys
        from gla_jax import data
        config = data.default_data_config()
        config.name, config.doc_split = "text_files", "blank_line"
        config.data_dir, config.paths = {str(tmp_path / "no_tf")!r}, ({str(root)!r},)
        it = data.make_lm_dataset(config, seq_len=32, global_batch_size=2)
        print(int((next(it)["segment_ids"] > 0).sum()))
        # Never imported: the build and the reads go through array_record alone (where
        # TensorFlow is not installed, any import of it would fail).
        assert "tensorflow" not in sys.modules
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == 64
