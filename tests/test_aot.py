"""AOT compilation for TPU topologies (`jinavlm aot`), on a host without TPUs.

The compile tests need libtpu (the `[tpu]` extra: jax[tpu]) and are skipped without it; they use the
tiny model only (a few seconds of XLA:TPU compile each). The FLOP counting and the argument
handling run everywhere.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jinavlm_jax import aot, tpu
from jinavlm_jax.flops import model_flops, remat_recompute_flops
from jinavlm_jax.model import JinaVLMConfig
from jinavlm_jax.tpu import cli as aot_cli

needs_libtpu = pytest.mark.skipif(not tpu.libtpu_available(),
                                  reason="libtpu not installed: pip install 'jinavlm-jax[tpu]' to compile for TPU")

TINY_TRAIN = ["--topology", "v5e:2x2", "--mesh", "data=1,fsdp=2,tensor=2", "--job", "train", "--batch-per-chip", "2",
              "model.config=tiny", "data.seq_len=256", "data.crops_per_row=1", "run.loss_chunk=128"]


def parse(argv):
    p = argparse.ArgumentParser()
    aot_cli.configure(p)
    return p.parse_intermixed_args(argv)


# ------------------------------------------------------------------------------------ everywhere

def test_topology_and_mesh_arguments_are_checked():
    chip, dims = tpu.parse_topology("v5e:16x16")
    assert (chip.name, dims, chip.hbm_bytes) == ("v5e", (16, 16), int(15.75 * 2 ** 30))
    assert tpu.parse_topology("v5p:2x2x1")[1] == (2, 2, 1)
    with pytest.raises(tpu.AOTError, match="expected <chip>:<dims>"):
        tpu.parse_topology("v9z:2x2")
    devices = [object()] * 8
    with pytest.raises(tpu.AOTError, match="= 4 devices, but there are 8"):
        tpu.build_mesh(devices, {"data": 1, "fsdp": 4, "tensor": 1})
    with pytest.raises(tpu.AOTError, match="at most one -1"):
        tpu.build_mesh(devices, {"data": -1, "fsdp": -1, "tensor": 1})
    with pytest.raises(tpu.AOTError, match="multiple of --num-slices"):
        tpu.build_mesh(devices, {"data": 1, "fsdp": 8, "tensor": 1}, num_slices=2)
    # the former module keeps its public names
    assert aot.parse_topology is tpu.parse_topology and aot.run is aot_cli.run


def test_overrides_may_follow_or_surround_options():
    a = parse(["--job", "decode", "model.config=tiny", "--batch", "8", "model.dtype=bfloat16"])
    assert a.overrides == ["model.config=tiny", "model.dtype=bfloat16"] and a.batch == 8
    from jinavlm_jax.cli import build_parser
    a = build_parser().parse_args(["aot", "--topology", "v5p:2x2x1", "model.remat_policy=full"])
    assert a._run is aot_cli.run and a.overrides == ["model.remat_policy=full"]


def test_flop_count_scales_scan_bodies_and_counts_loops_once():
    w = jnp.ones((6, 32, 32))

    def f(w, x):
        y, _ = jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)
        z = jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w[0], c[1] + 1), (y, 0))[0]
        return z.sum()

    jf = tpu.count_flops(jax.make_jaxpr(f)(w, jnp.ones((4, 32))).jaxpr)
    one = 2 * 4 * 32 * 32
    assert jf.all == 6 * one + one and jf.once == one + one
    assert [length for length, _ in jf.scans] == [6]

    def g(w, x):
        return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0].sum()
    jg = tpu.count_flops(jax.make_jaxpr(jax.grad(g))(w, jnp.ones((4, 32))).jaxpr)
    assert jg.all == 3 * 6 * one  # backward: two matmuls per forward matmul


@pytest.mark.parametrize("vision", ["trained", "frozen"])
def test_tiny_train_flops_match_the_formula(vision):
    """Acceptance 5 on the tiny model (no libtpu needed): the counted matmul FLOPs of the real train
    step agree with the formula within 10% (no remat; and with full remat, formula + recompute).
    A frozen vision tower gets no backward pass: the formula counts its forward once."""
    from jax.sharding import Mesh
    from jinavlm_jax.sharding import use_mesh
    frozen = vision == "frozen"
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    for remat in ("none", "full"):
        cfg, model_cfg = tpu.load_recipe(None, ["model.config=tiny", "data.seq_len=256", "data.crops_per_row=1",
                                                "data.batch_size=2", "run.loss_chunk=0",
                                                f"model.remat_policy={remat}",
                                                "optimizer.groups.all.regex=^(connector|text)/",
                                                "optimizer.groups.vision.regex=^vision/",
                                                "optimizer.groups.vision.lr=" + ("null" if frozen else "1e-4")])
        job = tpu.train_job(cfg, model_cfg, mesh)
        assert job.static["vision_trained"] == (vision == "trained")
        f = model_flops(model_cfg, rows=2, seq_len=256, crops=1, train=True, train_vision=vision == "trained")
        assert job.model_flops == f["total"]
        recompute = remat_recompute_flops(model_cfg, remat, rows=2, seq_len=256, crops=1,
                                          train_vision=vision == "trained")
        assert (recompute > 0) == (remat == "full")
        with use_mesh(mesh):
            jf = tpu.count_flops(job.fn.trace(*job.args).jaxpr.jaxpr)
        ratio = jf.all / (job.model_flops + recompute)
        assert abs(ratio - 1) < 0.10, (remat, ratio)


# ------------------------------------------------------------------------------------ with libtpu

def _compile(argv):
    job, mesh, chip, model_cfg = aot_cli.plan(parse(argv))
    return tpu.compile_job(job, mesh, chip, parse(argv).topology, model_cfg), job, mesh, model_cfg


@pytest.mark.slow
@needs_libtpu
def test_tiny_train_step_compiles_for_v5e_2x2_with_the_rule_table_shardings():
    """Acceptance 2 (train): the real train step of the tiny model compiles for v5e:2x2 (fsdp 2 x
    tensor 2); the compiled outputs carry the state shardings of the rule table, metrics replicated."""
    r, job, mesh, model_cfg = _compile(TINY_TRAIN + ["model.remat_policy=full"])
    state_out, metrics_out = r["_compiled"].output_shardings
    params = state_out["params"]
    same = lambda s, *spec: s.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(*spec)), len(spec))
    assert same(params["text"]["layers"]["q"]["kernel"], None, "fsdp", "tensor", None)
    assert same(params["text"]["layers"]["down"]["kernel"], None, "tensor", "fsdp")
    assert same(params["text"]["embedding"], "tensor", "fsdp")
    assert same(params["vision"]["layers"]["up"]["kernel"], None, "fsdp", "tensor")
    assert same(params["connector"]["proj_down"]["kernel"], "tensor", "fsdp")
    # every param comes back exactly as the rule table shards it (the state is donated in place)
    abstract = jax.tree_util.tree_leaves(job.args[0]["params"])
    for got, a in zip(jax.tree_util.tree_leaves(params), abstract, strict=True):
        assert got.is_equivalent_to(a.sharding, a.ndim), (got, a.sharding)
    assert all(s.spec == P() for s in jax.tree_util.tree_leaves(metrics_out))
    # the donated state comes back in place: the aliased bytes are at least the param shards
    assert r["memory"]["alias"] >= r["arithmetic"]["param_bytes"] / 4 and r["memory"]["fits"]
    # every scan iteration counted (layers, loss chunks), then divided over the 4 devices
    f = r["flops"]
    assert f["compiled"] > f["loop_bodies_once"]
    assert f["compiled"] * 4 == pytest.approx(f["matmul_all_devices"])
    # full remat reruns the forward of the layers: compiled = formula + recompute, within 10%
    s = r["static"]
    recompute = remat_recompute_flops(model_cfg, "full", rows=s["rows"], seq_len=s["seq_len"],
                                      crops=s["crops_per_row"], train_vision=s["vision_trained"])
    assert abs(f["matmul_all_devices"] / (job.model_flops + recompute) - 1) < 0.10
    # the MFU bound is the model FLOPs over the devices' peak during the step-time bound
    t = r["time"]
    assert t["mfu_upper_bound"] == pytest.approx(job.model_flops / (4 * 197e12 * t["step_lower_bound_s"]))


@pytest.mark.slow
@needs_libtpu
def test_tiny_decode_step_compiles_for_v5e_2x2_with_sharded_caches():
    """Acceptance 2 (decode): the real decode loop compiles for v5e:2x2 (data 2 x tensor 2); the KV
    caches it returns stay sharded batch over data, KV heads over tensor."""
    r, job, mesh, _ = _compile(["--topology", "v5e:2x2", "--mesh", "data=2,fsdp=1,tensor=2", "--job", "decode",
                             "--batch", "4", "--prompt-len", "40", "--crops", "1", "--max-new-tokens", "8",
                             "model.config=tiny"])
    from jinavlm_jax.generate import CACHE_AXES
    from jinavlm_jax.sharding import named
    tokens, steps, caches, kv_valid = r["_compiled"].output_shardings
    want = named(mesh, CACHE_AXES)
    assert want.spec == P(("data", "fsdp"), None, "tensor", None)
    for s in jax.tree_util.tree_leaves(caches):
        assert s.is_equivalent_to(want, 4), s
    assert len(jax.tree_util.tree_leaves(caches)) == 2 * JinaVLMConfig.tiny().text.n_layers
    assert kv_valid.is_equivalent_to(named(mesh, ("act_batch", None)), 2)
    assert r["per"] == "decode step" and r["memory"]["fits"]


@pytest.mark.slow
@needs_libtpu
def test_int8_kv_cache_decode_compiles_sharded_and_halves_the_cache():
    """--kv-cache-dtype int8: the decode loop compiles for v5e:2x2 over QuantizedKV caches (int8 codes
    sharded like the float cache, float32 scales [B, S] over data); the cache takes int8 codes + one
    float32 scale per token against bf16, and the program's arguments shrink."""
    argv = ["--topology", "v5e:2x2", "--mesh", "data=2,fsdp=1,tensor=2", "--job", "decode", "--batch", "4",
            "--prompt-len", "40", "--crops", "1", "--max-new-tokens", "200", "model.config=tiny", "model.dtype=bfloat16"]
    r8, _, mesh, _ = _compile(argv + ["--kv-cache-dtype", "int8"])
    rb, _, _, _ = _compile(argv)
    from jinavlm_jax.generate import CACHE_AXES
    from jinavlm_jax.model.layers import QuantizedKV
    from jinavlm_jax.sharding import named
    _, _, caches, _ = r8["_compiled"].output_shardings
    assert all(isinstance(c, QuantizedKV) for layer in caches for c in layer)
    for layer in caches:
        for c in layer:
            assert c.codes.is_equivalent_to(named(mesh, CACHE_AXES), 4)
            assert c.scale.is_equivalent_to(named(mesh, CACHE_AXES[:2]), 2)
    t = JinaVLMConfig.tiny().text
    per_token = t.n_kv_heads * t.head_dim           # elements of one token's K (or V) in one layer
    kv8, kvb = r8["arithmetic"]["kv_cache_bytes"], rb["arithmetic"]["kv_cache_bytes"]
    assert kv8 / kvb == (per_token + 4) / (2 * per_token), (kv8, kvb)  # int8 codes + a float32 scale vs bf16
    # XLA:TPU pads the tiny model's [.., 1 head, 8] minor dims to whole tiles, so only the direction is
    # checked here; the full-size figures (0.52x of bf16's arguments) are in docs/tpu.md.
    assert r8["memory"]["argument"] < rb["memory"]["argument"]
    assert r8["static"]["kv_cache"] == "int8" and "kv_cache" not in rb["static"]


