"""AdamW with parameter groups: (regex, schedule) rows, `None` to freeze (big_vision's `optax.py` idea).

Each param path ('connector/q/kernel', 'vision/layers/up/kernel', ...) gets the first group whose
regex matches (`re.search`). A group has its own peak learning rate, warmup and end ratio (the
paper trains the connector with a higher rate and a shorter warmup than the two towers), and a
group with `lr: null` is frozen: it gets no optimizer state, a zero update, and its gradient is
left out of the global norm.

    tx, groups = make_optimizer(cfg.optimizer, cfg.run.steps, params)
    labels = groups.labels                  # pytree of group names
    lr_now = groups.learning_rates(step)   # {name: lr} for logging
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from .config import GroupConfig, OptimizerConfig, TrainConfigError

FROZEN = "__frozen__"


def param_path(path) -> str:
    """'a/b/c' for a jax tree path of dict keys."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def warmup_steps(group: GroupConfig, total_steps: int) -> int:
    """A group's warmup in steps: whole numbers are steps, values below 1 a fraction of the run."""
    w = group.warmup
    return int(round(w * total_steps)) if 0 < w < 1 else int(w)


def make_schedule(group: GroupConfig, opt: OptimizerConfig, total_steps: int) -> Callable[[Any], Any]:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * end_lr_ratio` at the last step
    (or constant)."""
    peak = float(group.lr)
    end = peak * (opt.end_lr_ratio if group.end_lr_ratio is None else group.end_lr_ratio)
    warm = min(warmup_steps(group, total_steps), total_steps)
    decay = max(total_steps - warm, 1)
    if opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=(end / peak) if peak else 0.0)
    elif opt.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


@dataclass
class ParamGroups:
    """Which group each param is in, and the groups' schedules."""

    labels: Any                                # pytree of group names (FROZEN for frozen groups)
    schedules: dict[str, Callable]             # trainable group name -> schedule
    frozen: tuple[str, ...]                    # names of frozen groups
    counts: dict[str, int]                     # group name -> number of parameters (elements)

    def learning_rates(self, step) -> dict[str, jax.Array]:
        """{group: lr at `step`} (frozen groups report 0)."""
        out = {name: s(step) for name, s in self.schedules.items()}
        out.update({name: jnp.zeros((), jnp.float32) for name in self.frozen})
        return out

    def trainable_mask(self) -> Any:
        """Pytree of bools: True where the param is trained."""
        return jax.tree_util.tree_map(lambda l: l != FROZEN, self.labels)

    def trains(self, tower: str) -> bool:
        """Whether any param under the top-level key `tower` ("vision", "connector", "text") is trained:
        then the backward pass runs through that tower (a frozen tower's backward is dropped)."""
        return any(jax.tree_util.tree_leaves(self.trainable_mask()[tower]))


def assign_groups(groups: Mapping[str, GroupConfig], params: Any, only: Callable[[str], bool] | None = None
                  ) -> tuple[Any, dict[str, str]]:
    """Label every param with its group (first regex that `re.search`es its path).
    `only(path)` False: the param is frozen whatever the groups say (LoRA: everything but the adapters).

    Returns (labels pytree with group names, {path: group}). Params no group matches raise a
    TrainConfigError listing them (add a catch-all group such as `rest: {regex: '.*', lr: ...}`).
    """
    compiled = [(name, re.compile(g.regex)) for name, g in groups.items()]
    by_path: dict[str, str] = {}
    unmatched: list[str] = []

    def label(path, _):
        p = param_path(path)
        if only is not None and not only(p):
            return FROZEN
        for name, rx in compiled:
            if rx.search(p):
                by_path[p] = name
                return name
        unmatched.append(p)
        return ""

    labels = jax.tree_util.tree_map_with_path(label, params)
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (f" ... ({len(unmatched)} in all)" if len(unmatched) > 8 else "")
        raise TrainConfigError(f"optimizer.groups: no group matches {shown}; every parameter needs a group "
                               "(add e.g. `rest: {regex: '.*', lr: 1e-5}` last, or `lr: null` to freeze)")
    unused = [name for name in groups if name not in set(by_path.values())]
    if unused and only is None:  # (LoRA: groups written for full training may match no adapter)
        raise TrainConfigError(f"optimizer.groups: group(s) {unused} match no parameter (an earlier group's "
                               "regex takes them, or the regex is wrong); param paths look like "
                               f"{next(iter(by_path))!r}")
    return labels, by_path


def make_optimizer(opt: OptimizerConfig, total_steps: int, params: Any, only: Callable[[str], bool] | None = None
                   ) -> tuple[optax.GradientTransformation, ParamGroups]:
    """The optax transformation for `params` (a pytree of arrays or ShapeDtypeStructs) and its groups.

    chain(clip_by_global_norm, multi_transform({group: adamw-with-schedule, frozen: set_to_zero})).
    The clip sees the gradients of trainable params only: the train step zeroes frozen gradients first.
    `only`: see `assign_groups` (params it rejects are frozen: no optimizer state).
    """
    names, by_path = assign_groups(opt.groups, params, only)
    frozen = tuple(n for n, g in opt.groups.items() if g.lr is None)
    labels = jax.tree_util.tree_map(lambda n: FROZEN if n in frozen else n, names)
    decay_rx = re.compile(opt.decay_regex) if opt.decay_regex else None
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(decay_rx.search(param_path(path))) if decay_rx else True, params)

    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    schedules: dict[str, Callable] = {}
    for name, g in opt.groups.items():
        if g.lr is None:
            continue
        sched = make_schedule(g, opt, total_steps)
        schedules[name] = sched
        wd = opt.weight_decay if g.weight_decay is None else g.weight_decay
        parts = [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)]
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
        parts.append(optax.scale_by_learning_rate(sched))
        transforms[name] = optax.chain(*parts)
    counts: dict[str, int] = {}
    for p, name in by_path.items():
        leaf = _leaf_at(params, p)
        counts[name] = counts.get(name, 0) + int(_size(leaf))
    chain = []
    if opt.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), ParamGroups(labels, schedules, frozen, counts)


def _leaf_at(tree, path: str):
    node = tree
    for k in path.split("/"):
        node = node[k]
    return node


def _size(x) -> int:
    n = 1
    for d in x.shape:
        n *= int(d)
    return n
