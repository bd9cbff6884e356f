"""python -m convert {hf-to-orbax, orbax-to-hf, from-components, check-logits} (run from the repo root).

Argument parsing only; the work is done by `jinavlm_jax.convert`. Progress goes to stderr, the
summary to stdout. Exit codes: 0 success, 1 error (message on stderr), 2 bad arguments,
3 check-logits above its threshold, 130 interrupted (nothing left looking complete).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the four subcommands."""
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("hf-to-orbax", help="official jina-vlm safetensors directory -> Orbax checkpoint")
    h.add_argument("src", help="official directory: config.json + model.safetensors (or sharded index)")
    h.add_argument("dst", help="Orbax checkpoint directory to create")
    h.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="param dtype (default: the checkpoint's)")
    h.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: all devices on fsdp)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    o = sub.add_parser("orbax-to-hf", help="Orbax checkpoint -> official sharded safetensors + config.json")
    o.add_argument("src", help="Orbax checkpoint directory")
    o.add_argument("dst", help="official directory to create")
    o.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    o.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="tensor dtype (default: the dtypes of the original source, else the params')")
    o.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    c = sub.add_parser("from-components", help="fresh jina-vlm from transformers SigLIP(2) + Qwen3 checkpoints")
    c.add_argument("--siglip2", required=True, metavar="DIR",
                   help="Siglip2VisionModel / SiglipVisionModel / SiglipModel safetensors directory")
    c.add_argument("--qwen3", required=True, metavar="DIR", help="Qwen3ForCausalLM safetensors directory")
    c.add_argument("dst", help="Orbax checkpoint directory to create")
    c.add_argument("--seed", type=int, default=0, help="connector / new embedding rows init seed")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="param dtype")
    c.add_argument("--vit-layers", default="-4,-10",
                   help="ViT layers fed to the connector, indexing [block outputs..., post-norm] (default -4,-10)")
    c.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: all devices on fsdp)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    k = sub.add_parser("check-logits", help="compare two checkpoints (Orbax or official) on random inputs")
    k.add_argument("a", help="reference checkpoint")
    k.add_argument("b", help="checkpoint to compare")
    k.add_argument("--max-kl", type=float, default=1e-3, help="fail above this max per-position KL(A||B)")
    k.add_argument("--min-top5", type=float, default=0.0, help="fail below this mean top-5 overlap")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--crops", type=int, default=1)
    k.add_argument("--length", type=int, default=32, help="text tokens after the image tokens")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    from jinavlm_jax import convert as C  # after parsing, so --help does not start JAX

    def run():
        if args.command == "hf-to-orbax":
            print(C.hf_to_orbax(args.src, args.dst, dtype=args.dtype, mesh=args.mesh, overwrite=args.overwrite))
        elif args.command == "orbax-to-hf":
            print(C.orbax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                overwrite=args.overwrite))
        elif args.command == "from-components":
            layers = tuple(int(x) for x in args.vit_layers.split(","))
            print(C.from_components(args.siglip2, args.qwen3, args.dst, seed=args.seed, dtype=args.dtype,
                                    mesh=args.mesh, vit_layers=layers, overwrite=args.overwrite))
        else:
            m, ok = C.check_logits(args.a, args.b, seed=args.seed, batch=args.batch, crops=args.crops,
                                   length=args.length, max_kl=args.max_kl, min_top5=args.min_top5)
            print(C.format_metrics(args.a, args.b, m, ok, args.max_kl))
            return C.EXIT_OK if ok else C.EXIT_MISMATCH
        return C.EXIT_OK

    return C.cli(run)


if __name__ == "__main__":
    sys.exit(main())
