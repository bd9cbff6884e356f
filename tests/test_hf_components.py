"""from-components: tiny transformers SigLIP2 / SigLIP (conv) and Qwen3 (tied / untied) -> jina-vlm.

Parity (fp32): the converted model's text-only logits equal Qwen3ForCausalLM's, and its vision
features equal the SigLIP model's hidden states of the selected blocks (HF hidden_states[i + 1] is
the output of block i, spec trap 1). Tolerance 1e-4 absolute on values of order 1-10: both sides
compute in float32 and only the summation order differs (measured ~1e-6).
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from jinavlm_jax import JinaVLM, checkpoint, load_jina_vlm  # noqa: E402
from jinavlm_jax.convert import from_components, orbax_to_hf  # noqa: E402
from jinavlm_jax.model.config import ConfigError  # noqa: E402
from jinavlm_jax.weights import CheckpointError, CheckpointReader, write_safetensors  # noqa: E402
from jinavlm_jax.weights.hf_components import (connector_tensors, conv_to_linear_patch,  # noqa: E402
                                                new_embedding_rows, open_components, resize_positions)

TOL = 1e-4
VIT_LAYERS = (-3, -5)  # 5 blocks: features of blocks 3 and 1; block 4 is kept but never run


def _qwen3(path, tied: bool):
    torch.manual_seed(1 if tied else 2)
    cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied, rope_theta=1e6, max_position_embeddings=512)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def _siglip(path, v2: bool):
    torch.manual_seed(3 if v2 else 4)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, patch_size=14)
    if v2:  # a 16x16 position grid: the 27x27 resize path
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(num_patches=256, **kw))
    else:   # conv patch embedding, 378 / 14 = 27x27 positions
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=378, **kw))
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bias" in n or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("components")
    out = {}
    for name, fn in (("qwen3_tied", lambda p: _qwen3(p, True)), ("qwen3_untied", lambda p: _qwen3(p, False)),
                     ("siglip2", lambda p: _siglip(p, True)), ("siglip", lambda p: _siglip(p, False))):
        out[name] = (root / name, fn(root / name))
    return out


@functools.lru_cache(maxsize=2)
def _forwards(config):
    model = JinaVLM(config)
    return (jax.jit(lambda p, ids: model.apply({"params": p}, ids)),
            jax.jit(lambda p, x: model.apply({"params": p}, x, method=JinaVLM.vision_features)))


@pytest.mark.slow
@pytest.mark.parametrize("vision,text", [("siglip2", "qwen3_tied"), ("siglip", "qwen3_untied")])
def test_from_components_parity(hf, tmp_path, vision, text):
    (vdir, vmodel), (tdir, tmodel) = hf[vision], hf[text]
    summary = from_components(vdir, tdir, tmp_path / "ckpt", seed=5, vit_layers=VIT_LAYERS, progress=False)
    assert summary.dtype == "float32"
    if vision == "siglip2":
        assert any("16x16 resized to 27x27" in n for n in summary.notes)
    if text == "qwen3_tied":
        assert any("tied" in n for n in summary.notes)
    config, params = checkpoint.load(tmp_path / "ckpt")
    text_fwd, vision_fwd = _forwards(config)  # both cases share one config: compiled once

    # text-only logits == Qwen3ForCausalLM
    ids = np.random.default_rng(0).integers(0, 512, size=(2, 12)).astype(np.int64)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(text_fwd(params, ids.astype(np.int32)))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)

    # vision features == the SigLIP hidden states of the selected blocks
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, size=(1, 3, 378, 378)).astype(np.float32)
    patches = image[0].reshape(3, 27, 14, 27, 14).transpose(1, 3, 2, 4, 0).reshape(1, 1, 729, 588)
    with torch.no_grad():
        if vision == "siglip2":
            hs = vmodel(pixel_values=torch.from_numpy(patches[0]), pixel_attention_mask=torch.ones(1, 729),
                        spatial_shapes=torch.tensor([[27, 27]]), output_hidden_states=True).hidden_states
        else:
            hs = vmodel(pixel_values=torch.from_numpy(image), output_hidden_states=True).hidden_states
    feats = np.asarray(vision_fwd(params, patches))
    assert config.vision.feature_layers == (3, 1)
    ref = np.concatenate([hs[3 + 1].numpy(), hs[1 + 1].numpy()], axis=-1)
    np.testing.assert_allclose(feats[0], ref, atol=TOL, rtol=0)

    # the image tokens' rows: near the mean embedding, distinct; the connector is random (seeded)
    new = np.asarray(params["text"]["new_embedding"])
    emb = np.asarray(params["text"]["embedding"])
    assert new.shape == (128, 32) and np.abs(new - emb.mean(0)).max() < 0.05 * emb.std()
    assert len({r.tobytes() for r in new}) == 128
    assert np.abs(np.asarray(params["connector"]["q"]["kernel"])).max() > 0

    # and out to the official layout, which load_jina_vlm reads back to the same params
    orbax_to_hf(tmp_path / "ckpt", tmp_path / "official", progress=False)
    c2, p2 = load_jina_vlm(tmp_path / "official")
    assert c2.replace(param_dtype="float32", torch_dtype="bfloat16") == config.replace(remat_policy="none")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_connector_seed(hf):
    config, _ = open_components(hf["siglip"][0], hf["qwen3_untied"][0], vit_layers=VIT_LAYERS)
    name = "model.vision_model.vl_connector.pooling.q_w.weight"
    a, a2, b = (connector_tensors(config, s)[name] for s in (1, 1, 2))
    assert np.array_equal(a, a2) and not np.array_equal(a, b)
    assert a.shape == (config.vision.hidden_size, 2 * config.vision.hidden_size)


@pytest.mark.parametrize("grid", [16, 32, 27])
def test_resize_positions_matches_torch(grid):
    """Same interpolation as Siglip2 at run time (torch bilinear, antialias=True); tolerance 1e-5 (fp32)."""
    table = np.random.default_rng(grid).standard_normal((grid * grid, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(table.reshape(grid, grid, 8)).permute(2, 0, 1)[None],
                                          size=(27, 27), mode="bilinear", align_corners=False, antialias=True)
    ref = ref[0].reshape(8, 729).T.numpy()
    np.testing.assert_allclose(resize_positions(table, 27), ref, atol=1e-5, rtol=0)


def test_conv_patch_layout():
    """The conv kernel becomes a Linear over (dy, dx, c)-ordered patches (spec trap 9)."""
    conv = torch.nn.Conv2d(3, 5, 14, stride=14)
    img = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ref = conv(img)[0].permute(1, 2, 0).reshape(4, 5).numpy()
    patches = img[0].numpy().reshape(3, 2, 14, 2, 14).transpose(1, 3, 2, 4, 0).reshape(4, 588)
    w = conv_to_linear_patch(conv.weight.detach().numpy())
    np.testing.assert_allclose(patches @ w.T + conv.bias.detach().numpy(), ref, atol=1e-5)


def test_new_embedding_rows_streams(tmp_path):
    emb = np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32) + 3.0
    write_safetensors(tmp_path / "model.safetensors", {"e": emb})
    reader = CheckpointReader(tmp_path)
    rows = new_embedding_rows(reader, "e", 4, seed=0, chunk_rows=128)
    assert rows.shape == (4, 6) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, np.broadcast_to(emb.mean(0), (4, 6)), atol=1e-2)


def _copy_dir(src, dst, edit=None, config_edit=None):
    dst.mkdir()
    tensors = {n: r for n, r in ((n, CheckpointReader(src).read(n)) for n in CheckpointReader(src).names())}
    if edit:
        edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors)
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_all_component_problems_listed(hf, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.gate_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]
        t["model.extra.weight"] = np.zeros(3, np.float32)
    bad = _copy_dir(hf["qwen3_untied"][0], tmp_path / "q", edit)
    with pytest.raises(CheckpointError) as e:
        open_components(hf["siglip"][0], bad, vit_layers=VIT_LAYERS)
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing: model.layers.1.mlp.gate_proj.weight" in msg
    assert "mis-shaped: model.layers.0.self_attn.k_proj.weight: expected (16, 32), found (8, 32)" in msg
    assert "unexpected: model.extra.weight" in msg


def test_full_siglip_model_layout(hf, tmp_path):
    """A full SiglipModel checkpoint: vision tensors under 'vision_model.', text tower and logit scale
    dropped (and named in a note); the vision position table is used, not the text tower's."""
    src = CheckpointReader(hf["siglip"][0])
    tensors = {"vision_model." + n: src.read(n) for n in src.names()}
    tensors["text_model.embeddings.position_embedding.weight"] = np.zeros((64, 16), np.float32)
    tensors["logit_scale"] = np.ones((1,), np.float32)
    write_safetensors((tmp_path / "full").mkdir() or tmp_path / "full" / "model.safetensors", tensors)
    vision_cfg = json.loads((hf["siglip"][0] / "config.json").read_text())
    (tmp_path / "full" / "config.json").write_text(json.dumps(
        {"model_type": "siglip", "vision_config": vision_cfg, "text_config": {"hidden_size": 16}}))
    config, reader = open_components(tmp_path / "full", hf["qwen3_untied"][0], vit_layers=VIT_LAYERS)
    assert config.vision.n_layers == 5
    pos = reader.read("model.vision_model.pos_embed")
    np.testing.assert_array_equal(pos, src.read("embeddings.position_embedding.weight"))
    assert any("13 tensors with no place" in n for n in reader.notes)  # 11 head + text tower + logit_scale


def test_untied_qwen3_without_head_is_missing(hf, tmp_path):
    bad = _copy_dir(hf["qwen3_untied"][0], tmp_path / "q", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing: lm_head.weight"):
        open_components(hf["siglip"][0], bad, vit_layers=VIT_LAYERS)


@pytest.mark.parametrize("which,edit,match", [
    ("qwen3_untied", lambda c: c.update(attention_bias=True), "attention_bias"),
    ("siglip", lambda c: c.update(patch_size=16), "patch_size = 16"),
    ("siglip", lambda c: c.update(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_component_configs(hf, tmp_path, which, edit, match):
    bad = _copy_dir(hf[which][0], tmp_path / "x", config_edit=edit)
    dirs = {"siglip": hf["siglip"][0], "qwen3_untied": hf["qwen3_untied"][0], which: bad}
    with pytest.raises(ConfigError, match=match):
        open_components(dirs["siglip"], dirs["qwen3_untied"], vit_layers=VIT_LAYERS)


def test_vit_layers_out_of_range(hf):
    with pytest.raises(ConfigError, match="vit_layers"):
        open_components(hf["siglip"][0], hf["qwen3_untied"][0], vit_layers=(-4, -10))  # only 5 blocks
