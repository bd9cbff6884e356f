"""int8 weight-only inference with Qwix's PTQ provider.

    quant = Quantization.parse("int8")                # decoder projections + lm_head; vision=True adds the ViT
    model = quantized_model(config, quant)            # JinaVLM with its dot_generals intercepted by Qwix
    tree = quantize_tree(config, float_tree, quant)   # float params -> int8 QArrays (per output channel)
    model.apply({"params": tree}, ..., method="decode_hidden")

Weights are int8 with one float scale per output channel (Qwix's `absmax` calibration over the
contracted axes); activations stay in the compute dtype: Qwix dequantizes the kernel right before
the matmul, which XLA fuses into it, so HBM and host memory hold int8 (weight-only, "w8a16").
Embedding tables (a gather, not a matmul) and norms stay float.

`config` is the model's config in the layout its params have: the per-layer inference layout
(`inference.inference_config`) for generation, the stacked `nn.scan` layout for QLoRA training.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from ..model import JinaVLM, JinaVLMConfig
from ..model.jinavlm import dummy_inputs
from . import DECODER_PROJECTIONS, LM_HEAD, AdaptError, require_qwix

QTYPES = {"int8": jnp.int8}   # our names -> Qwix qtypes
DTYPES = tuple(QTYPES)
# The decoder projections (both layouts) and the LM head. The connector is small and stays float.
DECODER_REGEX = DECODER_PROJECTIONS + "|" + LM_HEAD
VISION_REGEX = r"vision/.*"
# Every method the programs call by name (a Qwix-wrapped module is a new class: call methods by name).
METHODS = ("__call__", "embed_inputs", "encode_images", "vision_features", "decode_hidden",
           "logits_from_hidden", "embed_tokens")


@dataclass(frozen=True)
class Quantization:
    """What is quantized: `dtype` ("int8") weights of the decoder (+ the vision tower if `vision`)."""

    dtype: str = "int8"
    vision: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise AdaptError(f"quantize: {self.dtype!r} is not supported (choose from {list(DTYPES)})")

    @property
    def regex(self) -> str:
        return DECODER_REGEX + ("|" + VISION_REGEX if self.vision else "")

    @property
    def name(self) -> str:
        return self.dtype + ("+vision" if self.vision else "")

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "vision": self.vision}

    @classmethod
    def parse(cls, value: Any, vision: bool | None = None) -> "Quantization | None":
        """None / "" / "none" / "float" -> None; "int8" or "int8+vision" or a dict / Quantization -> Quantization."""
        if value is None or isinstance(value, Quantization) and vision is None:
            return value
        if isinstance(value, Quantization):
            return Quantization(value.dtype, bool(vision))
        if isinstance(value, dict):
            return cls(str(value.get("dtype", "int8")), bool(value.get("vision", False) if vision is None else vision))
        s = str(value).strip().lower()
        if s in ("", "none", "float", "float32", "bfloat16"):
            return None
        dtype, _, extra = s.partition("+")
        if extra not in ("", "vision"):
            raise AdaptError(f"quantize: {value!r} not understood (use 'int8' or 'int8+vision')")
        return cls(dtype, bool(extra) if vision is None else bool(vision))


def provider(quant: Quantization):
    """Qwix's PTQ provider for `quant`: one rule, weight-only (no activation qtype), dot_general only."""
    qwix = require_qwix()
    return qwix.PtqProvider([qwix.QuantizationRule(module_path=quant.regex, weight_qtype=QTYPES[quant.dtype],
                                                   op_names=("dot_general",))])


@functools.lru_cache(maxsize=32)
def quantized_model(config: JinaVLMConfig, quant: Quantization) -> JinaVLM:
    """JinaVLM(config) with Qwix's PTQ interception on every method in METHODS (cached: one provider,
    hence one stable interceptor identity, per config)."""
    qwix = require_qwix()
    return qwix.quantize_model(JinaVLM(config), provider(quant), methods=METHODS)


