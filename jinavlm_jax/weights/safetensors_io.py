"""Safetensors reading and writing in numpy, bfloat16 included, one tensor (or row range) at a time.

A small reader of our own rather than `safetensors.numpy.load_file`: it memory-maps the file, so a
tensor's rows can be read without loading the rest (the fused qkv splits, streaming conversion);
it reads bfloat16 through ml_dtypes; and it validates the header against the file size, so a
truncated download is reported with the file and tensor name instead of failing somewhere later.
Pickled `.bin` checkpoints are refused: we never unpickle.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or tensor that cannot be used (the message names the file and the tensor)."""


class SafetensorsFile:
    """One .safetensors file: header parsed and checked at open, tensors memory-mapped on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header "
                                          f"(header says {n} bytes, file has {size})")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._start = 8 + n
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dt = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                lo, hi = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported or malformed "
                                      f"header entry {info!r}") from None
            if hi - lo != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r} byte range does not match its shape {shape}")
            if self._start + hi > size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} needs bytes up to "
                                      f"{self._start + hi}, the file has {size} (re-download or re-convert it)")
            self.tensors[name] = (dt, shape, lo, hi)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows [a, b) of its first axis) as a fresh numpy array."""
        dt, shape, lo, _ = self.tensors[name]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dt.itemsize if shape else dt.itemsize
        a, b = rows if rows is not None else (0, shape[0] if shape else 1)
        count = (b - a) * (row_bytes // dt.itemsize) if shape else 1
        out = np.empty(count, dtype=dt)
        with open(self.path, "rb") as f:
            f.seek(self._start + lo + a * row_bytes)
            got = f.readinto(out.view(np.uint8))  # straight into the array: one copy, not two
        if got != count * dt.itemsize:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return out.reshape(((b - a),) + shape[1:] if shape else ())


class CheckpointReader:
    """All tensors of a Hugging Face checkpoint directory: model.safetensors or a sharded index."""

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError(f"{d}: checkpoint directory not found")
        self.dir = d
        index = d / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) listed but missing: {missing}")
        elif (d / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            found = sorted(p.name for p in d.iterdir())
            pickles = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if pickles:
                raise CheckpointError(f"{d}: only pickle checkpoint(s) {pickles} found; jinavlm-jax never "
                                      "unpickles (it can run code). Convert to safetensors with the "
                                      "transformers library first (save_pretrained(..., safe_serialization=True)).")
            raise CheckpointError(f"{d}: no {SINGLE_NAME} or {INDEX_NAME} found (files: {found})")
        self.files = {f: SafetensorsFile(d / f) for f in files}
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for name in f.tensors:
                self.where[name] = f

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.where[name].dtype(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.where[name].read(name, rows)


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write tensors to `path` atomically (a temp file renamed into place). Returns bytes written."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    specs = [(name, tuple(arr.shape), arr.dtype) for name, arr in items]
    return write_safetensors_stream(path, specs, (arr for _, arr in items), metadata)


def write_safetensors_stream(path: str | Path, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                             arrays: Iterable[np.ndarray], metadata: Mapping[str, str] | None = None) -> int:
    """Write tensors declared up front as (name, shape, dtype), taking their values one at a time.

    The header is written from `specs`; `arrays` (same order) is consumed lazily, so only one tensor
    needs to be in memory (streaming export). Each array must match its declared shape and dtype.
    Atomic like `write_safetensors`: an interrupted write leaves only `<path>.partial`, removed on error.
    """
    specs = list(specs)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, shape, dtype in specs:
        dt = np.dtype(dtype)
        if dt not in CODES:
            raise CheckpointError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": CODES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            it = iter(arrays)
            for name, shape, dtype in specs:
                arr = next(it, None)
                if arr is None or tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
                    found = None if arr is None else (tuple(arr.shape), str(arr.dtype))
                    raise CheckpointError(f"{path}: tensor {name!r} declared {tuple(shape)} {np.dtype(dtype)}, "
                                          f"got {found}")
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)  # no bytes copy
                del arr
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(blob) + off
