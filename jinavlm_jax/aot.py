"""`python -m jinavlm_jax.aot`: the former home of `jinavlm aot`, kept so its commands keep working.

    python -m jinavlm_jax.aot --topology v5e:2x4 --job train ...   # = jinavlm aot ...
    python -m jinavlm_jax.aot --report docs/tpu.md                 # = python benchmarks/tpu_report.py ...

The code lives in `jinavlm_jax.tpu` (topology, FLOP counter, compile jobs, command line) and
`jinavlm_jax.flops` (the chip table and FLOP formulas); the docs/tpu.md generator in
`benchmarks/tpu_report.py` of the repository.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .flops import CHIPS, GiB, Chip, model_flops, remat_recompute_flops
from .tpu import (AOTError, DoesNotFit, Job, JaxprFlops, build_mesh, compile_job, compile_only_devices, count_flops,
                  decode_job, libtpu_available, load_recipe, parse_topology, prefill_job, train_job)
from .tpu.cli import HELP, configure, format_result, plan, run, save_json

REPORT_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tpu_report.py"


def main(argv: list[str] | None = None) -> int:
    """`jinavlm aot ARGS`, or with `--report MD` the docs/tpu.md generator of the repository checkout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--report" in argv:
        if not REPORT_SCRIPT.is_file():
            print(f"jinavlm aot: error: --report runs {REPORT_SCRIPT.name} of the repository's benchmarks/, "
                  f"which this installation lacks ({REPORT_SCRIPT} not found); run it from a checkout",
                  file=sys.stderr)
            return 1
        import runpy
        return runpy.run_path(str(REPORT_SCRIPT))["main"](argv)
    from .tpu.cli import main as aot_main
    return aot_main(argv)


__all__ = ["AOTError", "CHIPS", "Chip", "DoesNotFit", "GiB", "HELP", "JaxprFlops", "Job", "build_mesh",
           "compile_job", "compile_only_devices", "configure", "count_flops", "decode_job", "format_result",
           "libtpu_available", "load_recipe", "main", "model_flops", "parse_topology", "plan", "prefill_job",
           "remat_recompute_flops", "run", "save_json", "train_job"]

if __name__ == "__main__":
    sys.exit(main())
