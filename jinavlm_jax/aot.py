"""Ahead-of-time compilation for TPU pods, from any host: does a step fit, how fast can it be.

    jinavlm aot --topology v5e:2x4 --mesh data=1,fsdp=8,tensor=1 --job train \\
        --config configs/stage2_instruct.yaml model.remat_policy=full --batch-per-chip 1
    python -m jinavlm_jax.aot --report docs/tpu.md          # the table of docs/tpu.md

libtpu (the `[tpu]` install extra) compiles for a TPU topology without TPU chips: the topology's
compile-only devices make a (data, fsdp, tensor) mesh (several slices are stacked on `data`, so only
data parallelism crosses the slow inter-slice network), and the project's REAL programs -- the
train step of `train.step.make_steps`, the prefill and the decode loop of `generate` -- are lowered
on abstract full-size params and optimizer state (`jax.eval_shape`: nothing is materialised) and
compiled by XLA:TPU. Printed per device: argument, output, temporary and peak bytes against the
chip's HBM, FLOPs, bytes accessed, and the step time and MFU those imply at the chip's peak rate.

FLOPs. XLA's `cost_analysis()` counts the body of a loop once (our layers are an `nn.scan`, the
chunked loss a `lax.scan`) and does not see inside Pallas kernels (splash attention). We *scale*:
the jaxpr of the very program that is compiled is walked, counting 2*M*N*K for every dot_general
(remat recomputation included, it is in the jaxpr), each scan body times its length and each Pallas
kernel body times its grid; compiled FLOPs per device = that total / devices (matmuls only:
elementwise work is ~1-2% here). A `while` loop (the decode loop) has no static trip count: its body
is one decode step, which is what the decode figures are per.

XLA:TPU also turns FSDP matmuls into collective-matmul loops (the weight all-gather overlapped with
the compute), whose bodies it counts once too, so its raw figure is reported only for reference.

Step time and MFU are lower/upper bounds, not measurements: time >= max(FLOPs / peak, bytes / HBM
bandwidth) per device, MFU <= model FLOPs / (devices x peak x that time), where model FLOPs follow
the formula of `model_flops` (6 x params x tokens + attention, no rematerialisation). Bytes: XLA's
bytes accessed (loop bodies once, so the bandwidth bound is optimistic for scanned programs); for a
decode step, the decoder weights + KV cache shards it reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

GiB = 2 ** 30


class AOTError(ValueError):
    """A request the AOT driver cannot serve (bad topology / mesh, missing libtpu); one line, no traceback."""


class DoesNotFit(AOTError):
    """The compiled program needs more memory per chip than the chip has (names both and what to change)."""


# ---------------------------------------------------------------------------------------- chips

@dataclass(frozen=True)
class Chip:
    """One TPU chip: usable HBM, dense bf16 peak and HBM bandwidth (public Cloud TPU spec sheets)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float      # bytes / s
    device_kind: str


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, "TPU v4"),
    "v5e": Chip("v5e", int(15.75 * GiB), 197e12, 819e9, "TPU v5 lite"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, "TPU v5"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, "TPU v6 lite"),
}


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5e:2x4' -> (the v5e chip, (2, 4)). The chip count is the product of the dims."""
    m = re.fullmatch(r"(v\w+?):(\d+(?:x\d+){1,2})", topology.strip())
    if not m or m.group(1) not in CHIPS:
        raise AOTError(f"topology {topology!r}: expected <chip>:<dims> such as v5e:2x4, v5e:16x16 or v5p:2x2x1 "
                       f"with chip one of {sorted(CHIPS)}")
    return CHIPS[m.group(1)], tuple(int(x) for x in m.group(2).split("x"))


def libtpu_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def compile_only_devices(topology: str, num_slices: int = 1) -> list:
    """The compile-only TPU devices of `num_slices` slices of `topology` (needs libtpu, no TPU)."""
    chip, dims = parse_topology(topology)
    if not libtpu_available():
        raise AOTError("compiling for TPU needs libtpu: pip install 'jinavlm-jax[tpu]' (jax[tpu]); no TPU "
                       "hardware is needed")
    # Compile-only use: let several processes load libtpu (no chip is opened), e.g. a test run
    # beside `--report`; otherwise the second one fails on /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    bounds = tuple(min(d, 2) for d in dims[:2]) + (1,)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=num_slices)
    except Exception as e:  # libtpu's errors are RuntimeErrors with long texts
        raise AOTError(f"libtpu cannot build topology {topology!r} x {num_slices} slice(s): "
                       f"{str(e).splitlines()[0][:300]}") from None
    devices = list(desc.devices)
    want = math.prod(dims) * num_slices
    if len(devices) != want:
        raise AOTError(f"topology {topology!r} x {num_slices} slice(s) gave {len(devices)} devices, expected {want}")
    return devices


def build_mesh(devices: Sequence, sizes: dict[str, int], num_slices: int = 1):
    """A (data, fsdp, tensor) `Mesh` over compile-only devices, laid out along the physical topology.

    One axis may be -1 (the rest). With several slices the slices are the outer part of `data`
    (`data` must be a multiple of the slice count): FSDP and tensor collectives stay inside a slice.
    """
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh
    from .sharding import MESH_AXES

    n = len(devices)
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise AOTError(f"mesh {sizes}: sizes must be >= 1, with at most one -1")
    if free:
        rest = math.prod(v for v in sizes.values() if v != -1)
        if n % rest:
            raise AOTError(f"mesh {sizes}: {n} devices cannot be split that way")
        sizes[free[0]] = n // rest
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != n:
        raise AOTError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {math.prod(shape)} devices, "
                       f"but the topology has {n}")
    if num_slices > 1:
        if shape[0] % num_slices:
            raise AOTError(f"mesh data={shape[0]} must be a multiple of --num-slices {num_slices}: slices are laid "
                           "out on the data axis (only data parallelism crosses the inter-slice network)")
        ici = (shape[0] // num_slices,) + shape[1:]
        try:
            arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
        except NotImplementedError:  # an axis that is not a product of physical axes: split them
            arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices,
                                                       allow_split_physical_axes=True)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # shapes the topology-aware layout does not cover: plain device order
            arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


# ---------------------------------------------------------------------------------------- FLOPs

def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def _dot_flops(eqn) -> float:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    contract = _prod(lhs.shape[i] for i in lc)
    batch = _prod(lhs.shape[i] for i in lb)
    lfree = _prod(lhs.shape) // max(contract * batch, 1)
    rfree = _prod(rhs.shape) // max(contract * batch, 1)
    return 2.0 * batch * lfree * rfree * contract


def _subjaxprs(eqn):
    from jax.extend import core as jcore
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


@dataclass
class JaxprFlops:
    """Matmul FLOPs of a jaxpr (global, all devices): `all` counts every scan iteration, `once`
    counts each scan body once (as XLA's cost analysis does); `pallas` is inside Pallas kernels."""

    all: float = 0.0
    once: float = 0.0
    pallas: float = 0.0
    scans: list = field(default_factory=list)   # (length, body FLOPs) of the outermost scans


