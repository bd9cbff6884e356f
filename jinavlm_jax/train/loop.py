"""The training loop: a `Trainer` runs the steps of a `train.setup.Setup` with logs, evals and checkpoints.

    result = run_training(load_config("configs/demo.yaml"))

Metrics stay on the devices between log steps: they are fetched every `log.every` steps (and before
a checkpoint or an eval, so nothing is saved from a non-finite state), so the host does not wait
for every step. Step time, tokens/s and MFU are averages over the steps since the last fetch.

Preemption: SIGTERM sets a flag; the step in flight finishes, a checkpoint of that step is written
(and waited for), and `Preempted` is raised (the CLI exits with status 143). Restarting the same
command resumes from the latest checkpoint: params, optimizer state, step and the data iterator,
so the losses continue exactly as in an uninterrupted run. A NaN / infinite loss raises
`NonFiniteLoss` naming the step (nothing is saved from a non-finite state).
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import TrainConfig, TrainConfigError
from .setup import Setup, build_setup, initial_params, maybe_initialize_distributed



class Preempted(RuntimeError):
    """Training stopped on SIGTERM after checkpointing `step` (the CLI exits with status 143)."""

    exit_status = 143

    def __init__(self, step: int, directory: str):
        super().__init__(f"SIGTERM received: saved a checkpoint of step {step} in {directory}; "
                         "run the same command again to resume")
        self.step = step


class NonFiniteLoss(RuntimeError):
    """The loss became NaN / infinite at `step` (an error for the CLI: status 1)."""

    exit_status = 1

    def __init__(self, step: int, value: float, last_checkpoint: int | None, directory: str):
        where = (f"the last checkpoint is step {last_checkpoint} in {directory}" if last_checkpoint is not None
                 else "no checkpoint was written yet")
        super().__init__(f"loss became {value} at step {step}; stopped without saving ({where}). Lower the "
                         "learning rates, check the data of this step, or use float32 compute")
        self.step = step


@dataclass
class TrainResult:
    """What a finished run produced."""

    steps: int
    output_dir: Path
    final_loss: float | None = None
    heldout: dict = field(default_factory=dict)
    generation: Any = None            # evaluate.GenerationReport or None
    export_dir: Path | None = None
    adapter_dir: Path | None = None   # LoRA runs: OUTPUT_DIR/adapter
    plot: Path | None = None
    wall_time_s: float = 0.0


class _SigtermFlag:
    """Turns SIGTERM into a flag checked between steps (the handler itself does nothing risky)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------------------------------- the run

@dataclass
class _Pending:
    """Host-side record of the newest dispatched step, whose metrics are still on the devices."""

    step: int
    metrics: Any
    info: dict


