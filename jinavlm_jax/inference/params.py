"""The params layout inference uses: decoder layers applied one by one, each from its own buffers.

Training stacks the decoder layers with `nn.scan` (params `text/layers` with a leading layers axis).
On XLA:CPU a layer scan slices its stacked weights and KV cache with a copy every step, which makes
weight-bound decoding several times slower; with one param tree and one cache buffer per layer
(`JinaVLMConfig.scan_layers=False`: `text/layers_0` ... `text/layers_{n-1}`) every matmul and the
attention read them in place. `prepare_params` converts the stacked tree once, and quantizes it
(int8 weight-only, `adapt.quant`) when asked.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
from flax import struct

from ..model import JinaVLMConfig, abstract_params
from .sampling import GenerateError


@struct.dataclass
class InferenceParams:
    """Params in the per-layer layout (`tree`: the param tree of `inference_config(config)`).

    `quant`: None (float) or an `adapt.quant.Quantization` (static: part of every compiled program's
    key); then the matched kernels in `tree` are Qwix int8 QArrays and the programs apply the
    Qwix-wrapped model (`programs.model_for`).
    """

    tree: dict
    quant: Any = struct.field(pytree_node=False, default=None)


def inference_config(config: JinaVLMConfig) -> JinaVLMConfig:
    """The config of the per-layer layout (`scan_layers=False`, no remat: nothing is differentiated)."""
    return config.replace(scan_layers=False, remat_policy="none")


@partial(jax.jit, static_argnums=1)
def _unstack(layers, n: int):
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], layers) for i in range(n))


def unstack_layers(params: dict, n_layers: int) -> dict:
    """A stacked param tree (`text/layers` [n, ...]) -> the per-layer tree (`text/layers_i`)."""
    text = {k: v for k, v in params["text"].items() if k != "layers"}
    text.update({f"layers_{i}": p for i, p in enumerate(_unstack(params["text"]["layers"], n_layers))})
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


def prepare_params(config: JinaVLMConfig, params, mesh=None, quantize=None) -> InferenceParams:
    """Stacked params (as from init_params / load_jina_vlm / checkpoint.load) -> InferenceParams.

    Copies the decoder layers once into per-layer buffers (the caller can then drop the stacked
    tree). `quantize` ("int8", "int8+vision" or an `adapt.quant.Quantization`): decoder (and vision)
    kernels to int8 with per-channel scales (`adapt.quant`). With a mesh, every param is placed on
    its sharding from the rule table (FSDP over the model dimension, tensor parallelism over heads /
    MLP / vocab; an int8 kernel like its float kernel).
    """
    quant = parse_quantize(quantize)
    if isinstance(params, InferenceParams):
        if quant is None or params.quant == quant:
            return params
        if params.quant is not None:
            raise GenerateError(f"params are already quantized ({params.quant.name}); cannot re-quantize them "
                                f"as {quant.name}: load the float checkpoint")
        tree = params.tree
    else:
        try:
            params["text"]["layers"]
        except (KeyError, TypeError):
            raise GenerateError("params must be the model's param tree (with text/layers) or InferenceParams") from None
        tree = unstack_layers(params, config.text.n_layers)
    if quant is not None:
        from ..adapt.quant import quantize_tree
        tree = quantize_tree(inference_config(config), tree, quant)
    if mesh is not None:
        tree = jax.tree_util.tree_map(jax.device_put, tree, inference_shardings(config, mesh, quant))
    return InferenceParams(tree, quant)


def inference_shardings(config: JinaVLMConfig, mesh, quant=None) -> dict:
    """The sharding tree of the per-layer (and, with `quant`, quantized) params on `mesh`."""
    from ..sharding import param_shardings
    shardings = param_shardings(inference_config(config), mesh)
    if quant is None:
        return shardings
    from ..adapt.quant import abstract_quantized, quantized_shardings
    return quantized_shardings(shardings, abstract_quantized(inference_config(config), quant), mesh)


def abstract_inference_params(config: JinaVLMConfig, quantize=None) -> InferenceParams:
    """InferenceParams of ShapeDtypeStructs (nothing materialised): for lowering and cost analysis."""
    quant = parse_quantize(quantize)
    if quant is None:
        return InferenceParams(abstract_params(inference_config(config)))
    from ..adapt.quant import abstract_quantized
    return InferenceParams(abstract_quantized(inference_config(config), quant), quant)
