"""The training loop: recipe -> model, data, optimizer, mesh -> steps with logs, evals and checkpoints.

    result = run_training(load_config("configs/demo.yaml"))

Preemption: SIGTERM sets a flag; the step in flight finishes, a checkpoint of that step is written
(and waited for), and `Preempted` is raised (the CLI exits with status 143). Restarting the same
command resumes from the latest checkpoint: params, optimizer state, step and the data iterator,
so the losses continue exactly as in an uninterrupted run. A NaN / infinite loss raises
`NonFiniteLoss` naming the step (nothing is saved from a non-finite state).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from .config import TrainConfig, TrainConfigError


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after checkpointing `step`."""

    def __init__(self, step: int, directory: str):
        super().__init__(f"SIGTERM received: saved a checkpoint of step {step} in {directory}; "
                         "run the same command again to resume")
        self.step = step


class NonFiniteLoss(RuntimeError):
    """The loss became NaN / infinite at `step`."""

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
    plot: Path | None = None
    wall_time_s: float = 0.0


# ---------------------------------------------------------------------------------------- setup helpers

def maybe_initialize_distributed(cfg: TrainConfig) -> None:
    """jax.distributed.initialize when configured (before any other JAX call)."""
    import jax
    d = cfg.distributed
    if d.initialize == "never":
        return
    explicit = d.coordinator_address is not None
    pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")) or "SLURM_NTASKS" in os.environ and \
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if d.initialize == "always" or explicit or pod:
        kw = {}
        if explicit:
            kw = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                      process_id=d.process_id)
        jax.distributed.initialize(**kw)


def build_model_config(cfg: TrainConfig):
    """JinaVLMConfig from `model.config` (preset or config.json) + `model.arch` overrides + run-time fields."""
    from ..model import ConfigError, JinaVLMConfig
    m = cfg.model
    presets = {"tiny": JinaVLMConfig.tiny, "jina_vlm_2_4b": JinaVLMConfig.jina_vlm_2_4b}
    if m.config in presets:
        base = presets[m.config]()
    else:
        p = Path(m.config)
        if not (p.is_file() or (p / "config.json").is_file()):
            raise TrainConfigError(f"model.config: {m.config!r} is neither a preset {sorted(presets)} nor a "
                                   "config.json file / directory holding one")
        base = JinaVLMConfig.from_hf(p)
    try:
        return apply_arch(base, m.arch).replace(dtype=m.dtype, param_dtype=m.param_dtype,
                                                remat_policy=m.remat_policy, attention_impl=m.attention_impl)
    except ConfigError as e:
        raise TrainConfigError(f"model: {e}") from None


def apply_arch(base, arch: dict):
    """`base` with `model.arch` field overrides ({vision|connector|text: {field: value}}), validated."""
    from ..model import ConfigError
    sections = {"vision": base.vision, "connector": base.connector, "text": base.text}
    changes = {}
    for sec, fields in (arch or {}).items():
        if sec not in sections:
            raise TrainConfigError(f"model.arch.{sec}: unknown section (valid: {sorted(sections)})")
        if not isinstance(fields, dict):
            raise TrainConfigError(f"model.arch.{sec}: expected a mapping of field: value")
        valid = {f.name for f in dataclasses.fields(sections[sec])}
        bad = sorted(set(fields) - valid)
        if bad:
            raise TrainConfigError(f"model.arch.{sec}: unknown field(s) {bad} (valid: {sorted(valid)})")
        fixed = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
        changes[sec] = dataclasses.replace(sections[sec], **fixed)
    try:
        return dataclasses.replace(base, **changes)
    except ConfigError as e:
        raise TrainConfigError(f"model.arch: {e}") from None


