"""Training logs: a progress bar, JSONL metrics, TensorBoard event files (no TensorFlow) and a loss PNG.

TensorBoard reads `events.out.tfevents.*` files: TFRecord-framed `Event` protocol buffers. Scalars
need only three small messages (Event, Summary, Summary.Value), so they are encoded here by hand
(`_event`) with the TFRecord CRC32C framing, instead of depending on TensorFlow or tensorboardX.
`read_events` parses them back (used by the tests, and handy to inspect a run without TensorBoard).
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------- TFRecord / protobuf

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing needs."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(tag: int, payload: bytes) -> bytes:
    return _varint(tag << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, scalars: Mapping[str, float] | None = None,
           file_version: str | None = None) -> bytes:
    """Serialised tensorboard Event {1: wall_time double, 2: step int64, 3: file_version, 5: Summary}."""
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step & (2**64 - 1))
    if file_version is not None:
        msg += _len_field(3, file_version.encode())
    if scalars:
        summary = b""
        for tag, value in scalars.items():
            # Summary.Value {1: tag string, 2: simple_value float}
            val = _len_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value))
            summary += _len_field(1, val)
        msg += _len_field(5, summary)
    return msg


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class TensorBoardWriter:
    """Appends scalar events to `logdir/events.out.tfevents.<time>.<host>` (one file per writer)."""

    def __init__(self, logdir: str | Path):
        d = Path(logdir)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._f = open(self.path, "ab")
        self._f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float, np.floating, np.integer))}
        if finite:
            self._f.write(_record(_event(time.time(), int(step), finite)))
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str | Path) -> list[tuple[int, dict[str, float]]]:
    """Parse an event file written by TensorBoardWriter: [(step, {tag: value})]; checks every CRC."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(data[pos:pos + 8]):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        body = data[pos + 12:pos + 12 + n]
        if struct.unpack_from("<I", data, pos + 12 + n)[0] != _masked_crc(body):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        pos += 16 + n
        fields = dict(_fields(body))
        step = fields.get(2, 0)
        scalars = {}
        for _, val in (f for f in _fields(fields.get(5, b"")) if f[0] == 1):
            v = dict(_fields(val))
            scalars[v[1].decode()] = struct.unpack("<f", v[2])[0]
        if scalars:
            out.append((step, scalars))
    return out


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        tag, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = _read_varint(buf, pos)
        elif wire == 1:
            v, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            v, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            v, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield tag, v


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


# ---------------------------------------------------------------------------------------- writers

class MetricsLog:
    """JSONL (`metrics.jsonl`, one object per record, appended across restarts) + TensorBoard."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.jsonl = self.dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._f = open(self.jsonl, "a", encoding="utf-8")
            if tensorboard:
                self._tb = TensorBoardWriter(self.dir / "tensorboard")

    def write(self, step: int, values: Mapping[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in values.items()})
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._tb is not None:
            self._tb.scalars(step, {f"{kind}/{k}": v for k, v in rec.items()
                                    if k not in ("kind", "step", "time") and isinstance(v, (int, float))})

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def read_metrics(path: str | Path, kind: str = "train") -> dict[int, dict]:
    """{step: record} of one kind from metrics.jsonl (the last record of a step wins: after a resume
    the re-run steps replace the ones logged before the interruption)."""
    out: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("kind") == kind:
                out[rec["step"]] = rec
    return out


class Progress:
    """A tqdm progress bar on stderr showing step, loss and throughput (off when not a TTY-wanted)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step",
                        desc="train", file=sys.stderr, mininterval=1.0)

    def update(self, n: int, **post) -> None:
        self.bar.update(n)
        if post:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in post.items()},
                                 refresh=False)

    def write(self, msg: str) -> None:
        self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------- plot

def plot_loss_png(train: Sequence[tuple[int, float]], path: str | Path, evals: Sequence[tuple[int, float]] = (),
                  title: str = "training loss") -> Path:
    """A loss-curve PNG drawn with pillow: train loss (line, smoothed) and held-out loss (dots)."""
    from PIL import Image, ImageDraw, ImageFont
    w, h, ml, mr, mt, mb = 800, 480, 70, 20, 40, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    pts = [(s, v) for s, v in train if math.isfinite(v)]
    ev = [(s, v) for s, v in evals if math.isfinite(v)]
    allv = [v for _, v in pts + ev]
    if not allv:
        d.text((ml, h // 2), "no finite loss values", fill="black", font=font)
        im.save(path)
        return Path(path)
    x0, x1 = min(s for s, _ in pts + ev), max(s for s, _ in pts + ev)
    y0, y1 = 0.0, max(allv) * 1.05
    x1 = x1 if x1 > x0 else x0 + 1

    def xy(s, v):
        return (ml + (s - x0) / (x1 - x0) * (w - ml - mr), h - mb - (v - y0) / (y1 - y0) * (h - mt - mb))

    d.rectangle([ml, mt, w - mr, h - mb], outline="black")
    for i in range(6):
        v = y0 + (y1 - y0) * i / 5
        _, y = xy(x0, v)
        d.line([ml - 4, y, ml, y], fill="black")
        d.line([ml, y, w - mr, y], fill=(230, 230, 230))
        d.text((5, y - 6), f"{v:.3g}", fill="black", font=font)
        s = x0 + (x1 - x0) * i / 5
        x, _ = xy(s, y0)
        d.line([x, h - mb, x, h - mb + 4], fill="black")
        d.text((x - 10, h - mb + 8), f"{int(s)}", fill="black", font=font)
    if len(pts) > 1:
        raw = [xy(s, v) for s, v in pts]
        d.line(raw, fill=(170, 190, 230), width=1)
        k = max(1, len(pts) // 50)
        sm = np.convolve([v for _, v in pts], np.ones(k) / k, mode="valid")
        d.line([xy(pts[i + k // 2][0], float(v)) for i, v in enumerate(sm)], fill=(20, 60, 200), width=2)
    for s, v in ev:
        x, y = xy(s, v)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(220, 60, 30))
    d.text((ml, 12), title, fill="black", font=font)
    d.text((w - 300, 12), "blue: train loss (smoothed)   red: held-out", fill="black", font=font)
    d.text((w // 2 - 15, h - 20), "step", fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return Path(path)
