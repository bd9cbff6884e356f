"""Where inference arrays live: host arrays onto a mesh by logical axes, and the mesh context."""
from __future__ import annotations

import contextlib

import jax
import numpy as np


def batch_shards(mesh) -> int:
    """How many ways a mesh splits the batch (rows are padded to a multiple of it)."""
    if mesh is None:
        return 1
    return int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))


def put(x, mesh, axes):
    """x onto `mesh` by logical `axes` (None stays None; without a mesh x is returned as is)."""
    if x is None or mesh is None:
        return x
    from ..sharding import named
    return jax.device_put(x, named(mesh, axes, shape=np.shape(x)))


def mesh_context(mesh):
    """The rule-table context activation constraints resolve in (a no-op without a mesh)."""
    if mesh is None:
        return contextlib.nullcontext()
    from ..sharding import use_mesh
    return use_mesh(mesh)
