"""`python -m jinavlm_jax`: the shipped demo model answers its showcase questions; `ship` packages a
demo export; `--random` keeps the smoke run of the 2.4B layout."""
from __future__ import annotations

import json
import re
import shutil

import jax
import pytest

from jinavlm_jax import __main__ as main_job
from jinavlm_jax.train import demo
from test_train_support import shared_setup


def test_random_smoke_run(capsys):
    assert main_job.main(["--random", "--width", "400", "--height", "300", "--max-crops", "2"]) == 0
    out = capsys.readouterr().out
    assert "crops (thumbnail + tiles): 3" in out and "next-token argmax" in out


def test_missing_model_is_one_error_line(tmp_path, capsys):
    assert main_job.main(["--checkpoint", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "nope" in err and "Traceback" not in err


def test_ship_then_ask(tmp_path_factory, tmp_path, capsys):
    """A demo export (here: a random model of the demo's layout with the demo tokenizer) -> `ship`
    -> an official-layout directory with the tokenizer, the showcase images and questions; `ask`
    answers every question from it (random answers: only the shape of the report is checked)."""
    from jinavlm_jax import checkpoint
    from jinavlm_jax.model import JinaVLMConfig, init_params
    from jinavlm_jax.processing import PROCESSOR_FILES
    s = shared_setup(tmp_path_factory)
    cfg = JinaVLMConfig.from_hf(json.loads((s["model"] / "config.json").read_text()))
    export = checkpoint.save(tmp_path / "export", cfg, jax.device_get(init_params(cfg, 0)))
    for name in PROCESSOR_FILES:
        if (s["model"] / name).is_file():
            shutil.copy(s["model"] / name, export / name)
    dest = demo.ship(export, tmp_path / "assets", say=lambda m: None)
    assert sorted(p.name for p in (dest / "model").glob("*.safetensors"))
    assert (dest / "model" / "tokenizer.json").is_file() and (dest / "model" / "preprocessor_config.json").is_file()
    items = json.loads((dest / "images" / "questions.json").read_text(encoding="utf-8"))
    assert {i["lang"] for i in items} == {"en", "de", "zh", "ar"}
    assert {i["task"] for i in items} == {"colour", "shape", "count", "position", "choice"}
    assert all((dest / "images" / i["image"]).is_file() for i in items)
    assert main_job.main(["--checkpoint", str(dest / "model"), "--images", str(dest / "images")]) == 0
    out = capsys.readouterr().out
    assert out.count("  Q: ") == len(items) and f"of {len(items)} right" in out


@pytest.mark.skipif(not (main_job.ASSETS / "model" / "config.json").is_file(),
                    reason="the shipped demo model is not in this checkout (jinavlm_jax/assets/demo)")
def test_shipped_model_answers_most_questions(capsys):
    assert main_job.main([]) == 0
    out = capsys.readouterr().out
    right, total = map(int, re.search(r"(\d+) of (\d+) right", out).groups())
    assert total == 10 and right > total // 2, out
