"""docs/tpu.md: compile every case of the TPU report with `jinavlm aot` and render the Markdown.

    python benchmarks/tpu_report.py --report docs/tpu.md [--results DIR] [--only ID ...] [--force]
    python -m jinavlm_jax.aot --report docs/tpu.md          # the same

Each case is one `jinavlm aot ... --json docs/tpu/<id>.json` run in a subprocess (cases that already
have JSON are kept unless named with --only or --force); the Markdown is rendered from the JSONs.
Needs libtpu (the `[tpu]` extra), no TPU.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jinavlm_jax.flops import CHIPS, GiB, remat_recompute_flops  # noqa: E402
from jinavlm_jax.tpu import load_recipe  # noqa: E402
from jinavlm_jax.tpu.cli import configure  # noqa: E402

RECIPE = "configs/stage2_instruct.yaml"
# The recipe as it is (seq 4096, 13 crops per row, bf16 compute, f32 master weights, chunked loss), one
# row per chip; inference in bf16 params.
STAGE2 = ["--config", RECIPE]
INFER = ["--config", RECIPE, "model.param_dtype=bfloat16"]


def _case(topology: str, mesh: str, job: str, *extra: str, slices: int = 1) -> list[str]:
    argv = ["--topology", topology, "--mesh", mesh, "--job", job]
    if slices > 1:
        argv += ["--num-slices", str(slices)]
    if job == "train":
        return argv + ["--batch-per-chip", "1", *STAGE2, *extra]
    if job == "serve":
        return argv + ["--max-batch", "32", "--max-model-len", "4096", *INFER, *extra]
    return argv + ["--batch", "32", *INFER, *extra]  # INFER ends with an override: extras follow it


# (id, section, argv): the programs of docs/tpu.md, compiled in this order. Sections: train, remat,
# infer, fit.
REPORT_CASES: list[tuple[str, str, list[str]]] = [
    ("train-v5e-2x4", "train", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train", "model.remat_policy=full")),
    ("train-v5p-2x2x1", "train", _case("v5p:2x2x1", "data=1,fsdp=4,tensor=1", "train",
                                                        "model.remat_policy=dots_with_no_batch_dims_saveable")),
    ("prefill-v5e-2x2-tp4", "infer", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "prefill")),
    ("decode-v5e-2x2-tp4", "infer", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "decode")),
    ("prefill-v5e-2x2-tp4-splash", "infer", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "prefill",
                                                  "model.attention_impl=splash")),
    ("serve-v5e-2x2-tp4", "serve", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "serve")),
    ("fit-fsdp1-v5e", "fit", _case("v5e:2x4", "data=8,fsdp=1,tensor=1", "train", "model.remat_policy=none")),
    ("remat-none-v5e-2x4", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train", "model.remat_policy=none")),
    ("remat-none-v5p-2x2x1", "remat", _case("v5p:2x2x1", "data=1,fsdp=4,tensor=1", "train",
                                            "model.remat_policy=none")),
    ("remat-dots-no-batch-v5e-2x4", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train",
                                                   "model.remat_policy=dots_with_no_batch_dims_saveable")),
    ("remat-dots-v5e-2x4", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train",
                                          "model.remat_policy=dots_saveable")),
    ("train-v5e-16x16-2slices", "train", _case("v5e:16x16", "data=32,fsdp=16,tensor=1", "train",
                                               "model.remat_policy=full", slices=2)),
    # Splash attention in training (the train step passes text.SegmentMask(segment_ids) to the kernel).
    ("train-v5e-2x4-splash", "train", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train", "model.remat_policy=full",
                                            "model.attention_impl=splash")),
    ("remat-dots-no-batch-v5e-2x4-splash", "remat", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train",
                                                          "model.remat_policy=dots_with_no_batch_dims_saveable",
                                                          "model.attention_impl=splash")),
    ("remat-none-v5p-2x2x1-splash", "remat", _case("v5p:2x2x1", "data=1,fsdp=4,tensor=1", "train",
                                                   "model.remat_policy=none", "model.attention_impl=splash")),
    # Adapt and shrink (issue 12): int8 weight-only inference (Qwix) and the LoRA train step.
    ("decode-v5e-2x2-tp4-int8", "adapt", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "decode", "--quantize", "int8")),
    ("decode-v5e-2x2-tp4-int8-kv8", "adapt", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "decode", "--quantize", "int8",
                                                   "--kv-cache-dtype", "int8")),
    ("prefill-v5e-2x2-tp4-int8", "adapt", _case("v5e:2x2", "data=1,fsdp=1,tensor=4", "prefill", "--quantize", "int8")),
    ("train-v5e-2x4-lora", "adapt", _case("v5e:2x4", "data=1,fsdp=8,tensor=1", "train", "model.remat_policy=full",
                                          "lora.rank=16", "lora.base_dtype=bfloat16")),
]


def _fmt_case(r: dict) -> dict:
    """One table row's cells from a result JSON."""
    G = lambda b: f"{b / GiB:.2f}"
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    row = {"topology": f"{r['topology']}{' x2 slices' if '--num-slices' in r.get('command', '') else ''} "
                       f"({r['devices']} chips)", "mesh": mesh,
           "remat": r["model"]["remat_policy"] if r.get("job") == "train" else "n/a",
           "attention": r["model"]["attention_impl"]}
    if "error" in r:
        m = re.search(r"needs (?:at least )?([\d.]+ GiB|more than that)", r["error"])
        f = r.get("flops") or {}
        row.update(peak=f"does not fit: needs {m.group(1) if m else '?'} of {CHIPS[r['chip']].hbm_bytes / GiB:.2f}",
                   argument="-", temp="-", mfu="-", step="-", compile="-",
                   flops=f"{f['compiled'] / 1e12:.2f}" if f else "-", model=f"{f['model'] / 1e12:.2f}" if f else "-",
                   ratio=f"{f['compiled_over_model']:.3f}" if f else "-")
        return row
    m, f, t = r["memory"], r["flops"], r["time"]
    row.update(peak=f"{G(m['peak'])} / {G(m['hbm'])}{'' if m['fits'] else ' (over)'}", argument=G(m["argument"]),
               temp=G(m["temp"]), flops=f"{f['compiled'] / 1e12:.2f}", model=f"{f['model'] / 1e12:.2f}",
               ratio=f"{f['compiled_over_model']:.3f}",
               mfu=f"{100 * t['mfu_upper_bound']:.{0 if t['mfu_upper_bound'] > 0.1 else 1}f}%",
               step=f"{t['step_lower_bound_s'] * 1e3:.1f} ms", compile=f"{r['seconds']['compile']:.0f} s")
    return row


