"""`jinavlm train [RECIPE.yaml] [key=value ...]` (also `python train.py ...`): train jina-vlm from a recipe.

Without a recipe it runs the embedded demo (`configs/demo.yaml`): a synthetic multilingual VQA
dataset built with the TFDS builder, a tiny model trained on the CPU, held-out accuracy, a
checkpoint with its tokenizer, a loss-curve PNG and the command to ask the model about an image.

Exit status: 0 done, 1 a configuration / data error or a NaN loss (one line on stderr naming the
key, file or step), 143 stopped by SIGTERM after checkpointing (rerun the same command to resume),
130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..command import Command, run_cli
from .config import RECIPES, TrainConfigError

DEMO_RECIPE = RECIPES / "demo.yaml"

EPILOG = """examples:
  python train.py                                        # the CPU demo
  python train.py configs/stage1_alignment.yaml run.output_dir=runs/s1 data.batch_size=256
  python train.py configs/stage2_instruct.yaml model.init=runs/s1/export optimizer.groups.vision.lr=null
  python train.py configs/demo.yaml run.steps=50 --print-config

a recipe is a YAML file or the name of one shipped with jinavlm-jax (demo, stage1_alignment,
stage2_instruct). overrides are dotted keys into the recipe (values parsed as YAML; null removes a source/group entry
or freezes a group's lr). Restarting with the same run.output_dir resumes from its latest checkpoint.
"""


def _cpu_devices_flag() -> None:
    """On a CPU-only host the demo trains data-parallel over one XLA device per core.

    XLA:CPU runs much of a step on one thread; separate devices run their shards in parallel. Only
    set when the user has not chosen a device count, and before JAX starts.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and "jax" not in sys.modules:
        n = max(1, min(os.cpu_count() or 1, 8))
        os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def configure(ap: argparse.ArgumentParser) -> None:
    """Arguments of `jinavlm train` / `python train.py`."""
    ap.add_argument("args", nargs="*", metavar="RECIPE.yaml | key=value",
                    help="a recipe (default: the demo) followed by overrides")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or status lines")


def run(ns: argparse.Namespace) -> int:
    """Load and validate the recipe, prepare the demo's data when it is the demo, train, report."""
    recipe = None
    overrides = []
    for a in ns.args:
        if "=" in a:
            overrides.append(a)
        elif recipe is None:
            recipe = a
        else:
            raise TrainConfigError(f"more than one recipe given ({recipe}, {a}); overrides look like key=value")
    from .config import load_config
    cfg = load_config(recipe or DEMO_RECIPE, overrides)
    if ns.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
        return 0
    if cfg.demo.enabled and cfg.distributed.initialize != "always" and cfg.distributed.coordinator_address is None:
        _cpu_devices_flag()

    from .loop import run_training
    t_start = time.time()
    if cfg.demo.enabled:
        _prepare_demo(cfg, verbose=not ns.quiet)
    result = run_training(cfg, verbose=not ns.quiet)
    if cfg.demo.enabled:
        from .demo import demo_report
        demo_report(cfg, result, total_s=time.time() - t_start)
    else:
        _summary(result)
    return 0


def _prepare_demo(cfg, verbose: bool) -> None:
    """The demo's corpus, tokenizer and model config, written by process 0 before the run starts."""
    import jax
    from .demo import prepare_demo
    from .setup import maybe_initialize_distributed, sync
    maybe_initialize_distributed(cfg)
    if jax.process_index() == 0:
        prepare_demo(cfg, (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None),
                     progress=verbose)
    sync("demo")


def _summary(result) -> None:
    print(f"trained {result.steps} steps in {result.wall_time_s / 60:.1f} min -> {result.output_dir}")
    if result.final_loss is not None:
        print(f"final train loss {result.final_loss:.4f}")
    for k, v in result.heldout.items():
        if isinstance(v, float):
            print(f"{k}: {v:.4f}")
    if result.export_dir:
        print(f"exported: {result.export_dir} (jinavlm generate --checkpoint {result.export_dir} ...)")


# The recipe and its overrides may come before or after the options: intermixed parsing.
COMMAND = Command("train", "train jina-vlm from a YAML recipe (no recipe: the CPU demo)", configure, run,
                  intermixed=True, description="Train jina-vlm from a YAML recipe.", epilog=EPILOG,
                  huge_pages=True)


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: parse, train; returns the exit status (see the module docstring)."""
    return run_cli(COMMAND, argv, "train.py")


if __name__ == "__main__":
    sys.exit(main())
