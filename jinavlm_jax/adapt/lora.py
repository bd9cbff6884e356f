"""LoRA / QLoRA with Qwix's LoRA provider, and adapters as files.

    spec = LoraSpec(rank=16, alpha=32)                      # modules: the decoder's q/k/v/out/up/gate/down
    model = lora_model(config, spec)                        # JinaVLM with Qwix LoRA on those dot_generals
    params = attach_adapter(config, spec, base_params, seed=0)   # base (cast / int8 / nf4) + fresh adapters
    base, adapter = split_adapter(params)
    save_adapter("run/adapter", adapter, spec, base_info={...})
    adapter, spec = load_adapter("run/adapter", config)   # checked against the base's shapes
    merged = merge_adapter(base, adapter, spec)             # a normal float param tree

Qwix's `LoraProvider` adds, beside every matched kernel [*in, *out], `kernel_lora_a` [prod(in), rank]
(he-uniform) and `kernel_lora_b` [rank, prod(out)] (zeros, so the adapter starts as a no-op) and
computes `x @ W + (x @ A) @ B * alpha / rank`. Inside the decoder's `nn.scan` they are created per
layer and stacked like every other param ([layers, ...]). With `base_dtype` int8 / nf4 the matched
base kernels are Qwix QArrays (QLoRA); the other base params are stored in bfloat16.
"""
from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from ..model import JinaVLM, JinaVLMConfig
from ..model.jinavlm import dummy_inputs
from . import DECODER_PROJECTIONS, AdaptError, require_qwix
from .quant import METHODS, is_quantized, quantize_like

BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
ADAPTER_FORMAT = "jinavlm-jax/lora-adapter"
ADAPTER_META = "adapter.json"
ADAPTER_PARAMS = "params"


@dataclass(frozen=True)
class LoraSpec:
    """rank, alpha (delta scaled by alpha / rank), dropout on the adapter's input, `modules` (regex
    `re.fullmatch`ed against module paths such as 'text/layers/q'), base_dtype of the frozen base."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    modules: str = DECODER_PROJECTIONS
    base_dtype: str = "bfloat16"

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise AdaptError(f"lora.rank must be an integer >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise AdaptError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise AdaptError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.base_dtype not in BASE_DTYPES:
            raise AdaptError(f"lora.base_dtype: {self.base_dtype!r} is not one of {BASE_DTYPES}")
        try:
            re.compile(self.modules)
        except re.error as e:
            raise AdaptError(f"lora.modules: {self.modules!r} is not a valid regex ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def float_dtype(self) -> str:
        """The dtype of the frozen float base params (float32 only when base_dtype is float32)."""
        return "float32" if self.base_dtype == "float32" else "bfloat16"

    @property
    def qtype(self):
        return {"int8": jnp.int8, "nf4": "nf4"}.get(self.base_dtype)

    def inference(self) -> "LoraSpec":
        """The same adapter without dropout (evaluation: Qwix applies LoRA dropout whenever it is > 0)."""
        return replace(self, dropout=0.0)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "adapter") -> "LoraSpec":
        known = {"rank", "alpha", "dropout", "modules", "base_dtype"}
        missing = sorted({"rank", "alpha", "modules"} - set(d))
        if missing:
            raise AdaptError(f"{where}: missing key(s) {missing}")
        return cls(**{k: v for k, v in d.items() if k in known})


def is_adapter_path(path: str) -> bool:
    """'text/layers/q/kernel_lora_a' -> True."""
    return path.endswith(ADAPTER_SUFFIXES)


def _f32(init):
    """An initializer that makes float32 adapters whatever the base dtype (Qwix uses the base's)."""
    return lambda key, shape, dtype=None: init(key, shape, jnp.float32)


def provider(spec: LoraSpec):
    qwix = require_qwix()
    rule = qwix.LoraRule(module_path=spec.modules, rank=int(spec.rank), alpha=float(spec.alpha),
                         dropout=float(spec.dropout), weight_qtype=spec.qtype, op_names=("dot_general",),
                         lora_a_initializer=_f32(nn.initializers.he_uniform()),
                         lora_b_initializer=_f32(nn.initializers.zeros))
    return qwix.LoraProvider([rule])


@functools.lru_cache(maxsize=32)
def lora_model(config: JinaVLMConfig, spec: LoraSpec) -> JinaVLM:
    """JinaVLM(config) with Qwix LoRA on the `spec.modules` dot_generals (call methods by name)."""
    qwix = require_qwix()
    return qwix.apply_lora_to_model(JinaVLM(config), provider(spec), methods=METHODS)


def _init_rngs(key):
    return {"params": key, "dropout": key}


@functools.lru_cache(maxsize=32)
def abstract_lora(config: JinaVLMConfig, spec: LoraSpec, boxed: bool = False):
    """The param tree of `lora_model(config, spec)` as ShapeDtypeStructs (base + adapters; matched
    base kernels are WithAux(QArray) for int8 / nf4), base float params in `spec.float_dtype`."""
    model = lora_model(config, spec)
    v = jax.eval_shape(lambda r: model.init(_init_rngs(r), **dummy_inputs(config)), jax.random.key(0))["params"]
    flat = traverse_util.flatten_dict(v)
    if not any(is_adapter_path("/".join(k)) for k in flat):
        raise AdaptError(f"lora.modules: {spec.modules!r} matches no matmul of the model (module paths look "
                         "like 'text/layers/q', 'text/layers_0/up', 'vision/layers/q', 'connector/proj_value')")
    dt = jnp.dtype(spec.float_dtype)

    def cast(path, x):
        leaf = nn.unbox(x) if isinstance(x, nn.meta.AxisMetadata) else x
        if is_quantized(leaf) or is_adapter_path("/".join(path)) or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return x
        new = jax.ShapeDtypeStruct(leaf.shape, dt)
        return x.replace_boxed(new) if isinstance(x, nn.meta.AxisMetadata) else new

    out = traverse_util.unflatten_dict({k: cast(k, x) for k, x in flat.items()})
    return out if boxed else nn.unbox(out)


def split_adapter(params: dict) -> tuple[dict, dict]:
    """(base, adapter): the adapter leaves (`*_lora_a`, `*_lora_b`) apart from everything else."""
    flat = traverse_util.flatten_dict(params)
    base = {k: v for k, v in flat.items() if not is_adapter_path("/".join(k))}
    adapter = {k: v for k, v in flat.items() if is_adapter_path("/".join(k))}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapter)


