"""Weight conversion: official jina-vlm safetensors <-> Orbax, components -> a fresh model, logit checks.

The library side of `jinavlm convert` / `python -m convert` (their arguments: `jinavlm_jax/cli.py`):

* `hf_to_orbax(src, dst)`: official directory (config.json + model.safetensors or a sharded index) ->
  Orbax checkpoint. Tensors are read one at a time (`weights.official.load_params`) and each finished
  param is `device_put` straight onto its sharding on the target mesh, so the host holds at most one
  param beyond what is already on the devices.
* `orbax_to_hf(src, dst)`: back to the official names and layout, sharded safetensors + index +
  config.json; each shard is streamed tensor by tensor. Per-tensor source dtypes recorded at import
  are restored, so official -> Orbax -> official is bit-exact.
* `from_components(siglip, qwen3, dst)`: a fresh jina-vlm from transformers SigLIP(2) and Qwen3
  checkpoints (`weights.hf_components`), connector randomly initialised.
* `check_logits(a, b)`: the same random inputs through two checkpoints of any supported format.

Progress goes to stderr, results (the summary, the logit table) to stdout. Every error is a
`CheckpointError` / `ConfigError` naming the file or tensor (ValueErrors: the command line's one
error path makes them exit code 1).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import jax
import numpy as np

from . import checkpoint
from .model.config import ConfigError, JinaVLMConfig
from .model.jinavlm import JinaVLM, tokens_per_crop
from .processing.processor import PROCESSOR_FILES
from .sharding import mesh_from_spec, param_shardings
from .weights.hf_components import open_components
from .weights.official import load_params, official_table, official_tensors
from .weights.safetensors_io import (INDEX_NAME, CheckpointError, CheckpointReader, write_safetensors_stream)

EXIT_OK, EXIT_ERROR, EXIT_MISMATCH = 0, 1, 3


# ---------------------------------------------------------------------------------- reporting

def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


class Progress:
    """A tqdm bar on stderr over the bytes converted, with tensors done / total beside it.

    `update(name, nbytes)` counts `nbytes` more of tensor `name` (a tensor may arrive in several pieces).
    """

    def __init__(self, label: str, total_tensors: int, total_bytes: int, stream: TextIO | None = None,
                 enabled: bool = True):
        from tqdm import tqdm
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.seen: set[str] = set()
        self.bytes = 0
        # Our own counts in the postfix ("175/175 tensors  0.78 MB/0.78 MB"): tqdm's byte units are
        # binary-ish and its count would be bytes, not tensors.
        self.bar = tqdm(total=total_bytes, desc=label, file=stream or sys.stderr, disable=not enabled,
                        bar_format="{desc} {bar:24} {postfix} [{elapsed}]", mininterval=0.1)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{len(self.seen)}/{self.total_tensors} tensors  "
                                 f"{_gb(self.bytes)}/{_gb(self.total_bytes)}", refresh=False)

    def update(self, name: str, nbytes: int) -> None:
        """Count `nbytes` more of tensor `name`."""
        self.seen.add(name)
        self.bytes += nbytes
        self._postfix()
        self.bar.update(nbytes)

    def close(self) -> None:
        """Draw the final state and end the bar's line."""
        self._postfix()
        self.bar.close()


@dataclasses.dataclass
class Summary:
    """What a conversion did; printed to stdout at the end."""
    operation: str
    source: str
    destination: str
    tensors: int
    parameters: int
    dtype: str
    bytes: int
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.operation}: {self.source} -> {self.destination}",
                 f"  tensors     {self.tensors}",
                 f"  parameters  {self.parameters:,} ({self.parameters / 1e9:.3f} B)",
                 f"  dtype       {self.dtype}",
                 f"  size        {_gb(self.bytes)}",
                 f"  time        {self.seconds:.1f} s"]
        lines += [f"  note        {n}" for n in self.notes]
        return "\n".join(lines)


