"""Training recipes: YAML files in `configs/` read into frozen dataclasses, plus `key=value` overrides.

    cfg = load_config("configs/stage1_alignment.yaml", ["run.steps=100", "optimizer.groups.vision.lr=null"])

Every key is checked against the schema below (unknown keys are refused with the closest valid
names), every value against its field type (numbers given as strings, e.g. YAML's `1e-4`, are
converted). Named collections (`data.sources`, `optimizer.groups`) are mappings from a name to an
entry, so an override can address one entry (`optimizer.groups.connector.warmup=200`), add one, or
remove it (`data.sources.text_only=null`). String values may use `{output_dir}`, which is replaced by
`run.output_dir` once all overrides are applied.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..adapt import DECODER_PROJECTIONS


class TrainConfigError(ValueError):
    """A recipe or override that cannot be used (names the file or override, the key and the problem)."""


# ---------------------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class RunConfig:
    """What run this is: where it writes, how long it trains."""

    output_dir: str = "runs/train"
    steps: int = 1000                 # optimizer steps (each one global batch, after accumulation)
    seed: int = 0                     # params init and data order
    resume: bool = True               # continue from the latest checkpoint in output_dir/checkpoints
    loss_chunk: int = 1024            # positions per chunk of the chunked cross-entropy (0 = unchunked)
    # > 0: logits and loss only at the first `loss_positions` weighted positions of each row (SFT
    # rows whose answers are a small part of the sequence skip the LM head everywhere else); a row
    # with more weighted positions stops the run with an error. 0 = every position.
    loss_positions: int = 0


POS_EMBED_INITS = ("normal", "sincos2d")   # model.pos_embed_init (train.step.random_params)


@dataclass(frozen=True)
class ModelSection:
    """The model to train: architecture, initial weights and run-time numerics."""

    config: str = "tiny"              # preset (tiny, jina_vlm_2_4b) or a config.json / model directory
    arch: dict = field(default_factory=dict)   # field overrides: {text: {n_layers: 2}, vision: {...}}
    init: str = "random"              # random, a jinavlm-jax checkpoint dir, or an official HF model dir
    dtype: str = "float32"            # compute dtype (bfloat16 on accelerators)
    param_dtype: str = "float32"      # master weights (keep float32 for bf16 training)
    remat_policy: str = "none"        # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    attention_impl: str = "xla"       # xla | splash (the Pallas TPU kernel; interpret mode off TPU)
    # false: the decoder's layers unrolled in the compiled step (params and checkpoints stay stacked):
    # faster steps on CPU for small models (no scan slicing and copying in the backward pass); the
    # compile grows with the layer count, so keep true for the full model and on TPU. LoRA runs
    # (lora.rank > 0) always train the scanned decoder.
    scan_layers: bool = True
    # init: random only: the ViT's learned position embeddings start as normal(0.02) noise ("normal",
    # the released model's init) or as fixed 2-D sine-cosine positions ("sincos2d", MAE / big_vision):
    # from scratch, the latter gives every patch its row and column from the first step.
    pos_embed_init: str = "normal"


@dataclass(frozen=True)
class SourceConfig:
    """One data source: a TFDS dataset built by `jinavlm_jax.data.builder` (or raw data to build)."""

    path: str = ""                    # built dataset dir (has dataset_info.json), or a JSONL file / folder
    weight: float = 1.0               # share of the mixture (normalised over all sources)
    split: str = "train"
    eval_split: Optional[str] = "validation"   # held-out split of this source (null: none)


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline: mixture, sequence layout, bad-input policies, workers."""

    sources: dict = field(default_factory=dict)   # name -> SourceConfig
    build_dir: str = "{output_dir}/tfds"         # where raw sources (JSONL / folders) are built
    batch_size: int = 8               # global batch (all processes), split into grad_accum micro-batches
    seq_len: int = 2048               # tokens per row
    crops_per_row: int = 13           # image crops per row (thumbnail + tiles of every image in the row)
    packing: bool = False             # several samples per row (segment-masked) instead of one padded
    too_long: str = "truncate"        # truncate (warn) | reject (skip the sample, counted)
    bad_image: str = "skip"           # skip (counted) | error: for images that fail to decode
    single_source_steps: int = 0      # first phase: every batch from one source (paper stage 2)
    worker_count: int = 0             # grain worker processes (0 = in the training process)
    worker_buffer_size: int = 4
    image_dtype: str = "float32"      # float32 | bfloat16 for the crops sent to the devices


