"""The official jina-vlm checkpoint layout <-> our param tree: one name table serving both directions.

Each table row maps an official tensor name (with `{i}` for the layer) to one or more pieces of our
params: a row range of the official tensor, the param path, and how the layout changes:

* `linear`: official Linear weight [out, in] <-> our kernel [*in_dims, *out_dims] (transpose, reshape);
* `plain`: same values, only reshaped (biases, norms, embeddings).

Fused official tensors (qkv_w, kv_w, the SwiGLU `up` with value rows then gate rows, spec trap 4)
become several pieces. Scanned layers are stacked in our tree, so `layers.{i}` of the official name
is index i of the param's leading axis (vision blocks past the ones the forward pass runs live in
`unused_layers`, spec section 3).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from ..model.config import JinaVLMConfig
from ..model.jinavlm import abstract_params
from .safetensors_io import CheckpointError, CheckpointReader

Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Piece:
    path: Path_                      # our param path
    rows: tuple[int, int] | None     # rows of the official tensor (None = all)
    kind: str                        # "linear" | "plain"
    n_in: int = 1                    # linear: how many leading dims of our kernel are inputs


@dataclass(frozen=True)
class Entry:
    name: str                        # official tensor name
    shape: tuple[int, ...]           # official shape
    layer: int | None                # index on our stacked leading axis (None = not stacked)
    pieces: tuple[Piece, ...]
    zero_optional: bool = False      # may be absent and must then be zero (text q/k/v biases, spec 2)


def _rows(sizes: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for s in sizes:
        out.append((a, a + s))
        a += s
    return out


def official_table(config: JinaVLMConfig) -> list[Entry]:
    """Every tensor of the official checkpoint for this config, with the params it feeds."""
    v, c, t = config.vision, config.connector, config.text
    V, C, T = "model.vision_model.", "model.vision_model.vl_connector.", "model.language_model."
    dv, dp = v.hidden_size, c.pool_heads * c.pool_head_dim
    dq, dkv = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    E: list[Entry] = []

    def add(name, shape, *pieces, layer=None, zero_optional=False):
        E.append(Entry(name, tuple(shape), layer, tuple(pieces), zero_optional))

    add(V + "patch_embed.proj.weight", (dv, v.patch_dim), Piece(("vision", "patch_embed", "kernel"), None, "linear"))
    add(V + "patch_embed.proj.bias", (dv,), Piece(("vision", "patch_embed", "bias"), None, "plain"))
    add(V + "pos_embed", (v.n_patches, dv), Piece(("vision", "pos_embed"), None, "plain"))
    n_run = v.n_run_layers
    for i in range(v.n_layers):
        stack, li = ("layers", i) if i < n_run else ("unused_layers", i - n_run)
        p = ("vision", stack)
        L = f"{V}layers.{i}."
        q, k, vv = _rows([dv, dv, dv])
        add(L + "attn.qkv_w.weight", (3 * dv, dv), Piece(p + ("q", "kernel"), q, "linear"),
            Piece(p + ("k", "kernel"), k, "linear"), Piece(p + ("v", "kernel"), vv, "linear"), layer=li)
        for nm in "qkv":
            add(L + f"attn.{nm}_b", (dv,), Piece(p + (nm, "bias"), None, "plain"), layer=li)
        add(L + "attn.out.weight", (dv, dv), Piece(p + ("out", "kernel"), None, "linear", 2), layer=li)
        add(L + "attn.out.bias", (dv,), Piece(p + ("out", "bias"), None, "plain"), layer=li)
        for ours, theirs in (("attn_norm", "attn_lnorm"), ("ffn_norm", "ffn_lnorm")):
            add(L + f"{theirs}.weight", (dv,), Piece(p + (ours, "scale"), None, "plain"), layer=li)
            add(L + f"{theirs}.bias", (dv,), Piece(p + (ours, "bias"), None, "plain"), layer=li)
        add(L + "ffn.up.weight", (v.mlp_size, dv), Piece(p + ("up", "kernel"), None, "linear"), layer=li)
        add(L + "ffn.up.bias", (v.mlp_size,), Piece(p + ("up", "bias"), None, "plain"), layer=li)
        add(L + "ffn.down.weight", (dv, v.mlp_size), Piece(p + ("down", "kernel"), None, "linear"), layer=li)
        add(L + "ffn.down.bias", (dv,), Piece(p + ("down", "bias"), None, "plain"), layer=li)
    if v.post_lnorm:
        add(V + "post_lnorm.weight", (dv,), Piece(("vision", "post_norm", "scale"), None, "plain"))
        add(V + "post_lnorm.bias", (dv,), Piece(("vision", "post_norm", "bias"), None, "plain"))

    cin = dv * len(v.vit_layers)
    k = ("connector",)
    add(C + "pad_embed", (2, cin), Piece(k + ("pad_embed",), None, "plain"))
    add(C + "pooling.q_w.weight", (dp, cin), Piece(k + ("q", "kernel"), None, "linear"))
    kr, vr = _rows([dp, dp])
    add(C + "pooling.kv_w.weight", (2 * dp, cin), Piece(k + ("k", "kernel"), kr, "linear"),
        Piece(k + ("v", "kernel"), vr, "linear"))
    for nm in "qkv":
        add(C + f"pooling.{nm}_b", (dp,), Piece(k + (nm, "bias"), None, "plain"))
    add(C + "pooling.out.weight", (dp, dp), Piece(k + ("out", "kernel"), None, "linear", 2))
    add(C + "pooling.out.bias", (dp,), Piece(k + ("out", "bias"), None, "plain"))
    val, gate = _rows([c.projector_size, c.projector_size])
    add(C + "projector.up.weight", (2 * c.projector_size, dp),
        Piece(k + ("proj_value", "kernel"), val, "linear"), Piece(k + ("proj_gate", "kernel"), gate, "linear"))
    add(C + "projector.down.weight", (t.hidden_size, c.projector_size),
        Piece(k + ("proj_down", "kernel"), None, "linear"))

    d = t.hidden_size
    add(T + "embedding.embedding", (t.vocab_size, d), Piece(("text", "embedding"), None, "plain"))
    add(T + "embedding.new_embedding", (t.additional_vocab_size, d), Piece(("text", "new_embedding"), None, "plain"))
    for i in range(t.n_layers):
        p, L = ("text", "layers"), f"{T}layers.{i}."
        q, kk, vv = _rows([dq, dkv, dkv])
        add(L + "attn.qkv_w.weight", (dq + 2 * dkv, d), Piece(p + ("q", "kernel"), q, "linear"),
            Piece(p + ("k", "kernel"), kk, "linear"), Piece(p + ("v", "kernel"), vv, "linear"), layer=i)
        for nm, size in (("q", dq), ("k", dkv), ("v", dkv)):
            add(L + f"attn.{nm}_b", (size,), layer=i, zero_optional=True)
        add(L + "attn.out.weight", (d, dq), Piece(p + ("out", "kernel"), None, "linear", 2), layer=i)
        add(L + "attn.q_lnorm.weight", (t.head_dim,), Piece(p + ("q_norm", "scale"), None, "plain"), layer=i)
        add(L + "attn.k_lnorm.weight", (t.head_dim,), Piece(p + ("k_norm", "scale"), None, "plain"), layer=i)
        add(L + "attn_lnorm.weight", (d,), Piece(p + ("attn_norm", "scale"), None, "plain"), layer=i)
        add(L + "ffn_lnorm.weight", (d,), Piece(p + ("ffn_norm", "scale"), None, "plain"), layer=i)
        val, gate = _rows([t.mlp_size, t.mlp_size])
        add(L + "ffn.up.weight", (2 * t.mlp_size, d), Piece(p + ("up", "kernel"), val, "linear"),
            Piece(p + ("gate", "kernel"), gate, "linear"), layer=i)
        add(L + "ffn.down.weight", (d, t.mlp_size), Piece(p + ("down", "kernel"), None, "linear"), layer=i)
    add(T + "ln_f.weight", (d,), Piece(("text", "ln_f", "scale"), None, "plain"))
    add("lm_head.weight", (t.vocab_size, d), Piece(("text", "lm_head", "kernel"), None, "linear"))
    return E


# ------------------------------------------------------------------ the two directions of a piece

def to_ours(w: np.ndarray, piece: Piece, layer_shape: tuple[int, ...]) -> np.ndarray:
    """Official values (already cut to the piece's rows) -> our per-layer param layout.

    A transposed view where possible (reshape only splits axes): the caller's copy into the param
    buffer is then the only copy, which keeps a streaming conversion at one extra tensor of memory.
    """
    if piece.kind == "linear":
        return w.T.reshape(layer_shape)
    return w.reshape(layer_shape)


def to_official(p: np.ndarray, piece: Piece) -> np.ndarray:
    """Our per-layer param -> the official rows of the piece."""
    if piece.kind == "linear":
        n_in = int(np.prod(p.shape[:piece.n_in]))
        return np.ascontiguousarray(p.reshape(n_in, -1).T)
    return p  # the caller reshapes to the official shape


def _get(tree: dict, path: Path_):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path_, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def pieces_by_param(config: JinaVLMConfig) -> dict[Path_, list[tuple[Entry, Piece]]]:
    out: dict[Path_, list[tuple[Entry, Piece]]] = {}
    for e in official_table(config):
        for pc in e.pieces:
            out.setdefault(pc.path, []).append((e, pc))
    return out


# ------------------------------------------------------------------ official -> params

def check_checkpoint(config: JinaVLMConfig, names: dict[str, tuple[int, ...]], source: str) -> None:
    """Compare the checkpoint's tensors against the table; report every problem in one error."""
    table = {e.name: e for e in official_table(config)}
    missing = [n for n, e in table.items() if n not in names and not e.zero_optional]
    unexpected = sorted(set(names) - set(table))
    bad = [f"{n}: expected {table[n].shape}, found {tuple(names[n])}"
           for n in table if n in names and tuple(names[n]) != table[n].shape]
    if missing or unexpected or bad:
        lines = [f"{source}: checkpoint does not match the config "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(bad)} mis-shaped tensors)"]
        lines += [f"  missing: {n}" for n in missing]
        lines += [f"  unexpected: {n}" for n in unexpected]
        lines += [f"  mis-shaped: {b}" for b in bad]
        raise CheckpointError("\n".join(lines))


