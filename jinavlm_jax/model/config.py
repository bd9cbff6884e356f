"""Model configuration: frozen dataclasses, named presets, and the official nested `config.json`.

`JinaVLMConfig.from_hf` reads the official layout (spec section 1; `text_config` / `vision_config`,
each with `block_config` -> `attn_config` / `ffn_config` / `lnorm_config`, and
`vision_config.vl_connector_config`); `to_hf` writes the same layout back. Settings the released
model does not use (sliding windows, dropout, other pooling types, ...) are refused with an error that
names the key and the supported value, rather than silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config.json value that jinavlm-jax cannot represent (names the key and the value)."""


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP2-So400M/14 vision tower in the official (linear patch embedding) layout."""

    hidden_size: int = 1152
    n_layers: int = 27
    n_heads: int = 16
    head_dim: int = 72
    mlp_size: int = 4304
    norm_eps: float = 1e-6
    image_size: int = 378
    patch_size: int = 14
    n_channels: int = 3
    # Indices into the list [block 0 out, ..., block n-1 out, post_lnorm out] (n+1 entries; spec
    # trap 1): [-4, -10] selects blocks 24 and 18 of 27, concatenated in this order.
    vit_layers: tuple[int, ...] = (-4, -10)
    post_lnorm: bool = True
    output_size: int = 2048
    # Kept only so to_hf() writes back what from_hf() read; no interpolation happens at 27x27.
    positional_interpolation: str = "bicubic"
    mlp_ratio: int = 4

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.n_channels

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """vit_layers resolved to 0-based positions in the (n_layers + 1)-entry hidden-state list."""
        n = self.n_layers + 1
        out = []
        for v in self.vit_layers:
            r = v + n if v < 0 else v
            if not 0 <= r < n:
                raise ConfigError(
                    f"vision_config.vit_layers entry {v} is out of range for {self.n_layers} layers "
                    f"(valid: -{n}..{n - 1}, indexing block outputs plus the post-norm output)")
            out.append(r)
        return tuple(out)

    @property
    def n_run_layers(self) -> int:
        """Blocks the forward pass must run: up to the deepest selected feature layer."""
        return min(max(self.feature_layers) + 1, self.n_layers)


@dataclass(frozen=True)
class ConnectorConfig:
    """vl_connector: pad embeddings, 2x2 attention-meanq pooling, SwiGLU projector (spec section 4)."""

    pool_heads: int = 16
    pool_head_dim: int = 72
    pooling_h: int = 2
    pooling_w: int = 2
    projector_size: int = 6144
    projector_ratio: int = 4


@dataclass(frozen=True)
class TextConfig:
    """Qwen3-1.7B geometry in the official (OLMo-style fused tensor) layout."""

    hidden_size: int = 2048
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 128
    mlp_size: int = 6144
    norm_eps: float = 1e-6
    vocab_size: int = 151936
    additional_vocab_size: int = 128
    rope_theta: float = 1_000_000.0
    max_sequence_length: int = 40960
    tie_word_embeddings: bool = False
    mlp_ratio: int = 4

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.additional_vocab_size


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "splash")
KERNEL_LAYOUTS = ("in_out", "out_in")


@dataclass(frozen=True)
class JinaVLMConfig:
    """The whole model: architecture (from config.json) plus run-time settings (not in config.json).

    Run-time settings: `dtype` (compute), `param_dtype`, `remat_policy` for both towers
    (`none`, `full`, `dots_saveable`, `dots_with_no_batch_dims_saveable`), and `attention_impl` for
    the self-attention of both towers: `xla` (einsums, the reference) or `splash` (the Pallas TPU
    flash kernel of `model/splash.py`; interpret mode off TPU; full-sequence calls only, a decode
    step with a KV cache keeps the XLA path). `scan_layers`: the decoder layers stacked with
    `nn.scan` (True: one compiled layer body, params `text/layers` with a leading layers axis; for
    training) or applied one by one (False: params `text/layers_0` ... `text/layers_{n-1}` and one KV
    cache buffer per layer; the layout inference uses, see `inference.prepare_params`). The vision
    tower is always scanned. `decode_block`: a decode step over a KV cache attends block by block
    (N slots per block, online softmax) only up to the longest valid row, skipping the blocks no row
    has reached; 0 attends over the whole cache in one pass. For caches much longer than what they
    hold: the serving engine's slots are `max_model_len` long whatever the requests use.
    `kernel_layout`: how the text decoder's dense kernels (q/k/v/out, gate/up/down, lm_head) are
    stored: `in_out` ([in, out], the checkpoint's and training's layout) or `out_in` ([out, in],
    PyTorch's): the layout `inference.prepare_params` picks on CPU, where XLA's GEMM reads it faster
    for the few rows of a decode step (`model.layers.matmul`).
    Change them with `dataclasses.replace(cfg, dtype="bfloat16")` or `cfg.replace(...)`.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    torch_dtype: str = "bfloat16"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str = "xla"
    scan_layers: bool = True
    decode_block: int = 0
    kernel_layout: str = "in_out"

    def __post_init__(self):
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            raise ConfigError(f"dtype/param_dtype must be one of {DTYPES}, got {self.dtype!r}/{self.param_dtype!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.kernel_layout not in KERNEL_LAYOUTS:
            raise ConfigError(f"kernel_layout must be one of {KERNEL_LAYOUTS}, got {self.kernel_layout!r}")
        if self.decode_block < 0:
            raise ConfigError(f"decode_block must be >= 0 (0 = the whole cache in one pass), got {self.decode_block}")
        t, v = self.text, self.vision
        if t.n_heads % t.n_kv_heads:
            raise ConfigError(f"text n_heads={t.n_heads} is not a multiple of n_kv_heads={t.n_kv_heads}")
        if v.image_size % v.patch_size:
            raise ConfigError(f"vision input_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.output_size != t.hidden_size:
            raise ConfigError(f"vision_config.output_size={v.output_size} must equal text hidden_size={t.hidden_size}")
        v.feature_layers  # validates vit_layers

    def replace(self, **kw) -> "JinaVLMConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ presets
    @classmethod
    def jina_vlm_2_4b(cls, **runtime) -> "JinaVLMConfig":
        """The released jina-vlm (2.48B parameters): SigLIP2-So400M/14-384 + Qwen3-1.7B."""
        return cls(**runtime)

    @classmethod
    def tiny(cls, **runtime) -> "JinaVLMConfig":
        """A tiny random-weights model with the real layout (for tests and the CPU demo).

        Same geometry as the golden set 1 of the shared test data: vision 32 x 10 layers, text 32 x 2
        layers with GQA 4/2, vocab 512 + 128.
        """
        return cls(
            vision=VisionConfig(hidden_size=32, n_layers=10, n_heads=4, head_dim=8, mlp_size=64,
                                output_size=32),
            connector=ConnectorConfig(pool_heads=4, pool_head_dim=8, projector_size=48),
            text=TextConfig(hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                            mlp_size=64, vocab_size=512, additional_vocab_size=128),
            torch_dtype="float32",
            **runtime,
        )

    # ------------------------------------------------------------------ official config.json
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | Mapping[str, Any], **runtime) -> "JinaVLMConfig":
        """Parse the official nested config.json (a path to the file or its directory, or a dict)."""
        if isinstance(path_or_dict, Mapping):
            d, where = dict(path_or_dict), "config"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise ConfigError(f"{p}: config.json not found")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from None
            where = str(p)
        return _parse_hf(d, where, runtime)

    def to_hf(self) -> dict[str, Any]:
        """The official nested config.json dict for this architecture (run-time settings omitted)."""
        return _to_hf(self)


# ---------------------------------------------------------------------- parsing helpers

def _lnorm(kind: str, eps: float) -> dict[str, Any]:
    return {"type": kind, "with_affine": True, "eps": eps, "bias": kind == "default"}


def _attn(head_dim, n_heads, n_kv_heads, bias: bool, qk_norm: bool, lnorm) -> dict[str, Any]:
    return {
        "head_dim": head_dim, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "softmax_scale": None,
        "sliding_window": -1, "fp32": False, "dropout": 0.0,
        "q_bias": bias, "k_bias": bias, "v_bias": bias, "o_bias": bias,
        "q_lnorm": qk_norm, "k_lnorm": qk_norm, "v_lnorm": False, "qkv_lnorm_on_heads": qk_norm,
        "o_lnorm": False, "inner_lnorm": False, "clip_qkv": None, "lnorm_config": lnorm,
    }


def _ffn(act: str, ratio: int, size: int, bias: bool, gated: bool, lnorm) -> dict[str, Any]:
    return {"activation_type": act, "ratio": ratio, "size": size, "bias": bias, "inner_lnorm": False,
            "gated_activation": gated, "lnorm_config": lnorm}


def _block(attn, ffn, lnorm) -> dict[str, Any]:
    return {"attn_config": attn, "attn_lscale_init": None, "ffn_config": ffn, "ffn_lscale_init": None,
            "residual_dropout": 0.0, "residual_response_dropout": 0.0, "residual_path_dropout": 0.0,
            "postnorm": False, "lnorm_config": lnorm}


def _to_hf(c: JinaVLMConfig) -> dict[str, Any]:
    t, v, k = c.text, c.vision, c.connector
    tl, vl = _lnorm("rms", t.norm_eps), _lnorm("default", v.norm_eps)
    text = {
        "model_type": "jvlm",
        "block_config": _block(_attn(t.head_dim, t.n_heads, t.n_kv_heads, False, True, tl),
                               _ffn("silu", t.mlp_ratio, t.mlp_size, False, True, tl), tl),
        "n_layers": t.n_layers, "hidden_size": t.hidden_size, "embedding_dropout": 0.0,
        "max_sequence_length": t.max_sequence_length, "max_position_embeddings": None,
        "vocab_size": t.vocab_size, "embedding_size": t.vocab_size,
        "additional_vocab_size": t.additional_vocab_size, "normalize_input_embeds": False,
        "rope": True, "partial_rotary_factor": 1.0, "rope_theta": t.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    connector = {
        "padding_embed_type": "pad_and_partial_pad", "pooling_type": "attention_meanq",
        "projector_type": "mlp",
        "attn_pooling_config": _attn(k.pool_head_dim, k.pool_heads, k.pool_heads, True, False, vl),
        "mlp_projector_config": _ffn("silu", k.projector_ratio, k.projector_size, False, True, vl),
        "pooling_h": k.pooling_h, "pooling_w": k.pooling_w, "spatial_merge_size": k.pooling_h,
        "projector_dropout": 0.0, "feature_dropout": 0.0,
    }
    vision = {
        "model_type": "jvlm",
        "block_config": _block(_attn(v.head_dim, v.n_heads, v.n_heads, True, False, vl),
                               _ffn("gelu_pytorch_tanh", v.mlp_ratio, v.mlp_size, True, False, vl), vl),
        "vl_connector_config": connector,
        "n_layers": v.n_layers, "hidden_size": v.hidden_size, "input_size": [v.image_size, v.image_size],
        "patch_size": v.patch_size, "n_channels": v.n_channels, "linear_patch_embedding": True,
        "patch_embedding_bias": True, "patch_dropout": 0.0, "pre_lnorm": False,
        "post_lnorm": v.post_lnorm, "use_absolute_positional_embeddings": True, "use_cls_token": False,
        "positional_interpolation": v.positional_interpolation, "vit_layers": list(v.vit_layers),
        "output_size": v.output_size,
    }
    return {"architectures": ["JinaVLMForConditionalGeneration"], "model_type": "jvlm",
            "torch_dtype": c.torch_dtype, "tie_word_embeddings": t.tie_word_embeddings,
            "text_config": text, "vision_config": vision}


class _Reader:
    """Reads one nested section, checking that every key is known and fixed keys hold supported values."""

    def __init__(self, d: Mapping[str, Any], where: str, template: Mapping[str, Any]):
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
        self.d, self.where, self.template = d, where, template
        unknown = sorted(set(d) - set(template))
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; jinavlm-jax supports only the "
                              f"jina-vlm architecture keys {sorted(template)}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, self.template.get(key, default))

    def fixed(self, *keys: str) -> None:
        """Keys whose only supported value is the one in the template."""
        for key in keys:
            if key in self.d and self.d[key] != self.template[key]:
                raise ConfigError(f"{self.where}.{key} = {self.d[key]!r} is not supported "
                                  f"(jinavlm-jax implements {key} = {self.template[key]!r})")


def _parse_hf(d: dict[str, Any], where: str, runtime: dict[str, Any]) -> JinaVLMConfig:
    d = {k: val for k, val in d.items() if k not in ("summary", "transformers_version", "_name_or_path")}
    tmpl = _to_hf(JinaVLMConfig())
    top = _Reader(d, where, {**tmpl, "auto_map": None, "use_cache": True, "vocab_size": None,
                             "hidden_size": None})
    top.fixed("model_type")
    if "text_config" not in d or "vision_config" not in d:
        raise ConfigError(f"{where}: needs both 'text_config' and 'vision_config' (official nested layout)")

    # -- text
    tw = f"{where}.text_config"
    t = _Reader(d["text_config"], tw, tmpl["text_config"])
    t.fixed("rope", "partial_rotary_factor", "rope_scaling", "normalize_input_embeds", "embedding_dropout")
    tb = _Reader(t.get("block_config"), f"{tw}.block_config", tmpl["text_config"]["block_config"])
    tb.fixed("attn_lscale_init", "ffn_lscale_init", "residual_dropout", "residual_response_dropout",
             "residual_path_dropout", "postnorm")
    ta = _Reader(tb.get("attn_config"), f"{tw}.block_config.attn_config",
                 tmpl["text_config"]["block_config"]["attn_config"])
    ta.fixed("softmax_scale", "sliding_window", "dropout", "q_lnorm", "k_lnorm", "v_lnorm",
             "qkv_lnorm_on_heads", "o_lnorm", "inner_lnorm", "clip_qkv", "o_bias")
    for b in ("q_bias", "k_bias", "v_bias"):
        # The official text attention registers zero q/k/v biases (spec section 2); a non-zero-bias
        # model is a different architecture.
        if ta.get(b):
            raise ConfigError(f"{tw}.block_config.attn_config.{b} = true is not supported (the released "
                              "model has no text attention bias)")
    tf = _Reader(tb.get("ffn_config"), f"{tw}.block_config.ffn_config",
                 tmpl["text_config"]["block_config"]["ffn_config"])
    tf.fixed("activation_type", "bias", "inner_lnorm", "gated_activation")
    eps = _check_lnorm([tb.get("lnorm_config"), ta.get("lnorm_config"), tf.get("lnorm_config")],
                       "rms", f"{tw}.block_config")
    vocab = t.get("vocab_size")
    if t.get("embedding_size") not in (None, vocab):
        raise ConfigError(f"{tw}.embedding_size={t.get('embedding_size')} differs from vocab_size={vocab}; "
                          "not supported")
    # Spec 9.7: the inner flag is the one the text model uses.
    tie = t.d.get("tie_word_embeddings", d.get("tie_word_embeddings", False))
    text = TextConfig(
        hidden_size=t.get("hidden_size"), n_layers=t.get("n_layers"), n_heads=ta.get("n_heads"),
        n_kv_heads=ta.get("n_kv_heads"), head_dim=ta.get("head_dim"), mlp_size=tf.get("size"),
        norm_eps=eps, vocab_size=vocab, additional_vocab_size=t.get("additional_vocab_size"),
        rope_theta=float(t.get("rope_theta")), max_sequence_length=t.get("max_sequence_length"),
        tie_word_embeddings=bool(tie), mlp_ratio=tf.get("ratio"))
    if text.tie_word_embeddings:
        raise ConfigError(f"{tw}.tie_word_embeddings = true is not supported: jina-vlm has an untied "
                          "lm_head (151,936 rows) and a larger embedding table")

    # -- vision
    vw = f"{where}.vision_config"
    v = _Reader(d["vision_config"], vw, tmpl["vision_config"])
    v.fixed("linear_patch_embedding", "patch_embedding_bias", "patch_dropout", "pre_lnorm",
            "use_absolute_positional_embeddings", "use_cls_token")
    vb = _Reader(v.get("block_config"), f"{vw}.block_config", tmpl["vision_config"]["block_config"])
    vb.fixed("attn_lscale_init", "ffn_lscale_init", "residual_dropout", "residual_response_dropout",
             "residual_path_dropout", "postnorm")
    va = _Reader(vb.get("attn_config"), f"{vw}.block_config.attn_config",
                 tmpl["vision_config"]["block_config"]["attn_config"])
    va.fixed("softmax_scale", "sliding_window", "dropout", "q_bias", "k_bias", "v_bias", "o_bias",
             "q_lnorm", "k_lnorm", "v_lnorm", "qkv_lnorm_on_heads", "o_lnorm", "inner_lnorm", "clip_qkv")
    if va.get("n_kv_heads") not in (None, va.get("n_heads")):
        raise ConfigError(f"{vw}.block_config.attn_config.n_kv_heads must equal n_heads (no GQA in the ViT)")
    vf = _Reader(vb.get("ffn_config"), f"{vw}.block_config.ffn_config",
                 tmpl["vision_config"]["block_config"]["ffn_config"])
    vf.fixed("activation_type", "bias", "inner_lnorm", "gated_activation")
    veps = _check_lnorm([vb.get("lnorm_config"), va.get("lnorm_config"), vf.get("lnorm_config")],
                        "default", f"{vw}.block_config")
    size = v.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]):
        raise ConfigError(f"{vw}.input_size = {size!r}: only square inputs are supported")
    vision = VisionConfig(
        hidden_size=v.get("hidden_size"), n_layers=v.get("n_layers"), n_heads=va.get("n_heads"),
        head_dim=va.get("head_dim"), mlp_size=vf.get("size"), norm_eps=veps, image_size=int(size[0]),
        patch_size=v.get("patch_size"), n_channels=v.get("n_channels"),
        vit_layers=tuple(v.get("vit_layers")), post_lnorm=bool(v.get("post_lnorm")),
        output_size=v.get("output_size"), positional_interpolation=v.get("positional_interpolation"),
        mlp_ratio=vf.get("ratio"))

    # -- connector
    cw = f"{vw}.vl_connector_config"
    ctm = tmpl["vision_config"]["vl_connector_config"]
    c = _Reader(v.get("vl_connector_config"), cw, ctm)
    c.fixed("padding_embed_type", "pooling_type", "projector_type", "projector_dropout", "feature_dropout")
    if not (c.get("pooling_h") == c.get("pooling_w") == c.get("spatial_merge_size") == 2):
        raise ConfigError(f"{cw}: only 2x2 pooling is supported (pooling_h/pooling_w/spatial_merge_size = 2)")
    cp = _Reader(c.get("attn_pooling_config"), f"{cw}.attn_pooling_config", ctm["attn_pooling_config"])
    cp.fixed("softmax_scale", "sliding_window", "dropout", "q_bias", "k_bias", "v_bias", "o_bias",
             "q_lnorm", "k_lnorm", "v_lnorm", "qkv_lnorm_on_heads", "o_lnorm", "inner_lnorm", "clip_qkv")
    if cp.get("n_kv_heads") not in (None, cp.get("n_heads")):
        raise ConfigError(f"{cw}.attn_pooling_config.n_kv_heads must equal n_heads")
    cm = _Reader(c.get("mlp_projector_config"), f"{cw}.mlp_projector_config", ctm["mlp_projector_config"])
    cm.fixed("activation_type", "bias", "inner_lnorm", "gated_activation")
    connector = ConnectorConfig(pool_heads=cp.get("n_heads"), pool_head_dim=cp.get("head_dim"),
                                projector_size=cm.get("size"), projector_ratio=cm.get("ratio"))
    if connector.pool_heads * connector.pool_head_dim != vision.hidden_size:
        # The official pooling output feeds a projector sized from the ViT width.
        raise ConfigError(f"{cw}.attn_pooling_config: n_heads*head_dim = "
                          f"{connector.pool_heads * connector.pool_head_dim} must equal the vision hidden "
                          f"size {vision.hidden_size}")
    try:
        return JinaVLMConfig(vision=vision, connector=connector, text=text,
                             torch_dtype=d.get("torch_dtype", "float32"), **runtime)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_lnorm(cfgs, kind: str, where: str) -> float:
    eps = None
    for lc in cfgs:
        if lc is None:
            continue
        if lc.get("type", kind) != kind or not lc.get("with_affine", True) or \
                bool(lc.get("bias", kind == "default")) != (kind == "default"):
            raise ConfigError(f"{where}: lnorm_config {lc!r} is not supported (expected type {kind!r} "
                              f"with affine weight{' and bias' if kind == 'default' else ', no bias'})")
        e = float(lc.get("eps", 1e-6))
        if eps is not None and e != eps:
            raise ConfigError(f"{where}: differing norm eps {eps} and {e} are not supported")
        eps = e
    return 1e-6 if eps is None else eps
