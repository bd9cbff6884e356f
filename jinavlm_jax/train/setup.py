"""Recipe -> objects: everything a training run is made of, built and checked before the first step.

    setup = build_setup(cfg)            # model config, processor, data, mesh, optimizer, jitted steps
    Trainer(setup).run()                # train.loop

Every check that can fail on the recipe runs here, so that a bad recipe stops with one line naming
the key before any weights are made: the model config (`model.config` + `model.arch`), the
tokenizer / processor, their agreement (vocabulary, crop geometry), the data sources (raw JSONL and
image folders are built into TFDS datasets first) and the mesh against the batch size.
`jinavlm aot` builds the same optimizer and steps (`make_optimizer_and_steps`) and the same model
FLOPs (`step_model_flops`) on abstract state, so the MFU it bounds and the MFU training logs are
one formula.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import TrainConfig, TrainConfigError


# ---------------------------------------------------------------------------------------- pieces

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
            sync(f"build_{name}")
            path = build_dataset(path, name, cfg.data.build_dir, on_bad_image=cfg.data.bad_image, verbose=False)
        splits = dataset_splits(path)
        if s.split not in splits:
            raise TrainConfigError(f"data.sources.{name}.split: {s.split!r} is not in {path} "
                                   f"(splits: {sorted(splits)})")
        train.append(SourceSpec(name, str(path), s.split, s.weight))
        if s.eval_split and s.eval_split in splits:
            held.append(SourceSpec(name, str(path), s.eval_split, s.weight))
    return train, held


def resolve_mesh(cfg: TrainConfig):
    """The (data, fsdp, tensor) mesh of `cfg.mesh` over all devices; one axis may be -1 (the rest)."""
    from ..sharding import make_mesh
    try:
        return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise TrainConfigError(f"mesh: {e}") from None


def sync(name: str) -> None:
    """Wait for every process at the barrier `name` (nothing to do with one process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def lora_spec(cfg: TrainConfig):
    """The recipe's `adapt.lora.LoraSpec`, or None when `lora.rank` is 0 (full fine-tuning)."""
    lo = cfg.lora
    if not lo.rank:
        return None
    from ..adapt import AdaptError
    from ..adapt.lora import LoraSpec
    try:
        return LoraSpec(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, modules=lo.modules,
                        base_dtype=lo.base_dtype)
    except AdaptError as e:
        raise TrainConfigError(str(e)) from None


def initial_params(cfg: TrainConfig, model_cfg, mesh):
    """The initial params on the mesh: random (seeded) or loaded from `model.init`; with LoRA, that
    base (cast / quantized to `lora.base_dtype`) plus fresh adapters."""
    spec = lora_spec(cfg)
    params = _base_params(cfg, model_cfg, mesh)
    if spec is None:
        return params
    from ..adapt.lora import abstract_lora, attach_adapter
    from ..sharding import boxed_shardings, shard_params
    params = attach_adapter(model_cfg, spec, params, cfg.run.seed)
    return shard_params(params, boxed_shardings(abstract_lora(model_cfg, spec, boxed=True), mesh))


def _base_params(cfg: TrainConfig, model_cfg, mesh):
    from .step import random_params
    init = cfg.model.init
    if init == "random":
        return random_params(model_cfg, mesh, cfg.run.seed, cfg.model.pos_embed_init)
    from ..checkpoint import load_any
    from ..weights import CheckpointError
    try:
        loaded_cfg, params = load_any(init, dtype=model_cfg.param_dtype, mesh=mesh)
    except CheckpointError as e:
        raise TrainConfigError(f"model.init: {init!r} is not 'random', a jinavlm-jax checkpoint or an official "
                               f"Hugging Face model directory: {e}") from None
    if not isinstance(params, dict):
        raise TrainConfigError(f"model.init: {init} holds quantized inference weights (python -m convert quantize); "
                               "training needs the float checkpoint they were made from")
    same = lambda c: (c.vision, c.connector, c.text)
    if same(loaded_cfg) != same(model_cfg):
        raise TrainConfigError(f"model.init: {init} holds a different architecture than model.config "
                               f"{cfg.model.config!r} (+ model.arch); use the same config for both")
    return params


# ---------------------------------------------------------------------------------------- the whole setup

def make_optimizer_and_steps(cfg: TrainConfig, model_cfg, mesh) -> tuple[Any, Any, Any, Any]:
    """(abstract params, optax transform, ParamGroups, StepFns) of the recipe on `mesh`. With LoRA the
    params are the frozen base plus the adapters, and only the adapters are in a trained group."""
    from ..model import abstract_params
    from .optim import make_optimizer
    from .step import make_steps
    spec, only = lora_spec(cfg), None
    if spec is None:
        abstract = abstract_params(model_cfg)
    else:
        from ..adapt import AdaptError
        from ..adapt.lora import abstract_lora, is_adapter_path
        try:
            abstract = abstract_lora(model_cfg, spec)
        except AdaptError as e:
            raise TrainConfigError(str(e)) from None
        only = is_adapter_path
    tx, groups = make_optimizer(cfg.optimizer, cfg.run.steps, abstract, only)
    steps = make_steps(model_cfg, tx, groups, mesh, abstract, grad_accum=cfg.optimizer.grad_accum,
                       loss_chunk=cfg.run.loss_chunk, loss_positions=cfg.run.loss_positions, lora=spec, seed=cfg.run.seed,
                       unroll_layers=not cfg.model.scan_layers and spec is None)  # LoRA keeps the scan
    return abstract, tx, groups, steps


def step_model_flops(model_cfg, groups, *, rows: int, seq_len: int, crops: int, loss_positions: int = 0) -> float:
    """Model FLOPs of one train step of `rows` rows (all devices): `flops.model_flops`, with the
    vision tower's backward counted only when one of its params is trained and the LM head over
    `loss_positions` per row when that is set (`run.loss_positions`)."""
    from ..flops import model_flops
    return model_flops(model_cfg, rows=rows, seq_len=seq_len, crops=crops, train=True,
                       train_vision=groups.trains("vision"),
                       logit_positions=loss_positions if 0 < loss_positions < seq_len else None)["total"]


def check_batch(cfg: TrainConfig, mesh) -> None:
    """The global batch, after gradient accumulation, must split evenly over the batch mesh axes."""
    d, o = cfg.data, cfg.optimizer
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if d.batch_size % o.grad_accum or (d.batch_size // o.grad_accum) % shards:
        raise TrainConfigError(f"data.batch_size={d.batch_size} / optimizer.grad_accum={o.grad_accum} must be a "
                               f"multiple of the mesh's batch shards (data x fsdp = {shards})")


@dataclass
class Setup:
    """A recipe turned into the objects a run needs (`build_setup`)."""

    cfg: TrainConfig
    model_cfg: Any                 # JinaVLMConfig
    processor: Any                 # processing.Processor
    mesh: Any                      # jax.sharding.Mesh
    train_sources: list            # data.pipeline.SourceSpec
    held_sources: list
    encode: Any                    # data.pipeline.EncodeSpec
    batch_spec: Any                # data.pipeline.BatchSpec (this process's rows)
    abstract_params: Any
    tx: Any                        # optax.GradientTransformation
    groups: Any                    # optim.ParamGroups
    steps: Any                     # step.StepFns
    flops_per_step: float          # model FLOPs of one global step (`step_model_flops`)
    lora: Any = None               # adapt.lora.LoraSpec (None: full fine-tuning)

    def model_params(self, params):
        """The params as a plain model tree: with LoRA the adapters merged into the (dequantized) base
        (what generation, the export and `jinavlm generate` take); otherwise `params` as they are."""
        if self.lora is None:
            return params
        from ..adapt.lora import merge_adapter, split_adapter
        return merge_adapter(*split_adapter(params), self.lora)

    def train_dataset(self):
        """The training data of this process (iterate it; the iterator's state is checkpointed)."""
        from ..data.pipeline import train_dataset
        d = self.cfg.data
        return train_dataset(self.train_sources, self.encode, self.batch_spec, global_batch=d.batch_size,
                             seed=self.cfg.run.seed, single_source_steps=d.single_source_steps,
                             worker_count=d.worker_count, worker_buffer_size=d.worker_buffer_size)


def build_setup(cfg: TrainConfig, say: Callable[[str], None] = lambda msg: None, verbose: bool = False) -> Setup:
    """Check `cfg` and build its objects (see the module docstring); `say` gets status lines."""
    import jax
    from ..data.pipeline import BatchSpec, EncodeSpec

    model_cfg = build_model_config(cfg)
    processor = build_processor(cfg)
    check_vocab(model_cfg, processor)
    check_geometry(model_cfg, processor)
    train_sources, held_sources = resolve_sources(cfg, verbose and jax.process_index() == 0)
    mesh = resolve_mesh(cfg)
    check_batch(cfg, mesh)
    d = cfg.data
    pc = processor.config
    if d.crops_per_row and d.crops_per_row < pc.max_crops_per_image:
        say(f"note: data.crops_per_row={d.crops_per_row} < max_crops + 1 = {pc.max_crops_per_image}: images "
            f"tiled into more crops are {d.too_long}d")
    encode = EncodeSpec(tokenizer_path=str(Path(cfg.tokenizer)), preprocess=pc.to_hf(),
                        always_start_with_space=processor.always_start_with_space, seq_len=d.seq_len,
                        crops_per_row=d.crops_per_row, too_long=d.too_long, bad_image=d.bad_image,
                        image_dtype=d.image_dtype)
    local_batch = d.batch_size // jax.process_count()
    bspec = BatchSpec.for_processor(pc, local_batch, d.seq_len, d.crops_per_row, d.packing, d.image_dtype)
    abstract, tx, groups, steps = make_optimizer_and_steps(cfg, model_cfg, mesh)
    flops = step_model_flops(model_cfg, groups, rows=d.batch_size, seq_len=d.seq_len, crops=d.crops_per_row,
                             loss_positions=cfg.run.loss_positions)
    return Setup(cfg, model_cfg, processor, mesh, train_sources, held_sources, encode, bspec, abstract, tx, groups,
                 steps, flops, lora_spec(cfg))
