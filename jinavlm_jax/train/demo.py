"""The embedded demo (`python train.py` without arguments, recipe `configs/demo.yaml`).

Before training, `prepare_demo` makes what the recipe points at, once per output directory:

* `OUTPUT_DIR/raw/`: the synthetic multilingual VQA corpus (`data.synthetic`), JSONL + PNG, which
  the normal source resolution then builds into TFDS array_record datasets;
* the model directory `tokenizer:` names: a byte-level BPE tokenizer trained on that corpus
  (`data.tokenizer`), a `config.json` (the `tiny` layout, `model.arch` sizes, the tokenizer's
  vocabulary) and a `preprocessor_config.json` (the `processor:` settings);
* with `demo.vision_pretrain_steps`, the checkpoint `model.init` names: the model's random init with
  its vision tower + connector pretrained on the training images' labels (`train.pretrain`), as the
  released model starts from a pretrained SigLIP2.

After training, `demo_report` prints the held-out accuracy against the majority baseline, a few
predictions, and the command that asks the trained model about an image.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

from .config import TrainConfig, TrainConfigError


def raw_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run.output_dir) / "raw"


def prepare_demo(cfg: TrainConfig, say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Write the synthetic corpus, tokenizer and model configs (and the pretrained init) if they are not
    there yet; `progress`: tqdm bars for the long parts."""
    from ..data.synthetic import corpus_text, write_synthetic_vqa
    from ..data.tokenizer import train_bpe_tokenizer
    from ..model import JinaVLMConfig
    from ..processing import PreprocessConfig

    raw = raw_dir(cfg)
    marker = raw / "corpus.json"
    pre = PreprocessConfig().replace(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.processor.items()})
    if not marker.is_file():
        say(f"demo: rendering {cfg.demo.n_train} + {cfg.demo.n_val} synthetic {pre.crop_size}x{pre.crop_size} VQA "
            f"images in {', '.join(cfg.demo.languages)} -> {raw}")
        # Images of exactly one crop: the processor makes one tile + the thumbnail, nothing is resized.
        try:
            info = write_synthetic_vqa(raw, cfg.demo.n_train, cfg.demo.n_val, cfg.demo.languages, seed=cfg.run.seed,
                                       size=pre.crop_size, task_weights=cfg.demo.task_weights or None,
                                       progress=progress)
        except ValueError as e:
            raise TrainConfigError(f"demo.task_weights: {e}") from None
        marker.write_text(json.dumps(info, indent=1, ensure_ascii=False))
    info = json.loads(marker.read_text())
    model_dir = Path(cfg.tokenizer)
    if not cfg.tokenizer:
        raise TrainConfigError("demo: `tokenizer` must name the directory for the demo's tokenizer and configs")
    if not (model_dir / "config.json").is_file():
        say(f"demo: training a byte-level BPE tokenizer (vocab {cfg.demo.vocab_size}) -> {model_dir}")
        tok = train_bpe_tokenizer(corpus_text(raw), model_dir, cfg.demo.vocab_size)
        from .setup import apply_arch
        model = apply_arch(JinaVLMConfig.tiny(), cfg.model.arch)
        text = dataclasses.replace(model.text, vocab_size=tok["vocab_size"],
                                   additional_vocab_size=tok["additional_vocab_size"])
        (model_dir / "config.json").write_text(json.dumps(model.replace(text=text).to_hf(), indent=1))
        (model_dir / "preprocessor_config.json").write_text(json.dumps(pre.to_hf(), indent=1))
    if cfg.demo.vision_pretrain_steps > 0:
        pretrained_init(cfg, pre, say, progress)
    return info


# The vision pretraining holds its images' crops in memory (112-pixel crops: 0.3 MB per image), so it
# reads at most this many of the training images.
PRETRAIN_IMAGES = 6000


# Per-image labels of the synthetic corpus that the vision pretraining predicts (meta key -> values).
def _labels() -> dict:
    from ..data.synthetic import COLOURS, COUNTS, SHAPES
    return {"shape": list(SHAPES), "colour": list(COLOURS), "n": list(COUNTS)}