@functools.lru_cache(maxsize=32)
def abstract_quantized(config: JinaVLMConfig, quant: Quantization, boxed: bool = False):
    """The quantized param tree of `config` as ShapeDtypeStructs (Qwix's `WithAux(QArray)` where a
    kernel is quantized), from an abstract init: nothing is materialised."""
    model = quantized_model(config, quant)
    v = jax.eval_shape(lambda r: model.init(r, **dummy_inputs(config)), jax.random.key(0))
    return v["params"] if boxed else nn.unbox(v["params"])


def is_quantized(x) -> bool:
    """True for a Qwix quantized param (WithAux holding a QArray, or its abstract form)."""
    return type(x).__name__ == "WithAux" and hasattr(x, "array")


def _quantize_leaf(p: jax.Array, target):
    """One float kernel -> Qwix WithAux(QArray) like `target` (the abstract quantized leaf).

    `qwix.quantize_params` quantizes with the per-layer axes Qwix recorded at init; a kernel stacked
    by `nn.scan` has one more (leading) axis, so its per-channel axes would be off by one. We map the
    same quantization over the layer axis instead (the only reason this is not `qwix.quantize_params`).
    """
    qwix = require_qwix()
    how = target.how

    def q(x):
        return qwix.quantize(x, how.qtype, channelwise_axes=tuple(how.channelwise_axes),
                             tiled_axes=dict(how.tiled_axes) or None, calibration_method=how.calibration_method)

    want = tuple(target.array.scale.shape)
    f = q if tuple(jax.eval_shape(q, p).scale.shape) == want else jax.vmap(q)  # vmap: stacked by nn.scan
    out = f(p)
    if tuple(out.scale.shape) != want:
        raise AdaptError(f"quantizing a kernel of shape {tuple(p.shape)} gave scales {tuple(out.scale.shape)}, "
                         f"the model expects {want}")
    return target.replace(array=out)


def quantize_tree(config: JinaVLMConfig, params: dict, quant: Quantization) -> dict:
    """Float params of `config`'s layout -> the quantized tree `quantized_model(config, quant)` applies."""
    return quantize_like(params, abstract_quantized(config, quant))


def quantize_like(params: dict, abstract: dict) -> dict:
    """Float params -> the tree `abstract` describes (a Qwix-wrapped model's abstract init): every
    kernel that is a WithAux there is quantized, the rest passes through. One jitted program (peak
    memory: the float tree plus the int8 copy). Missing or unexpected params are reported by path.
    """
    flat_abs = traverse_util.flatten_dict(abstract)
    flat = traverse_util.flatten_dict(params)
    missing = sorted("/".join(k) for k in set(flat_abs) - set(flat))
    extra = sorted("/".join(k) for k in set(flat) - set(flat_abs))
    if missing or extra:
        raise AdaptError(f"params do not match the model's layout: missing {missing[:6]}, unexpected {extra[:6]}"
                         " (quantize the per-layer inference layout: inference.prepare_params)")
    targets = {k: v for k, v in flat_abs.items() if is_quantized(v)}
    quantized = jax.jit(lambda f: {k: _quantize_leaf(f[k], t) for k, t in targets.items()})(
        {k: flat[k] for k in targets})
    return traverse_util.unflatten_dict({**flat, **quantized})


# ----------------------------------------------------------------------------- plain trees (for Orbax)

def to_plain(tree: dict) -> dict:
    """A quantized tree with plain dicts in place of WithAux(QArray): {'qvalue', 'scale'} (what Orbax saves)."""
    def conv(x):
        if is_quantized(x):
            return {"qvalue": x.array.qvalue, "scale": x.array.scale}
        return x
    return jax.tree_util.tree_map(conv, tree, is_leaf=is_quantized)


def from_plain(plain: dict, abstract: dict) -> dict:
    """`to_plain`'s inverse: WithAux(QArray) rebuilt where `abstract` (abstract_quantized) has one."""
    def conv(target, x):
        if is_quantized(target):
            return target.replace(array=target.array.replace(qvalue=x["qvalue"], scale=x["scale"]))
        return x
    return jax.tree_util.tree_map(conv, abstract, plain, is_leaf=is_quantized)