@dataclass(frozen=True)
class GroupConfig:
    """One parameter group: params whose path ('vision/layers/q/kernel') matches `regex`."""

    regex: str = ""
    lr: Optional[float] = None        # peak learning rate; null freezes the group
    warmup: float = 0.0               # linear warmup: steps (>= 1) or a fraction of run.steps (< 1)
    weight_decay: Optional[float] = None   # default: optimizer.weight_decay
    end_lr_ratio: Optional[float] = None   # default: optimizer.end_lr_ratio


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with per-group schedules, global-norm clipping and gradient accumulation."""

    groups: dict = field(default_factory=dict)    # name -> GroupConfig; first matching regex wins
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.0
    decay_regex: str = r"kernel$"     # weight decay applies to params matching this (not norms/biases)
    schedule: str = "cosine"          # cosine | linear | constant (after warmup)
    end_lr_ratio: float = 0.1         # final lr / peak lr
    grad_clip_norm: Optional[float] = 1.0    # null or 0: no clipping
    grad_accum: int = 1               # micro-batches per step


@dataclass(frozen=True)
class LoraConfig:
    """LoRA / QLoRA (`jinavlm_jax.adapt.lora`, with Qwix): rank 0 = off (full fine-tuning).

    Only the adapters are trained (and get optimizer state): `optimizer.groups` then label adapter
    params (paths like 'text/layers/q/kernel_lora_a'); every base param is frozen. The adapter alone
    is saved to OUTPUT_DIR/adapter at the end (and, with checkpoint.export, the merged model to export/).
    """

    rank: int = 0                     # adapter rank (0: no LoRA)
    alpha: float = 32.0               # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0              # dropout on the adapter's input (training only)
    modules: str = DECODER_PROJECTIONS   # module paths (re.fullmatch): the decoder's q/k/v/out/up/gate/down
    base_dtype: str = "bfloat16"      # frozen base: float32 | bfloat16 | int8 | nf4 (QLoRA: Qwix QArrays)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh (sharding.make_mesh): -1 for fsdp takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host: jax.distributed.initialize arguments (auto = initialise on TPU pods / when given)."""

    initialize: str = "auto"          # auto | always | never
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax CheckpointManager settings."""

    every: int = 500                  # save every N steps (also on SIGTERM and at the end)
    keep: int = 3                     # checkpoints kept
    async_save: bool = True
    export: bool = True               # at the end: params + tokenizer + configs in output_dir/export


@dataclass(frozen=True)
class LogConfig:
    every: int = 10                   # steps between JSONL / TensorBoard records
    progress: bool = True             # progress bar on stderr (process 0)
    tensorboard: bool = True
    plot: bool = True                 # loss-curve PNG at the end
    peak_tflops_per_device: Optional[float] = None   # for MFU; default from the device kind


@dataclass(frozen=True)
class GenerateEvalConfig:
    samples: int = 64                 # held-out samples answered by generation (0 = off)
    max_new_tokens: int = 16
    batch_size: int = 16
    metric: str = "auto"              # auto (choice for "Return only the letter" prompts) | exact | choice


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0                    # steps between evaluations (0 = only at the end)
    batches: int = 4                  # held-out loss batches
    final: bool = True                # evaluate after the last step
    show: int = 5                     # predictions printed after the final evaluation
    generate: GenerateEvalConfig = field(default_factory=GenerateEvalConfig)


@dataclass(frozen=True)
class DemoConfig:
    """The embedded demo: synthetic multilingual VQA data + tokenizer built before training."""

    enabled: bool = False
    n_train: int = 6000
    n_val: int = 300
    languages: tuple = ("en", "de", "zh", "ar")
    vocab_size: int = 1024
    # > 0: before the VLM run, train the vision tower + connector this many steps on the images'
    # labels (shape, colour, count; `train.pretrain`) and save the model's init at `model.init`.
    vision_pretrain_steps: int = 0
    # {colour, shape, count, position, choice: weight} of the VQA question types (empty: the corpus default).
    task_weights: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """A whole training recipe."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: str = ""               # directory with tokenizer.json (and optionally the model configs)
    processor: dict = field(default_factory=dict)   # PreprocessConfig fields, e.g. {max_crops: 12}
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML / JSON serialisable) that `from_dict` reads back."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config") -> "TrainConfig":
        cfg = _build(cls, d, where)
        _validate(cfg, where)
        return cfg


# Named collections: which dataclass their entries are.
_ENTRY_TYPES = {("data", "sources"): SourceConfig, ("optimizer", "groups"): GroupConfig}
_CHOICES = {
    ("data", "too_long"): ("truncate", "reject"),
    ("data", "bad_image"): ("skip", "error"),
    ("data", "image_dtype"): ("float32", "bfloat16"),
    ("model", "pos_embed_init"): POS_EMBED_INITS,
    ("optimizer", "schedule"): ("cosine", "linear", "constant"),
    ("distributed", "initialize"): ("auto", "always", "never"),
    ("eval", "generate", "metric"): ("auto", "exact", "choice"),
    ("lora", "base_dtype"): ("float32", "bfloat16", "int8", "nf4"),
}


