"""What 2x2 attention pooling saves: the paper's Table 1, measured on the compiled model.

The paper (arXiv 2512.04032) compares an image of 12 tiles + thumbnail with and without the 2x2
pooling: 13 x 729 = 9,477 visual tokens against 13 x 182 = 2,366, about 3.9x fewer LLM prefill FLOPs,
4x less KV cache and about 2.3x fewer FLOPs overall once the (unchanged) ViT is counted.

Here every figure comes from the programs jinavlm-jax runs, lowered on abstract inputs (shapes only,
no weights materialised) and read from XLA's cost analysis:

* LLM prefill: the generation prefill program (`inference.programs.prefill`, text path) at the visual-token
  length. Its decoder layers are unrolled, so the cost analysis counts all of them. Its FLOPs are
  a * L + b * L^2; a and b are solved from the two lengths. a * L (the linear layers, which is
  2 x params x tokens) is the paper's accounting; b * L^2 is attention over the full L x L score
  matrix (a causal kernel would do half), which the paper leaves out.
* ViT + connector: `JinaVLM.encode_images` on the crops. Its blocks are an `nn.scan`, whose body XLA
  counts once, so it is compiled with a one-block tower and one block alone:
  total = (one-block program - block) + blocks_run x block. jinavlm-jax runs blocks 0..24 (the
  deepest layer the connector reads), not all 27.
* KV cache: the cache buffers the prefill program returns, in the compute dtype.

The released processor never produces 182 tokens per crop: it pools a zero-padded 28 x 28 grid into
196 per crop and places only the features outside the tile overlaps (spec 5.2). Those real counts,
and the LLM cost at the real length, are reported beside the paper's.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .flops import model_flops
from .inference import abstract_inference_params
from .inference.programs import prefill
from .model import JinaVLM, JinaVLMConfig, abstract_params, tokens_per_crop
from .model.layers import dtype_of, traced_for
from .model.vision import VisionBlock

# The image of the paper's Figure 1 (W x H), tiled 3 x 4 (12 tiles) by the released processor.
PAPER_IMAGE_HW = (2046, 2728)


@dataclass(frozen=True)
class EfficiencyReport:
    """Pairs are (without pooling, with pooling). FLOPs are per image, batch 1."""

    crops: int
    patches_per_crop: int
    paper_tokens_per_crop: int
    visual_tokens: tuple[int, int]
    llm_flops: tuple[float, float]            # XLA total of the prefill program
    llm_linear_flops: tuple[float, float]     # the a * L part (paper accounting)
    llm_attention_flops: tuple[float, float]  # the b * L^2 part
    vit_flops: float                          # ViT + connector on `crops` crops (same in both)
    vit_blocks_run: int
    kv_cache_bytes: tuple[int, int]
    kv_dtype: str
    # the released processor on the paper's image (spec 5.2)
    real_tiling: tuple[int, int]
    real_crops: int
    real_pooled_per_crop: int
    real_pooled_computed: int
    real_placed: int
    real_image_tokens: int
    real_llm_flops: float
    real_llm_linear_flops: float
    real_kv_cache_bytes: int
    # the same programs by the FLOP model (`flops.model_flops`, matmuls only), for comparison
    formula_llm_linear_flops: tuple[float, float]
    formula_vit_flops: float

    @staticmethod
    def ratio(pair) -> float:
        return pair[0] / pair[1]

    @property
    def total_flops(self) -> tuple[float, float]:
        """ViT + connector + LLM linear layers: the paper's total."""
        return tuple(self.vit_flops + f for f in self.llm_linear_flops)

    @property
    def total_flops_with_attention(self) -> tuple[float, float]:
        return tuple(self.vit_flops + f for f in self.llm_flops)


