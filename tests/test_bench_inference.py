"""benchmarks/bench_inference.py: the smoke run (the demo model's geometry, random weights) measures
every workload on both sides, the time-to-first-token photo included, and prints one table."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_bench_inference_smoke(benchmark_module, capsys):
    bench_inference = benchmark_module("bench_inference")
    assert bench_inference.main(["--smoke", "--dtypes", "float32", "--decode-tokens", "3", "--no-int8"]) == 0
    out = capsys.readouterr().out
    rows = {r.split("|")[2].strip(): r.split("|") for r in out.splitlines()
            if r.startswith("| float32 |") and r.count("|") == 8}   # the main table's rows
    names = " / ".join(rows)
    for want in ("decoder prefill", "decoder decode, batch 1", "decoder decode, batch 8", "vision + connector",
                 "time to first token: one 1000x750 photo"):
        assert any(n.startswith(want) for n in rows), (want, names)
    for cols in rows.values():  # ours, transformers: a measured time or rate on both sides
        for cell in cols[3:5]:
            assert float(cell.split()[0]) > 0, cols
    assert "Machine: CPU" in out and "batch-8 decode:" in out
