"""Inference speed of the full-size model on this CPU, against transformers, measured in one run.

    python3 benchmarks/bench_inference.py [--dtypes float32,bfloat16] [--decode-tokens 12]
                                          [--parts decoder,vision,ttft] [--prompts 2048,4096]
                                          [--write docs/performance.md]
    python3 benchmarks/bench_inference.py --smoke             # seconds: the demo model's geometry

Random weights, full-size geometry (text: Qwen3-1.7B, 28 layers; vision: SigLIP2-So400M, 13 crops).
Side by side, same dtype, same shapes, this process:

* decoder prefill: 512 prompt tokens, batch 1, and the long prompts of `--prompts` (default 2,048 and
  4,096). Ours: the generation prefill program (all decoder layers, K/V written into the cache,
  last-position logits). transformers: `Qwen3ForCausalLM` forward with `use_cache=True,
  logits_to_keep=1` (SDPA attention).
* decoder decode: tokens/s after that prompt, batch 1 and 8, greedy. Ours: the `lax.while_loop`
  decode program; transformers: a loop of one-token forwards over its `DynamicCache`.
* vision: 13 crops (12 tiles + thumbnail). Ours: `JinaVLM.encode_images` (ViT blocks 0..24, the last
  one the connector reads, + 2x2 attention pooling + projector); transformers: `Siglip2VisionModel`
  (27 layers + post-norm, no head). Each side's GFLOP/s uses its own FLOPs (the XLA cost analysis of
  our programs; for SigLIP2 27 of our blocks + the patch embedding, the same math).
* time to first token: one 1000x750 photo (12 tiles + thumbnail = 13 crops) and a question through
  the released processor. Ours: `Generator.generate(max_new_tokens=1)` (vision tower, connector,
  bucketed prefill, first token; the second call, the first compiles); transformers:
  `Siglip2VisionModel`, the connector's math in torch and `Qwen3ForCausalLM` prefill of the same tokens.
* devices: with a GPU (`jax[cuda]` and torch with CUDA) both sides run on it and the report names it;
  otherwise on this CPU, whose bf16 instructions (avx512_bf16 / amx_bf16) the report states: without
  them a bfloat16 comparison is of emulated kernels.
* machine: the matmul peak (best of JAX and torch on a 2048 x 2048 x 4096 matmul, per dtype) and the
  memory bandwidth (best of numpy / JAX / torch summing a 1 GiB array).

Achieved GFLOP/s = FLOPs / time, against the matmul peak. A prefill's FLOPs are XLA's count of the
program traced as for TPU, with the whole causal [L, L] attention; on CPU ours skips the keys past each
block of 256 queries (`layers._attention_per_head`: about 1% of that count at 512 tokens, 6% at 2,048,
12% at 4,096) and torch's SDPA skips masked blocks too, so at long prompts both figures are nominal
rates of the same count. Decode bytes/s = (weights read per step:
decoder layers, final norm and LM head; plus the valid K/V entries) / step time, against the
bandwidth. Ratios are ours / transformers (higher is better for both throughput figures).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # bench_train: the torch connector / VLM

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from jinavlm_jax import JinaVLM, JinaVLMConfig, abstract_params  # noqa: E402
from jinavlm_jax.efficiency import vision_flops, xla_flops  # noqa: E402
from jinavlm_jax.inference import InferenceParams, abstract_inference_params, cache_bucket  # noqa: E402
from jinavlm_jax.inference.params import default_kernel_layout  # noqa: E402
from jinavlm_jax.inference.programs import decode_loop_jit, prefill_jit  # noqa: E402
from jinavlm_jax.inference.programs import prefill as prefill_program  # noqa: E402
from jinavlm_jax.model.layers import dtype_of, traced_for  # noqa: E402

PROMPT = 512
CROPS = 13
REPO = Path(__file__).resolve().parents[1]
# torch runs on CUDA when it sees a GPU (`jax[cuda]` then puts our programs on it too: JAX's default
# backend); otherwise both run on this CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def best_of(fn, repeats: int) -> float:
    """Fastest of `repeats` calls (torch's queued GPU work is waited for; JAX callers block)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------ machine

def matmul_peak(dtype: str) -> dict:
    m, k, n = 2048, 2048, 4096
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), dtype_of(dtype))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), dtype_of(dtype))
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    tj = best_of(lambda: f(a, b).block_until_ready(), 5)
    ta_, tb_ = (torch.randn(m, k, dtype=TORCH_DTYPES[dtype], device=DEVICE),
                torch.randn(k, n, dtype=TORCH_DTYPES[dtype], device=DEVICE))
    ta_ @ tb_
    tt = best_of(lambda: ta_ @ tb_, 5)
    flops = 2 * m * k * n
    return {"jax": flops / tj / 1e9, "torch": flops / tt / 1e9, "peak": flops / min(tj, tt) / 1e9}