COMPILE_TIME = "### Compile time"


def kept_section(old: str, heading: str = COMPILE_TIME) -> str:
    """The hand-written section under `heading` in an earlier report (up to the next heading), or ""."""
    if heading not in old:
        return ""
    body = old[old.index(heading):]
    ends = [i for i in (body.find("\n## ", 1), body.find("\n### ", 1)) if i > 0]
    return body[:min(ends)].strip() + "\n" if ends else body.strip() + "\n"


def render_report(results: dict[str, dict], compile_time: str = "") -> str:
    """docs/tpu.md from the result JSONs (keyed by case id); `compile_time`: the hand-written
    "### Compile time" section (measurements and what was tried), kept after the training table."""
    out = ["# jina-vlm on TPU: compiled, not hoped", "",
           "<!-- Generated by `python -m jinavlm_jax.aot --report docs/tpu.md` (benchmarks/tpu_report.py); do not edit "
           "by hand. Per-program figures: docs/tpu/*.json. -->", "",
           "Every figure below comes from XLA:TPU compiling the project's real programs for a TPU topology on a "
           "host without TPUs (libtpu's compile-only devices; `pip install 'jinavlm-jax[tpu]'`): the train step of "
           "`train.step.make_steps` (forward, backward, AdamW update, state donated), the prefill and the decode "
           "loop of `generate`, on abstract full-size params and optimizer state (`jax.eval_shape`, nothing "
           "materialised). Reproduce one row with the command in its JSON, e.g. `jinavlm aot --topology v5e:2x4 "
           "--mesh data=1,fsdp=8,tensor=1 --job train --batch-per-chip 1 model.remat_policy=full ...`.", "",
           "## Chips", "",
           "| chip | usable HBM per chip | peak bf16 per chip | HBM bandwidth |", "|---|---|---|---|"]
    for c in CHIPS.values():
        out.append(f"| {c.name} (`{c.device_kind}`) | {c.hbm_bytes / GiB:.2f} GiB | {c.peak_flops / 1e12:.0f} TFLOP/s "
                   f"| {c.hbm_bandwidth / 1e9:.0f} GB/s |")
    out += ["", "Sources: Cloud TPU system-architecture pages (v4, v5e, v5p, v6e: HBM capacity, bf16 peak, HBM "
            "bandwidth per chip). Assumption: v5e's usable HBM is 15.75 GiB of its 16 GiB (libtpu reserves the "
            "rest); for the other chips the full capacity is used as the limit. XLA:TPU itself refuses a program "
            "that exceeds the chip's HBM at compile time; that case is reported as 'does not fit'.", ""]
    cols = [("topology", "topology"), ("mesh", "mesh"), ("remat", "remat"), ("attention", "attention"),
            ("peak", "peak / HBM per chip (GiB)"), ("argument", "arguments (GiB)"), ("temp", "temporaries (GiB)"),
            ("flops", "TFLOP per chip (compiled)"), ("model", "TFLOP per chip (model)"), ("ratio", "compiled / model"),
            ("mfu", "MFU bound"), ("step", "step >="), ("compile", "compile")]

    def table(ids):
        rows = [_fmt_case(results[i]) | {"id": i} for i in ids if i in results]
        lines = ["| case | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| " + " | ".join([r["id"]] + [r[k] for k, _ in cols]) + " |" for r in rows]
        return lines

    sec = lambda s: [i for i, section, _ in REPORT_CASES if section == s]
    out += ["## Stage-2 training of the full 2.48B model", "",
            f"The recipe `{RECIPE}` as it is -- one 12-tile image per sample (13 crops x 729 patches, bf16 crops), "
            "sequence 4096, bf16 compute, float32 master weights and AdamW moments, all three parameter groups "
            "trained, the chunked loss (1024 positions per chunk) -- with batch 1 per chip (`--batch-per-chip 1`) "
            "and the mesh and remat policy of each row.", ""]
    out += table(sec("train")) + [""]
    if compile_time:
        out += compile_time.rstrip("\n").split("\n") + [""]
    out += ["## Remat policies: memory each gives", "",
            "`model.remat_policy` applies to both towers (`nn.remat` around the scanned layer). `full` saves only "
            "the layer inputs, `dots_with_no_batch_dims_saveable` also the weight matmuls' outputs (not the "
            "attention einsums), `dots_saveable` every matmul output including the attention scores, `none` "
            "everything.", ""]
    out += table(["train-v5e-2x4", "train-v5p-2x2x1"] + sec("remat")) + [""]
    out += ["XLA attention materialises the [heads, L, L] scores of a layer (1 GiB in float32 at L = 4096): "
            "`none` and `dots_saveable` keep them for all 28 layers, which is what does not fit. The splash "
            "kernel never materialises them (rows with attention `splash`, where compiled).", ""]
    dec = results.get("decode-v5e-2x2-tp4", {}).get("static", {})
    out += ["## Inference: a batch of 32 one-image prompts on v5e:2x2, tensor parallel", "",
            f"The model section of `{RECIPE}` with bf16 params (`model.param_dtype=bfloat16`) and KV cache; prompt "
            f"bucket {dec.get('prompt_len', 2048)} (one 12-tile image = 1,744 tokens + text), 13 crops per prompt, KV "
            f"cache {dec.get('cache_len', '?')} slots (prompt + 256 new tokens, `inference.cache_bucket`: the smaller "
            "of the next power of two and the next multiple of 128). Prefill: one call. Decode: "
            "the `lax.while_loop` program; its FLOPs and bytes are one loop body = one token for all 32 rows.", ""]
    out += table(sec("infer")) + [""]
    out += _serving(results)
    out += _adapt(results)
    if any(i in results for i in sec("fit")):
        out += ["## A configuration that cannot fit", "", "`jinavlm aot` ends with one line instead of a traceback:", ""]
        for i in sec("fit"):
            if i in results:
                r = results[i]
                out += ["```", f"$ {r.get('command', '')}", f"jinavlm aot: error: {r.get('error', 'it fits')}", "```", ""]
    out += _splash_notes(results)
    out += _recommend(results)
    out += _acceptance(results)
    out += _method()
    return "\n".join(out) + "\n"


