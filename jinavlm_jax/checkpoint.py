"""Orbax checkpoints of jina-vlm params: save from any mesh, restore onto any mesh.

A checkpoint is a directory:

    DIR/
      jinavlm_checkpoint.json   # the official config.json dict + our run-time fields + provenance
      params/                   # Orbax PyTree checkpoint of {'vision', 'connector', 'text'}

The config is stored as the official `config.json` dict (`JinaVLMConfig.to_hf()`, or the source
file verbatim when converted from one, so `orbax-to-hf` gives back the same file), so one parser
(`JinaVLMConfig.from_hf`) reads both formats.

Atomicity: everything is written into a sibling `DIR.partial-<pid>` directory, the metadata file
last, and the directory is renamed to DIR only when complete. An interrupted save leaves no DIR (or,
with overwrite, the previous one untouched), and a leftover `.partial-*` directory has no metadata
file, so `load` refuses it. Single-process (one host) saving; multi-host runs need Orbax's own
CheckpointManager.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from .model.config import JinaVLMConfig
from .model.jinavlm import abstract_params
from .sharding import make_mesh, param_shardings
from .weights.safetensors_io import CheckpointError

META_NAME = "jinavlm_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "jinavlm-jax/orbax"
FORMAT_VERSION = 1
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy")


def is_checkpoint(directory: str | Path) -> bool:
    """True if `directory` is a complete jinavlm-jax Orbax checkpoint (metadata file present)."""
    return (Path(directory) / META_NAME).is_file()


def _prepare_destination(directory: Path, overwrite: bool) -> Path:
    """Refuse an existing destination unless overwrite; return the temp dir to write into."""
    if directory.exists() and not overwrite:
        raise CheckpointError(f"{directory}: destination already exists; choose another directory or pass "
                              "--overwrite (overwrite=True) to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, directory: Path) -> None:
    """Move a finished temp dir into place (replacing an old `directory` only now)."""
    old = None
    if directory.exists():
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_directory(directory: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir that becomes `directory` only if the block finishes.

    Used for Orbax checkpoints and exported safetensors directories alike: on any exception (or
    KeyboardInterrupt) the temp dir is deleted and the destination is left as it was.
    """
    d = Path(directory).absolute()
    tmp = _prepare_destination(d, overwrite)
    try:
        yield tmp
        _commit(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous PyTree checkpointer (OCDBT, zarr) with two non-default choices:

    * no zstd compression: trained bf16 weights hardly compress, and tensorstore's compression
      buffers added ~40% of the checkpoint size to the peak memory of a save (measured, full model);
    * no replica-parallel saving of replicated shards: with one process it only compiles a slice per
      array shape (seconds) and buys nothing.
    """
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(use_replica_parallel=False)), (np.ndarray, th.NumpyHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


def save(directory: str | Path, config: JinaVLMConfig, params: Any, *, overwrite: bool = False,
         hf_config: Mapping[str, Any] | None = None, source: Mapping[str, Any] | None = None) -> Path:
    """Save `params` (any sharding) and `config` as an Orbax checkpoint in `directory`.

    `hf_config`: the official config.json dict to keep verbatim (must describe the same architecture
    as `config`; default `config.to_hf()`). `source`: JSON-able provenance kept beside it (the
    converter records per-tensor source dtypes there so the export is bit-exact). Refuses an
    existing `directory` unless `overwrite`. Returns the absolute directory.
    """
    directory = Path(directory).absolute()
    hf = dict(hf_config) if hf_config is not None else config.to_hf()
    if JinaVLMConfig.from_hf(hf) != config.replace(dtype="float32", param_dtype="float32",
                                                   remat_policy="none"):
        raise CheckpointError(f"{directory}: hf_config does not describe the same architecture as config")
    _check_tree(abstract_params(config),
                jax.tree_util.tree_map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), params),
                f"params to save in {directory}")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": hf,
            "runtime": {k: getattr(config, k) for k in RUNTIME_FIELDS},
            "source": dict(source or {}), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_directory(directory, overwrite) as tmp:
        with _checkpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        # Written last: its presence marks the checkpoint complete.
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
    return directory


def read_info(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata dict: `config` (official config.json), `runtime`, `source`."""
    d = Path(directory)
    meta_path = d / META_NAME
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    if not meta_path.is_file():
        partial = ".partial-" in d.name
        raise CheckpointError(
            f"{d}: not a complete jinavlm-jax Orbax checkpoint (no {META_NAME})"
            + ("; this is the temp directory of an interrupted conversion, delete it and convert again"
               if partial else "; if the save was interrupted, convert again"))
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_path}: not a {FORMAT} metadata file")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: written by a newer jinavlm-jax (format version "
                              f"{meta['version']} > {FORMAT_VERSION}); upgrade jinavlm-jax")
    return meta


def read_config(directory: str | Path) -> JinaVLMConfig:
    """The JinaVLMConfig stored in a checkpoint (with its saved run-time fields)."""
    meta = read_info(directory)
    return JinaVLMConfig.from_hf(meta["config"], **meta.get("runtime", {}))


