"""The compiled pieces of generation, built on the model's own decoder API (`JinaVLM.decode_hidden`
with one KV cache buffer per layer; spec 6.5).

* `prompt_forward`: embeddings of a (left-padded) prompt -> last-position logits and every layer's K/V;
* `decode_step`: one token per row over the KV caches (written at one slot for all rows, or one per row);
* `prefill` / `decode_loop`: `generate()`'s two programs: the prompt with its images into a cache of
  `cache_length` slots, then a `lax.while_loop` that feeds one token per step (images are not seen
  again), writes its K/V at slot `prompt_length + step` and stops early once every row has produced a
  stop id. No Python runs per token (unless a streaming callback is asked for: one `io_callback` per step).

The serving engine (`engine.py`) composes the same pieces into its prefill / insert / generate programs.
"""
from __future__ import annotations

import threading
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from ..model import JinaVLM, JinaVLMConfig, positions_from_mask, prompt_mask
from ..model.layers import QuantizedKV, constrain, quantize_kv, target_platform
from .params import InferenceParams, inference_config
from .sampling import GenerateError, row_keys, sample

CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", None)
KV_CACHE_DTYPES = ("auto", "int8")


def parse_kv_cache_dtype(value) -> str | None:
    """None / "auto" (the cache in the compute dtype) -> None; "int8" (`model.layers.QuantizedKV`) -> "int8"."""
    if value is None or str(value).lower() == "auto":
        return None
    if str(value).lower() == "int8":
        return "int8"
    raise GenerateError(f"kv_cache_dtype: {value!r} is not supported (choose from {list(KV_CACHE_DTYPES)})")


def constrain_cache(buffer):
    """A cache buffer (array or QuantizedKV: codes [B, S, KV, hd], scale [B, S]) on its mesh layout."""
    return jax.tree_util.tree_map(lambda a: constrain(a, CACHE_AXES[:a.ndim]), buffer)


def flat_caches(caches) -> tuple:
    """What a decode loop carries on CPU: per-layer float (k, v) caches [B, S, KV, hd] as [B, S, KV * hd]
    (bitcasts), which the one-query attention reads with GEMMs in place (`layers._cache_gemm`; read
    through a reshape, XLA:CPU copies every loop-carried cache on every step). Returns (caches, the
    function that gives them their [B, S, KV, hd] shapes back). Only float32 caches of several rows:
    full size, decode step, batch 8 float32 301 -> 262 ms; batch 1 float32 165 -> 186 ms and bf16
    (batch 1 181 -> 203, batch 8 290 -> 326 ms) are faster with the 4-D cache (its multiply-and-sum
    loops at one row; for bf16 the 4-D GEMMs), which int8 caches and other platforms also keep."""
    if (target_platform() != "cpu" or any(isinstance(c, QuantizedKV) for layer in caches for c in layer)
            or caches[0][0].dtype.itemsize != 4 or caches[0][0].shape[0] < 2):
        return caches, lambda c: c
    shapes = [(k.shape, v.shape) for k, v in caches]
    flat = tuple((k.reshape(k.shape[:2] + (-1,)), v.reshape(v.shape[:2] + (-1,))) for k, v in caches)
    return flat, lambda cs: tuple((k.reshape(sk), v.reshape(sv)) for (k, v), (sk, sv) in zip(cs, shapes))


def cache_buffer(kv: jax.Array, kv_cache_dtype: str | None):
    """K or V [B, S, KV, hd] as a cache buffer of `kv_cache_dtype` (None: as it is; "int8": QuantizedKV)."""
    return constrain_cache(quantize_kv(kv) if kv_cache_dtype == "int8" else kv)


def model_for(config: JinaVLMConfig, params: InferenceParams) -> JinaVLM:
    """The model in the per-layer layout (and kernel layout) that `params` hold; for quantized params
    (`InferenceParams.quant`) the Qwix-wrapped one that applies int8 kernels (`adapt.quant`). Call its
    methods by name: Qwix wraps the module class."""
    if params.quant is None:
        return JinaVLM(inference_config(config, params.kernel_layout))
    from ..adapt.quant import quantized_model
    return quantized_model(inference_config(config), params.quant)


def prompt_forward(config: JinaVLMConfig, params: InferenceParams, x, attention_mask):
    """Prompt embeddings x [B, L, D] (left padded) -> (last-position logits [B, V] float32, one (k, v)
    [B, L, KV, hd] per layer, positions [B, L])."""
    model, v = model_for(config, params), {"params": params.tree}
    positions = positions_from_mask(attention_mask)
    h, kvs = model.apply(v, x, positions, prompt_mask(attention_mask), method="decode_hidden")
    logits = model.apply(v, h[:, -1:], method="logits_from_hidden")[:, 0]
    return logits, kvs, positions


