"""Parity against transformers models on tiny random configs (independent references).

Tolerance: relative error (max |ours - ref| / max |ref|) <= 1e-4 in float32, as the issue states;
the residual differences are float32 summation order (XLA vs. torch kernels).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jinavlm_jax import JinaVLM, JinaVLMConfig, init_params, load_jina_vlm
from jinavlm_jax.model import TextConfig, VisionConfig
from jinavlm_jax.weights import official_tensors

from _official import write_official_dir

pytestmark = pytest.mark.slow  # transformers models in torch

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _t(x) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.float32)


def test_text_path_equals_transformers_qwen3(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=256, attention_bias=False)
    ref = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norm weights, so a wrong norm placement cannot hide behind ones
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    sd = {k: _t(v) for k, v in ref.state_dict().items()}

    cfg = JinaVLMConfig.tiny().replace(text=TextConfig(
        hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, mlp_size=48, vocab_size=96,
        additional_vocab_size=8, rope_theta=1e6))
    base = dict(official_tensors(cfg, init_params(cfg)))
    T = "model.language_model."
    over = {T + "embedding.embedding": sd["model.embed_tokens.weight"], "lm_head.weight": sd["lm_head.weight"],
            T + "ln_f.weight": sd["model.norm.weight"]}
    for i in range(3):
        h = f"model.layers.{i}."
        over[T + f"layers.{i}.attn.qkv_w.weight"] = np.concatenate(
            [sd[h + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        over[T + f"layers.{i}.attn.out.weight"] = sd[h + "self_attn.o_proj.weight"]
        over[T + f"layers.{i}.attn.q_lnorm.weight"] = sd[h + "self_attn.q_norm.weight"]
        over[T + f"layers.{i}.attn.k_lnorm.weight"] = sd[h + "self_attn.k_norm.weight"]
        over[T + f"layers.{i}.attn_lnorm.weight"] = sd[h + "input_layernorm.weight"]
        over[T + f"layers.{i}.ffn_lnorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        # official fused SwiGLU: value ("up") rows first, gate rows second (spec trap 4)
        over[T + f"layers.{i}.ffn.up.weight"] = np.concatenate([sd[h + "mlp.up_proj.weight"],
                                                                sd[h + "mlp.gate_proj.weight"]])
        over[T + f"layers.{i}.ffn.down.weight"] = sd[h + "mlp.down_proj.weight"]
        for n in "qkv":  # the zero text biases may be absent (spec 2)
            base.pop(T + f"layers.{i}.attn.{n}_b")
    write_official_dir(tmp_path / "ckpt", cfg, tensors=base, overrides=over)
    cfg2, params = load_jina_vlm(tmp_path / "ckpt")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, size=(3, 17))
    pad = [0, 5, 11]  # left padding of different lengths
    mask = np.ones_like(ids, dtype=bool)
    for b, n in enumerate(pad):
        mask[b, :n] = False
    ours_ids = np.where(mask, ids, -1)
    logits = np.asarray(JinaVLM(cfg2).apply({"params": params}, jnp.asarray(ours_ids)))
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(np.where(mask, ids, 0)), attention_mask=torch.tensor(mask.astype(np.int64)),
                   position_ids=torch.tensor(pos)).logits.numpy()
    assert logits.shape == (3, 17, 96)
    err = rel_err(logits[mask], want[mask])
    assert err <= TOL, f"text logits relative error {err:.2e} > {TOL}"


def test_vision_path_equals_transformers_siglip2(tmp_path):
    torch.manual_seed(1)
    vcfg = VisionConfig(hidden_size=32, n_layers=6, n_heads=4, head_dim=8, mlp_size=64, output_size=32,
                        vit_layers=(-2, -5))  # -> blocks 4 and 1 of 6 (7-entry list, spec trap 1)
    cfg = JinaVLMConfig.tiny().replace(vision=vcfg)
    assert vcfg.feature_layers == (5, 2) and vcfg.n_run_layers == 6
    hf_cfg = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_channels=3,
        num_patches=729, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    ref = transformers.Siglip2VisionModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    # transformers 4 prefixes the keys with "vision_model.", transformers 5 does not
    sd = {k.removeprefix("vision_model."): _t(v) for k, v in ref.state_dict().items()}
    V = "model.vision_model."
    over = {V + "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
            V + "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
            V + "pos_embed": sd["embeddings.position_embedding.weight"],
            V + "post_lnorm.weight": sd["post_layernorm.weight"],
            V + "post_lnorm.bias": sd["post_layernorm.bias"]}
    for i in range(6):
        h, L = f"encoder.layers.{i}.", f"{V}layers.{i}."
        over[L + "attn.qkv_w.weight"] = np.concatenate([sd[h + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        for n in "qkv":
            over[L + f"attn.{n}_b"] = sd[h + f"self_attn.{n}_proj.bias"]
        over[L + "attn.out.weight"] = sd[h + "self_attn.out_proj.weight"]
        over[L + "attn.out.bias"] = sd[h + "self_attn.out_proj.bias"]
        for ours, theirs in (("attn_lnorm", "layer_norm1"), ("ffn_lnorm", "layer_norm2")):
            over[L + f"{ours}.weight"] = sd[h + f"{theirs}.weight"]
            over[L + f"{ours}.bias"] = sd[h + f"{theirs}.bias"]
        over[L + "ffn.up.weight"], over[L + "ffn.up.bias"] = sd[h + "mlp.fc1.weight"], sd[h + "mlp.fc1.bias"]
        over[L + "ffn.down.weight"], over[L + "ffn.down.bias"] = sd[h + "mlp.fc2.weight"], sd[h + "mlp.fc2.bias"]
    write_official_dir(tmp_path / "ckpt", cfg, params=init_params(cfg), overrides=over)
    cfg2, params = load_jina_vlm(tmp_path / "ckpt")

    # Siglip2 takes the same pre-patchified (dy, dx, c) 588-vectors as the official model.
    pix = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 729, 588)).astype(np.float32)
    feats = np.asarray(JinaVLM(cfg2).apply({"params": params}, jnp.asarray(pix), method=JinaVLM.vision_features))
    with torch.no_grad():
        out = ref(pixel_values=torch.tensor(pix.reshape(6, 729, 588)),
                  pixel_attention_mask=torch.ones(6, 729, dtype=torch.long),
                  spatial_shapes=torch.tensor([[27, 27]] * 6), output_hidden_states=True)
    hs = [_t(h) for h in out.hidden_states]  # hs[0] = embeddings, hs[i + 1] = output of block i
    want = np.concatenate([hs[5 + 1], hs[2 + 1]], -1).reshape(2, 3, 729, 64)
    assert feats.shape == (2, 3, 729, 64)
    err = rel_err(feats, want)
    assert err <= TOL, f"vision features relative error {err:.2e} > {TOL}"