def kernel_ceilings(dtype: str) -> dict:
    """What the two kernels that dominate the decoder reach alone, in JAX and torch: the prefill MLP
    matmul [512, 2048] x [2048, 6144] (GFLOP/s) and a chain of 8 decode matrix-vector products
    [1, 2048] x [2048, 6144] on separate weights (GB/s of weights read)."""
    rng = np.random.default_rng(0)
    dt, tdt = dtype_of(dtype), TORCH_DTYPES[dtype]
    x = jnp.asarray(rng.standard_normal((PROMPT, 2048)), dt)
    w = jnp.asarray(0.02 * rng.standard_normal((2048, 6144)), dt)
    mm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    mm(x, w).block_until_ready()
    fl = 2 * PROMPT * 2048 * 6144
    res = {"mm_jax": fl / best_of(lambda: mm(x, w).block_until_ready(), 5) / 1e9}
    tx, tw = torch.randn(PROMPT, 2048, dtype=tdt, device=DEVICE), 0.02 * torch.randn(2048, 6144, dtype=tdt, device=DEVICE)
    tx @ tw
    res["mm_torch"] = fl / best_of(lambda: tx @ tw, 5) / 1e9
    ws = [jnp.asarray(0.02 * rng.standard_normal((2048, 6144)), dt) for _ in range(8)]
    wd = [jnp.asarray(0.02 * rng.standard_normal((6144, 2048)), dt) for _ in range(8)]
    nbytes = 2 * sum(a.size * a.dtype.itemsize for a in ws)

    def chain(v, ws, wd):
        for a, b in zip(ws, wd):
            v = v + jnp.dot(jnp.dot(v, a, preferred_element_type=jnp.float32).astype(dt), b,
                            preferred_element_type=jnp.float32).astype(dt)
        return v
    f = jax.jit(chain)
    v = jnp.ones((1, 2048), dt)
    f(v, ws, wd).block_until_ready()
    res["mv_jax"] = nbytes / best_of(lambda: f(v, ws, wd).block_until_ready(), 5) / 1e9
    tws = [torch.from_numpy(np.array(a.astype(jnp.float32))).to(DEVICE, tdt) for a in ws]
    twd = [torch.from_numpy(np.array(a.astype(jnp.float32))).to(DEVICE, tdt) for a in wd]
    tv = torch.ones(1, 2048, dtype=tdt, device=DEVICE)

    def tchain():
        v = tv
        for a, b in zip(tws, twd):
            v = v + (v @ a) @ b
    res["mv_torch"] = nbytes / best_of(tchain, 5) / 1e9
    return res


def memory_bandwidth() -> dict:
    n = 2 ** 28  # 1 GiB of float32
    x = np.ones(n, np.float32)
    tn = best_of(lambda: x.sum(), 5)
    xj = jnp.ones(n, jnp.float32)
    fj = jax.jit(jnp.sum)
    fj(xj).block_until_ready()
    tj = best_of(lambda: fj(xj).block_until_ready(), 5)
    xt = torch.ones(n, device=DEVICE)
    tt = best_of(lambda: xt.sum(), 5)
    res = {"numpy": x.nbytes / tn / 1e9, "jax": x.nbytes / tj / 1e9, "torch": x.nbytes / tt / 1e9}
    res["peak"] = max(res.values())
    del x, xj, xt
    return res


# ------------------------------------------------------------------------------------ random weights

