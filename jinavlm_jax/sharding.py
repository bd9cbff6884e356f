"""Logical axis names -> mesh axes (`data`, `fsdp`, `tensor`): one rule table (STYLE 4).

Every param and the main activations carry logical names (`embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, `layers`, ... and `act_*` for activations). Changing the parallelism means
changing the mesh shape or this table, never a layer.

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(config, mesh)          # NamedSharding pytree for the params
    with use_mesh(mesh):                               # activation constraints resolve on this mesh
        logits = jax.jit(fwd, in_shardings=(shardings, ...))(params, ...)
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Weights: the model dimension is split by FSDP, heads / MLP / vocab by
# tensor parallelism. Activations: batch over data and fsdp, heads / MLP / vocab over tensor.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("patch", None),
    ("positions", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (missing axes are 1)."""
    out = {a: 1 for a in MESH_AXES}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\w+)=(-1|\d+)", part)
        if not m or m.group(1) not in MESH_AXES:
            raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated axis=size with axes {MESH_AXES}")
        out[m.group(1)] = int(m.group(2))
    return out


def resolve_mesh_shape(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """{'data', 'fsdp', 'tensor'} sizes for `n_devices`: missing axes are 1, one axis may be -1 (the rest).

    Raises ValueError naming the sizes and the device count when they do not multiply out.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh {dict(sizes)}: unknown axes {unknown} (axes: {MESH_AXES})")
    out = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    free = [a for a, v in out.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in out.values()):
        raise ValueError(f"mesh {out}: sizes must be >= 1, with at most one -1 (the devices left over)")
    if free:
        rest = math.prod(v for v in out.values() if v != -1)
        if n_devices % rest:
            raise ValueError(f"mesh {out}: {n_devices} devices cannot be split that way")
        out[free[0]] = n_devices // rest
    if math.prod(out.values()) != n_devices:
        raise ValueError(f"mesh data={out['data']} x fsdp={out['fsdp']} x tensor={out['tensor']} = "
                         f"{math.prod(out.values())} devices, but there are {n_devices}; use -1 for one "
                         "axis to take the rest")
    return out


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default all), in device order; one axis may be -1
    (by default fsdp takes what is left)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    arr = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(arr, MESH_AXES)


def mesh_from_spec(spec: str | None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of a `--mesh data=..,fsdp=..,tensor=..` option; None or "" puts all devices on fsdp."""
    return make_mesh(**parse_mesh_spec(spec), devices=devices) if spec else make_mesh(devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    """The PartitionSpec the rule table gives a tensor with logical `axes`."""
    return nn.logical_to_mesh_axes(tuple(axes), rules)


@functools.lru_cache(maxsize=16)
def _abstract_boxed(config):
    """The abstract params of `config` with their logical axes (traced once per config)."""
    from .model.jinavlm import abstract_params
    return abstract_params(config, boxed=True)


def param_specs(config, rules=LOGICAL_RULES):
    """PartitionSpec pytree for the params of `config` (from the logical names; nothing materialised)."""
    return nn.logical_to_mesh(nn.get_partition_spec(_abstract_boxed(config)), rules)


def fit_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
    """Drop mesh axes from dims they do not divide (e.g. 8 KV heads on tensor=16): replicate instead."""
    out = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (ax,) if isinstance(ax, str) else tuple(ax or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(ax if size and dim % size == 0 else None)
    return P(*out)


def param_shardings(config, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding pytree for the params of `config` on `mesh` (from the abstract boxed tree, which is
    built once per config: the model is not traced again for every call)."""
    return boxed_shardings(_abstract_boxed(config), mesh, rules)


def boxed_shardings(boxed, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedSharding pytree for an abstract param tree boxed with logical axes (the model's, or a
    Qwix-wrapped model's with adapters / int8 kernels); unnamed leaves are replicated."""
    shapes = nn.unbox(boxed)
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
    return jax.tree_util.tree_map(
        lambda s, a: None if a is None else NamedSharding(mesh, fit_spec(s or P(), a.shape, mesh)), specs, shapes,
        is_leaf=lambda x: isinstance(x, P) or x is None)   # None: an empty field (a QArray's zero_point)


def named(mesh: Mesh, axes: Sequence[str | None], rules=LOGICAL_RULES, shape: Sequence[int] | None = None
          ) -> NamedSharding:
    """NamedSharding for an activation / input with logical `axes` (with `shape`: mesh axes that do
    not divide a dimension are dropped for it)."""
    spec = logical_to_spec(axes, rules)
    return NamedSharding(mesh, spec if shape is None else fit_spec(spec, tuple(shape), mesh))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=LOGICAL_RULES) -> Iterator[Mesh]:
    """Make `mesh` and the rule table current, so the model's logical constraints resolve on it."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def shard_params(params, shardings):
    """device_put a param pytree onto a sharding pytree of the same structure."""
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), params, shardings)
