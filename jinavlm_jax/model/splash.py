"""Splash attention: the Pallas TPU flash-attention kernel with block-sparse masks, for both towers.

    o = splash_attention(q, k, v, segment_ids, causal=True, dtype=jnp.bfloat16)

q [B, L, H, hd], k/v [B, L, KV, hd] (H a multiple of KV: the kernel maps query head h to KV head
h // (H / KV) itself, so K/V are never repeated), segment_ids [B, L] int or None -> [B, L, H, hd].
Selected by `JinaVLMConfig.attention_impl = "splash"`; the XLA path (`layers.attention`) is the
reference and stays the default.

Masks. The decoder is causal (`CausalMask`, one per head in a `MultiHeadMask`) and padding goes in
as segment ids: a token attends only to tokens with the same id, so real tokens (id >= 1, or one id
per packed sample) never see padding (id 0). Padding rows attend to other padding instead of to
nothing, so no row of the kernel's softmax is empty; their outputs are unspecified (the XLA path
gives them a uniform average) and nothing reads them. The ViT has no mask (`FullMask`).

Shapes. The kernel needs the sequence in blocks of a multiple of 128: L is padded at the end up to a
multiple of 128 with segment id 0 (729 ViT patches -> 768), and the blocks are the largest of 512,
384, 256, 128 dividing it. q is scaled by hd^-0.5 before the kernel, as in the XLA path (spec 6.4);
scores, softmax and accumulation are float32 inside the kernel.

Sharding. Pallas kernels are not partitioned by XLA, so under a mesh (`sharding.use_mesh`) the
kernel runs in `jax.shard_map`: batch and heads over the mesh axes the rule table gives `act_batch`
and `act_heads` (`data`, `fsdp` and `tensor` in `sharding.LOGICAL_RULES`), each device running the kernel on its own shard (attention needs no communication when
whole heads and whole sequences are local). Mesh axes that do not divide the batch or the heads are
left out (that dimension is then replicated); when `tensor` divides the query heads but not the KV
heads, K/V are repeated to one head per query head first.

Off TPU (CPU tests) the kernel runs in Pallas interpret mode: slow but the same arithmetic.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128                    # the kernel's KV blocks are multiples of the TPU lane width
BLOCK_CHOICES = (512, 384, 256, 128)


def rule_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes the active rule table (the one `sharding.use_mesh` sets) maps the logical axis
    `logical` to; none without a table (the dimension is then not split)."""
    from flax import linen as nn
    ax = nn.logical_to_mesh_axes((logical,), nn.get_logical_axis_rules())[0]
    return () if ax is None else (ax,) if isinstance(ax, str) else tuple(ax)


