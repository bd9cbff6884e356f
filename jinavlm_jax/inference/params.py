"""The params layout inference uses: decoder layers applied one by one, each from its own buffers.

Training stacks the decoder layers with `nn.scan` (params `text/layers` with a leading layers axis).
On XLA:CPU a layer scan slices its stacked weights and KV cache with a copy every step, which makes
weight-bound decoding several times slower; with one param tree and one cache buffer per layer
(`JinaVLMConfig.scan_layers=False`: `text/layers_0` ... `text/layers_{n-1}`) every matmul and the
attention read them in place. `prepare_params` converts the stacked tree once, and quantizes it
(int8 weight-only, `adapt.quant`) when asked.

On CPU the decoder's float kernels are also stored output-major (`JinaVLMConfig.kernel_layout`
"out_in", PyTorch's Linear layout): XLA:CPU's GEMM reads them faster for the few rows of a decode
step (`model.layers.matmul`), and a 16-bit model's embedding tables as their uint16 bits
(`model.text.table_bits`). The TPU / GPU programs and int8 params keep the checkpoint's layout.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ..model import JinaVLMConfig, abstract_params, kernel_permutations
from ..model.config import KERNEL_LAYOUTS
from ..model.text import table_bits
from .sampling import GenerateError


@struct.dataclass
class InferenceParams:
    """Params in the per-layer layout (`tree`: the param tree of `inference_config(config)`).

    `quant`: None (float) or an `adapt.quant.Quantization` (static: part of every compiled program's
    key); then the matched kernels in `tree` are Qwix int8 QArrays and the programs apply the
    Qwix-wrapped model (`programs.model_for`). `kernel_layout` (static): how the decoder's kernels in
    `tree` are stored (`JinaVLMConfig.kernel_layout`).
    """

    tree: dict
    quant: Any = struct.field(pytree_node=False, default=None)
    kernel_layout: str = struct.field(pytree_node=False, default="in_out")


def inference_config(config: JinaVLMConfig, kernel_layout: str = "in_out") -> JinaVLMConfig:
    """The config of the per-layer layout (`scan_layers=False`, no remat: nothing is differentiated),
    with the decoder's kernels stored in `kernel_layout`."""
    return config.replace(scan_layers=False, remat_policy="none", kernel_layout=kernel_layout)


