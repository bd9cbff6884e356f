"""Parameter groups, schedules, the train step's loss (acceptance 6), in the main process (1 device).

* the connector's learning rate and warmup differ from the towers' as configured (schedule values at
  chosen steps, and the `lr/<group>` metrics the step reports);
* a frozen group (`lr: null`) does not change at all over real train steps, and gets no optimizer
  state, while the trained groups do change;
* every param must belong to a group (clear error otherwise);
* gradient accumulation over 2 micro-batches gives the same step as the whole batch, and the
  chunked cross-entropy equals the unchunked one (float32, tolerance 1e-5 relative: only the
  summation order differs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinavlm_jax.model import JinaVLM, JinaVLMConfig, abstract_params
from jinavlm_jax.sharding import make_mesh
from jinavlm_jax.train.config import GroupConfig, OptimizerConfig, TrainConfigError
from jinavlm_jax.train.optim import FROZEN, make_optimizer, make_schedule
from jinavlm_jax.train.step import chunked_xent, init_state, make_steps, put_batch, random_params

from test_train_support import shared_setup


def _opt(**groups) -> OptimizerConfig:
    return OptimizerConfig(groups={k: GroupConfig(**v) for k, v in groups.items()}, end_lr_ratio=0.1)


def test_connector_lr_and_warmup_differ_as_configured():
    opt = _opt(connector={"regex": "^connector/", "lr": 2e-4, "warmup": 10},
               vision={"regex": "^vision/", "lr": 6e-6, "warmup": 0.5},
               text={"regex": "^text/", "lr": 2e-5, "warmup": 0.5})
    total = 100
    con = make_schedule(opt.groups["connector"], opt, total)
    vis = make_schedule(opt.groups["vision"], opt, total)
    assert float(con(0)) == 0.0 and float(vis(0)) == 0.0
    assert float(con(5)) == pytest.approx(1e-4)            # half-way through its 10-step warmup
    assert float(con(10)) == pytest.approx(2e-4)           # peak reached at step 10 ...
    assert float(vis(10)) == pytest.approx(6e-6 * 10 / 50)  # ... while the vision tower is at 20 % of its warmup
    assert float(vis(50)) == pytest.approx(6e-6)
    assert float(con(total)) == pytest.approx(2e-5, rel=1e-4)   # cosine to end_lr_ratio = 10 %
    assert float(vis(total)) == pytest.approx(6e-7, rel=1e-4)


def test_every_param_needs_a_group():
    from jinavlm_jax.model import JinaVLMConfig
    ab = abstract_params(JinaVLMConfig.tiny())
    with pytest.raises(TrainConfigError, match=r"no group matches .*vision/"):
        make_optimizer(_opt(connector={"regex": "^connector/", "lr": 1e-3}, text={"regex": "^text/", "lr": 1e-3}),
                       10, ab)
    with pytest.raises(TrainConfigError, match="match no parameter"):
        make_optimizer(_opt(all={"regex": ".*", "lr": 1e-3}, text={"regex": "^text/", "lr": 1e-3}), 10, ab)


def test_sincos2d_pos_embed_init_sets_only_the_vit_positions():
    """`model.pos_embed_init: sincos2d` starts the ViT's position table at fixed 2-D sine-cosine
    positions (checked against a direct evaluation of the formula); every other param is the same draw
    as the default init; a bad name or shape is refused."""
    from jinavlm_jax.model.vision import sincos2d_positions
    mc = JinaVLMConfig.tiny()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    base = jax.device_get(random_params(mc, mesh, 3))
    sc = jax.device_get(random_params(mc, mesh, 3, "sincos2d"))
    n, d = base["vision"]["pos_embed"].shape
    side, q = int(round(n ** 0.5)), d // 4
    pos = np.asarray(sc["vision"]["pos_embed"])
    for p in (0, side + 2, n - 1):                    # patch p sits at row p // side, column p % side
        row, col = divmod(p, side)
        for i in (0, q - 1):
            w = 10_000.0 ** (-i / q)
            np.testing.assert_allclose(pos[p, [i, q + i, 2 * q + i, 3 * q + i]],
                                       [np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)],
                                       rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pos, sincos2d_positions(n, d))
    assert not np.allclose(pos, base["vision"]["pos_embed"])
    base["vision"].pop("pos_embed"), sc["vision"].pop("pos_embed")
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, sc)
    with pytest.raises(ValueError, match="pos_embed_init must be one of"):
        random_params(mc, mesh, 3, "sincos")
    with pytest.raises(ValueError, match="square patch grid"):
        sincos2d_positions(12, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos2d_positions(16, 6)
    from jinavlm_jax.train.config import load_config
    with pytest.raises(TrainConfigError, match="model.pos_embed_init"):
        load_config(None, ["model.pos_embed_init=sincos"])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny model + two real batches from the synthetic corpus, and 4 train steps with the vision
    tower frozen (compiled once, shared by the tests below)."""
    from jinavlm_jax.data.pipeline import BatchSpec, EncodeSpec, SourceSpec, train_dataset
    from jinavlm_jax.train.config import load_config
    from jinavlm_jax.train.setup import build_model_config, build_processor
    s = shared_setup(tmp_path_factory)
    cfg = load_config(None, s["overrides"], base=s["config"].to_dict())
    mc, proc = build_model_config(cfg), build_processor(cfg)
    enc = EncodeSpec(str(s["model"]), proc.config.to_hf(), proc.always_start_with_space, 256, 2)
    it = iter(train_dataset([SourceSpec("vqa", str(s["vqa"]), "train")], enc,
                            BatchSpec.for_processor(proc.config, 4, 256, 2), global_batch=4, seed=0))
    batches = [{k: v for k, v in next(it).items() if k != "source"} for _ in range(2)]

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ab = abstract_params(mc)
    tx, groups = make_optimizer(FROZEN_VISION, 10, ab)
    steps = make_steps(mc, tx, groups, mesh, ab, loss_chunk=0)
    state = init_state(tx, steps.state_shardings, random_params(mc, mesh, 0))
    init = jax.device_get(state["params"])
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]) if hasattr(x, "size"))
    metrics, after = [], []
    for b in batches + batches:
        state, m = steps.train(state, put_batch(b, mesh))
        metrics.append({k: float(v) for k, v in m.items()})
        after.append(jax.device_get(state["params"]))
    return {"model": mc, "batches": batches, "mesh": mesh, "abstract": ab, "groups": groups, "init": init,
            "n_state": n_state, "metrics": metrics, "after": after}


