"""The serving engine's decode step with and without blocked attention, measured in one run.

    python3 benchmarks/bench_engine_step.py [--size mid|full] [--slots 8] [--slot-len 4096] [--live 300]
                                            [--blocks 0,128] [--steps 8]

One `inference.engine.generate` program (every slot advances one token) on random weights, the decode
state holding `--live` valid tokens in every one of `--slots` slots of `--slot-len` positions. Each
`--blocks` value is a `JinaVLMConfig.decode_block`: 0 reads the whole slot in one pass; N reads blocks
of N positions up to the longest live request (one pass once that fills 3/4 of the slot). Prints the
median step time of each and its speed against the first.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # with libtpu installed, do not probe for TPU chips
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jinavlm_jax import JinaVLMConfig, init_params  # noqa: E402
from jinavlm_jax.inference import engine  # noqa: E402
from jinavlm_jax.inference.params import prepare_params  # noqa: E402
from jinavlm_jax.testing import mid_config  # noqa: E402


def step_time(config: JinaVLMConfig, params, slots: int, slot_len: int, live: int, steps: int) -> float:
    """Median seconds of one `engine.generate` call (one token for every slot) after a warm-up call."""
    fn = jax.jit(partial(engine.generate, config, 1, False), donate_argnums=1)
    lengths = jnp.full((slots,), live, jnp.int32)
    state = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), engine.abstract_state(config, slots, slot_len))
    state = state._replace(lengths=lengths, kv_valid=jnp.arange(slot_len)[None] < lengths[:, None])
    active = jnp.ones((slots,), bool)
    state, _ = fn(params, state, active)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, tokens = fn(params, state, active)
        jax.block_until_ready(tokens)
        times.append(time.perf_counter() - t)
    del state
    gc.collect()
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("mid", "full"), default="mid")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--slot-len", type=int, default=4096)
    ap.add_argument("--live", type=int, default=300, help="valid tokens in every slot")
    ap.add_argument("--blocks", default="0,128")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    base = JinaVLMConfig.jina_vlm_2_4b() if args.size == "full" else mid_config()
    if args.slot_len % 128 or not 0 < args.live < args.slot_len:
        raise SystemExit(f"--slot-len must be a multiple of 128 and --live in (0, {args.slot_len})")
    params = prepare_params(base, init_params(base, 0))
    rows = []
    for block in (int(b) for b in args.blocks.split(",")):
        t = step_time(base.replace(decode_block=block), params, args.slots, args.slot_len, args.live, args.steps)
        rows.append((block, t))
        print(f"decode_block={block}: {t * 1e3:.1f} ms per step", file=sys.stderr, flush=True)
    first = rows[0][1]
    print(f"engine decode step: {args.size} model, float32, {args.slots} slots x {args.slot_len} positions, "
          f"{args.live} live tokens each; median of {args.steps} steps ({os.cpu_count()} cores, jax {jax.__version__})\n")
    print("| decode_block | step | tokens/s | speed vs the first row |\n|---|---|---|---|")
    for block, t in rows:
        print(f"| {block or '0 (one pass)'} | {t * 1e3:.1f} ms | {args.slots / t:.1f} | {first / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
