"""Where the compiled train step's time goes, op by op, on this CPU.

    python3 benchmarks/profile_train_step.py [--recipe configs/demo.yaml] [--steps 5] [--top 25]
                                             [--unrolled] [--batch 32] [--seq-len 256] [key=value ...]

Builds the recipe's model (its `model.arch` on the tiny layout, the demo tokenizer's 1024-word
vocabulary), the recipe's optimizer and the real jitted train step (`train.step.make_steps`, with the
recipe's `model.scan_layers`, `run.loss_chunk` and `run.loss_positions`; `key=value` overrides as for
train.py) on one device, feeds it one synthetic batch of the recipe's shapes (`--batch` rows of
`--seq-len` tokens, `data.crops_per_row` crops per row, an 8-token answer weighted per row) and times
`--steps` steps. Then it
traces `--steps` more with `jax.profiler` and sums the XLA:CPU thunks by the part of the model their
HLO comes from (the `op_name` metadata: vision / connector / text decoder / loss / optimizer, forward
or backward), by kind (matmul, copy or transpose, reduce, other fused loops) and by op, the same op of
every layer summed together. Thunks run on
two threads at once, so their sum exceeds the wall time: compare shares, not totals.

It prints the step time, XLA's FLOP count for the step and the achieved GFLOP/s, the two tables,
and the `--top` most expensive thunks with the HLO shape and the op they come from. `--unrolled`
builds the decoder without `nn.scan` (`scan_layers=False`) for comparison. Like `python train.py`, it
runs with glibc's malloc on transparent huge pages (`jinavlm_jax.hostmem`; `JINAVLM_HUGEPAGES=0`: off).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from jinavlm_jax.efficiency import xla_flops  # noqa: E402
from jinavlm_jax.hostmem import status as malloc_status, with_huge_pages  # noqa: E402
from jinavlm_jax.model import JinaVLMConfig, abstract_params  # noqa: E402
from jinavlm_jax.sharding import make_mesh, use_mesh  # noqa: E402
from jinavlm_jax.train.config import load_config  # noqa: E402
from jinavlm_jax.train.optim import make_optimizer  # noqa: E402
from jinavlm_jax.train.setup import apply_arch  # noqa: E402
from jinavlm_jax.train.step import init_state, make_steps, put_batch, random_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = (("optimizer", ("optax", "adam", "apply_updates", "clip", "global_norm", "tree_norm")),
         ("loss", ("logits_from_hidden", "logsumexp", "xent", "take_along_axis")),
         ("vision", ("vision_features", "/vision/")),
         ("connector", ("connector", "encode_images", "embed_inputs")),
         ("text decoder", ("decode_hidden", "text.decode", "/text/")))

# The demo recipe freezes its pretrained vision tower and connector; the steps measured here train every
# part (as the PyTorch step does). These overrides come first, so a user's override wins.
TRAIN_EVERY_PART = ("optimizer.groups.vision.lr=0.002", "optimizer.groups.connector.lr=0.003")


def part_of(op_name: str) -> str:
    backward = "transpose(" in op_name
    for part, keys in PARTS:
        if any(k in op_name for k in keys):
            return f"{part} ({'backward' if backward else 'forward'})" if part != "optimizer" else part
    return "other"


def kind_of(name: str, hlo_line: str) -> str:
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or " dot(" in hlo_line or "convolution(" in hlo_line:
        return "matmul (XNNPACK / dot)"
    if "copy" in name or "transpose" in name:
        return "copy / transpose"
    if "reduce" in name or "reduce(" in hlo_line:
        return "reduce"
    if "dynamic-slice" in name or "dynamic-update-slice" in name or "gather" in name or "scatter" in name:
        return "slice / gather / scatter"
    if name.startswith(("while", "call", "conditional")):
        return "control flow"
    return "other fused loops"


def op_group(op_name: str, kind: str) -> str:
    """An op's name with its layer number and loop plumbing dropped, and its kind: thunks of the same op
    in every layer sum together (`text.decode/layers_*/mlp/up/dot_general (matmul)`)."""
    name = re.sub(r"layers_\d+", "layers_*", op_name.removeprefix("jit(train_step)/"))
    name = re.sub(r"(while/body/|closed_call/|layers_\*\.)", "", name)
    return f"{name[-110:]} ({kind.split(' ')[0]})"


def synthetic_batch(cfg, mc: JinaVLMConfig, rows: int, seq_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    side = mc.vision.patches_per_side
    patches, per_crop = side * side, (side // 2) ** 2
    crops = cfg.data.crops_per_row
    idx = np.full((rows, crops, per_crop), -1, np.int32)
    for c in range(crops):
        start = 8 + c * (per_crop + 8)
        if start + per_crop <= seq_len:
            idx[:, c] = np.arange(start, start + per_crop)
    vocab = mc.text.vocab_size
    # An 8-token answer after the image tokens of each row (the demo's answers are 2-8 tokens).
    weights = np.zeros((rows, seq_len), np.float32)
    end = min(seq_len, 8 + crops * (per_crop + 8) + 40)
    weights[:, end - 8:end] = 1.0
    return {"input_ids": rng.integers(0, vocab, (rows, seq_len)).astype(np.int32),
            "labels": rng.integers(0, vocab, (rows, seq_len)).astype(np.int32),
            "weights": weights,
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "images": rng.standard_normal((rows, crops, patches, mc.vision.patch_dim)).astype(np.float32),
            "image_masks": np.ones((rows, crops, patches), np.int32),
            "image_input_idx": idx}


def trace_thunks(run, steps: int) -> dict[str, float]:
    """Microseconds per step of every XLA:CPU thunk, from a jax.profiler trace of `steps` calls."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            run()
        jax.profiler.stop_trace()
        files = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(files[0]))["traceEvents"]
    total: dict[str, float] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(("ThunkExecutor", "Pjit", "$", "SlinkyThreadPool")):
            total[name] += e["dur"] / steps
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--batch", type=int, help="rows (default: the recipe's data.batch_size)")
    ap.add_argument("--seq-len", type=int, help="tokens per row (default: the recipe's data.seq_len)")
    ap.add_argument("--vocab", type=int, default=1024, help="decoder vocabulary (the demo tokenizer's)")
    ap.add_argument("--unrolled", action="store_true", help="decoder layers without nn.scan (also: the recipe's "
                    "model.scan_layers: false)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for train.py")
    args = ap.parse_args(argv)

    cfg = load_config(args.recipe, [*TRAIN_EVERY_PART, *args.overrides])
    args.unrolled = args.unrolled or not cfg.model.scan_layers
    base = JinaVLMConfig.tiny()
    base = base.replace(text=base.text.__class__(**{**base.text.__dict__, "vocab_size": args.vocab}))
    mc = apply_arch(base, cfg.model.arch).replace(scan_layers=not args.unrolled, remat_policy=cfg.model.remat_policy)
    rows, seq_len = args.batch or cfg.data.batch_size, args.seq_len or cfg.data.seq_len
    batch = synthetic_batch(cfg, mc, rows, seq_len)

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    ab = abstract_params(mc)
    tx, groups = make_optimizer(cfg.optimizer, max(cfg.run.steps, 1), ab)
    steps = make_steps(mc, tx, groups, mesh, ab, loss_chunk=cfg.run.loss_chunk, loss_positions=cfg.run.loss_positions)
    state = {"s": init_state(tx, steps.state_shardings, random_params(mc, mesh, 0))}
    with use_mesh(mesh):
        b = put_batch(batch, mesh)
        compiled = steps.jitted("train", b).lower(state["s"], b).compile()
        flops = xla_flops(compiled)
        hlo = compiled.as_text()

        def run():
            state["s"], m = steps.train(state["s"], b)
            jax.block_until_ready(m)

        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        thunks = trace_thunks(run, args.steps)

    step_s = float(np.median(times))
    flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    print(f"train step: {rows} rows x {seq_len} tokens, {cfg.data.crops_per_row} crops per row, decoder "
          f"{'unrolled' if args.unrolled else 'scanned'}; {os.cpu_count()} cores ({isa}); jax {jax.__version__}; "
          f"{malloc_status()}")
    print(f"first call (compile + run) {first:.1f} s; step median {1e3 * step_s:.0f} ms (min {1e3 * min(times):.0f}); "
          f"XLA FLOPs {flops / 1e9:.2f} G = {flops / step_s / 1e9:.1f} GFLOP/s achieved; "
          f"{rows * seq_len / step_s:,.0f} tokens/s\n")

    info = {}
    for name in thunks:
        m = re.search(r"\n\s+(?:ROOT )?%" + re.escape(name) + r" = ([^\n]*)", hlo)
        line = m.group(1) if m else ""
        op = re.search(r'op_name="([^"]+)"', line)
        info[name] = (line.split(" ")[0], op.group(1) if op else "", line)
    total = sum(thunks.values())
    for title, key in (("part of the model", lambda n: part_of(info[n][1])),
                       ("kind of op", lambda n: kind_of(n, info[n][2]))):
        sums = collections.Counter()
        for n, us in thunks.items():
            sums[key(n)] += us
        print(f"| {title} | thunk ms per step | share |\n|---|---|---|")
        for k, us in sums.most_common():
            print(f"| {k} | {us / 1e3:.1f} | {100 * us / total:.0f}% |")
        print()
    print("| op (all layers together) | thunks | ms per step | share |\n|---|---|---|---|")
    by_op, count = collections.Counter(), collections.Counter()
    for n, us in thunks.items():
        key = op_group(info[n][1] or n, kind_of(n, info[n][2]))
        by_op[key] += us
        count[key] += 1
    for k, us in by_op.most_common(args.top):
        print(f"| {k} | {count[k]} | {us / 1e3:.1f} | {100 * us / total:.1f}% |")
    print()
    print("| thunk | ms per step | HLO shape | from |\n|---|---|---|---|")
    for n, us in thunks.most_common(args.top):
        shape, op, _ = info[n]
        print(f"| {n} | {us / 1e3:.1f} | `{shape[:40]}` | {op[-90:]} |")
    return 0


if __name__ == "__main__":
    with_huge_pages()  # re-executes with glibc.malloc.hugetlb=1 where that helps (jinavlm_jax.hostmem)
    sys.exit(main())
