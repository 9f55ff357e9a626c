"""The decoding benchmark runs end to end on the CPU with tiny models (--smoke)."""

import importlib.util
import json
import pathlib

BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "decoding.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("decoding_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_latency_and_cache_sizes(tmp_path):
    result = load_benchmark().main(["--smoke", f"--out={tmp_path}"])
    rows = {(r["model"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(m, c) for m in ("gla", "transformer") for c in (16, 32, 64)}
    for row in rows.values():
        assert "error" not in row and row["ms_per_token"] > 0
    # GLA carries one fixed-size state; a KV cache grows with the context it holds
    # (context + 1 warm-up + 3 timed tokens, 2 layers x keys and values, float32).
    assert rows[("gla", 16)]["cache_mib"] == rows[("gla", 64)]["cache_mib"] > 0
    for context in (16, 32, 64):
        expected = 2 * 2 * (context + 4) * 64 * 4 / 2**20
        assert rows[("transformer", context)]["cache_mib"] == expected
    assert result["recurrent_op"]["ms_per_call"] > 0
    assert json.loads((tmp_path / "decoding.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "decoding.png").stat().st_size > 1000
