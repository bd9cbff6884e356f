"""TPU topologies without TPUs: the chip of a topology name, libtpu's compile-only devices, the mesh.

libtpu (the `[tpu]` install extra) compiles for a TPU topology on any host: the topology's
compile-only devices make a (data, fsdp, tensor) mesh. Several slices are stacked on `data`, so only
data parallelism crosses the slow inter-slice network.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
from typing import Sequence

import numpy as np

from ..flops import CHIPS, Chip


class AOTError(ValueError):
    """A request the AOT driver cannot serve (bad topology / mesh, missing libtpu); one line, no traceback."""


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5e:2x4' -> (the v5e chip, (2, 4)). The chip count is the product of the dims."""
    m = re.fullmatch(r"(v\w+?):(\d+(?:x\d+){1,2})", topology.strip())
    if not m or m.group(1) not in CHIPS:
        raise AOTError(f"topology {topology!r}: expected <chip>:<dims> such as v5e:2x4, v5e:16x16 or v5p:2x2x1 "
                       f"with chip one of {sorted(CHIPS)}")
    return CHIPS[m.group(1)], tuple(int(x) for x in m.group(2).split("x"))


def libtpu_available() -> bool:
    """Whether libtpu is installed (compiling for TPU needs it; running does not happen here)."""
    return importlib.util.find_spec("libtpu") is not None


def compile_only_devices(topology: str, num_slices: int = 1) -> list:
    """The compile-only TPU devices of `num_slices` slices of `topology` (needs libtpu, no TPU)."""
    _, dims = parse_topology(topology)
    if not libtpu_available():
        raise AOTError("compiling for TPU needs libtpu: pip install 'jinavlm-jax[tpu]' (jax[tpu]); no TPU "
                       "hardware is needed")
    # Compile-only use: let several processes load libtpu (no chip is opened), e.g. a test run
    # beside `--report`; otherwise the second one fails on /tmp/libtpu_lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    bounds = tuple(min(d, 2) for d in dims[:2]) + (1,)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=num_slices)
    except Exception as e:  # libtpu's errors are RuntimeErrors with long texts
        raise AOTError(f"libtpu cannot build topology {topology!r} x {num_slices} slice(s): "
                       f"{str(e).splitlines()[0][:300]}") from None
    devices = list(desc.devices)
    want = math.prod(dims) * num_slices
    if len(devices) != want:
        raise AOTError(f"topology {topology!r} x {num_slices} slice(s) gave {len(devices)} devices, expected {want}")
    return devices


def build_mesh(devices: Sequence, sizes: dict[str, int], num_slices: int = 1):
    """A (data, fsdp, tensor) `Mesh` over compile-only devices, laid out along the physical topology.

    One axis may be -1 (the rest; `sharding.resolve_mesh_shape`). With several slices the slices are
    the outer part of `data` (`data` must be a multiple of the slice count): FSDP and tensor
    collectives stay inside a slice.
    """
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from ..sharding import MESH_AXES, resolve_mesh_shape

    try:
        resolved = resolve_mesh_shape(sizes, len(devices))
    except ValueError as e:
        raise AOTError(str(e)) from None
    shape = tuple(resolved[a] for a in MESH_AXES)
    if num_slices > 1:
        if shape[0] % num_slices:
            raise AOTError(f"mesh data={shape[0]} must be a multiple of --num-slices {num_slices}: slices are laid "
                           "out on the data axis (only data parallelism crosses the inter-slice network)")
        ici = (shape[0] // num_slices,) + shape[1:]
        try:
            arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices)
        except NotImplementedError:  # an axis that is not a product of physical axes: split them
            arr = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices,
                                                       allow_split_physical_axes=True)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # shapes the topology-aware layout does not cover: plain device order
            arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)
