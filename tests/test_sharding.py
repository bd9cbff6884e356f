"""Sharding: 8 simulated CPU devices, a (data=2, fsdp=2, tensor=2) mesh, params sharded by the rule
table. The jitted sharded forward equals the single-device logits (max abs diff <= 1e-5 relative to
the largest logit: only the reduction order of the partitioned matmuls differs).

Runs in a subprocess because the device count is fixed when jax starts.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jax.sharding import PartitionSpec as P

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    from jax.sharding import PartitionSpec as P
    from jinavlm_jax import JinaVLM, JinaVLMConfig, init_params
    from jinavlm_jax.sharding import make_mesh, named, param_shardings, shard_params, use_mesh
    assert jax.device_count() == 8
    cfg = JinaVLMConfig.tiny()
    params = init_params(cfg, 0)
    rng = np.random.default_rng(0)
    b, t, length = 4, 2, 240
    ids = rng.integers(0, 640, size=(b, length)).astype(np.int32)
    ids[1, :30] = -1
    idx = np.full((b, t, 196), -1, np.int32)
    idx[:, 0] = np.arange(20, 216)
    images = rng.uniform(-1, 1, size=(b, t, 729, 588)).astype(np.float32)
    images[3, 1] = -1.0  # a padding crop
    masks = np.ones((b, t, 729), np.float32); masks[:, 1] = -1
    model = JinaVLM(cfg)
    fwd = lambda p, *a: model.apply({"params": p}, *a)
    ref = np.asarray(jax.jit(fwd)(params, ids, images, masks, idx))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(cfg, mesh)
    sharded = shard_params(params, shardings)
    batch = lambda n: named(mesh, ("act_batch",) + (None,) * (n - 1))
    with use_mesh(mesh):
        out = jax.jit(fwd, in_shardings=(shardings, batch(2), batch(4), batch(3), batch(3)),
                      out_shardings=named(mesh, ("act_batch", None, "act_vocab")))(
            sharded, ids, images, masks, idx)
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    specs = {"/".join(map(str, k)): str(v.sharding.spec)
             for k, v in jax.tree_util.tree_leaves_with_path(sharded)}
    print(json.dumps({"err": err, "specs": specs, "out_spec": str(out.sharding.spec),
                      "n_shards": len(sharded["text"]["layers"]["q"]["kernel"].addressable_shards)}))
""")


def run_8_devices(script: str) -> str:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_sharded_forward_equals_single_device():
    import json
    res = json.loads(run_8_devices(SCRIPT))
    assert res["err"] <= 1e-5, f"sharded vs single-device relative error {res['err']:.2e}"
    # the rule table: model dim over fsdp, heads / kv heads / mlp / vocab over tensor
    key = lambda *p: "/".join(f"['{x}']" for x in p)
    specs = res["specs"]
    assert specs[key("text", "layers", "q", "kernel")] == str(P(None, "fsdp", "tensor", None))
    assert specs[key("text", "layers", "k", "kernel")] == str(P(None, "fsdp", "tensor", None))
    assert specs[key("text", "layers", "out", "kernel")] == str(P(None, "tensor", None, "fsdp"))
    assert specs[key("text", "layers", "up", "kernel")] == str(P(None, "fsdp", "tensor"))
    assert specs[key("text", "layers", "down", "kernel")] == str(P(None, "tensor", "fsdp"))
    assert specs[key("text", "embedding")] == str(P("tensor", "fsdp"))
    assert specs[key("text", "lm_head", "kernel")] == str(P("fsdp", "tensor"))
    assert specs[key("vision", "layers", "up", "kernel")] == str(P(None, "fsdp", "tensor"))
    assert specs[key("connector", "q", "kernel")] == str(P("fsdp", "tensor", None))
    assert specs[key("text", "layers", "q_norm", "scale")] == str(P(None, None))
    assert res["out_spec"] == str(P(("data", "fsdp"), None, "tensor"))
    assert res["n_shards"] == 8


def test_param_specs_follow_rule_table_for_full_model():
    """The full-size shardings come from the table without materialising any weight."""
    from jinavlm_jax import JinaVLMConfig
    from jinavlm_jax.sharding import param_specs
    specs = param_specs(JinaVLMConfig.jina_vlm_2_4b())
    assert specs["text"]["layers"]["gate"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["vision"]["pos_embed"] == P(None, "fsdp")
    assert specs["connector"]["pad_embed"] == P(None, "fsdp")
