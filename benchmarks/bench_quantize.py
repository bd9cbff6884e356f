"""How close int8 weight-only inference (Qwix, `jinavlm_jax.adapt.quant`) stays to float: logits and answers.

    python3 benchmarks/bench_quantize.py                       # the golden tiny model (or a random tiny one)
    python3 benchmarks/bench_quantize.py --checkpoint DIR      # any checkpoint (Orbax or official)
    python3 benchmarks/bench_quantize.py --demo runs/demo      # a demo run: + held-out answer accuracy

Logits: `convert check-logits` figures (KL(ref || quantized) mean / max per position, top-1
agreement, top-5 overlap) on random inputs (text + one image crop), for

* bfloat16 against float32 (what bf16 rounding alone costs, for scale),
* int8 weights with bfloat16 compute against bfloat16 (the issue's comparison),
* int8 weights with float32 compute against float32, and int8+vision against float32.

`--demo RUN`: the run's exported model answers its held-out questions greedily in float32, with
int8 weights, and with int8 weights and an int8 KV cache (`kv_cache_dtype="int8"`): accuracy of each
and the share of generated positions where its greedy tokens agree with float32's.
Decoder weight bytes (the per-layer tree without embeddings) are reported for float32 / bf16 / int8.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import os  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # with libtpu installed, do not probe for TPU chips
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from jinavlm_jax.adapt.quant import tree_bytes  # noqa: E402
from jinavlm_jax.convert import logit_metrics, random_inputs  # noqa: E402
from jinavlm_jax.inference.params import prepare_params  # noqa: E402
from jinavlm_jax.inference.programs import full_logits_jit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def golden_or_tiny():
    """(name, config, params): the golden tiny model of ../shared/testdata set 1 when present, else
    `JinaVLMConfig.tiny()` with random weights."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import testdata_dir
    d = testdata_dir()
    if d is not None:
        import shutil
        import tempfile

        from jinavlm_jax import load_jina_vlm
        tmp = Path(tempfile.mkdtemp())
        shutil.copy(d / "set1_config.json", tmp / "config.json")
        shutil.copy(d / "set1_weights_official_names.safetensors", tmp / "model.safetensors")
        config, params = load_jina_vlm(tmp)
        return "golden tiny model (shared/testdata set 1)", config, params
    from jinavlm_jax import JinaVLMConfig, init_params
    config = JinaVLMConfig.tiny()
    return "random tiny model (JinaVLMConfig.tiny(), seed 0; golden data not found)", config, init_params(config, 0)


def logits_table(config, params, seeds: int, length: int) -> tuple[list[list[str]], dict]:
    # bf16 rows: params cast to bfloat16 first, as `jinavlm generate --dtype bfloat16 [--quantize int8]` does.
    f32, bf16 = config.replace(dtype="float32"), config.replace(dtype="bfloat16")
    p16 = jax.tree_util.tree_map(lambda a: a.astype("bfloat16"), params)
    variants = {
        "float32": (f32, prepare_params(f32, params)),
        "bfloat16": (bf16, prepare_params(bf16, p16)),
        "int8 (f32 compute)": (f32, prepare_params(f32, params, quantize="int8")),
        "int8 (bf16 compute)": (bf16, prepare_params(bf16, p16, quantize="int8")),
        "int8+vision (f32 compute)": (f32, prepare_params(f32, params, quantize="int8+vision")),
    }
    pairs = [("float32", "bfloat16"), ("bfloat16", "int8 (bf16 compute)"), ("float32", "int8 (f32 compute)"),
             ("float32", "int8+vision (f32 compute)")]
    logits = {k: [] for k in variants}
    for s in range(seeds):
        x = random_inputs(config, seed=s, batch=2, crops=1, length=length)
        for k, (c, p) in variants.items():
            logits[k].append(np.asarray(full_logits_jit(c, p, *x), np.float32))
    rows = []
    for a, b in pairs:
        m = logit_metrics(np.concatenate(logits[a]), np.concatenate(logits[b]))
        rows.append([a, b, f"{m['kl_mean']:.2e}", f"{m['kl_max']:.2e}", f"{m['top1_agree']:.4f}",
                     f"{m['top5_overlap']:.4f}"])
    dec = lambda p: tree_bytes({k: v for k, v in p.tree["text"].items() if "embedding" not in k})
    sizes = {k: dec(p) for k, (_, p) in variants.items() if k in ("float32", "int8 (f32 compute)")}
    sizes["bfloat16"] = dec(variants["bfloat16"][1])
    return rows, sizes


