"""The programs `jinavlm aot` compiles, on abstract full-size state, and what compiling them tells.

The project's REAL programs -- the train step of `train.step.make_steps`, the prefill and the decode
loop of `generate` -- are lowered on abstract params and optimizer state (`jax.eval_shape`: nothing
is materialised) and compiled by XLA:TPU. `compile_job` returns per device: argument, output,
temporary and peak bytes against the chip's HBM, FLOPs (`tpu.count`, every loop iteration), bytes
accessed, and the step time and MFU those imply at the chip's peak rate.

XLA:TPU also turns FSDP matmuls into collective-matmul loops (the weight all-gather overlapped with
the compute), whose bodies its cost analysis counts once too, so its raw figure is reported only for
reference.

Step time and MFU are lower/upper bounds, not measurements: time >= max(FLOPs / peak, bytes / HBM
bandwidth) per device, MFU <= model FLOPs (`flops.model_flops`: no rematerialisation) / (devices x
peak x that time). Bytes: XLA's bytes accessed (loop bodies once, so the bandwidth bound is
optimistic for scanned programs); for a decode step, the decoder weights + KV cache shards it reads.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Sequence

import numpy as np

from ..flops import GiB, Chip, decode_step_flops, mfu, model_flops
from .count import JaxprFlops, count_flops
from .topology import AOTError


class DoesNotFit(AOTError):
    """The compiled program needs more memory per chip than the chip has (names both and what to change)."""

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
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)
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
        total += math.prod(shape) * size
    return int(total)


def load_recipe(path: str | None, overrides: Sequence[str]):
    """(TrainConfig, model config) from a recipe + key=value overrides (no recipe: one trained group)."""
    from ..train.config import load_config
    from ..train.setup import build_model_config
    base = None if path else {"model": {"config": "jina_vlm_2_4b", "dtype": "bfloat16", "param_dtype": "float32"},
                              "data": {"sources": {"aot": {"path": "unused-by-aot"}}},
                              "optimizer": {"groups": {"all": {"regex": ".*", "lr": 1e-5}}}}
    cfg = load_config(path, overrides, base=base)
    return cfg, build_model_config(cfg)


def train_job(cfg, model_cfg, mesh, batch_per_chip: int | None = None) -> Job:
    """The real train step (`train.step.make_steps`) on abstract full-size state and batch.

    The optimizer, steps and model FLOPs are built by `train.setup` exactly as a training run builds
    them; `batch_per_chip` sets `data.batch_size` to that many rows per batch shard (data x fsdp).
    """
    import jax
    import jax.numpy as jnp
    from ..model import tokens_per_crop
    from ..train.setup import check_batch, make_optimizer_and_steps, step_model_flops
    from ..train.step import BATCH_KEYS

    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_per_chip:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_per_chip * shards))
    check_batch(cfg, mesh)
    d, o = cfg.data, cfg.optimizer
    rows = d.batch_size
    params, tx, groups, fns = make_optimizer_and_steps(cfg, model_cfg, mesh)
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
    n_params = sum(math.prod(a.shape) for a in leaves)
    n_trained = sum(math.prod(a.shape) for a, t in zip(leaves, trained) if t)
    vision_trained = groups.trains("vision")
    flops = step_model_flops(model_cfg, groups, rows=rows, seq_len=L, crops=T, loss_positions=cfg.run.loss_positions)
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
              "loss_chunk": cfg.run.loss_chunk, "vision_trained": vision_trained,
              **({"lora_rank": cfg.lora.rank, "lora_base": cfg.lora.base_dtype} if cfg.lora.rank else {})}
    return Job("train", fn, (state, batch), static, flops, "step", rows * L, arithmetic)


def _inference_inputs(model_cfg, mesh, rows: int, prompt_len: int, crops: int):
    import jax.numpy as jnp
    from ..model import tokens_per_crop
    from ..sharding import named
    v = model_cfg.vision
    act = lambda nd: named(mesh, ("act_batch",) + (None,) * (nd - 1))
    ids = _sds((rows, prompt_len), jnp.int32, act(2))
    mask = _sds((rows, prompt_len), jnp.bool_, act(2))
    if not crops:
        return ids, mask, None, None, None
    return (ids, mask, _sds((rows, crops, v.n_patches, v.patch_dim), jnp.float32, act(4)),
            _sds((rows, crops, v.n_patches), jnp.int32, act(3)),
            _sds((rows, crops, tokens_per_crop(model_cfg)), jnp.int32, act(3)))


def _inference_params(model_cfg, mesh, quantize=None):
    """Abstract InferenceParams on `mesh`; `quantize` ("int8"): Qwix int8 kernels (`adapt.quant`)."""
    from ..inference import InferenceParams, abstract_inference_params
    from ..inference.params import inference_shardings, parse_quantize
    quant = parse_quantize(quantize)
    params = abstract_inference_params(model_cfg, quant)
    return InferenceParams(_with_shardings(params.tree, inference_shardings(model_cfg, mesh, quant)), quant)


def _weights(params, kv_cache_dtype=None) -> dict:
    """The static figures naming quantized weights and an int8 KV cache (nothing for bf16)."""
    return ({"weights": params.quant.name} if params.quant is not None else {}) | (
        {"kv_cache": kv_cache_dtype} if kv_cache_dtype else {})


def prefill_job(model_cfg, mesh, rows: int, prompt_len: int, crops: int, cache_len: int, quantize=None,
                kv_cache_dtype=None) -> Job:
    """The real prefill (`inference.programs.prefill`): ViT on every crop, connector, all decoder layers, cache."""
    from ..inference import programs
    kv_cache_dtype = programs.parse_kv_cache_dtype(kv_cache_dtype)
    params = _inference_params(model_cfg, mesh, quantize)
    args = ((model_cfg, cache_len, params) + _inference_inputs(model_cfg, mesh, rows, prompt_len, crops)
            + (kv_cache_dtype,))
    flops = model_flops(model_cfg, rows=rows, seq_len=prompt_len, crops=crops, train=False, logit_positions=1)
    arithmetic = {"param_bytes": _nbytes(params), "tensor": mesh.shape["tensor"], "fsdp": mesh.shape["fsdp"]}
    static = {"rows": rows, "prompt_len": prompt_len, "crops": crops, "cache_len": cache_len,
              **_weights(params, kv_cache_dtype)}
    return Job("prefill", programs.prefill_jit, args, static, flops["total"], "prefill", rows * prompt_len, arithmetic)


def decode_job(model_cfg, mesh, rows: int, prompt_len: int, crops: int, cache_len: int, quantize=None,
               kv_cache_dtype=None) -> Job:
    """The real decode loop (`inference.programs.decode_loop`, greedy) over a full KV cache; one loop
    body = one token."""
    import jax
    import jax.numpy as jnp
    from ..inference import programs
    from ..inference.generator import MAX_STOP_IDS
    from ..sharding import named
    kv_cache_dtype = programs.parse_kv_cache_dtype(kv_cache_dtype)
    params = _inference_params(model_cfg, mesh, quantize)
    pre = jax.eval_shape(lambda *a: programs.prefill(model_cfg, cache_len, *a, kv_cache_dtype=kv_cache_dtype),
                         params, *_inference_inputs(model_cfg, mesh, rows, prompt_len, crops))
    logits0, caches, kv_valid, last_pos = pre
    act = lambda nd: named(mesh, ("act_batch",) + (None,) * (nd - 1))
    caches = jax.tree_util.tree_map(lambda a: _sds(a.shape, a.dtype, named(mesh, programs.CACHE_AXES[:a.ndim], shape=a.shape)),
                                    caches)
    args = (model_cfg, prompt_len, False, False, params, caches,
            _sds(kv_valid.shape, kv_valid.dtype, act(2)), _sds(logits0.shape, logits0.dtype, act(2)),
            _sds(last_pos.shape, last_pos.dtype, act(1)), _sds((rows,), jnp.uint32, act(1)),
            _sds((rows,), jnp.float32, act(1)), _sds((rows,), jnp.int32, act(1)), _sds((rows,), jnp.float32, act(1)),
            _sds((MAX_STOP_IDS,), jnp.int32), _sds((), jnp.int32), _sds((rows,), jnp.bool_, act(1)))
    f = decode_step_flops(model_cfg, rows=rows, cache_len=cache_len)
    # A decode step reads the decoder's weights and the whole cache (the XLA path attends over every
    # slot): the bandwidth bound per step. XLA's bytes-accessed figure for the loop program also holds
    # one-time work outside the loop (the cache relayout before and after it), so it is not used.
    arithmetic = {"param_bytes": _nbytes(params), "kv_cache_bytes": _nbytes(caches),
                  "tensor": mesh.shape["tensor"], "fsdp": mesh.shape["fsdp"],
                  "bytes_per_step": _shard_bytes((params.tree["text"], caches))}
    static = {"rows": rows, "prompt_len": prompt_len, "cache_len": cache_len, "sampling": "greedy",
              **_weights(params, kv_cache_dtype)}
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
    from ..sharding import use_mesh

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
    mfu_bound = mfu(job.model_flops, t_step, chip.peak_flops, n)
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
                 "mfu_upper_bound": mfu_bound, "tokens_per_s_upper_bound": job.tokens / t_step if t_step else None},
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


def serve_jobs(model_cfg, mesh, max_batch: int, max_model_len: int, crops: int, quantize=None,
               kv_cache_dtype=None) -> list[Job]:
    """The serving engine's programs (`inference.engine`) for `max_batch` decode slots whose KV cache
    holds `cache_slots(max_model_len)` positions: `encode` (one image of `crops` crops), `prefill`
    and `insert` at the longest prompt bucket, and `generate` (every slot one token). A server keeps
    the params and the decode state resident (the arguments of `generate`); each program adds its
    temporaries on top."""
    import jax
    import jax.numpy as jnp

    from ..inference import engine, prompt_bucket
    from ..sharding import named
    from ..inference.programs import parse_kv_cache_dtype
    kv_cache_dtype = parse_kv_cache_dtype(kv_cache_dtype)
    params = _inference_params(model_cfg, mesh, quantize)
    length, slots = prompt_bucket(max_model_len), engine.cache_slots(max_model_len)
    model_cfg = engine.slot_config(model_cfg, slots)  # what Engine compiles: the blocked decode attention
    state = engine.abstract_state(model_cfg, max_batch, slots, mesh, kv_cache_dtype)
    static = {"max_batch": max_batch, "max_model_len": max_model_len, "cache_len": slots,
              **_weights(params, kv_cache_dtype)}
    # What a server holds per chip all the time: every param (a program's argument bytes leave out
    # params it does not read, e.g. generate the vision tower) and the whole decode state.
    base = {"param_bytes": _nbytes(params), "kv_cache_bytes": _nbytes(state.caches), "tensor": mesh.shape["tensor"],
            "fsdp": mesh.shape["fsdp"], "resident_bytes_per_device": _shard_bytes((params, state)),
            "state_bytes_per_device": _shard_bytes(state)}
    active = _sds((max_batch,), jnp.bool_, named(mesh, engine.STATE_AXES, shape=(max_batch,)))
    image = model_flops(model_cfg, rows=1, seq_len=0, crops=crops, train=False)
    vision = image["vision"] + image["connector"]
    prefill = model_flops(model_cfg, rows=1, seq_len=length, crops=0, train=False, logit_positions=1)["total"]
    return [
        Job("serve:encode", jax.jit(partial(engine.encode_images, model_cfg)),
            (params,) + engine.encode_shapes(model_cfg, crops, mesh), {**static, "crops": crops}, vision, "image",
            0, base),
        Job("serve:prefill", jax.jit(partial(engine.prefill, model_cfg)),
            (params,) + engine.prefill_shapes(model_cfg, length, mesh), {**static, "prompt_len": length}, prefill,
            "prefill", length, base),
        Job("serve:insert", jax.jit(engine.insert, donate_argnums=1),
            engine.insert_shapes(model_cfg, params, length, state, mesh), {**static, "prompt_len": length}, 0.0,
            "insert", 0, base),
        Job("serve:generate", jax.jit(partial(engine.generate, model_cfg, 1, True), donate_argnums=1),
            (params, state, active), static, decode_step_flops(model_cfg, rows=max_batch, cache_len=slots),
            "decode step", max_batch,
            {**base, "bytes_per_step": _shard_bytes((params.tree["text"], state.caches))}),
    ]
