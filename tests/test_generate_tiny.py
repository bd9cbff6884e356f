"""Generation on a random tiny model, self-contained: no golden data, no tokenizer, no network.

The generation tests of test_generate.py compare with the golden data of ../shared/testdata; this one
runs in any checkout. Greedy `generate()` (prefill + KV-cache decode loop) must produce, token for
token, what an argmax loop over the full forward `JinaVLM.apply` (no cache, the whole sequence
recomputed at every step) produces, on a left-padded batch with an image in each row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinavlm_jax import JinaVLM, JinaVLMConfig, init_params
from jinavlm_jax.generate import generate
from jinavlm_jax.model import tokens_per_crop

NEW = 5


def tiny_batch(config: JinaVLMConfig, seed: int = 0) -> dict:
    """Two rows, left-padded to 24 tokens (lengths 24 and 17), one crop each whose first pooled
    features land on <im_patch>-like positions after a few text tokens."""
    rng = np.random.default_rng(seed)
    v, length = config.vision, 24
    ids = rng.integers(1, config.text.vocab_size, size=(2, length)).astype(np.int32)
    ids[1, :7] = -1                                            # left padding of row 1
    images = rng.uniform(-1, 1, size=(2, 1, v.n_patches, v.patch_dim)).astype(np.float32)
    masks = np.ones((2, 1, v.n_patches), np.float32)
    idx = np.full((2, 1, tokens_per_crop(config)), -1, np.int32)
    idx[0, 0, :6] = np.arange(2, 8)                            # six features after 2 text tokens
    idx[1, 0, :4] = np.arange(9, 13)                           # four, after row 1's padding + 2 tokens
    return {"input_ids": ids, "attention_mask": ids != -1, "images": images, "image_masks": masks,
            "image_input_idx": idx}


@functools.lru_cache(maxsize=None)
def full_forward(config: JinaVLMConfig):
    """`JinaVLM.apply` (logits at every position, no cache), jitted once per config."""
    model = JinaVLM(config)
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


def argmax_by_full_forward(config, params, batch, n: int) -> np.ndarray:
    """Greedy tokens by running `JinaVLM.apply` (every position, no cache) on the whole sequence at
    every step. Room for the n tokens is reserved on the right, masked until filled (the causal mask
    hides it from earlier positions), so one compiled forward serves every step."""
    fwd = full_forward(config)
    b, length = batch["input_ids"].shape
    ids = np.concatenate([batch["input_ids"], np.full((b, n), -1, np.int32)], axis=1)
    out = []
    for step in range(n):
        logits = fwd(params, ids, batch["images"], batch["image_masks"], batch["image_input_idx"], ids != -1)
        tok = np.asarray(logits[:, length - 1 + step]).argmax(-1).astype(np.int32)
        out.append(tok)
        ids[:, length + step] = tok
    return np.stack(out, 1)


def test_greedy_generate_equals_argmax_over_the_full_forward():
    config = JinaVLMConfig.tiny()
    params = init_params(config, 3)
    batch = tiny_batch(config)
    out = generate(config, params, batch, max_new_tokens=NEW)
    ref = argmax_by_full_forward(config, params, batch, NEW)
    np.testing.assert_array_equal(np.array(out.tokens), ref)
    assert out.stop_reasons == ["length", "length"] and out.steps == NEW
    # the image features reach the logits (the test would not see a broken image path otherwise)
    ids = batch["input_ids"]
    logits = [full_forward(config)(params, ids, im, batch["image_masks"], batch["image_input_idx"], ids != -1)
              for im in (batch["images"], -batch["images"])]
    assert not np.allclose(logits[0][:, -1], logits[1][:, -1], atol=1e-4)


def test_int8_kv_cache_reads_codes_and_scales_exactly_and_decodes_like_float():
    """kv_cache_dtype="int8" (model.layers.QuantizedKV): per-token absmax quantization within half a
    step; the decode attention over codes and scales equals (1e-5, float32) the plain attention over
    the dequantized cache; greedy generation agrees with the float cache (the first token is
    identical: the prompt attends over its float K/V)."""
    from jinavlm_jax.model.layers import QuantizedKV, attention, dequantize_kv, quantize_kv
    kq, kk, kv_ = jax.random.split(jax.random.key(0), 3)
    x = (jax.random.normal(kk, (2, 9, 2, 16)) * 3).at[:, 4].set(0.0)
    q = quantize_kv(x)
    assert q.codes.dtype == np.int8 and q.scale.shape == (2, 9) and q.shape == x.shape
    err = np.abs(np.asarray(dequantize_kv(q) - x))
    assert np.all(err <= np.asarray(q.scale)[:, :, None, None] / 2 + 1e-6)
    assert np.all(np.asarray(dequantize_kv(q))[:, 4] == 0)  # an all-zero token stays exact
    v = quantize_kv(jax.random.normal(kv_, (2, 9, 2, 16)))
    query = jax.random.normal(kq, (2, 1, 4, 16))
    mask = np.ones((2, 1, 9), bool)
    mask[1, 0, :3] = False
    got = attention(query, q, v, mask, jnp.float32, kv_cache=True)
    want = attention(query, dequantize_kv(q), dequantize_kv(v), mask, jnp.float32, kv_cache=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert isinstance(q, QuantizedKV)

    config = JinaVLMConfig.tiny()
    params = init_params(config, 3)
    batch = tiny_batch(config)
    ref = generate(config, params, batch, max_new_tokens=12)
    out = generate(config, params, batch, max_new_tokens=12, kv_cache_dtype="int8")
    assert [t[0] for t in out.tokens] == [t[0] for t in ref.tokens]
    agree = np.mean(np.array(out.tokens) == np.array(ref.tokens))
    assert agree >= 0.9, (ref.tokens, out.tokens)


def test_buckets_bound_the_padding():
    """Prompt buckets: powers of two up to 1024, then multiples of 256; caches: the smaller of the next
    power of two and the next multiple of 128 (a decode step reads the whole cache)."""
    from jinavlm_jax.inference import cache_bucket, prompt_bucket
    assert [prompt_bucket(n) for n in (1, 33, 1000, 1024, 1025, 1777, 4000)] == [32, 64, 1024, 1024, 1280, 1792, 4096]
    assert [cache_bucket(n) for n in (1, 60, 100, 130, 520, 1100, 2304)] == [1, 64, 128, 256, 640, 1152, 2304]
    for n in range(1, 6000, 37):
        assert n <= cache_bucket(n) < n + 128 or cache_bucket(n) < 2 * n
        assert n <= prompt_bucket(n) and (prompt_bucket(n) < n + 256 or prompt_bucket(n) <= max(2 * n, 32))
    assert [prompt_bucket(n, multiple=m) for n, m in ((1832, 1), (1832, 64), (5, 8), (0, 1))] == [1832, 1856, 8, 1]


def test_exact_prompt_length_generates_the_same_tokens():
    """generate(prompt_multiple=1): the prompt is prefilled at its exact length (no bucket padding);
    the tokens equal the bucketed run's; a bad value is refused by name."""
    from jinavlm_jax.generate import GenerateError, Generator
    config = JinaVLMConfig.tiny()
    gen = Generator(config, init_params(config, 3))
    batch = tiny_batch(config)  # 24 tokens: bucket 32
    assert (gen.generate(batch, max_new_tokens=NEW, prompt_multiple=1).tokens
            == gen.generate(batch, max_new_tokens=NEW).tokens)
    with pytest.raises(GenerateError, match="prompt_multiple must be"):
        gen.generate(batch, max_new_tokens=NEW, prompt_multiple=0)


