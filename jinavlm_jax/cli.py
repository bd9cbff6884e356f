"""The `jinavlm` command line: a registry of subcommands.

    jinavlm generate --checkpoint DIR --image photo.jpg --prompt "Describe the image."
    jinavlm generate --checkpoint DIR --input prompts.jsonl --output answers.jsonl
    jinavlm chat --checkpoint DIR [--image photo.jpg]
    jinavlm convert hf-to-orbax SRC DST          # also: python -m convert ... (from the repo root)
    jinavlm train [RECIPE.yaml] [key=value ...]  # also: python train.py ...
    jinavlm aot --topology v5e:2x4 --job train ...
    jinavlm efficiency [--max-crops 12]

Checkpoints are jinavlm-jax Orbax directories or official Hugging Face directories (config.json +
safetensors). The tokenizer (tokenizer.json, preprocessor_config.json) is read from --tokenizer,
by default the checkpoint directory. Generated text goes to stdout (streamed as it is produced);
progress and errors go to stderr. Every subcommand shares one error path (`command.guarded`):
errors are one line, without a traceback, and exit with status 1.

Adding a subcommand: write `configure(parser)` and `run(args) -> int`, then
`register(Command("name", "one-line help", configure, run))` below the existing ones.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from .command import Command, run_cli
from .tpu import cli as aot_cli
from .train import cli as train_cli

COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a subcommand to `jinavlm` (names are unique)."""
    if command.name in COMMANDS:
        raise ValueError(f"subcommand {command.name!r} is already registered")
    COMMANDS[command.name] = command
    return command


class CLIError(ValueError):
    """A bad command-line request (printed without a traceback)."""


# ----------------------------------------------------------------------------------- loading

def load_model(checkpoint: str | Path, dtype: str | None = None, mesh=None, adapter: str | Path | None = None):
    """(config, params) from a jinavlm-jax Orbax checkpoint or an official Hugging Face directory
    (`checkpoint.load_any`), with the compute dtype set: `dtype` ("float32" / "bfloat16") casts the
    params and computes in it; None keeps the checkpoint's params and computes in float32.
    `adapter`: a LoRA adapter directory (training's OUTPUT_DIR/adapter), merged into the params.
    A quantized checkpoint (`python -m convert quantize`) gives `InferenceParams`."""
    from .checkpoint import load_any
    config, params = load_any(checkpoint, dtype=dtype, mesh=mesh)
    if adapter is not None:
        if not isinstance(params, dict):
            raise CLIError(f"--adapter: {checkpoint} holds quantized weights; merge the adapter into the float "
                           "checkpoint (python -m convert merge-lora), then quantize")
        from .adapt.lora import apply_adapter
        params = apply_adapter(config, params, adapter)
    return config.replace(dtype=dtype or "float32"), params


def _processor(args):
    from .processing import Processor
    tok_dir = Path(args.tokenizer or args.checkpoint)
    proc = Processor.from_dir(tok_dir)
    if args.max_crops is not None:
        proc = Processor.from_dir(tok_dir, config=proc.config.replace(max_crops=args.max_crops))
    return proc


def _sampling(args):
    from .generate import Sampling
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="jinavlm-jax Orbax checkpoint or official Hugging Face directory")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="directory with tokenizer.json and preprocessor_config.json (default: --checkpoint)")
    p.add_argument("--max-crops", type=int, metavar="N",
                   help="tiles per image (thumbnail not counted; default: the preprocessor config, 12): "
                        "fewer crops = lower resolution, faster")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="params and compute dtype (default float32: XLA:CPU runs bfloat16 matmuls slowly)")
    p.add_argument("--mesh", metavar="SPEC", help="e.g. data=2,fsdp=2,tensor=2 (default: one device)")
    adapt_args(p)


def adapt_args(p: argparse.ArgumentParser) -> None:
    """--quantize, --kv-cache-dtype and --adapter (generate, chat and serve)."""
    p.add_argument("--quantize", choices=("int8", "int8+vision"),
                   help="int8 weight-only inference (Qwix): decoder kernels int8 with per-channel scales, "
                        "activations in --dtype; int8+vision quantizes the vision tower too")
    p.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="the KV cache in --dtype (auto) or int8 with a float32 scale per token (half the "
                        "bytes of bf16: longer contexts or more slots in the same memory)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (a training run's OUTPUT_DIR/adapter), "
                   "merged into the checkpoint's weights at load time")


