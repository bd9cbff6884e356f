"""Serving throughput and latency on this CPU: `jinavlm serve` against `generate()`, in one run.

    python3 benchmarks/bench_serve.py [--size mid|tiny] [--clients 8] [--requests 32] [--rate 4]
                                      [--max-tokens 64] [--image-share 0.25] [--max-batch 8]
                                      [--max-model-len 1024] [--decode-block N]

One set of chat requests (short questions, a share of them about an image; some images repeat),
each generating `--max-tokens` tokens greedily, goes three ways, measured side by side:

* **server**: `jinavlm serve` in a subprocess (continuous batching over `--max-batch` decode slots),
  `--clients` concurrent streaming clients, each waiting an exponential (Poisson) gap before each of
  its requests; TTFT = request sent -> first content chunk, ITL = the gaps between content chunks;
* **one at a time**: `Generator.generate()` on each request in turn (what a server without batching
  does), compiled beforehand for every shape it meets;
* **static batches**: `Generator.generate()` on consecutive groups of `--max-batch` requests.

Throughput is generated tokens / wall time. Then, on the idle server, one new image and the same
image again: the second request's TTFT shows the vision cache (the ViT runs once per image).
Random weights (`testing.mid_config()`: a 1024-wide, 8-layer decoder and a small vision tower), a
byte-level tokenizer trained on a few words: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{os.cpu_count()} cores, {' '.join(keep) or 'no AVX2'}"


def make_requests(n: int, image_share: float, max_tokens: int, seed: int) -> list[dict]:
    from jinavlm_jax.testing import WORDS, png_bytes
    rng = np.random.default_rng(seed)
    images = [png_bytes(int(rng.integers(200, 500)), int(rng.integers(200, 500)), 1000 + k) for k in range(4)]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, int(rng.integers(4, 24))))
        imgs = [images[int(rng.integers(0, len(images)))]] if rng.random() < image_share else []
        out.append({"text": text, "images": imgs, "max_tokens": max_tokens})
    return out


def chat_prompt(proc, r) -> str:
    return proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * len(r["images"])
                                      + [{"type": "text", "text": r["text"]}]}])


def percentile(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# ------------------------------------------------------------------------------------ generate()

def run_generate(model_dir: Path, reqs: list[dict], batch: int) -> dict:
    """Requests through Generator.generate() in groups of `batch` (1 = one at a time)."""
    from jinavlm_jax import checkpoint
    from jinavlm_jax.generate import Generator
    from jinavlm_jax.processing import Processor
    config, params = checkpoint.load(model_dir / "ckpt")
    proc = Processor.from_dir(model_dir)
    gen = Generator(config, params)
    groups = [reqs[i:i + batch] for i in range(0, len(reqs), batch)]

    def call(group):
        b = proc([chat_prompt(proc, r) for r in group], [r["images"] for r in group])
        return gen.generate(b, max_new_tokens=max(r["max_tokens"] for r in group), stop_ids=proc.stop_ids)

    log(f"generate(batch={batch}): compiling every shape first")
    for g in groups:
        call(g)
    t0 = time.perf_counter()
    tokens = 0
    for g in groups:
        out = call(g)
        tokens += sum(len(x) + (s is not None) for x, s in zip(out.tokens, out.stop_tokens))
    return {"tokens": tokens, "wall": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch: int, max_model_len: int,
                 decode_block: int | None = None) -> tuple[subprocess.Popen, str]:
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "jinavlm_jax.cli", "serve", "--checkpoint", str(model_dir / "ckpt"),
           "--tokenizer", str(model_dir), "--port", str(port), "--max-batch", str(max_batch),
           "--max-model-len", str(max_model_len), "--shutdown-timeout", "5"]
    if decode_block is not None:
        cmd += ["--decode-block", str(decode_block)]
    proc = subprocess.Popen(cmd, stderr=sys.stderr, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(1)


async def one_request(client, base: str, r: dict) -> dict:
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(im).decode()}}
               for im in r["images"]] + [{"type": "text", "text": r["text"]}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": r["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": list(np.diff(times)), "tokens": tokens,
            "e2e": time.perf_counter() - t0}


async def load_test(base: str, reqs: list[dict], clients: int, rate: float, seed: int) -> dict:
    import httpx
    rng = np.random.default_rng(seed)
    shares = [reqs[c::clients] for c in range(clients)]
    results = []

    async def client_loop(mine, client):
        for r in mine:
            await asyncio.sleep(float(rng.exponential(clients / rate)))  # Poisson arrivals, `rate` per second in all
            results.append(await one_request(client, base, r))

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(m, client) for m in shares))
        wall = time.perf_counter() - t0
    itl = [x for r in results for x in r["itl"]]
    return {"tokens": sum(r["tokens"] for r in results), "wall": wall,
            "ttft_p50": percentile([r["ttft"] for r in results], 50),
            "ttft_p99": percentile([r["ttft"] for r in results], 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "e2e_p50": percentile([r["e2e"] for r in results], 50)}


async def vision_cache_probe(base: str, max_tokens: int) -> tuple[float, float, float]:
    """TTFT of a text-only request, of a new image, and of the same image again (idle server)."""
    import httpx

    from jinavlm_jax.testing import png_bytes
    image = png_bytes(420, 300, 4242)
    async with httpx.AsyncClient(timeout=600) as client:
        text = await one_request(client, base, {"text": "what colour is the shape", "images": [], "max_tokens": 2})
        first = await one_request(client, base, {"text": "what colour is the shape", "images": [image],
                                                 "max_tokens": 2})
        again = await one_request(client, base, {"text": "how many", "images": [image], "max_tokens": 2})
    return text["ttft"], first["ttft"], again["ttft"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("mid", "tiny"), default="mid")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second, all clients together")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--image-share", type=float, default=0.25)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-block", type=int, help="the server's --decode-block (default: its own)")
    args = p.parse_args(argv)

    from jinavlm_jax import JinaVLMConfig
    from jinavlm_jax.testing import mid_config, write_model_dir

    reqs = make_requests(args.requests, args.image_share, args.max_tokens, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        log(f"writing a random {args.size} model")
        model_dir = write_model_dir(Path(tmp), mid_config() if args.size == "mid" else JinaVLMConfig.tiny(),
                                    max_crops=1, vocab_size=2048)
        proc, base = start_server(model_dir, args.max_batch, args.max_model_len, args.decode_block)
        try:
            log(f"server: {args.requests} requests, {args.clients} clients, Poisson {args.rate}/s")
            asyncio.run(load_test(base, reqs[:args.max_batch], args.max_batch, 1e6, args.seed))  # warm the caches
            served = asyncio.run(load_test(base, reqs, args.clients, args.rate, args.seed))
            probe = asyncio.run(vision_cache_probe(base, args.max_tokens))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        single = run_generate(model_dir, reqs, 1)
        static = run_generate(model_dir, reqs, args.max_batch)

    base_tps = single["tokens"] / single["wall"]
    rows = [("server (continuous batching)", served), ("generate(), one at a time", single),
            (f"generate(), static batches of {args.max_batch}", static)]
    print(f"bench_serve: {args.size} model, {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.image_share:.0%} with an image, {args.clients} clients, max_batch {args.max_batch}; CPU: {cpu_flags()}")
    print()
    print("| mode | tokens | wall s | tokens/s | vs one at a time | TTFT p50 / p99 s | ITL p50 / p99 ms | latency p50 s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        tps = r["tokens"] / r["wall"]
        ttft = f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}" if "ttft_p50" in r else "-"
        itl = f"{1e3 * r['itl_p50']:.0f} / {1e3 * r['itl_p99']:.0f}" if "itl_p50" in r else "-"
        e2e = f"{r['e2e_p50']:.2f}" if "e2e_p50" in r else "-"
        print(f"| {name} | {r['tokens']} | {r['wall']:.1f} | {tps:.1f} | {tps / base_tps:.2f}x | {ttft} | {itl} | {e2e} |")
    print()
    print(f"vision cache (idle server, TTFT): text only {probe[0]:.3f} s; a new image {probe[1]:.3f} s; "
          f"the same image again {probe[2]:.3f} s ({probe[1] / probe[2]:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