def pretrained_init(cfg: TrainConfig, pre, say: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Write the checkpoint at `model.init` (once): the seeded random init of the model, its vision tower
    and connector then trained `demo.vision_pretrain_steps` steps on the training images' labels."""
    import jax

    from ..checkpoint import is_checkpoint, save
    from ..processing.image import ImageProcessor
    from .pretrain import pretrain_vision
    from .setup import build_model_config, resolve_mesh
    from .step import random_params

    if cfg.model.init == "random":
        raise TrainConfigError("demo.vision_pretrain_steps: model.init must name the directory for the pretrained "
                               "init (e.g. '{output_dir}/pretrained'), not 'random'")
    target = Path(cfg.model.init)
    if is_checkpoint(target):   # written by an earlier run, or a checkpoint the user points at: used as it is
        return target
    if target.exists():
        raise TrainConfigError(f"model.init: {target} exists and is not a jinavlm-jax checkpoint; the demo's vision "
                               "pretraining (demo.vision_pretrain_steps) writes its init there: name a new "
                               "directory, or set demo.vision_pretrain_steps=0 to load model.init as it is")
    model_cfg = build_model_config(cfg)
    params = jax.device_get(random_params(model_cfg, resolve_mesh(cfg), cfg.run.seed, cfg.model.pos_embed_init))
    vqa = raw_dir(cfg) / "vqa"
    records = [json.loads(line) for line in (vqa / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    records = records[:PRETRAIN_IMAGES]
    steps = cfg.demo.vision_pretrain_steps
    say(f"demo: pretraining the vision tower + connector for {steps} steps on the labels of {len(records)} "
        f"training images -> {target}")
    out = pretrain_vision(model_cfg, ImageProcessor(pre), records, _labels(), params, root=vqa, steps=steps,
                          seed=cfg.run.seed, say=say, progress=progress)
    params["vision"], params["connector"] = out["vision"], out["connector"]
    save(target, model_cfg, params,
         source={"trained_by": "jinavlm_jax.train.pretrain", "steps": steps, "held_out_accuracy": out["accuracy"]})
    return target


def demo_report(cfg: TrainConfig, result, out=sys.stdout, total_s: float | None = None) -> None:
    """Print accuracy vs. majority baseline, some predictions and the `jinavlm generate` command.
    `total_s`: the whole run's wall time, the corpus, tokenizer and vision pretraining included."""
    rep = result.generation
    p = lambda s="": print(s, file=out)
    p()
    whole = "" if total_s is None else f"; {total_s / 60:.1f} min in all, with the corpus, tokenizer and vision pretraining"
    p(f"== jina-vlm demo: {result.steps} steps in {result.wall_time_s / 60:.1f} min{whole} ==")
    if rep is not None:
        vqa = rep.per_source.get("vqa", {"accuracy": rep.accuracy, "majority_baseline": rep.majority_baseline,
                                         "majority_answer": rep.majority_answer, "n": rep.n})
        p(f"held-out VQA answer accuracy: {vqa['accuracy']:.1%} on {vqa['n']} questions "
          f"(majority-answer baseline {vqa['majority_baseline']:.1%}: always answering "
          f"'{vqa['majority_answer']}')")
        for name, d in rep.per_source.items():
            if name != "vqa":
                p(f"held-out {name} accuracy: {d['accuracy']:.1%} on {d['n']} questions "
                  f"(majority baseline {d['majority_baseline']:.1%})")
        by_task = _by_task(cfg, rep.predictions)
        if by_task:
            p("per question type: " + ", ".join(f"{t} {a:.0%}" for t, a in by_task.items()))
        p()
        p("some held-out predictions:")
        shown = [x for x in rep.predictions if x["source"] == "vqa"][: max(cfg.eval.show, 0)]
        for x in shown:
            mark = "ok " if x["correct"] else "XX "
            q = x["question"].replace("<|image|>", "").replace("\n", " / ")
            p(f"  {mark} Q: {q}\n      expected: {x['reference']!r}   model: {x['prediction']!r}")
    if result.heldout.get("heldout_loss") is not None:
        p(f"held-out loss {result.heldout['heldout_loss']:.4f}, token accuracy "
          f"{result.heldout.get('heldout_token_accuracy', float('nan')):.1%}")
    if result.plot:
        p(f"loss curve: {result.plot}")
    if result.export_dir:
        image = sorted((raw_dir(cfg) / "vqa" / "images").glob("validation_*.png"))[:1]
        p(f"trained model (with tokenizer): {result.export_dir}")
        p()
        p("ask the trained model about an image:")
        img = image[0] if image else "IMAGE.png"
        p(f"  jinavlm generate --checkpoint {result.export_dir} --image {img} "
          f"--prompt 'What colour is the shape?' --max-new-tokens 8")
        p("  (or: python -m jinavlm_jax.cli generate ... ; questions may be in English, German, Chinese "
          "or Arabic)")


def _by_task(cfg: TrainConfig, predictions) -> dict[str, float]:
    """Accuracy per synthetic question type, from the meta stored in the held-out JSONL."""
    path = raw_dir(cfg) / "vqa" / "validation.jsonl"
    if not path.is_file():
        return {}
    task = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            task[rec["id"]] = rec.get("meta", {}).get("task")
    acc: dict[str, list[bool]] = {}
    for x in predictions:
        t = task.get(x["id"])
        if t:
            acc.setdefault(t, []).append(bool(x["correct"]))
    return {t: sum(v) / len(v) for t, v in sorted(acc.items())}


# ------------------------------------------------------------------------------ the shipped model

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "demo"


def ship(export_dir: str | Path, dest: str | Path = SHIPPED, say: Callable[[str], None] = print) -> Path:
    """Package a demo run's export as the model `python -m jinavlm_jax` answers with:
    `dest/model/` in the official layout (float32 safetensors + config.json + tokenizer and
    preprocessor configs, `convert.orbax_to_hf`) and `dest/images/` (the showcase images and
    their questions.json, `data.synthetic.write_showcase`)."""
    from ..convert import orbax_to_hf
    from ..data.synthetic import write_showcase
    from ..processing import PreprocessConfig
    export_dir, dest = Path(export_dir), Path(dest)
    summary = orbax_to_hf(export_dir, dest / "model", dtype="float32", overwrite=True, progress=False)
    size = PreprocessConfig.from_hf(export_dir / "preprocessor_config.json").crop_size
    items = write_showcase(dest / "images", size)
    say(f"shipped {summary.parameters:,} params ({summary.bytes / 1e6:.2f} MB) -> {dest / 'model'}; "
        f"{len(items)} showcase questions -> {dest / 'images'}")
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m jinavlm_jax.train.demo",
                                 description="ship a demo run's export as the model of `python -m jinavlm_jax`")
    ap.add_argument("command", choices=("ship",))
    ap.add_argument("export", help="a demo run's export directory (runs/demo/export)")
    ap.add_argument("--dest", default=str(SHIPPED), help=f"default: the package's {SHIPPED}")
    args = ap.parse_args(argv)
    try:
        ship(args.export, args.dest)
    except Exception as e:  # noqa: BLE001 - one line on stderr, non-zero exit
        print(f"python -m jinavlm_jax.train.demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
