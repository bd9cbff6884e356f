"""python -m convert: official safetensors <-> Orbax round trips, logits, CLI behaviour and errors.

Round trips are bit-exact (the bytes of every tensor compared), names / shapes / dtypes unchanged,
config.json equal as JSON. Logits of a converted checkpoint equal those of `load_jina_vlm` on the
source exactly (max abs diff 0: the same params reach the same compiled forward).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from conftest import REPO
from convert.__main__ import main
from jinavlm_jax import JinaVLMConfig, checkpoint
from jinavlm_jax.convert import Progress, check_logits, hf_to_orbax, orbax_to_hf, parse_size
from jinavlm_jax.model.config import ConfigError
from jinavlm_jax.weights import CheckpointError, CheckpointReader, official_tensors, write_safetensors
from test_checkpoint import random_params

ZERO_BIASES = ("attn.q_b", "attn.k_b", "attn.v_b")  # of the text layers: zero, optional (spec 2)


def write_source(path, config, tensors: dict, n_shards: int = 1, config_dict: dict | None = None):
    """An official directory: config.json + one model.safetensors, or n shards with an index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config_dict or config.to_hf(), indent=1))
    names = list(tensors)
    if n_shards == 1:
        write_safetensors(path / "model.safetensors", tensors)
        return path
    weight_map = {}
    for k, chunk in enumerate(np.array_split(np.arange(len(names)), n_shards)):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(path / fname, {names[i]: tensors[names[i]] for i in chunk})
        weight_map.update({names[i]: fname for i in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def tiny_tensors(seed: int = 0, dtype=None, drop_zero_biases: bool = False) -> tuple[JinaVLMConfig, dict]:
    cfg = JinaVLMConfig.tiny()
    t = {n: np.asarray(a) for n, a in official_tensors(cfg, random_params(cfg, seed))}
    if dtype is not None:
        t = {n: a.astype(dtype) for n, a in t.items()}
    if drop_zero_biases:
        t = {n: a for n, a in t.items() if not (n.startswith("model.language_model.") and n.endswith(ZERO_BIASES))}
    return cfg, t


def assert_same_checkpoint(a, b):
    """Every tensor of official dirs a and b: same names, shapes, dtypes and bytes; same config.json."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.names()) == sorted(rb.names())
    for n in ra.names():
        x, y = ra.read(n), rb.read(n)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), n
        assert x.tobytes() == y.tobytes(), n
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.slow
def test_golden_round_trip_and_logits(testdata, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(testdata / "set1_config.json", src / "config.json")
    shutil.copy(testdata / "set1_weights_official_names.safetensors", src / "model.safetensors")
    s = hf_to_orbax(src, tmp_path / "orbax", progress=False)
    assert s.tensors == 181 and s.dtype == "float32"
    out = orbax_to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_size="200KB", progress=False)
    shards = sorted(p.name for p in (tmp_path / "back").glob("*.safetensors"))
    assert len(shards) > 1 and out.notes == [f"{len(shards)} shard(s) of at most 0.20 MB"]
    for f in shards:  # every shard within the limit (no single tensor here is larger)
        r = CheckpointReader(tmp_path / "back")
        assert sum(r.read(n).nbytes for n in r.files[f].tensors) <= 200_000
    assert_same_checkpoint(src, tmp_path / "back")
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == out.bytes and set(index["weight_map"].values()) == set(shards)
    # acceptance 2: the Orbax checkpoint gives the same logits as load_jina_vlm on the source
    metrics, ok = check_logits(src, tmp_path / "orbax", length=8)
    assert ok and metrics["max_abs_err"] == 0.0 and metrics["top5_overlap"] == 1.0


@pytest.mark.parametrize("dtype,n_shards,drop", [(None, 1, False), (ml_dtypes.bfloat16, 3, True)])
def test_random_round_trip(tmp_path, dtype, n_shards, drop):
    cfg, tensors = tiny_tensors(1, dtype, drop_zero_biases=drop)
    src = write_source(tmp_path / "src", cfg, tensors, n_shards)
    s = hf_to_orbax(src, tmp_path / "orbax", progress=False)
    assert s.dtype == ("bfloat16" if dtype else "float32")
    assert checkpoint.load(tmp_path / "orbax")[0].param_dtype == s.dtype
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    assert_same_checkpoint(src, tmp_path / "back")  # absent zero biases stay absent


def test_mixed_dtype_source_is_exact(tmp_path):
    cfg, tensors = tiny_tensors(2)
    for n in list(tensors)[::3]:
        tensors[n] = tensors[n].astype(ml_dtypes.bfloat16)
    src = write_source(tmp_path / "src", cfg, tensors)
    s = hf_to_orbax(src, tmp_path / "orbax", progress=False)
    assert s.dtype == "float32" and "mixes dtypes" in s.notes[0]
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    assert_same_checkpoint(src, tmp_path / "back")


def test_dtype_option(tmp_path):
    cfg, tensors = tiny_tensors(3)
    src = write_source(tmp_path / "src", cfg, tensors)
    hf_to_orbax(src, tmp_path / "orbax", dtype="bfloat16", progress=False)
    c, p = checkpoint.load(tmp_path / "orbax")
    assert c.param_dtype == "bfloat16" and p["text"]["embedding"].dtype == ml_dtypes.bfloat16
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", dtype="bfloat16", progress=False)
    back = CheckpointReader(tmp_path / "back")
    name = "model.language_model.embedding.embedding"
    assert np.array_equal(back.read(name), tensors[name].astype(ml_dtypes.bfloat16))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_orbax_to_hf_takes_the_tokenizer_along(tmp_path):
    """Tokenizer / processor files beside the Orbax checkpoint (a training export) land in the
    official directory too; other files do not."""
    cfg, tensors = tiny_tensors(5)
    hf_to_orbax(write_source(tmp_path / "src", cfg, tensors), tmp_path / "orbax", progress=False)
    (tmp_path / "orbax" / "tokenizer.json").write_text('{"model": {}}')
    (tmp_path / "orbax" / "preprocessor_config.json").write_text("{}")
    (tmp_path / "orbax" / "notes.txt").write_text("not copied")
    s = orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"model": {}}'
    assert (tmp_path / "back" / "preprocessor_config.json").is_file()
    assert not (tmp_path / "back" / "notes.txt").exists()
    assert "copied tokenizer.json, preprocessor_config.json" in s.notes


def test_cli(tmp_path, capsys):
    cfg, tensors = tiny_tensors(4)
    src = write_source(tmp_path / "src", cfg, tensors)
    assert main(["hf-to-orbax", str(src), str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "tensors     181" in out and "parameters  195,200" in out and "time" in out
    assert "175/175 tensors" in err and "0.78 MB/0.78 MB" in err  # progress on stderr

    assert main(["hf-to-orbax", str(src), str(tmp_path / "a")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["hf-to-orbax", str(src), str(tmp_path / "a"), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert main(["orbax-to-hf", str(tmp_path / "a"), str(tmp_path / "b"), "--max-shard-size", "300KB"]) == 0
    out = capsys.readouterr().out  # params are bf16 now; the source's float32 is written back
    assert "dtype       float32" in out and "3 shard(s) of at most 0.30 MB" in out

    _, other = tiny_tensors(5)
    write_source(tmp_path / "other", cfg, other)
    assert main(["check-logits", str(src), str(tmp_path / "other"), "--length", "8"]) == 3
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "kl_max" in out and "top5_overlap" in out


@pytest.mark.slow
def test_cli_help_from_repo_root():
    proc = subprocess.run([sys.executable, "-m", "convert", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("hf-to-orbax", "orbax-to-hf", "from-components", "check-logits"):
        assert cmd in proc.stdout


def test_all_tensor_problems_listed(tmp_path):
    cfg, tensors = tiny_tensors(6)
    del tensors["model.language_model.ln_f.weight"]
    tensors["model.vision_model.extra"] = np.zeros(2, np.float32)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:100]
    src = write_source(tmp_path / "src", cfg, tensors)
    with pytest.raises(CheckpointError) as e:
        hf_to_orbax(src, tmp_path / "orbax", progress=False)
    msg = str(e.value)
    assert str(src) in msg and "1 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "missing: model.language_model.ln_f.weight" in msg
    assert "unexpected: model.vision_model.extra" in msg
    assert "mis-shaped: lm_head.weight: expected (512, 32), found (100, 32)" in msg
    assert not (tmp_path / "orbax").exists()


def test_config_mismatch(tmp_path):
    """config.json with 3 text layers for a 2-layer checkpoint: every layer-2 tensor is named."""
    cfg, tensors = tiny_tensors(7)
    d = cfg.to_hf()
    d["text_config"]["n_layers"] = 3
    src = write_source(tmp_path / "src", cfg, tensors, config_dict=d)
    with pytest.raises(CheckpointError, match=r"missing: model.language_model.layers.2.attn.qkv_w.weight"):
        hf_to_orbax(src, tmp_path / "orbax", progress=False)
    other = write_source(tmp_path / "other", JinaVLMConfig.tiny(), tiny_tensors(8)[1])
    (tmp_path / "other" / "config.json").write_text(json.dumps(
        {**cfg.to_hf(), "text_config": {**cfg.to_hf()["text_config"], "rope_theta": 1e4}}))
    with pytest.raises(ConfigError, match="rope_theta: 1000000.0 vs 10000.0"):
        check_logits(write_source(tmp_path / "ok", cfg, tensors), other)


def test_truncated_and_pickle_sources(tmp_path):
    cfg, tensors = tiny_tensors(9)
    src = write_source(tmp_path / "src", cfg, tensors)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated file: tensor 'lm_head.weight'"):
        hf_to_orbax(src, tmp_path / "o1", progress=False)
    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "config.json").write_text(json.dumps(cfg.to_hf()))
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*never unpickles"):
        hf_to_orbax(pk, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_interrupted_conversions_leave_nothing(tmp_path, monkeypatch):
    cfg, tensors = tiny_tensors(10)
    src = write_source(tmp_path / "src", cfg, tensors)
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    real = Progress.update

    def die_midway(self, name, nbytes):
        if len(self.seen) == 60:
            raise KeyboardInterrupt
        real(self, name, nbytes)
    monkeypatch.setattr(Progress, "update", die_midway)
    with pytest.raises(KeyboardInterrupt):
        hf_to_orbax(src, tmp_path / "orbax2", progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies after the first of several shards
        orbax_to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_size="100KB", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbax", "src"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="bad size"):
        parse_size("five gigs")