def test_blocked_decode_attention_equals_one_pass():
    """decode_block: the one-query attention over blocks of the cache (online softmax, only the blocks
    the longest valid row reaches) equals the one-pass softmax (float32, 1e-5), for a float and an int8
    cache, rows of different valid lengths; a row with no valid slot stays finite."""
    from jinavlm_jax.model.layers import attention, quantize_kv
    kq, kk, kv_ = jax.random.split(jax.random.key(1), 3)
    k = jax.random.normal(kk, (3, 32, 2, 8))
    v = jax.random.normal(kv_, (3, 32, 2, 8))
    q = jax.random.normal(kq, (3, 1, 4, 8))
    lengths = np.array([5, 19, 0])  # the longest row reaches the third block of 8; the others read zeros
    mask = (np.arange(32)[None] < lengths[:, None])[:, None, :]
    for kc, vc in ((k, v), (quantize_kv(k), quantize_kv(v))):
        one = np.asarray(attention(q, kc, vc, mask, jnp.float32, kv_cache=True))
        blocked = np.asarray(attention(q, kc, vc, mask, jnp.float32, kv_cache=True, decode_block=8))
        np.testing.assert_allclose(blocked[:2], one[:2], rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(blocked))
    # slots past the longest row are never read: garbage there changes nothing
    k_bad = k.at[:, 24:].set(jnp.nan)
    out = attention(q, k_bad, v, mask, jnp.float32, kv_cache=True, decode_block=8)
    assert np.all(np.isfinite(np.asarray(out)[:2]))


