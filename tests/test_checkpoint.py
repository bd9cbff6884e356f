"""Orbax checkpoints: save / load round trip, restore onto other meshes, refusals and interruptions.

Values must come back bit-identical (exact equality): a checkpoint copies bytes, no arithmetic.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jax.sharding import PartitionSpec as P

from conftest import REPO
from jinavlm_jax import JinaVLMConfig, abstract_params, checkpoint
from jinavlm_jax.weights import CheckpointError


def run_with_devices(script: str, n: int = 8, timeout: int = 300) -> dict:
    """Run `script` in a fresh Python with `n` simulated CPU devices; return the JSON of its last line.

    A subprocess because the device count is fixed when JAX starts, and this pytest process must
    stay single-device for the other tests.
    """
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_params(config: JinaVLMConfig, seed: int = 0, dtype=None) -> dict:
    """Random params of the right tree and shapes without compiling the model's init (fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jax.numpy.asarray(rng.standard_normal(s.shape).astype(dtype or s.dtype)),
        abstract_params(config))


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        assert la[k].tobytes() == lb[k].tobytes(), k


@pytest.fixture(scope="module")
def tiny():
    cfg = JinaVLMConfig.tiny(remat_policy="full")
    return cfg, random_params(cfg, 0)


def test_round_trip_and_dtype_cast(tiny, tmp_path):
    cfg, params = tiny
    checkpoint.save(tmp_path / "ck", cfg, params)
    assert checkpoint.is_checkpoint(tmp_path / "ck")
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    cfg2, p2 = checkpoint.load(tmp_path / "ck")
    assert cfg2 == cfg  # architecture and run-time fields (remat_policy kept)
    _assert_same(params, p2)
    assert checkpoint.read_info(tmp_path / "ck")["config"] == cfg.to_hf()

    cfg3, p3 = checkpoint.load(tmp_path / "ck", dtype="bfloat16")
    assert cfg3.param_dtype == "bfloat16"
    _assert_same(jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params), p3)


def test_refuses_existing_destination(tiny, tmp_path):
    cfg, params = tiny
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match="already exists.*overwrite"):
        checkpoint.save(tmp_path / "ck", cfg, params)
    checkpoint.save(tmp_path / "ck", cfg, params, overwrite=True)
    _assert_same(params, checkpoint.load(tmp_path / "ck")[1])


def test_interrupted_save_never_looks_complete(tiny, tmp_path, monkeypatch):
    cfg, params = tiny
    checkpoint.save(tmp_path / "old", cfg, params)
    real_save = ocp.Checkpointer.save

    def save_then_die(self, path, *a, **kw):
        real_save(self, path, *a, **kw)
        assert (path / "commit_success.txt").exists() or any(path.iterdir())
        raise KeyboardInterrupt  # after the arrays are written, before the metadata
    monkeypatch.setattr(ocp.Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "new", cfg, params)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "old", cfg, jax.tree_util.tree_map(lambda x: x + 1, params), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no new dir, no temp dir left
    _assert_same(params, checkpoint.load(tmp_path / "old")[1])  # the old one untouched


def test_incomplete_directory_refused(tiny, tmp_path):
    """A temp dir left by a killed process (params written, no metadata) is refused by load."""
    cfg, params = tiny
    checkpoint.save(tmp_path / "ck", cfg, params)
    killed = tmp_path / "ck2.partial-1234"
    shutil.copytree(tmp_path / "ck", killed)
    (killed / checkpoint.META_NAME).unlink()
    with pytest.raises(CheckpointError, match="not a complete.*interrupted conversion"):
        checkpoint.load(killed)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        checkpoint.load(tmp_path / "nowhere")


def test_config_mismatch_lists_every_param(tiny, tmp_path):
    cfg, params = tiny
    checkpoint.save(tmp_path / "ck", cfg, params)
    meta_path = tmp_path / "ck" / checkpoint.META_NAME
    meta = json.loads(meta_path.read_text())
    meta["config"]["text_config"]["block_config"]["ffn_config"]["size"] = 48
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path / "ck")
    msg = str(e.value)
    assert "0 missing, 0 unexpected, 3 mis-shaped" in msg
    assert "text/layers/up/kernel: config expects (2, 32, 48), found (2, 32, 64)" in msg


def test_save_checks_params_against_config(tiny, tmp_path):
    cfg, params = tiny
    bad = {**params, "text": {k: v for k, v in params["text"].items() if k != "lm_head"}}
    with pytest.raises(CheckpointError, match="missing: text/lm_head/kernel"):
        checkpoint.save(tmp_path / "ck", cfg, bad)
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_restore_onto_other_meshes(tmp_path):
    """Saved from an fsdp=2 x tensor=4 mesh, restored onto 4x2 and one device; converted by hf-to-orbax
    on 4x2, restored onto 2x4: identical values, each param on the requested sharding."""
    out = run_with_devices(f"""
        import json, numpy as np, jax
        from pathlib import Path
        from _official import write_official_dir
        from jinavlm_jax import JinaVLMConfig, checkpoint
        from test_checkpoint import random_params
        from jinavlm_jax.convert import hf_to_orbax
        from jinavlm_jax.sharding import make_mesh, param_shardings, shard_params
        assert jax.device_count() == 8
        d = Path({str(tmp_path)!r})
        cfg = JinaVLMConfig.tiny()
        params = random_params(cfg, 0)
        flat = lambda t: [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]
        ref = flat(params)
        checkpoint.save(d / "ck", cfg, shard_params(params, param_shardings(cfg, make_mesh(1, 2, 4))))
        write_official_dir(d / "hf", cfg, params)
        hf_to_orbax(d / "hf", d / "conv", mesh="fsdp=4,tensor=2", progress=False)
        res = {{}}
        for name, src, f, t in (("ck", d / "ck", 4, 2), ("ck", d / "ck", 1, 1), ("conv", d / "conv", 2, 4)):
            mesh = make_mesh(1, f, t, devices=jax.devices()[: f * t])
            c, p = checkpoint.load(src, mesh)
            q = p["text"]["layers"]["q"]["kernel"]
            want = param_shardings(c, mesh)
            res[f"{{name}} {{f}}x{{t}}"] = dict(
                equal=all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(ref, flat(p))),
                spec=str(q.sharding.spec), devices=len(q.sharding.device_set),
                on_target=all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in
                              zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(want))))
        print(json.dumps(res))
    """)
    assert len(out) == 3
    for key, r in out.items():
        assert r["equal"] and r["on_target"], key
    assert out["ck 4x2"]["spec"] == str(P(None, "fsdp", "tensor", None))  # text q: embed, heads
    assert out["conv 2x4"]["spec"] == str(P(None, "fsdp", "tensor", None))
    assert out["ck 4x2"]["devices"] == 8 and out["conv 2x4"]["devices"] == 8 and out["ck 1x1"]["devices"] == 1
