"""The whole jina-vlm model as one Flax Linen module, with the official processor's input conventions.

    logits = JinaVLM(cfg).apply({"params": params}, input_ids, images, image_masks, image_input_idx)

input_ids int [B, L] (-1 = padding); images float32 [B, T, 729, 588] (a crop of all -1 is padding);
image_masks [B, T, 729]; image_input_idx int [B, T, 196] (negative = unused); attention_mask
defaults to input_ids != -1 and positions are cumsum(mask) - 1 (spec 6.3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .config import JinaVLMConfig
from .connector import Connector
from .layers import dtype_of
from .text import SegmentMask, TextModel, positions_from_mask
from .vision import VisionTower


class InputError(ValueError):
    """Model inputs of the wrong rank, dtype or range (the message names the input and the problem)."""


class JinaVLM(nn.Module):
    """jina-vlm: SigLIP2 ViT -> 2x2 attention-pooling connector -> Qwen3 decoder."""

    config: JinaVLMConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        self.vision = VisionTower(c.vision, remat_policy=c.remat_policy, attention_impl=c.attention_impl, **kw)
        self.connector = Connector(c.connector, c.vision.patches_per_side, c.text.hidden_size, **kw)
        self.text = TextModel(c.text, remat_policy=c.remat_policy, attention_impl=c.attention_impl,
                              scan_layers=c.scan_layers, decode_block=c.decode_block, kernel_layout=c.kernel_layout,
                              **kw)

    # ---------------------------------------------------------------- vision side
    def vision_features(self, images: jax.Array) -> jax.Array:
        """[B, T, P, 588] -> [B, T, P, 2*d_vision]: the selected ViT layers concatenated (spec 3.5).

        Features of padding crops (every value exactly -1 in the float32 input; spec 3.1 and trap 14)
        are multiplied by 0.
        """
        b, t, p, d = images.shape
        valid = jnp.logical_not(jnp.all(images.astype(jnp.float32) == -1.0, axis=(2, 3)))
        feats = self.vision(images.reshape(b * t, p, d))
        feats = feats.reshape(b, t, p, -1)
        return feats * valid[:, :, None, None].astype(feats.dtype)

    def encode_images(self, images: jax.Array, image_masks: jax.Array) -> jax.Array:
        """[B, T, P, 588], [B, T, P] -> [B, T, tokens_per_crop, d_text] (after the connector)."""
        return self.connector(self.vision_features(images), image_masks)

    # ---------------------------------------------------------------- text side
    def embed_inputs(self, input_ids, images=None, image_masks=None, image_input_idx=None) -> jax.Array:
        """Token embeddings with image features scatter-**added** at image_input_idx (spec 6.2, trap 6).

        One vectorised scatter over every pooled feature of every crop; negative indices (unused
        windows, whatever their value: spec 9.8 and trap 19) are dropped.
        """
        x = self.text.embed(input_ids)
        if images is None:
            return x
        b = input_ids.shape[0]
        feats = self.encode_images(images, image_masks)
        return merge_image_features(x, feats.reshape(b, -1, feats.shape[-1]), image_input_idx.reshape(b, -1))

    def __call__(self, input_ids, images=None, image_masks=None, image_input_idx=None,
                 attention_mask=None):
        """Logits [B, L, vocab] for every position (no cache)."""
        check_inputs(self.config, input_ids, images, image_masks, image_input_idx, attention_mask)
        if attention_mask is None:
            attention_mask = input_ids != -1
        x = self.embed_inputs(input_ids, images, image_masks, image_input_idx)
        positions = positions_from_mask(attention_mask)
        h, _ = self.text.decode(x, positions, prompt_mask(attention_mask))
        return self.text.logits(h)

    # ---------------------------------------------------------------- building blocks for generation
    def decode_hidden(self, x, positions, mask, cache_index=0, kv_cache=None):
        """Decoder over embeddings x [B, L, D]: returns (final-norm hidden, (k, v) or updated caches).

        mask: [B, L, S] bool, or a `text.SegmentMask` for a full sequence (`prompt_mask`; required by
        splash). A KV cache (one (k, v) [B, S, KV, hd] per layer) needs `scan_layers=False`, the
        layout of `inference.prepare_params`; see `TextModel.decode`."""
        return self.text.decode(x, positions, mask, cache_index, kv_cache)

    def logits_from_hidden(self, h):
        return self.text.logits(h)

    def embed_tokens(self, ids):
        return self.text.embed(ids)


def merge_image_features(x: jax.Array, features: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L, D] with features [B, N, D] scatter-**added** at positions [B, N] (spec 6.2, trap 6).

    Negative positions (unused windows, whatever their value: spec 9.8 and trap 19) are dropped.
    """
    l = x.shape[1]
    idx = jnp.where(positions < 0, l, positions)  # l is out of bounds -> dropped
    rows = jnp.arange(x.shape[0])[:, None]
    return x.at[rows, idx].add(features.astype(x.dtype), mode="drop")


def prompt_mask(attention_mask: jax.Array) -> SegmentMask:
    """The self-attention mask of a (left-padded) prompt [B, L]: causal among its real tokens.

    Given as a `SegmentMask`, which the splash kernel takes directly and the XLA path expands once to
    the dense [B, L, L] mask (`TextModel.decode`)."""
    return SegmentMask(attention_mask.astype(jnp.int32))