def load_params(config: JinaVLMConfig, reader: CheckpointReader, *, dtype: Any = None,
                place: Callable[[Path_, np.ndarray], Any] | None = None,
                progress: Callable[[str, int], None] | None = None) -> dict:
    """Build our param tree from official tensors, one param at a time.

    `dtype`: target dtype (None keeps the checkpoint's). `place(path, array)` puts each finished
    param where it belongs (e.g. `jax.device_put` onto its sharding); default: `jax.numpy.asarray`.
    Only one param's host buffer is alive at a time besides what `place` keeps.
    """
    check_checkpoint(config, {n: reader.shape(n) for n in reader.names()}, str(reader.dir))
    for e in official_table(config):
        if e.zero_optional and e.name in reader.where:
            w = reader.read(e.name)
            if np.any(w.astype(np.float32) != 0):
                raise CheckpointError(f"{reader.dir}: tensor {e.name} is non-zero; jinavlm-jax implements the "
                                      "released model, whose text attention has no bias")
    abstract = abstract_params(config)
    place = place or (lambda path, a: jax.numpy.asarray(a))
    params: dict = {}
    for path, contributors in pieces_by_param(config).items():
        spec = _get(abstract, path)
        e0 = contributors[0][0]
        src_dtype = reader.dtype(e0.name)
        out = np.empty(spec.shape, dtype=np.dtype(dtype) if dtype is not None else src_dtype)
        layer_shape = spec.shape[1:] if e0.layer is not None else spec.shape
        for e, pc in contributors:
            w = reader.read(e.name, pc.rows)
            val = to_ours(w, pc, layer_shape)
            if e.layer is None:
                out[...] = val
            else:
                out[e.layer] = val
            if progress:
                progress(e.name, w.nbytes)
            del w, val  # free the source tensor before the next one is read / the param is placed
        _set(params, path, place(path, out))
        del out
    return params