def random_tree(shapes, seed: int):
    """Materialise a ShapeDtypeStruct tree: N(0, 0.02) weights, ones for norm scales, zero biases."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, s) in enumerate(leaves):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            out.append(jnp.ones(s.shape, s.dtype))
        elif name.endswith("bias"):
            out.append(jnp.zeros(s.shape, s.dtype))
        elif s.dtype == jnp.uint16:  # a bf16 table stored as its bits (`model.text.table_bits`)
            out.append(jax.lax.bitcast_convert_type(_normal(jax.random.key(seed * 1000 + i), s.shape, jnp.bfloat16),
                                                    jnp.uint16))
        else:
            out.append(_normal(jax.random.key(seed * 1000 + i), s.shape, s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def text_inference_params(config: JinaVLMConfig, quantize: str | None = None,
                          kernel_layout: str | None = None) -> InferenceParams:
    """Random decoder params straight in the per-layer layout (no stacked copy held at the same time),
    float kernels in `kernel_layout` (None: what `Generator` picks here, `default_kernel_layout`);
    `quantize="int8"`: then quantized with Qwix (`adapt.quant`, what `Generator(quantize=...)` does),
    one layer at a time, so the float copy of only one layer is alive beside the int8 tree."""
    if quantize is None:
        layout = kernel_layout or default_kernel_layout()
        text = abstract_inference_params(config, kernel_layout=layout).tree["text"]
        tree = {k: random_tree(v, 0) for k, v in text.items() if not k.startswith("layers_")}
        tree.update({f"layers_{i}": random_tree(text[f"layers_{i}"], i + 1) for i in range(config.text.n_layers)})
        return InferenceParams({"text": tree}, None, layout)
    text = abstract_inference_params(config).tree["text"]
    from jinavlm_jax.adapt.quant import Quantization, abstract_quantized, quantize_like
    from jinavlm_jax.inference import inference_config
    quant = Quantization.parse(quantize)
    qtext = abstract_quantized(inference_config(config), quant)["text"]
    tree = {k: quantize_like(random_tree(v, 0), qtext[k]) if isinstance(v, dict) else random_tree(v, 0)
            for k, v in text.items() if not k.startswith("layers_")}
    tree.update({f"layers_{i}": quantize_like(random_tree(text[f"layers_{i}"], i + 1), qtext[f"layers_{i}"])
                 for i in range(config.text.n_layers)})
    return InferenceParams({"text": tree}, quant)


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------------ decoder: ours

def jax_decoder(config: JinaVLMConfig, decode_tokens: int, batches=(1, 8), quantize: str | None = None,
                prefill: bool = True, kernel_layout: str | None = None, prompts: tuple[int, ...] = ()) -> dict:
    """Prefill (batch 1; PROMPT tokens and each of `prompts`) and decode (each batch, after PROMPT
    tokens) timings of our programs, plus the FLOPs / bytes. `quantize="int8"`: int8 decoder weights
    (compute in `config.dtype`)."""
    params = text_inference_params(config, quantize, kernel_layout)
    t = config.text
    res = {}
    weight_bytes = tree_bytes({k: v for k, v in params.tree["text"].items() if k not in ("embedding", "new_embedding")})
    kv_per_token = 2 * t.n_layers * t.n_kv_heads * t.head_dim * jnp.dtype(dtype_of(config.dtype)).itemsize
    rng = np.random.default_rng(0)
    cache_len = cache_bucket(PROMPT + decode_tokens)

    for n in (PROMPT, *prompts) if prefill else ():
        ids = rng.integers(0, t.vocab_size, (1, n)).astype(np.int32)
        args = (config, cache_bucket(n + decode_tokens), params, ids, np.ones((1, n), bool), None, None, None)
        compiled = prefill_jit.lower(*args).compile()  # compiled ahead, so the one timed run is a plain run
        with traced_for("tpu"):  # counted batched: on CPU long attention is a loop counted once
            fresh = jax.jit(partial(prefill_program), static_argnums=(0, 1))  # a new trace, not prefill_jit's cached one
            res[f"prefill_{n}_flops"] = xla_flops(fresh.lower(*args).compile())
        res[f"prefill_{n}_s"] = best_of(lambda: jax.block_until_ready(compiled(*args[2:])), 1)
        del compiled
        gc.collect()
    res["weight_bytes"] = weight_bytes

    for b in batches:
        # Decode speed does not depend on what the cache holds: fill PROMPT slots with random K/V
        # instead of running a batch-b prefill (which would dominate the benchmark's time).
        def fresh():
            shape = (b, cache_len, t.n_kv_heads, t.head_dim)
            caches = tuple((_normal(jax.random.key(2 * i), shape, dtype_of(config.dtype)),
                            _normal(jax.random.key(2 * i + 1), shape, dtype_of(config.dtype)))
                           for i in range(t.n_layers))
            kv_valid = np.arange(cache_len)[None].repeat(b, 0) < PROMPT
            return caches, kv_valid
        logits0 = rng.standard_normal((b, t.vocab_size)).astype(np.float32)
        last = np.full(b, PROMPT - 1, np.int32)
        dyn = (np.arange(b, dtype=np.uint32), np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32),
               np.full(16, -2, np.int32))

        def decode(n, cache):
            out = decode_loop_jit(config, PROMPT, False, False, params, *cache, logits0, last, *dyn,
                                  np.int32(n), np.zeros(b, bool))
            return jax.block_until_ready(out)

        decode(2, jax.block_until_ready(fresh()))  # compile and warm
        cache = jax.block_until_ready(fresh())  # made before the clock starts, as transformers' cache is
        t0 = time.perf_counter()
        out = decode(decode_tokens, cache)
        dt = time.perf_counter() - t0
        del cache
        steps = int(out[1]) - 1  # the first token comes from the prefill logits, without a forward
        res[f"decode_b{b}_step_s"] = dt / steps
        res[f"decode_b{b}_bytes"] = weight_bytes + b * kv_per_token * (PROMPT + decode_tokens / 2)
        del out
        gc.collect()
    del params
    gc.collect()
    return res


# ------------------------------------------------------------------------------------ decoder: transformers

def torch_model(build, dtype: str):
    """`build()` with seed 0 and its weights made in `dtype` directly (torch's default dtype while it
    runs), in eval mode on DEVICE."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(TORCH_DTYPES[dtype])
    try:
        return build().eval().to(DEVICE)
    finally:
        torch.set_default_dtype(old)