def join_adapter(base: dict, adapter: dict) -> dict:
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(base), **traverse_util.flatten_dict(adapter)})


def prepare_base(config: JinaVLMConfig, spec: LoraSpec, base: dict) -> dict:
    """Float base params -> the frozen base of LoRA training: float params cast to `spec.float_dtype`,
    the matched kernels quantized (int8 / nf4: QLoRA) like Qwix's abstract init says."""
    abstract, _ = split_adapter(abstract_lora(config, spec))
    if spec.qtype is not None:
        base = quantize_like(base, abstract)   # from the float params: scales in their dtype, as Qwix's init
    dt = jnp.dtype(spec.float_dtype)
    flat = traverse_util.flatten_dict(base)
    return traverse_util.unflatten_dict({k: v if is_quantized(v) or not jnp.issubdtype(v.dtype, jnp.floating)
                                         else v.astype(dt) for k, v in flat.items()})


def init_adapter(config: JinaVLMConfig, spec: LoraSpec, seed: int = 0) -> dict:
    """Fresh adapter params (A he-uniform, B zero): Qwix's init, jitted so that only the adapter
    leaves are computed (the base init is dead code)."""
    model = lora_model(config, spec)

    def adapters(key):
        v = model.init(_init_rngs(key), **dummy_inputs(config))["params"]
        return split_adapter(nn.unbox(v))[1]
    return jax.jit(adapters)(jax.random.key(seed))


def attach_adapter(config: JinaVLMConfig, spec: LoraSpec, base: dict, seed: int = 0) -> dict:
    """The LoRA training params: `prepare_base(base)` + fresh adapters, in one tree."""
    return join_adapter(prepare_base(config, spec, base), init_adapter(config, spec, seed))


def _dequantized(x):
    if is_quantized(x):
        return require_qwix().dequantize(x.array)
    return x


def merge_adapter(base: dict, adapter: dict, spec: LoraSpec, dtype: Any = jnp.float32) -> dict:
    """base + adapter -> a plain param tree: each adapted kernel W [*lead, *in, *out] becomes
    W + reshape(A @ B) * alpha / rank (A [*lead, prod(in), r], B [*lead, r, prod(out)]; `lead` is the
    nn.scan layer axis when there is one). Quantized base kernels are dequantized first. Every float
    param comes back in `dtype` (float32 by default, so the merge itself adds no rounding)."""
    flat = traverse_util.flatten_dict(base)  # a WithAux (quantized kernel) is not a dict: one leaf
    ad = traverse_util.flatten_dict(adapter)
    out = {k: _dequantized(v) for k, v in flat.items()}
    out = {k: (v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v) for k, v in out.items()}
    for k in ad:
        if k[-1].endswith("_lora_b"):
            continue
        name = k[-1][: -len("_lora_a")]
        kk, kb = k[:-1] + (name,), k[:-1] + (name + "_lora_b",)
        where = "/".join(kk)
        if kk not in out:
            raise AdaptError(f"adapter {'/'.join(k)}: the base has no param {where}")
        if kb not in ad:
            raise AdaptError(f"adapter {'/'.join(k)}: {'/'.join(kb)} is missing")
        w, a, b = out[kk], ad[k], ad[kb]
        out[kk] = _merge_one(w, a, b, spec.scale, where)
    return traverse_util.unflatten_dict(out)