def test_flat_float32_cache_attends_like_the_4d_cache():
    """On CPU the decode loops carry float32 caches of several rows flat ([B, S, KV * hd],
    `programs.flat_caches`) and attend over them with GEMMs: the same attention as over the 4-D cache
    (float32, 1e-5), in one pass and in blocks, written like it (`text.write_cache`), and the shapes
    given back; bf16, one-row and int8 caches stay 4-D."""
    from jinavlm_jax.inference.programs import flat_caches
    from jinavlm_jax.model.layers import attention, quantize_kv
    from jinavlm_jax.model.text import write_cache
    kq, kk, kv_, kn = jax.random.split(jax.random.key(3), 4)
    k, v = jax.random.normal(kk, (3, 32, 2, 8)), jax.random.normal(kv_, (3, 32, 2, 8))
    q = jax.random.normal(kq, (3, 1, 4, 8))
    new = jax.random.normal(kn, (3, 1, 2, 8))
    mask = (np.arange(32)[None] < np.array([5, 19, 32])[:, None])[:, None, :]
    (flat,), shaped = flat_caches(((k, v),))
    assert flat[0].shape == (3, 32, 16) and shaped((flat,))[0][0].shape == (3, 32, 2, 8)
    for block in (0, 8):
        want = attention(q, k, v, mask, jnp.float32, kv_cache=True, decode_block=block)
        got = attention(q, *flat, mask, jnp.float32, kv_cache=True, decode_block=block)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for index in (4, np.array([4, 18, 31])):
        np.testing.assert_array_equal(np.asarray(write_cache(flat[0], new, index)).reshape(k.shape),
                                      np.asarray(write_cache(k, new, index)))
    for caches in (((k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)),), ((k[:1], v[:1]),),
                   ((quantize_kv(k), quantize_kv(v)),)):
        assert flat_caches(caches)[0] is caches