FROZEN_VISION = _opt(connector={"regex": "^connector/", "lr": 3e-3, "warmup": 1},
                     vision={"regex": "^vision/", "lr": None},
                     text={"regex": "^text/", "lr": 1e-3, "warmup": 4})


@pytest.mark.slow
def test_frozen_group_does_not_change_and_lr_metrics(env):
    groups, ab, before, after = env["groups"], env["abstract"], env["init"], env["after"][-1]
    assert groups.frozen == ("vision",)
    # Frozen params get no optimizer state (optax.set_to_zero keeps none): Adam's two moments of the
    # trained params, plus counters.
    labels = jax.tree_util.tree_leaves(groups.labels)
    n_train = sum(int(np.prod(a.shape)) for a, l in zip(jax.tree_util.tree_leaves(ab), labels) if l != FROZEN)
    assert env["n_state"] <= 2 * n_train + 16
    for path, x in jax.tree_util.tree_leaves_with_path(before["vision"]):
        y = after["vision"]
        for k in path:
            y = y[k.key]
        np.testing.assert_array_equal(x, y, err_msg=f"frozen vision param {path} changed")
    assert not np.array_equal(before["connector"]["q"]["kernel"], after["connector"]["q"]["kernel"])
    assert not np.array_equal(before["text"]["lm_head"]["kernel"], after["text"]["lm_head"]["kernel"])
    lrs = env["metrics"]
    assert all(np.isfinite(m["loss"]) for m in lrs)
    # lr reported for the step just taken (0-based count): the connector warms up in 1 step, text in 4.
    assert lrs[0]["lr/connector"] == 0.0 and lrs[1]["lr/connector"] == pytest.approx(3e-3, rel=1e-3)
    assert lrs[1]["lr/text"] == pytest.approx(1e-3 / 4, rel=1e-4)
    assert lrs[3]["lr/text"] == pytest.approx(3e-3 / 4, rel=1e-4)
    assert all(m["lr/vision"] == 0.0 for m in lrs)