def _merge_one(w, a, b, scale: float, where: str):
    lead = a.ndim - 2
    if (a.shape[:lead] != b.shape[:lead] or a.shape[-1] != b.shape[-2] or w.shape[:lead] != a.shape[:lead]
            or _prod(w.shape[lead:]) != a.shape[-2] * b.shape[-1]):
        raise AdaptError(f"adapter for {where}: lora_a {tuple(a.shape)} x lora_b {tuple(b.shape)} does not fit the "
                         f"kernel {tuple(w.shape)}")
    return _merge_jit(w, a, b, scale)


@jax.jit
def _merge_jit(w, a, b, scale):
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + delta.reshape(w.shape) * scale).astype(w.dtype)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ----------------------------------------------------------------------------- adapters as files

def check_adapter(config: JinaVLMConfig, spec: LoraSpec, adapter: dict, where: str) -> None:
    """Every adapter leaf the base model expects, with its shape; reports all problems by key."""
    want = {"/".join(k): tuple(v.shape) for k, v in
            traverse_util.flatten_dict(split_adapter(abstract_lora(config, spec))[1]).items()}
    have = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(adapter).items()}
    problems = [f"  missing: {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"  unexpected: {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"  mis-shaped: {k}: the base model expects {want[k]}, found {have[k]}"
                 for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if problems:
        raise AdaptError(f"{where}: the adapter does not fit this base model (rank {spec.rank}, modules "
                         f"{spec.modules!r}):\n" + "\n".join(problems[:20]))


def save_adapter(directory: str | Path, adapter: dict, spec: LoraSpec, base_info: dict | None = None,
                 *, overwrite: bool = True) -> Path:
    """The adapter alone: DIR/params (Orbax) + DIR/adapter.json (rank, alpha, regex, base provenance)."""
    import orbax.checkpoint as ocp

    from ..checkpoint import _checkpointer, atomic_directory
    directory = Path(directory).absolute()
    shapes = {"/".join(k): list(v.shape) for k, v in traverse_util.flatten_dict(adapter).items()}
    meta = {"format": ADAPTER_FORMAT, "version": 1, **spec.to_json(), "scale": spec.scale,
            "base": dict(base_info or {}), "params": shapes, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_directory(directory, overwrite) as tmp:
        with _checkpointer() as ckptr:
            ckptr.save(tmp / ADAPTER_PARAMS, args=ocp.args.PyTreeSave(adapter))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    return directory


def read_adapter_info(directory: str | Path) -> dict:
    d = Path(directory)
    meta_path = d / ADAPTER_META
    if not d.is_dir():
        raise AdaptError(f"{d}: adapter directory not found")
    if not meta_path.is_file():
        raise AdaptError(f"{d}: not a LoRA adapter directory (no {ADAPTER_META}; training writes one to "
                         "OUTPUT_DIR/adapter)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise AdaptError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdaptError(f"{meta_path}: not a {ADAPTER_FORMAT} file (format {meta.get('format')!r})")
    return meta


def load_adapter(directory: str | Path, config: JinaVLMConfig) -> tuple[dict, LoraSpec, dict]:
    """(adapter params, spec, metadata) from `save_adapter`'s directory, checked against `config`
    (the base model's stacked layout) before any array is read: wrong rank, modules or shapes are
    reported by key."""
    import numpy as np
    import orbax.checkpoint as ocp

    from ..checkpoint import _checkpointer
    d = Path(directory).absolute()
    meta = read_adapter_info(d)
    spec = LoraSpec.from_json(meta, where=str(d / ADAPTER_META))
    config = config.replace(scan_layers=True)
    with _checkpointer() as ckptr:
        try:
            stored = ckptr.metadata(d / ADAPTER_PARAMS).item_metadata.tree
        except (FileNotFoundError, ValueError, OSError) as e:
            raise AdaptError(f"{d / ADAPTER_PARAMS}: Orbax adapter params missing or unreadable ({e})") from None
        check_adapter(config, spec, stored, str(d))
        args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), stored)
        adapter = ckptr.restore(d / ADAPTER_PARAMS, args=ocp.args.PyTreeRestore(restore_args=args))
    return jax.tree_util.tree_map(jnp.asarray, adapter), spec, meta


def apply_adapter(config: JinaVLMConfig, params: dict, directory: str | Path, dtype: Any = None) -> dict:
    """A float base param tree (stacked layout) with the adapter in `directory` merged in; the merged
    params keep the base's float dtype unless `dtype` is given."""
    adapter, spec, _ = load_adapter(directory, config)
    leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    out_dtype = dtype or (leaves[0].dtype if leaves else jnp.float32)
    merged = merge_adapter(params, adapter, spec)
    return jax.tree_util.tree_map(lambda x: x.astype(out_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  merged)