def plain_abstract(abstract: dict) -> dict:
    """`to_plain` of an abstract quantized tree: ShapeDtypeStructs for Orbax restore targets."""
    return to_plain(abstract)


def tree_bytes(tree) -> int:
    """Bytes of every array leaf (int8 qvalues, their scales, float params)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def quantized_shardings(float_shardings: dict, qtree: dict, mesh) -> dict:
    """Shardings for a quantized tree from the float tree's: an int8 kernel takes its float kernel's
    sharding, its scale the same with the mesh axes dropped from size-1 dims (`sharding.fit_spec`)."""
    from jax.sharding import NamedSharding
    from ..sharding import fit_spec

    def conv(s, x):
        if is_quantized(x):
            scale = NamedSharding(mesh, fit_spec(s.spec, tuple(x.array.scale.shape), mesh))
            return x.replace(array=x.array.replace(qvalue=s, scale=scale))
        return s
    return jax.tree_util.tree_map(conv, float_shardings, qtree, is_leaf=lambda n: is_quantized(n))


# ----------------------------------------------------------------------------- quantized checkpoints

def save_quantized(directory, config: JinaVLMConfig, params, *, overwrite: bool = False,
                   source: dict | None = None):
    """An Orbax checkpoint of InferenceParams with int8 kernels (per-layer layout, `to_plain` form):
    the same directory format as `checkpoint.save` plus a `quantization` entry in its metadata."""
    import json
    import time
    from pathlib import Path

    import orbax.checkpoint as ocp

    from ..checkpoint import FORMAT, FORMAT_VERSION, META_NAME, PARAMS_DIR, RUNTIME_FIELDS, _checkpointer, \
        atomic_directory
    if params.quant is None:
        raise AdaptError("save_quantized: the params are not quantized (prepare_params(..., quantize='int8'))")
    directory = Path(directory).absolute()
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": config.to_hf(),
            "runtime": {k: getattr(config, k) for k in RUNTIME_FIELDS},
            "quantization": {**params.quant.to_json(), "layout": "per-layer", "library": "qwix"},
            "source": dict(source or {}), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_directory(directory, overwrite) as tmp:
        with _checkpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(to_plain(params.tree)))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
    return directory


def load_quantized(directory, meta: dict, mesh=None):
    """(config, InferenceParams) from `save_quantized`'s directory: the int8 arrays are restored as
    they are (no float kernel is ever materialised), onto `mesh` when given (default: one device)."""
    from pathlib import Path

    import numpy as np
    import orbax.checkpoint as ocp

    from ..checkpoint import PARAMS_DIR, _check_tree, _checkpointer
    from ..inference.params import InferenceParams, inference_config, inference_shardings
    from ..sharding import make_mesh
    from ..weights.safetensors_io import CheckpointError
    directory = Path(directory).absolute()
    config = JinaVLMConfig.from_hf(meta["config"], **meta.get("runtime", {}))
    try:
        quant = Quantization.parse(meta["quantization"])
    except AdaptError as e:
        raise CheckpointError(f"{directory}: quantization entry: {e}") from None
    abstract = to_plain(abstract_quantized(inference_config(config), quant))
    with _checkpointer() as ckptr:
        try:
            stored = ckptr.metadata(directory / PARAMS_DIR).item_metadata.tree
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CheckpointError(f"{directory / PARAMS_DIR}: Orbax params missing or unreadable ({e})") from None
        _check_tree(abstract, jax.tree_util.tree_map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), stored),
                    f"{directory} ({quant.name})")
        if mesh is None:
            mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        shardings = to_plain(inference_shardings(config, mesh, quant))
        target = jax.tree_util.tree_map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s),
                                        stored, shardings)
        plain = ckptr.restore(directory / PARAMS_DIR, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    kinds = {np.dtype(m.dtype).name for p, m in jax.tree_util.tree_leaves_with_path(stored)
             if np.dtype(m.dtype).kind == "f"}
    if len(kinds) == 1:
        config = config.replace(param_dtype=kinds.pop())
    return config, InferenceParams(from_plain(plain, abstract_quantized(inference_config(config), quant)), quant)