def test_bf16_embedding_tables_stored_as_bits_on_cpu():
    """A bf16 model's CPU inference layout (out_in) stores the embedding tables as their uint16 bits
    (`model.text.table_bits`): an exact round trip, an out_in init draws the same table, and the
    same greedy tokens as the float tables of the in_out layout; float32 tables stay float."""
    from jinavlm_jax.generate import Generator
    from jinavlm_jax.inference import inference_config, prepare_params

    config = JinaVLMConfig.tiny().replace(dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(config, 3)
    a = prepare_params(config, params, kernel_layout="in_out")
    b = prepare_params(config, params)
    for k in ("embedding", "new_embedding"):
        assert a.tree["text"][k].dtype == jnp.bfloat16 and b.tree["text"][k].dtype == jnp.uint16
        np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(b.tree["text"][k], jnp.bfloat16)),
                                      np.asarray(a.tree["text"][k]))
    back = prepare_params(config, b, kernel_layout="in_out")
    for x, y in zip(jax.tree_util.tree_leaves(back.tree), jax.tree_util.tree_leaves(a.tree)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fresh = init_params(inference_config(config, "out_in"), 3)
    np.testing.assert_array_equal(np.asarray(fresh["text"]["embedding"]), np.asarray(b.tree["text"]["embedding"]))
    batch = tiny_batch(config)
    assert Generator(config, a).generate(batch, max_new_tokens=NEW).tokens == \
        Generator(config, b).generate(batch, max_new_tokens=NEW).tokens
    f32 = prepare_params(JinaVLMConfig.tiny(), init_params(JinaVLMConfig.tiny(), 3))
    assert f32.kernel_layout == "out_in" and f32.tree["text"]["embedding"].dtype == jnp.float32


def test_out_in_kernel_layout_is_the_same_model():
    """`JinaVLMConfig.kernel_layout="out_in"` (what `prepare_params` picks on CPU): the decoder's
    kernels stored [out, in]. The same init draw transposed, the same logits (float32 rounding of a
    different product order: 1e-5), a lossless round trip, and the same greedy tokens as the
    checkpoint's in_out layout; int8 params and unknown layouts are refused by name."""
    from jinavlm_jax.generate import GenerateError, Generator
    from jinavlm_jax.inference import inference_config, prepare_params
    from jinavlm_jax.model import ConfigError

    config = JinaVLMConfig.tiny()
    params = init_params(config, 3)
    a = prepare_params(config, params, kernel_layout="in_out")
    b = prepare_params(config, params)                       # auto: this test runs on CPU
    assert (a.kernel_layout, b.kernel_layout) == ("in_out", "out_in")
    qa, qb = a.tree["text"]["layers_1"]["out"]["kernel"], b.tree["text"]["layers_1"]["out"]["kernel"]
    assert qa.shape == (4, 8, 32) and qb.shape == (32, 4, 8)
    np.testing.assert_array_equal(np.asarray(qb), np.asarray(qa).transpose(2, 0, 1))
    np.testing.assert_array_equal(np.asarray(b.tree["text"]["lm_head"]["kernel"]),
                                  np.asarray(a.tree["text"]["lm_head"]["kernel"]).T)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(  # only the decoder's kernels change
        lambda x, y: x is y, b.tree["vision"], a.tree["vision"]))
    # an out_in model initialises to the same draw, transposed
    fresh = init_params(inference_config(config, "out_in"), 3)
    np.testing.assert_array_equal(np.asarray(fresh["text"]["lm_head"]["kernel"]),
                                  np.asarray(b.tree["text"]["lm_head"]["kernel"]))
    # the round trip back is exact
    back = prepare_params(config, b, kernel_layout="in_out")
    for x, y in zip(jax.tree_util.tree_leaves(back.tree), jax.tree_util.tree_leaves(a.tree)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    batch = tiny_batch(config)
    logits = [JinaVLM(inference_config(config, p.kernel_layout)).apply(
        {"params": p.tree}, batch["input_ids"], batch["images"], batch["image_masks"], batch["image_input_idx"],
        batch["attention_mask"]) for p in (a, b)]
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits[0]), rtol=1e-5, atol=1e-5)
    tokens = [Generator(config, p).generate(batch, max_new_tokens=NEW).tokens for p in (a, b)]
    assert tokens[0] == tokens[1]
    # bf16 compute takes the same path (one row as two, the kernel as the dot's left operand)
    bf = config.replace(dtype="bfloat16")
    one = {k: v[:1] for k, v in batch.items()}
    assert (Generator(bf, params, kernel_layout="in_out").generate(one, max_new_tokens=NEW).tokens
            == Generator(bf, params).generate(one, max_new_tokens=NEW).tokens)

    with pytest.raises(GenerateError, match="int8 params keep"):
        prepare_params(config, params, quantize="int8", kernel_layout="out_in")
    assert prepare_params(config, params, quantize="int8").kernel_layout == "in_out"
    with pytest.raises(GenerateError, match="kernel_layout: 'columns'"):
        prepare_params(config, params, kernel_layout="columns")
    with pytest.raises(ConfigError, match="kernel_layout must be one of"):
        config.replace(kernel_layout="columns")
