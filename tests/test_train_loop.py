"""The loop's outputs and stops, in the main process on text-only data (small, fast programs):

* a short run writes metrics.jsonl, TensorBoard events (read back with the `tensorboard` package's
  event reader), a loss PNG, the held-out loss and generation accuracy, and an export that
  `jinavlm_jax.checkpoint.load` and the processor read (tokenizer beside the params);
* the MFU it logs is the MFU `jinavlm aot` computes for the same recipe and mesh, vision tower
  frozen or trained;
* a NaN loss stops the run with a message naming the step, exit status 1, nothing saved from it;
* answer scoring: exact match after normalisation, multiple-choice letter extraction.
"""
from __future__ import annotations

import glob

import pytest

import jax

from jinavlm_jax.train.cli import main
from jinavlm_jax.train.config import load_config
from jinavlm_jax.train.evaluate import extract_choice, metric_for, normalize_answer, score

from test_train_support import DEMO, shared_setup

jax_tree_size = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))

TEXT_ONLY = ["data.sources.vqa=null", "data.crops_per_row=0", "data.seq_len=64", "data.batch_size=4",
             "run.loss_chunk=16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_setup(tmp_path_factory)


def read_events(path) -> list[tuple[int, dict[str, float]]]:
    """[(step, {tag: value})] of an event file, read by TensorBoard's own loader (what `tensorboard
    --logdir` shows; it checks the record framing and CRCs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            by_step.setdefault(e.step, {})[tag] = e.value
    return sorted(by_step.items())


@pytest.mark.slow
def test_outputs_of_a_short_run(setup, tmp_path):
    from jinavlm_jax.checkpoint import load
    from jinavlm_jax.processing import Processor
    from jinavlm_jax.train.loop import run_training
    from jinavlm_jax.train.metrics import read_metrics
    out = tmp_path / "run"
    cfg = load_config(DEMO, setup["overrides"] + TEXT_ONLY + [
        f"run.output_dir={out}", "run.steps=3", "checkpoint.every=2", "eval.final=true", "eval.batches=1",
        "eval.generate.samples=4", "eval.generate.max_new_tokens=3", "checkpoint.export=true", "log.plot=true"])
    res = run_training(cfg, verbose=False)
    tr = read_metrics(out / "metrics.jsonl")
    assert sorted(tr) == [1, 2, 3]
    for key in ("loss", "accuracy", "grad_norm", "lr/connector", "lr/text", "lr/vision", "tokens_per_s"):
        assert key in tr[3], key
    ev = read_metrics(out / "metrics.jsonl", "eval")[3]
    # the accuracy is the share of the 4 predictions scored correct
    assert ev["gen_n"] == 4 and ev["heldout_loss"] > 0
    assert ev["gen_accuracy"] == sum(p["correct"] for p in res.generation.predictions) / 4
    files = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    assert len(files) == 1
    events = read_events(files[0])
    assert [s for s, v in events if "train/loss" in v] == [1, 2, 3]
    for step, values in events:   # TensorBoard holds what metrics.jsonl holds (float32 in the events)
        if "train/loss" in values:
            assert values["train/loss"] == pytest.approx(tr[step]["loss"], rel=1e-6)
    assert [v["eval/gen_accuracy"] for _, v in events if "eval/gen_accuracy" in v] == \
        pytest.approx([ev["gen_accuracy"]])
    assert res.plot and res.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "2").is_dir() and (out / "checkpoints" / "3").is_dir()
    config, params = load(res.export_dir)
    assert jax_tree_size(params) > 0
    proc = Processor.from_dir(res.export_dir)
    assert proc.tokenizer.special.patch >= config.text.vocab_size      # image tokens in the extra rows
    assert res.generation.n == 4 and len(res.generation.predictions) == 4


@pytest.mark.slow
@pytest.mark.parametrize("vision", ["trained", "frozen"])
def test_logged_mfu_is_what_aot_computes(setup, tmp_path, vision):
    """Acceptance 3: training logs the MFU of `jinavlm aot`'s model FLOPs for the same recipe and mesh
    (model FLOPs / (devices x peak x step time)); with the vision tower frozen those FLOPs drop its
    backward pass."""
    from jinavlm_jax import tpu
    from jinavlm_jax.train.loop import run_training
    from jinavlm_jax.train.setup import resolve_mesh
    overrides = setup["overrides"] + [f"run.output_dir={tmp_path / 'run'}", "run.steps=2", "log.every=1",
                                      "log.peak_tflops_per_device=1", "log.tensorboard=false"]
    if vision == "frozen":
        overrides.append("optimizer.groups.vision.lr=null")
    cfg = load_config(DEMO, overrides)
    logged = {}
    run_training(cfg, verbose=False, on_step=lambda step, vals: logged.__setitem__(step, vals))

    cfg_aot, model_cfg = tpu.load_recipe(str(DEMO), overrides)         # what `jinavlm aot --config` reads
    job = tpu.train_job(cfg_aot, model_cfg, resolve_mesh(cfg_aot))
    assert job.static["vision_trained"] == (vision == "trained")
    assert job.static["crops_per_row"] > 0                                 # the vision tower runs
    assert sorted(logged) == [1, 2]
    for vals in logged.values():
        want = job.model_flops / (jax.device_count() * 1e12 * vals["step_time_s"])
        assert vals["mfu"] == pytest.approx(want, rel=1e-9)
    from jinavlm_jax.flops import model_flops
    other = model_flops(model_cfg, rows=cfg.data.batch_size, seq_len=cfg.data.seq_len, crops=cfg.data.crops_per_row,
                        train=True, train_vision=vision != "trained")["total"]
    assert other != job.model_flops          # the frozen / trained distinction changes the figure


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step(setup, tmp_path, capsys):
    out = tmp_path / "nan"
    rc = main(["--quiet", str(DEMO), *setup["overrides"], *TEXT_ONLY, f"run.output_dir={out}", "run.steps=6",
               "checkpoint.every=1", "optimizer.grad_clip_norm=null", "optimizer.groups.text.warmup=0",
               "optimizer.groups.text.lr=1e30"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "loss became nan at step 2" in err or "loss became inf at step 2" in err, err
    assert "the last checkpoint is step 1" in err
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1]


def test_answer_scoring():
    assert normalize_answer("  Rot. ") == "rot" and normalize_answer("红色。") == "红色"
    assert normalize_answer("أحمر؟") == "أحمر"
    q = "What colour is the shape?\nA. red\nB. blue\nC. green\nD. yellow\nReturn only the letter."
    assert metric_for(q, "B") == "choice" and metric_for("What colour?", "B") == "exact"
    assert extract_choice("B") == "B" and extract_choice("(C) green") == "C" and extract_choice("Answer: D.") == "D"
    assert extract_choice("blue", "ABCD") is None
    assert score("B.", "B", q) and not score("A", "B", q) and score(" Blue", "blue", "What colour?")
    assert not score("blue sky", "blue", "What colour?")
