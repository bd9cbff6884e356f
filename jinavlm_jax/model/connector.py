"""The vision-language connector (spec section 4): pad embeddings, 2x2 attention-meanq pooling, SwiGLU.

The pooling is vectorised (STYLE 6): one reshape cuts every crop of every image into 2x2 windows,
and one batched attention with the windows' mean as the single query pools them all.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from .config import ConnectorConfig
from .layers import F32, Dense, Dtype, attention, constrain


def to_windows(x: jax.Array, side: int, ph: int = 2, pw: int = 2) -> jax.Array:
    """[B, T, side*side, C] -> [B*T*(s/ph)*(s/pw), ph*pw, C] windows, zero-padding the grid to a multiple.

    Window (h, w) covers patch rows ph*h.. and cols pw*w..; members are ordered top-left, top-right,
    bottom-left, bottom-right; windows crop-major, then h, then w (spec 4.3). The zero padding is
    applied after the pad embeddings (spec trap 8) so padded cells stay exactly 0.
    """
    b, t, p, ch = x.shape
    x = x.reshape(b, t, side, side, ch)
    sh, sw = -(-side // ph) * ph, -(-side // pw) * pw
    x = jnp.pad(x, ((0, 0), (0, 0), (0, sh - side), (0, sw - side), (0, 0)))
    x = x.reshape(b, t, sh // ph, ph, sw // pw, pw, ch).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b * t * (sh // ph) * (sw // pw), ph * pw, ch)


class Connector(nn.Module):
    """[B, T, P, C_in] ViT features + [B, T, P] masks -> [B, T, tokens_per_crop, out_size]."""

    cfg: ConnectorConfig
    patches_per_side: int
    out_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: jax.Array, masks: jax.Array) -> jax.Array:
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t, p, ch = feats.shape
        pad_embed = self.param("pad_embed", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                         (None, "embed")),
                               (2, ch), self.param_dtype).astype(F32)
        # pad_and_partial_pad (spec 4.1, trap 3): mask 0 -> pad_embed[0]; 0 < m < 1 or m == -1 ->
        # pad_embed[1]. Summed in float32, cast back to the feature dtype.
        m = masks.astype(F32)[..., None]
        full = (m == 0).astype(F32)
        partial = jnp.logical_and(m < 1, m != 0).astype(F32)
        x = (feats.astype(F32) + full * pad_embed[0] + partial * pad_embed[1]).astype(self.dtype)

        win = to_windows(x, self.patches_per_side, c.pooling_h, c.pooling_w)  # [N, 4, C]
        win = constrain(win, ("act_batch", None, "act_embed"))
        # Mean over the 4 members, zero padding included (divisor always 4, spec trap 7).
        query = win.astype(F32).mean(axis=1, keepdims=True).astype(self.dtype)
        axes = ("embed", "heads", "head_dim")
        q = Dense((c.pool_heads, c.pool_head_dim), axes, use_bias=True, name="q", **kw)(query)
        k = Dense((c.pool_heads, c.pool_head_dim), axes, use_bias=True, name="k", **kw)(win)
        v = Dense((c.pool_heads, c.pool_head_dim), axes, use_bias=True, name="v", **kw)(win)
        # No mask: zero-padded members are real keys (spec trap 7).
        o = attention(q, k, v, None, self.dtype)  # [N, 1, H, hd]
        pooled = Dense((c.pool_heads * c.pool_head_dim,), ("heads", "head_dim", "embed"), in_dims=2,
                       use_bias=True, name="out", **kw)(o)
        pooled = pooled.reshape(b, t, -1, pooled.shape[-1])
        pooled = constrain(pooled, ("act_batch", None, "act_length", "act_embed"))

        # SwiGLU projector; the official fused `up` holds value rows first, gate rows second (trap 4).
        value = Dense((c.projector_size,), ("embed", "mlp"), name="proj_value", **kw)(pooled)
        gate = Dense((c.projector_size,), ("embed", "mlp"), name="proj_gate", **kw)(pooled)
        h = constrain(jax.nn.silu(gate) * value, ("act_batch", None, "act_length", "act_mlp"))
        out = Dense((self.out_size,), ("mlp", "embed"), name="proj_down", out_dtype=jnp.float32, **kw)(h)
        return constrain(out, ("act_batch", None, "act_length", "act_embed"))
