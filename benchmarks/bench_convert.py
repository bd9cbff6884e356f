"""Peak memory of the streaming official -> Orbax conversion on the full-size (2.48B) model.

    PYTHONPATH=. python3 benchmarks/bench_convert.py [--dir /tmp/jinavlm_bench] [--dtype bfloat16] [--keep]

1. Writes a full-size random checkpoint in the official layout (config.json + model.safetensors,
   ~5 GB in bfloat16; values are a tiled random block: memory, not numerics, is measured).
2. Runs, each in its own subprocess, which reports its own peak RSS (ru_maxrss):
   * `python -m convert hf-to-orbax` (streaming: one tensor read at a time, each param placed on
     its device as soon as it is built);
   * the naive peer: `safetensors.numpy.load_file` of the whole file, then the same stacking and the
     same Orbax save (what a straightforward converter does);
   * `python -m convert orbax-to-hf` (the way back, streamed shard by shard).
3. Prints a table: peak RSS, output size (the params' bytes), ratio, wall time. The issue's bar:
   hf-to-orbax peak RSS under 1.3x the output size.

Not run by CI (needs ~15 GB of disk and ~12 GB of RAM for the naive peer).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_random_checkpoint(directory: Path, dtype: str) -> int:
    """Full-size official checkpoint with random values, streamed to disk. Returns its bytes."""
    import ml_dtypes
    from jinavlm_jax import JinaVLMConfig
    from jinavlm_jax.weights import official_table
    from jinavlm_jax.weights.safetensors_io import write_safetensors_stream

    config = JinaVLMConfig.jina_vlm_2_4b(param_dtype="float32")
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.replace(torch_dtype=dtype).to_hf(), indent=1))
    block = (np.random.default_rng(0).standard_normal(1 << 22) * 0.02).astype(dt)
    table = official_table(config)

    def arrays():
        for k, e in enumerate(table):
            if e.zero_optional:  # the text q/k/v biases must be zero (spec 2)
                yield np.zeros(e.shape, dt)
            else:
                yield np.resize(np.roll(block, k), int(np.prod(e.shape))).reshape(e.shape)

    return write_safetensors_stream(directory / "model.safetensors",
                                    [(e.name, e.shape, dt) for e in table], arrays())


# --------------------------------------------------------------------------- child processes

def child(job: str, args: list[str]) -> None:
    """Run one job in this process and print its peak RSS (bytes) as the last stdout line."""
    t0 = time.perf_counter()
    if job == "naive":
        naive_hf_to_orbax(Path(args[0]), Path(args[1]))
    else:
        from convert.__main__ import main
        rc = main([job, *args])
        if rc:
            raise SystemExit(rc)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - t0}))


def naive_hf_to_orbax(src: Path, dst: Path) -> None:
    """The peer: load the whole file into memory, then stack into our params and save."""
    import jax
    import ml_dtypes
    import torch
    from safetensors.torch import load_file  # safetensors.numpy cannot represent bfloat16

    from jinavlm_jax import JinaVLMConfig, checkpoint
    from jinavlm_jax.weights.official import load_params

    def as_numpy(t):  # zero-copy view
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()

    everything = {n: as_numpy(t) for n, t in load_file(src / "model.safetensors").items()}  # all in memory

    class InMemory:  # the reader interface load_params expects, over the loaded dict
        dir, where = src, everything
        names = everything.keys
        shape = staticmethod(lambda n: everything[n].shape)
        dtype = staticmethod(lambda n: everything[n].dtype)
        read = staticmethod(lambda n, rows=None: everything[n] if rows is None else everything[n][rows[0]:rows[1]])

    config = JinaVLMConfig.from_hf(src)
    params = load_params(config, InMemory(), place=lambda path, a: a)  # all params stacked on the host
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    checkpoint.save(dst, config.replace(param_dtype=str(next(iter(everything.values())).dtype)), params)


def run_child(job: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", job, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{job} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/jinavlm_bench", help="work directory (~15 GB free needed)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-naive", action="store_true", help="do not run the naive peer")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    work = Path(args.dir)
    src, orbax, naive, back = work / "hf", work / "orbax", work / "naive", work / "back"
    for p in (orbax, naive, back):
        shutil.rmtree(p, ignore_errors=True)
    if not (src / "model.safetensors").is_file():
        t = time.perf_counter()
        n = write_random_checkpoint(src, args.dtype)
        print(f"wrote {src} ({n / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", file=sys.stderr)

    from jinavlm_jax import JinaVLMConfig, abstract_params
    import jax
    out_bytes = sum(int(np.prod(x.shape)) * (2 if args.dtype == "bfloat16" else 4)
                    for x in jax.tree_util.tree_leaves(abstract_params(JinaVLMConfig.jina_vlm_2_4b())))
    largest = max(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        abstract_params(JinaVLMConfig.jina_vlm_2_4b()))) * (2 if args.dtype == "bfloat16" else 4)

    rows = [("hf-to-orbax (streaming)", run_child("hf-to-orbax", src, orbax), out_bytes, du(orbax))]
    if not args.skip_naive:
        rows.append(("naive: load_file + stack", run_child("naive", src, naive), out_bytes, du(naive)))
    rows.append(("orbax-to-hf (streaming)", run_child("orbax-to-hf", orbax, back), du(back), du(back)))

    print(f"\nfull-size jina-vlm, {args.dtype}: {out_bytes / 1e9:.3f} GB of params, largest param "
          f"{largest / 1e9:.3f} GB; bar for hf-to-orbax: peak RSS < 1.3 x output")
    print(f"{'conversion':<26}{'peak RSS':>11}{'output':>11}{'on disk':>11}{'ratio':>8}{'time':>9}")
    for name, r, ob, disk in rows:
        print(f"{name:<26}{r['peak_rss'] / 1e9:>9.2f}GB{ob / 1e9:>9.2f}GB{disk / 1e9:>9.2f}GB"
              f"{r['peak_rss'] / ob:>8.2f}{r['seconds']:>8.0f}s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