def _serving(results: dict) -> list[str]:
    """The serving engine's programs (`jinavlm aot --job serve`) and the HBM a server needs per chip."""
    r = results.get("serve-v5e-2x2-tp4")
    if r is None or "programs" not in r:
        return []
    G = lambda b: f"{b / GiB:.2f}"
    out = ["## Serving: `jinavlm serve` with 32 decode slots of 4096 tokens on v5e:2x2, tensor parallel", "",
           f"The engine's programs (`inference/engine.py`) for the model section of `{RECIPE}` with bf16 params and "
           "KV cache: `encode` (one 13-crop image -> connector features), `prefill` (a 4096-token prompt -> its "
           "K/V and first token), `insert` (the prefix into a slot of the decode state) and `generate` (all 32 "
           "slots one token). A server keeps the params and the decode state resident (the arguments of "
           "`generate`); `encode` and `prefill` run beside the state.", "",
           "| program | arguments (GiB) | temporaries (GiB) | peak (GiB) | compile |", "|---|---|---|---|---|"]
    for name, p in r["programs"].items():
        m = p["memory"]
        out.append(f"| {name} | {G(m['argument'])} | {G(m['temp'])} | {G(m['peak'])} | {p['seconds']['compile']:.0f} s |")
    out += ["", f"Per chip: resident {G(r['resident_bytes_per_device'])} GiB (params + decode state; the state alone "
            f"{G(r['kv_state_bytes_per_device'])} GiB), peak {G(r['peak_bytes_per_device'])} GiB of "
            f"{r['hbm'] / GiB:.2f} GiB HBM{'' if r['fits'] else ': does not fit'}.", ""]
    return out