def torch_decoder(config: JinaVLMConfig, dtype: str, decode_tokens: int, batches=(1, 8),
                  prompts: tuple[int, ...] = ()) -> dict:
    from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM
    t = config.text
    qc = Qwen3Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.mlp_size,
                     num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads, num_key_value_heads=t.n_kv_heads,
                     head_dim=t.head_dim, rms_norm_eps=t.norm_eps, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                     max_position_embeddings=t.max_sequence_length)
    qc._attn_implementation = "sdpa"
    model = torch_model(lambda: Qwen3ForCausalLM(qc), dtype)
    res = {}
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        model(torch.zeros((1, 32), dtype=torch.long, device=DEVICE), use_cache=True, logits_to_keep=1)  # warm-up
        for n in (PROMPT, *prompts):
            ids = torch.from_numpy(rng.integers(0, t.vocab_size, (1, n))).to(DEVICE)
            res[f"prefill_{n}_s"] = best_of(lambda: model(ids, use_cache=True, logits_to_keep=1), 1)
            gc.collect()
        for b in batches:
            def fresh():  # the same random-filled PROMPT-token cache as ours
                cache = DynamicCache()
                for i in range(t.n_layers):
                    shape = (b, t.n_kv_heads, PROMPT, t.head_dim)
                    cache.update(0.02 * torch.randn(shape, dtype=TORCH_DTYPES[dtype], device=DEVICE),
                                 0.02 * torch.randn(shape, dtype=TORCH_DTYPES[dtype], device=DEVICE), i)
                return cache
            tok = torch.from_numpy(rng.integers(0, t.vocab_size, (b, 1))).to(DEVICE)

            def decode(n, cache):
                nonlocal tok
                for _ in range(n):
                    step = model(tok, past_key_values=cache, use_cache=True)
                    cache, tok = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)

            decode(1, fresh())  # warm-up
            cache = fresh()
            t0 = time.perf_counter()
            decode(decode_tokens - 1, cache)
            res[f"decode_b{b}_step_s"] = (time.perf_counter() - t0) / (decode_tokens - 1)
            del cache
            gc.collect()
    del model
    gc.collect()
    return res


# ------------------------------------------------------------------------------------ vision

def jax_vision(config: JinaVLMConfig) -> dict:
    a = abstract_params(config)
    params = {"vision": random_tree(a["vision"], 7), "connector": random_tree(a["connector"], 8)}
    v = config.vision
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (1, CROPS, v.n_patches, v.patch_dim)).astype(np.float32)
    masks = np.ones((1, CROPS, v.n_patches), np.float32)
    model = JinaVLM(config)
    f = jax.jit(lambda p, im, m: model.apply({"params": p}, im, m, method=JinaVLM.encode_images))
    compiled = f.lower(params, images, masks).compile()  # compile outside the timing, no warm-up run
    t = best_of(lambda: jax.block_until_ready(compiled(params, images, masks)), 1)
    del params
    gc.collect()
    return {"vision_s": t}