def count_flops(jaxpr) -> JaxprFlops:
    """Walk a jaxpr (and every sub-jaxpr): dot_general = 2*M*N*K; see JaxprFlops."""
    def walk(jx, in_pallas: bool, depth: int) -> tuple[float, float, float]:
        tot_all = tot_once = pal = 0.0
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                f = _dot_flops(eqn)
                if in_pallas:
                    pal += f
                else:
                    tot_all += f
                    tot_once += f
            elif name == "scan":
                a, o, p = walk(eqn.params["jaxpr"].jaxpr, in_pallas, depth + 1)
                n = int(eqn.params["length"])
                tot_all, tot_once, pal = tot_all + n * a, tot_once + o, pal + n * p
                if depth == 0:
                    res.scans.append((n, a))
            elif name == "cond":
                parts = [walk(b.jaxpr, in_pallas, depth + 1) for b in eqn.params["branches"]]
                best = max(parts, key=lambda t: t[0] + t[2])
                tot_all, tot_once, pal = tot_all + best[0], tot_once + best[1], pal + best[2]
            elif name == "pallas_call":
                grid = _prod(getattr(eqn.params["grid_mapping"], "grid", ()) or (1,))
                a, _, p = walk(eqn.params["jaxpr"], True, depth + 1)
                pal += grid * (a + p)
            elif name == "shard_map":
                mesh = eqn.params["mesh"]
                axes = eqn.params.get("manual_axes") or eqn.params.get("axis_names") or mesh.axis_names
                k = _prod(mesh.shape[a] for a in axes)
                a, o, p = walk(eqn.params["jaxpr"], in_pallas, depth)
                tot_all, tot_once, pal = tot_all + k * a, tot_once + k * o, pal + k * p
            else:
                for sub in _subjaxprs(eqn):
                    a, o, p = walk(sub, in_pallas, depth)
                    tot_all, tot_once, pal = tot_all + a, tot_once + o, pal + p
        return tot_all, tot_once, pal

    res = JaxprFlops()
    res.all, res.once, res.pallas = walk(jaxpr, False, 0)
    return res


# ---------------------------------------------------------------------------------------- model FLOPs

def model_flops(config, *, rows: int, seq_len: int, crops: int, train: bool, train_vision: bool = True,
                logit_positions: int | None = None) -> dict:
    """Model FLOPs of one step: 6 x params x tokens + attention (training), 2 x ... (forward).

    Each weight matrix counts the tokens that pass through it: text layers and lm_head every
    position of every row (padding included), the ViT blocks actually run (the deepest feature layer,
    25 of 27) every patch of every crop, the pooling k/v the 4 members of every 2x2 window, q, o and
    the projector once per window. Embedding tables are lookups (0 FLOPs). Attention: 2 matmuls
    (QK^T, PV) of 2*L^2*H*hd each per layer, the full L x L square (what the XLA path computes;
    the causal splash kernel skips about half of the decoder's). `logit_positions`: positions per row
    the lm_head runs on (the prefill: 1; default all). Training = 3 x forward (backward
    = 2 x forward) for trained towers, 1 x for a frozen vision tower; no rematerialisation counted.
    """
    t, v, c = config.text, config.vision, config.connector
    d, vd = t.hidden_size, v.hidden_size
    layer_params = t.n_layers * (d * (t.n_heads + 2 * t.n_kv_heads) * t.head_dim + t.n_heads * t.head_dim * d
                                 + 3 * d * t.mlp_size)
    text_params = layer_params + d * t.vocab_size
    tokens = rows * seq_len
    logit_tokens = tokens if logit_positions is None else rows * logit_positions
    text = (2 * layer_params * tokens + 2 * d * t.vocab_size * logit_tokens
            + 2 * 2 * t.n_layers * t.n_heads * t.head_dim * seq_len ** 2 * rows)
    n_crops = rows * crops
    p = v.n_patches
    vit_params = v.n_run_layers * (4 * vd * v.n_heads * v.head_dim + 2 * vd * v.mlp_size) + v.patch_dim * vd
    vision = 2 * vit_params * p * n_crops + 2 * 2 * v.n_run_layers * v.n_heads * v.head_dim * p * p * n_crops
    cin = vd * len(v.vit_layers)
    hd = c.pool_heads * c.pool_head_dim
    side = v.patches_per_side
    windows = (-(-side // c.pooling_h)) * (-(-side // c.pooling_w)) * n_crops
    members = c.pooling_h * c.pooling_w
    conn = 2 * windows * (members * 2 * cin * hd + cin * hd + hd * hd + 2 * hd * c.projector_size
                          + c.projector_size * d) + 2 * 2 * windows * members * hd
    if not train:
        total = text + vision + conn
    else:
        total = 3 * (text + conn) + (3 if train_vision else 1) * vision
    text_attn = 2 * 2 * t.n_layers * t.n_heads * t.head_dim * seq_len ** 2 * rows
    vision_attn = 2 * 2 * v.n_run_layers * v.n_heads * v.head_dim * p * p * n_crops
    return {"total": float(total), "text": float(text), "vision": float(vision), "connector": float(conn),
            "text_layers": float(text - 2 * d * t.vocab_size * logit_tokens), "text_attention": float(text_attn),
            "vision_attention": float(vision_attn), "text_params": text_params, "vit_params": vit_params,
            "tokens": tokens, "patches": p * n_crops}


def remat_recompute_flops(config, policy: str, *, rows: int, seq_len: int, crops: int, train_vision: bool = True
                          ) -> float:
    """FLOPs one train step spends recomputing what the remat policy did not save (all devices).

    Both towers' scanned layers are under `nn.remat`: `full` reruns their whole forward in the backward
    pass (text layers without the lm_head; the ViT blocks if the vision tower trains), the
    `*no_batch_dims*` policies rerun only the matmuls with batch dimensions (the attention einsums),
    `dots_saveable` and `none` rerun no matmul. The patch embedding, connector and lm_head are not
    under remat.
    """
    f = model_flops(config, rows=rows, seq_len=seq_len, crops=crops, train=True, train_vision=train_vision)
    vision_on = 1.0 if train_vision else 0.0
    if policy == "full":
        patch_embed = 2 * config.vision.patch_dim * config.vision.hidden_size * f["patches"]
        return f["text_layers"] + vision_on * (f["vision"] - patch_embed)
    if "no_batch_dims" in policy:
        return f["text_attention"] + vision_on * f["vision_attention"]
    return 0.0


# ---------------------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """A program to compile: a jitted function, its abstract arguments and what one call is."""

    kind: str                      # train | prefill | decode
    fn: Any                        # a jax.jit-wrapped function (has .trace / .lower)
    args: tuple
    static: dict                   # described in the report
    model_flops: float             # per call, all devices (formula)
    per: str                       # what one call is ("step", "prefill", "decode step")
    tokens: int                    # tokens processed per call (all devices)
    arithmetic: dict = field(default_factory=dict)   # expected argument bytes etc.


def _sds(shape, dtype, sharding=None):
    import jax
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype) if isinstance(dtype, str) else dtype,
                                sharding=sharding)


def _with_shardings(tree, shardings):
    import jax
    return jax.tree_util.tree_map(lambda a, s: _sds(a.shape, a.dtype, s), tree, shardings)


def _nbytes(tree) -> int:
    import jax
    return int(sum(_prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)
                   if hasattr(a, "shape")))


