"""Training logs: a progress bar (tqdm), JSONL metrics, TensorBoard event files and a loss PNG.

TensorBoard's `events.out.tfevents.*` files are written by tensorboardX (no TensorFlow needed);
`tensorboard --logdir OUTPUT_DIR/tensorboard` shows them, and `metrics.jsonl` holds the same records
for scripts (`read_metrics`).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


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
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any], kind: str = "train") -> None:
        """Append one record of `kind` ("train" / "eval") at `step` to both logs."""
        if not self.enabled:
            return
        rec = {"kind": kind, "step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _plain(v) for k, v in values.items()})
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("kind", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step), walltime=rec["time"])
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both logs."""
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
        """Advance by `n` steps (and show `post` values beside the bar)."""
        self.bar.update(n)
        if post:
            self.show(**post)

    def show(self, **values) -> None:
        """Show `values` (e.g. the last fetched loss) beside the bar from the next redraw on."""
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()},
                             refresh=False)

    def write(self, msg: str) -> None:
        """A line above the bar."""
        self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
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
