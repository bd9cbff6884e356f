"""LoRA and int8 weight-only inference with Qwix (issue 12), on tiny random models: nothing downloaded.

* LoRA: the adapter starts as a no-op (logits equal the base); after a few train steps the merged
  params give the logits of base + adapter (fp32), and the base params are bit-identical to the ones
  training started from; only the adapters hold optimizer state;
* adapters as files: `OUTPUT_DIR/adapter` loads onto the base (`--adapter`), `convert merge-lora`
  writes a normal checkpoint; a missing directory, a wrong rank or a wrong shape is one clear error;
* int8: `generate(..., quantize="int8")` runs and its logits agree with float32 (top-1, KL); a
  quantized Orbax checkpoint (`convert quantize --int8`) loads as int8 and gives the same logits as
  quantizing at load time.
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from jinavlm_jax import JinaVLM  # noqa: E402
from jinavlm_jax.adapt import AdaptError  # noqa: E402
from jinavlm_jax.adapt.lora import (LoraSpec, abstract_lora, attach_adapter, init_adapter, load_adapter,  # noqa: E402
                                    lora_model, merge_adapter, save_adapter, split_adapter)
from jinavlm_jax.convert import logit_metrics, random_inputs  # noqa: E402
from jinavlm_jax.inference.params import prepare_params  # noqa: E402
from jinavlm_jax.inference.programs import full_logits_jit  # noqa: E402

SPEC = LoraSpec(rank=4, alpha=8.0, base_dtype="float32")
pytestmark = pytest.mark.filterwarnings("ignore:.VariableState. was removed:DeprecationWarning")   # inside qwix


@pytest.fixture(scope="module")
def tiny(tiny_vlm_dir):
    """(config, params) of the session's tiny model (`testing.write_model_dir`: JinaVLMConfig.tiny())."""
    from jinavlm_jax.checkpoint import load
    return load(tiny_vlm_dir / "ckpt")


@pytest.fixture(scope="module")
def inputs(tiny):
    return random_inputs(tiny[0], seed=1, batch=2, crops=1, length=12)


_JITTED: dict = {}


def logits_of(model, params, inputs):
    """Full-forward logits; one jitted function per model object (compiled once per input structure)."""
    f = _JITTED.setdefault(id(model), (model, jax.jit(lambda p, *x: model.apply({"params": p}, *x))))[1]
    return np.asarray(f(params, *inputs))


