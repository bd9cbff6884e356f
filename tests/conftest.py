"""Shared test fixtures.

The golden data of `../shared/testdata/` (outputs of the official processor and of an independent
port of the whole model) lives beside the clone in CI, not in a user's checkout: tests that need it
take the `testdata` fixture and are skipped with the reason when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The tests run on CPU (multi-device ones on simulated CPU devices). With libtpu installed (the [tpu]
# extra) JAX would otherwise probe for TPU chips on import and log errors; the AOT tests reach libtpu
# through compile-only topologies, which this does not affect. Subprocesses inherit it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests' programs are small and compiled once each: most of their time is XLA:CPU compiling, and
# LLVM's optimisation passes are most of that. Level 0 halves the suite's time; it changes no
# floating-point result (XLA:CPU does not reassociate without fast-math, at any level), and the
# matmuls run in library kernels either way. Speed is measured by benchmarks/, never by tests.
# Subprocesses inherit it (tests that set XLA_FLAGS for simulated devices append to it).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def testdata_dir() -> Path | None:
    """Location of the shared golden data: $JINAVLM_TESTDATA, else ../shared/testdata beside the repo."""
    env = os.environ.get("JINAVLM_TESTDATA")
    cand = Path(env) if env else REPO.parent / "shared" / "testdata"
    return cand if (cand / "README.md").is_file() else None


@pytest.fixture(scope="session")
def testdata() -> Path:
    d = testdata_dir()
    if d is None:
        pytest.skip("golden data ../shared/testdata not found beside the repository "
                    "(set JINAVLM_TESTDATA to its path to run this test)")
    return d


@pytest.fixture(scope="session")
def set1(testdata, tmp_path_factory):
    """(config, params) of the golden tiny model of set 1, loaded through the official layout."""
    import shutil

    from jinavlm_jax import load_jina_vlm
    d = tmp_path_factory.mktemp("set1")
    shutil.copy(testdata / "set1_config.json", d / "config.json")
    shutil.copy(testdata / "set1_weights_official_names.safetensors", d / "model.safetensors")
    return load_jina_vlm(d)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A self-contained tiny model directory (no golden data needed): `testing.write_model_dir` with
    max_crops=1 (an image is a thumbnail and one tile)."""
    from jinavlm_jax.testing import write_model_dir
    return write_model_dir(tmp_path_factory.mktemp("tiny_vlm"), max_crops=1)


@pytest.fixture
def benchmark_module():
    """Import a script of benchmarks/ by name (they compare against torch + transformers, so the test
    is skipped without them)."""
    import importlib
    import sys

    def load(name: str):
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
        bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
        sys.path.insert(0, bench)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(bench)
    return load