class Trainer:
    """Runs the train steps of a `Setup`: state, data iterator, checkpoints, logs and evals.

    The run's state lives on the instance (`state`, `data`, `last_saved`, `pending`, the timing
    window), so each part of the loop is a method: `step()` dispatches one train step, `fetch()`
    brings the pending metrics to the host, `save()` and `evaluate()` run at their boundaries.
    """

    def __init__(self, setup: Setup, *, verbose: bool = True, on_step: Callable[[int, dict], None] | None = None):
        import jax
        from ..flops import peak_flops_per_device
        from .checkpointing import TrainCheckpointer, abstract_like
        from .metrics import MetricsLog, Progress
        from .step import init_state

        self.setup = s = setup
        self.cfg = cfg = s.cfg
        self.on_step = on_step
        self.out_dir = Path(cfg.run.output_dir).absolute()
        self.lead = jax.process_index() == 0
        self.verbose = verbose and self.lead
        self.n_proc = jax.process_count()
        self.result = TrainResult(steps=cfg.run.steps, output_dir=self.out_dir)

        self.ckpt = TrainCheckpointer(self.out_dir / "checkpoints", keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save)
        self.meta = {"config": cfg.to_dict(), "model_config": s.model_cfg.to_hf(),
                     "runtime": {"dtype": s.model_cfg.dtype, "param_dtype": s.model_cfg.param_dtype}}
        latest = self.ckpt.latest_step()
        if latest is not None and not cfg.run.resume:
            raise TrainConfigError(f"run.output_dir {self.out_dir} already has checkpoints (latest step {latest}); "
                                   "use run.resume=true to continue it, or another run.output_dir")
        self.data = iter(s.train_dataset())
        if latest is not None:
            old = self.ckpt.read_meta(latest)
            if old.get("model_config") != self.meta["model_config"]:
                raise TrainConfigError(f"the checkpoint of step {latest} in {self.ckpt.directory} was trained with "
                                       "a different model architecture; use another run.output_dir")
            shapes = jax.eval_shape(lambda: {"step": jax.numpy.zeros((), jax.numpy.int32),
                                             "params": s.abstract_params, "opt_state": s.tx.init(s.abstract_params)})
            self.state, _ = self.ckpt.restore(latest, abstract_like(shapes, s.steps.state_shardings), self.data)
            self.say(f"resumed from step {latest} ({self.ckpt.directory})")
        else:
            self.state = init_state(s.tx, s.steps.state_shardings, initial_params(cfg, s.model_cfg, s.mesh))
        self.start = int(jax.device_get(self.state["step"]))
        self.last_saved = latest

        self.log = MetricsLog(self.out_dir, tensorboard=cfg.log.tensorboard, enabled=self.lead)
        if self.lead:
            (self.out_dir / "config.yaml").write_text(_yaml(cfg.to_dict()))
        self.peak = peak_flops_per_device(jax.devices()[0], cfg.log.peak_tflops_per_device)
        self.progress = Progress(cfg.run.steps, self.start, cfg.log.progress and self.verbose)
        self.pending: _Pending | None = None
        # Step time is averaged over the steps dispatched since the last fetch (the window).
        self.window_start = time.time()
        self.window_steps = 0
        self.window_tokens = 0.0
        self.gen_examples = None         # the held-out generation examples, read at the first eval

    def say(self, msg: str) -> None:
        """A status line on stderr (lead process of a verbose run)."""
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the parts of a step

    def step(self, step: int) -> None:
        """Dispatch train step `step` on the next batch (returns before the devices finish it)."""
        from .step import check_loss_positions, put_batch
        it = self.data
        host = next(it)
        check_loss_positions(host["weights"], self.cfg.run.loss_positions, step)
        info = {"batch_tokens": float((host["segment_ids"] > 0).sum()) * self.n_proc,
                "samples": it.counters["samples"], "skipped_bad_image": it.counters["skipped_bad_image"],
                "skipped_too_long": it.counters["skipped_too_long"], "truncated": it.counters["truncated"]}
        batch = put_batch(_device_keys(host), self.setup.mesh)
        self.state, metrics = self.setup.steps.train(self.state, batch)
        self.pending = _Pending(step, metrics, info)
        self.window_steps += 1
        self.window_tokens += info["batch_tokens"]

    def fetch(self) -> dict | None:
        """Bring the pending step's metrics to the host, check the loss and log them (None: none pending).

        Raises NonFiniteLoss for a NaN / infinite loss.
        """
        import jax
        from ..flops import mfu
        if self.pending is None:
            return None
        p, self.pending = self.pending, None
        vals = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
        if not math.isfinite(vals["loss"]):
            self.ckpt.wait()
            raise NonFiniteLoss(p.step, vals["loss"], self.last_saved, str(self.ckpt.directory))
        now = time.time()
        elapsed = now - self.window_start
        dt = elapsed / max(self.window_steps, 1)
        vals.update(p.info)
        vals["step_time_s"] = dt
        vals["tokens_per_s"] = self.window_tokens / elapsed if elapsed > 0 else 0.0
        if self.peak:
            vals["mfu"] = mfu(self.setup.flops_per_step, dt, self.peak, jax.device_count())
        self.window_start, self.window_steps, self.window_tokens = now, 0, 0.0
        self.result.final_loss = vals["loss"]
        if self.on_step is not None:
            self.on_step(p.step, vals)
        self.log.write(p.step, vals)
        self.progress.show(loss=vals["loss"], acc=vals["accuracy"])
        return vals

    def save(self, step: int) -> None:
        """Start checkpointing the state and data iterator of `step` (asynchronous by default)."""
        self.ckpt.save(step, self.state, self.data, self.meta)
        self.last_saved = step

    def evaluate(self, step: int, final: bool) -> None:
        """Held-out loss and generation accuracy on the eval splits, logged as kind "eval"."""
        from ..data.pipeline import eval_dataset, eval_examples
        from .evaluate import generation_accuracy, heldout_loss
        from .step import put_batch
        s, e = self.setup, self.cfg.eval
        if not s.held_sources:
            return
        values = {}
        if e.batches:
            ds, n_cover = eval_dataset(s.held_sources, s.encode, s.batch_spec, global_batch=self.cfg.data.batch_size)
            eit = iter(ds)
            batches = (put_batch(_device_keys(next(eit)), s.mesh) for _ in range(min(e.batches, n_cover)))
            values.update({f"heldout_{k}": v for k, v in heldout_loss(s.steps.eval, self.state, batches).items()})
        if e.generate.samples:
            if self.gen_examples is None:
                self.gen_examples = eval_examples(s.held_sources, e.generate.samples)
            rep = generation_accuracy(s.model_cfg, s.model_params(self.state["params"]), s.processor,
                                      self.gen_examples,
                                      max_new_tokens=e.generate.max_new_tokens, batch_size=e.generate.batch_size,
                                      metric=e.generate.metric, mesh=s.mesh)
            values.update(rep.summary())
            if final:
                self.result.generation = rep
        self.log.write(step, values, kind="eval")
        self.result.heldout = values
        self.progress.write(f"eval @ step {step}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items() if "/" not in k))

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        """Train from the current step to `run.steps`, then save, evaluate, export and plot."""
        import jax
        cfg = self.cfg
        total = cfg.run.steps
        try:
            with _SigtermFlag() as sigterm:
                for step in range(self.start + 1, total + 1):
                    if sigterm.set:
                        break
                    self.step(step)
                    self.progress.update(1)
                    saving = step % cfg.checkpoint.every == 0 or step == total or sigterm.set
                    evaluating = bool(cfg.eval.every) and step % cfg.eval.every == 0 and step != total
                    if step % cfg.log.every == 0 or saving or evaluating:
                        self.fetch()    # before saving: nothing is saved from a non-finite state
                    if saving:
                        self.save(step)
                    if evaluating:
                        self.evaluate(step, final=False)
                self.fetch()
                done = int(jax.device_get(self.state["step"]))
                if sigterm.set and done < total:
                    if self.last_saved != done:
                        self.save(done)
                    self.ckpt.wait()
                    raise Preempted(done, str(self.ckpt.directory))
            if self.last_saved != total:
                self.save(total)
            self.ckpt.wait()
            self.progress.close()
            self.finish()
        finally:
            self.progress.close()
            self.log.close()
            self.ckpt.close()
        return self.result

    def finish(self) -> None:
        """After the last step: the final eval, the export and the loss plot (as configured)."""
        cfg, s = self.cfg, self.setup
        if cfg.eval.final:
            self.evaluate(cfg.run.steps, final=True)
        if s.lora is not None and self.n_proc == 1:
            self.result.adapter_dir = save_run_adapter(self.out_dir / "adapter", s, self.state["params"])
            self.say(f"adapter (rank {s.lora.rank}) saved to {self.result.adapter_dir}")
        if cfg.checkpoint.export and self.n_proc == 1:
            self.result.export_dir = export(self.out_dir / "export", s.model_cfg,
                                            s.model_params(self.state["params"]), s.processor, cfg)
        elif cfg.checkpoint.export:
            self.say("note: checkpoint.export runs on a single process; the params of this multi-host run are "
                     f"in the Orbax checkpoints under {self.ckpt.directory}")
        if self.lead and cfg.log.plot:
            from .metrics import plot_loss_png, read_metrics
            tr = read_metrics(self.out_dir / "metrics.jsonl")
            ev = read_metrics(self.out_dir / "metrics.jsonl", "eval")
            self.result.plot = plot_loss_png([(k, r["loss"]) for k, r in sorted(tr.items())],
                                             self.out_dir / "loss.png",
                                             [(k, r["heldout_loss"]) for k, r in sorted(ev.items())
                                              if "heldout_loss" in r])


def run_training(cfg: TrainConfig, *, verbose: bool = True, on_step: Callable[[int, dict], None] | None = None
                 ) -> TrainResult:
    """Train according to `cfg` (see the module docstring). `on_step(step, metrics)` is called with
    the metrics of every fetched step (every `log.every` steps; tests use it)."""
    maybe_initialize_distributed(cfg)
    import jax
    from .step import count_params

    t_start = time.time()
    lead = jax.process_index() == 0
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (verbose and lead) else (lambda msg: None)
    setup = build_setup(cfg, say, verbose)
    d, groups, mesh = cfg.data, setup.groups, setup.mesh
    say(f"model: {count_params(setup.abstract_params):,} params; groups: " + ", ".join(
        f"{k} ({v:,}{', frozen' if k in groups.frozen else ''})" for k, v in groups.counts.items()))
    if setup.lora is not None:
        lo = setup.lora
        say(f"lora: rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g} on {lo.modules!r}; base "
            f"{lo.base_dtype}, frozen; {sum(groups.counts.values()):,} adapter params trained")
    say(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es); global batch {d.batch_size} x {d.seq_len} tokens x "
        f"{d.crops_per_row} crops")
    result = Trainer(setup, verbose=verbose, on_step=on_step).run()
    result.wall_time_s = time.time() - t_start
    return result