class _Session:
    """What every generating subcommand needs: processor, generator and settings."""

    def __init__(self, args):
        from .checkpoint import checkpoint_format
        from .generate import Generator
        from .sharding import mesh_from_spec
        self.args = args
        checkpoint_format(args.checkpoint)  # cheap checks first: fail before loading any weights
        self.processor = _processor(args)
        mesh = mesh_from_spec(args.mesh) if args.mesh else None
        config, params = load_model(args.checkpoint, args.dtype, mesh, args.adapter)
        self.generator = Generator(config, params, mesh, quantize=args.quantize, kv_cache_dtype=args.kv_cache_dtype)
        del params
        self.sampling = _sampling(args)

    def batch(self, prompts: list[str], images: list[list[str]]):
        return self.processor(prompts, images, padding_side="left")

    def run(self, prompts, images, stream: TextIO | None = None, seed=None):
        """Generate for prompt strings; with `stream`, row 0's text is written there as it grows."""
        on_token = _TextStream(self.processor, self.processor.stop_ids, stream) if stream else None
        out = self.generator.generate(
            self.batch(prompts, images), max_new_tokens=self.args.max_new_tokens, sampling=self.sampling,
            seed=self.args.seed if seed is None else seed, stop_ids=self.processor.stop_ids,
            tokenizer=self.processor, on_token=on_token)
        if on_token is not None:
            on_token.finish(out.texts[0])
        return out


class _TextStream:
    """Writes the growing text of row 0 (re-decoding the ids so multi-token characters come out whole)."""

    def __init__(self, processor, stop_ids, out: TextIO):
        self.processor, self.stop, self.out = processor, set(stop_ids), out
        self.ids: list[int] = []
        self.shown = ""
        self.ended = False

    def __call__(self, step: int, tokens) -> None:
        t = int(tokens[0])
        if self.ended or t < 0 or t in self.stop:
            self.ended = True
            return
        self.ids.append(t)
        text = self.processor.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self, final: str) -> None:
        self.out.write(final[len(self.shown):] + "\n")
        self.out.flush()


def _user_prompt(processor, text: str, n_images: int, raw: bool) -> str:
    if raw:
        return text
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}])


# ----------------------------------------------------------------------------------- generate

def _configure_generate(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    p.add_argument("--prompt", metavar="TEXT", help="the question / instruction")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as the model input as is (one <|image|> per image) instead of the "
                        "chat template")
    p.add_argument("--input", metavar="JSONL", help='batch mode: one {"prompt": ..., "images": [...]} per line')
    p.add_argument("--output", metavar="JSONL", help="batch mode: answers, one JSON object per input line")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="batch mode: prompts per batch")


def _run_generate(args) -> int:
    if args.input or args.output:
        if not (args.input and args.output):
            raise CLIError("--input and --output go together (batch mode)")
        if args.prompt or args.image:
            raise CLIError("batch mode takes prompts and images from --input; drop --prompt/--image")
        return _run_batch(args)
    if args.prompt is None:
        raise CLIError("give --prompt TEXT (or --input/--output for a batch)")
    if not args.prompt.strip():
        raise CLIError("empty prompt: --prompt needs some text")
    for path in args.image:
        if not Path(path).is_file():
            raise CLIError(f"{path}: image file not found")
    s = _Session(args)
    prompt = _user_prompt(s.processor, args.prompt, len(args.image), args.raw)
    out = s.run([prompt], [list(args.image)], stream=sys.stdout)
    if out.stop_reasons[0] == "length":
        print(f"[stopped after --max-new-tokens {args.max_new_tokens} tokens]", file=sys.stderr)
    return 0


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise CLIError(f'{path}:{n}: expected {{"prompt": "non-empty text", "images": [paths]}}')
            images = row.get("images", [])
            if isinstance(images, str):
                images = [images]
            base = Path(path).parent
            images = [str(p if Path(p).is_absolute() else base / p) for p in images]
            for p in images:
                if not Path(p).is_file():
                    raise CLIError(f"{path}:{n}: image {p} not found")
            rows.append({**row, "images": images, "line": n})
    if not rows:
        raise CLIError(f"{path}: no prompts")
    return rows


_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} prompts [{elapsed}<{remaining}, {rate_fmt}]"