def default_kernel_layout(mesh=None, quant=None) -> str:
    """"out_in" for float params on CPU (the mesh's devices, else JAX's default backend), else "in_out"
    (XLA:TPU and XLA:GPU pick their own layouts; Qwix's int8 kernels keep the checkpoint's)."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "out_in" if platform == "cpu" and quant is None else "in_out"


def parse_kernel_layout(value, mesh=None, quant=None) -> str:
    """None / "auto" -> `default_kernel_layout`; else one of KERNEL_LAYOUTS ("out_in" only for float params)."""
    if value is None or value == "auto":
        return default_kernel_layout(mesh, quant)
    if value not in KERNEL_LAYOUTS:
        raise GenerateError(f"kernel_layout: {value!r} is not supported (choose from {['auto', *KERNEL_LAYOUTS]})")
    if value != "in_out" and quant is not None:
        raise GenerateError(f"kernel_layout {value!r}: int8 params keep the checkpoint's layout (in_out)")
    return value


_transpose = jax.jit(jax.numpy.transpose, static_argnums=1)


def _is_perm(p) -> bool:
    return p is None or isinstance(p, tuple)


def _flat_perms(perms) -> tuple:
    return tuple(jax.tree_util.tree_leaves(perms, is_leaf=_is_perm))


def _permute(perms, tree):
    """Transpose each leaf of `tree` by its entry in `perms` (a matching tree of tuples / None)."""
    return jax.tree_util.tree_map(lambda p, a: a if p is None else _transpose(a, p), perms, tree,
                                  is_leaf=_is_perm)


def relayout(config: JinaVLMConfig, tree: dict, kernel_layout: str) -> dict:
    """A param tree of `config` (stored in its `kernel_layout`) with the decoder's kernels stored in
    `kernel_layout` (each changed kernel copied once; the others are the same arrays), and the embedding
    tables as `kernel_layout` stores them (`model.text.table_bits`)."""
    if kernel_layout == config.kernel_layout:
        return tree
    try:
        return table_storage(config, _permute(kernel_permutations(config, kernel_layout), tree), kernel_layout)
    except ValueError as e:
        raise GenerateError(f"params do not match the model config (cannot change their kernel layout): {e}") from None


def table_storage(config: JinaVLMConfig, tree: dict, kernel_layout: str) -> dict:
    """The tree with its embedding tables as their uint16 bits where `kernel_layout` stores them so (a
    16-bit float model on CPU: `model.text.table_bits`), else as floats of `config.param_dtype`."""
    bits = table_bits(config.param_dtype, kernel_layout)
    text = dict(tree["text"])
    for k in ("embedding", "new_embedding"):
        if bits != (text[k].dtype == jnp.uint16):
            text[k] = jax.lax.bitcast_convert_type(text[k], jnp.uint16 if bits else config.param_dtype)
    return {**tree, "text": text}


@partial(jax.jit, static_argnums=(1, 2))
def _unstack(layers, n: int, perms: tuple | None):
    leaves, treedef = jax.tree_util.tree_flatten(layers)
    perms = perms or (None,) * len(leaves)
    return tuple(jax.tree_util.tree_unflatten(treedef, [a[i] if p is None else a[i].transpose(p)
                                                        for a, p in zip(leaves, perms)]) for i in range(n))


def unstack_layers(params: dict, n_layers: int, perms=None) -> dict:
    """A stacked param tree (`text/layers` [n, ...]) -> the per-layer tree (`text/layers_i`). `perms`:
    one layer's `model.kernel_permutations`, applied to each layer's copy as it is made."""
    text = {k: v for k, v in params["text"].items() if k != "layers"}
    layers = _unstack(params["text"]["layers"], n_layers, None if perms is None else _flat_perms(perms))
    text.update({f"layers_{i}": p for i, p in enumerate(layers)})
    return {**{k: v for k, v in params.items() if k != "text"}, "text": text}


def parse_quantize(quantize):
    """None or an `adapt.quant.Quantization` from a `quantize=` argument ("int8", "int8+vision", ...)."""
    if quantize is None:
        return None
    from ..adapt import AdaptError
    from ..adapt.quant import Quantization
    try:
        return Quantization.parse(quantize)
    except AdaptError as e:
        raise GenerateError(str(e)) from None


def prepare_params(config: JinaVLMConfig, params, mesh=None, quantize=None, kernel_layout=None) -> InferenceParams:
    """Stacked params (as from init_params / load_jina_vlm / checkpoint.load) -> InferenceParams.

    Copies the decoder layers once into per-layer buffers (the caller can then drop the stacked
    tree). `quantize` ("int8", "int8+vision" or an `adapt.quant.Quantization`): decoder (and vision)
    kernels to int8 with per-channel scales (`adapt.quant`). `kernel_layout` (None / "auto": "out_in"
    for float params on CPU, else "in_out"; see `default_kernel_layout`): how the decoder's kernels are
    stored. With a mesh, every param is placed on its sharding from the rule table (FSDP over the
    model dimension, tensor parallelism over heads / MLP / vocab; an int8 kernel like its float kernel).
    """
    quant = parse_quantize(quantize)
    if isinstance(params, InferenceParams):
        quant = quant or params.quant
        if params.quant is not None and params.quant != quant:
            raise GenerateError(f"params are already quantized ({params.quant.name}); cannot re-quantize them "
                                f"as {quant.name}: load the float checkpoint")
        layout = parse_kernel_layout(kernel_layout, mesh, quant)
        if params.quant == quant and params.kernel_layout == layout:
            return params
        tree = relayout(inference_config(config, params.kernel_layout), params.tree, layout)
    else:
        layout = parse_kernel_layout(kernel_layout, mesh, quant)
        try:
            params["text"]["layers"]
        except (KeyError, TypeError):
            raise GenerateError("params must be the model's param tree (with text/layers) or InferenceParams") from None
        source = inference_config(config, config.kernel_layout)
        perms = kernel_permutations(source, layout) if layout != config.kernel_layout else None
        tree = unstack_layers(params, config.text.n_layers, perms and perms["text"]["layers_0"])
        if perms is not None:  # the other kernels (lm_head); the layers are already in `layout`
            n = config.text.n_layers
            perms = {**perms, "text": {**perms["text"], **{f"layers_{i}": None for i in range(n)}}}
            tree = _permute(perms, tree)
        tree = table_storage(config, tree, layout)
    if quant is not None and (not isinstance(params, InferenceParams) or params.quant is None):
        from ..adapt.quant import quantize_tree
        tree = quantize_tree(inference_config(config), tree, quant)
    if mesh is not None:
        tree = jax.tree_util.tree_map(jax.device_put, tree, inference_shardings(config, mesh, quant, layout))
    return InferenceParams(tree, quant, layout)


def inference_shardings(config: JinaVLMConfig, mesh, quant=None, kernel_layout: str = "in_out") -> dict:
    """The sharding tree of the per-layer (and, with `quant`, quantized) params on `mesh`."""
    from ..sharding import param_shardings
    shardings = param_shardings(inference_config(config, kernel_layout), mesh)
    if quant is None:
        return shardings
    from ..adapt.quant import abstract_quantized, quantized_shardings
    return quantized_shardings(shardings, abstract_quantized(inference_config(config), quant), mesh)


def abstract_inference_params(config: JinaVLMConfig, quantize=None, kernel_layout: str = "in_out") -> InferenceParams:
    """InferenceParams of ShapeDtypeStructs (nothing materialised): for lowering and cost analysis
    (`kernel_layout` "in_out" by default: the layout the TPU programs take)."""
    quant = parse_quantize(quantize)
    if quant is None:
        return InferenceParams(abstract_params(inference_config(config, kernel_layout)), None, kernel_layout)
    from ..adapt.quant import abstract_quantized
    return InferenceParams(abstract_quantized(inference_config(config), quant), quant)
