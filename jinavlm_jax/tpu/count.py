"""Matmul FLOPs of a jaxpr, every loop iteration counted: what XLA's cost analysis leaves out.

XLA's `cost_analysis()` counts the body of a loop once (our layers are an `nn.scan`, the chunked loss
a `lax.scan`) and does not see inside Pallas kernels (splash attention). `count_flops` walks the jaxpr
of the very program that is compiled instead, counting 2*M*N*K for every dot_general (remat
recomputation included, it is in the jaxpr), each scan body times its length, each Pallas kernel
body times its grid and each `shard_map` body times its shards. A `while` loop has no static trip
count: its body is counted once (for the decode loop: one decode step, which is what the decode
figures are per). Matmuls only: elementwise work is ~1-2% here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))

def _dot_flops(eqn) -> float:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    contract = _prod(lhs.shape[i] for i in lc)
    batch = _prod(lhs.shape[i] for i in lb)
    lfree = _prod(lhs.shape) // max(contract * batch, 1)
    rfree = _prod(rhs.shape) // max(contract * batch, 1)
    return 2.0 * batch * lfree * rfree * contract


def _subjaxprs(eqn):
    from jax.extend import core as jcore
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


@dataclass
class JaxprFlops:
    """Matmul FLOPs of a jaxpr (global, all devices): `all` counts every scan iteration, `once`
    counts each scan body once (as XLA's cost analysis does); `pallas` is inside Pallas kernels."""

    all: float = 0.0
    once: float = 0.0
    pallas: float = 0.0
    scans: list = field(default_factory=list)   # (length, body FLOPs) of the outermost scans


def count_flops(jaxpr) -> JaxprFlops:
    """Walk a jaxpr (and every sub-jaxpr): dot_general = 2*M*N*K; see JaxprFlops."""
    def walk(jx, in_pallas: bool, depth: int) -> tuple[float, float, float]:
        tot_all = tot_once = pal = 0.0
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                f = _dot_flops(eqn)
                if in_pallas:
                    pal += f
                else:
                    tot_all += f
                    tot_once += f
            elif name == "scan":
                a, o, p = walk(eqn.params["jaxpr"].jaxpr, in_pallas, depth + 1)
                n = int(eqn.params["length"])
                tot_all, tot_once, pal = tot_all + n * a, tot_once + o, pal + n * p
                if depth == 0:
                    res.scans.append((n, a))
            elif name == "cond":
                parts = [walk(b.jaxpr, in_pallas, depth + 1) for b in eqn.params["branches"]]
                best = max(parts, key=lambda t: t[0] + t[2])
                tot_all, tot_once, pal = tot_all + best[0], tot_once + best[1], pal + best[2]
            elif name == "pallas_call":
                grid = _prod(getattr(eqn.params["grid_mapping"], "grid", ()) or (1,))
                a, _, p = walk(eqn.params["jaxpr"], True, depth + 1)
                pal += grid * (a + p)
            elif name == "shard_map":
                mesh = eqn.params["mesh"]
                axes = eqn.params.get("manual_axes") or eqn.params.get("axis_names") or mesh.axis_names
                k = _prod(mesh.shape[a] for a in axes)
                a, o, p = walk(eqn.params["jaxpr"], in_pallas, depth)
                tot_all, tot_once, pal = tot_all + k * a, tot_once + k * o, pal + k * p
            else:
                for sub in _subjaxprs(eqn):
                    a, o, p = walk(sub, in_pallas, depth)
                    tot_all, tot_once, pal = tot_all + a, tot_once + o, pal + p
        return tot_all, tot_once, pal

    res = JaxprFlops()
    res.all, res.once, res.pallas = walk(jaxpr, False, 0)
    return res

