"""`python train.py [RECIPE.yaml] [key=value ...]`: train jina-vlm from a recipe.

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
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEMO_RECIPE = REPO_CONFIGS / "demo.yaml"

EPILOG = """examples:
  python train.py                                        # the CPU demo
  python train.py configs/stage1_alignment.yaml run.output_dir=runs/s1 data.batch_size=256
  python train.py configs/stage2_instruct.yaml model.init=runs/s1/export optimizer.groups.vision.lr=null
  python train.py configs/demo.yaml run.steps=50 --print-config

overrides are dotted keys into the recipe (values parsed as YAML; null removes a source/group entry
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


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load and validate the recipe, train; returns the exit status."""
    ap = argparse.ArgumentParser(prog="train.py", description="Train jina-vlm from a YAML recipe.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", metavar="RECIPE.yaml | key=value",
                    help="a recipe (default: configs/demo.yaml) followed by overrides")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    ns = ap.parse_intermixed_args(argv)

    recipe = None
    overrides = []
    for a in ns.args:
        if "=" in a:
            overrides.append(a)
        elif recipe is None:
            recipe = a
        else:
            print(f"train.py: error: more than one recipe given ({recipe}, {a}); overrides look like "
                  "key=value", file=sys.stderr)
            return 2
    from .config import TrainConfigError, load_config
    try:
        cfg = load_config(recipe or DEMO_RECIPE, overrides)
    except TrainConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    if ns.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
        return 0
    if cfg.demo.enabled and cfg.distributed.initialize != "always" and cfg.distributed.coordinator_address is None:
        _cpu_devices_flag()

    from .loop import NonFiniteLoss, Preempted, run_training
    try:
        result = run_training(cfg, verbose=not ns.quiet)
    except Preempted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 143
    except NonFiniteLoss as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # configuration, data and checkpoint errors are ValueErrors
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        return 130
    if cfg.demo.enabled:
        from .demo import demo_report
        demo_report(cfg, result)
    else:
        _summary(result)
    return 0


def _summary(result) -> None:
    print(f"trained {result.steps} steps in {result.wall_time_s / 60:.1f} min -> {result.output_dir}")
    if result.final_loss is not None:
        print(f"final train loss {result.final_loss:.4f}")
    for k, v in result.heldout.items():
        if isinstance(v, float):
            print(f"{k}: {v:.4f}")
    if result.export_dir:
        print(f"exported: {result.export_dir} (jinavlm generate --checkpoint {result.export_dir} ...)")


if __name__ == "__main__":
    sys.exit(main())
