"""The `jinavlm` command line on the tiny golden model (set 1) with its word-level tokenizer.

The model directory is an official Hugging Face layout (config.json, model.safetensors,
tokenizer.json, preprocessor_config.json); one test converts it to an Orbax checkpoint.
Commands run in-process through `cli.main(argv)`: stdout carries only generated text, stderr the
progress and errors (one line, no traceback, exit status 1).
"""
from __future__ import annotations

import io
import json
import shutil

import pytest

from jinavlm_jax import cli, load_jina_vlm
from jinavlm_jax.generate import Generator
from jinavlm_jax.processing import Processor


@pytest.fixture(scope="module")
def model_dir(testdata, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_hf")
    shutil.copy(testdata / "set1_config.json", d / "config.json")
    shutil.copy(testdata / "set1_weights_official_names.safetensors", d / "model.safetensors")
    shutil.copy(testdata / "tiny_tokenizer.json", d / "tokenizer.json")
    shutil.copy(testdata / "jina-vlm_preprocessor_config.json", d / "preprocessor_config.json")
    return d


@pytest.fixture(scope="module")
def image(testdata):
    return str(testdata / "synth_378x378.png")  # 2 crops: quick


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def api_answer(model_dir, image):
    """The Python API's answer to the prompt the generate tests use (6 greedy tokens)."""
    proc = Processor.from_dir(model_dir)
    gen = Generator(*load_jina_vlm(model_dir))
    batch = proc(["<|image|> t5 t6 t7"], [[image]])
    return gen.generate(batch, max_new_tokens=6, stop_ids=proc.stop_ids, tokenizer=proc).texts[0]


GEN_ARGS = ["--raw", "--prompt", "<|image|> t5 t6 t7", "--max-new-tokens", 6]


def test_generate_streams_the_api_answer(model_dir, image, api_answer, capsys):
    code, out, err = run(["generate", "--checkpoint", model_dir, "--image", image] + GEN_ARGS, capsys)
    assert code == 0, err
    assert out == api_answer + "\n" and api_answer
    assert "--max-new-tokens 6" in err  # the stop reason goes to stderr


@pytest.mark.slow
def test_orbax_checkpoint_gives_the_same_answer(model_dir, image, api_answer, capsys, tmp_path):
    from jinavlm_jax import checkpoint
    checkpoint.save(tmp_path / "orbax", *load_jina_vlm(model_dir))
    code, out, err = run(["generate", "--checkpoint", tmp_path / "orbax", "--tokenizer", model_dir,
                          "--image", image] + GEN_ARGS, capsys)
    assert code == 0, err
    assert out == api_answer + "\n"


@pytest.mark.slow
def test_batch_jsonl_with_progress(model_dir, image, capsys, tmp_path):
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "answers.jsonl"
    lines = [{"id": "a", "prompt": "t5 t6 t7", "images": [image]},
             {"id": "b", "prompt": "t9 t10"},
             {"id": "c", "prompt": "t11", "images": image}]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, out, err = run(["generate", "--checkpoint", model_dir, "--input", src, "--output", dst,
                          "--batch-size", 2, "--max-new-tokens", 4], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert all(r["stop_reason"] in ("stop", "length") and isinstance(r["text"], str) for r in rows)
    assert all(len(r["tokens"]) <= 4 for r in rows)
    assert "3/3 prompts" in err and out == ""
    assert not (tmp_path / "answers.jsonl.partial").exists()


@pytest.mark.slow
def test_chat_multi_turn(model_dir, image, capsys, monkeypatch):
    code, out, err = run(["chat", "--checkpoint", model_dir, "--max-new-tokens", 3],
                         capsys, stdin=f"t5 t6\n/image {image}\nt7 t8\n/image missing.png\nt9\n/exit\n",
                         monkeypatch=monkeypatch)
    assert code == 0, err
    assert len(out.splitlines()) == 3  # three answers, one line each
    assert "missing.png: image file not found" in err


def _tokenizer_without_image_tokens(testdata, d):
    tok = json.loads((testdata / "tiny_tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<im_patch>"]
    tok["model"]["vocab"].pop("<im_patch>", None)
    (d / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.parametrize("case", ["empty_prompt", "neither_format", "no_image_tokens", "too_many_images",
                                  "beyond_context", "missing_image", "input_without_output"])
def test_bad_input_is_one_clear_line(case, model_dir, image, testdata, capsys, tmp_path):
    """Acceptance 7: each problem exits 1 with one line on stderr that names it (no traceback)."""
    base = ["generate", "--checkpoint", model_dir, "--max-new-tokens", 2]
    if case == "empty_prompt":
        argv, needle = base + ["--prompt", "   "], "empty prompt"
    elif case == "neither_format":
        (tmp_path / "notes.txt").write_text("hello")
        argv, needle = ["generate", "--checkpoint", tmp_path, "--tokenizer", model_dir, "--prompt", "t1"], \
            "neither a jinavlm-jax Orbax checkpoint"
    elif case == "no_image_tokens":
        tok = tmp_path / "tok"
        tok.mkdir()
        _tokenizer_without_image_tokens(testdata, tok)
        argv, needle = base + ["--tokenizer", tok, "--prompt", "t1"], "'<im_patch>' is not in the vocabulary"
    elif case == "too_many_images":
        small = tmp_path / "small"
        shutil.copytree(model_dir, small)
        cfg = json.loads((small / "config.json").read_text())
        cfg["text_config"]["max_sequence_length"] = 600
        (small / "config.json").write_text(json.dumps(cfg))
        argv = ["generate", "--checkpoint", small, "--prompt", "t1", "--image", image, "--image", image]
        needle = "exceed the model's max sequence length 600"
    elif case == "beyond_context":
        argv, needle = base[:-1] + ["50000", "--prompt", "t1"], "exceeds the model's context of 40960"
    elif case == "missing_image":
        argv, needle = base + ["--prompt", "t1", "--image", tmp_path / "nope.png"], "image file not found"
    else:
        argv, needle = base + ["--input", tmp_path / "x.jsonl"], "--input and --output go together"
    code, out, err = run(argv, capsys)
    assert code == 1
    assert needle in err, err
    assert "Traceback" not in err and err.startswith("jinavlm generate: error:")


def test_registry_is_extensible(capsys):
    seen = []
    cmd = cli.Command("hello-test", "say hello", lambda p: p.add_argument("--name", default="x"),
                      lambda a: seen.append(a.name) or 0)
    cli.register(cmd)
    try:
        assert cli.main(["hello-test", "--name", "jax"]) == 0 and seen == ["jax"]
        with pytest.raises(ValueError, match="already registered"):
            cli.register(cmd)
    finally:
        cli.COMMANDS.pop("hello-test")