def build_processor(cfg: TrainConfig):
    """The processor (tokenizer + image settings) of the recipe: `tokenizer` dir + `processor` overrides."""
    from ..processing import PreprocessConfig, ProcessingError, Processor
    tok = Path(cfg.tokenizer)
    if not cfg.tokenizer or not (tok / "tokenizer.json").is_file() and not tok.is_file():
        raise TrainConfigError(f"tokenizer: {cfg.tokenizer!r} must be a directory holding tokenizer.json")
    try:
        proc = Processor.from_dir(tok) if tok.is_dir() else Processor(tok)
        if cfg.processor:
            valid = {f.name for f in dataclasses.fields(PreprocessConfig)}
            bad = sorted(set(cfg.processor) - valid)
            if bad:
                raise TrainConfigError(f"processor: unknown setting(s) {bad} (valid: {sorted(valid)})")
            kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.processor.items()}
            proc = Processor(proc.tokenizer, proc.config.replace(**kw),
                             always_start_with_space=proc.always_start_with_space)
    except ProcessingError as e:
        raise TrainConfigError(f"tokenizer / processor: {e}") from None
    return proc


def check_vocab(model_cfg, processor) -> None:
    """Every special id must fit the embedding table and the text ids the LM head."""
    t = model_cfg.text
    s = processor.tokenizer.special
    n_tok = processor.tokenizer.tokenizer.get_vocab_size()
    if n_tok > t.embedding_rows:
        raise TrainConfigError(f"the tokenizer has {n_tok} ids but the model's embedding table only "
                               f"{t.embedding_rows} rows (text.vocab_size {t.vocab_size} + additional "
                               f"{t.additional_vocab_size}); raise model.arch.text.vocab_size")
    if s.eos >= t.vocab_size:
        raise TrainConfigError(f"<|endoftext|> has id {s.eos} >= text.vocab_size {t.vocab_size}: the LM head "
                               "could never predict the end of an answer")


def check_geometry(model_cfg, processor) -> None:
    """The processor's crops must be what the vision tower takes."""
    v, p = model_cfg.vision, processor.config
    if (v.image_size, v.patch_size) != (p.crop_size, p.patch_size):
        raise TrainConfigError(f"processor crops are {p.crop_size}px with {p.patch_size}px patches but the vision "
                               f"tower takes {v.image_size}px / {v.patch_size}px (set processor.base_input_size "
                               "and model.arch.vision.image_size to the same size)")


def resolve_sources(cfg: TrainConfig, verbose: bool) -> tuple[list, list]:
    """SourceSpecs for training and held-out data; raw JSONL / folders are built first (process 0)."""
    import jax
    from ..data.builder import build_dataset, dataset_splits, is_built_dataset
    from ..data.pipeline import SourceSpec
    train, held = [], []
    for name, s in cfg.data.sources.items():
        path = Path(s.path)
        if not path.exists():
            raise TrainConfigError(f"data.sources.{name}.path: {s.path} does not exist")
        if not is_built_dataset(path):
            # Process 0 builds; the others wait, then find the finished build (build_dataset reuses it).
            if jax.process_index() == 0:
                build_dataset(path, name, cfg.data.build_dir, on_bad_image=cfg.data.bad_image, verbose=verbose)
            _sync(f"build_{name}")
            path = build_dataset(path, name, cfg.data.build_dir, on_bad_image=cfg.data.bad_image, verbose=False)
        splits = dataset_splits(path)
        if s.split not in splits:
            raise TrainConfigError(f"data.sources.{name}.split: {s.split!r} is not in {path} "
                                   f"(splits: {sorted(splits)})")
        train.append(SourceSpec(name, str(path), s.split, s.weight))
        if s.eval_split and s.eval_split in splits:
            held.append(SourceSpec(name, str(path), s.eval_split, s.weight))
    return train, held


def resolve_mesh(cfg: TrainConfig, make_mesh):
    """The (data, fsdp, tensor) mesh; one axis may be -1 (the devices left over)."""
    import jax
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise TrainConfigError(f"mesh: {sizes}: sizes must be >= 1, with at most one -1 (take the rest)")
    n = jax.device_count()
    if free:
        rest = math.prod(v for v in sizes.values() if v != -1)
        if n % rest:
            raise TrainConfigError(f"mesh: {n} devices cannot be split as {sizes}")
        sizes[free[0]] = n // rest
    if math.prod(sizes.values()) != n:
        raise TrainConfigError(f"mesh: data x fsdp x tensor = {math.prod(sizes.values())} but there are {n} "
                               "devices; use -1 for one axis to take the rest")
    return make_mesh(**sizes)