def save_run_adapter(directory: Path, s: Setup, params) -> Path:
    """The adapter of a LoRA run alone (`adapt.lora.save_adapter`), with the base's provenance."""
    from ..adapt.lora import save_adapter, split_adapter
    cfg = s.cfg
    base = {"init": cfg.model.init if cfg.model.init == "random" else str(Path(cfg.model.init).absolute()),
            "model_config": s.model_cfg.to_hf(), "seed": cfg.run.seed, "steps": cfg.run.steps}
    import jax
    return save_adapter(directory, jax.device_get(split_adapter(params)[1]), s.lora, base)


def _device_keys(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "source"}


def export(directory: Path, model_cfg, params, processor, cfg: TrainConfig) -> Path:
    """Final params as a jinavlm-jax checkpoint with tokenizer and configs beside them, so that
    `jinavlm generate --checkpoint DIR` finds everything in one directory."""
    from ..checkpoint import save
    save(directory, model_cfg, params, overwrite=True, source={"trained_by": "jinavlm_jax.train",
                                                             "steps": cfg.run.steps})
    tok_dir = Path(cfg.tokenizer)
    from ..processing import PROCESSOR_FILES
    for name in PROCESSOR_FILES:
        if name != "preprocessor_config.json" and (tok_dir / name).is_file():  # written below from `processor`
            shutil.copy(tok_dir / name, directory / name)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor.config.to_hf(), indent=1))
    (directory / "config.json").write_text(json.dumps(model_cfg.to_hf(), indent=1))
    return directory


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