def _check_tree(abstract: Any, found: Any, what: str) -> None:
    """Compare a (shape, dtype) tree against the config's abstract params; report all problems at once."""
    want = {"/".join(map(str, (k.key for k in p))): tuple(s.shape)
            for p, s in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {"/".join(map(str, (k.key for k in p))): tuple(v[0])
            for p, v in jax.tree_util.tree_leaves_with_path(found, is_leaf=lambda x: isinstance(x, tuple))}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    bad = [f"{k}: config expects {want[k]}, found {have[k]}" for k in sorted(want) if k in have
           and want[k] != have[k]]
    if missing or unexpected or bad:
        lines = [f"{what}: params do not match the config ({len(missing)} missing, {len(unexpected)} "
                 f"unexpected, {len(bad)} mis-shaped)"]
        lines += [f"  missing: {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mis-shaped: {b}" for b in bad]
        raise CheckpointError("\n".join(lines))


def load(directory: str | Path, mesh: jax.sharding.Mesh | None = None, dtype: Any = None, *,
         host: bool = False) -> tuple[JinaVLMConfig, Any]:
    """Restore (config, params) from an Orbax checkpoint onto `mesh`, whatever mesh it was saved from.

    Each param is restored straight onto its `param_shardings(config, mesh)` sharding (default mesh:
    the first device alone). A checkpoint written by `python -m convert quantize` (int8 kernels) comes
    back as `inference.InferenceParams` in the per-layer layout, as stored (`dtype` is not applied).
    `dtype` casts on restore (e.g. "bfloat16"); the returned config's
    `param_dtype` says what the params are. A config that does not match the stored arrays is reported
    with every mis-matching param before anything is read. `host=True` returns numpy arrays in host
    memory instead (no devices involved; what an export needs).
    """
    directory = Path(directory).absolute()
    meta = read_info(directory)
    if meta.get("quantization"):
        if host:
            kind = meta["quantization"].get("dtype")
            raise CheckpointError(f"{directory}: holds {kind} quantized inference weights; "
                                  "exporting or training needs the float checkpoint it was quantized from")
        from .adapt.quant import load_quantized
        return load_quantized(directory, meta, mesh)
    config = JinaVLMConfig.from_hf(meta["config"], **meta.get("runtime", {}))
    params_dir = directory / PARAMS_DIR
    with _checkpointer() as ckptr:
        try:
            stored = ckptr.metadata(params_dir).item_metadata.tree
        except (FileNotFoundError, ValueError, OSError) as e:
            raise CheckpointError(f"{params_dir}: Orbax params missing or unreadable ({e})") from None
        stored_shapes = jax.tree_util.tree_map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), stored)
        abstract = abstract_params(config)
        _check_tree(abstract, stored_shapes, str(directory))
        if dtype is not None:
            config = config.replace(param_dtype=np.dtype(dtype).name)
        else:
            kinds = {np.dtype(m.dtype).name for m in jax.tree_util.tree_leaves(stored)}
            if len(kinds) == 1:
                config = config.replace(param_dtype=kinds.pop())
        if host:
            args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), stored)
            return config, ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=args))
        if mesh is None:
            mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        shardings = param_shardings(config, mesh)
        target = jax.tree_util.tree_map(
            lambda a, m, s: jax.ShapeDtypeStruct(a.shape, np.dtype(dtype) if dtype is not None else m.dtype,
                                                 sharding=s),
            abstract, stored, shardings)
        params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    return config, params


# ---------------------------------------------------------------------------------------- any format

def checkpoint_format(path: str | Path) -> str:
    """"orbax" (a jinavlm-jax checkpoint) or "hf" (an official Hugging Face directory) for `path`.

    Raises CheckpointError naming what is there otherwise (an interrupted save: the "not a complete
    checkpoint" error of `read_info`).
    """
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    if is_checkpoint(d):
        return "orbax"
    if (d / "config.json").is_file() and any((d / f).is_file() for f in
                                             ("model.safetensors", "model.safetensors.index.json")):
        return "hf"
    if (d / PARAMS_DIR).is_dir():
        read_info(d)  # params written but no metadata: raises the "interrupted conversion" error
    found = sorted(p.name for p in d.iterdir())[:12]
    raise CheckpointError(f"{d}: neither a jinavlm-jax Orbax checkpoint ({META_NAME} + params/) nor an "
                          f"official Hugging Face directory (config.json + model.safetensors or "
                          f"model.safetensors.index.json); found {found}")


def load_any(path: str | Path, dtype: Any = None, mesh: jax.sharding.Mesh | None = None
             ) -> tuple[JinaVLMConfig, Any]:
    """(config, params) from a jinavlm-jax Orbax checkpoint or an official Hugging Face directory.

    `dtype` casts the params (the config's `param_dtype` says what they are); with `mesh` the params
    are placed on their `param_shardings` (an Orbax checkpoint is restored straight onto them).
    """
    if checkpoint_format(path) == "orbax":
        return load(path, mesh=mesh, dtype=dtype)
    from .sharding import shard_params
    from .weights.official import load_jina_vlm
    config, params = load_jina_vlm(path, dtype=dtype)
    if mesh is not None:
        params = shard_params(params, param_shardings(config, mesh))
    return config, params
