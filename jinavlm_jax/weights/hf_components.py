"""Transformers SigLIP / SigLIP2 vision and Qwen3 checkpoints -> the official jina-vlm tensor names.

A fresh jina-vlm for stage-1 training is assembled from its two pre-trained components. Each component
format has one name table (rows: official jina-vlm tensor <- the transformers tensors concatenated
along the first axis, plus a transform), and `ComponentReader` presents the two checkpoints as if they
were one official checkpoint, tensor by tensor. The official table (`weights/official.py`) and
`load_params` then take it the rest of the way to our params, so there is one table per format and
no second path into the param tree.

Transforms:

* `copy`: same values (Linear weights are [out, in] in both formats);
* `patch`: the patch embedding. SigLIP (v1, and SigLIP2 fixed-resolution checkpoints saved as
  SigLIP) has a Conv2d [out, c, dy, dx]; the official Linear reads (dy, dx, c)-ordered 588-vectors
  (spec trap 9), so the conv kernel is transposed to [out, dy, dx, c] and flattened. Siglip2VisionModel
  already has a Linear over patches flattened as (dy, dx, c) (`convert_image_to_patches` permutes
  to [.., p, p, c]), so it is copied;
* `positions`: the learned position table, resized to the 27x27 grid of jina-vlm when its grid
  differs, with the interpolation Siglip2VisionEmbeddings applies at run time (bilinear, half-pixel
  centres, antialiased when shrinking), so a Siglip2 model's features at 27x27 are reproduced.

Qwen3's separate gate/up projections become the official fused `ffn.up` with the value ("up")
rows first and the gate rows second (spec trap 4); q/k/v become the fused `qkv_w`. A tied Qwen3
(no `lm_head.weight`) gets a copy of its embedding as the untied jina-vlm head (spec trap 18). The
128 additional embedding rows (image tokens, spec 1.4) and the connector have no source: see
`new_embedding_rows` and `ComponentReader`.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn

from ..model.config import ConfigError, ConnectorConfig, JinaVLMConfig, TextConfig, VisionConfig
from ..model.connector import Connector
from .official import official_table, official_tensors
from .safetensors_io import CheckpointError, CheckpointReader

GRID = 27           # jina-vlm crops are 378x378 = 27x27 patches of 14 (spec 1.1)
PATCH = 14


@dataclass(frozen=True)
class Row:
    """official tensor <- `sources` (component names relative to the detected prefix) joined on axis 0."""
    official: str
    sources: tuple[str, ...]
    transform: str = "copy"          # copy | patch | positions
    fallback: str | None = None      # used when the first source is absent (tied lm_head)


def _layer_rows(official: str, source: str, names: Mapping[str, str | tuple[str, ...]]) -> list[Row]:
    out = []
    for theirs, ours in names.items():
        src = ours if isinstance(ours, tuple) else (ours,)
        out.append(Row(official + theirs, tuple(source + s for s in src)))
    return out


V, T = "model.vision_model.", "model.language_model."

# SigLIP / SigLIP2 vision tower; sources are relative to the vision prefix ("vision_model." in a full
# SiglipModel checkpoint, "" in a SiglipVisionModel saved by transformers 5).
SIGLIP_ROWS: tuple[Row, ...] = (
    Row(V + "patch_embed.proj.weight", ("embeddings.patch_embedding.weight",), "patch"),
    Row(V + "patch_embed.proj.bias", ("embeddings.patch_embedding.bias",)),
    Row(V + "pos_embed", ("embeddings.position_embedding.weight",), "positions"),
    *_layer_rows(V + "layers.{i}.", "encoder.layers.{i}.", {
        "attn.qkv_w.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "attn.q_b": "self_attn.q_proj.bias", "attn.k_b": "self_attn.k_proj.bias",
        "attn.v_b": "self_attn.v_proj.bias",
        "attn.out.weight": "self_attn.out_proj.weight", "attn.out.bias": "self_attn.out_proj.bias",
        "attn_lnorm.weight": "layer_norm1.weight", "attn_lnorm.bias": "layer_norm1.bias",
        "ffn_lnorm.weight": "layer_norm2.weight", "ffn_lnorm.bias": "layer_norm2.bias",
        "ffn.up.weight": "mlp.fc1.weight", "ffn.up.bias": "mlp.fc1.bias",
        "ffn.down.weight": "mlp.fc2.weight", "ffn.down.bias": "mlp.fc2.bias",
    }),
    Row(V + "post_lnorm.weight", ("post_layernorm.weight",)),
    Row(V + "post_lnorm.bias", ("post_layernorm.bias",)),
)
# Component tensors jina-vlm has no place for: SigLIP's attention-pooling head, the text tower and
# the contrastive logit scale of a full SiglipModel checkpoint.
SIGLIP_DROPPED = re.compile(r"^(head\.|text_model\.|logit_scale|logit_bias)")
SIGLIP_ANCHOR = "embeddings.patch_embedding.weight"  # its prefix is the vision tower's prefix

# Qwen3ForCausalLM; sources are relative to the decoder prefix ("model." normally).
QWEN3_ROWS: tuple[Row, ...] = (
    Row(T + "embedding.embedding", ("embed_tokens.weight",)),
    *_layer_rows(T + "layers.{i}.", "layers.{i}.", {
        "attn.qkv_w.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "attn.out.weight": "self_attn.o_proj.weight",
        "attn.q_lnorm.weight": "self_attn.q_norm.weight", "attn.k_lnorm.weight": "self_attn.k_norm.weight",
        "attn_lnorm.weight": "input_layernorm.weight", "ffn_lnorm.weight": "post_attention_layernorm.weight",
        # value ("up") rows first, gate rows second: the official order (spec trap 4)
        "ffn.up.weight": ("mlp.up_proj.weight", "mlp.gate_proj.weight"),
        "ffn.down.weight": "mlp.down_proj.weight",
    }),
    Row(T + "ln_f.weight", ("norm.weight",)),
    # Top level in Qwen3ForCausalLM (no decoder prefix): marked by a leading "/".
    Row("lm_head.weight", ("/lm_head.weight",), fallback="embed_tokens.weight"),
)
QWEN3_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
QWEN3_ANCHOR = "embed_tokens.weight"
NEW_EMBEDDING = T + "embedding.new_embedding"
CONNECTOR = V + "vl_connector."


# ---------------------------------------------------------------------------------- configs

def _read_json(directory: Path, what: str) -> dict[str, Any]:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise ConfigError(f"{p}: config.json of the {what} checkpoint not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def siglip_vision_config(d: Mapping[str, Any], where: str, n_positions: int,
                         vit_layers: tuple[int, ...], output_size: int) -> VisionConfig:
    """VisionConfig from a SigLIP / SigLIP2 config.json (vision-only, or the `vision_config` of a full one)."""
    if "vision_config" in d and isinstance(d["vision_config"], Mapping):
        d, where = d["vision_config"], f"{where}.vision_config"
    mt = d.get("model_type", "")
    _need(mt in ("siglip_vision_model", "siglip2_vision_model", ""),
          f"{where}: model_type {mt!r} is not a SigLIP / SigLIP2 vision config")
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    _need(act == "gelu_pytorch_tanh", f"{where}.hidden_act = {act!r}: jina-vlm's ViT uses gelu_pytorch_tanh")
    patch = d.get("patch_size", 16)
    _need(patch == PATCH, f"{where}.patch_size = {patch}: jina-vlm cuts crops into {PATCH}x{PATCH} patches "
                          f"(588-vectors), so only patch size {PATCH} SigLIP towers can be used")
    _need(d.get("num_channels", 3) == 3, f"{where}.num_channels must be 3")
    hidden, heads = d.get("hidden_size", 768), d.get("num_attention_heads", 12)
    _need(hidden % heads == 0, f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    _need(math.isqrt(n_positions) ** 2 == n_positions,
          f"{where}: {n_positions} position embeddings do not form a square grid")
    return VisionConfig(hidden_size=hidden, n_layers=d.get("num_hidden_layers", 12), n_heads=heads,
                        head_dim=hidden // heads, mlp_size=d.get("intermediate_size", 3072),
                        norm_eps=float(d.get("layer_norm_eps", 1e-6)), image_size=GRID * PATCH,
                        patch_size=PATCH, vit_layers=tuple(vit_layers), post_lnorm=True,
                        output_size=output_size)


def qwen3_text_config(d: Mapping[str, Any], where: str, additional_vocab_size: int = 128) -> TextConfig:
    """TextConfig from a transformers Qwen3 config.json (the jina-vlm head is always untied)."""
    _need(d.get("model_type") == "qwen3", f"{where}: model_type {d.get('model_type')!r} is not 'qwen3'")
    _need(not d.get("attention_bias", False), f"{where}.attention_bias = true: jina-vlm's decoder has no "
                                              "attention bias")
    _need(d.get("hidden_act", "silu") == "silu", f"{where}.hidden_act must be 'silu'")
    _need(not d.get("use_sliding_window", False), f"{where}.use_sliding_window = true is not supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    _need(rope.get("rope_type", rope.get("type", "default")) == "default",
          f"{where}: rope scaling {rope!r} is not supported (plain RoPE only)")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    return TextConfig(hidden_size=hidden, n_layers=d["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=d.get("num_key_value_heads", heads),
                      head_dim=d.get("head_dim") or hidden // heads, mlp_size=d["intermediate_size"],
                      norm_eps=float(d.get("rms_norm_eps", 1e-6)), vocab_size=d["vocab_size"],
                      additional_vocab_size=additional_vocab_size, rope_theta=float(theta),
                      max_sequence_length=d.get("max_position_embeddings", 40960), tie_word_embeddings=False)


def components_config(vision_cfg: VisionConfig, text_cfg: TextConfig, **runtime) -> JinaVLMConfig:
    """The jina-vlm config around the two towers: pooling heads = ViT heads, projector width = Qwen3 MLP
    width (the released model's choices: 16 x 72 pooling on a 16 x 72 ViT, 6144 = Qwen3-1.7B's MLP)."""
    return JinaVLMConfig(
        vision=vision_cfg,
        connector=ConnectorConfig(pool_heads=vision_cfg.n_heads, pool_head_dim=vision_cfg.head_dim,
                                  projector_size=text_cfg.mlp_size),
        text=text_cfg, torch_dtype="bfloat16", **runtime)


# ---------------------------------------------------------------------------------- transforms

def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's antialiased bilinear resize (align_corners=False).

    Triangle filter of half-width max(scale, 1) around each output's source centre, clipped to the
    input and normalised; when enlarging it is exactly ordinary bilinear with edge clamping.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        j = np.arange(lo, hi)
        t = np.maximum(0.0, 1.0 - np.abs((j + 0.5 - centre) / support))
        w[i, lo:hi] = t / t.sum()
    return w


def resize_positions(table: np.ndarray, side: int) -> np.ndarray:
    """[g*g, d] position table -> [side*side, d], as Siglip2VisionEmbeddings resizes it (float32)."""
    g = math.isqrt(table.shape[0])
    if g == side:
        return table
    grid = table.astype(np.float32).reshape(g, g, -1)
    w = _aa_weights(g, side).astype(np.float32)
    out = np.einsum("ih,hwd->iwd", w, grid)
    out = np.einsum("jw,iwd->ijd", w, out)
    return out.reshape(side * side, -1).astype(table.dtype)


def conv_to_linear_patch(w: np.ndarray) -> np.ndarray:
    """Conv2d kernel [out, c, dy, dx] -> Linear [out, dy*dx*c] over (dy, dx, c)-ordered patches (trap 9)."""
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(w.shape[0], -1)


def new_embedding_rows(reader: CheckpointReader, name: str, n_new: int, seed: int,
                       chunk_rows: int = 8192) -> np.ndarray:
    """Initial rows for the additional (image-token) vocabulary: the mean existing embedding plus
    small Gaussian noise (1e-3 x the per-dimension std), like transformers' resize_token_embeddings,
    so the new tokens start as "an average token" and are distinct. Streams the table in chunks."""
    rows, d = reader.shape(name)
    s1 = np.zeros(d, np.float64)
    s2 = np.zeros(d, np.float64)
    for a in range(0, rows, chunk_rows):
        x = reader.read(name, (a, min(a + chunk_rows, rows))).astype(np.float64)
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
    mean = s1 / rows
    std = np.sqrt(np.maximum(s2 / rows - mean * mean, 0.0))
    noise = np.random.default_rng(seed).standard_normal((n_new, d))
    return (mean + 1e-3 * std * noise).astype(reader.dtype(name))


def connector_tensors(config: JinaVLMConfig, seed: int) -> dict[str, np.ndarray]:
    """A randomly initialised connector (the model's own initialisers, float32), in official names."""
    params = {"connector": _connector_init(config)(jax.random.key(seed))}
    return dict(official_tensors(config, params, select=lambda n: n.startswith(CONNECTOR)))


@functools.lru_cache(maxsize=8)
def _connector_init(config: JinaVLMConfig):
    """key -> connector params, jitted once per config. lazy_init traces only the param initialisers
    (no forward pass to compile)."""
    v, c = config.vision, config.connector
    mod = Connector(c, v.patches_per_side, config.text.hidden_size)
    feats = jax.ShapeDtypeStruct((1, 1, v.n_patches, v.hidden_size * len(v.vit_layers)), np.float32)
    masks = jax.ShapeDtypeStruct((1, 1, v.n_patches), np.float32)
    return jax.jit(lambda key: nn.unbox(mod.lazy_init(key, feats, masks)["params"]))


# ---------------------------------------------------------------------------------- the reader

@dataclass
class _Part:
    """One component tensor feeding (part of the rows of) an official tensor."""
    reader: CheckpointReader
    name: str                         # full component tensor name
    rows: int                         # rows this part contributes to the official tensor
    transform: str


def _prefix(names: list[str], suffix: str, where: str) -> str:
    """The name prefix of a component inside its checkpoint ('vision_model.', 'model.', '' ...)."""
    hits = [n[: -len(suffix)] for n in names if n.endswith(suffix)]
    if not hits:
        raise CheckpointError(f"{where}: no tensor named '*{suffix}' found; is this the right checkpoint?")
    return min(hits, key=len)


class ComponentReader:
    """A SigLIP(2) checkpoint + a Qwen3 checkpoint seen as one official jina-vlm checkpoint.

    Offers what `load_params` reads (`names`, `shape`, `dtype`, `read(name, rows)`, `where`, `dir`).
    Every component tensor is checked at construction: missing, unexpected and mis-shaped tensors of
    both checkpoints are reported in one error naming the directory and the tensor. Generated tensors
    (connector, new embedding rows) are held in memory (they are small); everything else is read on
    demand, so a conversion holds one tensor at a time.
    """

    def __init__(self, config: JinaVLMConfig, siglip: CheckpointReader, qwen3: CheckpointReader,
                 seed: int = 0, qwen3_tied: bool = False):
        self.config = config
        self.dir = f"{siglip.dir} + {qwen3.dir}"
        self.notes: list[str] = []
        self.table = {e.name: e for e in official_table(config)}
        self.parts: dict[str, list[_Part]] = {}
        problems: list[str] = []
        problems += self._plan(siglip, SIGLIP_ROWS, SIGLIP_ANCHOR, SIGLIP_DROPPED, config.vision.n_layers)
        problems += self._plan(qwen3, QWEN3_ROWS, QWEN3_ANCHOR, QWEN3_DROPPED, config.text.n_layers,
                               tied=qwen3_tied)
        if problems:
            raise CheckpointError(f"{self.dir}: component checkpoints do not match the config "
                                  f"({len(problems)} problems)\n" + "\n".join("  " + p for p in problems))
        self.generated = connector_tensors(config, seed)
        emb = self.parts[T + "embedding.embedding"][0]
        self.generated[NEW_EMBEDDING] = new_embedding_rows(emb.reader, emb.name,
                                                           config.text.additional_vocab_size, seed)
        self.where = {n: None for n in [*self.parts, *self.generated]}

    def _plan(self, reader: CheckpointReader, rows: tuple[Row, ...], anchor: str, dropped: re.Pattern,
              n_layers: int, tied: bool = False) -> list[str]:
        """Map every official tensor of `rows` to its component parts; return the problems found."""
        names = reader.names()
        prefix = _prefix(names, anchor, str(reader.dir))
        used, problems = set(), []
        for row in rows:
            for i in (range(n_layers) if "{i}" in row.official else [None]):
                off = row.official.format(i=i)
                entry = self.table.get(off)
                if entry is None:  # e.g. post_lnorm of a config without one
                    continue
                full = [s[1:] if s.startswith("/") else prefix + s for s in (x.format(i=i) for x in row.sources)]
                if row.fallback and full[0] not in reader.where and tied:
                    full = [prefix + row.fallback]
                    self.notes.append(f"{reader.dir}: tied embeddings; the untied jina-vlm {off} starts as "
                                      f"a copy of {full[0]}")
                # A fused official tensor splits into the official table's pieces, one per source.
                counts = ([pc.rows[1] - pc.rows[0] for pc in entry.pieces] if len(full) > 1
                          else [entry.shape[0]])
                parts = []
                for name, n in zip(full, counts):
                    want = (n,) + tuple(entry.shape[1:])
                    if name not in reader.where:
                        problems.append(f"missing: {name} (for {off}, shape {want})")
                        continue
                    used.add(name)
                    found = tuple(reader.shape(name))
                    if row.transform == "patch":
                        conv = (want[0], 3, PATCH, PATCH)
                        ok, want = found in (want, conv), f"{want} (linear) or {conv} (conv)"
                    elif row.transform == "positions":
                        g = math.isqrt(found[0]) if len(found) == 2 else 0
                        ok, want = g * g == found[0] and found[1:] == want[1:], f"[g*g, {want[1]}] (square grid)"
                        if ok and g != GRID:
                            self.notes.append(f"{name}: position grid {g}x{g} resized to {GRID}x{GRID} "
                                              "(bilinear, antialiased when shrinking, as Siglip2 does)")
                    else:
                        ok = found == want
                    if not ok:
                        problems.append(f"mis-shaped: {name}: expected {want}, found {found}")
                    else:
                        parts.append(_Part(reader, name, n, row.transform))
                if len(parts) == len(full):
                    self.parts[off] = parts
        leftover = [n for n in names if n not in used]
        drop = [n for n in leftover if dropped.search(n[len(prefix):] if n.startswith(prefix) else n)]
        problems += [f"unexpected: {n} (in {reader.dir})" for n in leftover if n not in drop]
        if drop:
            self.notes.append(f"{reader.dir}: {len(drop)} tensors with no place in jina-vlm dropped "
                              f"(e.g. {drop[0]}: pooling head / text tower / logit scale)")
        return problems

    # -- the CheckpointReader interface used by load_params
    def names(self) -> list[str]:
        """Official names of every tensor this reader provides."""
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Official shape of `name` (component shapes were checked against it)."""
        return self.table[name].shape

    def dtype(self, name: str) -> np.dtype:
        """Dtype of `name`: its (first) component tensor's, or float32 for generated tensors."""
        if name in self.generated:
            return self.generated[name].dtype
        return self.parts[name][0].reader.dtype(self.parts[name][0].name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The official tensor `name` (or its rows [a, b)), built from its component tensors."""
        if name in self.generated:
            w = self.generated[name]
            return w if rows is None else w[rows[0]:rows[1]]
        shape = self.table[name].shape
        a, b = rows if rows is not None else (0, shape[0])
        out, start = [], 0
        for p in self.parts[name]:
            lo, hi = max(a, start), min(b, start + p.rows)
            if lo < hi:
                if p.transform == "copy":
                    out.append(p.reader.read(p.name, (lo - start, hi - start)))
                else:
                    w = p.reader.read(p.name)
                    w = conv_to_linear_patch(w) if (p.transform == "patch" and w.ndim == 4) else w
                    w = resize_positions(w, GRID) if p.transform == "positions" else w
                    out.append(w[lo - start:hi - start])
            start += p.rows
        dt = self.dtype(name)
        return out[0] if len(out) == 1 else np.concatenate([o.astype(dt) for o in out], axis=0)


def open_components(siglip_dir: str | Path, qwen3_dir: str | Path, *, seed: int = 0,
                    vit_layers: tuple[int, ...] = (-4, -10), additional_vocab_size: int = 128,
                    **runtime) -> tuple[JinaVLMConfig, ComponentReader]:
    """Read both component directories: (jina-vlm config, ComponentReader in official names)."""
    siglip_dir, qwen3_dir = Path(siglip_dir), Path(qwen3_dir)
    sreader, qreader = CheckpointReader(siglip_dir), CheckpointReader(qwen3_dir)
    # The vision tower's own table (a full SiglipModel also has a text tower position table).
    pos = _prefix(sreader.names(), SIGLIP_ANCHOR, str(siglip_dir)) + "embeddings.position_embedding.weight"
    if pos not in sreader.where:
        raise CheckpointError(f"{siglip_dir}: no {pos} tensor; is this a SigLIP / SigLIP2 vision checkpoint?")
    qd = _read_json(qwen3_dir, "Qwen3")
    text = qwen3_text_config(qd, str(qwen3_dir / "config.json"), additional_vocab_size)
    vision = siglip_vision_config(_read_json(siglip_dir, "SigLIP"), str(siglip_dir / "config.json"),
                                  sreader.shape(pos)[0], vit_layers, text.hidden_size)
    config = components_config(vision, text, **runtime)
    return config, ComponentReader(config, sreader, qreader, seed,
                                   qwen3_tied=bool(qd.get("tie_word_embeddings", False)))