def _adapt(results: dict) -> list[str]:
    """int8 weight-only decode / prefill against bf16, and the LoRA train step against full fine-tuning."""
    ids = [i for i, section, _ in REPORT_CASES if section == "adapt"]
    if not any(i in results for i in ids):
        return []
    G = lambda b: b / GiB
    out = ["## Adapt and shrink: int8 weights and LoRA", "",
           "int8: `--quantize int8` (Qwix weight-only: the decoder projections and LM head int8 with per-channel "
           "scales, dequantized inside the matmul; embeddings, norms and the vision tower bf16), the same "
           "inference programs and shapes as above. LoRA: the stage-2 train step with `lora.rank=16` "
           "(adapters on the decoder's q/k/v/out/up/gate/down, frozen bf16 base, AdamW state for the adapters "
           "only), the mesh and remat of `train-v5e-2x4`. int8 KV cache: `--kv-cache-dtype int8` (int8 codes "
           "with a float32 scale per cached token, `model.layers.QuantizedKV`) on top of int8 weights.", ""]
    pairs = [("decode-v5e-2x2-tp4-int8", "decode-v5e-2x2-tp4"), ("decode-v5e-2x2-tp4-int8-kv8", "decode-v5e-2x2-tp4"),
             ("prefill-v5e-2x2-tp4-int8", "prefill-v5e-2x2-tp4"),
             ("train-v5e-2x4-lora", "train-v5e-2x4")]
    out += ["| case | against | peak per chip (GiB) | arguments (GiB) | temporaries (GiB) | arguments ratio | "
            "peak ratio | optimizer state (all chips) |", "|---|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        ra, rb = results.get(a), results.get(b)
        if not ra or not rb or "error" in ra or "error" in rb:
            continue
        ma, mb = ra["memory"], rb["memory"]
        opt = ra.get("arithmetic", {}).get("opt_state_bytes")
        opt_b = rb.get("arithmetic", {}).get("opt_state_bytes")
        out.append(f"| {a} | {b} | {G(ma['peak']):.2f} vs {G(mb['peak']):.2f} | {G(ma['argument']):.2f} vs "
                   f"{G(mb['argument']):.2f} | {G(ma['temp']):.2f} vs {G(mb['temp']):.2f} | "
                   f"{ma['argument'] / mb['argument']:.3f} | {ma['peak'] / mb['peak']:.3f} | "
                   + (f"{G(opt):.3f} vs {G(opt_b):.2f} GiB" if opt is not None and opt_b is not None else "-") + " |")
    d = results.get("decode-v5e-2x2-tp4-int8")
    if d and "error" not in d:
        a = d["arithmetic"]
        kv = a["kv_cache_bytes"] / a["tensor"]   # the KV heads split over tensor
        b = results.get("decode-v5e-2x2-tp4")
        wa = d["memory"]["argument"] - kv
        wb = b["memory"]["argument"] - kv if b and "error" not in b else None
        out += ["", f"The decode program's arguments are the params it reads and the bf16 KV cache of 32 x "
                f"{d['static']['cache_len']} slots "
                f"({G(kv):.2f} GiB per chip), which int8 weights do not shrink. Without the cache: "
                + (f"{G(wa):.2f} GiB (int8) against {G(wb):.2f} GiB (bf16) per chip, {wa / wb:.2f}x; " if wb else "")
                + "the embedding tables (a gather, not a matmul) stay bf16."]
    k = results.get("decode-v5e-2x2-tp4-int8-kv8")
    if k and "error" not in k and d and "error" not in d:
        a = k["arithmetic"]
        kv8 = a["kv_cache_bytes"] / a["tensor"]
        out += ["", f"With the KV cache in int8 as well (`--quantize int8 --kv-cache-dtype int8`) the same cache "
                f"takes {G(kv8):.2f} GiB per chip (codes + one float32 scale per token and layer) and the decode "
                f"program's arguments are {G(k['memory']['argument']):.2f} GiB against "
                f"{G(b['memory']['argument']):.2f} GiB for bf16 ({k['memory']['argument'] / b['memory']['argument']:.2f}x); "
                "what it costs in accuracy: README, \"Adapt and shrink\"."]
    return out + [""]


def _splash_notes(results: dict) -> list[str]:
    a, b = results.get("prefill-v5e-2x2-tp4"), results.get("prefill-v5e-2x2-tp4-splash")
    out = ["## Splash attention", "",
           "`model.attention_impl=splash` runs the self-attention of both towers in the Pallas splash kernel "
           "(`jinavlm_jax/model/splash.py`): causal + segment ids (padding, packed samples) in the decoder, a "
           "full mask over the 729 patches (padded to 768) in the ViT, per-shard under `shard_map` (batch over "
           "data x fsdp, heads over tensor). A decode step over the KV cache keeps the XLA path."]
    if a and b and "error" not in a and "error" not in b:
        out += ["", f"It compiles for TPU in the whole prefill program above: peak {b['memory']['peak'] / GiB:.2f} GiB "
                f"against {a['memory']['peak'] / GiB:.2f} GiB with XLA attention, temporaries "
                f"{b['memory']['temp'] / GiB:.2f} against {a['memory']['temp'] / GiB:.2f} GiB."]
    train = [i for i, section, argv in REPORT_CASES if "model.attention_impl=splash" in argv and section != "infer"]
    missing = [i for i in train if i not in results]
    if missing:
        out += ["", "The train step passes the batch's segment ids to the decoder (`text.SegmentMask`), so splash "
                "works in training too (checked against XLA in interpret mode by the tests). Not compiled for this "
                "report yet: " + ", ".join(f"`{i}`" for i in missing) + " (`--report docs/tpu.md --only ID` "
                "compiles one)."]
    return out + [""]


def recommendations(results: dict) -> dict[str, dict]:
    """Per topology: the compiled training configuration with the best MFU bound whose peak leaves
    10% of HBM free (for fragmentation and what the compiler does not see)."""
    best: dict[str, dict] = {}
    for i, r in results.items():
        if r.get("job") != "train" or "error" in r or r["memory"]["peak"] > 0.9 * r["memory"]["hbm"] \
                or "lora_rank" in r.get("static", {}):   # a LoRA step is another workload (its FLOPs too)
            continue
        key = r["topology"] + (" x2 slices" if "--num-slices" in r.get("command", "") else "")
        if key not in best or r["time"]["mfu_upper_bound"] > best[key]["time"]["mfu_upper_bound"]:
            best[key] = r | {"id": i}
    return best


def _recommend(results: dict) -> list[str]:
    best = recommendations(results)
    if not best:
        return []
    out = ["## Recommended defaults", "",
           "Per topology, the compiled configuration with the best MFU bound that leaves 10% of HBM free "
           "(remat recomputation costs step time, so the least remat that fits wins):", ""]
    for topo, r in best.items():
        m, model = r["mesh"], r["model"]
        fields = {"remat_policy": model["remat_policy"], "attention_impl": model["attention_impl"]}
        out += [f"* **{topo}** ({r['id']}): `--mesh data={m['data']},fsdp={m['fsdp']},tensor={m['tensor']}`, "
                + ", ".join(f"`model.{k}={v}`" for k, v in fields.items())
                + f", peak {r['memory']['peak'] / GiB:.2f} of {r['memory']['hbm'] / GiB:.2f} GiB, "
                f"MFU <= {100 * r['time']['mfu_upper_bound']:.0f}%. Recipe lines:",
                "", "  ```yaml", f"  mesh: {{data: {m['data']}, fsdp: {m['fsdp']}, tensor: {m['tensor']}}}",
                "  model: {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}", "  ```", ""]
    return out


def _acceptance(results: dict) -> list[str]:
    out = ["## Checks", "", "Argument bytes per chip against the arithmetic (params + AdamW state) / (fsdp x tensor) "
           "+ batch rows / (data x fsdp):", "",
           "| case | params | param bytes | optimizer state | expected per chip | exact shards per chip | compiled "
           "argument | ratio to expected |",
           "|---|---|---|---|---|---|---|---|"]
    for i, r in results.items():
        a = r.get("arithmetic", {})
        if "error" in r or "expected_argument_bytes_per_device" not in a:
            continue
        out.append(f"| {i} | {a['params'] / 1e9:.3f} B | {a['param_bytes'] / GiB:.2f} GiB | {a['opt_state_bytes'] / GiB:.2f} GiB "
                   f"| {a['expected_argument_bytes_per_device'] / GiB:.3f} GiB "
                   f"| {a.get('sharded_bytes_per_device', 0) / GiB:.3f} GiB | {r['memory']['argument'] / GiB:.3f} GiB "
                   f"| {a['argument_over_expected']:.4f} |")
    out += ["", "'Exact shards' sums the shard shapes of every state and batch leaf (leaves a mesh axis does not "
            "divide stay replicated): it equals the arithmetic to within 0.1%. The rest of the gap is XLA:TPU's "
            "memory layout, which pads arrays to (8, 128) tiles -- mostly the ViT and pooling head_dim of 72 "
            "stored in 128 lanes (q/k/v kernels and their AdamW moments)."]
    out += ["", "Compiled FLOPs against the formula (per chip per step). The model formula counts no "
            "recomputation; the compiled program also reruns what the remat policy did not save, so the formula "
            "+ recompute column adds that (`remat_recompute_flops`: `full` reruns the forward of both towers' "
            "layers, `dots_with_no_batch_dims_saveable` their attention einsums, `none` / `dots_saveable` no "
            "matmul) and is what the compiled count is checked against:", "",
            "| case | remat | compiled TFLOP | model TFLOP (formula) | compiled / model | formula + recompute TFLOP "
            "| compiled / (formula + recompute) | XLA raw (loop bodies once) |",
            "|---|---|---|---|---|---|---|---|"]
    for i, r in results.items():
        f = r.get("flops")
        if not f:
            continue
        xla = f"{f['xla_cost_analysis'] / 1e12:.2f}" if "xla_cost_analysis" in f else "(not compiled: does not fit)"
        if r.get("job") == "train":
            remat = r["model"]["remat_policy"]
            with_recompute = f["model"] + _recompute_per_device(r)
            rc = f"{with_recompute / 1e12:.2f} | {f['compiled'] / with_recompute:.3f}"
        else:
            remat, rc = f"n/a ({r.get('job')})", "- | -"
        out.append(f"| {i} | {remat} | {f['compiled'] / 1e12:.2f} | {f['model'] / 1e12:.2f} | "
                   f"{f['compiled_over_model']:.3f} | {rc} | {xla} |")
    out += ["", "A decode step's compiled count is below the formula by the attention over the cache: a single "
            "query attends as multiply-and-sum loops over the cache in its own layout (`layers._attention_one_query`, "
            "no `dot_general`, so the counter does not see it), while the formula counts those 2 x 2 x slots x "
            "heads x head_dim FLOPs per layer and row."]
    return out + [""]


def _recompute_per_device(r: dict) -> float:
    """`remat_recompute_flops` of a train case's JSON, per device (the recipe is re-read from its command)."""
    p = argparse.ArgumentParser()
    configure(p)
    a = p.parse_intermixed_args(shlex.split(r["command"])[2:])       # drop "jinavlm aot"
    _, model_cfg = load_recipe(a.config, a.overrides)
    s = r["static"]
    return remat_recompute_flops(model_cfg, r["model"]["remat_policy"], rows=s["rows"], seq_len=s["seq_len"],
                                 crops=s["crops_per_row"], train_vision=s["vision_trained"]) / r["devices"]


def _method() -> list[str]:
    return ["## How the figures are made", "",
            "* **Memory** is `compiled.memory_analysis()` per device: arguments (params, optimizer state, batch "
            "shards), outputs (aliased with the donated state for training), temporaries, and XLA's peak.",
            "* **FLOPs (compiled)**: XLA's `cost_analysis()` counts a loop body once: our scanned layers (28 text, "
            "25 ViT), the chunked loss (4 chunks), and also the collective-matmul loops XLA:TPU makes of FSDP "
            "matmuls (the weight all-gather overlapped with the compute); it sees nothing inside Pallas kernels. "
            "So we *scale* rather than unroll (an unrolled full-size step takes far longer to compile): the jaxpr "
            "of the very program that is compiled is walked, counting 2*M*N*K per `dot_general` (what remat "
            "recomputes included), each scan body times its length and each Pallas kernel body times its grid "
            "(dense: the causal splash kernel skips the blocks above the diagonal, so its count is an upper "
            "bound); per chip = total / chips. Matmuls only (elementwise work is ~1-2%). XLA's own figure is "
            "kept in the JSON (`xla_cost_analysis`) and in the last column of the FLOPs check. Programs that do not fit are "
            "still traced, so their FLOPs are known.",
            "* **FLOPs (model)**, per step, all chips, divided by the chip count: training = 3 x forward; forward = "
            "2 x params x tokens + attention, where every weight matrix counts the tokens that pass through it "
            "(text layers + lm_head: every position of every row; ViT: the 25 blocks run x 729 patches x crops; "
            "pooling k/v: 4 window members, q/o/projector: once per 2x2 window), embeddings 0, and attention = "
            "2 matmuls x 2 x L^2 x heads x head_dim per layer (the full square). I.e. 6 x params x tokens + "
            "12 x layers x heads x head_dim x L^2 per sequence for each tower. No recomputation counted. The "
            "prefill is 1 x forward with the lm_head on the last position only; a decode step is 2 x params x "
            "rows plus attention over the whole cache.",
            "* **Step time** >= max(compiled FLOPs / peak, bytes / HBM bandwidth) per chip; **MFU bound** = "
            "model FLOPs / (peak x that time). Bytes: XLA's bytes accessed (loop bodies once, so optimistic) for "
            "training and prefill, which are compute-bound anyway; for a decode step, the bytes of the decoder "
            "weights + KV cache shards every step reads (XLA's figure for the decode program also holds one-time "
            "work outside the loop). Communication is not modelled, so real MFU is lower.", ""]


def main(argv: list[str] | None = None) -> int:
    """Compile the missing (or the named) cases, then write the report; see the module docstring."""
    p = argparse.ArgumentParser(prog="python benchmarks/tpu_report.py", description=__doc__.splitlines()[0])
    p.add_argument("--report", required=True, metavar="MD")
    p.add_argument("--results", metavar="DIR", help="per-case JSON (default: <report dir>/tpu)")
    p.add_argument("--only", nargs="*", help="case ids to (re)compile (default: the missing ones)")
    p.add_argument("--force", action="store_true", help="recompile cases that already have JSON")
    p.add_argument("--render-only", action="store_true", help="only render the Markdown from existing JSON")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    results_dir = Path(a.results) if a.results else Path(a.report).parent / "tpu"
    for cid, _, case_argv in REPORT_CASES:
        path = results_dir / f"{cid}.json"
        if a.render_only or (a.only and cid not in a.only) or (path.exists() and not a.force and not a.only):
            continue
        print(f"[aot report] {cid}: jinavlm aot {' '.join(case_argv)}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "jinavlm_jax.tpu", *case_argv, "--json", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        print("\n".join(ln for ln in tail if "TPU_WORKER" not in ln and "libtpu" not in ln)[-3000:], file=sys.stderr)
    results = {}
    for cid, _, _ in REPORT_CASES:
        path = results_dir / f"{cid}.json"
        if path.exists():
            results[cid] = json.loads(path.read_text())
    old = Path(a.report).read_text() if Path(a.report).exists() else ""
    Path(a.report).write_text(render_report(results, kept_section(old)))
    print(f"wrote {a.report} ({len(results)} of {len(REPORT_CASES)} programs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
