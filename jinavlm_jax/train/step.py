"""The jitted train and eval steps: sharded over the mesh from the rule table, state donated.

Batch layout (numpy, rows of this process; `jinavlm_jax.data.pipeline` produces it):

| key | shape, dtype | meaning |
|---|---|---|
| `input_ids` | [B, L] int32 | -1 = padding |
| `labels` | [B, L] int32 | the next token at each position (compared with the logits there) |
| `weights` | [B, L] float32 | 1 on assistant tokens (the loss mask), 0 elsewhere |
| `positions` | [B, L] int32 | RoPE positions, restarting at 0 for every packed sample |
| `segment_ids` | [B, L] int32 | 1, 2, ... per packed sample, 0 = padding: attention stays inside a segment |
| `images` | [B, T, 729, 588] float | crops of every sample of the row; an all -1 crop is padding |
| `image_masks` | [B, T, 729] int32 | the processor's masks |
| `image_input_idx` | [B, T, 196] int32 | row positions of the pooled features, -1 unused |

The loss is the token cross-entropy summed over weighted positions and divided by their number in
the whole global batch (so gradient accumulation gives the same step as one big batch). Logits are
computed `loss_chunk` positions at a time under `jax.checkpoint`, so neither the forward nor the
backward pass holds float32 logits for the whole batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..inference.params import unstack_layers
from ..model import JinaVLM, JinaVLMConfig
from ..model.layers import batched_attention, constrain
from ..model.text import SegmentMask
from ..sharding import named, param_shardings, use_mesh
from .config import POS_EMBED_INITS, TrainConfigError
from .optim import ParamGroups

BATCH_KEYS = ("input_ids", "labels", "weights", "positions", "segment_ids", "images", "image_masks",
              "image_input_idx")


# ---------------------------------------------------------------------------------------- loss

def _xent_sums(model: JinaVLM, params, h, labels, weights, vocab: int, rngs=None):
    """(sum of weighted token losses, sum of weighted positions whose label has the top logit) for h [B, C, D]."""
    logits = model.apply({"params": params}, h, method="logits_from_hidden", rngs=rngs).astype(jnp.float32)
    labels = jnp.clip(labels, 0, vocab - 1)  # padding (-1) and image tokens carry weight 0
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    loss = (lse - picked) * weights
    # "the label has the largest logit": a max-reduce and a compare (an argmax is a variadic reduce
    # with an index that XLA:CPU runs several times slower); differs from argmax only on exact ties.
    correct = (picked >= logits.max(axis=-1)).astype(jnp.float32) * weights
    return loss.sum(), correct.sum()


def chunked_xent(model: JinaVLM, params, h, labels, weights, vocab: int, chunk: int, rngs=None):
    """Cross-entropy sums over [B, L] positions, `chunk` positions at a time.

    Each chunk's logits are recomputed in the backward pass (`jax.checkpoint`), so peak memory holds
    one chunk of float32 logits [B, chunk, vocab] instead of [B, L, vocab].
    """
    b, l, d = h.shape
    if chunk <= 0 or chunk >= l:
        return _xent_sums(model, params, h, labels, weights, vocab, rngs)
    n = -(-l // chunk)
    pad = n * chunk - l
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    hs = h.reshape(b, n, chunk, d).swapaxes(0, 1)
    ys = labels.reshape(b, n, chunk).swapaxes(0, 1)
    ws = weights.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def body(carry, xs):
        hc, yc, wc = xs
        hc = constrain(hc, ("act_batch", "act_length", "act_embed"))
        loss, correct = _xent_sums(model, params, hc, yc, wc, vocab, rngs)
        return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), (hs, ys, ws))
    return loss, correct


def weighted_positions(k: int, h, labels, weights):
    """(h, labels, weights) at the first `k` weighted positions of each row, in order ([B, k, ...]).

    Rows with fewer weighted positions are filled with weight-0 positions; the caller makes sure no
    row has more (`Trainer.step` checks the host batch). The gradient flows back through the gather.
    """
    order = jnp.argsort((weights <= 0).astype(jnp.int32), axis=1, stable=True)[:, :k]
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    return take(h), take(labels), take(weights)


def check_loss_positions(weights: np.ndarray, k: int, step: int) -> None:
    """Raise if a row of this (host) batch has more than `k` weighted positions (`run.loss_positions`)."""
    if not k:  # every position: nothing to check (this runs on the host before every step)
        return
    most = int((np.asarray(weights) > 0).sum(1).max(initial=0))
    if most > k:
        raise TrainConfigError(f"run.loss_positions={k}: a row of the batch for step {step} has {most} weighted "
                               "(answer) positions; raise run.loss_positions or set it to 0 (loss at every position)")


def loss_sums(model: JinaVLM, params, batch: dict, loss_chunk: int, rngs=None, loss_positions: int = 0) -> dict:
    """Forward pass of one (micro-)batch -> {'loss_sum', 'correct', 'tokens'} (all float32 scalars).
    `rngs`: {'dropout': key} for LoRA dropout (`adapt.lora`). `loss_positions` > 0: logits only at the
    first that many weighted positions of each row (`weighted_positions`), not at every position.

    A model with unrolled decoder layers (`scan_layers=False`) takes the stacked params of the train
    state: their per-layer slices are taken here, inside the compiled step, so the gradient flows back
    into the stacked tree. Attention is traced batched (`layers.batched_attention`)."""
    with batched_attention():
        return _loss_sums(model, params, batch, loss_chunk, rngs, loss_positions)


def _loss_sums(model: JinaVLM, params, batch: dict, loss_chunk: int, rngs, loss_positions: int) -> dict:
    if not model.config.scan_layers and "layers" in params["text"]:
        params = unstack_layers(params, model.config.text.n_layers)
    images = batch.get("images")
    if images is not None:
        x = model.apply({"params": params}, batch["input_ids"], images, batch["image_masks"],
                        batch["image_input_idx"], method="embed_inputs", rngs=rngs)
    else:
        x = model.apply({"params": params}, batch["input_ids"], method="embed_inputs", rngs=rngs)
    mask = SegmentMask(batch["segment_ids"])     # causal within packed samples; splash takes it as is
    h, _ = model.apply({"params": params}, x, batch["positions"], mask, method="decode_hidden", rngs=rngs)
    weights, labels = batch["weights"].astype(jnp.float32), batch["labels"]
    tokens = weights.sum()
    if 0 < loss_positions < h.shape[1]:
        h, labels, weights = weighted_positions(loss_positions, h, labels, weights)
    loss, correct = chunked_xent(model, params, h, labels, weights, model.config.text.vocab_size, loss_chunk, rngs)
    return {"loss_sum": loss, "correct": correct, "tokens": tokens}


# ---------------------------------------------------------------------------------------- steps

@dataclass
class StepFns:
    """Compiled-on-first-call train / eval steps and the shardings they use."""

    train: Callable[[dict, dict], tuple[dict, dict]]
    eval: Callable[[dict, dict], dict]
    state_shardings: Any
    batch_shardings: Callable[[dict], dict]
    mesh: Mesh
    jitted: Callable[[str, dict], Any]   # ("train" | "eval", batch) -> the cached jax.jit (AOT lowers it)


def state_shardings(model_cfg: JinaVLMConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    abstract_params: Any, p_shard: Any = None) -> dict:
    """Shardings of {'step', 'params', 'opt_state'}: optimizer moments follow their params, the rest
    (counters) is replicated. `p_shard`: the params' shardings when they are not the model's own
    (LoRA: base + adapters, `adapt.lora.abstract_lora`).

    A moment is recognised by its tree path ending in a param's path (optax nests the moments of
    multi_transform / chain under extra levels) with the param's shape.
    """
    p_shard = param_shardings(model_cfg, mesh) if p_shard is None else p_shard
    replicated = NamedSharding(mesh, P())
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                jax.tree_util.tree_leaves(p_shard)):
        by_path[_dict_keys(path)] = (tuple(leaf.shape), sh)
    opt_shapes = jax.eval_shape(tx.init, abstract_params)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    opt_shard = jax.tree_util.tree_map_with_path(pick, opt_shapes)
    return {"step": replicated, "params": p_shard, "opt_state": opt_shard}


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over the batch mesh axes (data, fsdp), everything else replicated."""
    return named(mesh, ("act_batch",) + (None,) * (ndim - 1))