def xla_flops(compiled) -> float:
    """FLOPs of a compiled program by XLA's cost analysis (a loop body counted once: programs whose
    FLOPs are reported are traced inside `model.layers.traced_for("tpu")`, which keeps attention batched
    where CPU programs loop over heads)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _llm_prefill(config: JinaVLMConfig, length: int) -> tuple[float, int]:
    """(FLOPs, KV-cache bytes) of the generation prefill program on a text-only prompt of `length`."""
    params = abstract_inference_params(config)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
    fn = jax.jit(functools.partial(prefill), static_argnums=(0, 1))  # a new trace, under traced_for
    with traced_for("tpu"):
        flops = xla_flops(fn.lower(config, length, params, ids, mask, None, None, None).compile())
    _, caches, _, _ = jax.eval_shape(lambda p, i, m: prefill(config, length, p, i, m, None, None, None),
                                     params, ids, mask)
    kv = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(caches))
    return flops, kv


def vision_flops(config: JinaVLMConfig, crops: int) -> dict[str, float]:
    """FLOPs of `JinaVLM.encode_images` on `crops` crops, from XLA: `block` (one ViT block), `rest`
    (patch embedding, feature concat, connector) and `total` = rest + blocks_run x block."""
    v = config.vision
    kw = dict(dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))
    block_params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                          abstract_params(config)["vision"]["layers"])
    x = jax.ShapeDtypeStruct((crops, v.n_patches, v.hidden_size), jnp.float32)
    block = VisionBlock(v, (), **kw)
    block_fn = lambda p, x: block.apply({"params": p}, (x, ()), jnp.int32(0))[0][0]
    with traced_for("tpu"):
        one_block = xla_flops(jax.jit(block_fn).lower(block_params, x).compile())

    # The same tower with one block (both feature layers read from it): program minus block = the
    # patch embedding, the feature concat and the connector.
    cfg1 = config.replace(vision=dataclasses.replace(v, n_layers=1, vit_layers=(-2,) * len(v.vit_layers)))
    images = jax.ShapeDtypeStruct((1, crops, v.n_patches, v.patch_dim), jnp.float32)
    masks = jax.ShapeDtypeStruct((1, crops, v.n_patches), jnp.float32)
    model = JinaVLM(cfg1)
    enc = lambda p, im, m: model.apply({"params": p}, im, m, method=JinaVLM.encode_images)
    with traced_for("tpu"):
        with_one = xla_flops(jax.jit(enc).lower(abstract_params(cfg1), images, masks).compile())
    rest = with_one - one_block
    return {"block": one_block, "rest": rest, "total": rest + v.n_run_layers * one_block}


def efficiency_report(config: JinaVLMConfig | None = None, max_crops: int = 12,
                      kv_dtype: str = "bfloat16") -> EfficiencyReport:
    """The Table 1 figures for `max_crops` tiles + thumbnail (default: the full-size model, bf16 KV
    cache as in the released checkpoint). Compiles a few programs on abstract shapes (~10-30 s on
    CPU); the result is cached per (config, max_crops, kv_dtype)."""
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    config = (config or JinaVLMConfig.jina_vlm_2_4b()).replace(dtype=kv_dtype, param_dtype=kv_dtype)
    return _report(config, max_crops, kv_dtype)


@functools.lru_cache(maxsize=8)
def _report(config: JinaVLMConfig, max_crops: int, kv_dtype: str) -> EfficiencyReport:
    from .processing import ImageProcessor, PreprocessConfig

    crops = max_crops + 1
    patches = config.vision.n_patches
    paper_per_crop = patches // (config.connector.pooling_h * config.connector.pooling_w)  # 182
    lengths = (crops * patches, crops * paper_per_crop)
    (f0, kv0), (f1, kv1) = (_llm_prefill(config, n) for n in lengths)
    # FLOPs(L) = a L + b L^2 through both points
    (l0, l1) = lengths
    b = (f0 / l0 - f1 / l1) / (l0 - l1)
    a = f0 / l0 - b * l0
    vit = vision_flops(config, crops)["total"]

    proc = ImageProcessor(PreprocessConfig(max_crops=max_crops))
    rows, cols = proc.tiling(*PAPER_IMAGE_HW)
    tokens, idx = proc.layout(rows, cols)
    real_len = len(tokens)
    real_f = a * real_len + b * real_len ** 2  # the same program's cost curve
    real_kv = kv0 // l0 * real_len
    formula = [model_flops(config, rows=1, seq_len=n, crops=0, train=False, logit_positions=1)["text_linear"]
               for n in lengths]
    vit_formula = model_flops(config, rows=1, seq_len=0, crops=crops, train=False)
    return EfficiencyReport(
        crops=crops, patches_per_crop=patches, paper_tokens_per_crop=paper_per_crop, visual_tokens=lengths,
        llm_flops=(f0, f1), llm_linear_flops=(a * l0, a * l1), llm_attention_flops=(b * l0 ** 2, b * l1 ** 2),
        vit_flops=vit, vit_blocks_run=config.vision.n_run_layers, kv_cache_bytes=(kv0, kv1), kv_dtype=kv_dtype,
        real_tiling=(rows, cols), real_crops=rows * cols + 1, real_pooled_per_crop=tokens_per_crop(config),
        real_pooled_computed=(rows * cols + 1) * tokens_per_crop(config), real_placed=int((idx >= 0).sum()),
        real_image_tokens=real_len, real_llm_flops=real_f, real_llm_linear_flops=a * real_len,
        real_kv_cache_bytes=real_kv, formula_llm_linear_flops=tuple(formula),
        formula_vit_flops=vit_formula["vision"] + vit_formula["connector"])


def format_report(r: EfficiencyReport, config: JinaVLMConfig | None = None) -> str:
    """The report as a text table (paper accounting, then the released processor's real counts)."""
    config = config or JinaVLMConfig.jina_vlm_2_4b()
    t = config.text
    T = lambda f: f"{f / 1e12:,.2f} TFLOP"
    G = lambda n: f"{n / 2**30:,.2f} GiB"
    rows = [
        ("visual tokens", f"{r.visual_tokens[0]:,}", f"{r.visual_tokens[1]:,}", r.ratio(r.visual_tokens)),
        ("LLM prefill FLOPs, linear layers", T(r.llm_linear_flops[0]), T(r.llm_linear_flops[1]),
         r.ratio(r.llm_linear_flops)),
        ("LLM prefill FLOPs, attention (full LxL)", T(r.llm_attention_flops[0]), T(r.llm_attention_flops[1]),
         r.ratio(r.llm_attention_flops)),
        ("LLM prefill FLOPs, XLA total", T(r.llm_flops[0]), T(r.llm_flops[1]), r.ratio(r.llm_flops)),
        (f"ViT ({r.vit_blocks_run} blocks run) + connector FLOPs", T(r.vit_flops), T(r.vit_flops), 1.0),
        (f"KV cache ({t.n_layers} layers, {r.kv_dtype})", G(r.kv_cache_bytes[0]), G(r.kv_cache_bytes[1]),
         r.ratio(r.kv_cache_bytes)),
        ("total FLOPs: ViT + LLM linear (paper)", T(r.total_flops[0]), T(r.total_flops[1]), r.ratio(r.total_flops)),
        ("total FLOPs: ViT + LLM XLA total", T(r.total_flops_with_attention[0]),
         T(r.total_flops_with_attention[1]), r.ratio(r.total_flops_with_attention)),
    ]
    w = max(len(x[0]) for x in rows)
    out = [f"jina-vlm efficiency: {r.crops - 1} tiles + thumbnail = {r.crops} crops x {r.patches_per_crop} patches, "
           f"batch 1 (XLA cost analysis of the compiled programs on abstract shapes)",
           "",
           f"{'paper accounting (Table 1)':<{w}}  {'no pooling':>14}  {'2x2 pooling':>14}  {'ratio':>7}   paper",
           f"{'-' * w}  {'-' * 14}  {'-' * 14}  {'-' * 7}   -----"]
    paper = {0: "9,477 vs 2,366", 1: "~3.9x", 5: "4x", 6: "~2.3x"}
    for i, (name, a, b, ratio) in enumerate(rows):
        out.append(f"{name:<{w}}  {a:>14}  {b:>14}  {ratio:>6.2f}x   {paper.get(i, '')}")
    out += ["",
            f"{r.visual_tokens[1]:,} = {r.crops} x {r.paper_tokens_per_crop} is the paper's count "
            "(729 / 4 rounded down); the released processor differs (spec 5.2):",
            f"  pooled features per crop: {r.real_pooled_per_crop} (a zero-padded 28x28 grid pooled 2x2)",
            f"  the paper's {PAPER_IMAGE_HW[1]}x{PAPER_IMAGE_HW[0]} image -> "
            f"{r.real_tiling[0]}x{r.real_tiling[1]} tiles "
            f"+ thumbnail = {r.real_crops} crops: {r.real_pooled_computed:,} features computed, "
            f"{r.real_placed:,} placed as <im_patch>, {r.real_image_tokens:,} image tokens "
            f"(with <im_col> and start/end)",
            f"  LLM prefill on {r.real_image_tokens:,} tokens: {T(r.real_llm_linear_flops)} linear, "
            f"{T(r.real_llm_flops)} in all (a L + b L^2 from the two compiles above); KV cache "
            f"{G(r.real_kv_cache_bytes)}",
            f"  vs. no pooling: {r.visual_tokens[0] / r.real_image_tokens:.2f}x fewer tokens, "
            f"{r.llm_linear_flops[0] / r.real_llm_linear_flops:.2f}x fewer linear FLOPs",
            "",
            f"the FLOP model (jinavlm_jax.flops, matmuls only): LLM linear {T(r.formula_llm_linear_flops[0])} / "
            f"{T(r.formula_llm_linear_flops[1])}, ViT + connector {T(r.formula_vit_flops)}"]
    return "\n".join(out)


__all__ = ["EfficiencyReport", "efficiency_report", "format_report", "vision_flops"]