@pytest.mark.slow
def test_grad_accumulation_and_chunked_loss_match(env):
    """One step over the batch as 2 micro-batches with a chunked loss == one step over the whole batch."""
    mc, mesh, ab = env["model"], env["mesh"], env["abstract"]
    tx, groups = make_optimizer(FROZEN_VISION, 10, ab)
    steps = make_steps(mc, tx, groups, mesh, ab, grad_accum=2, loss_chunk=60)
    state = init_state(tx, steps.state_shardings, random_params(mc, mesh, 0))
    for b in env["batches"]:
        state, m = steps.train(state, put_batch(b, mesh))
    ref = env["metrics"][1]
    assert float(m["loss"]) == pytest.approx(ref["loss"], rel=1e-5)
    assert float(m["grad_norm"]) == pytest.approx(ref["grad_norm"], rel=1e-4)
    np.testing.assert_allclose(jax.device_get(state["params"])["text"]["lm_head"]["kernel"],
                               env["after"][1]["text"]["lm_head"]["kernel"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_unrolled_decoder_step_equals_scanned(env):
    """`unroll_layers=True` (the recipe's model.scan_layers: false): the same stacked state and two
    steps with the same losses, gradient norms and updated params as the scanned step (fp32)."""
    mc, mesh, ab = env["model"], env["mesh"], env["abstract"]
    tx, groups = make_optimizer(FROZEN_VISION, 10, ab)
    steps = make_steps(mc, tx, groups, mesh, ab, loss_chunk=0, unroll_layers=True)
    state = init_state(tx, steps.state_shardings, random_params(mc, mesh, 0))
    for i, b in enumerate(env["batches"]):
        state, m = steps.train(state, put_batch(b, mesh))
        assert float(m["loss"]) == pytest.approx(env["metrics"][i]["loss"], rel=1e-5)
        assert float(m["grad_norm"]) == pytest.approx(env["metrics"][i]["grad_norm"], rel=1e-4)
    got = jax.device_get(state["params"])
    assert got["text"]["layers"]["q"]["kernel"].shape[0] == mc.text.n_layers  # still stacked
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(env["after"][1])):
        if jax.tree_util.keystr(path) == "['connector']['k']['bias']":
            # A bias added to every key shifts all of a query's scores alike, which the softmax ignores:
            # its gradient is rounding noise, which Adam turns into noise-sized steps in either program.
            assert np.abs(a).max() < 1e-5 and np.abs(b).max() < 1e-5
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_chunked_xent_equals_plain(env):
    mc = env["model"]
    model = JinaVLM(mc)
    params = env["init"]
    v = mc.text.vocab_size
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 37, mc.text.hidden_size)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, (2, 37)))
    w = jnp.asarray(rng.integers(0, 2, (2, 37)), jnp.float32)

    @jax.jit
    def both(p):
        full = chunked_xent(model, p, h, y, w, v, 0)
        chunked = chunked_xent(model, p, h, y, w, v, 8)      # 37 = 4 x 8 + 5: the last chunk is padded
        logits = model.apply({"params": p}, h, method=JinaVLM.logits_from_hidden)
        ref = ((jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]) * w).sum()
        g = jax.grad(lambda q: chunked_xent(model, q, h, y, w, v, 8)[0])(p)["text"]["lm_head"]["kernel"]
        g0 = jax.grad(lambda q: chunked_xent(model, q, h, y, w, v, 0)[0])(p)["text"]["lm_head"]["kernel"]
        return full, chunked, ref, g, g0

    full, chunked, ref, g, g0 = both(params)
    assert float(full[0]) == pytest.approx(float(ref), rel=1e-5)
    assert float(chunked[0]) == pytest.approx(float(ref), rel=1e-5)
    assert float(chunked[1]) == float(full[1])
    np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_splash_train_step_equals_xla(env):
    """The train step with `attention_impl=splash` (Pallas kernel in interpret mode, both towers; the
    decoder gets the batch's segment ids) gives the loss and grad norm of the XLA path (1e-5 relative,
    float32) over the same two steps."""
    mc, mesh, ab = env["model"].replace(attention_impl="splash"), env["mesh"], env["abstract"]
    tx, groups = make_optimizer(FROZEN_VISION, 10, ab)
    steps = make_steps(mc, tx, groups, mesh, ab, loss_chunk=0)
    state = init_state(tx, steps.state_shardings, random_params(mc, mesh, 0))
    for ref, b in zip(env["metrics"], env["batches"]):
        state, m = steps.train(state, put_batch(b, mesh))
        assert float(m["loss"]) == pytest.approx(ref["loss"], rel=1e-5)
        assert float(m["grad_norm"]) == pytest.approx(ref["grad_norm"], rel=1e-5)


def test_loss_positions_equal_every_position():
    """Logits at the first K weighted positions of each row (`run.loss_positions`) give the loss,
    correct count and gradients of the loss at every position, when no row has more than K."""
    from jinavlm_jax.train.step import check_loss_positions, weighted_positions
    mc = JinaVLMConfig.tiny()
    model = JinaVLM(mc)
    params = jax.device_get(random_params(mc, make_mesh(1, 1, 1, devices=jax.devices()[:1]), 0))
    v, k = mc.text.vocab_size, 6
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(3, 40, mc.text.hidden_size)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, (3, 40)))
    w = np.zeros((3, 40), np.float32)
    w[0, 30:36] = 1.0          # k weighted positions
    w[1, [2, 17, 39]] = 1.0    # fewer, scattered (the rest of the k slots get weight-0 positions)
    check_loss_positions(w, k, 0)
    with pytest.raises(TrainConfigError, match="run.loss_positions=5"):
        check_loss_positions(w, 5, 0)
    w = jnp.asarray(w)

    def loss(p, h, selected):
        hh, yy, ww = weighted_positions(k, h, y, w) if selected else (h, y, w)
        return chunked_xent(model, p, hh, yy, ww, v, 0)

    for selected in (False, True):
        (l, c), g = jax.value_and_grad(lambda p, h: loss(p, h, selected), argnums=(0, 1), has_aux=True)(params, h)
        if not selected:
            ref, ref_c, ref_g = l, c, g
    assert float(l) == pytest.approx(float(ref), rel=1e-6) and float(c) == float(ref_c)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    sel = weighted_positions(k, h, y, w)[1]
    np.testing.assert_array_equal(np.asarray(sel[0]), np.asarray(y[0, 30:36]))  # in order
