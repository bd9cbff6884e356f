"""Shared building blocks: dense layers with logical axes, norms, attention, RoPE, remat and scan.

Numerics (spec 6.4, STYLE 7): matmuls run in the compute dtype and accumulate in float32
(`preferred_element_type`); norms, softmax and RoPE are computed in float32 and cast back. The
residual stream of both towers stays in float32 whatever the compute dtype (as PyTorch autocast does
with float32 params), and logits are float32: with bf16 compute only the matmul inputs are rounded.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
F32 = jnp.float32


def dtype_of(name: str) -> Dtype:
    return jnp.dtype(name)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Annotate an activation with logical axis names (a no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


_FEW_ROWS = 32  # out_in products with at most this many rows keep a unit dim (measured: docs/performance.md)


def matmul(x: jax.Array, kernel: jax.Array, n_contract: int, dtype: Dtype, kernel_layout: str = "in_out"
           ) -> jax.Array:
    """Contract the last `n_contract` dims of x with the kernel's input dims (f32 accumulate).

    `kernel_layout`: "in_out" (kernel [*in, *out], the checkpoint's layout) or "out_in" ([*out, *in], as
    PyTorch's Linear stores it). For "out_in" the kernel is the dot's left operand and the small
    [*out, *rows] result is transposed back: XLA:CPU's GEMM reads a weight stored output-major 1.3-2x
    faster when the rows are few (decode steps; bf16 up to 512 rows), the same from 2,048 rows on
    (docs/performance.md, "Kernel layout"). Inference on CPU uses it (`inference.prepare_params`).

    On CPU an "in_out" product over several leading dims ([B, L, in]) takes them as one ([B * L, in];
    the kernel as it is, which Qwix's interception checks): contracted as 3-D, the backward pass's
    weight gradients made XLA:CPU write transposed 3-D copies of the activations ([B, L, mlp] ->
    [mlp, B, L]) in slow strided loops. A SwiGLU MLP's forward + backward, 2 cores: 48.7 -> 19.4 ms
    at [32, 256, 64 -> 192], 326 -> 232 ms at [2, 512, 1024 -> 3072]; the demo step at 32 x 256 tokens
    440 -> 385-396 ms. Other backends keep the N-d dot (its sharding is the logical axes').

    On CPU a 16-bit matrix-vector product (one row: a batch-1 decode step) is computed as a two-row
    matmul (the row and a zero row): XLA:CPU runs a one-row bfloat16 dot by converting the weights to
    float32 (about 1.5 GB/s of weights at full size), two rows by its bfloat16 GEMM (about 12 GB/s).
    The first row is the same product either way."""
    lead, inner = x.shape[:x.ndim - n_contract], x.shape[x.ndim - n_contract:]
    pad = math.prod(lead) == 1 and jnp.dtype(dtype).itemsize == 2 and target_platform() == "cpu"
    if pad:
        x = jnp.pad(x.reshape((1,) + inner), ((0, 1),) + ((0, 0),) * len(inner))
    kernel = cast_kernel(kernel, dtype)
    if kernel_layout == "out_in":  # a 2-D [out, in] kernel against the rows: XLA:CPU's GEMM path
        out = kernel.shape[:kernel.ndim - n_contract]
        rows = x.shape[:x.ndim - n_contract]
        m, w = math.prod(rows), kernel.reshape(math.prod(out), -1)
        if m <= _FEW_ROWS:  # [out, in] x [m, 1, in] -> [out, m, 1]: 1.2-2x faster than the 2-D form here
            y = jax.lax.dot_general(w, x.astype(dtype).reshape(m, 1, -1), (((1,), (2,)), ((), ())),
                                    preferred_element_type=F32)
            y = jnp.moveaxis(y, 0, -1).reshape(rows + out)
        else:
            y = jax.lax.dot_general(w, x.astype(dtype).reshape(m, -1), (((1,), (1,)), ((), ())),
                                    preferred_element_type=F32)
            y = y.T.reshape(rows + out)
    else:
        rows = x.shape[:x.ndim - n_contract]
        if len(rows) > 1 and target_platform() == "cpu":  # the rows as one: [rows, *in] x [*in, *out]
            x = x.reshape((math.prod(rows),) + inner)
        xc, kc = tuple(range(x.ndim - n_contract, x.ndim)), tuple(range(n_contract))
        y = jax.lax.dot_general(x.astype(dtype), kernel, ((xc, kc), ((), ())), preferred_element_type=F32)
        y = y.reshape(rows + y.shape[x.ndim - n_contract:])
    return y[:1].reshape(lead + y.shape[1:]) if pad else y


_TRACED_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("jinavlm_traced_for", default=None)


def target_platform() -> str:
    """The platform of the program being traced: the one `traced_for` names, else the current mesh's
    devices ("tpu" while `jinavlm aot` compiles for a TPU topology on a CPU host), else JAX's default
    backend. CPU-only formulations (`matmul`'s two rows, `_attention_per_head`) are chosen by it."""
    if (platform := _TRACED_FOR.get()) is not None:
        return platform
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


@contextlib.contextmanager
def traced_for(platform: str) -> Iterator[None]:
    """Trace programs inside as for `platform`. `jinavlm efficiency` counts FLOPs with "tpu": XLA's cost
    analysis counts a loop body once, and on CPU long attention is a loop over heads."""
    token = _TRACED_FOR.set(platform)
    try:
        yield
    finally:
        _TRACED_FOR.reset(token)


_BATCHED_ATTENTION: contextvars.ContextVar[bool] = contextvars.ContextVar("jinavlm_batched_attention", default=False)


@contextlib.contextmanager
def batched_attention() -> Iterator[None]:
    """Trace attention batched over rows and heads inside, however long (train steps: `train.step.loss_sums`).
    Differentiated, `_attention_per_head`'s loop over heads is a scan whose backward slices and stacks
    every head's blocks; the scores it keeps out of memory in inference are saved for the backward
    pass anyway. The batched attention is `_attention_train` (its backward written out). XLA:CPU, 2
    cores: the demo model's step at 32 x 256 tokens with 224-pixel crops 385-396 -> 312-326 ms batched,
    -> 261-263 ms with `_attention_train` (docs/performance.md, "Sixth round")."""
    token = _BATCHED_ATTENTION.set(True)
    try:
        yield
    finally:
        _BATCHED_ATTENTION.reset(token)


def cast_kernel(kernel, dtype: Dtype):
    """The kernel in the compute dtype. An int8 kernel (Qwix's `WithAux(QArray)`, `adapt.quant`) keeps its
    int8 values and gets its scales in `dtype` (Qwix's own `WithAux.astype` cannot re-box a QArray)."""
    if hasattr(kernel, "array") and hasattr(kernel, "replace"):  # Qwix's WithAux(QArray)
        return kernel.replace(array=kernel.array.astype(dtype))
    return kernel.astype(dtype)  # a jax or numpy array


def _transposed(init, shape, perm):
    """An initializer drawing `init` at `shape` and returning it transposed by `perm`."""
    def draw(key, _shape, dtype=F32):
        return jnp.transpose(init(key, shape, dtype), perm)
    return draw


class Dense(nn.Module):
    """A dense layer over the last `in_dims` dims with a multi-dimensional output.

    kernel: [*in_shape, *features] with logical names `axes` (in axes first), bias: [*features];
    with `kernel_layout="out_in"` the kernel is stored [*features, *in_shape] (axes permuted alike).
    The result is in `out_dtype` (default: the compute dtype); layers that feed the float32 residual
    stream or the logits ask for float32 so no bf16 rounding happens there.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int = 1
    use_bias: bool = False
    dtype: Dtype = F32
    param_dtype: Dtype = F32
    out_dtype: Dtype | None = None
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = tuple(x.shape[-self.in_dims:])
        nd = self.in_dims + len(self.features)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=tuple(range(self.in_dims)),
                                                out_axis=tuple(range(self.in_dims, nd)))
        shape, axes = in_shape + tuple(self.features), tuple(self.axes)
        if self.kernel_layout == "out_in":  # the same init, drawn in_out and transposed
            perm = tuple(range(self.in_dims, nd)) + tuple(range(self.in_dims))
            init = _transposed(init, shape, perm)
            shape, axes = tuple(shape[i] for i in perm), tuple(axes[i] for i in perm)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
        y = matmul(x, kernel, self.in_dims, self.dtype, self.kernel_layout)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   self.axes[self.in_dims:]),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(F32)
        return y.astype(self.out_dtype or self.dtype)


class _Norm(nn.Module):
    """What both norms share: epsilon, the logical axis of their [d] weights, dtypes."""

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = F32
    param_dtype: Dtype = F32

    def vector(self, name: str, init, size: int) -> jax.Array:
        return self.param(name, nn.with_logical_partitioning(init, (self.axis_name,)), (size,), self.param_dtype)


class LayerNorm(_Norm):
    """LayerNorm with weight and bias, computed in float32."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.vector("scale", nn.initializers.ones, x.shape[-1])
        bias = self.vector("bias", nn.initializers.zeros, x.shape[-1])
        x32 = x.astype(F32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(F32) + bias.astype(F32)).astype(self.dtype)


class RMSNorm(_Norm):
    """RMSNorm, weight only: w * cast_to_input_dtype(x32 * rsqrt(mean(x32^2) + eps)) (spec 6.4).

    The weight multiplies in the input's dtype (float32 for the residual stream) before the single
    cast to the compute dtype.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.vector("scale", nn.initializers.ones, x.shape[-1])
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, dtype: Dtype,
              kv_cache: bool = False, decode_block: int = 0, causal: bool = False) -> jax.Array:
    """Multi-head attention with grouped KV heads.

    q [B, Lq, H, hd], k/v [B, Lk, KV, hd], mask [B, Lq, Lk] bool (True = may attend) or None.
    Query head h uses KV head h // (H // KV). q is scaled by hd^-0.5 before QK^T (the official eager
    path, spec 6.4); scores and softmax in float32. A fully masked row gives a uniform softmax
    (like the official additive finfo.min bias), never NaN. `kv_cache`: k/v are a decode step's KV
    cache, read in place by one query (`_attention_one_query`); other single queries (the
    connector's pooling over 4 keys) take the matmul path, which XLA:CPU runs ~7x faster there.
    `decode_block` > 0 (with `kv_cache`): attend block by block up to the longest valid row
    (`_attention_blocks`). `causal`: the mask allows no key after its query (a prompt's self-attention,
    `text.CausalMask`); CPU inference then skips the keys past each block of queries.
    """
    b, lq, h, hd = q.shape
    kv = k.shape[2] if len(k.shape) == 4 else k.shape[2] // hd  # a flat cache [B, S, KV * hd]
    q = (q * jnp.asarray(hd ** -0.5, q.dtype)).reshape(b, lq, kv, h // kv, hd)
    if lq == 1 and kv_cache:
        return _attention_one_query(q, k, v, mask, dtype, decode_block).reshape(b, lq, h, hd)
    k, v = dequantize_kv(k), dequantize_kv(v)
    cpu = target_platform() == "cpu"
    if cpu and _BATCHED_ATTENTION.get():
        o = _attention_train(q, k, v, mask, dtype)
    elif cpu and lq * k.shape[1] >= PER_HEAD_SCORES:
        return _attention_per_head(q, k, v, mask, dtype, causal and lq == k.shape[1]).reshape(b, lq, h, hd)
    else:
        o = _attention_forward(q, k, v, mask, dtype)
    return o.reshape(b, lq, h, hd).astype(dtype)


def _attention_forward(q, k, v, mask, dtype):
    """The einsum path: o [B, Lq, KV, G, hd] float32 for q [B, Lq, KV, G, hd] (scaled), k / v
    [B, Lk, KV, hd], mask [B, Lq, Lk] or None."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q.astype(dtype), k.astype(dtype), preferred_element_type=F32)
    p = _masked_softmax(s, mask)
    return jnp.einsum("bkgqs,bskd->bqkgd", p.astype(dtype), v.astype(dtype), preferred_element_type=F32)


def _masked_softmax(s, mask):
    """softmax over the keys of scores s [B, KV, G, Lq, Lk] float32 with mask [B, Lq, Lk] (or None); a fully
    masked row comes out uniform."""
    if mask is not None:
        s = jnp.where(mask[:, None, None, :, :], s, jnp.finfo(F32).min)
    return jax.nn.softmax(s, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_train(q, k, v, mask, dtype):
    """`_attention_forward`'s attention for train steps on CPU (`batched_attention`), heads-major with
    the softmax's backward in FlashAttention's form. q / k / v are transposed once to [B, KV, G, Lq, hd]
    / [B, KV, Lk, hd], so every product of the forward and backward passes has its batch dims leading
    (XLA:CPU transposed the [Lq, Lk] blocks around the einsums otherwise). sum_s(dP * P) is taken as
    sum_d(dO * O), a reduction over head_dim instead of over the keys: autodiff's form (a
    multiply-and-reduce over [B, H, Lq, Lk], which XLA:CPU runs at a few GB/s) was the costliest op of
    the demo step's backward pass."""
    return _attention_train_fwd(q, k, v, mask, dtype)[0]


def _attention_train_fwd(q, k, v, mask, dtype):
    qh, kh, vh = q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = jnp.einsum("bkgqd,bksd->bkgqs", qh.astype(dtype), kh.astype(dtype), preferred_element_type=F32)
    p = _masked_softmax(s, mask)
    oh = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(dtype), vh.astype(dtype), preferred_element_type=F32)
    valid = None if mask is None else mask.any(axis=-1)[:, None, None, :, None]  # rows with an allowed key
    return oh.transpose(0, 3, 1, 2, 4), (qh, kh, vh, valid, p, oh)


def _attention_train_bwd(dtype, res, do):
    qh, kh, vh, valid, p, oh = res
    doh = do.transpose(0, 2, 3, 1, 4)
    dv = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dtype), doh.astype(dtype), preferred_element_type=F32)
    # A masked score is a constant: no gradient reaches q or k through it. In a row with an allowed key
    # its p is exactly 0, and so is its dS = p * (dP - delta); a row with none (uniform p, as autodiff's
    # forward) passes nothing back through its scores: its dO is zeroed for dP and delta only (it still
    # reaches v above). No select over [Lq, Lk].
    if valid is not None:
        doh = jnp.where(valid, doh, 0.0)
    dp = jnp.einsum("bkgqd,bksd->bkgqs", doh.astype(dtype), vh.astype(dtype), preferred_element_type=F32)
    delta = jnp.sum(doh.astype(F32) * oh, axis=-1, keepdims=True)
    ds = (p * (dp - delta)).astype(dtype)
    dq = jnp.einsum("bkgqs,bksd->bkgqd", ds, kh.astype(dtype), preferred_element_type=F32)
    dk = jnp.einsum("bkgqs,bkgqd->bksd", ds, qh.astype(dtype), preferred_element_type=F32)
    return (dq.transpose(0, 3, 1, 2, 4).astype(qh.dtype), dk.transpose(0, 2, 1, 3).astype(kh.dtype),
            dv.transpose(0, 2, 1, 3).astype(vh.dtype), None)


_attention_train.defvjp(_attention_train_fwd, _attention_train_bwd)


PER_HEAD_SCORES = 256 * 256  # Lq x Lk from which XLA:CPU attends one head at a time
QUERY_BLOCK = 256  # queries per block of `_attention_per_head` (measured: docs/performance.md)


def _attention_per_head(q, k, v, mask, dtype, causal: bool = False) -> jax.Array:
    """The einsum path's attention for XLA:CPU, one row's KV head at a time (`lax.map`), its queries
    in blocks of `QUERY_BLOCK`.

    q [B, Lq, KV, G, hd] (scaled), k / v [B, Lk, KV, hd], mask [B, Lq, Lk] or None. Batched over every
    row and head, XLA:CPU writes the [B, H, Lq, Lk] float32 scores to memory and reads them back in
    each pass of the softmax and in the transposes around the second product; one head's [G, 256, Lk]
    block stays in the cache. The softmax's division comes after the second product (on [Lq, hd],
    not [Lq, Lk]). `causal` (Lq == Lk, the mask allows no key after its query): a block of queries
    reads only the keys up to its last query, about half the products of a long prompt. A query
    whose keys are all masked (a left-padded prompt's padding) attends uniformly to the keys its block
    reads. One ViT block's attention over 13 crops x 16 heads of 729 x 729, float32, 2 cores: 1145 ->
    356 ms per block one head at a time (torch's SDPA: 290 ms); the decoder's at 2,048 / 4,096 causal
    prompt tokens: 284 -> 128 / 1118 -> 450 ms per layer with query blocks and the causal skip.
    """
    b, lq, kv, g, hd = q.shape
    lk = k.shape[1]

    def block(qh, kh, vh, m):  # q [G, Bq, hd], k / v [S, hd], m [Bq, S] or None
        s = jnp.einsum("gqd,sd->gqs", qh.astype(dtype), kh.astype(dtype), preferred_element_type=F32)
        if m is not None:
            s = jnp.where(m[None], s, jnp.finfo(F32).min)
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        o = jnp.einsum("gqs,sd->gqd", p.astype(dtype), vh.astype(dtype), preferred_element_type=F32)
        return o / jnp.sum(p, axis=-1, keepdims=True)

    def head(a):  # one row's KV head: q [G, Lq, hd], k / v [Lk, hd]
        qh, kh, vh, i = a
        m = None if mask is None else mask[i // kv]
        out = []
        for lo in range(0, lq, QUERY_BLOCK):
            hi = min(lo + QUERY_BLOCK, lq)
            end = hi if causal else lk
            out.append(block(qh[:, lo:hi], kh[:end], vh[:end], None if m is None else m[lo:hi, :end]))
        return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)

    heads = (q.transpose(0, 2, 3, 1, 4).reshape(b * kv, g, lq, hd), k.transpose(0, 2, 1, 3).reshape(b * kv, lk, hd),
             v.transpose(0, 2, 1, 3).reshape(b * kv, lk, hd), jnp.arange(b * kv))
    o = jax.lax.map(head, heads).reshape(b, kv, g, lq, hd)
    return o.transpose(0, 3, 1, 2, 4).astype(dtype)


def _attention_one_query(q, k, v, mask, dtype, block: int = 0):
    """One query per row (a decode step over a KV cache [B, S, KV, hd]) as multiply-and-sum loops that
    read the cache once in its own layout. As einsums, the batched dots over (B, KV) make XLA
    transpose the whole K and V caches on every step (two copies of the cache per layer), which
    costs more than the attention itself. Same products and float32 sums as the einsum path.
    An int8 cache (QuantizedKV) is read as codes, its per-token scales applied to the sums."""
    q = q[:, 0].astype(dtype).astype(F32)  # [B, KV, G, hd]
    valid = jnp.ones(k.shape[:2], bool) if mask is None else mask[:, 0]  # [B, S]

    def one_pass(q, k, v, valid):
        s = jnp.where(valid[:, :, None, None], _cache_scores(q, k, dtype), jnp.finfo(F32).min)
        return _cache_weighted(jax.nn.softmax(s, axis=1), v, dtype)

    s_len = valid.shape[1]
    if block and s_len > block and s_len % block == 0:
        # Blocks cost more per slot than one pass (measured at full size on XLA:CPU): read the whole
        # cache in one pass once the longest row fills more than 3/4 of it.
        longest = jnp.max(jnp.where(valid, jnp.arange(s_len, dtype=jnp.int32)[None] + 1, 0))
        o = jax.lax.cond(4 * longest > 3 * s_len, one_pass,
                         lambda *a: _attention_blocks(*a, longest, dtype, block), q, k, v, valid)
    else:
        o = one_pass(q, k, v, valid)
    return o[:, None].astype(dtype)


def _cache_scores(q, k, dtype) -> jax.Array:
    """q [B, KV, G, hd] float32 against cached keys [B, S, KV, hd] (or flat [B, S, KV * hd]) -> scores
    [B, S, KV, G] (float32)."""
    if isinstance(k, QuantizedKV):
        return jnp.sum(q[:, None] * k.codes.astype(F32)[:, :, :, None, :], axis=-1) * k.scale[:, :, None, None]
    b, kv, g, hd = q.shape
    s = k.shape[1]
    if _cache_gemm(dtype, k):
        s_ = jnp.einsum("bsx,bxy->bsy", k.astype(dtype).reshape(b, s, kv * hd),
                        _block_diagonal(q.astype(dtype)).transpose(0, 2, 1), preferred_element_type=F32)
        return s_.reshape(b, s, kv, g)
    return jnp.sum(q[:, None] * k.astype(dtype).astype(F32).reshape(b, s, kv, 1, hd), axis=-1)


def _cache_weighted(p, v, dtype) -> jax.Array:
    """Weights p [B, S, KV, G] over cached values [B, S, KV, hd] -> [B, KV, G, hd] (float32 sums; float
    weights rounded to the compute dtype like the einsum path's)."""
    b, s, kv, _ = p.shape
    if isinstance(v, QuantizedKV):
        p, v = p * v.scale[:, :, None, None], v.codes.astype(F32)
    elif _cache_gemm(dtype, v):
        o = jnp.einsum("bsy,bsx->byx", p.astype(dtype).reshape(b, s, -1), v.astype(dtype).reshape(b, s, -1),
                       preferred_element_type=F32)  # [B, KV*G, KV*hd]
        return jnp.diagonal(o.reshape(b, kv, -1, kv, o.shape[-1] // kv), axis1=1, axis2=3).transpose(0, 3, 1, 2)
    else:
        p, v = p.astype(dtype).astype(F32), v.astype(dtype).astype(F32)
    return jnp.sum(p[..., None] * v.reshape(b, s, kv, 1, -1), axis=1)


# XLA:CPU: the one-query attention as batched GEMMs that read the cache [B, S, KV * hd] in place. Every
# KV head's queries are laid out block-diagonally ([B, KV * G, KV * hd], zeros elsewhere): one
# [S, KV * hd] x [KV * hd, KV * G] product per row gives every head's scores, and the weighted sum
# [KV * G, S] x [S, KV * hd] every head against every head's values, of which the diagonal blocks are
# kept. KV times the FLOPs, but the cache is read at GEMM speed: full size, bf16, decode step batch 8
# 627 -> 396 ms, batch 1 268 -> 240 ms. The zeros add exact zeros: the same products and float32 sums.
# For 16-bit caches, and for float32 ones carried flat ([B, S, KV * hd], as the decode loops do on
# CPU: `inference.programs.flat_caches`). Reading a [B, S, KV, hd] float32 cache through the reshape,
# XLA:CPU duplicates the cache's update into the GEMM's operand and copies the loop-carried caches on
# every step (batch-8 step 297 -> 505 ms), so a 4-D float32 cache keeps the multiply-and-sum loops.
def _cache_gemm(dtype, cache) -> bool:
    return target_platform() == "cpu" and (jnp.dtype(dtype).itemsize == 2 or len(cache.shape) == 3)


def _block_diagonal(q) -> jax.Array:
    """q [B, KV, G, hd] -> [B, KV * G, KV * hd]: head k's queries in rows k*G.., columns k*hd.."""
    b, kv, g, hd = q.shape
    eye = jnp.eye(kv, dtype=q.dtype)
    return (q[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(b, kv * g, kv * hd)


def _attention_blocks(q, k, v, valid, longest, dtype, block: int) -> jax.Array:
    """The one-query attention over blocks of `block` cache slots, only as many as the longest valid
    row (`longest` slots) needs (a `fori_loop` with a traced trip count, at least one block), with the running max and
    sum of an online softmax. Reads the cache in place (slices of the loop-invariant buffers); equal
    to the one-pass softmax up to float32 rounding. A row with no valid slot in the blocks read
    attends uniformly over them (never NaN), like the one-pass path's fully masked row."""
    n_blocks = jnp.maximum((longest + block - 1) // block, 1)
    take = lambda x, i: jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, i * block, block, axis=1), x)
    b, kv, g, _ = q.shape

    def body(i, carry):
        m, total, acc = carry
        s = jnp.where(take(valid, i)[:, :, None, None], _cache_scores(q, take(k, i), dtype), jnp.finfo(F32).min)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        rescale = jnp.exp(m - m_new)
        return (m_new, total * rescale + jnp.sum(p, axis=1),
                acc * rescale[..., None] + _cache_weighted(p, take(v, i), dtype))

    init = (jnp.full((b, kv, g), jnp.finfo(F32).min, F32), jnp.zeros((b, kv, g), F32),
            jnp.zeros(q.shape, F32))
    _, total, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return acc / total[..., None]


class QuantizedKV(NamedTuple):
    """An int8 KV cache buffer (`kv_cache_dtype="int8"`): `codes` [B, S, KV, hd] int8 and one float32
    `scale` [B, S] per cached token, symmetric over all its KV heads and head_dim (MaxText's default
    `heads_and_dkv` axis). A per-token scale keeps the scales' layout dense on TPU, where a trailing
    KV-heads axis of a few elements would be padded to 128 lanes. Half the bytes of a bf16 cache
    (+ 4 bytes per token and layer); the decode attention reads the codes in place and applies the
    scale to the score and probability sums (`_attention_one_query`)."""

    codes: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple:
        return self.codes.shape


def quantize_kv(x: jax.Array) -> QuantizedKV:
    """K or V [B, L, KV, hd] -> QuantizedKV: scale = absmax over (KV, hd) / 127 per token (1 where the
    token is all zeros), codes = round(x / scale). Error at most scale / 2 per element."""
    x32 = x.astype(F32)
    amax = jnp.max(jnp.abs(x32), axis=(2, 3))
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(x32 / scale[:, :, None, None]), -127, 127).astype(jnp.int8)
    return QuantizedKV(codes, scale)


def dequantize_kv(x) -> jax.Array:
    """A QuantizedKV as float32 values (anything else unchanged)."""
    if isinstance(x, QuantizedKV):
        return x.codes.astype(F32) * x.scale[:, :, None, None]
    return x


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half (NeoX) RoPE over the full head, in float32. x [B, L, H, hd], positions [B, L]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=F32) / hd))
    ang = positions.astype(F32)[..., None] * inv_freq  # [B, L, hd/2]
    ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(F32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rot = jnp.concatenate([-x2, x1], -1)
    return (x32 * cos + rot * sin).astype(x.dtype)


_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_layer(layer_cls: type[nn.Module], remat_policy: str) -> type[nn.Module]:
    """The layer class wrapped in `nn.remat` with the named policy ('none': unchanged)."""
    if remat_policy == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=_POLICIES[remat_policy], prevent_cse=False)


def stack_layers(layer_cls: type[nn.Module], n: int, *, remat_policy: str, in_axes: tuple = ()):
    """`n` copies of a layer as one `nn.scan` (params stacked on a leading 'layers' axis).

    The layer is called as `layer(carry, *args) -> (carry, ys)`; `in_axes` gives, per extra arg,
    `nn.broadcast` or a scanned axis. `remat_policy` != 'none' wraps the layer body in `nn.remat`
    with that policy, so the backward pass recomputes what the policy does not save.
    The "dropout" rng stream (LoRA dropout, `adapt.lora`) reaches the layers, split per layer.
    """
    return nn.scan(remat_layer(layer_cls, remat_policy), variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=n, metadata_params={nn.PARTITION_NAME: "layers"})
