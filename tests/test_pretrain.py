"""Vision pretraining (`train.pretrain`) and the demo's pretrained init (`demo.vision_pretrain_steps`)."""
import dataclasses
import json

import numpy as np
import pytest

from jinavlm_jax.data.synthetic import COLOURS, write_synthetic_vqa
from jinavlm_jax.model import JinaVLMConfig, init_params
from jinavlm_jax.processing import PreprocessConfig
from jinavlm_jax.processing.image import ImageProcessor
from jinavlm_jax.train.pretrain import label_arrays, pretrain_vision

PRE = PreprocessConfig(base_input_size=(112, 112), token_length_w=4, token_length_h=4, overlap_margins=(2, 2),
                       max_crops=1)


def _tiny():
    base = JinaVLMConfig.tiny()
    return base.replace(vision=dataclasses.replace(base.vision, image_size=112))


def test_label_arrays_names_the_bad_record():
    assert label_arrays([{"meta": {"shape": "square"}}], {"shape": ["circle", "square"]}).tolist() == [[1]]
    with pytest.raises(ValueError, match=r"'r7'.*meta\['shape'\]='hexagon'"):
        label_arrays([{"id": "r7", "meta": {"shape": "hexagon"}}], {"shape": ["circle", "square"]})


def test_pretrain_learns_colours_and_changes_only_the_vision_side(tmp_path):
    """100 steps on 100 images: held-out colour accuracy far above chance (1/6); the returned
    vision / connector trees have the init's structure and shapes, and moved."""
    write_synthetic_vqa(tmp_path, n_train=150, n_val=1, languages=("en",), progress=False, size=112)
    records = [json.loads(x) for x in (tmp_path / "vqa" / "train.jsonl").read_text().splitlines()]
    cfg = _tiny()
    init = init_params(cfg, 0)
    out = pretrain_vision(cfg, ImageProcessor(PRE), records, {"colour": list(COLOURS)}, init, root=tmp_path / "vqa",
                          steps=100, lr=5e-3, held_out=50, progress=False)
    assert out["accuracy"]["colour"] > 0.6, out["accuracy"]   # chance: 1/6
    import jax
    for part in ("vision", "connector"):
        shapes = lambda t: jax.tree_util.tree_map(lambda x: np.shape(x), t)
        assert shapes(out[part]) == shapes(init[part])
    assert not np.allclose(out["vision"]["patch_embed"]["kernel"], init["vision"]["patch_embed"]["kernel"])


def test_pretrain_refuses_mixed_crop_counts_and_too_few_records(tmp_path):
    write_synthetic_vqa(tmp_path, n_train=6, n_val=1, languages=("en",), progress=False, size=112)
    records = [json.loads(x) for x in (tmp_path / "vqa" / "train.jsonl").read_text().splitlines()]
    cfg = _tiny()
    with pytest.raises(ValueError, match="cannot hold out 6"):
        pretrain_vision(cfg, ImageProcessor(PRE), records, {"colour": list(COLOURS)}, init_params(cfg, 0),
                        root=tmp_path / "vqa", steps=1, held_out=6, progress=False)
    from PIL import Image
    Image.new("RGB", (600, 300), "white").save(tmp_path / "vqa" / "wide.png")
    records[0] = {**records[0], "images": ["wide.png"]}
    big = ImageProcessor(PRE.replace(max_crops=4))
    with pytest.raises(ValueError, match="different numbers of crops"):
        pretrain_vision(cfg, big, records, {"colour": list(COLOURS)}, init_params(cfg, 0), root=tmp_path / "vqa",
                        steps=1, progress=False)


def test_demo_writes_a_pretrained_init_and_needs_a_path(tmp_path):
    from jinavlm_jax.checkpoint import load_any
    from jinavlm_jax.train.config import RECIPES, TrainConfigError, load_config
    from jinavlm_jax.train.demo import prepare_demo
    base = [f"run.output_dir={tmp_path}", "demo.n_train=40", "demo.n_val=4", "demo.vision_pretrain_steps=5"]
    with pytest.raises(TrainConfigError, match="model.init must name the directory"):
        prepare_demo(load_config(RECIPES / "demo.yaml", base + ["model.init=random"]), say=lambda m: None)
    (tmp_path / "mine").mkdir()
    with pytest.raises(TrainConfigError, match="exists and is not a jinavlm-jax checkpoint"):
        prepare_demo(load_config(RECIPES / "demo.yaml", base + [f"model.init={tmp_path / 'mine'}"]), say=lambda m: None)
    cfg = load_config(RECIPES / "demo.yaml", base)
    prepare_demo(cfg, say=lambda m: None)
    loaded_cfg, params = load_any(cfg.model.init)
    from jinavlm_jax.train.setup import build_model_config
    assert (loaded_cfg.vision, loaded_cfg.text) == (build_model_config(cfg).vision, build_model_config(cfg).text)
    info = json.loads((tmp_path / "pretrained" / "jinavlm_checkpoint.json").read_text())
    assert info["source"]["trained_by"] == "jinavlm_jax.train.pretrain" and info["source"]["steps"] == 5
    # A second call finds the checkpoint and leaves it as it is.
    before = (tmp_path / "pretrained" / "jinavlm_checkpoint.json").stat().st_mtime_ns
    prepare_demo(cfg, say=lambda m: None)
    assert (tmp_path / "pretrained" / "jinavlm_checkpoint.json").stat().st_mtime_ns == before


def test_task_weights_shape_the_corpus_and_bad_ones_are_named(tmp_path):
    from jinavlm_jax.data.synthetic import TASKS, task_probabilities
    assert task_probabilities({"choice": 1.0}).tolist() == [float(t == "choice") for t in TASKS]
    info = write_synthetic_vqa(tmp_path, n_train=12, n_val=1, languages=("en",), progress=False, size=56,
                               task_weights={"shape": 2.0})
    assert info["vqa_train"] == 12
    tasks = {json.loads(x)["meta"]["task"] for x in (tmp_path / "vqa" / "train.jsonl").read_text().splitlines()}
    assert tasks == {"shape"}
    for bad, msg in (({"hexagon": 1.0}, "unknown task"), ({"shape": -1.0}, "non-negative"), ({}, "positive sum")):
        with pytest.raises(ValueError, match=msg):
            task_probabilities(bad)


def test_demo_report_states_the_whole_runs_wall_time(tmp_path):
    """The demo's summary line gives the training loop's time and, when the CLI passes it, the whole
    run's (corpus, tokenizer and vision pretraining included: the figure the README quotes)."""
    import io
    from jinavlm_jax.train.config import RECIPES, load_config
    from jinavlm_jax.train.demo import demo_report
    from jinavlm_jax.train.loop import TrainResult
    cfg = load_config(RECIPES / "demo.yaml", [f"run.output_dir={tmp_path}"])
    result = TrainResult(steps=9000, output_dir=tmp_path, wall_time_s=330.0)
    out = io.StringIO()
    demo_report(cfg, result, out=out, total_s=420.0)
    assert "== jina-vlm demo: 9000 steps in 5.5 min; 7.0 min in all, with the corpus, tokenizer and vision " \
           "pretraining ==" in out.getvalue()
    out = io.StringIO()
    demo_report(cfg, result, out=out)
    assert "== jina-vlm demo: 9000 steps in 5.5 min ==" in out.getvalue()
