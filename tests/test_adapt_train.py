"""LoRA training end to end, in process, on the tiny text-only corpus of the training tests (issue 12):

* QLoRA (an int8 base): only the adapters are trained and hold optimizer state; the base params
  (int8 values and scales) after training are bit-identical to the ones training started from;
* the merged params (`Setup.model_params`, what the export and generation use) give the logits of
  base + adapter to 1e-5 (fp32); OUTPUT_DIR/adapter holds exactly the trained adapter;
* resuming from the checkpoint of step 2 continues with the same losses.
"""
from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("qwix")

from jinavlm_jax.train.config import load_config  # noqa: E402

from test_train_support import DEMO, losses_of, shared_setup  # noqa: E402

pytestmark = [pytest.mark.slow,   # two short training runs (one compile of the LoRA train step)
              pytest.mark.filterwarnings("ignore:.VariableState. was removed:DeprecationWarning")]   # inside qwix

TEXT_ONLY = ["data.sources.vqa=null", "data.crops_per_row=0", "data.seq_len=64", "data.batch_size=4",
             "run.loss_chunk=16"]
LORA = ["lora.rank=4", "lora.alpha=8", "lora.base_dtype=int8", "lora.dropout=0.1",   # QLoRA: an int8 base
        "optimizer.groups.text.lr=1e-2", "optimizer.groups.text.warmup=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_setup(tmp_path_factory)


def test_lora_run_trains_only_adapters_and_resumes(setup, tmp_path):
    from jinavlm_jax import JinaVLM
    from jinavlm_jax.adapt.lora import load_adapter, lora_model, split_adapter
    from jinavlm_jax.convert import random_inputs
    from jinavlm_jax.train.loop import Trainer
    from jinavlm_jax.train.setup import build_setup

    out = tmp_path / "run"
    args = setup["overrides"] + TEXT_ONLY + LORA + ["run.steps=4", "checkpoint.every=2", "checkpoint.keep=5",
                                                    "checkpoint.async_save=false"]
    s = build_setup(load_config(DEMO, args + [f"run.output_dir={out}"]))
    t = Trainer(s, verbose=False)
    before = jax.device_get(t.state["params"])
    base0, ad0 = split_adapter(before)
    n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(ad0))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(t.state["opt_state"]) if x.ndim)
    assert n_opt == 2 * n_adapter      # Adam's two moments, for the adapters only
    t.run()
    after = jax.device_get(t.state["params"])
    base1, ad1 = split_adapter(after)
    jax.tree_util.tree_map(np.testing.assert_array_equal, base1, base0)     # the base is untouched
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ad1),
                                                         jax.tree_util.tree_leaves(ad0)))

    x = random_inputs(s.model_cfg, seed=0, batch=2, crops=1, length=10)
    fwd = lambda m, p: np.asarray(jax.jit(lambda p, *a: m.apply({"params": p}, *a))(p, *x))
    with_adapter = fwd(lora_model(s.model_cfg, s.lora.inference()), after)
    merged = fwd(JinaVLM(s.model_cfg), jax.device_get(s.model_params(after)))
    np.testing.assert_allclose(merged, with_adapter, rtol=0, atol=1e-5)
    start = fwd(JinaVLM(s.model_cfg), jax.device_get(s.model_params(before)))   # the (dequantized) base
    assert np.abs(with_adapter - start).max() > 1e-4   # training changed the model

    saved, spec, meta = load_adapter(out / "adapter", s.model_cfg)
    assert spec == s.lora and meta["base"]["steps"] == 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(saved), ad1)

    # Resume from step 2 (the later checkpoint removed): steps 3 and 4 give the same losses.
    ref = losses_of(out)
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "4")
    # The same Setup (its compiled train step) with the other output directory.
    s2 = dataclasses.replace(s, cfg=load_config(DEMO, args + [f"run.output_dir={again}"]))
    t2 = Trainer(s2, verbose=False)
    assert t2.start == 2
    t2.run()
    got = losses_of(again)
    assert [got[k] for k in (3, 4)] == [ref[k] for k in (3, 4)]
