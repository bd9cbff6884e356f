"""Splash attention (Pallas TPU kernel, interpret mode on CPU) against the XLA attention path.

Tolerance: 1e-5 relative in float32 (acceptance 4). Both paths scale q by hd^-0.5 first and do the
softmax in float32; only the kernel's blockwise (online) softmax changes the rounding (~1e-6).
Compared on real tokens: padding rows are unspecified in the splash path (they attend to other
padding instead of being fully masked) and nothing reads them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinavlm_jax.model import JinaVLM, JinaVLMConfig, init_params
from jinavlm_jax.model.config import ConfigError
from jinavlm_jax.model.layers import attention
from jinavlm_jax.model.splash import block_size, padded_length, splash_attention
from jinavlm_jax.model.text import SegmentMask, causal_mask, positions_from_mask

from test_sharding import run_8_devices

RTOL = 1e-5


def rel_err(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.abs(a - b).max() / np.abs(b).max())


def qkv(rng, b, l, h, kv, hd):
    q = rng.normal(size=(b, l, h, hd)).astype(np.float32)
    k = rng.normal(size=(b, l, kv, hd)).astype(np.float32)
    v = rng.normal(size=(b, l, kv, hd)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def test_block_sizes_fit_the_sequence():
    assert [padded_length(n) for n in (1, 128, 129, 729, 4096)] == [128, 128, 256, 768, 4096]
    assert [block_size(n) for n in (20, 729, 1000, 4096)] == [128, 384, 512, 512]


def test_config_validates_attention_impl():
    assert JinaVLMConfig.tiny(attention_impl="splash").attention_impl == "splash"
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        JinaVLMConfig.tiny(attention_impl="flash")


@pytest.mark.slow
def test_causal_gqa_left_padding_and_packing_match_xla_with_grads():
    """Causal GQA (4 query / 2 KV heads), L=20 padded to 128 inside; row 1 left padded, row 2 two
    packed segments + right padding. Output and gradients of a loss on real rows match."""
    q, k, v = qkv(np.random.default_rng(0), 3, 20, 4, 2, 8)
    seg = np.ones((3, 20), np.int32)
    seg[1, :5] = 0
    seg[2, 8:17], seg[2, 17:] = 2, 0
    seg = jnp.asarray(seg)
    real = np.asarray(seg) > 0
    w = jnp.asarray(real, jnp.float32)[:, :, None, None]
    dense = SegmentMask(seg).dense()

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * w * jnp.cos(jnp.arange(8.0))).sum()

    sp = lambda q, k, v: splash_attention(q, k, v, seg, causal=True, dtype=jnp.float32)
    ref = lambda q, k, v: attention(q, k, v, dense, jnp.float32)
    assert rel_err(jax.jit(sp)(q, k, v), ref(q, k, v), real) <= RTOL
    g_sp = jax.jit(jax.grad(loss(sp), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_sp, g_ref):
        assert rel_err(a, b) <= RTOL, name


def test_segment_mask_is_the_causal_mask_for_left_padding():
    am = np.ones((2, 9), bool)
    am[1, :4] = False
    am = jnp.asarray(am)
    np.testing.assert_array_equal(SegmentMask(am.astype(jnp.int32)).dense(), causal_mask(am, 9))


def test_vit_full_mask_matches_xla():
    """Non-causal, no padding mask, 729 patches (padded to 768 with segment ids inside), hd 8."""
    q, k, v = qkv(np.random.default_rng(1), 2, 729, 4, 4, 8)
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, None, causal=False, dtype=jnp.float32))(q, k, v)
    assert rel_err(out, attention(q, k, v, None, jnp.float32)) <= RTOL


@pytest.fixture(scope="module")
def tiny():
    cfg = JinaVLMConfig.tiny()
    return cfg, init_params(cfg, 0)


@pytest.mark.slow
def test_tiny_decoder_left_padding_matches_xla(tiny):
    """Acceptance 4: the tiny model's decoder (2 layers, GQA 4/2) on left-padded prompts, splash vs
    XLA, hidden states and logits on real tokens within 1e-5 relative (float32)."""
    cfg, params = tiny
    rng = np.random.default_rng(2)
    b, length = 3, 40
    ids = rng.integers(0, 640, size=(b, length)).astype(np.int32)
    ids[1, :7], ids[2, :25] = -1, -1
    am = jnp.asarray(ids != -1)
    positions = positions_from_mask(am)
    outs = {}
    for impl, mask in (("xla", causal_mask(am, length)), ("splash", SegmentMask(am.astype(jnp.int32)))):
        model = JinaVLM(cfg.replace(attention_impl=impl))

        def fwd(p, ids, mask, model=model):
            x = model.apply({"params": p}, ids, method=JinaVLM.embed_tokens)
            h, _ = model.apply({"params": p}, x, positions, mask, method=JinaVLM.decode_hidden)
            return h, model.apply({"params": p}, h, method=JinaVLM.logits_from_hidden)
        outs[impl] = jax.jit(fwd)(params, ids, mask)
    real = np.asarray(am)
    assert rel_err(outs["splash"][0], outs["xla"][0], real) <= RTOL
    assert rel_err(outs["splash"][1], outs["xla"][1], real) <= RTOL


@pytest.mark.slow
def test_tiny_model_with_images_and_splash_vit_matches_xla(tiny):
    """The whole forward (ViT blocks with splash too, connector, decoder) with a left-padded row."""
    cfg, params = tiny
    rng = np.random.default_rng(3)
    b, t, length = 2, 1, 240
    ids = rng.integers(0, 640, size=(b, length)).astype(np.int32)
    ids[1, :30] = -1
    idx = np.full((b, t, 196), -1, np.int32)
    idx[:, 0] = np.arange(40, 236)
    images = rng.uniform(-1, 1, size=(b, t, 729, 588)).astype(np.float32)
    masks = np.ones((b, t, 729), np.float32)
    out = {}
    for impl in ("xla", "splash"):
        model = JinaVLM(cfg.replace(attention_impl=impl))
        out[impl] = jax.jit(lambda p, *a, m=model: m.apply({"params": p}, *a))(params, ids, images, masks, idx)
    assert rel_err(out["splash"], out["xla"], ids != -1) <= RTOL


def test_splash_refuses_a_dense_mask(tiny):
    cfg, params = tiny
    model = JinaVLM(cfg.replace(attention_impl="splash"))
    x = jnp.zeros((1, 8, cfg.text.hidden_size))
    pos = jnp.arange(8)[None]
    with pytest.raises(ValueError, match="SegmentMask"):
        model.apply({"params": params}, x, pos, causal_mask(jnp.ones((1, 8), bool), 8),
                    method=JinaVLM.decode_hidden)


SHARDED = """
import json
import numpy as np, jax, jax.numpy as jnp
from jinavlm_jax import JinaVLM, JinaVLMConfig, init_params
from jinavlm_jax.sharding import make_mesh, named, param_shardings, shard_params, use_mesh
cfg = JinaVLMConfig.tiny()
params = init_params(cfg, 0)
rng = np.random.default_rng(0)
b, t, length = 4, 1, 240
ids = rng.integers(0, 640, size=(b, length)).astype(np.int32)
ids[1, :30] = -1
idx = np.full((b, t, 196), -1, np.int32); idx[:, 0] = np.arange(20, 216)
images = rng.uniform(-1, 1, size=(b, t, 729, 588)).astype(np.float32)
masks = np.ones((b, t, 729), np.float32)
ref = np.asarray(jax.jit(lambda p, *a: JinaVLM(cfg).apply({"params": p}, *a))(params, ids, images, masks, idx))
mesh = make_mesh(data=2, fsdp=2, tensor=2)
model = JinaVLM(cfg.replace(attention_impl="splash"))
sh = param_shardings(cfg, mesh)
batch = lambda n: named(mesh, ("act_batch",) + (None,) * (n - 1))
with use_mesh(mesh):
    fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a),
                 in_shardings=(sh, batch(2), batch(4), batch(3), batch(3)))
    hlo = fn.lower(params, ids, images, masks, idx).as_text()
    out = np.asarray(fn(shard_params(params, sh), ids, images, masks, idx))
real = ids != -1
err = float(np.abs(out - ref)[real].max() / np.abs(ref[real]).max())
print(json.dumps({"err": err, "shard_map": "shard_map" in hlo or "sdy.manual_computation" in hlo}))
"""


@pytest.mark.slow
def test_sharded_splash_runs_per_shard_and_matches_single_device_xla():
    """8 simulated devices, (data=2, fsdp=2, tensor=2): the kernel runs inside shard_map (batch over
    data x fsdp, heads over tensor) and the whole model still matches the single-device XLA path."""
    import json
    res = json.loads(run_8_devices(SHARDED).strip().splitlines()[-1])
    assert res["shard_map"]
    assert res["err"] <= RTOL