def _param_stats(params: Any) -> tuple[int, int, str]:
    leaves = jax.tree_util.tree_leaves(params)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    kinds = sorted({np.dtype(x.dtype).name for x in leaves})
    return n, nbytes, "/".join(kinds)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _placer(config: JinaVLMConfig, mesh: jax.sharding.Mesh) -> Callable[[tuple[str, ...], np.ndarray], Any]:
    """place(path, host array) -> the array on its target sharding, transfer finished (so the host
    buffer can be freed before the next param is built)."""
    shardings = param_shardings(config, mesh)

    def place(path, a):
        return jax.device_put(a, _get(shardings, path)).block_until_ready()
    return place


# ---------------------------------------------------------------------------------- hf -> orbax

def hf_to_orbax(src: str | Path, dst: str | Path, *, dtype: str | None = None, mesh: str | None = None,
                overwrite: bool = False, progress: bool = True) -> Summary:
    """Official jina-vlm directory -> Orbax checkpoint in `dst` (params sharded on `mesh`).

    `dtype`: float32 / bfloat16 (default: the checkpoint's; float32 if it mixes dtypes). The source
    config.json is kept verbatim and the per-tensor dtypes are recorded, so `orbax_to_hf` writes the
    same tensors back bit for bit.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:  # fail before reading gigabytes
        raise CheckpointError(f"{dst}: destination already exists; pass --overwrite to replace it")
    config = JinaVLMConfig.from_hf(src)
    hf_dict = json.loads((src / "config.json").read_text())
    reader = CheckpointReader(src)
    table = official_table(config)
    present = [e for e in table if e.name in reader.where]
    src_dtypes = {e.name: np.dtype(reader.dtype(e.name)).name for e in present}
    notes = []
    kinds = sorted(set(src_dtypes.values()))
    if dtype is None:
        dtype = kinds[0] if len(kinds) == 1 else "float32"
        if len(kinds) > 1:
            notes.append(f"source mixes dtypes {kinds}; params stored as float32 "
                         "(exact for bfloat16 and float16 tensors)")
    config = config.replace(param_dtype=np.dtype(dtype).name)
    loaded = [e for e in present if e.pieces]
    prog = Progress("hf-to-orbax", len(loaded),
                    sum(int(np.prod(reader.shape(e.name))) * reader.dtype(e.name).itemsize for e in loaded),
                    enabled=progress)
    params = load_params(config, reader, dtype=dtype, place=_placer(config, mesh_from_spec(mesh)), progress=prog.update)
    prog.close()
    first = next(iter(reader.files.values()))
    source = {"format": "official-safetensors", "path": str(src.absolute()), "dtypes": src_dtypes,
              "absent": [e.name for e in table if e.name not in reader.where],
              "safetensors_metadata": first.metadata}
    if progress:
        print("writing Orbax checkpoint ...", file=sys.stderr, flush=True)
    checkpoint.save(dst, config, params, overwrite=overwrite, hf_config=hf_dict, source=source)
    n, nbytes, kinds = _param_stats(params)
    return Summary("hf-to-orbax", str(src), str(dst), len(present), n, kinds, nbytes,
                   time.perf_counter() - t0, notes)


# ---------------------------------------------------------------------------------- orbax -> hf

def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 123 -> bytes (decimal units as in transformers, binary with 'i')."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"bad size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def orbax_to_hf(src: str | Path, dst: str | Path, *, max_shard_size: str | int = "5GB",
                dtype: str | None = None, overwrite: bool = False, progress: bool = True) -> Summary:
    """Orbax checkpoint -> official directory: config.json, model-0000k-of-0000n.safetensors, index,
    and the tokenizer / processor files found beside the checkpoint (`PROCESSOR_FILES`: a training run's
    export has them), so the official directory answers prompts on its own.

    Tensor dtypes: `dtype` if given, else the source dtypes recorded by `hf_to_orbax`, else the
    params' dtype. Tensors keep the official table order; a shard closes before it would pass
    `max_shard_size` (a single larger tensor gets a shard of its own). Written to a temp dir renamed
    into place at the end.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    limit = parse_size(max_shard_size)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: destination already exists; pass --overwrite to replace it")
    info = checkpoint.read_info(src)
    config, params = checkpoint.load(src, host=True)  # numpy: one copy of the model, no device buffers
    recorded = info.get("source", {})
    rec_dtypes: dict[str, str] = recorded.get("dtypes", {})
    absent = set(recorded.get("absent", []))

    def out_dtype(e) -> np.dtype:
        if dtype is not None:
            return np.dtype(dtype)
        if e.name in rec_dtypes:
            return np.dtype(rec_dtypes[e.name])
        leaf = _get(params, e.pieces[0].path) if e.pieces else _get(params, ("text", "ln_f", "scale"))
        return np.dtype(leaf.dtype)

    specs = [(e.name, e.shape, out_dtype(e)) for e in official_table(config) if e.name not in absent]
    sizes = [int(np.prod(s)) * d.itemsize for _, s, d in specs]
    shards: list[list[int]] = [[]]
    acc = 0
    for k, size in enumerate(sizes):
        if shards[-1] and acc + size > limit:
            shards.append([])
            acc = 0
        shards[-1].append(k)
        acc += size
    n = len(shards)
    prog = Progress("orbax-to-hf", len(specs), sum(sizes), enabled=progress)
    tensors = ((name, a) for name, a in official_tensors(config, params) if name not in absent)

    def arrays(idx: list[int]):
        for k in idx:
            name, a = next(tensors)
            want_name, _, dt = specs[k]
            if name != want_name:  # the table order is the plan's order; anything else is a bug
                raise RuntimeError(f"internal error: export produced {name} where {want_name} was planned")
            a = a.astype(dt, copy=False)
            prog.update(name, a.nbytes)
            yield a

    hf_config = dict(info["config"])
    kinds = sorted({d.name for _, _, d in specs})
    if (dtype is not None or not rec_dtypes) and len(kinds) == 1:
        hf_config["torch_dtype"] = kinds[0]  # not a verbatim round trip: say what was written
    st_meta = recorded.get("safetensors_metadata") or {"format": "pt"}
    weight_map = {}
    with checkpoint.atomic_directory(dst, overwrite) as tmp:
        for j, idx in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors_stream(tmp / fname, [specs[k] for k in idx], arrays(idx), st_meta)
            weight_map.update({specs[k][0]: fname for k in idx})
        (tmp / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copied = [name for name in PROCESSOR_FILES if (src / name).is_file()]
        for name in copied:
            shutil.copy(src / name, tmp / name)
    prog.close()
    n_params = sum(int(np.prod(s)) for _, s, _ in specs)
    return Summary("orbax-to-hf", str(src), str(dst), len(specs), n_params, "/".join(kinds), sum(sizes),
                   time.perf_counter() - t0, [f"{n} shard(s) of at most {_gb(limit)}"]
                   + ([f"copied {', '.join(copied)}"] if copied else []))


# ---------------------------------------------------------------------------------- components

def from_components(siglip: str | Path, qwen3: str | Path, dst: str | Path, *, seed: int = 0,
                    dtype: str = "float32", mesh: str | None = None, vit_layers: tuple[int, ...] = (-4, -10),
                    overwrite: bool = False, progress: bool = True) -> Summary:
    """A fresh jina-vlm for stage-1 training: SigLIP(2) vision + Qwen3 decoder + a random connector.

    See `weights.hf_components` for the layouts accepted and the transforms. The notes of the
    summary say what was resized, tied or dropped.
    """
    t0 = time.perf_counter()
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: destination already exists; pass --overwrite to replace it")
    config, reader = open_components(siglip, qwen3, seed=seed, vit_layers=tuple(vit_layers),
                                     param_dtype=np.dtype(dtype).name)
    for note in reader.notes:
        print(f"note: {note}", file=sys.stderr)
    loaded = [e for e in official_table(config) if e.name in reader.where and e.pieces]
    prog = Progress("from-components", len(loaded),
                    sum(int(np.prod(e.shape)) * np.dtype(reader.dtype(e.name)).itemsize for e in loaded),
                    enabled=progress)
    params = load_params(config, reader, dtype=dtype, place=_placer(config, mesh_from_spec(mesh)), progress=prog.update)
    prog.close()
    source = {"format": "components", "siglip": str(Path(siglip).absolute()),
              "qwen3": str(Path(qwen3).absolute()), "seed": seed, "notes": reader.notes}
    checkpoint.save(dst, config, params, overwrite=overwrite, source=source)
    n, nbytes, kinds = _param_stats(params)
    return Summary("from-components", f"{siglip} + {qwen3}", str(dst), len(loaded), n, kinds, nbytes,
                   time.perf_counter() - t0, list(reader.notes))


# ---------------------------------------------------------------------------------- check-logits

def _arch(config: JinaVLMConfig) -> dict:
    return dataclasses.asdict(config.replace(dtype="float32", param_dtype="float32", remat_policy="none",
                                             torch_dtype="float32"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def random_inputs(config: JinaVLMConfig, seed: int = 0, batch: int = 1, crops: int = 1, length: int = 32):
    """Random ids, crops in [-1, 1] and image positions: BOS, each crop's pooled tokens, `length` text."""
    rng = np.random.default_rng(seed)
    v, n_tok = config.vision, tokens_per_crop(config)
    total = 1 + crops * n_tok + length
    ids = rng.integers(0, config.text.vocab_size, size=(batch, total)).astype(np.int32)
    images = rng.uniform(-1, 1, size=(batch, crops, v.n_patches, v.patch_dim)).astype(np.float32)
    masks = np.ones((batch, crops, v.n_patches), np.float32)
    idx = np.broadcast_to(1 + np.arange(crops * n_tok).reshape(crops, n_tok), (batch, crops, n_tok))
    return ids, images, masks, np.ascontiguousarray(idx).astype(np.int32)


def logit_metrics(a: np.ndarray, b: np.ndarray, k: int = 5) -> dict[str, float]:
    """Agreement of logits [..., V] of A (reference) and B: relative errors, KL(A||B), top-k overlap."""
    a = a.astype(np.float64).reshape(-1, a.shape[-1])
    b = b.astype(np.float64).reshape(-1, b.shape[-1])
    diff = np.abs(a - b)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    ta, tb = np.argsort(-a, -1)[:, :k], np.argsort(-b, -1)[:, :k]
    overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])
    return {"max_rel_err": float(diff.max() / max(np.abs(a).max(), 1e-30)),
            "mean_rel_err": float(diff.mean() / max(np.abs(a).mean(), 1e-30)),
            "max_abs_err": float(diff.max()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            f"top{k}_overlap": float(overlap.mean()), "top1_agree": float((ta[:, 0] == tb[:, 0]).mean())}


def check_logits(a: str | Path, b: str | Path, *, seed: int = 0, batch: int = 1, crops: int = 1,
                 length: int = 32, max_kl: float = 1e-3, min_top5: float = 0.0) -> tuple[dict[str, float], bool]:
    """Run the same random inputs (text + images) through checkpoints `a` and `b` (float32 compute).

    Returns (metrics, ok); ok is False when the largest per-position KL(A||B) exceeds `max_kl` or the
    mean top-5 overlap falls below `min_top5`. The two checkpoints must have the same architecture.
    """
    ca, pa = checkpoint.load_any(a)
    cb, pb = checkpoint.load_any(b)
    fa, fb = _flat(_arch(ca)), _flat(_arch(cb))
    diffs = [f"{k}: {fa[k]!r} vs {fb[k]!r}" for k in fa if fa[k] != fb.get(k)]
    if diffs:
        raise ConfigError(f"{a} and {b} are different architectures:\n  " + "\n  ".join(diffs))
    inputs = random_inputs(ca, seed, batch, crops, length)
    cfg = ca.replace(dtype="float32", param_dtype="float32")
    if isinstance(pa, dict) and isinstance(pb, dict):
        fwd = _forward(cfg)  # same architecture: serves both
        m = logit_metrics(np.asarray(fwd(pa, *inputs)), np.asarray(fwd(pb, *inputs)))
    else:  # a quantized checkpoint (InferenceParams): both run in the per-layer inference layout
        from .inference.params import prepare_params
        from .inference.programs import full_logits_jit
        la, lb = (np.asarray(full_logits_jit(cfg, prepare_params(cfg, p), *inputs)) for p in (pa, pb))
        m = logit_metrics(la, lb)
    ok = m["kl_max"] <= max_kl and m["top5_overlap"] >= min_top5
    return m, ok


@functools.lru_cache(maxsize=4)
def _forward(config: JinaVLMConfig):
    """The jitted full forward for a config (cached: repeated checks do not recompile)."""
    model = JinaVLM(config)
    return jax.jit(lambda p, *x: model.apply({"params": p}, *x))


def format_metrics(a: str, b: str, m: dict[str, float], ok: bool, max_kl: float) -> str:
    """The check-logits report (stdout)."""
    lines = [f"A: {a}", f"B: {b}"]
    lines += [f"  {k:<14}{v:.3e}" if "err" in k or "kl" in k else f"  {k:<14}{v:.4f}" for k, v in m.items()]
    lines.append(f"  result        {'OK' if ok else 'MISMATCH'} (threshold: max KL <= {max_kl:g})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- adapt and shrink

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quantize_checkpoint(src: str | Path, dst: str | Path, *, vision: bool = False, dtype: str | None = None,
                        overwrite: bool = False) -> str:
    """A float checkpoint -> an int8 weight-only Orbax checkpoint (`adapt.quant`: decoder kernels, and
    the vision tower's with `vision`), in the per-layer inference layout. `checkpoint.load` restores it
    as `InferenceParams` without materialising float kernels. Returns the summary line."""
    from .adapt.quant import Quantization, save_quantized, tree_bytes
    from .inference.params import prepare_params
    quant = Quantization("int8", vision)
    _say(f"loading {src}")
    config, params = checkpoint.load_any(src, dtype=dtype)
    float_bytes = tree_bytes(params)
    _say(f"quantizing ({quant.name}) with Qwix")
    ip = prepare_params(config, params, quantize=quant)
    del params
    out = save_quantized(dst, config, ip, overwrite=overwrite,
                         source={"quantized_from": str(Path(src).absolute())})
    return f"{out}: {quant.name} weights, {_gb(tree_bytes(ip.tree))} (float: {_gb(float_bytes)})"


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, *, dtype: str | None = None,
               overwrite: bool = False) -> str:
    """Base checkpoint + LoRA adapter directory -> a normal Orbax checkpoint (W + A @ B * alpha / rank),
    which `orbax-to-hf` exports to the official layout. Returns the summary line."""
    from .adapt.lora import apply_adapter, read_adapter_info
    info = read_adapter_info(adapter)  # cheap checks before loading the base
    _say(f"loading {base}")
    config, params = checkpoint.load_any(base, dtype=dtype)
    if not isinstance(params, dict):
        raise CheckpointError(f"{base}: holds quantized weights; merge the adapter into the float checkpoint")
    merged = apply_adapter(config, params, adapter)
    del params
    lora = {k: info[k] for k in ("rank", "alpha", "modules", "base_dtype", "base") if k in info}
    path = checkpoint.save(out, config, merged, overwrite=overwrite, source={
        "merged_from": {"base": str(Path(base).absolute()), "adapter": str(Path(adapter).absolute()), **lora}})
    return f"{path}: {Path(base).name} + LoRA rank {info['rank']} (alpha {info['alpha']}) merged"
