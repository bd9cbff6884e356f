"""Adapt and shrink the model with Qwix: int8 weight-only inference (`quant`) and LoRA / QLoRA (`lora`).

Qwix (`pip install 'jinavlm-jax[adapt]'`) intercepts the `jax.lax.dot_general` of our unmodified
Linen modules: a `PtqProvider` swaps the matched kernels for int8 `QArray`s with per-channel scales,
a `LoraProvider` adds low-rank adapter params beside them. What we write ourselves (and why) is
listed in the README ("Adapt and shrink").
"""
from __future__ import annotations


class AdaptError(ValueError):
    """A bad adapter / quantization request or file (the message names the file, key or shape)."""


def require_qwix():
    """The qwix module, or an AdaptError naming the extra to install."""
    try:
        import qwix
    except ImportError:
        raise AdaptError("LoRA and int8 quantization need Qwix: pip install 'jinavlm-jax[adapt]' "
                         "(or pip install qwix)") from None
    return qwix


# Module paths (Qwix matches `re.fullmatch` against 'text/layers/q' in the nn.scan training layout and
# 'text/layers_3/q' in the per-layer inference layout: both are written into every regex here).
DECODER_PROJECTIONS = r"text/(layers|layers_\d+)/(q|k|v|out|up|gate|down)"
LM_HEAD = r"text/lm_head"