def _shard_bytes(tree, tiled: bool = False) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the first device's shard).

    tiled=True pads like the TPU memory layout: the last dim to a multiple of 128 lanes, the one
    before to 8 sublanes x (4 / itemsize) (e.g. the ViT's head_dim 72 takes 128 lanes).
    """
    import jax
    total = 0
    for a in jax.tree_util.tree_leaves(tree):
        if not hasattr(a, "shape"):
            continue
        shape = list(a.sharding.shard_shape(a.shape)) if a.sharding is not None else list(a.shape)
        size = np.dtype(a.dtype).itemsize
        if tiled and shape:
            shape[-1] = -(-shape[-1] // 128) * 128
            if len(shape) >= 2:
                sub = 8 * max(1, 4 // size)
                shape[-2] = -(-shape[-2] // sub) * sub
        total += _prod(shape) * size
    return int(total)


def load_recipe(path: str | None, overrides: Sequence[str]):
    """(TrainConfig, model config) from a recipe + key=value overrides (no recipe: one trained group)."""
    from .train.config import load_config
    from .train.loop import build_model_config
    base = None if path else {"model": {"config": "jina_vlm_2_4b", "dtype": "bfloat16", "param_dtype": "float32"},
                              "data": {"sources": {"aot": {"path": "unused-by-aot"}}},
                              "optimizer": {"groups": {"all": {"regex": ".*", "lr": 1e-5}}}}
    cfg = load_config(path, overrides, base=base)
    return cfg, build_model_config(cfg)


def train_job(cfg, model_cfg, mesh, batch_per_chip: int | None = None) -> Job:
    """The real train step (`train.step.make_steps`) on abstract full-size state and batch."""
    import jax
    import jax.numpy as jnp
    from .model import abstract_params, tokens_per_crop
    from .train.optim import make_optimizer
    from .train.step import BATCH_KEYS, make_steps

    d, o = cfg.data, cfg.optimizer
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch_per_chip * shards if batch_per_chip else d.batch_size
    if (rows // o.grad_accum) % shards or rows % o.grad_accum:
        raise AOTError(f"batch {rows} rows / grad_accum {o.grad_accum} is not a multiple of the mesh's batch "
                       f"shards (data x fsdp = {shards})")
    params = abstract_params(model_cfg)
    tx, groups = make_optimizer(o, cfg.run.steps, params)
    fns = make_steps(model_cfg, tx, groups, mesh, params, grad_accum=o.grad_accum, loss_chunk=cfg.run.loss_chunk)
    opt_state = jax.eval_shape(tx.init, params)
    state = {"step": _sds((), jnp.int32), "params": params, "opt_state": opt_state}
    state = _with_shardings(state, fns.state_shardings)
    v = model_cfg.vision
    L, T = d.seq_len, d.crops_per_row
    shapes = {"input_ids": ((rows, L), "int32"), "labels": ((rows, L), "int32"), "weights": ((rows, L), "float32"),
              "positions": ((rows, L), "int32"), "segment_ids": ((rows, L), "int32")}
    if T:
        img_dtype = jnp.bfloat16 if d.image_dtype == "bfloat16" else jnp.float32
        shapes.update(images=((rows, T, v.n_patches, v.patch_dim), img_dtype),
                      image_masks=((rows, T, v.n_patches), "int32"),
                      image_input_idx=((rows, T, tokens_per_crop(model_cfg)), "int32"))
    assert set(shapes) <= set(BATCH_KEYS)
    plain = {k: _sds(s, dt) for k, (s, dt) in shapes.items()}
    batch = {k: _sds(a.shape, a.dtype, s) for (k, a), s in zip(plain.items(), fns.batch_shardings(plain).values())}
    fn = fns.jitted("train", plain)

    trained = jax.tree_util.tree_leaves(groups.trainable_mask())
    leaves = jax.tree_util.tree_leaves(params)
    n_params = sum(_prod(a.shape) for a in leaves)
    n_trained = sum(_prod(a.shape) for a, t in zip(leaves, trained) if t)
    vision_trained = all(jax.tree_util.tree_leaves(groups.trainable_mask()["vision"]))
    flops = model_flops(model_cfg, rows=rows, seq_len=L, crops=T, train=True, train_vision=vision_trained)
    p_bytes, o_bytes, b_bytes = _nbytes(params), _nbytes(opt_state), _nbytes(plain)
    arithmetic = {
        "params": n_params, "trained_params": n_trained, "param_bytes": p_bytes, "opt_state_bytes": o_bytes,
        "batch_bytes": b_bytes, "fsdp": mesh.shape["fsdp"], "tensor": mesh.shape["tensor"],
        "expected_argument_bytes_per_device": (p_bytes + o_bytes) / (mesh.shape["fsdp"] * mesh.shape["tensor"])
        + b_bytes / shards,
        "formula": "(params + optimizer state) / (fsdp x tensor) + batch / (data x fsdp)",
        # What one device really holds: unevenly divisible / replicated leaves, then TPU tile padding.
        "sharded_bytes_per_device": _shard_bytes((state, batch)),
        "tiled_bytes_per_device": _shard_bytes((state, batch), tiled=True),
    }
    static = {"rows": rows, "seq_len": L, "crops_per_row": T, "grad_accum": o.grad_accum,
              "loss_chunk": cfg.run.loss_chunk, "vision_trained": vision_trained}
    return Job("train", fn, (state, batch), static, flops["total"], "step", rows * L, arithmetic)


def _inference_inputs(model_cfg, mesh, rows: int, prompt_len: int, crops: int):
    import jax.numpy as jnp
    from .model import tokens_per_crop
    from .sharding import named
    v = model_cfg.vision
    act = lambda nd: named(mesh, ("act_batch",) + (None,) * (nd - 1))
    ids = _sds((rows, prompt_len), jnp.int32, act(2))
    mask = _sds((rows, prompt_len), jnp.bool_, act(2))
    if not crops:
        return ids, mask, None, None, None
    return (ids, mask, _sds((rows, crops, v.n_patches, v.patch_dim), jnp.float32, act(4)),
            _sds((rows, crops, v.n_patches), jnp.int32, act(3)),
            _sds((rows, crops, tokens_per_crop(model_cfg)), jnp.int32, act(3)))


def _inference_params(model_cfg, mesh):
    from .inference import abstract_inference_params, inference_config
    from .inference.params import InferenceParams
    from .sharding import param_shardings
    params = abstract_inference_params(model_cfg)
    return InferenceParams(_with_shardings(params.tree, param_shardings(inference_config(model_cfg), mesh)))


def prefill_job(model_cfg, mesh, rows: int, prompt_len: int, crops: int, cache_len: int) -> Job:
    """The real prefill (`inference.programs.prefill`): ViT on every crop, connector, all decoder layers, cache."""
    from .inference import programs
    params = _inference_params(model_cfg, mesh)
    args = (model_cfg, cache_len, params) + _inference_inputs(model_cfg, mesh, rows, prompt_len, crops)
    flops = model_flops(model_cfg, rows=rows, seq_len=prompt_len, crops=crops, train=False, logit_positions=1)
    arithmetic = {"param_bytes": _nbytes(params), "tensor": mesh.shape["tensor"], "fsdp": mesh.shape["fsdp"]}
    static = {"rows": rows, "prompt_len": prompt_len, "crops": crops, "cache_len": cache_len}
    return Job("prefill", programs.prefill_jit, args, static, flops["total"], "prefill", rows * prompt_len, arithmetic)


def decode_job(model_cfg, mesh, rows: int, prompt_len: int, crops: int, cache_len: int) -> Job:
    """The real decode loop (`inference.programs.decode_loop`, greedy) over a full KV cache; one loop
    body = one token."""
    import jax
    import jax.numpy as jnp
    from .inference import programs
    from .inference.generator import MAX_STOP_IDS
    from .sharding import named
    params = _inference_params(model_cfg, mesh)
    pre = jax.eval_shape(lambda *a: programs.prefill(model_cfg, cache_len, *a),
                         params, *_inference_inputs(model_cfg, mesh, rows, prompt_len, crops))
    logits0, caches, kv_valid, last_pos = pre
    act = lambda nd: named(mesh, ("act_batch",) + (None,) * (nd - 1))
    caches = jax.tree_util.tree_map(lambda a: _sds(a.shape, a.dtype, named(mesh, programs.CACHE_AXES, shape=a.shape)),
                                    caches)
    args = (model_cfg, prompt_len, False, False, params, caches,
            _sds(kv_valid.shape, kv_valid.dtype, act(2)), _sds(logits0.shape, logits0.dtype, act(2)),
            _sds(last_pos.shape, last_pos.dtype, act(1)), _sds((rows,), jnp.uint32, act(1)),
            _sds((rows,), jnp.float32, act(1)), _sds((rows,), jnp.int32, act(1)), _sds((rows,), jnp.float32, act(1)),
            _sds((MAX_STOP_IDS,), jnp.int32), _sds((), jnp.int32), _sds((rows,), jnp.bool_, act(1)))
    t = model_cfg.text
    # One token per row: 2 x params; attention over the whole cache (the XLA path reads every slot).
    f = model_flops(model_cfg, rows=rows, seq_len=1, crops=0, train=False)["text"]
    f += 2 * 2 * t.n_layers * t.n_heads * t.head_dim * cache_len * rows
    # A decode step reads the decoder's weights and the whole cache (the XLA path attends over every
    # slot): the bandwidth bound per step. XLA's bytes-accessed figure for the loop program also holds
    # one-time work outside the loop (the cache relayout before and after it), so it is not used.
    arithmetic = {"param_bytes": _nbytes(params), "kv_cache_bytes": _nbytes(caches),
                  "tensor": mesh.shape["tensor"], "fsdp": mesh.shape["fsdp"],
                  "bytes_per_step": _shard_bytes((params.tree["text"], caches))}
    static = {"rows": rows, "prompt_len": prompt_len, "cache_len": cache_len, "sampling": "greedy"}
    return Job("decode", programs.decode_loop_jit, args, static, float(f), "decode step", rows, arithmetic)


# ---------------------------------------------------------------------------------------- compile

# XLA:TPU's out-of-memory texts: "... required for HLO temporaries (65.34G) exceeds available HBM
# (15.75G)" (libtpu 0.0.42) or, in other versions, "Used 20.5G of 15.75G hbm".
_OOM_TEMP = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", re.I)
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm", re.I)
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _advice(mesh, model_cfg, job: str) -> str:
    tips = []
    if job == "train":
        if model_cfg.remat_policy != "full":
            tips.append("rematerialise more (model.remat_policy=full)")
        n = mesh.size
        if mesh.shape["fsdp"] < n:
            tips.append(f"shard more with FSDP (--mesh data=1,fsdp={n},tensor=1)")
        tips.append("fewer rows per chip (--batch-per-chip, or data.batch_size with optimizer.grad_accum)")
        if model_cfg.attention_impl != "splash":
            tips.append("use the splash attention kernel (model.attention_impl=splash)")
    else:
        tips.append("more tensor parallelism (--mesh ...,tensor=N) or FSDP, a smaller --batch or a shorter cache")
    tips.append("or a chip with more HBM")
    return "; ".join(tips)


def _does_not_fit(chip: Chip, topology: str, mesh, model_cfg, job: str, needed: float | None, detail: str = ""):
    need = f"at least {needed / GiB:.2f} GiB" if needed else "more than that"
    return DoesNotFit(f"{job} does not fit on {topology} ({chip.name}, {chip.hbm_bytes / GiB:.2f} GiB HBM per chip): "
                      f"needs {need} per chip with mesh {dict(mesh.shape)}, remat_policy={model_cfg.remat_policy}, "
                      f"attention_impl={model_cfg.attention_impl}. To fit: {_advice(mesh, model_cfg, job)}"
                      + (f" [{detail}]" if detail else ""))


def compile_job(job: Job, mesh, chip: Chip, topology: str, model_cfg, *, allow_oversize: bool = False) -> dict:
    """Lower, count, compile. Returns the figures (per device unless named otherwise).

    Raises DoesNotFit when XLA:TPU runs out of HBM (or, unless allow_oversize, when the peak exceeds
    the chip's usable HBM).
    """
    from .sharding import use_mesh

    n = mesh.size
    t0 = time.perf_counter()
    with use_mesh(mesh):
        traced = job.fn.trace(*job.args)
        lowered = traced.lower()
    t_lower = time.perf_counter() - t0
    jf = count_flops(traced.jaxpr.jaxpr)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU reports running out of HBM as an XlaRuntimeError at compile time
        msg = str(e)
        if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
            args_bytes = _shard_bytes(job.args)
            needed, detail = None, ""
            if (m := _OOM_USED.search(msg)):
                needed = float(m.group(1)) * _UNITS[m.group(2).upper()]
                detail = f"XLA:TPU: used {m.group(1)}{m.group(2)} of {m.group(3)}{m.group(4)} HBM"
            elif (m := _OOM_TEMP.search(msg)):
                temp = float(m.group(1)) * _UNITS[m.group(2).upper()]
                needed = temp + args_bytes
                detail = (f"XLA:TPU: temporaries {temp / GiB:.2f} GiB + arguments {args_bytes / GiB:.2f} GiB "
                          "(params, optimizer state and batch shards)")
            else:
                detail = next((ln.strip() for ln in msg.splitlines() if "memory" in ln.lower()), msg[:200])[:300]
            err = _does_not_fit(chip, topology, mesh, model_cfg, job.kind, needed, detail)
            err.flops = _flops_fields(jf, n, job)
            raise err from None
        raise
    t_compile = time.perf_counter() - t1

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    arg, out, tmp, alias = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias"))
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or (arg + out - alias + tmp))
    xla_flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    flops = (jf.all + jf.pallas) / n
    t_compute = flops / chip.peak_flops
    bytes_for_bound = job.arithmetic.get("bytes_per_step", bytes_accessed)
    t_memory = bytes_for_bound / chip.hbm_bandwidth
    t_step = max(t_compute, t_memory)
    mfu = job.model_flops / (n * chip.peak_flops * t_step) if t_step else 0.0
    res = {
        "topology": topology, "chip": chip.name, "devices": n, "mesh": dict(mesh.shape), "job": job.kind,
        "per": job.per, "static": job.static,
        "model": {"dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
                  "remat_policy": model_cfg.remat_policy, "attention_impl": model_cfg.attention_impl},
        "memory": {"argument": arg, "output": out, "temp": tmp, "alias": alias, "peak": peak,
                   "generated_code": int(mem.generated_code_size_in_bytes), "hbm": chip.hbm_bytes,
                   "fits": peak <= chip.hbm_bytes},
        "flops": _flops_fields(jf, n, job) | {"xla_cost_analysis": xla_flops},
        "bytes_accessed": bytes_accessed,
        "bytes_for_bandwidth_bound": bytes_for_bound,
        "time": {"compute_bound_s": t_compute, "memory_bound_s": t_memory, "step_lower_bound_s": t_step,
                 "mfu_upper_bound": mfu, "tokens_per_s_upper_bound": job.tokens / t_step if t_step else None},
        "chip_spec": dataclasses.asdict(chip),
        "arithmetic": job.arithmetic,
        "seconds": {"lower": t_lower, "compile": t_compile},
        "output_shardings": _sharding_summary(compiled.output_shardings),
    }
    if "expected_argument_bytes_per_device" in job.arithmetic:
        res["arithmetic"]["argument_over_expected"] = arg / job.arithmetic["expected_argument_bytes_per_device"]
    res["_compiled"] = compiled
    if not res["memory"]["fits"] and not allow_oversize:
        raise _does_not_fit(chip, topology, mesh, model_cfg, job.kind, peak)
    return res


def _flops_fields(jf: JaxprFlops, n: int, job: Job) -> dict:
    flops = (jf.all + jf.pallas) / n
    return {"compiled": flops, "loop_bodies_once": (jf.once + jf.pallas) / n, "pallas": jf.pallas / n,
            "matmul_all_devices": jf.all + jf.pallas, "model": job.model_flops / n, "model_all_devices": job.model_flops,
            "compiled_over_model": flops * n / job.model_flops if job.model_flops else None,
            "outer_scans": [{"length": k, "body_flops_all_devices": f} for k, f in jf.scans]}


def _sharding_summary(shardings, limit: int = 400) -> dict:
    """Output shardings, path -> PartitionSpec string (optimizer moments left out: they follow the params)."""
    import jax
    out = {}
    for path, s in jax.tree_util.tree_leaves_with_path(shardings):
        key = jax.tree_util.keystr(path)
        if "opt_state" in key:
            continue
        out[key] = str(getattr(s, "spec", s))
        if len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------------- run

def plan(args) -> tuple:
    """(Job, mesh, chip, model config) for parsed arguments."""
    from .sharding import parse_mesh_spec
    chip, _ = parse_topology(args.topology)
    devices = compile_only_devices(args.topology, args.num_slices)
    try:
        sizes = parse_mesh_spec(args.mesh) if args.mesh else {"data": args.num_slices, "fsdp": -1, "tensor": 1}
    except ValueError as e:
        raise AOTError(str(e)) from None
    mesh = build_mesh(devices, sizes, args.num_slices)
    cfg, model_cfg = load_recipe(args.config, args.overrides)
    if args.job == "train":
        job = train_job(cfg, model_cfg, mesh, args.batch_per_chip)
    else:
        from .inference import cache_bucket, prompt_bucket
        crops = args.crops
        prompt_len = prompt_bucket(args.prompt_len)
        cache_len = cache_bucket(prompt_len + args.max_new_tokens)
        rows = args.batch
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if rows % shards:
            raise AOTError(f"--batch {rows} is not a multiple of the mesh's batch shards (data x fsdp = {shards})")
        make = prefill_job if args.job == "prefill" else decode_job
        job = make(model_cfg, mesh, rows, prompt_len, crops, cache_len)
    return job, mesh, chip, model_cfg


def format_result(r: dict) -> str:
    """The per-device figures as text."""
    G = lambda b: f"{b / GiB:8.3f} GiB"
    m, f, t = r["memory"], r["flops"], r["time"]
    lines = [
        f"{r['job']} on {r['topology']} ({r['devices']} x {r['chip']}), mesh {r['mesh']}, "
        f"remat={r['model']['remat_policy']}, attention={r['model']['attention_impl']}, {r['static']}",
        f"  per device:  argument {G(m['argument'])}   output {G(m['output'])}   temp {G(m['temp'])}   "
        f"alias {G(m['alias'])}",
        f"               peak     {G(m['peak'])}   of {m['hbm'] / GiB:.2f} GiB HBM "
        f"({100 * m['peak'] / m['hbm']:.0f}%){'' if m['fits'] else '  DOES NOT FIT'}",
        f"  FLOPs per {r['per']} per device: {f['compiled']:.4g} compiled (matmuls, every scan iteration; "
        f"{f['pallas']:.3g} in Pallas kernels), model {f['model']:.4g} (compiled/model "
        f"{f['compiled_over_model']:.3f}); XLA cost analysis {f['xla_cost_analysis']:.4g} (loop bodies once)",
        f"  bytes accessed per device: {r['bytes_accessed']:.4g} (XLA, loop bodies once)"
        + (f"; {r['bytes_for_bandwidth_bound']:.4g} read per step (decoder weights + KV cache)"
           if r['bytes_for_bandwidth_bound'] != r['bytes_accessed'] else ""),
        f"  at peak ({r['chip_spec']['peak_flops'] / 1e12:.0f} TFLOP/s, {r['chip_spec']['hbm_bandwidth'] / 1e9:.0f} GB/s): "
        f"{r['per']} >= {t['step_lower_bound_s'] * 1e3:.2f} ms (compute {t['compute_bound_s'] * 1e3:.2f} ms, "
        f"memory {t['memory_bound_s'] * 1e3:.2f} ms), MFU <= {100 * t['mfu_upper_bound']:.1f}%, "
        f"<= {t['tokens_per_s_upper_bound']:,.0f} tokens/s",
        f"  compile {r['seconds']['compile']:.1f} s (lower {r['seconds']['lower']:.1f} s)",
    ]
    a = r.get("arithmetic", {})
    if "expected_argument_bytes_per_device" in a:
        lines.append(f"  argument bytes vs (params {a['param_bytes'] / GiB:.2f} GiB + optimizer state "
                     f"{a['opt_state_bytes'] / GiB:.2f} GiB) / {a['fsdp'] * a['tensor']} + batch: expected "
                     f"{a['expected_argument_bytes_per_device'] / GiB:.3f} GiB, ratio {a['argument_over_expected']:.4f}")
    return "\n".join(lines)


def save_json(r: dict, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=1, default=str) + "\n")


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of `jinavlm aot`."""
    p.add_argument("--topology", default="v5e:2x4", help="TPU topology, e.g. v5e:2x4, v5p:2x2x1, v5e:16x16")
    p.add_argument("--num-slices", type=int, default=1, help="slices of that topology (stacked on the data axis)")
    p.add_argument("--mesh", help="data=..,fsdp=..,tensor=.. (default: data=<slices>, fsdp=the rest)")
    p.add_argument("--job", choices=("train", "prefill", "decode"), default="train")
    p.add_argument("--config", metavar="YAML", help="training recipe (configs/*.yaml); its model section is used "
                   "for prefill / decode too (default: the 2.48B model, bf16 compute, one trained group)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides after the options, e.g. model.remat_policy=full model.attention_impl=splash")
    p.add_argument("--batch-per-chip", type=int, help="train: rows per chip on the batch axes (sets data.batch_size)")
    p.add_argument("--batch", type=int, default=32, help="prefill/decode: prompts in the batch (default 32)")
    p.add_argument("--prompt-len", type=int, default=1808, help="prefill/decode: prompt tokens before bucketing "
                   "(default 1808: one 12-tile image = 1744 tokens + 64 of text -> bucket 2048)")
    p.add_argument("--crops", type=int, default=13, help="prefill/decode: crops per prompt (default 13)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="prefill/decode: sizes the KV cache")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--allow-oversize", action="store_true", help="report a program that exceeds HBM instead of failing")


def run(args: argparse.Namespace) -> int:
    """`jinavlm aot`: compile, print the per-device figures, optionally write JSON.

    A program that does not fit raises DoesNotFit (one line naming the chip, the memory needed and
    what to change); with --json the message is written there too.
    """
    if "jax" not in sys.modules:  # AOT never runs on the local accelerator: skip probing for one
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    job, mesh, chip, model_cfg = plan(args)
    print(f"compiling the {job.kind} program for {args.topology} x {args.num_slices} slice(s) "
          f"({mesh.size} compile-only devices, mesh {dict(mesh.shape)}) ...", file=sys.stderr, flush=True)
    argv = getattr(args, "argv", None)
    command = "jinavlm aot " + " ".join(argv) if argv is not None else "jinavlm " + " ".join(sys.argv[1:])
    try:
        r = compile_job(job, mesh, chip, args.topology, model_cfg, allow_oversize=args.allow_oversize)
    except DoesNotFit as e:
        if args.json:
            save_json({"topology": args.topology, "chip": chip.name, "devices": mesh.size, "mesh": dict(mesh.shape),
                       "job": job.kind, "static": job.static, "command": command, "error": str(e),
                       "flops": getattr(e, "flops", None), "arithmetic": job.arithmetic,
                       "model": {"remat_policy": model_cfg.remat_policy, "attention_impl": model_cfg.attention_impl,
                                 "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype}}, args.json)
        raise
    r["command"] = command
    print(format_result(r))
    if args.json:
        save_json(r, args.json)
    return 0


HELP = "compile the train step / prefill / decode for a TPU topology without TPUs: memory, FLOPs, MFU bound"


def main(argv: list[str] | None = None) -> int:
    """`python -m jinavlm_jax.aot ...` (also `--report docs/tpu.md` to regenerate the docs table)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--report" in argv:
        return report_main(argv)
    parser = argparse.ArgumentParser(prog="jinavlm aot", description=HELP)
    configure(parser)
    args = parser.parse_intermixed_args(argv)
    args.argv = argv
    try:
        return run(args)
    except ValueError as e:  # AOTError, DoesNotFit, TrainConfigError, ConfigError: one line
        print(f"jinavlm aot: error: {e}", file=sys.stderr)
        return 1



# ---------------------------------------------------------------------------------------- docs/tpu.md

RECIPE = "configs/stage2_instruct.yaml"
# The recipe as it is (seq 4096, 13 crops per row, bf16 compute, f32 master weights, chunked loss), one
# row per chip; inference in bf16 params.
STAGE2 = ["--config", RECIPE]
INFER = ["--config", RECIPE, "model.param_dtype=bfloat16"]


def _case(topology: str, mesh: str, job: str, *extra: str, slices: int = 1) -> list[str]:
    argv = ["--topology", topology, "--mesh", mesh, "--job", job]
    if slices > 1:
        argv += ["--num-slices", str(slices)]
    if job == "train":
        return argv + ["--batch-per-chip", "1", *STAGE2, *extra]
    return argv + ["--batch", "32", *INFER, *extra]  # INFER ends with an override: extras follow it


# (id, section, argv): the programs of docs/tpu.md, compiled in this order. Sections: train, remat,
# infer, fit.
REPORT_CASES: list[tuple[str, str, list[str]]] = [
    ("train-v5e-2x4", "train", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train", "model.remat_policy=full")),
    ("train-v5p-2x2x1", "train", _case("v5p:2x2x1", "data=1,fsdp=4,tensor=1", "train",
                                                        "model.remat_policy=dots_with_no_batch_dims_saveable")),
    ("prefill-v5e-2x2-tp4", "infer", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "prefill")),
    ("decode-v5e-2x2-tp4", "infer", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "decode")),
    ("prefill-v5e-2x2-tp4-splash", "infer", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "prefill",
                                                  "model.attention_impl=splash")),
    ("fit-fsdp1-v5e", "fit", _case("v5e:2x4", "data=8,fsdp=1,tensor=1", "train", "model.remat_policy=none")),
    ("remat-none-v5e-2x4", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train", "model.remat_policy=none")),
    ("remat-none-v5p-2x2x1", "remat", _case("v5p:2x2x1", "data=1,fsdp=4,tensor=1", "train",
                                            "model.remat_policy=none")),
    ("remat-dots-no-batch-v5e-2x4", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train",
                                                   "model.remat_policy=dots_with_no_batch_dims_saveable")),
    ("remat-dots-v5e-2x4", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train",
                                          "model.remat_policy=dots_saveable")),
    ("train-v5e-16x16-2slices", "train", _case("v5e:16x16", "data=32,fsdp=16,tensor=1", "train",
                                               "model.remat_policy=full", slices=2)),
    # Splash attention in training: needs the train step to pass text.SegmentMask(segment_ids); until
    # it does, these programs fail to trace and their rows stay out of the report.
    ("train-v5e-2x4-splash", "train", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train", "model.remat_policy=full",
                                            "model.attention_impl=splash")),
    ("remat-dots-no-batch-v5e-2x4-splash", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train",
                                                          "model.remat_policy=dots_with_no_batch_dims_saveable",
                                                          "model.attention_impl=splash")),
    ("remat-none-v5p-2x2x1-splash", "remat", _case("v5p:2x2x1", "data=1,fsdp=4,tensor=1", "train",
                                                   "model.remat_policy=none", "model.attention_impl=splash")),
]


def _fmt_case(r: dict) -> dict:
    """One table row's cells from a result JSON."""
    G = lambda b: f"{b / GiB:.2f}"
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    row = {"topology": f"{r['topology']}{' x2 slices' if '--num-slices' in r.get('command', '') else ''} "
                       f"({r['devices']} chips)", "mesh": mesh,
           "remat": r["model"]["remat_policy"] if r.get("job") == "train" else "n/a",
           "attention": r["model"]["attention_impl"]}
    if "error" in r:
        m = re.search(r"needs ([\d.]+ GiB|more than that)", r["error"])
        m = re.search(r"needs (?:at least )?([\d.]+ GiB|more than that)", r["error"])
        f = r.get("flops") or {}
        row.update(peak=f"does not fit: needs {m.group(1) if m else '?'} of {CHIPS[r['chip']].hbm_bytes / GiB:.2f}",
                   argument="-", temp="-", mfu="-", step="-", compile="-",
                   flops=f"{f['compiled'] / 1e12:.2f}" if f else "-", model=f"{f['model'] / 1e12:.2f}" if f else "-",
                   ratio=f"{f['compiled_over_model']:.3f}" if f else "-")
        return row
    m, f, t = r["memory"], r["flops"], r["time"]
    row.update(peak=f"{G(m['peak'])} / {G(m['hbm'])}{'' if m['fits'] else ' (over)'}", argument=G(m["argument"]),
               temp=G(m["temp"]), flops=f"{f['compiled'] / 1e12:.2f}", model=f"{f['model'] / 1e12:.2f}",
               ratio=f"{f['compiled_over_model']:.3f}",
               mfu=f"{100 * t['mfu_upper_bound']:.{0 if t['mfu_upper_bound'] > 0.1 else 1}f}%",
               step=f"{t['step_lower_bound_s'] * 1e3:.1f} ms", compile=f"{r['seconds']['compile']:.0f} s")
    return row


def render_report(results: dict[str, dict]) -> str:
    """docs/tpu.md from the result JSONs (keyed by case id)."""
    out = ["# jina-vlm on TPU: compiled, not hoped", "",
           "<!-- Generated by `python -m jinavlm_jax.aot --report docs/tpu.md` (jinavlm_jax/aot.py); do not edit "
           "by hand. Per-program figures: docs/tpu/*.json. -->", "",
           "Every figure below comes from XLA:TPU compiling the project's real programs for a TPU topology on a "
           "host without TPUs (libtpu's compile-only devices; `pip install 'jinavlm-jax[tpu]'`): the train step of "
           "`train.step.make_steps` (forward, backward, AdamW update, state donated), the prefill and the decode "
           "loop of `generate`, on abstract full-size params and optimizer state (`jax.eval_shape`, nothing "
           "materialised). Reproduce one row with the command in its JSON, e.g. `jinavlm aot --topology v5e:2x4 "
           "--mesh data=1,fsdp=8,tensor=1 --job train --batch-per-chip 1 model.remat_policy=full ...`.", "",
           "## Chips", "",
           "| chip | usable HBM per chip | peak bf16 per chip | HBM bandwidth |", "|---|---|---|---|"]
    for c in CHIPS.values():
        out.append(f"| {c.name} (`{c.device_kind}`) | {c.hbm_bytes / GiB:.2f} GiB | {c.peak_flops / 1e12:.0f} TFLOP/s "
                   f"| {c.hbm_bandwidth / 1e9:.0f} GB/s |")
    out += ["", "Sources: Cloud TPU system-architecture pages (v4, v5e, v5p, v6e: HBM capacity, bf16 peak, HBM "
            "bandwidth per chip). Assumption: v5e's usable HBM is 15.75 GiB of its 16 GiB (libtpu reserves the "
            "rest); for the other chips the full capacity is used as the limit. XLA:TPU itself refuses a program "
            "that exceeds the chip's HBM at compile time; that case is reported as 'does not fit'.", ""]
    cols = [("topology", "topology"), ("mesh", "mesh"), ("remat", "remat"), ("attention", "attention"),
            ("peak", "peak / HBM per chip (GiB)"), ("argument", "arguments (GiB)"), ("temp", "temporaries (GiB)"),
            ("flops", "TFLOP per chip (compiled)"), ("model", "TFLOP per chip (model)"), ("ratio", "compiled / model"),
            ("mfu", "MFU bound"), ("step", "step >="), ("compile", "compile")]

    def table(ids):
        rows = [_fmt_case(results[i]) | {"id": i} for i in ids if i in results]
        lines = ["| case | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + " | ".join([r["id"]] + [r[k] for k, _ in cols]) + " |" for r in rows]
        return lines

    sec = lambda s: [i for i, section, _ in REPORT_CASES if section == s]
    out += ["## Stage-2 training of the full 2.48B model", "",
            f"The recipe `{RECIPE}` as it is -- one 12-tile image per sample (13 crops x 729 patches, bf16 crops), "
            "sequence 4096, bf16 compute, float32 master weights and AdamW moments, all three parameter groups "
            "trained, the chunked loss (1024 positions per chunk) -- with batch 1 per chip (`--batch-per-chip 1`) "
            "and the mesh and remat policy of each row.", ""]
    out += table(sec("train")) + [""]
    out += ["## Remat policies: memory each gives", "",
            "`model.remat_policy` applies to both towers (`nn.remat` around the scanned layer). `full` saves only "
            "the layer inputs, `dots_with_no_batch_dims_saveable` also the weight matmuls' outputs (not the "
            "attention einsums), `dots_saveable` every matmul output including the attention scores, `none` "
            "everything.", ""]
    out += table(["train-v5e-2x4", "train-v5p-2x2x1"] + sec("remat")) + [""]
    out += ["XLA attention materialises the [heads, L, L] scores of a layer (1 GiB in float32 at L = 4096): "
            "`none` and `dots_saveable` keep them for all 28 layers, which is what does not fit. The splash "
            "kernel never materialises them (rows with attention `splash`, where compiled).", ""]
    out += ["## Inference: a batch of 32 one-image prompts on v5e:2x2, tensor parallel", "",
            f"The model section of `{RECIPE}` with bf16 params (`model.param_dtype=bfloat16`) and KV cache; prompt bucket 2048 (one 12-tile image = 1,744 tokens + text), 13 crops per "
            "prompt, KV cache 4096 slots (prompt + 256 new tokens, next power of two). Prefill: one call. Decode: "
            "the `lax.while_loop` program; its FLOPs and bytes are one loop body = one token for all 32 rows.", ""]
    out += table(sec("infer")) + [""]
    if any(i in results for i in sec("fit")):
        out += ["## A configuration that cannot fit", "", "`jinavlm aot` ends with one line instead of a traceback:", ""]
        for i in sec("fit"):
            if i in results:
                r = results[i]
                out += ["```", f"$ {r.get('command', '')}", f"jinavlm aot: error: {r.get('error', 'it fits')}", "```", ""]
    out += _splash_notes(results)
    out += _recommend(results)
    out += _acceptance(results)
    out += _method()
    return "\n".join(out) + "\n"


def _splash_notes(results: dict) -> list[str]:
    a, b = results.get("prefill-v5e-2x2-tp4"), results.get("prefill-v5e-2x2-tp4-splash")
    out = ["## Splash attention", "",
           "`model.attention_impl=splash` runs the self-attention of both towers in the Pallas splash kernel "
           "(`jinavlm_jax/model/splash.py`): causal + segment ids (padding, packed samples) in the decoder, a "
           "full mask over the 729 patches (padded to 768) in the ViT, per-shard under `shard_map` (batch over "
           "data x fsdp, heads over tensor). A decode step over the KV cache keeps the XLA path."]
    if a and b and "error" not in a and "error" not in b:
        out += ["", f"It compiles for TPU in the whole prefill program above: peak {b['memory']['peak'] / GiB:.2f} GiB "
                f"against {a['memory']['peak'] / GiB:.2f} GiB with XLA attention, temporaries "
                f"{b['memory']['temp'] / GiB:.2f} against {a['memory']['temp'] / GiB:.2f} GiB."]
    train = [i for i, section, argv in REPORT_CASES if "model.attention_impl=splash" in argv and section != "infer"]
    missing = [i for i in train if i not in results]
    if missing:
        out += ["", "The train step passes the batch's segment ids to the decoder (`text.SegmentMask`), so splash "
                "works in training too (checked against XLA in interpret mode by the tests). Not compiled for this "
                "report yet: " + ", ".join(f"`{i}`" for i in missing) + " (`--report docs/tpu.md --only ID` "
                "compiles one)."]
    return out + [""]


def recommendations(results: dict) -> dict[str, dict]:
    """Per topology: the compiled training configuration with the best MFU bound whose peak leaves
    10% of HBM free (for fragmentation and what the compiler does not see)."""
    best: dict[str, dict] = {}
    for i, r in results.items():
        if r.get("job") != "train" or "error" in r or r["memory"]["peak"] > 0.9 * r["memory"]["hbm"]:
            continue
        key = r["topology"] + (" x2 slices" if "--num-slices" in r.get("command", "") else "")
        if key not in best or r["time"]["mfu_upper_bound"] > best[key]["time"]["mfu_upper_bound"]:
            best[key] = r | {"id": i}
    return best


def _recommend(results: dict) -> list[str]:
    best = recommendations(results)
    if not best:
        return []
    out = ["## Recommended defaults", "",
           "Per topology, the compiled configuration with the best MFU bound that leaves 10% of HBM free "
           "(remat recomputation costs step time, so the least remat that fits wins):", ""]
    for topo, r in best.items():
        m, model = r["mesh"], r["model"]
        fields = {"remat_policy": model["remat_policy"], "attention_impl": model["attention_impl"]}
        out += [f"* **{topo}** ({r['id']}): `--mesh data={m['data']},fsdp={m['fsdp']},tensor={m['tensor']}`, "
                + ", ".join(f"`model.{k}={v}`" for k, v in fields.items())
                + f", peak {r['memory']['peak'] / GiB:.2f} of {r['memory']['hbm'] / GiB:.2f} GiB, "
                f"MFU <= {100 * r['time']['mfu_upper_bound']:.0f}%. Recipe lines:",
                "", "  ```yaml", f"  mesh: {{data: {m['data']}, fsdp: {m['fsdp']}, tensor: {m['tensor']}}}",
                "  model: {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}", "  ```", ""]
    return out


def _acceptance(results: dict) -> list[str]:
    out = ["## Checks", "", "Argument bytes per chip against the arithmetic (params + AdamW state) / (fsdp x tensor) "
           "+ batch rows / (data x fsdp):", "",
           "| case | params | param bytes | optimizer state | expected per chip | exact shards per chip | compiled "
           "argument | ratio to expected |",
           "|---|---|---|---|---|---|---|---|"]
    for i, r in results.items():
        a = r.get("arithmetic", {})
        if "error" in r or "expected_argument_bytes_per_device" not in a:
            continue
        out.append(f"| {i} | {a['params'] / 1e9:.3f} B | {a['param_bytes'] / GiB:.2f} GiB | {a['opt_state_bytes'] / GiB:.2f} GiB "
                   f"| {a['expected_argument_bytes_per_device'] / GiB:.3f} GiB "
                   f"| {a.get('sharded_bytes_per_device', 0) / GiB:.3f} GiB | {r['memory']['argument'] / GiB:.3f} GiB "
                   f"| {a['argument_over_expected']:.4f} |")
    out += ["", "'Exact shards' sums the shard shapes of every state and batch leaf (leaves a mesh axis does not "
            "divide stay replicated): it equals the arithmetic to within 0.1%. The rest of the gap is XLA:TPU's "
            "memory layout, which pads arrays to (8, 128) tiles -- mostly the ViT and pooling head_dim of 72 "
            "stored in 128 lanes (q/k/v kernels and their AdamW moments)."]
    out += ["", "Compiled FLOPs against the formula (per chip per step). The model formula counts no "
            "recomputation; the compiled program also reruns what the remat policy did not save, so the formula "
            "+ recompute column adds that (`remat_recompute_flops`: `full` reruns the forward of both towers' "
            "layers, `dots_with_no_batch_dims_saveable` their attention einsums, `none` / `dots_saveable` no "
            "matmul) and is what the compiled count is checked against:", "",
            "| case | remat | compiled TFLOP | model TFLOP (formula) | compiled / model | formula + recompute TFLOP "
            "| compiled / (formula + recompute) | XLA raw (loop bodies once) |",
            "|---|---|---|---|---|---|---|---|"]
    for i, r in results.items():
        f = r.get("flops")
        if not f:
            continue
        xla = f"{f['xla_cost_analysis'] / 1e12:.2f}" if "xla_cost_analysis" in f else "(not compiled: does not fit)"
        if r.get("job") == "train":
            remat = r["model"]["remat_policy"]
            with_recompute = f["model"] + _recompute_per_device(r)
            rc = f"{with_recompute / 1e12:.2f} | {f['compiled'] / with_recompute:.3f}"
        else:
            remat, rc = f"n/a ({r.get('job')})", "- | -"
        out.append(f"| {i} | {remat} | {f['compiled'] / 1e12:.2f} | {f['model'] / 1e12:.2f} | "
                   f"{f['compiled_over_model']:.3f} | {rc} | {xla} |")
    return out + [""]


def _recompute_per_device(r: dict) -> float:
    """`remat_recompute_flops` of a train case's JSON, per device (the recipe is re-read from its command)."""
    import shlex
    p = argparse.ArgumentParser()
    configure(p)
    a = p.parse_intermixed_args(shlex.split(r["command"])[2:])       # drop "jinavlm aot"
    _, model_cfg = load_recipe(a.config, a.overrides)
    s = r["static"]
    return remat_recompute_flops(model_cfg, r["model"]["remat_policy"], rows=s["rows"], seq_len=s["seq_len"],
                                 crops=s["crops_per_row"], train_vision=s["vision_trained"]) / r["devices"]


def _method() -> list[str]:
    return ["## How the figures are made", "",
            "* **Memory** is `compiled.memory_analysis()` per device: arguments (params, optimizer state, batch "
            "shards), outputs (aliased with the donated state for training), temporaries, and XLA's peak.",
            "* **FLOPs (compiled)**: XLA's `cost_analysis()` counts a loop body once: our scanned layers (28 text, "
            "25 ViT), the chunked loss (4 chunks), and also the collective-matmul loops XLA:TPU makes of FSDP "
            "matmuls (the weight all-gather overlapped with the compute); it sees nothing inside Pallas kernels. "
            "So we *scale* rather than unroll (an unrolled full-size step takes far longer to compile): the jaxpr "
            "of the very program that is compiled is walked, counting 2*M*N*K per `dot_general` (what remat "
            "recomputes included), each scan body times its length and each Pallas kernel body times its grid "
            "(dense: the causal splash kernel skips the blocks above the diagonal, so its count is an upper "
            "bound); per chip = total / chips. Matmuls only (elementwise work is ~1-2%). XLA's own figure is "
            "kept in the JSON (`xla_cost_analysis`) and in the last column of the FLOPs check. Programs that do not fit are "
            "still traced, so their FLOPs are known.",
            "* **FLOPs (model)**, per step, all chips, divided by the chip count: training = 3 x forward; forward = "
            "2 x params x tokens + attention, where every weight matrix counts the tokens that pass through it "
            "(text layers + lm_head: every position of every row; ViT: the 25 blocks run x 729 patches x crops; "
            "pooling k/v: 4 window members, q/o/projector: once per 2x2 window), embeddings 0, and attention = "
            "2 matmuls x 2 x L^2 x heads x head_dim per layer (the full square). I.e. 6 x params x tokens + "
            "12 x layers x heads x head_dim x L^2 per sequence for each tower. No recomputation counted. The "
            "prefill is 1 x forward with the lm_head on the last position only; a decode step is 2 x params x "
            "rows plus attention over the whole cache.",
            "* **Step time** >= max(compiled FLOPs / peak, bytes / HBM bandwidth) per chip; **MFU bound** = "
            "model FLOPs / (peak x that time). Bytes: XLA's bytes accessed (loop bodies once, so optimistic) for "
            "training and prefill, which are compute-bound anyway; for a decode step, the bytes of the decoder "
            "weights + KV cache shards every step reads (XLA's figure for the decode program also holds one-time "
            "work outside the loop). Communication is not modelled, so real MFU is lower.", ""]


def report_main(argv: list[str]) -> int:
    """`python -m jinavlm_jax.aot --report docs/tpu.md [--results DIR] [--only ID ...] [--force]`."""
    p = argparse.ArgumentParser(prog="python -m jinavlm_jax.aot --report")
    p.add_argument("--report", required=True, metavar="MD")
    p.add_argument("--results", metavar="DIR", help="per-case JSON (default: <report dir>/tpu)")
    p.add_argument("--only", nargs="*", help="case ids to (re)compile (default: the missing ones)")
    p.add_argument("--force", action="store_true", help="recompile cases that already have JSON")
    p.add_argument("--render-only", action="store_true", help="only render the Markdown from existing JSON")
    a = p.parse_args(argv)
    results_dir = Path(a.results) if a.results else Path(a.report).parent / "tpu"
    import subprocess
    for cid, _, case_argv in REPORT_CASES:
        path = results_dir / f"{cid}.json"
        if a.render_only or (a.only and cid not in a.only) or (path.exists() and not a.force and not a.only):
            continue
        print(f"[aot report] {cid}: jinavlm aot {' '.join(case_argv)}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "jinavlm_jax.aot", *case_argv, "--json", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        print("\n".join(ln for ln in tail if "TPU_WORKER" not in ln and "libtpu" not in ln)[-3000:], file=sys.stderr)
    results = {}
    for cid, _, _ in REPORT_CASES:
        path = results_dir / f"{cid}.json"
        if path.exists():
            results[cid] = json.loads(path.read_text())
    Path(a.report).write_text(render_report(results))
    print(f"wrote {a.report} ({len(results)} of {len(REPORT_CASES)} programs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
