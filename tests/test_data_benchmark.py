"""The throughput benchmark runs end to end on a small corpus and writes its plot."""

import importlib.util
import pathlib

BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data_throughput.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("data_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_rates_and_plots(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i} " + "word " * (i % 50) for i in range(200)))
    plot = tmp_path / "throughput.png"
    rows = load_benchmark().main(
        [
            "--name=text_files",
            f"--paths={corpus}",
            "--doc-split=blank_line",
            f"--data-dir={tmp_path / 'prepared'}",
            "--seq-lens=64,128",
            "--batch-size=2",
            "--seconds=0.05",
            f"--plot={plot}",
        ]
    )
    assert [(r["packing"], r["seq_len"]) for r in rows] == [
        ("concat", 64),
        ("concat", 128),
        ("pad", 64),
        ("pad", 128),
    ]
    for r in rows:
        assert r["tokens_per_s"] >= r["real_tokens_per_s"] > 0
    # Concatenation wastes nothing on padding; one document per row does.
    assert rows[0]["tokens_per_s"] == rows[0]["real_tokens_per_s"]
    assert rows[2]["real_tokens_per_s"] < rows[2]["tokens_per_s"]
    assert plot.stat().st_size > 1000
    assert "real tokens/s" in capsys.readouterr().out