def official_tensors(config: JinaVLMConfig, params: dict, include_zero_biases: bool = True,
                     select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Our params -> (official name, array) in table order, one tensor at a time (the inverse of load).

    `select(name)` keeps only some tensors; `params` then needs only the subtrees they read.
    """
    for e in official_table(config):
        if select is not None and not select(e.name):
            continue
        if not e.pieces:
            if include_zero_biases:
                ref = np.asarray(_get(params, ("text", "ln_f", "scale")))
                yield e.name, np.zeros(e.shape, ref.dtype)
            continue
        parts = []
        for pc in e.pieces:
            p = np.asarray(jax.device_get(_get(params, pc.path)))
            if e.layer is not None:
                p = p[e.layer]
            parts.append(to_official(p, pc).reshape((-1,) + e.shape[1:]) if len(e.shape) > 1
                         else to_official(p, pc).reshape(-1))
        w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        yield e.name, w.reshape(e.shape)


def load_jina_vlm(hf_dir: str | Path, dtype: Any = None, place=None) -> tuple[JinaVLMConfig, dict]:
    """Load an official jina-vlm directory (config.json + safetensors, single or sharded).

    Returns (config, params). `dtype` casts the params (None keeps the checkpoint dtype); the
    returned config's param_dtype says which. Missing, unexpected and mis-shaped tensors are all
    reported at once, naming each tensor and the directory. Zero text attention biases may be absent.
    """
    hf_dir = Path(hf_dir)
    config = JinaVLMConfig.from_hf(hf_dir)
    reader = CheckpointReader(hf_dir)
    params = load_params(config, reader, dtype=dtype, place=place)
    leaf = jax.tree_util.tree_leaves(params)[0]
    config = config.replace(param_dtype=np.dtype(leaf.dtype).name)
    return config, params
