"""Supervised pretraining of the vision tower + connector on image labels (the demo's stand-in for SigLIP2).

The released jina-vlm starts from a pretrained SigLIP2 vision tower; the demo trains its tiny tower
from scratch. Trained only through the decoder on the mixed VQA corpus, that tower learns colours and
positions but not shapes or counts (docs/performance.md, "Fifth round"): the same tower with a
classification head learns shapes to ~97% in a minute, and a decoder reads such features at once.
So the demo first trains `vision` + `connector` (the model's own modules and init) with small
classification heads on the corpus's per-image labels, then trains the VLM from those params.

    out = pretrain_vision(model_cfg, image_processor, records, labels, init, root=vqa_dir, steps=3000)

`records`: corpus rows ({"images": [path], "meta": {...}}); `labels`: meta key -> list of values
(one softmax head each, e.g. {"shape": ["circle", ...], "n": [1, 2, 3, 4]}). The heads read the
pooled image tokens of all crops through one learned attention query plus their mean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from ..model import JinaVLM, JinaVLMConfig


class VisionClassifier(nn.Module):
    """JinaVLM's encode_images (params under "vlm/vision", "vlm/connector") + one linear head per label."""

    config: JinaVLMConfig
    n_classes: tuple[int, ...]

    @nn.compact
    def __call__(self, images: jax.Array, image_masks: jax.Array) -> tuple[jax.Array, ...]:
        b = images.shape[0]
        feats = JinaVLM(self.config, name="vlm").encode_images(images, image_masks)
        feats = feats.reshape(b, -1, feats.shape[-1]).astype(jnp.float32)       # [B, crops * tokens, D]
        d = feats.shape[-1]
        query = self.param("query", nn.initializers.normal(0.02), (1, 1, d))
        attended = nn.MultiHeadDotProductAttention(num_heads=1, name="pool")(jnp.broadcast_to(query, (b, 1, d)), feats)
        h = jnp.concatenate([attended[:, 0], feats.mean(axis=1)], axis=-1)
        return tuple(nn.Dense(n, name=f"head_{i}")(h) for i, n in enumerate(self.n_classes))


def label_arrays(records: Sequence[Mapping], labels: Mapping[str, Sequence]) -> np.ndarray:
    """[N, len(labels)] int32 class indices from each record's meta (a clear error for a missing one)."""
    out = np.empty((len(records), len(labels)), np.int32)
    for i, rec in enumerate(records):
        meta = rec.get("meta", {})
        for j, (key, values) in enumerate(labels.items()):
            if meta.get(key) not in values:
                raise ValueError(f"vision pretraining: record {rec.get('id', i)!r} has meta[{key!r}]="
                                 f"{meta.get(key)!r}, not one of {list(values)}")
            out[i, j] = list(values).index(meta[key])
    return out


def pretrain_vision(model_cfg: JinaVLMConfig, image_processor, records: Sequence[Mapping], labels: Mapping[str, Sequence],
                    init: Mapping[str, Any], *, root: str | Path, steps: int, lr: float = 2e-3, batch_size: int = 16,
                    warmup: int = 50, seed: int = 0, held_out: int | None = None,
                    say: Callable[[str], None] = lambda msg: None, progress: bool = True) -> dict:
    """Train {"vision", "connector"} of `init` on `labels`; returns them (numpy) and held-out accuracies.

    Images (paths relative to `root`) go through `image_processor` like training's; every image must
    make the same number of crops. The last `held_out` records (default: a fifth, at most 500) are kept
    out and scored at the end.
    Returns {"vision": ..., "connector": ..., "accuracy": {label: held-out accuracy}}.
    """
    from tqdm import tqdm
    held_out = min(500, len(records) // 5) if held_out is None else held_out
    if not 0 < held_out < len(records):
        raise ValueError(f"vision pretraining: {len(records)} records: cannot hold out {held_out}")
    root = Path(root)
    outs = [image_processor.process(root / rec["images"][0]) for rec in
            tqdm(records, desc="vision pretraining: images", disable=not progress, leave=False, dynamic_ncols=True)]
    n_crops = {o["images"].shape[0] for o in outs}
    if len(n_crops) != 1:
        raise ValueError(f"vision pretraining: images make different numbers of crops {sorted(n_crops)}")
    images = np.stack([o["images"] for o in outs])
    masks = np.stack([o["image_masks"] for o in outs])
    y = label_arrays(records, labels)
    n_train = len(records) - held_out

    model = VisionClassifier(model_cfg, tuple(len(v) for v in labels.values()))
    params = nn.unbox(model.init(jax.random.key(seed), images[:1], masks[:1])["params"])
    params["vlm"] = {"vision": init["vision"], "connector": init["connector"]}
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    tx = optax.adamw(schedule, b2=0.98, weight_decay=0.0)
    opt_state = tx.init(params)

    def loss_fn(p, x, m, t):
        return sum(optax.softmax_cross_entropy_with_integer_labels(lg, t[:, j]).mean()
                   for j, lg in enumerate(model.apply({"params": p}, x, m)))

    @jax.jit
    def step(p, s, x, m, t):
        loss, g = jax.value_and_grad(loss_fn)(p, x, m, t)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    @jax.jit
    def correct(p, x, m, t):
        return jnp.stack([(lg.argmax(-1) == t[:, j]).sum() for j, lg in enumerate(model.apply({"params": p}, x, m))])

    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="vision pretraining", disable=not progress, leave=False, dynamic_ncols=True)
    for i in bar:
        idx = rng.integers(0, n_train, batch_size)        # never the held-out records (the last ones)
        params, opt_state, loss = step(params, opt_state, images[idx], masks[idx], y[idx])
        if (i + 1) % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    hits = sum(np.asarray(correct(params, images[k:k + 100], masks[k:k + 100], y[k:k + 100]))
               for k in range(n_train, len(records), 100))
    acc = {key: float(h) / held_out for key, h in zip(labels, hits)}
    say("vision pretraining: held-out " + ", ".join(f"{k} {a:.1%}" for k, a in acc.items()))
    out = jax.tree_util.tree_map(np.asarray, params["vlm"])
    return {"vision": out["vision"], "connector": out["connector"], "accuracy": acc}
