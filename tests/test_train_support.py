"""Shared setup for the training tests (no tests here): a tiny synthetic corpus, tokenizer and model
config made once per session, and a runner for `train.py` in a subprocess (with optional fault
injection: a checkpoint finalisation that hangs, a pause per step).

Subprocesses share a JAX compilation cache so that only the first one pays for compiling the step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"

# The child runs train.py's main; env knobs inject faults through public seams: Orbax's public
# temporary-path protocol (`TrainCheckpointer.temporary_path_class`) and `Trainer.step`.
CHILD = textwrap.dedent("""
    import asyncio, os, sys, time
    hang = int(os.environ.get("HANG_FINALIZE_STEP", "0"))
    if hang:
        import orbax.checkpoint as ocp
        from jinavlm_jax.train.checkpointing import TrainCheckpointer

        class HangingRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
            async def finalize(self):
                if self.get_final().name == str(hang):
                    open(os.environ["MARKER"], "w").write("finalizing")
                    await asyncio.sleep(3600)  # killed here: the step directory is never renamed into place
                return await super().finalize()
        TrainCheckpointer.temporary_path_class = HangingRename
    pause = float(os.environ.get("PAUSE_PER_STEP", "0"))
    if pause:
        from jinavlm_jax.train.loop import Trainer
        step = Trainer.step
        def slow_step(self, n):
            time.sleep(pause)
            return step(self, n)
        Trainer.step = slow_step
    from jinavlm_jax.train.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def child_env(cache_dir: Path, devices: int | None = None, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices or 1}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_child(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-c", CHILD, "--quiet", str(DEMO), *args], env=env, stdout=f,
                            stderr=subprocess.STDOUT, cwd=str(REPO))


def losses_of(run_dir: Path) -> dict[int, float]:
    """{step: train loss} from a run's metrics.jsonl (re-run steps replace earlier records)."""
    from jinavlm_jax.train.metrics import read_metrics
    return {s: r["loss"] for s, r in read_metrics(run_dir / "metrics.jsonl").items()}


def run_child(args: list[str], env: dict, log: Path, timeout: float = 300) -> int:
    p = start_child(args, env, log)
    try:
        return p.wait(timeout)
    finally:
        if p.poll() is None:
            p.kill()


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {what}:\n"
                                 + (log.read_text()[-3000:] if log else ""))
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def shared_cache(tmp_path_factory) -> Path:
    """One JAX compilation cache for every subprocess of the session."""
    return tmp_path_factory.getbasetemp() / "jinavlm_jax_cache"


def shared_setup(tmp_path_factory) -> dict:
    """`make_setup` once per test session (every step of it is idempotent)."""
    return make_setup(tmp_path_factory.getbasetemp() / "jinavlm_train_setup")


def make_setup(root: Path) -> dict:
    """Tiny corpus + tokenizer + model dir + built datasets under `root` (reused when already there);
    returns paths and the overrides that point the demo recipe at them."""
    from jinavlm_jax.data.builder import build_dataset
    from jinavlm_jax.train.config import load_config
    from jinavlm_jax.train.demo import prepare_demo
    cfg = load_config(DEMO, [f"run.output_dir={root}", "demo.n_train=48", "demo.n_val=8", "demo.vision_pretrain_steps=0"])
    prepare_demo(cfg, say=lambda m: None)
    tfds_dir = root / "tfds"
    vqa = build_dataset(root / "raw" / "vqa", "vqa", tfds_dir, verbose=False)
    text = build_dataset(root / "raw" / "text", "text", tfds_dir, verbose=False)
    model = root / "model"
    # Random init with every group trained (the recipe's pretrained, frozen tower + connector: test_pretrain.py).
    overrides = ["demo.enabled=false", f"tokenizer={model}", f"model.config={model}", "model.init=random",
                 "optimizer.groups.vision.lr=0.002", "optimizer.groups.connector.lr=0.003",
                 f"data.sources.vqa.path={vqa}", f"data.sources.text.path={text}",
                 "data.batch_size=4", "data.seq_len=256", "log.every=1", "log.tensorboard=true",
                 "eval.final=false", "checkpoint.export=false", "log.plot=false", "mesh.data=1", "mesh.fsdp=-1"]
    return {"root": root, "model": model, "vqa": vqa, "text": text, "overrides": overrides, "config": cfg}