# ---------------------------------------------------------------------------------------- loading

RECIPES = Path(__file__).resolve().parents[1] / "configs"   # the recipes shipped inside the package


def find_recipe(path: str | Path) -> Path:
    """A recipe file: `path` itself, else the packaged recipe of that name (`stage2_instruct`,
    `stage2_instruct.yaml` or `configs/stage2_instruct.yaml` work from any directory)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    if (p.parent == Path(".") or p.parent.name == "configs") and (RECIPES / name).is_file():
        return RECIPES / name
    shipped = ", ".join(sorted(q.stem for q in RECIPES.glob("*.yaml")))
    raise TrainConfigError(f"{p}: recipe file not found (recipes shipped with jinavlm-jax: {shipped})")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML recipe (or start from `base` / the defaults), apply `key=value` overrides, validate."""
    where = "defaults"
    data: dict = dict(base or {})
    if path is not None:
        p = find_recipe(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{p}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        data = _merge(data, loaded)
        where = str(p)
    for ov in overrides:
        data = apply_override(data, ov)
    cfg = TrainConfig.from_dict(data, where)
    return _interpolate(cfg)


def apply_override(data: Mapping[str, Any], override: str) -> dict:
    """Return a copy of the nested dict with one `a.b.c=value` override applied (value parsed as YAML,
    or taken as a plain string when it is not valid YAML).

    The key path is checked against the schema here, so a typo fails with the override named.
    """
    if "=" not in override:
        raise TrainConfigError(f"override {override!r}: expected key=value (e.g. run.steps=100)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", key):
        raise TrainConfigError(f"override {override!r}: {key!r} is not a dotted key (e.g. optimizer.b2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a regex such as "[ab"): the raw string, checked against the field type
    parts = key.split(".")
    _check_path(parts, override)
    out = _deepcopy(data)
    node = out
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value
    return out


def _check_path(parts: list[str], override: str) -> None:
    """Walk the schema along `parts`; raise naming the first unknown key and the valid ones."""
    cls: Any = TrainConfig
    trail: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if cls is None:
            return  # free-form dict (model.arch, processor): checked when the model/processor is built
        names = {f.name: f for f in dataclasses.fields(cls)}
        if p not in names:
            raise TrainConfigError(_unknown_msg(f"override {override!r}", ".".join(trail + [p]), p, names))
        trail.append(p)
        entry = _ENTRY_TYPES.get(tuple(trail))
        ftype = _field_type(cls, p)
        if entry is not None:
            if i + 1 < len(parts):       # the entry name is free; then the entry's fields
                trail.append(parts[i + 1])
                i += 1
            cls = entry
        elif dataclasses.is_dataclass(ftype):
            cls = ftype
        else:
            if i != len(parts) - 1 and ftype is not dict:
                raise TrainConfigError(f"override {override!r}: {'.'.join(trail)} is a value, not a section")
            cls = None
        i += 1


def _unknown_msg(where: str, dotted: str, key: str, valid: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{where}: unknown key {dotted!r}{hint} (valid here: {', '.join(sorted(valid))})"


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _strip_optional(t):
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return t, False


def _coerce(value: Any, t: Any, where: str) -> Any:
    """Check / convert one scalar to the annotated type (YAML's '1e-4' is a string: accept it)."""
    t, optional = _strip_optional(t)
    if value is None:
        if optional:
            return None
        raise TrainConfigError(f"{where}: null is not allowed here (expected {getattr(t, '__name__', t)})")
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
    elif t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif t is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif t is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
    elif t is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise TrainConfigError(f"{where}: expected {getattr(t, '__name__', t)}, got {value!r} "
                           f"({type(value).__name__})")


def _build(cls, d: Any, where: str, trail: tuple = ()):
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise TrainConfigError(f"{where}: {'.'.join(trail) or 'config'} must be a mapping, got {d!r:.60}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        k = unknown[0]
        raise TrainConfigError(_unknown_msg(where, ".".join(trail + (str(k),)), str(k), names))
    kw = {}
    for name, value in d.items():
        path = trail + (name,)
        dotted = ".".join(path)
        t = _field_type(cls, name)
        entry = _ENTRY_TYPES.get(path)
        if entry is not None:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise TrainConfigError(f"{where}: {dotted} must be a mapping of name -> entry")
            kw[name] = {str(k): _build(entry, v, where, path + (str(k),))
                        for k, v in value.items() if v is not None}
        elif dataclasses.is_dataclass(t):
            kw[name] = _build(t, value, where, path)
        else:
            kw[name] = _coerce(value, t, f"{where}: {dotted}")
    return cls(**kw)


def _merge(a: Mapping, b: Mapping) -> dict:
    """Recursive dict merge: b wins; a None in b deletes the key."""
    out = _deepcopy(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = _deepcopy(v)
    return out


def _deepcopy(x):
    if isinstance(x, Mapping):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def _to_plain(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _interpolate(cfg: TrainConfig) -> TrainConfig:
    """Replace `{output_dir}` in every string value."""
    out_dir = cfg.run.output_dir

    def sub(x):
        if isinstance(x, str):
            return x.replace("{output_dir}", out_dir)
        if dataclasses.is_dataclass(x):
            return dataclasses.replace(x, **{f.name: sub(getattr(x, f.name)) for f in dataclasses.fields(x)})
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return tuple(sub(v) for v in x)
        return x
    return sub(cfg)


# ---------------------------------------------------------------------------------------- validation

def _validate(cfg: TrainConfig, where: str) -> None:
    """Cross-field checks with messages naming the key, the value and the rule."""
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise TrainConfigError(f"{where}: {key}: {msg}")

    for path, allowed in _CHOICES.items():
        node: Any = cfg
        for p in path:
            node = getattr(node, p)
        need(node in allowed, ".".join(path), f"{node!r} is not one of {allowed}")
    r, d, o = cfg.run, cfg.data, cfg.optimizer
    need(r.steps >= 1, "run.steps", f"must be >= 1, got {r.steps}")
    need(r.loss_chunk >= 0, "run.loss_chunk", f"must be >= 0, got {r.loss_chunk}")
    need(r.loss_positions >= 0, "run.loss_positions", f"must be >= 0, got {r.loss_positions}")
    need(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    need(d.seq_len >= 8, "data.seq_len", f"must be >= 8, got {d.seq_len}")
    need(d.crops_per_row >= 0, "data.crops_per_row", f"must be >= 0, got {d.crops_per_row}")
    need(d.worker_count >= 0, "data.worker_count", f"must be >= 0, got {d.worker_count}")
    need(d.single_source_steps >= 0, "data.single_source_steps", "must be >= 0")
    need(o.grad_accum >= 1, "optimizer.grad_accum", f"must be >= 1, got {o.grad_accum}")
    need(d.batch_size % o.grad_accum == 0, "data.batch_size",
         f"{d.batch_size} is not divisible by optimizer.grad_accum={o.grad_accum}")
    need(0 <= o.end_lr_ratio <= 1, "optimizer.end_lr_ratio", f"must be in [0, 1], got {o.end_lr_ratio}")
    need(o.eps > 0, "optimizer.eps", "must be > 0")
    for name, s in d.sources.items():
        need(bool(s.path), f"data.sources.{name}.path", "is required (a built dataset dir, JSONL file or folder)")
        need(s.weight > 0, f"data.sources.{name}.weight", f"must be > 0, got {s.weight}")
    if not cfg.demo.enabled:
        need(bool(d.sources), "data.sources", "at least one source is required")
    need(bool(o.groups), "optimizer.groups", "at least one parameter group is required (e.g. "
         "all: {regex: '.*', lr: 1e-4})")
    for name, g in o.groups.items():
        key = f"optimizer.groups.{name}"
        need(bool(g.regex), f"{key}.regex", "is required")
        try:
            re.compile(g.regex)
        except re.error as e:
            raise TrainConfigError(f"{where}: {key}.regex: {g.regex!r} is not a valid regex ({e})") from None
        need(g.lr is None or g.lr >= 0, f"{key}.lr", f"must be >= 0 or null (frozen), got {g.lr}")
        need(g.warmup >= 0, f"{key}.warmup", f"must be >= 0, got {g.warmup}")
        need(g.warmup < 1 or g.warmup == int(g.warmup), f"{key}.warmup",
             f"{g.warmup}: use a whole number of steps (>= 1) or a fraction of run.steps (< 1)")
    lo = cfg.lora
    need(lo.rank >= 0, "lora.rank", f"must be >= 0 (0 = off), got {lo.rank}")
    need(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    need(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    try:
        re.compile(lo.modules)
    except re.error as e:
        raise TrainConfigError(f"{where}: lora.modules: {lo.modules!r} is not a valid regex ({e})") from None
    need(cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(cfg.log.every >= 1, "log.every", "must be >= 1")
    need(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    need(cfg.eval.batches >= 0, "eval.batches", "must be >= 0")
    known_langs = ("en", "de", "zh", "ar")
    for lang in cfg.demo.languages:
        need(lang in known_langs, "demo.languages", f"{lang!r} is not one of {known_langs}")
