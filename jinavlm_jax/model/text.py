"""Qwen3-1.7B text decoder in the official layout (spec sections 1.3, 6.2-6.5).

GQA with per-head QK RMSNorm before rotate-half RoPE (theta 1e6, float32), SwiGLU MLP, untied
lm_head, and an embedding table split like the official one: `embedding` [vocab, d] plus
`new_embedding` [additional, d] for the image tokens (spec trap 17).

Attention takes an explicit boolean mask and an optional per-layer KV cache, so the same layer
serves the full forward, the prefill (returns K/V to write) and one-token decode (writes its K/V
into the cache at `cache_index` and attends over the whole cache). For a full sequence the mask may
instead be a `SegmentMask` (causal within segment ids), the form the splash kernel needs
(`attention_impl="splash"`); the XLA path expands it to the same boolean mask.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from .config import TextConfig
from .layers import (Dense, Dtype, QuantizedKV, RMSNorm, attention, constrain, quantize_kv, remat_layer, rope,
                     stack_layers)

ACT = ("act_batch", "act_length", "act_embed")


class SegmentMask(NamedTuple):
    """Causal self-attention within segments: segment_ids [B, L] int, 0 = padding, 1, 2, ... = samples.

    Token i attends to token j <= i when both carry the same non-zero id. For one left-padded prompt
    per row, `SegmentMask(attention_mask.astype(jnp.int32))` is exactly `causal_mask(attention_mask, L)`.
    """

    segment_ids: jax.Array

    def dense(self) -> jax.Array:
        """The [B, L, L] bool mask of the XLA path (rows of padding tokens are all False)."""
        seg = self.segment_ids
        l = seg.shape[1]
        causal = jnp.arange(l)[:, None] >= jnp.arange(l)[None, :]
        same = seg[:, :, None] == seg[:, None, :]
        return causal[None] & same & (seg[:, None, :] > 0)


class CausalMask(NamedTuple):
    """A dense [B, L, L] self-attention mask that allows no key after its query (`SegmentMask.dense()`,
    what `TextModel.decode` hands its layers): CPU attention then skips the keys past each block of
    queries (`layers.attention(causal=True)`)."""

    dense: jax.Array


class DecoderLayer(nn.Module):
    """x += Out(Attn(RoPE(QKNorm(QKV(RMS(x)))))); x += Down(silu(Gate(RMS(x))) * Up(RMS(x)))."""

    cfg: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    decode_block: int = 0
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(self, x, positions, mask, cache_index, kv_cache):
        """x [B, L, D] float32 residual stream; positions [B, L]; mask [B, L, S] bool, or a SegmentMask
        or CausalMask (no cache); kv_cache None or (k, v) [B, S, KV, hd], written at `cache_index` (see write_cache).

        Returns (x, (k, v)): the K/V of these L tokens (no cache) or the updated cache. K/V are
        cached after QK-norm and RoPE (spec 6.5).
        """
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dkw = dict(kw, kernel_layout=self.kernel_layout)
        h = RMSNorm(c.norm_eps, name="attn_norm", **kw)(x)
        q = Dense((c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), name="q", **dkw)(h)
        k = Dense((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k", **dkw)(h)
        v = Dense((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v", **dkw)(h)
        q = RMSNorm(c.norm_eps, axis_name="head_dim", name="q_norm", **kw)(q)
        k = RMSNorm(c.norm_eps, axis_name="head_dim", name="k_norm", **kw)(k)
        q = constrain(rope(q, positions, c.rope_theta), ("act_batch", "act_length", "act_heads", None))
        k = constrain(rope(k, positions, c.rope_theta), ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
        if kv_cache is None:
            keys, values = k, v
        else:
            keys, values = (write_cache(c_, new, cache_index) for c_, new in zip(kv_cache, (k, v)))
        a = self._attend(q, keys, values, mask, kv_cache is not None)
        a = constrain(a, ("act_batch", "act_length", "act_heads", None))
        x = x + Dense((c.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, name="out",
                      out_dtype=jnp.float32, **dkw)(a)
        x = constrain(x, ACT)
        h = RMSNorm(c.norm_eps, name="ffn_norm", **kw)(x)
        # The official fused `up` is value rows then gate rows (spec trap 4); we keep them apart so
        # tensor parallelism shards both the same way.
        up = Dense((c.mlp_size,), ("embed", "mlp"), name="up", **dkw)(h)
        gate = Dense((c.mlp_size,), ("embed", "mlp"), name="gate", **dkw)(h)
        h = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        x = x + Dense((c.hidden_size,), ("mlp", "embed"), name="down", out_dtype=jnp.float32, **dkw)(h)
        return constrain(x, ACT), (keys, values)

    def _attend(self, q, k, v, mask, cached: bool):
        """The XLA path, or the splash kernel for a full sequence with a SegmentMask."""
        causal = isinstance(mask, (SegmentMask, CausalMask))  # no key after its query
        if isinstance(mask, SegmentMask):
            if cached:
                raise ValueError("a SegmentMask describes a full sequence; a decode step over a KV cache "
                                 "takes the boolean mask [B, L, cache slots] (text.causal_mask)")
            if self.attention_impl == "splash":
                from .splash import splash_attention
                return splash_attention(q, k, v, mask.segment_ids, causal=True, dtype=self.dtype)
            mask = mask.dense()
        elif isinstance(mask, CausalMask):
            mask = mask.dense
        elif self.attention_impl == "splash" and not cached:
            raise ValueError("attention_impl='splash' needs the attention mask as "
                             "text.SegmentMask(segment_ids [B, L]), not a dense [B, L, S] mask: pass "
                             "SegmentMask(attention_mask.astype(jnp.int32)) for left-padded prompts, or "
                             "the batch's segment_ids for packed rows")
        return attention(q, k, v, mask, self.dtype, kv_cache=cached, decode_block=self.decode_block, causal=causal)


def table_bits(param_dtype, kernel_layout: str) -> bool:
    """Whether the embedding tables are stored as their uint16 bits: in the CPU inference layout
    (`kernel_layout` "out_in") of a 16-bit float model. XLA:CPU runs a bf16 gather on a float32 copy of
    its whole operand, and the decode loop hoists that convert out of the loop: every `generate` call
    converted the 151,936 x 2,048 table (1.2 GB written, ~0.23 s); a uint16 gather reads it in place."""
    d = jnp.dtype(param_dtype)
    return kernel_layout == "out_in" and d.itemsize == 2 and jnp.issubdtype(d, jnp.floating)


def write_cache(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """new [B, L, KV, hd] written into cache [B, S, KV, hd] (or flat [B, S, KV * hd], or an int8
    `QuantizedKV`) at slot `index`: one int for every row (generate's batch, whose rows share one
    length), or an int array [B] with one slot per row (the serving engine's decode slots, each at its
    own length; slots past S are dropped)."""
    if isinstance(cache, QuantizedKV):  # an int8 cache: the new tokens quantized, codes and scales written
        return QuantizedKV(*(write_cache(c, n, index) for c, n in zip(cache, quantize_kv(new))))
    new = new.astype(cache.dtype).reshape(new.shape[:2] + cache.shape[2:])  # a flat cache: [B, L, KV * hd]
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, index) + (0,) * (cache.ndim - 2))
    rows = jnp.arange(cache.shape[0])[:, None]
    cols = jnp.asarray(index)[:, None] + jnp.arange(new.shape[1])[None, :]
    return cache.at[rows, cols].set(new, mode="drop")


def causal_mask(kv_valid: jax.Array, q_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """[B, S] valid key slots -> [B, q_len, S] mask: query i sits in slot q_offset + i (causal)."""
    s = kv_valid.shape[-1]
    q_slot = jnp.arange(q_len)[:, None] + q_offset
    causal = jnp.arange(s)[None, :] <= q_slot
    return jnp.logical_and(causal[None], kv_valid[:, None, :].astype(bool))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """pos = max(cumsum(mask) - 1, 0): left padding does not shift real tokens (spec 6.3)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class TextModel(nn.Module):
    """Embedding, scanned decoder layers, final norm and lm_head."""

    cfg: TextConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    scan_layers: bool = True
    decode_block: int = 0
    kernel_layout: str = "in_out"

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init, table = nn.initializers.normal(1.0), self.param_dtype
        if table_bits(self.param_dtype, self.kernel_layout):  # the same draw, stored as its bits
            draw, table = init, jnp.uint16
            init = lambda key, shape, _: jax.lax.bitcast_convert_type(draw(key, shape, self.param_dtype), table)
        self.embedding = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
                                    (c.vocab_size, c.hidden_size), table)
        self.new_embedding = self.param("new_embedding",
                                        nn.with_logical_partitioning(init, (None, "embed")),
                                        (c.additional_vocab_size, c.hidden_size), table)
        if self.scan_layers:
            stack = stack_layers(DecoderLayer, c.n_layers, remat_policy=self.remat_policy,
                                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))
            self.layers = stack(c, attention_impl=self.attention_impl, kernel_layout=self.kernel_layout,
                                name="layers", **kw)
        else:  # params text/layers_0 ... layers_{n-1}: each layer reads its own buffers in place
            layer = remat_layer(DecoderLayer, self.remat_policy)
            self.layers = [layer(c, attention_impl=self.attention_impl, decode_block=self.decode_block,
                                 kernel_layout=self.kernel_layout, **kw)
                           for _ in range(c.n_layers)]
        self.ln_f = RMSNorm(c.norm_eps, **kw)
        self.lm_head = Dense((c.vocab_size,), ("embed", "vocab"), out_dtype=jnp.float32,
                             kernel_layout=self.kernel_layout, **kw)

    def embed(self, ids: jax.Array) -> jax.Array:
        """Token embeddings (float32 residual stream); -1 (padding) reads row 0 like the official model."""
        c = self.cfg
        ids = jnp.where(ids < 0, 0, ids)
        base = jnp.take(self.embedding, ids, axis=0, mode="clip")           # ids past the table: its last row
        extra = jnp.take(self.new_embedding, ids - c.vocab_size, axis=0, mode="clip")  # ids below: its first
        if base.dtype == jnp.uint16:  # the tables' bits (`table_bits`): the rows as floats
            base, extra = (jax.lax.bitcast_convert_type(a, self.param_dtype) for a in (base, extra))
        x = jnp.where((ids >= c.vocab_size)[..., None], extra, base).astype(jnp.float32)
        return constrain(x, ACT)

    def decode(self, x, positions, mask, cache_index=0, kv_cache=None):
        """Run all layers. mask: [B, L, S] bool or a SegmentMask (no cache).

        Scanned layout: no cache; returns (hidden, (k, v)) with K/V stacked [layers, B, L, KV, hd].
        Per-layer layout (`scan_layers=False`): kv_cache None or one (k, v) [B, S, KV, hd] per layer,
        written at `cache_index` (an int, or [B] slots; see write_cache); returns (hidden, one (k, v)
        per layer): the prompt's K/V, or the updated caches.
        """
        if isinstance(mask, SegmentMask) and self.attention_impl != "splash" and kv_cache is None:
            mask = CausalMask(mask.dense())  # once for all layers, not inside the scanned body
        if self.scan_layers:
            if kv_cache is not None:
                raise ValueError("decoding with a KV cache needs the per-layer layout: "
                                 "config.replace(scan_layers=False) and inference.prepare_params(params)")
            x, kv = self.layers(x, positions, mask, cache_index, None)
            return self.ln_f(x), kv
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, positions, mask, cache_index, None if kv_cache is None else kv_cache[i])
            kvs.append(kv)
        return self.ln_f(x), tuple(kvs)

    def logits(self, h: jax.Array) -> jax.Array:
        return constrain(self.lm_head(h), ("act_batch", "act_length", "act_vocab"))

    def __call__(self, ids, positions, mask):
        h, _ = self.decode(self.embed(ids), positions, mask)
        return self.logits(h)