def torch_vision(config: JinaVLMConfig, dtype: str) -> dict:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    v = config.vision
    sc = Siglip2VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.mlp_size, num_hidden_layers=v.n_layers,
                             num_attention_heads=v.n_heads, patch_size=v.patch_size, num_patches=v.n_patches,
                             layer_norm_eps=v.norm_eps, vision_use_head=False)
    sc._attn_implementation = "sdpa"
    model = torch_model(lambda: Siglip2VisionModel(sc), dtype)
    side = v.patches_per_side
    pix = torch.rand(CROPS, v.n_patches, v.patch_dim, dtype=TORCH_DTYPES[dtype], device=DEVICE) * 2 - 1
    mask = torch.ones(CROPS, v.n_patches, dtype=torch.long, device=DEVICE)
    shapes = torch.tensor([[side, side]] * CROPS, device=DEVICE)
    with torch.inference_mode():
        model(pixel_values=pix[:1], pixel_attention_mask=mask[:1], spatial_shapes=shapes[:1])  # warm-up
        t = best_of(lambda: model(pixel_values=pix, pixel_attention_mask=mask, spatial_shapes=shapes), 1)
    del model
    gc.collect()
    return {"vision_s": t}


# ------------------------------------------------------------------------------------ time to first token

PHOTO = (1000, 750)  # width x height of the time-to-first-token photo: 12 tiles + thumbnail = 13 crops
QUESTION = ("Describe this photo in detail: what is in the foreground and the background, which colours "
            "dominate, and is there any text?")
DEMO_DIR = REPO / "jinavlm_jax" / "assets" / "demo" / "model"


def photo_batch(smoke: bool) -> dict:
    """One 1000x750 photo and a question through the released processor (numpy, its default settings:
    378 px tiles, up to 12 of them): the token layout of a real request. The tokens come from the
    shipped demo tokenizer (the ids only index embeddings here). `smoke`: the demo model's settings."""
    from PIL import Image

    from jinavlm_jax.processing import PreprocessConfig, Processor, TextTokenizer
    pre = PreprocessConfig.from_hf(DEMO_DIR / "preprocessor_config.json") if smoke else PreprocessConfig()
    proc = Processor(TextTokenizer.from_file(DEMO_DIR), pre, max_length=1 << 16)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (PHOTO[1], PHOTO[0], 3), dtype=np.uint8))
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}])
    return {k: np.asarray(v) for k, v in proc([prompt], [[photo]]).items() if v is not None}


def jax_ttft(config: JinaVLMConfig, batch: dict) -> dict:
    """`Generator.generate(max_new_tokens=1)` on the photo: vision tower on every crop, connector,
    prefill of the whole prompt, first token. The second of two calls (the first compiles)."""
    from jinavlm_jax.generate import Generator
    params = random_tree(abstract_params(config), 11)
    gen = Generator(config, params)
    del params
    gen.generate(batch, max_new_tokens=1)
    t = best_of(lambda: gen.generate(batch, max_new_tokens=1), 1)
    del gen
    gc.collect()
    return {"ttft_s": t}


def torch_ttft(config: JinaVLMConfig, dtype: str, batch: dict) -> dict:
    """The same work in transformers: `Siglip2VisionModel` (the blocks our connector reads), the
    connector's math in torch (`bench_train.TorchConnector`), the features added at their token
    positions, `Qwen3ForCausalLM` prefill (`use_cache=True, logits_to_keep=1`), argmax."""
    from bench_train import TorchVLM
    model = torch_model(lambda: TorchVLM(config), dtype)
    tb = {k: torch.from_numpy(batch[k]).to(DEVICE) for k in ("input_ids", "image_input_idx", "image_masks")}
    tb["images"] = torch.from_numpy(batch["images"]).to(DEVICE, TORCH_DTYPES[dtype])

    def first_token():
        x = model.inputs_embeds(tb)
        return model.text(inputs_embeds=x, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1).item()
    with torch.inference_mode():
        first_token()  # warm-up (kernel selection)
        t = best_of(first_token, 1)
    del model
    gc.collect()
    return {"ttft_s": t}