def make_steps(model_cfg: JinaVLMConfig, tx: optax.GradientTransformation, groups: ParamGroups,
               mesh: Mesh, abstract_params: Any, *, grad_accum: int = 1, loss_chunk: int = 1024,
               lora: Any = None, seed: int = 0, unroll_layers: bool = False, loss_positions: int = 0) -> StepFns:
    """Build the jitted train and eval steps for this model, optimizer and mesh.

    train(state, batch) -> (state, metrics): the state is donated; metrics are replicated scalars
    (loss, accuracy, tokens, grad_norm, lr/<group>). eval(state, batch) -> sums for held-out loss.
    Call both under `sharding.use_mesh(mesh)` with global arrays (see `put_batch`).
    `lora`: an `adapt.lora.LoraSpec`: the model is the Qwix LoRA model and `abstract_params` its tree
    (frozen base + adapters); its dropout draws from key(seed) folded with the step.
    `unroll_layers`: run the decoder layers as a Python loop instead of `nn.scan` (the state keeps
    the stacked layout of `model_cfg`; see `loss_sums`); not with `lora`.
    `loss_positions`: logits and loss only at that many weighted positions per row (`loss_sums`).
    """
    if unroll_layers and lora is not None:
        raise ValueError("unroll_layers (model.scan_layers: false) is not supported with LoRA: "
                         "LoRA trains the scanned decoder")
    model, eval_model, p_shard = JinaVLM(model_cfg.replace(scan_layers=False) if unroll_layers else model_cfg), None, None
    if lora is not None:
        from ..adapt.lora import abstract_lora, lora_model
        from ..sharding import boxed_shardings
        model, eval_model = lora_model(model_cfg, lora), lora_model(model_cfg, lora.inference())
        p_shard = boxed_shardings(abstract_lora(model_cfg, lora, boxed=True), mesh)
    eval_model = eval_model or model
    trainable = groups.trainable_mask()
    shardings = state_shardings(model_cfg, tx, mesh, abstract_params, p_shard)
    replicated = NamedSharding(mesh, P())
    dropout = lora is not None and lora.dropout > 0

    def split(params):
        # (trained, frozen): None in place of the other part's leaves. Only the trained part is
        # differentiated: frozen params (an int8 QLoRA base included) get no backward computation.
        return (jax.tree_util.tree_map(lambda t, p: p if t else None, trainable, params),
                jax.tree_util.tree_map(lambda t, p: None if t else p, trainable, params))

    def join(trained, frozen):
        return jax.tree_util.tree_map(lambda t, a, b: a if t else b, trainable, trained, frozen)

    def micro_loss(trained, frozen, mb, key, denom):
        # Differentiated: the loss sum over `denom`, the whole batch's weight, so the gradients come
        # out normalised (a scalar at the loss's end of the backward pass) and no pass over every
        # gradient divides them; the clip's select then reads one gradient array, not two.
        rngs = {"dropout": key} if dropout else None
        sums = loss_sums(model, join(trained, frozen), mb, loss_chunk, rngs, loss_positions)
        return sums["loss_sum"] / denom, sums

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def zero(p):
        # A zero gradient; float also for an int8 (QLoRA) base leaf, so gradient clipping can scale it.
        return jnp.zeros_like(p, None if jnp.issubdtype(p.dtype, jnp.floating) else jnp.float32)

    def grad_fn(params, mb, key, denom):
        trained, frozen = split(params)
        (loss, sums), g = value_and_grad(trained, frozen, mb, key, denom)
        # Zeros for the frozen params: the optimizer (set_to_zero, no state) takes the whole tree.
        return (loss, sums), join(g, jax.tree_util.tree_map(lambda t, p: None if t else zero(p), trainable, params))

    def train_step(state, batch):
        params = state["params"]
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        denom = jnp.maximum(batch["weights"].astype(jnp.float32).sum(), 1.0)   # = sums["tokens"], >= 1
        if grad_accum == 1:
            (_, sums), grads = grad_fn(params, batch, key, denom)
        else:
            def split(x):
                # Row r of micro-batch a is row r * grad_accum + a: every micro-batch keeps the
                # batch sharding (each device holds its share of every micro-batch).
                x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
                return jnp.swapaxes(x, 0, 1)
            mbs = jax.tree_util.tree_map(split, batch)

            def body(carry, xs):
                g_acc, s_acc = carry
                mb, i = xs
                (_, sums), g = grad_fn(params, mb, jax.random.fold_in(key, i), denom)
                return (jax.tree_util.tree_map(jnp.add, g_acc, g),
                        jax.tree_util.tree_map(jnp.add, s_acc, sums)), None

            zeros = jax.tree_util.tree_map(zero, params)
            zs = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "tokens")}
            (grads, sums), _ = jax.lax.scan(body, (zeros, zs), (mbs, jnp.arange(grad_accum)))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        step = state["step"]
        metrics = {"loss": sums["loss_sum"] / denom, "accuracy": sums["correct"] / denom,
                   "tokens": sums["tokens"], "grad_norm": grad_norm}
        metrics.update({f"lr/{k}": v for k, v in groups.learning_rates(step).items()})
        return {"step": step + 1, "params": new_params, "opt_state": opt_state}, metrics

    def eval_step(state, batch):
        return loss_sums(eval_model, state["params"], batch, loss_chunk)  # held-out loss: every position

    def batch_shardings(batch: dict) -> dict:
        return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}

    cache: dict = {}

    def jitted(kind: str, batch: dict):
        key = (kind, tuple(sorted((k, np.shape(v)) for k, v in batch.items())))
        if key not in cache:
            bs = batch_shardings(batch)
            if kind == "train":
                cache[key] = jax.jit(train_step, in_shardings=(shardings, bs),
                                     out_shardings=(shardings, replicated), donate_argnums=(0,))
            else:
                cache[key] = jax.jit(eval_step, in_shardings=(shardings, bs), out_shardings=replicated)
        return cache[key]

    def run(kind: str):
        def call(state, batch):
            # The model's logical constraints resolve on this mesh only inside use_mesh.
            with use_mesh(mesh):
                return jitted(kind, batch)(state, batch)
        return call

    return StepFns(train=run("train"), eval=run("eval"), state_shardings=shardings,
                   batch_shardings=batch_shardings, mesh=mesh, jitted=jitted)


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows (numpy) -> global jax arrays sharded over the batch axes of `mesh`.

    Every process passes its own consecutive block of rows (process p holds rows [p*b, (p+1)*b) of
    the global batch, in the mesh's device order), so one process or many build the same batch.
    """
    out = {}
    n_proc = jax.process_count()
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * n_proc,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, global_shape)
    return out


def init_state(tx: optax.GradientTransformation, shardings: dict, params) -> dict:
    """The train state {'step', 'params', 'opt_state'} in its shardings, from placed `params`."""
    mesh = jax.tree_util.tree_leaves(shardings["step"])[0].mesh
    with use_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}


def random_params(model_cfg: JinaVLMConfig, mesh: Mesh, seed: int, pos_embed_init: str = "normal"):
    """Randomly initialised params (`init_params` with this seed), created directly in their shardings.

    `pos_embed_init`: "normal" keeps the module's normal(0.02) ViT position embeddings; "sincos2d"
    starts them at `model.vision.sincos2d_positions` (every other param unchanged).
    The compiled initializer is cached per (config, mesh, pos_embed_init): several runs in one
    process compile it once.
    """
    if pos_embed_init not in POS_EMBED_INITS:
        raise ValueError(f"pos_embed_init must be one of {POS_EMBED_INITS}, got {pos_embed_init!r}")
    fn = _initializer(model_cfg, mesh, pos_embed_init)  # (built outside use_mesh: abstract_params cannot run inside it)
    with use_mesh(mesh):
        return fn(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _initializer(model_cfg: JinaVLMConfig, mesh: Mesh, pos_embed_init: str):
    from ..model import init_params
    from ..model.vision import sincos2d_positions

    def init(key):
        params = init_params(model_cfg, key)
        if pos_embed_init == "sincos2d":
            pos = params["vision"]["pos_embed"]
            params["vision"]["pos_embed"] = jnp.asarray(sincos2d_positions(*pos.shape), pos.dtype)
        return params
    return jax.jit(init, out_shardings=param_shardings(model_cfg, mesh))


def count_params(tree) -> int:
    """Number of elements of every leaf of a param (or abstract param) tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