def demo_accuracy(run: Path, samples: int, max_new: int):
    """Held-out accuracy of RUN/export in float32 and with int8 weights, and greedy token agreement."""
    from jinavlm_jax.checkpoint import load
    from jinavlm_jax.data.pipeline import eval_examples
    from jinavlm_jax.processing import Processor
    from jinavlm_jax.train.config import load_config
    from jinavlm_jax.train.evaluate import generation_accuracy
    from jinavlm_jax.train.setup import resolve_sources
    cfg = load_config(run / "config.yaml")
    _, held = resolve_sources(cfg, verbose=False)
    examples = eval_examples(held, samples)
    config, params = load(run / "export")
    proc = Processor.from_dir(run / "export")
    reps, agree = {}, {}
    for name, q, kv in DEMO_VARIANTS:
        t0 = time.perf_counter()
        reps[name] = generation_accuracy(config.replace(dtype="float32"), params, proc, examples,
                                         max_new_tokens=max_new, batch_size=50, quantize=q, kv_cache_dtype=kv)
        log(f"  {name}: accuracy {reps[name].accuracy:.4f} ({time.perf_counter() - t0:.0f} s)")
        hits = total = 0
        for a, b in zip(reps[DEMO_VARIANTS[0][0]].predictions, reps[name].predictions):
            ta, tb = proc.tokenizer.encode(a["prediction"]), proc.tokenizer.encode(b["prediction"])
            total += max(len(ta), len(tb), 1)
            hits += sum(x == y for x, y in zip(ta, tb))
        agree[name] = hits / total
    return reps, agree


# (row name, quantize, kv_cache_dtype) of the --demo comparison; the first is the reference.
DEMO_VARIANTS = [("float32", None, None), ("int8 weights", "int8", None),
                 ("int8 weights + int8 KV cache", "int8", "int8")]


def fmt_table(rows, header) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", metavar="DIR", help="a float checkpoint (default: the golden tiny model)")
    ap.add_argument("--demo", metavar="RUN", help="a finished demo run directory (RUN/export, RUN/config.yaml)")
    ap.add_argument("--seeds", type=int, default=4, help="random input batches (2 rows each)")
    ap.add_argument("--length", type=int, default=48, help="text tokens per row after the image tokens")
    ap.add_argument("--samples", type=int, default=300, help="--demo: held-out questions per source")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.demo:
        from jinavlm_jax.checkpoint import load
        name = f"demo run {args.demo} (export)"
        config, params = load(Path(args.demo) / "export")
    elif args.checkpoint:
        from jinavlm_jax.checkpoint import load_any
        name = args.checkpoint
        config, params = load_any(args.checkpoint, dtype="float32")
    else:
        name, config, params = golden_or_tiny()
    log(f"logits: {name} ...")
    rows, sizes = logits_table(config, params, args.seeds, args.length)
    text = (f"Model: {name}. Random inputs: {args.seeds} batches x 2 rows, one image crop + {args.length} text "
            f"tokens per row; every position compared.\n\n"
            + fmt_table(rows, ["reference", "compared", "KL mean", "KL max", "top-1 agreement", "top-5 overlap"])
            + "\n\nDecoder weights (per-layer tree without the embedding tables): "
            + ", ".join(f"{k.split(' ')[0]} {v / 1e6:.2f} MB" for k, v in sizes.items()) + "\n")
    if args.demo:
        log("held-out answers (" + ", then ".join(v[0] for v in DEMO_VARIANTS) + ") ...")
        reps, agree = demo_accuracy(Path(args.demo), args.samples, args.max_new_tokens)
        f = reps[DEMO_VARIANTS[0][0]]
        rows = [[name, f"{r.accuracy:.4f}", f"{100 * (r.accuracy - f.accuracy):+.2f}", f"{100 * agree[name]:.2f}%",
                 str(r.n)] for name, r in reps.items()]
        text += ("\nHeld-out answers of the demo model (greedy, float32 compute): "
                 + fmt_table(rows, ["weights / cache", "accuracy", "points vs float32",
                                    "greedy tokens agreeing with float32", "questions"]).join(["\n\n", "\n\n"])
                 + f"Majority baseline {f.majority_baseline:.4f}.\n")
    text += f"\nWall time: {time.perf_counter() - t0:.0f} s (`python3 benchmarks/bench_quantize.py " \
            + " ".join(argv if argv is not None else sys.argv[1:]) + "`)."
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
