"""SigLIP2-So400M/14 vision tower in the official layout (spec sections 1.1 and 3).

Inputs are pre-patchified crops `[N, 729, 588]` ((dy, dx, c)-ordered 588-vectors, spec trap 9), so the
patch embedding is a Linear. Only the blocks the connector reads are run (0..24 of 27 for the
released model); the remaining blocks and the post-norm are kept as parameters so checkpoints
round-trip, and are created at `init`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .config import VisionConfig
from .layers import Dense, Dtype, LayerNorm, attention, constrain, stack_layers

ACT = ("act_batch", "act_length", "act_embed")


def sincos2d_positions(n_patches: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings [n_patches, dim] for a square patch grid (row-major).

    Each quarter of `dim` holds sin(x w), cos(x w), sin(y w), cos(y w) over `dim / 4` frequencies
    w = temperature^(-i / (dim / 4)), as in MAE and big_vision's `posemb_sincos_2d`. An initial value for
    the learned `pos_embed` when training from scratch (the recipe key `model.pos_embed_init: sincos2d`):
    every patch starts with its row and column, which the normal(0.02) default has to learn.
    """
    side = int(round(n_patches ** 0.5))
    if side * side != n_patches:
        raise ValueError(f"sincos2d positions need a square patch grid, got {n_patches} patches")
    if dim % 4:
        raise ValueError(f"sincos2d positions need a hidden size divisible by 4, got {dim}")
    omega = temperature ** -(np.arange(dim // 4) / (dim // 4))
    y, x = np.mgrid[:side, :side]
    angles = [c.reshape(-1, 1) * omega[None] for c in (x, y)]
    return np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1).astype(np.float32)


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x += Attn(LN1(x)); x += MLP(LN2(x)) (tanh-GELU MLP, biases everywhere).

    Scanned: the carry is (x, kept) where `kept` holds the outputs of the selected feature layers
    that are not the last one run; `layer_idx` (scanned) says which block this is.
    """

    cfg: VisionConfig
    keep: tuple[int, ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, carry, layer_idx):
        x, kept = carry
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(c.norm_eps, name="attn_norm", **kw)(x)
        qkv_axes = ("embed", "heads", "head_dim")
        q = Dense((c.n_heads, c.head_dim), qkv_axes, use_bias=True, name="q", **kw)(h)
        k = Dense((c.n_heads, c.head_dim), qkv_axes, use_bias=True, name="k", **kw)(h)
        v = Dense((c.n_heads, c.head_dim), qkv_axes, use_bias=True, name="v", **kw)(h)
        if self.attention_impl == "splash":
            from .splash import splash_attention
            a = splash_attention(q, k, v, None, causal=False, dtype=self.dtype)
        else:
            a = attention(q, k, v, None, self.dtype)
        a = constrain(a, ("act_batch", "act_length", "act_heads", None))
        x = x + Dense((c.hidden_size,), ("heads", "head_dim", "embed"), in_dims=2, use_bias=True,
                      name="out", out_dtype=jnp.float32, **kw)(a)
        h = LayerNorm(c.norm_eps, name="ffn_norm", **kw)(x)
        h = Dense((c.mlp_size,), ("embed", "mlp"), use_bias=True, name="up", **kw)(h)
        h = constrain(jax.nn.gelu(h, approximate=True), ("act_batch", "act_length", "act_mlp"))
        x = x + Dense((c.hidden_size,), ("mlp", "embed"), use_bias=True, name="down", out_dtype=jnp.float32,
                      **kw)(h)
        x = constrain(x, ACT)
        kept = tuple(jnp.where(layer_idx == i, x, f) for i, f in zip(self.keep, kept))
        return (x, kept), None


class VisionTower(nn.Module):
    """Patch embedding + positions + the scanned blocks; returns the selected feature layers."""

    cfg: VisionConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        """patches [N, P, patch_dim] -> features [N, P, len(vit_layers) * hidden] (layer order kept)."""
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense((c.hidden_size,), ("patch", "embed"), use_bias=True, name="patch_embed",
                  out_dtype=jnp.float32, **kw)(patches)
        pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                   ("positions", "embed")),
                         (c.n_patches, c.hidden_size), self.param_dtype)
        x = constrain(x + pos.astype(jnp.float32)[None], ACT)  # float32 residual stream

        feature_layers, n_run = c.feature_layers, c.n_run_layers
        last = n_run - 1
        keep = tuple(sorted({i for i in feature_layers if i < last}))
        blocks = stack_layers(VisionBlock, n_run, remat_policy=self.remat_policy, in_axes=(0,))
        kept0 = tuple(jnp.zeros_like(x) for _ in keep)
        (x, kept), _ = blocks(c, keep, attention_impl=self.attention_impl, name="layers", **kw)(
            (x, kept0), jnp.arange(n_run))

        post = LayerNorm(c.norm_eps, name="post_norm", **kw) if c.post_lnorm else None
        n_unused = c.n_layers - n_run
        if self.is_initializing() and n_unused:
            # Created for round trips (spec 3, last line); never on the forward path.
            unused = stack_layers(VisionBlock, n_unused, remat_policy="none", in_axes=(0,))
            unused(c, (), name="unused_layers", **kw)((x, ()), jnp.arange(n_unused))
        if post is not None and (self.is_initializing() or c.n_layers in feature_layers):
            post_out = post(x)
        by_index = dict(zip(keep, kept))
        by_index[last] = x
        if c.n_layers in feature_layers:
            by_index[c.n_layers] = post_out
        return jnp.concatenate([by_index[i] for i in feature_layers], axis=-1)