def _sync(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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

def run_training(cfg: TrainConfig, *, verbose: bool = True, on_step: Callable[[int, dict], None] | None = None
                 ) -> TrainResult:
    """Train according to `cfg` (see the module docstring). `on_step(step, metrics)` is called with
    each step's fetched metrics (tests use it)."""
    maybe_initialize_distributed(cfg)
    import jax
    from ..sharding import make_mesh
    from ..data.pipeline import BatchSpec, EncodeSpec, eval_dataset, eval_examples, train_dataset
    from .checkpointing import TrainCheckpointer, abstract_like
    from .evaluate import generation_accuracy, heldout_loss
    from .metrics import MetricsLog, Progress, plot_loss_png, read_metrics
    from .optim import make_optimizer
    from .step import count_params, init_state, make_steps, peak_flops_per_device, put_batch, step_flops

    t_start = time.time()
    out_dir = Path(cfg.run.output_dir).absolute()
    lead = jax.process_index() == 0
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (verbose and lead) else (lambda msg: None)

    if cfg.demo.enabled:
        from .demo import prepare_demo
        if lead:
            prepare_demo(cfg, say)
        _sync("demo")

    model_cfg = build_model_config(cfg)
    processor = build_processor(cfg)
    check_vocab(model_cfg, processor)
    check_geometry(model_cfg, processor)
    train_sources, held_sources = resolve_sources(cfg, verbose and lead)

    d, o = cfg.data, cfg.optimizer
    mesh = resolve_mesh(cfg, make_mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (d.batch_size // o.grad_accum) % batch_shards:
        raise TrainConfigError(f"data.batch_size={d.batch_size} / optimizer.grad_accum={o.grad_accum} must be a "
                               f"multiple of the mesh's batch shards (data x fsdp = {batch_shards})")
    n_proc = jax.process_count()
    local_batch = d.batch_size // n_proc
    pc = processor.config
    if d.crops_per_row and d.crops_per_row < pc.max_crops_per_image:
        say(f"note: data.crops_per_row={d.crops_per_row} < max_crops + 1 = {pc.max_crops_per_image}: images "
            f"tiled into more crops are {d.too_long}d")
    encode = EncodeSpec(tokenizer_path=str(Path(cfg.tokenizer)), preprocess=pc.to_hf(),
                        always_start_with_space=processor.always_start_with_space, seq_len=d.seq_len,
                        crops_per_row=d.crops_per_row, too_long=d.too_long, bad_image=d.bad_image,
                        image_dtype=d.image_dtype)
    bspec = BatchSpec.for_processor(pc, local_batch, d.seq_len, d.crops_per_row, d.packing, d.image_dtype)
    train_ds = train_dataset(train_sources, encode, bspec, global_batch=d.batch_size, seed=cfg.run.seed,
                             single_source_steps=d.single_source_steps, worker_count=d.worker_count,
                             worker_buffer_size=d.worker_buffer_size)

    from ..model import abstract_params
    abstract = abstract_params(model_cfg)
    tx, groups = make_optimizer(o, cfg.run.steps, abstract)
    steps = make_steps(model_cfg, tx, groups, mesh, abstract, grad_accum=o.grad_accum, loss_chunk=cfg.run.loss_chunk)
    n_params = count_params(abstract)
    say(f"model: {n_params:,} params; groups: " + ", ".join(
        f"{k} ({v:,}{', frozen' if k in groups.frozen else ''})" for k, v in groups.counts.items()))
    say(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{n_proc} process(es); global batch {d.batch_size} x {d.seq_len} tokens x {d.crops_per_row} crops")

    ckpt = TrainCheckpointer(out_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    meta = {"config": cfg.to_dict(), "model_config": model_cfg.to_hf(),
            "runtime": {"dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype}}
    latest = ckpt.latest_step()
    it = iter(train_ds)
    if latest is not None and not cfg.run.resume:
        raise TrainConfigError(f"run.output_dir {out_dir} already has checkpoints (latest step {latest}); "
                               "use run.resume=true to continue it, or another run.output_dir")
    state_shapes = jax.eval_shape(lambda: {"step": jax.numpy.zeros((), jax.numpy.int32), "params": abstract,
                                           "opt_state": tx.init(abstract)})
    if latest is not None:
        old = ckpt.read_meta(latest)
        if old.get("model_config") != meta["model_config"]:
            raise TrainConfigError(f"the checkpoint of step {latest} in {ckpt.directory} was trained with a "
                                   "different model architecture; use another run.output_dir")
        state, _ = ckpt.restore(latest, abstract_like(state_shapes, steps.state_shardings), it)
        say(f"resumed from step {latest} ({ckpt.directory})")
    else:
        state = init_state(tx, steps.state_shardings, _initial_params(cfg, model_cfg, mesh))
    start = int(jax.device_get(state["step"]))

    log = MetricsLog(out_dir, tensorboard=cfg.log.tensorboard, enabled=lead)
    if lead:
        (out_dir / "config.yaml").write_text(_yaml(cfg.to_dict()))
    peak = peak_flops_per_device(jax.devices()[0], cfg.log.peak_tflops_per_device)
    flops = step_flops(model_cfg, d.batch_size, d.seq_len, d.crops_per_row)
    progress = Progress(cfg.run.steps, start, cfg.log.progress and lead and verbose)
    gen_examples = None
    last_saved = latest
    result = TrainResult(steps=cfg.run.steps, output_dir=out_dir)

    def evaluate(step: int, final: bool) -> None:
        nonlocal gen_examples
        e = cfg.eval
        if not held_sources:
            return
        values = {}
        if e.batches:
            ds, n_cover = eval_dataset(held_sources, encode, bspec, global_batch=d.batch_size)
            eit = iter(ds)
            batches = (put_batch(_device_keys(next(eit)), mesh) for _ in range(min(e.batches, n_cover)))
            values.update({f"heldout_{k}": v for k, v in heldout_loss(steps.eval, state, batches).items()})
        if e.generate.samples:
            if gen_examples is None:
                gen_examples = eval_examples(held_sources, e.generate.samples)
            rep = generation_accuracy(model_cfg, state["params"], processor, gen_examples,
                                      max_new_tokens=e.generate.max_new_tokens,
                                      batch_size=e.generate.batch_size, metric=e.generate.metric, mesh=mesh)
            values.update(rep.summary())
            if final:
                result.generation = rep
        log.write(step, values, kind="eval")
        result.heldout = values
        progress.write(f"eval @ step {step}: " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
            if "/" not in k))

    def save(step: int) -> None:
        nonlocal last_saved
        ckpt.save(step, state, it, meta)
        last_saved = step

    def check(step: int, m: dict) -> dict:
        vals = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(vals["loss"]):
            ckpt.wait()
            raise NonFiniteLoss(step, vals["loss"], last_saved, str(ckpt.directory))
        return vals

    pending = None       # (step, device metrics, host-side info) of the step in flight
    t_last = time.time()
    window: list[float] = []

    def drain(p) -> None:
        nonlocal t_last
        step, m, info = p
        vals = check(step, m)
        now = time.time()
        dt = now - t_last
        t_last = now
        window.append(dt)
        vals.update(info)
        vals["step_time_s"] = dt
        vals["tokens_per_s"] = info["batch_tokens"] / dt if dt > 0 else 0.0
        if peak:
            vals["mfu"] = flops / dt / (peak * jax.device_count()) if dt > 0 else 0.0
        result.final_loss = vals["loss"]
        if on_step is not None:
            on_step(step, vals)
        if step % cfg.log.every == 0 or step == cfg.run.steps:
            log.write(step, vals)
        progress.update(1, loss=vals["loss"], acc=vals["accuracy"])

    try:
        with _SigtermFlag() as sigterm:
            for step in range(start + 1, cfg.run.steps + 1):
                if sigterm.set:
                    break
                host = next(it)
                info = {"batch_tokens": float((host["segment_ids"] > 0).sum()) * n_proc,
                        "samples": it.counters["samples"], "skipped_bad_image": it.counters["skipped_bad_image"],
                        "skipped_too_long": it.counters["skipped_too_long"], "truncated": it.counters["truncated"]}
                batch = put_batch(_device_keys(host), mesh)
                state, metrics = steps.train(state, batch)
                if pending is not None:
                    drain(pending)
                pending = (step, metrics, info)
                boundary = (step % cfg.checkpoint.every == 0 or step == cfg.run.steps or sigterm.set
                            or (cfg.eval.every and step % cfg.eval.every == 0))
                if boundary:
                    drain(pending)
                    pending = None
                    if step % cfg.checkpoint.every == 0 or step == cfg.run.steps or sigterm.set:
                        save(step)
                    if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.run.steps:
                        evaluate(step, final=False)
            if pending is not None:
                drain(pending)
                pending = None
            done = int(jax.device_get(state["step"]))
            if sigterm.set and done < cfg.run.steps:
                if last_saved != done:
                    save(done)
                ckpt.wait()
                progress.close()
                raise Preempted(done, str(ckpt.directory))
        if last_saved != cfg.run.steps:
            save(cfg.run.steps)
        ckpt.wait()
        progress.close()
        if cfg.eval.final:
            evaluate(cfg.run.steps, final=True)
        if cfg.checkpoint.export and n_proc == 1:
            result.export_dir = export(out_dir / "export", model_cfg, state["params"], processor, cfg)
        elif cfg.checkpoint.export:
            say("note: checkpoint.export runs on a single process; the params of this multi-host run are "
                f"in the Orbax checkpoints under {ckpt.directory}")
        if lead and cfg.log.plot:
            tr = read_metrics(out_dir / "metrics.jsonl")
            ev = read_metrics(out_dir / "metrics.jsonl", "eval")
            result.plot = plot_loss_png([(s, r["loss"]) for s, r in sorted(tr.items())], out_dir / "loss.png",
                                        [(s, r["heldout_loss"]) for s, r in sorted(ev.items())
                                         if "heldout_loss" in r])
    finally:
        progress.close()
        log.close()
        ckpt.close()
    result.wall_time_s = time.time() - t_start
    return result


def _device_keys(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "source"}


def _initial_params(cfg: TrainConfig, model_cfg, mesh):
    """The initial params on the mesh: random (seeded) or loaded from `model.init`."""
    from .step import random_params
    init = cfg.model.init
    if init == "random":
        return random_params(model_cfg, mesh, cfg.run.seed)
    p = Path(init)
    from ..checkpoint import is_checkpoint, load
    if is_checkpoint(p):
        loaded_cfg, params = load(p, mesh=mesh, dtype=model_cfg.param_dtype)
    elif (p / "config.json").is_file():
        from ..sharding import param_shardings, shard_params
        from ..weights import load_jina_vlm
        loaded_cfg, params = load_jina_vlm(p, dtype=model_cfg.param_dtype)
        params = shard_params(params, param_shardings(model_cfg, mesh))
    else:
        raise TrainConfigError(f"model.init: {init!r} is not 'random', a jinavlm-jax checkpoint or an official "
                               "Hugging Face model directory")
    same = lambda c: (c.vision, c.connector, c.text)
    if same(loaded_cfg) != same(model_cfg):
        raise TrainConfigError(f"model.init: {init} holds a different architecture than model.config "
                               f"{cfg.model.config!r} (+ model.arch); use the same config for both")
    return params


def export(directory: Path, model_cfg, params, processor, cfg: TrainConfig) -> Path:
    """Final params as a jinavlm-jax checkpoint with tokenizer and configs beside them, so that
    `jinavlm generate --checkpoint DIR` finds everything in one directory."""
    from ..checkpoint import save
    save(directory, model_cfg, params, overwrite=True, source={"trained_by": "jinavlm_jax.train",
                                                             "steps": cfg.run.steps})
    tok_dir = Path(cfg.tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, directory / name)
    (directory / "preprocessor_config.json").write_text(json.dumps(processor.config.to_hf(), indent=1))
    (directory / "config.json").write_text(json.dumps(model_cfg.to_hf(), indent=1))
    return directory


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