# -------------------------------------------------------------------- params and input checks

def dummy_inputs(config: JinaVLMConfig, batch: int = 1, crops: int = 1, length: int = 8):
    """Smallest inputs that touch every parameter (used for init and eval_shape)."""
    v = config.vision
    return dict(
        input_ids=jnp.zeros((batch, length), jnp.int32),
        images=jnp.zeros((batch, crops, v.n_patches, v.patch_dim), jnp.float32),
        image_masks=jnp.ones((batch, crops, v.n_patches), jnp.float32),
        image_input_idx=jnp.full((batch, crops, tokens_per_crop(config)), -1, jnp.int32),
    )


def tokens_per_crop(config: JinaVLMConfig) -> int:
    side = config.vision.patches_per_side
    return (-(-side // config.connector.pooling_h)) * (-(-side // config.connector.pooling_w))


def init_params(config: JinaVLMConfig, rng: jax.Array | int = 0):
    """Random params (a plain nested dict, logical-axis metadata stripped)."""
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    variables = jax.jit(JinaVLM(config).init)(rng, **dummy_inputs(config))
    return nn.unbox(variables["params"])


def abstract_params(config: JinaVLMConfig, boxed: bool = False):
    """ShapeDtypeStruct pytree of the params, nothing materialised. boxed=True keeps the logical axes."""
    variables = jax.eval_shape(lambda r: JinaVLM(config).init(r, **dummy_inputs(config)), jax.random.key(0))
    return variables["params"] if boxed else nn.unbox(variables["params"])


def kernel_permutations(config: JinaVLMConfig, kernel_layout: str) -> dict:
    """For each param of `config` (stored in `config.kernel_layout`): the axes permutation that stores it
    in `kernel_layout` (`JinaVLMConfig.kernel_layout`), or None where the two layouts agree. Read from
    the params' logical axis names, so it holds for the scanned and the per-layer layouts alike."""
    src = abstract_params(config, boxed=True)
    dst = abstract_params(config.replace(kernel_layout=kernel_layout), boxed=True)

    def perm(a, b):
        a, b = tuple(getattr(a, "names", ())), tuple(getattr(b, "names", ()))
        if a == b:
            return None
        if len(set(a)) != len(a) or sorted(a, key=str) != sorted(b, key=str):
            raise ValueError(f"cannot map the axes {a} onto {b}")
        return tuple(a.index(n) for n in b)
    return jax.tree_util.tree_map(perm, src, dst, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _is_concrete(x) -> bool:
    return isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer))


def check_inputs(config: JinaVLMConfig, input_ids, images=None, image_masks=None, image_input_idx=None,
                 attention_mask=None) -> None:
    """Raise InputError naming the input for wrong ranks, dtypes or shapes; for concrete (non-traced)
    inputs also check value ranges (token ids, image_input_idx inside the sequence)."""
    v = config.vision

    def need(cond, msg):
        if not cond:
            raise InputError(msg)

    need(hasattr(input_ids, "shape") and input_ids.ndim == 2,
         f"input_ids must be an int array [batch, length], got shape {getattr(input_ids, 'shape', None)}")
    need(jnp.issubdtype(input_ids.dtype, jnp.integer), f"input_ids must be integers, got {input_ids.dtype}")
    b, l = input_ids.shape
    if attention_mask is not None:
        need(attention_mask.shape == (b, l),
             f"attention_mask shape {attention_mask.shape} != input_ids shape {(b, l)}")
    given = [x is not None for x in (images, image_masks, image_input_idx)]
    need(all(given) or not any(given),
         "images, image_masks and image_input_idx must be given together (or all None for text only)")
    if images is not None:
        need(images.ndim == 4 and images.shape[0] == b and images.shape[2:] == (v.n_patches, v.patch_dim),
             f"images must be float [batch={b}, crops, {v.n_patches}, {v.patch_dim}], got {images.shape}")
        need(jnp.issubdtype(images.dtype, jnp.floating), f"images must be floating point, got {images.dtype}")
        t = images.shape[1]
        need(image_masks.shape == (b, t, v.n_patches),
             f"image_masks shape {image_masks.shape} != {(b, t, v.n_patches)} (batch, crops, patches)")
        n_tok = tokens_per_crop(config)
        need(image_input_idx.shape == (b, t, n_tok),
             f"image_input_idx shape {image_input_idx.shape} != {(b, t, n_tok)} (batch, crops, pooled tokens)")
        need(jnp.issubdtype(image_input_idx.dtype, jnp.integer),
             f"image_input_idx must be integers, got {image_input_idx.dtype}")
        if _is_concrete(image_input_idx):
            mx = int(np.max(np.asarray(image_input_idx), initial=-1))
            need(mx < l, f"image_input_idx points at position {mx}, past the sequence length {l}: the image "
                         "token block does not fit the prompt (was the prompt truncated?)")
    if _is_concrete(input_ids):
        ids = np.asarray(input_ids)
        hi, lo = int(ids.max(initial=0)), int(ids.min(initial=0))
        rows = config.text.embedding_rows
        need(lo >= -1 and hi < rows, f"input_ids hold values in [{lo}, {hi}], outside [-1, {rows - 1}] "
                                     f"(-1 = padding; the embedding table has {rows} rows)")