# ------------------------------------------------------------------------------------ report

def secs(x: float) -> str:
    return f"{x:.1f} s" if x >= 10 else f"{x:.2f} s" if x >= 1 else f"{x:.3g} s"


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--decode-tokens", type=int, default=8,
                    help="tokens per decode measurement (the first comes from the prefill logits)")
    ap.add_argument("--parts", default="decoder,vision,ttft",
                    help="decoder (prefill / decode), vision (ViT + connector), ttft (one photo, end to end)")
    ap.add_argument("--smoke", action="store_true",
                    help="a quick check of the script: the shipped demo model's (tiny) geometry, random weights")
    ap.add_argument("--write", metavar="MD", help="write the results (markdown) to this file")
    ap.add_argument("--text-layers", type=int, help="smoke runs only: fewer decoder layers")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 weight-only decode rows")
    ap.add_argument("--prompts", default="2048,4096",
                    help="long prompts (tokens, comma-separated; '' for none) prefilled besides the 512-token one")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()
    dtypes = args.dtypes.split(",")
    parts = args.parts.split(",")
    prompts = tuple(int(n) for n in args.prompts.split(",") if n.strip())

    log("measuring matmul peak and memory bandwidth ...")
    load0 = os.getloadavg()[0]
    peaks = {d: matmul_peak(d) for d in dtypes}
    ceilings = {d: kernel_ceilings(d) for d in dtypes}
    bw = memory_bandwidth()
    results = {}
    photo = photo_batch(args.smoke) if "ttft" in parts else None
    for d in dtypes:
        if args.smoke:
            config = JinaVLMConfig.from_hf(DEMO_DIR / "config.json", dtype=d, param_dtype=d)
        else:
            config = JinaVLMConfig.jina_vlm_2_4b(dtype=d, param_dtype=d)
        if args.text_layers:
            config = config.replace(text=dataclasses.replace(config.text, n_layers=args.text_layers))
        r = results[d] = {}
        if "decoder" in parts:
            log(f"[{d}] decoder: jinavlm-jax ...")
            r["jax_dec"] = jax_decoder(config, args.decode_tokens, prompts=prompts)
            log(f"[{d}] decoder: transformers Qwen3ForCausalLM ...")
            r["torch_dec"] = torch_decoder(config, d, args.decode_tokens, prompts=prompts)
            if not args.no_int8:
                log(f"[{d}] decoder: jinavlm-jax, int8 weights (Qwix) ...")
                r["int8_dec"] = jax_decoder(config, args.decode_tokens, quantize="int8", prefill=False)
        if "vision" in parts:
            log(f"[{d}] vision: jinavlm-jax encode_images ...")
            r["vision_flops"] = vision_flops(config, CROPS)
            r["jax_vis"] = jax_vision(config)
            log(f"[{d}] vision: transformers Siglip2VisionModel ...")
            r["torch_vis"] = torch_vision(config, d)
        if "ttft" in parts:
            log(f"[{d}] time to first token: jinavlm-jax Generator ...")
            r["jax_ttft"] = jax_ttft(config, photo)
            log(f"[{d}] time to first token: transformers (Siglip2 + connector + Qwen3 prefill) ...")
            r["torch_ttft"] = torch_ttft(config, d, photo)
        log(f"[{d}] done at {time.perf_counter() - t_start:.0f} s")

    load1 = os.getloadavg()[0]
    # Other jobs may share the cores: the machine's peaks are the best seen at the start and the end.
    log("measuring matmul peak and memory bandwidth again ...")
    for d in dtypes:
        again = matmul_peak(d)
        peaks[d] = {k: max(peaks[d][k], again[k]) for k in again}
    again = memory_bandwidth()
    bw = {k: max(bw[k], again[k]) for k in again}
    vcfg = JinaVLMConfig.from_hf(DEMO_DIR / "config.json") if args.smoke else JinaVLMConfig.jina_vlm_2_4b()
    rows, notes = [], []
    for d in dtypes:
        r, peak = results[d], peaks[d]["peak"]
        if "jax_dec" in r:
            j, t = r["jax_dec"], r["torch_dec"]
            for n in (PROMPT, *prompts):
                fl, sj, st = j[f"prefill_{n}_flops"], j[f"prefill_{n}_s"], t[f"prefill_{n}_s"]
                gj, gt = fl / sj / 1e9, fl / st / 1e9
                rows.append([d, f"decoder prefill {n} tok, batch 1", secs(sj), secs(st), f"{st / sj:.2f}x",
                             f"{gj:.0f} GFLOP/s = {100 * gj / peak:.0f}% of peak",
                             f"{gt:.0f} GFLOP/s = {100 * gt / peak:.0f}%"])
                check(notes, d, f"prefill ({n} tokens)", st / sj, gj / peak, "peak", ceilings[d]["mm_jax"] / peak,
                      "the [512, 2048] x [2048, 6144] matmul alone reaches")
            for b in (1, 8):
                sj, st = j[f"decode_b{b}_step_s"], t[f"decode_b{b}_step_s"]
                bytes_ = j[f"decode_b{b}_bytes"]
                bj, bt = bytes_ / sj / 1e9, bytes_ / st / 1e9
                rows.append([d, f"decoder decode, batch {b}", f"{b / sj:.2f} tok/s", f"{b / st:.2f} tok/s",
                             f"{st / sj:.2f}x", f"{bj:.1f} GB/s = {100 * bj / bw['peak']:.0f}% of bandwidth",
                             f"{bt:.1f} GB/s = {100 * bt / bw['peak']:.0f}%"])
                if b == 1:
                    check(notes, d, "batch-1 decode", st / sj, bj / bw["peak"], "memory roofline",
                          ceilings[d]["mv_jax"] / bw["peak"], "a chain of 8 [1, 2048] x [2048, 6144] "
                          "matrix-vector products alone reaches")
        if "jax_vis" in r:
            vf, v = r["vision_flops"], vcfg.vision
            ours = vf["total"]
            # SigLIP2: all its blocks (ours runs only up to the last one the connector reads) and the
            # patch embedding; same math per block.
            torch_fl = v.n_layers * vf["block"] + 2 * CROPS * v.n_patches * v.patch_dim * v.hidden_size
            sj, st = r["jax_vis"]["vision_s"], r["torch_vis"]["vision_s"]
            gj, gt = ours / sj / 1e9, torch_fl / st / 1e9
            rows.append([d, f"vision + connector, {CROPS} crops", secs(sj), secs(st), f"{st / sj:.2f}x",
                         f"{gj:.0f} GFLOP/s = {100 * gj / peak:.0f}% of peak",
                         f"{gt:.0f} GFLOP/s = {100 * gt / peak:.0f}%"])
        if "jax_ttft" in r:
            sj, st = r["jax_ttft"]["ttft_s"], r["torch_ttft"]["ttft_s"]
            crops = int(np.sum(~np.all(photo["images"][0] == -1.0, axis=(1, 2))))
            rows.append([d, f"time to first token: one {PHOTO[0]}x{PHOTO[1]} photo ({crops} crops, "
                            f"{int(photo['attention_mask'].sum())} tokens)", secs(sj), secs(st),
                         f"{st / sj:.2f}x", "-", "-"])
            if sj > 0.8 * st:
                notes.append(f"- {d} time to first token: {sj / st:.2f}x transformers' time, above the 0.8x target.")
        if "jax_dec" in r:
            j = r["jax_dec"]
            scale = j["decode_b1_step_s"] * 8 / j["decode_b8_step_s"]
            notes.append(f"- {d} batch-8 decode: {scale:.2f}x the batch-1 tokens/s (target >= 5x in float32).")
    header = ["dtype", "workload", "jinavlm-jax", "transformers", "speed ratio (ours/theirs)", "ours: achieved",
              "transformers: achieved"]
    from bench_train import cpu_flags
    cpu, flags = cpu_flags()
    bf16_hw = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if DEVICE == "cuda":
        device = f"GPU: torch on {torch.cuda.get_device_name(0)}, jax on {jax.devices()[0].device_kind}; "
    else:
        device = (f"CPU {cpu} ({'bf16 instructions: ' + ', '.join(bf16_hw) if bf16_hw else 'no bf16 instructions'}); "
                  f"jax on {jax.default_backend()}; ")
    if "bfloat16" in dtypes and DEVICE == "cpu" and not bf16_hw:
        notes.append("- bfloat16: this CPU has no bf16 instructions (no avx512_bf16 / amx_bf16): both libraries "
                     "emulate bf16 matmuls, so the bfloat16 rows are not a comparison of native kernels.")
    machine = (device + f"{platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}; "
               "matmul peak (2048 x 2048 x 4096, best of start and end) "
               + ", ".join(f"{d} {peaks[d]['peak']:.0f} GFLOP/s (jax {peaks[d]['jax']:.0f}, "
                           f"torch {peaks[d]['torch']:.0f})" for d in dtypes)
               + f"; memory bandwidth {bw['peak']:.1f} GB/s (sum of 1 GiB, best of start and end: numpy "
                 f"{bw['numpy']:.1f}, jax {bw['jax']:.1f}, torch {bw['torch']:.1f}); load average {load0:.1f} at the start, "
                 f"{load1:.1f} at the end (other jobs share these cores)")
    kernels = fmt_table(
        [[d, f"{c['mm_jax']:.0f} / {c['mm_torch']:.0f} GFLOP/s", f"{c['mv_jax']:.1f} / {c['mv_torch']:.1f} GB/s"]
         for d, c in ceilings.items()],
        ["dtype", "prefill-shaped matmul, jax / torch", "decode-shaped matvec chain, jax / torch"])
    table = fmt_table(rows, header)
    int8_rows = []
    for d in dtypes:
        r = results[d]
        if "int8_dec" not in r:
            continue
        for b in (1, 8):
            for name, j in (("float", r["jax_dec"]), ("int8", r["int8_dec"])):
                s = j[f"decode_b{b}_step_s"]
                by = j[f"decode_b{b}_bytes"]
                vs = r["jax_dec"][f"decode_b{b}_step_s"] / s
                int8_rows.append([d, f"{d if name == 'float' else 'int8'}", str(b), f"{b / s:.2f} tok/s",
                                  f"{j['weight_bytes'] / 1e9:.2f} GB", f"{by / s / 1e9:.1f} GB/s", f"{vs:.2f}x"])
    if int8_rows:
        table += ("\n\nint8 weight-only decode (Qwix: decoder projections and LM head int8 with per-channel "
                  "scales, dequantized to the compute dtype inside the program), same run:\n\n"
                  + fmt_table(int8_rows, ["compute dtype", "weights", "batch", "decode", "weights read per step",
                                          "bytes/s (weights + K/V)", "speed vs float weights"]))
    total = time.perf_counter() - t_start
    cmd = " ".join(["python3", "benchmarks/bench_inference.py"] + (argv if argv is not None else sys.argv[1:]))
    text = (f"Machine: {machine}.\n\n{table}\n\nKernel ceilings measured in the same run:\n\n{kernels}\n\n"
            f"Wall time of the benchmark: {total:.0f} s (`{cmd}`).\n")
    if notes:
        text += "\nAgainst the targets (prefill >= 1.0x transformers and >= 85% of the matmul peak; batch-1 decode " \
                ">= 1.0x transformers and >= 85% of the memory roofline; batch-8 decode >= 5x batch 1; time to " \
                "first token <= 0.8x transformers'):\n\n" + "\n".join(notes) + "\n"
    print(text)
    if args.write:
        write_doc(Path(args.write), text)
    return 0