@pytest.mark.slow
@needs_libtpu
def test_a_program_that_cannot_fit_ends_with_a_clear_message(tmp_path, capsys):
    """Acceptance 3: no remat, no FSDP and a long sequence on v5e: one line naming the chip, the
    memory needed and what to change; the JSON records it too."""
    out = tmp_path / "oom.json"
    rc = aot_cli.main(["--topology", "v5e:2x2", "--mesh", "data=4,fsdp=1,tensor=1", "--job", "train",
                   "--batch-per-chip", "4", "--json", str(out), "model.config=tiny", "data.seq_len=16384",
                   "data.crops_per_row=0", "model.remat_policy=none"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("jinavlm aot: error:"))
    assert "v5e" in line and "15.75 GiB HBM" in line
    assert "needs at least" in line and "GiB per chip" in line
    assert "remat_policy=full" in line and "fsdp=4" in line
    assert "does not fit" in out.read_text()


@pytest.mark.slow
@needs_libtpu
def test_tiny_serving_engine_compiles_for_v5e_2x2(tmp_path, capsys):
    """Serving (issue 11, acceptance 5 on the tiny model): the engine's encode / prefill / insert /
    generate programs compile for v5e:2x2; the decode state comes back from generate with the layout
    it went in (slots over data, KV heads over tensor); the report sums HBM per chip."""
    import json
    out = tmp_path / "serve.json"
    rc = aot_cli.main(["--topology", "v5e:2x2", "--mesh", "data=2,fsdp=1,tensor=2", "--job", "serve",
                       "--max-batch", "4", "--max-model-len", "256", "--crops", "2", "--json", str(out),
                       "model.config=tiny"])
    text = capsys.readouterr().out
    assert rc == 0 and "serving on v5e:2x2" in text
    r = json.loads(out.read_text())
    assert set(r["programs"]) == {"serve:encode", "serve:prefill", "serve:insert", "serve:generate"}
    t = JinaVLMConfig.tiny().text
    kv = 2 * t.n_layers * 4 * 256 * t.n_kv_heads * t.head_dim * 2  # bf16 (the recipe's compute dtype) K and V
    assert r["kv_state_bytes_per_device"] >= kv / 4  # + kv_valid and the per-slot vectors
    gen = r["programs"]["serve:generate"]["memory"]
    assert r["resident_bytes_per_device"] >= gen["argument"] >= kv / 4  # generate reads no vision params
    assert r["peak_bytes_per_device"] >= r["resident_bytes_per_device"] and r["fits"]

    from jinavlm_jax.inference import engine
    from jinavlm_jax.sharding import named
    job, mesh, _, _ = aot_cli.plan(parse(["--topology", "v5e:2x2", "--mesh", "data=2,fsdp=1,tensor=2", "--job",
                                          "serve", "--max-batch", "4", "--max-model-len", "256", "--crops", "2",
                                          "model.config=tiny"]))
    gen_job = next(j for j in job if j.kind == "serve:generate")
    from jinavlm_jax.sharding import use_mesh
    with use_mesh(mesh):
        compiled = gen_job.fn.lower(*gen_job.args).compile()
    state_out, _ = compiled.output_shardings
    want = named(mesh, engine.CACHE_AXES)
    assert want.spec == P(("data", "fsdp"), None, "tensor", None)
    for s in jax.tree_util.tree_leaves(state_out.caches):
        assert s.is_equivalent_to(want, 4), s
