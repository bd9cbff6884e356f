"""The FLOP model: accelerator peak rates and the model FLOPs of a step, written once.

Every figure of model FLOPs or MFU in the project comes from here: the MFU that training logs
(`train.trainer`), `jinavlm aot` and the `docs/tpu.md` report (`tpu.jobs`), `jinavlm efficiency` and
the benchmarks. Model FLOPs count 2 per multiply-add of every matmul a step must do (no
rematerialisation, the full L x L attention square); the jaxpr counter of `tpu.count` checks them
against the compiled programs (tests/test_aot.py).

    f = model_flops(config, rows=8, seq_len=4096, crops=13, train=True, train_vision=False)["total"]
    mfu(f, step_seconds, peak_flops_per_device(jax.devices()[0]), jax.device_count())
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2 ** 30


# ---------------------------------------------------------------------------------------- chips

@dataclass(frozen=True)
class Chip:
    """One accelerator: usable HBM, dense bf16 peak FLOP/s, HBM bandwidth (public spec sheets) and the
    `device_kind` JAX reports for it."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float      # bytes / s
    device_kind: str
    aliases: tuple[str, ...] = ()   # other device_kind spellings of the same chip


# The TPU chips `jinavlm aot` compiles for (topology names such as v5e:2x4) and docs/tpu.md lists.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, "TPU v4"),
    # libtpu reserves part of v5e's 16 GiB; 15.75 GiB is what a program may use.
    "v5e": Chip("v5e", int(15.75 * GiB), 197e12, 819e9, "TPU v5 lite", ("TPU v5e",)),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, "TPU v5", ("TPU v5p",)),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, "TPU v6 lite"),
}

# Other devices training may run on: only their peak rate is used (for the MFU it logs).
OTHER_DEVICES: tuple[Chip, ...] = (
    Chip("v3", 16 * GiB, 123e12, 900e9, "TPU v3"),
    Chip("h200", 141 * 10 ** 9, 989e12, 4.8e12, "NVIDIA H200"),
    Chip("h100", 80 * GiB, 989e12, 3.35e12, "NVIDIA H100"),
    Chip("a100", 80 * GiB, 312e12, 2.0e12, "NVIDIA A100"),
    Chip("l4", 24 * GiB, 121e12, 300e9, "NVIDIA L4"),
)