def padded_length(length: int) -> int:
    """The sequence length the kernel runs at: `length` rounded up to a multiple of 128."""
    return -(-length // LANES) * LANES


def block_size(length: int) -> int:
    """The largest supported block (512, 384, 256 or 128) dividing the padded length."""
    lp = padded_length(length)
    return next(b for b in BLOCK_CHOICES if lp % b == 0)


def _kernel(length: int, heads: int, causal: bool, interpret: bool):
    """The splash kernel for one example: q [heads, length, hd], k/v [kv_heads, length, hd].

    Built inside the trace that uses it (its block tables become constants of that trace); the
    numpy work of the mask is cached by the kernel library per (mask, block shape).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = block_size(length)
    one = sa.CausalMask((length, length)) if causal else sa.FullMask((length, length))
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b,
                           block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
                           use_fused_bwd_kernel=True)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _current_mesh():
    """The abstract mesh set by `sharding.use_mesh` (None outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def _on_tpu(mesh) -> bool:
    if mesh is not None:
        return mesh.abstract_device.platform == "tpu"
    return jax.default_backend() == "tpu"


def _axes_dividing(mesh, names, size: int) -> tuple[str, ...]:
    """The mesh axes among `names` (in order) whose product divides `size`, dropping from the end."""
    axes = [a for a in names if a in mesh.axis_names and mesh.shape[a] > 1]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return tuple(axes)


def _local_attention(q, k, v, seg, *, causal: bool, interpret: bool):
    """Head-major q [b, H, L, hd], k/v [b, KV, L, hd], seg [b, L] int32 or None -> [b, H, L, hd]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _kernel(q.shape[2], q.shape[1], causal, interpret)
    if seg is None:
        return jax.vmap(kernel)(q, k, v)
    return jax.vmap(kernel, in_axes=(0, 0, 0, SegmentIds(0, 0)))(q, k, v, SegmentIds(seg, seg))


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
                     causal: bool, dtype) -> jax.Array:
    """Attention with the splash kernel: same inputs, scaling and output as `layers.attention`.

    q [B, L, H, hd], k/v [B, L, KV, hd]; segment_ids [B, L] int (0 = padding) or None (all one
    segment); causal: query i attends to keys j <= i (within its segment). Returns [B, L, H, hd] in
    `dtype`.
    """
    bsz, length, heads, hd = q.shape
    kv_heads = k.shape[2]
    if k.shape != (bsz, length, kv_heads, hd) or v.shape != k.shape or heads % kv_heads:
        raise ValueError(f"splash attention: q {q.shape} and k/v {k.shape}/{v.shape} must be [B, L, H, hd] and "
                         f"[B, L, KV, hd] with the same sequence (no KV cache) and H a multiple of KV")
    q = (q * jnp.asarray(hd ** -0.5, q.dtype)).astype(dtype)
    k, v = k.astype(dtype), v.astype(dtype)
    lp = padded_length(length)
    if segment_ids is None and lp != length:
        segment_ids = jnp.ones((bsz, length), jnp.int32)
    if segment_ids is not None:
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, lp - length)))
    pad = ((0, 0), (0, lp - length), (0, 0), (0, 0))
    # Head-major for the kernel: [B, heads, L, hd].
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v))

    mesh = _current_mesh()
    interpret = not _on_tpu(mesh)
    local = functools.partial(_local_attention, causal=causal, interpret=interpret)
    if mesh is None or mesh.size == 1:
        o = local(q, k, v, segment_ids)
    else:
        # Batch and heads are split as the rule table splits the attention activations.
        batch_axes = _axes_dividing(mesh, rule_axes("act_batch"), bsz)
        head_axes = _axes_dividing(mesh, rule_axes("act_heads"), heads)
        if head_axes and kv_heads % math.prod(mesh.shape[a] for a in head_axes):
            # `tensor` splits the query heads but not the KV heads: give each query head its own KV
            # head so every shard holds the KV heads of its query heads.
            k, v = (jnp.repeat(x, heads // kv_heads, axis=1) for x in (k, v))
        b_spec = batch_axes or None
        h_spec = (head_axes[0] if len(head_axes) == 1 else head_axes) if head_axes else None
        qkv_spec = P(b_spec, h_spec, None, None)
        seg_spec = P(b_spec, None)
        if segment_ids is None:
            fn = lambda q, k, v: local(q, k, v, None)
            args, in_specs = (q, k, v), (qkv_spec,) * 3
        else:
            fn = local
            args, in_specs = (q, k, v, segment_ids), (qkv_spec,) * 3 + (seg_spec,)
        o = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(*args)
    return o.transpose(0, 2, 1, 3)[:, :length].astype(dtype)


def attention_flops(length: int, heads: int, head_dim: int, causal: bool) -> float:
    """Forward matmul FLOPs of one example's attention (QK^T and PV), counting only the blocks the
    kernel computes: all of them for a full mask, the diagonal and below for a causal one."""
    lp = padded_length(length)
    n = lp // block_size(length)
    frac = (n * (n + 1) / 2) / (n * n) if causal else 1.0
    return 2 * 2 * heads * head_dim * lp * lp * frac


__all__ = ["attention_flops", "block_size", "padded_length", "splash_attention"]
