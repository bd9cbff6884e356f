"""The params layout inference uses: decoder layers applied one by one, each from its own buffers.

Training stacks the decoder layers with `nn.scan` (params `text/layers` with a leading layers axis).
On XLA:CPU a layer scan slices its stacked weights and KV cache with a copy every step, which makes
weight-bound decoding several times slower; with one param tree and one cache buffer per layer
(`JinaVLMConfig.scan_layers=False`: `text/layers_0` ... `text/layers_{n-1}`) every matmul and the
attention read them in place. `prepare_params` converts the stacked tree once.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax

from ..model import JinaVLMConfig, abstract_params
from .sampling import GenerateError


class InferenceParams(NamedTuple):
    """Params in the per-layer layout (`tree`: the param tree of `inference_config(config)`)."""

    tree: dict


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


def prepare_params(config: JinaVLMConfig, params, mesh=None) -> InferenceParams:
    """Stacked params (as from init_params / load_jina_vlm / checkpoint.load) -> InferenceParams.

    Copies the decoder layers once into per-layer buffers (the caller can then drop the stacked
    tree). With a mesh, every param is placed on its sharding from the rule table (FSDP over the
    model dimension, tensor parallelism over heads / MLP / vocab).
    """
    if isinstance(params, InferenceParams):
        return params
    try:
        params["text"]["layers"]
    except (KeyError, TypeError):
        raise GenerateError("params must be the model's param tree (with text/layers) or InferenceParams") from None
    tree = unstack_layers(params, config.text.n_layers)
    if mesh is not None:
        from ..sharding import param_shardings
        tree = jax.tree_util.tree_map(jax.device_put, tree, param_shardings(inference_config(config), mesh))
    return InferenceParams(tree)


def abstract_inference_params(config: JinaVLMConfig) -> InferenceParams:
    """InferenceParams of ShapeDtypeStructs (nothing materialised): for lowering and cost analysis."""
    return InferenceParams(abstract_params(inference_config(config)))
