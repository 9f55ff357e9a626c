"""Command line for the input pipeline.

    python -m gla_jax.data prepare [--name=kjv | --name=text_files --paths=DIR ...]
    python -m gla_jax.data train-tokenizer --output=tok.model --vocab-size=8192 [--name=...]
    python -m gla_jax.data inspect [--seq-len=128] [--tokenizer=tok.model]

`train-tokenizer` reads the train split of the chosen corpus, offline, and writes a
SentencePiece model whose path then goes into `data.tokenizer`; its vocab size goes into
`model.vocab_size`.
"""

from __future__ import annotations

import argparse
import sys

from gla_jax.data import corpora, default_data_config, loader, tokenizers


def _add_corpus_flags(parser: argparse.ArgumentParser) -> None:
    defaults = default_data_config()
    parser.add_argument("--name", default=defaults.name, help="kjv, text_files or a tfds name")
    parser.add_argument("--data-dir", default="", help="where corpora are prepared")
    parser.add_argument("--paths", nargs="*", default=[], help="for --name=text_files")
    parser.add_argument("--doc-split", default=defaults.doc_split, choices=["file", "blank_line"])
    parser.add_argument("--text-field", default=defaults.text_field)
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument(
        "--eval-split", default=defaults.eval_split, help="the held-out split (lm1b: test)"
    )


def config_from_args(args: argparse.Namespace):
    config = default_data_config()
    config.name = args.name
    config.data_dir = args.data_dir
    config.paths = tuple(args.paths)
    config.doc_split = args.doc_split
    config.text_field = args.text_field
    config.validation_fraction = args.validation_fraction
    config.eval_split = args.eval_split
    if getattr(args, "tokenizer", None):
        config.tokenizer = args.tokenizer
    return config


def prepare(args) -> None:
    config = config_from_args(args)
    if config.name == "mqar":
        print("mqar is generated as it is read (gla_jax/mqar.py): nothing to prepare")
        return
    for split in ("train", config.eval_split):
        source, _ = corpora.open_split(config, split)
        print(f"{config.name} {split}: {len(source)} documents")


def train_tokenizer(args) -> None:
    config = config_from_args(args)
    source, field = corpora.open_split(config, "train")

    def texts():
        for i in range(len(source)):
            text = source[i][field]
            yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text

    tokenizer = tokenizers.train_sentencepiece(
        texts(), args.output, vocab_size=args.vocab_size, model_type=args.model_type
    )
    print(
        f"wrote {tokenizer.name}: vocab_size {tokenizer.vocab_size} "
        f"(set data.tokenizer={tokenizer.name!r} and model.vocab_size >= that)"
    )


def inspect(args) -> None:
    config = config_from_args(args)
    iterator = loader.make_lm_dataset(config, seq_len=args.seq_len, global_batch_size=2)
    tokenizer = loader.make_tokenizer(config)
    batch = next(iterator)
    for key, value in batch.items():
        print(f"{key:12s} {value.dtype} {value.shape} first: {value[0, :16].tolist()}")
    print("row 0:", repr(tokenizer.decode(batch["tokens"][0])))
    print("state:", iterator.get_state())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gla_jax.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="build a corpus into the data dir")
    _add_corpus_flags(p)
    p.set_defaults(run=prepare)
    p = commands.add_parser("train-tokenizer", help="train a SentencePiece model offline")
    _add_corpus_flags(p)
    p.add_argument("--output", required=True, help="path of the .model file to write")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.set_defaults(run=train_tokenizer)
    p = commands.add_parser("inspect", help="print the first batch")
    _add_corpus_flags(p)
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--seq-len", type=int, default=128)
    p.set_defaults(run=inspect)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: one clear line, no trace
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