def check(notes: list[str], dtype: str, what: str, ratio: float, frac: float, of: str, ceiling: float,
          ceiling_text: str) -> None:
    """Add a note for each target missed: by how much, and what the isolated kernel reaches."""
    if ratio < 1.0:
        notes.append(f"- {dtype} {what}: {ratio:.2f}x transformers, {100 * (1 - ratio):.0f}% short of 1.0x.")
    if frac < 0.85:
        notes.append(f"- {dtype} {what}: {100 * frac:.0f}% of the {of}, {85 - 100 * frac:.0f} points short of 85%; "
                     f"{ceiling_text} {100 * ceiling:.0f}% of it on this machine.")


ANALYSIS = "## Why the shortfalls"


def write_doc(path: Path, results: str) -> None:
    """Write the generated part; a hand-written section headed ANALYSIS already in the file is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(ANALYSIS):] if ANALYSIS in old else ""
    head = ("# Inference performance\n\nProduced by `benchmarks/bench_inference.py` (random weights, full-size "
            "geometry, one run on this machine, jinavlm-jax and transformers side by side in the same dtype). "
            "Speed ratio > 1 means jinavlm-jax is faster. See the script's docstring for what each row "
            "measures.\n\n")
    path.write_text(head + results + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    sys.exit(main())