def chip_of_device_kind(kind: str) -> Chip | None:
    """The chip whose `device_kind` is the longest prefix of `kind` ("TPU v5 lite" is v5e, not v5p)."""
    hits = [(len(k), c) for c in (*CHIPS.values(), *OTHER_DEVICES) for k in (c.device_kind, *c.aliases)
            if kind.startswith(k)]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def peak_flops_per_device(device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device (None when unknown, e.g. CPU: MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    chip = chip_of_device_kind(getattr(device, "device_kind", ""))
    return chip.peak_flops if chip else None


def mfu(model_flops_per_step: float, step_seconds: float, peak_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: model FLOPs / (devices x peak x step time); 0 for a zero time."""
    return model_flops_per_step / (devices * peak_per_device * step_seconds) if step_seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------- model FLOPs

def _attention(layers: int, heads: int, head_dim: int, q_len: int, kv_len: int, sequences: int) -> int:
    """QK^T and PV: 2 matmuls of 2 x q x kv x heads x head_dim per layer and sequence."""
    return 2 * 2 * layers * heads * head_dim * q_len * kv_len * sequences


def model_flops(config, *, rows: int, seq_len: int, crops: int, train: bool, train_vision: bool = True,
                logit_positions: int | None = None) -> dict:
    """Model FLOPs of one step over all devices: 6 x params x tokens + attention (training), 2 x ... (forward).

    Each weight matrix counts the tokens that pass through it: text layers every position of every
    row (padding included), the lm_head every position (`logit_positions` per row: the prefill
    runs it on 1), the ViT blocks actually run (`n_run_layers`, the deepest feature layer) every
    patch of every crop, the pooling k/v the members of every window, q, o and the projector once
    per window. Embedding tables are lookups (0 FLOPs). Attention is the full L x L square (what the
    XLA path computes; the causal splash kernel skips about half of the decoder's). Training =
    3 x forward (backward = 2 x forward), except a frozen vision tower (`train_vision=False`):
    it gets no gradient at all, so 1 x its forward.

    Returns the parts: `text_linear` (decoder layers' matmuls), `text_attention`, `lm_head`, `text`
    (their sum), `vision` (ViT incl. `vision_attention`), `connector`, `total`, and the counts
    `text_params`, `vit_params`, `tokens`, `patches`.
    """
    t, v, c = config.text, config.vision, config.connector
    d, vd = t.hidden_size, v.hidden_size
    layer_params = t.n_layers * (d * (t.n_heads + 2 * t.n_kv_heads) * t.head_dim + t.n_heads * t.head_dim * d
                                 + 3 * d * t.mlp_size)
    tokens = rows * seq_len
    logit_tokens = tokens if logit_positions is None else rows * logit_positions
    text_linear = 2 * layer_params * tokens
    text_attention = _attention(t.n_layers, t.n_heads, t.head_dim, seq_len, seq_len, rows)
    lm_head = 2 * d * t.vocab_size * logit_tokens
    text = text_linear + text_attention + lm_head

    n_crops = rows * crops
    p = v.n_patches
    vit_params = v.n_run_layers * (4 * vd * v.n_heads * v.head_dim + 2 * vd * v.mlp_size) + v.patch_dim * vd
    vision_attention = _attention(v.n_run_layers, v.n_heads, v.head_dim, p, p, n_crops)
    vision = 2 * vit_params * p * n_crops + vision_attention

    cin = vd * len(v.vit_layers)
    hd = c.pool_heads * c.pool_head_dim
    side = v.patches_per_side
    windows = (-(-side // c.pooling_h)) * (-(-side // c.pooling_w)) * n_crops
    members = c.pooling_h * c.pooling_w
    # per window: k, v over its members; q (of the members' mean) and o once; the SwiGLU projector
    # (value, gate: hd -> projector_size; down: projector_size -> d); attention of 1 query x members.
    connector = (2 * windows * (members * 2 * cin * hd + cin * hd + hd * hd + 2 * hd * c.projector_size
                                + c.projector_size * d) + 2 * 2 * windows * members * hd)
    if not train:
        total = text + vision + connector
    else:
        total = 3 * (text + connector) + (3 if train_vision else 1) * vision
    return {"total": float(total), "text": float(text), "text_linear": float(text_linear),
            "text_attention": float(text_attention), "lm_head": float(lm_head), "vision": float(vision),
            "vision_attention": float(vision_attention), "connector": float(connector),
            "text_params": layer_params + d * t.vocab_size, "vit_params": vit_params, "tokens": tokens,
            "patches": p * n_crops}


def decode_step_flops(config, *, rows: int, cache_len: int) -> float:
    """Model FLOPs of one decode step (one new token per row), all devices: 2 x decoder params x rows
    plus attention of that token over the whole cache (the XLA path reads every slot)."""
    t = config.text
    f = model_flops(config, rows=rows, seq_len=1, crops=0, train=False)
    return f["text_linear"] + f["lm_head"] + _attention(t.n_layers, t.n_heads, t.head_dim, 1, cache_len, rows)


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
        return f["text_linear"] + f["text_attention"] + vision_on * (f["vision"] - patch_embed)
    if "no_batch_dims" in policy:
        return f["text_attention"] + vision_on * f["vision_attention"]
    return 0.0


__all__ = ["CHIPS", "Chip", "GiB", "OTHER_DEVICES", "chip_of_device_kind", "decode_step_flops", "mfu",
           "model_flops", "peak_flops_per_device", "remat_recompute_flops"]