def trained_like(adapter, seed=0):
    """The adapter with lora_b made non-zero (what training does to it)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)
        if str(p[-1].key).endswith("_lora_b") else x, adapter)


@pytest.mark.slow
def test_adapter_starts_as_noop_and_merges_exactly(tiny, inputs):
    cfg, base = tiny
    params = attach_adapter(cfg, SPEC, base, seed=0)
    ref = logits_of(plain_model(cfg), base, inputs)
    got = logits_of(lora_model(cfg, SPEC), params, inputs)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    # Default targets: the decoder's seven projections, stacked over the layers; nothing in vision / connector.
    _, adapter = split_adapter(params)
    assert set(adapter) == {"text"} and set(adapter["text"]["layers"]) == {"q", "k", "v", "out", "up", "gate", "down"}
    a = adapter["text"]["layers"]["q"]["kernel_lora_a"]
    assert a.shape == (cfg.text.n_layers, cfg.text.hidden_size, 4) and a.dtype == jnp.float32
    # A trained adapter: the merged plain params give base + adapter's logits.
    tuned = trained_like(adapter)
    lora_logits = logits_of(lora_model(cfg, SPEC), _join(split_adapter(params)[0], tuned), inputs)
    merged = merge_adapter(base, tuned, SPEC)
    plain = logits_of(plain_model(cfg), merged, inputs)
    assert np.abs(lora_logits - ref).max() > 1e-3          # the adapter does change the model
    np.testing.assert_allclose(plain, lora_logits, rtol=0, atol=1e-5)


def plain_model(config):
    return _PLAIN.setdefault(config, JinaVLM(config))


_PLAIN: dict = {}


def _join(base, adapter):
    from jinavlm_jax.adapt.lora import join_adapter
    return join_adapter(base, adapter)


@pytest.mark.slow
def test_int8_logits_agree_with_float(tiny, inputs):
    cfg, base = tiny
    ip_f = prepare_params(cfg, base)
    ip_q = prepare_params(cfg, base, quantize="int8")
    q = ip_q.tree["text"]["layers_0"]["q"]["kernel"]
    assert q.array.qvalue.dtype == jnp.int8 and q.array.scale.shape == (1, cfg.text.n_heads, cfg.text.head_dim)
    assert ip_q.tree["vision"]["layers"]["q"]["kernel"].dtype == jnp.float32   # vision stays float
    m = logit_metrics(np.asarray(full_logits_jit(cfg, ip_f, *inputs)), np.asarray(full_logits_jit(cfg, ip_q, *inputs)))
    assert m["top1_agree"] >= 0.95 and m["kl_mean"] < 1e-3, m
    # int8+vision: the stacked (nn.scan) vision kernels get per-layer scales too.
    ip_v = prepare_params(cfg, base, quantize="int8+vision")
    vq = ip_v.tree["vision"]["layers"]["q"]["kernel"]
    assert vq.array.qvalue.dtype == jnp.int8 and vq.array.scale.shape[0] == vq.array.qvalue.shape[0] > 1
    mv = logit_metrics(np.asarray(full_logits_jit(cfg, ip_f, *inputs)),
                       np.asarray(full_logits_jit(cfg, ip_v, *inputs)))
    assert mv["top1_agree"] >= 0.9, mv


@pytest.mark.slow
def test_int8_generate_and_quantized_checkpoint(tiny, tiny_vlm_dir, tmp_path, capsys):
    from jinavlm_jax.checkpoint import load
    from jinavlm_jax.cli import main
    from jinavlm_jax.generate import generate
    from jinavlm_jax.processing import Processor
    config, params = tiny
    proc = Processor.from_dir(tiny_vlm_dir)
    batch = proc(["what colour is the shape", "how many"], [[], []], padding_side="left")
    ref = generate(config, params, batch, max_new_tokens=6, stop_ids=())
    out = generate(config, params, batch, max_new_tokens=6, stop_ids=(), quantize="int8")
    agree = np.mean([a == b for r, o in zip(ref.tokens, out.tokens) for a, b in zip(r, o)])
    assert agree >= 0.8, (ref.tokens, out.tokens)
    # convert quantize --int8: an int8 checkpoint that loads as InferenceParams (no float kernels).
    q_dir = tmp_path / "int8"
    assert main(["convert", "quantize", str(tiny_vlm_dir / "ckpt"), str(q_dir), "--int8"]) == 0
    meta = json.loads((q_dir / "jinavlm_checkpoint.json").read_text())
    assert meta["quantization"]["dtype"] == "int8"
    qcfg, qparams = load(q_dir)
    assert qparams.quant is not None
    assert qparams.tree["text"]["layers_0"]["up"]["kernel"].array.qvalue.dtype == jnp.int8
    x = random_inputs(config, seed=2, batch=1, crops=1, length=8)
    f32 = config.replace(dtype="float32")
    np.testing.assert_array_equal(np.asarray(full_logits_jit(f32, qparams, *x)),
                                  np.asarray(full_logits_jit(f32, prepare_params(config, params, quantize="int8"), *x)))
    # check-logits takes a quantized checkpoint
    capsys.readouterr()
    assert main(["convert", "check-logits", str(tiny_vlm_dir / "ckpt"), str(q_dir), "--max-kl", "1"]) == 0
    assert "top1_agree" in capsys.readouterr().out


@pytest.mark.slow
def test_adapter_files_cli_and_merge(tiny, tiny_vlm_dir, tmp_path, capsys):
    from jinavlm_jax.checkpoint import load
    from jinavlm_jax.cli import main
    config, params = tiny
    adapter = trained_like(init_adapter(config, SPEC, seed=3))
    adir = save_adapter(tmp_path / "adapter", jax.device_get(adapter), SPEC, {"init": str(tiny_vlm_dir / "ckpt")})
    info = json.loads((adir / "adapter.json").read_text())
    assert (info["rank"], info["alpha"], info["modules"]) == (4, 8.0, SPEC.modules)
    loaded, spec, _ = load_adapter(adir, config)
    assert spec == SPEC
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, adapter)

    merged_dir = tmp_path / "merged"
    assert main(["convert", "merge-lora", str(tiny_vlm_dir / "ckpt"), str(adir), str(merged_dir)]) == 0
    _, merged = load(merged_dir)
    x = random_inputs(config, seed=4, batch=1, crops=1, length=8)
    want = logits_of(lora_model(config, SPEC), _join(params, adapter), x)
    np.testing.assert_allclose(logits_of(plain_model(config), merged, x), want, rtol=0, atol=1e-5)
    assert main(["convert", "orbax-to-hf", str(merged_dir), str(tmp_path / "merged_hf")]) == 0   # the official layout
    assert (tmp_path / "merged_hf" / "config.json").is_file()

    # --adapter on generate gives the merged checkpoint's answer
    common = ["--tokenizer", str(tiny_vlm_dir), "--prompt", "what colour", "--max-new-tokens", "4", "--raw"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(merged_dir), *common]) == 0
    merged_answer = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tiny_vlm_dir / "ckpt"), "--adapter", str(adir), *common]) == 0
    assert capsys.readouterr().out == merged_answer

    # bad inputs: one clear line each
    cases = {"missing": tmp_path / "nope"}
    wrong_rank = tmp_path / "wrong_rank"
    shutil.copytree(adir, wrong_rank)
    (wrong_rank / "adapter.json").write_text(json.dumps({**info, "rank": 8}))
    cases["rank"] = wrong_rank
    not_adapter = tmp_path / "not_adapter"
    not_adapter.mkdir()
    cases["no json"] = not_adapter
    for what, d in cases.items():
        capsys.readouterr()
        assert main(["generate", "--checkpoint", str(tiny_vlm_dir / "ckpt"), "--adapter", str(d), *common]) == 1, what
        err = capsys.readouterr().err
        assert "jinavlm generate: error:" in err and str(d) in err, (what, err)
    with pytest.raises(AdaptError, match=r"mis-shaped: text/layers/down/kernel_lora_a: the base model expects"):
        load_adapter(wrong_rank, config)
    with pytest.raises(AdaptError, match="matches no matmul"):
        abstract_lora(config, LoraSpec(rank=2, modules="nothing/here"))
    with pytest.raises(AdaptError, match="lora.rank"):
        LoraSpec(rank=0)
