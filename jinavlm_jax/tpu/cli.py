"""`jinavlm aot`: compile a program for a TPU topology from any host; does a step fit, how fast can it be.

    jinavlm aot --topology v5e:2x4 --mesh data=1,fsdp=8,tensor=1 --job train \\
        --config configs/stage2_instruct.yaml model.remat_policy=full --batch-per-chip 1

Printed per device: argument, output, temporary and peak bytes against the chip's HBM, FLOPs, bytes
accessed, and the step time and MFU those imply at the chip's peak rate (`tpu.jobs`). The table of
`docs/tpu.md` is made by `benchmarks/tpu_report.py` from one such run per case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..command import Command, run_cli
from ..flops import GiB
from .jobs import DoesNotFit, compile_job, decode_job, load_recipe, prefill_job, serve_jobs, train_job
from .topology import AOTError, build_mesh, compile_only_devices, parse_topology

HELP = "compile the train step / prefill / decode for a TPU topology without TPUs: memory, FLOPs, MFU bound"

def plan(args) -> tuple:
    """(Job, mesh, chip, model config) for parsed arguments."""
    from ..sharding import parse_mesh_spec
    chip, _ = parse_topology(args.topology)
    devices = compile_only_devices(args.topology, args.num_slices)
    try:
        sizes = parse_mesh_spec(args.mesh) if args.mesh else {"data": args.num_slices, "fsdp": -1, "tensor": 1}
    except ValueError as e:
        raise AOTError(str(e)) from None
    mesh = build_mesh(devices, sizes, args.num_slices)
    cfg, model_cfg = load_recipe(args.config, args.overrides)
    if args.job == "train":
        if args.kv_cache_dtype != "auto":
            raise AOTError("--kv-cache-dtype applies to prefill / decode / serve (a train step has no KV cache)")
        if args.quantize:
            raise AOTError("--quantize applies to prefill / decode / serve; for a QLoRA train step set lora.rank and "
                           "lora.base_dtype=int8 in the recipe")
        job = train_job(cfg, model_cfg, mesh, args.batch_per_chip)
    elif args.job == "serve":
        job = serve_jobs(model_cfg, mesh, args.max_batch, args.max_model_len, args.crops, args.quantize,
                         args.kv_cache_dtype)
    else:
        from ..inference import cache_bucket, prompt_bucket
        crops = args.crops
        prompt_len = prompt_bucket(args.prompt_len)
        cache_len = cache_bucket(prompt_len + args.max_new_tokens)
        rows = args.batch
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if rows % shards:
            raise AOTError(f"--batch {rows} is not a multiple of the mesh's batch shards (data x fsdp = {shards})")
        make = prefill_job if args.job == "prefill" else decode_job
        job = make(model_cfg, mesh, rows, prompt_len, crops, cache_len, args.quantize, args.kv_cache_dtype)
    return job, mesh, chip, model_cfg


def _num(x, spec: str) -> str:
    """x formatted, or "n/a" for a figure that does not apply (a program without model FLOPs)."""
    return "n/a" if x is None else format(x, spec)


def format_result(r: dict) -> str:
    """The per-device figures as text."""
    G = lambda b: f"{b / GiB:8.3f} GiB"
    m, f, t = r["memory"], r["flops"], r["time"]
    lines = [
        f"{r['job']} on {r['topology']} ({r['devices']} x {r['chip']}), mesh {r['mesh']}, "
        f"remat={r['model']['remat_policy']}, attention={r['model']['attention_impl']}, {r['static']}",
        f"  per device:  argument {G(m['argument'])}   output {G(m['output'])}   temp {G(m['temp'])}   "
        f"alias {G(m['alias'])}",
        f"               peak     {G(m['peak'])}   of {m['hbm'] / GiB:.2f} GiB HBM "
        f"({100 * m['peak'] / m['hbm']:.0f}%){'' if m['fits'] else '  DOES NOT FIT'}",
        f"  FLOPs per {r['per']} per device: {f['compiled']:.4g} compiled (matmuls, every scan iteration; "
        f"{f['pallas']:.3g} in Pallas kernels), model {f['model']:.4g} (compiled/model "
        f"{_num(f['compiled_over_model'], '.3f')}); XLA cost analysis {f['xla_cost_analysis']:.4g} (loop bodies once)",
        f"  bytes accessed per device: {r['bytes_accessed']:.4g} (XLA, loop bodies once)"
        + (f"; {r['bytes_for_bandwidth_bound']:.4g} read per step (decoder weights + KV cache)"
           if r['bytes_for_bandwidth_bound'] != r['bytes_accessed'] else ""),
        f"  at peak ({r['chip_spec']['peak_flops'] / 1e12:.0f} TFLOP/s, {r['chip_spec']['hbm_bandwidth'] / 1e9:.0f} GB/s): "
        f"{r['per']} >= {t['step_lower_bound_s'] * 1e3:.2f} ms (compute {t['compute_bound_s'] * 1e3:.2f} ms, "
        f"memory {t['memory_bound_s'] * 1e3:.2f} ms), MFU <= {_num(t['mfu_upper_bound'], '.1%')}, "
        f"<= {_num(t['tokens_per_s_upper_bound'], ',.0f')} tokens/s",
        f"  compile {r['seconds']['compile']:.1f} s (lower {r['seconds']['lower']:.1f} s)",
    ]
    a = r.get("arithmetic", {})
    if "expected_argument_bytes_per_device" in a:
        lines.append(f"  argument bytes vs (params {a['param_bytes'] / GiB:.2f} GiB + optimizer state "
                     f"{a['opt_state_bytes'] / GiB:.2f} GiB) / {a['fsdp'] * a['tensor']} + batch: expected "
                     f"{a['expected_argument_bytes_per_device'] / GiB:.3f} GiB, ratio {a['argument_over_expected']:.4f}")
    return "\n".join(lines)


def save_json(r: dict, path: str | Path) -> None:
    """The result as JSON (keys starting with "_", such as the compiled program, left out)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=1, default=str) + "\n")


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of `jinavlm aot`."""
    p.add_argument("--topology", default="v5e:2x4", help="TPU topology, e.g. v5e:2x4, v5p:2x2x1, v5e:16x16")
    p.add_argument("--num-slices", type=int, default=1, help="slices of that topology (stacked on the data axis)")
    p.add_argument("--mesh", help="data=..,fsdp=..,tensor=.. (default: data=<slices>, fsdp=the rest)")
    p.add_argument("--job", choices=("train", "prefill", "decode", "serve"), default="train",
                   help="serve: the serving engine's programs (encode, prefill, insert, generate) for --max-batch "
                        "decode slots of --max-model-len tokens")
    p.add_argument("--config", metavar="YAML", help="training recipe (configs/*.yaml); its model section is used "
                   "for prefill / decode too (default: the 2.48B model, bf16 compute, one trained group)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe overrides after the options, e.g. model.remat_policy=full model.attention_impl=splash")
    p.add_argument("--batch-per-chip", type=int, help="train: rows per chip on the batch axes (sets data.batch_size)")
    p.add_argument("--batch", type=int, default=32, help="prefill/decode: prompts in the batch (default 32)")
    p.add_argument("--prompt-len", type=int, default=1808, help="prefill/decode: prompt tokens before bucketing "
                   "(default 1808: one 12-tile image = 1744 tokens + 64 of text -> bucket 2048)")
    p.add_argument("--crops", type=int, default=13, help="prefill/decode: crops per prompt (default 13)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="prefill/decode: sizes the KV cache")
    p.add_argument("--max-batch", type=int, default=32, help="serve: decode slots (default 32)")
    p.add_argument("--max-model-len", type=int, default=4096, help="serve: tokens per slot (default 4096)")
    p.add_argument("--quantize", choices=("int8", "int8+vision"), help="prefill/decode/serve: int8 weight-only "
                   "decoder (Qwix, `adapt.quant`; +vision: the vision tower too); train: use a recipe's lora: section")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="prefill/decode/serve: the KV cache in the compute dtype (auto) or int8 with a float32 "
                        "scale per token (half of bf16)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--allow-oversize", action="store_true", help="report a program that exceeds HBM instead of failing")


def run(args: argparse.Namespace) -> int:
    """`jinavlm aot`: compile, print the per-device figures, optionally write JSON.

    A program that does not fit raises DoesNotFit (one line naming the chip, the memory needed and
    what to change); with --json the message is written there too.
    """
    if "jax" not in sys.modules:  # AOT never runs on the local accelerator: skip probing for one
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    job, mesh, chip, model_cfg = plan(args)
    jobs = job if isinstance(job, list) else [job]
    print(f"compiling the {', '.join(j.kind for j in jobs)} program(s) for {args.topology} x {args.num_slices} "
          f"slice(s) ({mesh.size} compile-only devices, mesh {dict(mesh.shape)}) ...", file=sys.stderr, flush=True)
    argv = getattr(args, "argv", None)
    command = "jinavlm aot " + " ".join(argv) if argv is not None else "jinavlm " + " ".join(sys.argv[1:])
    results = []
    for j in jobs:
        try:
            r = compile_job(j, mesh, chip, args.topology, model_cfg, allow_oversize=args.allow_oversize)
        except DoesNotFit as e:
            if args.json:
                save_json({"topology": args.topology, "chip": chip.name, "devices": mesh.size, "mesh": dict(mesh.shape),
                           "job": j.kind, "static": j.static, "command": command, "error": str(e),
                           "flops": getattr(e, "flops", None), "arithmetic": j.arithmetic,
                           "model": {"remat_policy": model_cfg.remat_policy, "attention_impl": model_cfg.attention_impl,
                                     "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype}}, args.json)
            raise
        r["command"] = command
        print(format_result(r))
        results.append(r)
    out = results[0] if len(results) == 1 else serving_summary(results, chip)
    if len(results) > 1:
        print(format_serving(out))
    if args.json:
        save_json(out, args.json)
    return 0


def serving_summary(results: list[dict], chip) -> dict:
    """The server's HBM per chip from its programs: every param and the decode state stay resident;
    each program adds its temporaries and outputs that do not alias an input (a program's own argument
    bytes leave out params it does not read, so they are not used for the resident part)."""
    by = {r["job"]: r for r in results}
    gen = by["serve:generate"]
    resident = gen["arithmetic"]["resident_bytes_per_device"]
    state = gen["arithmetic"]["state_bytes_per_device"]
    peak = resident + max(r["memory"]["temp"] + r["memory"]["output"] - r["memory"]["alias"] for r in results)
    return {"job": "serve", "topology": gen["topology"], "chip": gen["chip"], "devices": gen["devices"],
            "mesh": gen["mesh"], "static": gen["static"], "command": gen["command"],
            "resident_bytes_per_device": resident, "kv_state_bytes_per_device": state,
            "peak_bytes_per_device": peak, "hbm": chip.hbm_bytes, "fits": peak <= chip.hbm_bytes,
            "programs": {k: {kk: v for kk, v in r.items() if not kk.startswith("_")} for k, r in by.items()}}


def format_serving(s: dict) -> str:
    G = lambda b: f"{b / GiB:.3f} GiB"
    return (f"serving on {s['topology']} ({s['devices']} x {s['chip']}), {s['static']}: per chip, resident "
            f"{G(s['resident_bytes_per_device'])} (params + decode state; state {G(s['kv_state_bytes_per_device'])}), "
            f"peak {G(s['peak_bytes_per_device'])} of {s['hbm'] / GiB:.2f} GiB HBM"
            f"{'' if s['fits'] else '  DOES NOT FIT'}")


# key=value overrides may follow options: intermixed parsing.
COMMAND = Command("aot", HELP + " (needs the [tpu] extra)", configure, run, intermixed=True, description=HELP)


def main(argv: list[str] | None = None) -> int:
    """`python -m jinavlm_jax.tpu ...`: the same as `jinavlm aot ...`."""
    return run_cli(COMMAND, argv, "jinavlm aot")
