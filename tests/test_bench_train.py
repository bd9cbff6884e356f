"""benchmarks/bench_train.py: the smoke run trains both sides and prints a table with both."""
from __future__ import annotations

import math
import re

import pytest


@pytest.mark.slow
def test_bench_train_smoke(benchmark_module, capsys):
    bench_train = benchmark_module("bench_train")
    assert bench_train.main(["--smoke", "--sizes", "demo", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| demo |")]
    sides = [r.split("|")[2].strip() for r in rows]
    assert any(s.startswith("jinavlm-jax") for s in sides), out
    assert any(s.startswith("PyTorch") for s in sides), out
    for r in rows:
        tokens_per_s = float(r.split("|")[6].strip().replace(",", ""))
        assert math.isfinite(tokens_per_s) and tokens_per_s > 0, r
    # Both sides start near ln(vocab) (the sanity check prints a line when one does not).
    assert not re.search(r"first loss .* is not near", out), out