def _run_batch(args) -> int:
    rows = _read_jsonl(args.input)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    from tqdm import tqdm
    s = _Session(args)
    out_path = Path(args.output)
    tmp = out_path.with_name(out_path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f, tqdm(total=len(rows), unit="prompt", file=sys.stderr,
                                                      desc="generate", bar_format=_BAR) as bar:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            prompts = [_user_prompt(s.processor, r["prompt"], len(r["images"]), args.raw) for r in chunk]
            # one seed per prompt, fixed by its position in the file: batching does not change answers
            seeds = [args.seed + start + i for i in range(len(chunk))]
            res = s.run(prompts, [r["images"] for r in chunk], seed=seeds)
            for r, text, toks, reason in zip(chunk, res.texts, res.tokens, res.stop_reasons):
                rec = {k: v for k, v in r.items() if k != "line"}
                rec.update(text=text, tokens=toks, stop_reason=reason)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    tmp.replace(out_path)
    return 0


# ----------------------------------------------------------------------------------- chat

def _configure_chat(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image(s) for the first question (more with /image PATH)")


def _run_chat(args, stdin: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    for path in args.image:
        if not Path(path).is_file():
            raise CLIError(f"{path}: image file not found")
    s = _Session(args)
    messages: list[dict] = []
    images: list[str] = []
    pending = list(args.image)
    print("jinavlm chat: type a question; /image PATH attaches an image to the next question, /reset "
          "starts over, /exit (or end of input) quits.", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages, images, pending = [], [], []
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            if not Path(path).is_file():
                print(f"jinavlm chat: error: {path or '(none)'}: image file not found", file=sys.stderr)
            else:
                pending.append(path)
            continue
        content = [{"type": "image"}] * len(pending) + [{"type": "text", "text": text}]
        turn = messages + [{"role": "user", "content": content}]
        turn_images = images + pending
        try:
            out = s.run([s.processor.apply_chat_template(turn)], [turn_images], stream=sys.stdout)
        except ValueError as e:  # e.g. the conversation outgrew the context: keep the session
            print(f"jinavlm chat: error: {e}", file=sys.stderr)
            continue
        messages = turn + [{"role": "assistant", "content": out.texts[0]}]
        images, pending = turn_images, []
    return 0


# ----------------------------------------------------------------------------------- efficiency

def _configure_efficiency(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-crops", type=int, default=12, metavar="N", help="tiles per image (default 12)")
    p.add_argument("--config", metavar="PATH", help="an official config.json (default: the released jina-vlm)")
    p.add_argument("--kv-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of the KV cache and compute (default bfloat16, the released checkpoint's)")


def _run_efficiency(args) -> int:
    from .efficiency import efficiency_report, format_report
    from .model import JinaVLMConfig
    config = JinaVLMConfig.from_hf(args.config) if args.config else JinaVLMConfig.jina_vlm_2_4b()
    print("compiling the prefill and vision programs on abstract shapes ...", file=sys.stderr, flush=True)
    report = efficiency_report(config, args.max_crops, args.kv_dtype)
    print(format_report(report, config))
    return 0


# ----------------------------------------------------------------------------------- convert

def _output_args(p: argparse.ArgumentParser, dtype_default: str | None, dtype_help: str, mesh: bool) -> None:
    """--dtype, --mesh (placing params while converting) and --overwrite of a conversion that writes."""
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=dtype_default, help=dtype_help)
    if mesh:
        p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: all devices on fsdp)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _configure_convert(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    h = sub.add_parser("hf-to-orbax", help="official jina-vlm safetensors directory -> Orbax checkpoint")
    h.add_argument("src", help="official directory: config.json + model.safetensors (or sharded index)")
    h.add_argument("dst", help="Orbax checkpoint directory to create")
    _output_args(h, None, "param dtype (default: the checkpoint's)", mesh=True)

    o = sub.add_parser("orbax-to-hf", help="Orbax checkpoint -> official sharded safetensors + config.json")
    o.add_argument("src", help="Orbax checkpoint directory")
    o.add_argument("dst", help="official directory to create")
    o.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    _output_args(o, None, "tensor dtype (default: the dtypes of the original source, else the params')", mesh=False)

    c = sub.add_parser("from-components", help="fresh jina-vlm from transformers SigLIP(2) + Qwen3 checkpoints")
    c.add_argument("--siglip2", required=True, metavar="DIR",
                   help="Siglip2VisionModel / SiglipVisionModel / SiglipModel safetensors directory")
    c.add_argument("--qwen3", required=True, metavar="DIR", help="Qwen3ForCausalLM safetensors directory")
    c.add_argument("dst", help="Orbax checkpoint directory to create")
    c.add_argument("--seed", type=int, default=0, help="connector / new embedding rows init seed")
    c.add_argument("--vit-layers", default="-4,-10",
                   help="ViT layers fed to the connector, indexing [block outputs..., post-norm] (default -4,-10)")
    _output_args(c, "float32", "param dtype", mesh=True)

    k = sub.add_parser("check-logits", help="compare two checkpoints (Orbax or official) on random inputs")
    k.add_argument("a", help="reference checkpoint")
    k.add_argument("b", help="checkpoint to compare")
    k.add_argument("--max-kl", type=float, default=1e-3, help="fail above this max per-position KL(A||B)")
    k.add_argument("--min-top5", type=float, default=0.0, help="fail below this mean top-5 overlap")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--crops", type=int, default=1)
    k.add_argument("--length", type=int, default=32, help="text tokens after the image tokens")

    q = sub.add_parser("quantize", help="float checkpoint -> int8 weight-only Orbax checkpoint (Qwix; loads "
                                        "without float kernels)")
    q.add_argument("src", help="float checkpoint (Orbax or official)")
    q.add_argument("dst", help="Orbax checkpoint directory to create")
    q.add_argument("--int8", action="store_true", required=True, help="int8 kernels, per-channel scales")
    q.add_argument("--vision", action="store_true", help="quantize the vision tower too (default: decoder only)")
    _output_args(q, None, "dtype of the params left float (default: the checkpoint's)", mesh=False)

    m = sub.add_parser("merge-lora", help="base checkpoint + LoRA adapter -> a normal Orbax checkpoint")
    m.add_argument("base", help="the base checkpoint the adapter was trained on (Orbax or official)")
    m.add_argument("adapter", help="adapter directory (a training run's OUTPUT_DIR/adapter)")
    m.add_argument("out", help="Orbax checkpoint directory to create")
    _output_args(m, None, "param dtype (default: the base checkpoint's)", mesh=False)


def _run_convert(args) -> int:
    from . import convert as C  # after parsing, so --help does not start JAX
    if args.operation == "hf-to-orbax":
        print(C.hf_to_orbax(args.src, args.dst, dtype=args.dtype, mesh=args.mesh, overwrite=args.overwrite))
    elif args.operation == "orbax-to-hf":
        print(C.orbax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                            overwrite=args.overwrite))
    elif args.operation == "quantize":
        print(C.quantize_checkpoint(args.src, args.dst, vision=args.vision, dtype=args.dtype,
                                    overwrite=args.overwrite))
    elif args.operation == "merge-lora":
        print(C.merge_lora(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite))
    elif args.operation == "from-components":
        layers = tuple(int(x) for x in args.vit_layers.split(","))
        print(C.from_components(args.siglip2, args.qwen3, args.dst, seed=args.seed, dtype=args.dtype,
                                mesh=args.mesh, vit_layers=layers, overwrite=args.overwrite))
    else:
        m, ok = C.check_logits(args.a, args.b, seed=args.seed, batch=args.batch, crops=args.crops,
                               length=args.length, max_kl=args.max_kl, min_top5=args.min_top5)
        print(C.format_metrics(args.a, args.b, m, ok, args.max_kl))
        return C.EXIT_OK if ok else C.EXIT_MISMATCH
    return C.EXIT_OK


CONVERT_HELP = ("convert weights: hf-to-orbax, orbax-to-hf, from-components, check-logits (exit 3: logits "
                "differ), quantize (int8), merge-lora; progress on stderr, the summary on stdout")


register(Command("generate", "answer a prompt about images (streams to stdout), or a JSONL batch",
                 _configure_generate, _run_generate))
register(Command("chat", "multi-turn chat about images on stdin/stdout", _configure_chat, _run_chat))
register(Command("efficiency", "the paper's Table 1 (what 2x2 pooling saves) from the compiled model",
                 _configure_efficiency, _run_efficiency))

register(Command("convert", "official safetensors <-> Orbax, a model from SigLIP2 + Qwen3, logit checks",
                 _configure_convert, _run_convert, description=CONVERT_HELP,
                 interrupted="nothing was written to the destination"))
register(train_cli.COMMAND)
register(aot_cli.COMMAND)


def _serve(name: str):
    def call(*a):
        from .serve import cli as serve_cli
        return getattr(serve_cli, name)(*a)
    return call


register(Command("serve", "serve the model over an OpenAI-compatible HTTP API (needs the [serve] extra)",
                 _serve("configure"), _serve("run")))


# ----------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per registered command (`jinavlm --help`)."""
    parser = argparse.ArgumentParser(prog="jinavlm", description="jina-vlm in JAX: inference, training and tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help, epilog=cmd.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run a subcommand through the shared error path (`command.guarded`)."""
    own = argv is None
    argv = list(sys.argv[1:] if own else argv)
    if argv and argv[0] in COMMANDS:
        return run_cli(COMMANDS[argv[0]], argv[1:], f"jinavlm {argv[0]}", own_process=own)
    build_parser().parse_args(argv)   # no or an unknown subcommand: usage / --help, exit 2 or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