def decode_step(config: JinaVLMConfig, params: InferenceParams, tokens, positions, caches, kv_valid, slot):
    """One token per row: tokens [B] (negative = none, reads row 0), positions [B], caches one (k, v)
    [B, S, KV, hd] (or QuantizedKV) per layer, kv_valid [B, S] (the slot being written already marked), slot an int or
    [B]. Returns (logits [B, V] float32, updated caches)."""
    model, v = model_for(config, params), {"params": params.tree}
    x = model.apply(v, jnp.maximum(tokens, 0)[:, None], method="embed_tokens")
    h, caches = model.apply(v, x, positions[:, None], kv_valid[:, None, :], slot, caches,
                            method="decode_hidden")
    caches = tuple((constrain_cache(k), constrain_cache(c)) for k, c in caches)
    return model.apply(v, h, method="logits_from_hidden")[:, 0], caches


def prefill(config: JinaVLMConfig, cache_length: int, params: InferenceParams, input_ids, attention_mask,
            images, image_masks, image_input_idx, kv_cache_dtype: str | None = None):
    """Prompt [B, L] (left padded) with its images -> (last-position logits [B, V], caches of
    `cache_length` slots, kv_valid [B, S], last positions [B]). kv_cache_dtype "int8": the caches are
    QuantizedKV (the prompt itself attends over its float K/V)."""
    x = model_for(config, params).apply({"params": params.tree}, input_ids, images, image_masks,
                                              image_input_idx, method="embed_inputs")
    logits, kvs, positions = prompt_forward(config, params, x, attention_mask)
    pad = ((0, 0), (0, cache_length - input_ids.shape[1]), (0, 0), (0, 0))
    caches = tuple((cache_buffer(jnp.pad(k, pad), kv_cache_dtype), cache_buffer(jnp.pad(v, pad), kv_cache_dtype))
                   for k, v in kvs)
    kv_valid = jnp.pad(attention_mask.astype(bool), ((0, 0), (0, cache_length - input_ids.shape[1])))
    return logits, caches, kv_valid, positions[:, -1]


prefill_jit = jax.jit(prefill, static_argnums=(0, 1), static_argnames=("kv_cache_dtype",))


def full_logits(config: JinaVLMConfig, params: InferenceParams, input_ids, images=None, image_masks=None,
                image_input_idx=None):
    """Logits [B, L, V] at every position (no cache) from InferenceParams, float or quantized: what
    `convert check-logits` and `benchmarks/bench_quantize.py` compare."""
    return model_for(config, params).apply({"params": params.tree}, input_ids, images, image_masks,
                                                 image_input_idx)


full_logits_jit = jax.jit(full_logits, static_argnums=0)


# A streaming callback is one Python function shared by every compiled decode loop; it forwards to
# the sink of the running generate() call (one call at a time, hence the lock).
STREAM_LOCK = threading.Lock()
_SINK: list[Callable | None] = [None]


def set_stream_sink(sink: Callable[[int, np.ndarray], None] | None) -> None:
    """Where decode loops compiled with stream=True send (step, tokens); hold STREAM_LOCK around a call."""
    _SINK[0] = sink


def _emit(step, tokens):
    sink = _SINK[0]
    if sink is not None:
        sink(int(step), np.asarray(tokens))


def decode_loop(config: JinaVLMConfig, prompt_length: int, filtered: bool, stream: bool, params: InferenceParams,
                caches, kv_valid, logits0, last_pos, seeds, temperature, top_k, top_p, stop_ids, max_new, done0):
    """The decode loop. Returns (tokens [B, S - prompt_length] with -1 after a row stopped, steps, caches,
    kv_valid). The caches come back so that the donated input buffers alias the outputs: the loop
    then updates them in place instead of copying them first."""
    b, s = kv_valid.shape
    draw = partial(sample, keys=row_keys(seeds), temperature=temperature, top_k=top_k, top_p=top_p,
                   filtered=filtered)
    is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=-1)

    tok = draw(logits0, step=0)
    out = jnp.full((b, s - prompt_length), -1, jnp.int32).at[:, 0].set(tok)
    done = done0 | is_stop(tok)
    if stream:
        io_callback(_emit, None, 0, tok, ordered=True)

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, tok, out, done, caches, kv_valid = c
        slot = prompt_length + i - 1  # the slot of the token fed now (the one sampled at step i - 1)
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((b, 1), bool), (0, slot))
        logits, caches = decode_step(config, params, tok, last_pos + i, caches, kv_valid, slot)
        nxt = jnp.where(done, -1, draw(logits, step=i))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        if stream:
            io_callback(_emit, None, i, nxt, ordered=True)
        return i + 1, nxt, out, done | is_stop(nxt), caches, kv_valid

    caches, shaped = flat_caches(caches)
    i, _, out, _, caches, kv_valid = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, done, caches, kv_valid))
    return out, i, shaped(caches), kv_valid


decode_loop_jit = jax.jit(decode_loop, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6))
