"""The whole model against the golden set 1 of ../shared/testdata (an independent port, cross-checked
against the official PyTorch code to ~2e-5; see its README).

Tolerance: max |ours - golden| <= 1e-4 * max |golden| (relative error 1e-4, float32), per array:
ViT features, connector outputs and logits at real (non-padding) positions.
"""
from __future__ import annotations


import jax
import numpy as np
import pytest

from jinavlm_jax import JinaVLM

TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["set1_main", "set1_batch"])
def test_whole_model_equals_golden(set1, testdata, case):
    cfg, params = set1
    g = np.load(testdata / f"{case}.npz")
    model = JinaVLM(cfg)
    v = {"params": params}
    vit = jax.jit(lambda p, x: model.apply(p, x, method=JinaVLM.vision_features))(v, g["images"])
    feats = jax.jit(lambda p, x, m: model.apply(p, x, m, method=JinaVLM.encode_images))(
        v, g["images"], g["image_masks"])
    logits = jax.jit(model.apply)(v, g["input_ids"], g["images"], g["image_masks"], g["image_input_idx"])
    real = g["attention_mask"]
    errs = {"vit_features": rel_err(vit, g["vit_features"]),
            "image_features": rel_err(feats, g["image_features"]),
            "logits": rel_err(np.asarray(logits)[real], g["logits"][real])}
    assert all(e <= TOL for e in errs.values()), f"{case}: relative errors {errs} (tolerance {TOL})"
    # greedy choice at the last prompt position = the golden first generated token
    last = np.asarray(logits)[:, -1].argmax(-1)
    np.testing.assert_array_equal(last, g["greedy_tokens"][:, 0])
