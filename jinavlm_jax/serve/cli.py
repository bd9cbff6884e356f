"""`jinavlm serve`: the OpenAI-compatible server (needs the [serve] extra: starlette, uvicorn).

    jinavlm serve --checkpoint ckpt/ --tokenizer jina-vlm/ --port 8000 --max-batch 8

Loads the model, compiles every program the engine needs (so no request waits for a compile), then
serves on --host:--port until SIGTERM / Ctrl-C: it stops accepting requests, lets running ones finish
for --shutdown-timeout seconds, cancels the rest and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from pathlib import Path

HELP = "serve the model over an OpenAI-compatible HTTP API (continuous batching)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="jinavlm-jax Orbax checkpoint or official Hugging Face directory")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="directory with tokenizer.json and preprocessor_config.json (default: --checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="decode slots (default 8)")
    p.add_argument("--max-model-len", type=int, default=4096, metavar="N",
                   help="prompt + generated tokens per request (default 4096)")
    p.add_argument("--max-crops", type=int, metavar="N", help="tiles per image (default: the preprocessor config)")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="images per request (default 8)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="waiting requests before answering 429 (default 256)")
    p.add_argument("--vision-cache", type=int, default=64, metavar="N",
                   help="images whose vision features are kept (LRU, default 64; 0 = off)")
    p.add_argument("--steps-per-call", type=int, default=1, metavar="K",
                   help="tokens each decode call advances every slot (default 1)")
    p.add_argument("--decode-block", type=int, metavar="N",
                   help="cache slots per block of the decode attention, which reads only the blocks the longest "
                        "live request has reached (default: 128 when a slot holds more than 512 positions; 0: "
                        "every step reads the whole slot)")
    p.add_argument("--allowed-local-media", action="append", default=[], metavar="DIR",
                   help="directory whose files image_url may name (local path or file://); repeatable")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id in responses (default: checkpoint name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds running requests may take to finish after SIGTERM (default 30)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--mesh", metavar="SPEC", help="e.g. data=1,fsdp=1,tensor=4 (default: one device)")
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of at start")
    from ..cli import adapt_args
    adapt_args(p)


def run(args: argparse.Namespace) -> int:
    if not all(importlib.util.find_spec(m) for m in ("uvicorn", "starlette", "prometheus_client")):
        print("jinavlm serve: error: needs the [serve] extra: pip install 'jinavlm-jax[serve]'", file=sys.stderr)
        return 1

    class Terminated(Exception):
        pass

    def terminate(signum, frame):
        raise Terminated()

    # SIGTERM while loading or compiling: exit 0 at once. While serving, uvicorn handles it (stop
    # accepting, drain for --shutdown-timeout) and re-raises it afterwards: then it is only noted.
    signal.signal(signal.SIGTERM, terminate)
    try:
        return _serve(args, say=lambda m: print(f"jinavlm serve: {m}", file=sys.stderr, flush=True))
    except Terminated:
        print("jinavlm serve: terminated before serving", file=sys.stderr)
        return 0


def _serve(args: argparse.Namespace, say) -> int:
    import uvicorn

    from ..cli import _processor, load_model
    from ..inference.engine import Engine
    from ..sharding import mesh_from_spec
    from .app import create_app

    for d in args.allowed_local_media:
        if not Path(d).is_dir():
            raise ValueError(f"--allowed-local-media {d}: not a directory")
    mesh = mesh_from_spec(args.mesh) if args.mesh else None
    say(f"loading {args.checkpoint}")
    config, params = load_model(args.checkpoint, args.dtype, mesh, args.adapter)
    engine = Engine(config, params, _processor(args), max_batch=args.max_batch, max_model_len=args.max_model_len,
                    max_images=args.max_images, max_queue=args.max_queue, vision_cache=args.vision_cache,
                    steps_per_call=args.steps_per_call, mesh=mesh, quantize=args.quantize,
                    kv_cache_dtype=args.kv_cache_dtype, decode_block=args.decode_block)
    del params
    engine.start(warmup=not args.no_warmup, say=say)
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, name, args.allowed_local_media)
    app.state.shutdown_timeout = args.shutdown_timeout
    say(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots, "
        f"max_model_len {args.max_model_len})")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    engine.stop(timeout=0)
    say("stopped")
    return 0
