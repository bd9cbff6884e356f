"""A tensorflow-datasets builder for local image-text conversations, written as `array_record` without TensorFlow.

    path = build_dataset("data/my_captions.jsonl", name="my_captions", data_dir="runs/tfds")
    ds = open_split(path, "train")              # random access (tfds data source), for grain

Sources it reads (`source=`):

* a **JSONL file** (one split, `train`), or a **folder of `{split}.jsonl` files** (`train.jsonl`,
  `validation.jsonl`, ...). One sample per line:
  `{"id": "...", "images": ["rel/path.png"], "messages": [{"role": "user", "content": "<|image|>Q"},
  {"role": "assistant", "content": "A"}]}`. Image paths are relative to the JSONL file. `content` may
  also be the processor's list of parts (`{"type": "image"}` / `{"type": "text", ...}`). The LLaVA
  layout is accepted too: `{"image": "x.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}`. With images but no `<|image|>` placeholder, one
  is put at the start of the first user message per image.
* a **folder of images with captions**: every `x.jpg` / `x.png` with a sibling `x.txt` becomes a
  captioning sample (subfolders `train/`, `validation/` become splits; else everything is `train`).

Records are checked while building: an image that does not exist or does not decode is skipped and
counted (`on_bad_image="skip"`) or stops the build with an error naming the file and line
(`"error"`); a malformed line (bad JSON, no assistant turn, placeholder count != image count) always
stops it with the file and line. Counts are written to `build_report.json` beside the dataset. A
split with no usable sample is refused.

Scale-out: with `beam_runner=` (e.g. "DirectRunner", or a Flink / Spark / Dataflow runner and its
`beam_options`), the same builder returns an Apache Beam pipeline from `_generate_examples` and
TFDS runs it on that engine (the optional `beam` extra: `pip install apache-beam`).

Stored features: `id` (text), `messages` (the conversation as JSON text), `images` (a sequence of
encoded images: RGB PNG / JPEG bytes are kept as they are; other formats and modes are converted to
RGB as the processor does by default (alpha dropped) and stored as PNG).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PLACEHOLDER = "<|image|>"
REPORT_NAME = "build_report.json"


class DataError(ValueError):
    """A data source that cannot be built or read (names the file, line or split and the problem)."""


class BadImage(DataError):
    """An image that does not exist or does not decode."""


# ---------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class RawItem:
    """One unparsed sample: where it came from and its raw content (a JSONL line or a caption pair)."""

    origin: str      # "file:line" or the image path, for error messages
    kind: str        # "jsonl" | "caption"
    base_dir: str    # directory image paths are relative to
    payload: str     # the JSONL line, or the caption file path
    image: str = ""  # caption samples: the image path

    @property
    def key(self) -> str:
        """The TFDS example key: the origin relative to `base_dir` ("train.jsonl:17", "cat.jpg"). TFDS
        shuffles the built records by their keys, so a key holding the absolute path made the record
        order (and a training run) depend on where the data lives."""
        return os.path.relpath(self.origin, self.base_dir)


def discover_splits(source: str | Path) -> dict[str, list[RawItem]]:
    """The splits of a source and their raw items (see the module docstring for the layouts)."""
    src = Path(source)
    if src.is_file():
        if src.suffix != ".jsonl":
            raise DataError(f"{src}: a file source must be a .jsonl file")
        return {"train": _jsonl_items(src)}
    if not src.is_dir():
        raise DataError(f"{src}: data source not found (expected a .jsonl file or a folder)")
    jsonl = sorted(src.glob("*.jsonl"))
    if jsonl:
        return {p.stem: _jsonl_items(p) for p in jsonl}
    subdirs = [d for d in sorted(src.iterdir()) if d.is_dir() and _has_captions(d)]
    if subdirs:
        return {d.name: _caption_items(d) for d in subdirs}
    if _has_captions(src):
        return {"train": _caption_items(src)}
    raise DataError(f"{src}: no {{split}}.jsonl files and no image files with .txt captions found")


def _jsonl_items(path: Path) -> list[RawItem]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                items.append(RawItem(f"{path}:{n}", "jsonl", str(path.parent), line))
    return items


def _has_captions(d: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file() for p in d.iterdir())


def _caption_items(d: Path) -> list[RawItem]:
    return [RawItem(str(p), "caption", str(d), str(p.with_suffix(".txt")), str(p))
            for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").is_file()]


def parse_item(item: RawItem) -> tuple[str, list[dict], list[str]]:
    """(id, messages, absolute image paths) of a raw item; DataError names the origin when malformed."""
    if item.kind == "caption":
        caption = Path(item.payload).read_text(encoding="utf-8").strip()
        if not caption:
            raise DataError(f"{item.payload}: empty caption")
        messages = [{"role": "user", "content": PLACEHOLDER + "Describe this image."},
                    {"role": "assistant", "content": caption}]
        return Path(item.image).stem, messages, [item.image]
    try:
        rec = json.loads(item.payload)
    except json.JSONDecodeError as e:
        raise DataError(f"{item.origin}: not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{item.origin}: each line must be a JSON object")
    if "conversations" in rec and "messages" not in rec:
        rec = _from_llava(rec, item.origin)
    messages, images = rec.get("messages"), rec.get("images", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{item.origin}: 'messages' must be a non-empty list of {{role, content}}")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{item.origin}: 'images' must be a list of image paths")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise DataError(f"{item.origin}: message {k} must be {{'role': system|user|assistant, 'content': ...}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{item.origin}: no assistant message, nothing to train on")
    n_ph = sum(_count_placeholders(m["content"]) for m in messages)
    if n_ph == 0 and images:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{item.origin}: {len(images)} image(s) but no user message to attach them to")
        first["content"] = _prepend(first["content"], PLACEHOLDER * len(images))
    elif n_ph != len(images):
        raise DataError(f"{item.origin}: {n_ph} {PLACEHOLDER} placeholder(s) but {len(images)} image(s); use "
                        "one placeholder per image (or none, to put them before the first question)")
    paths = [str(Path(item.base_dir) / p) if not os.path.isabs(p) else p for p in images]
    return str(rec.get("id", item.origin)), messages, paths


def _from_llava(rec: dict, origin: str) -> dict:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    msgs = []
    for k, turn in enumerate(rec["conversations"]):
        role = roles.get(turn.get("from"))
        if role is None or not isinstance(turn.get("value"), str):
            raise DataError(f"{origin}: conversations[{k}] needs 'from' (human/gpt) and a string 'value'")
        msgs.append({"role": role, "content": turn["value"].replace("<image>\n", PLACEHOLDER)
                     .replace("<image>", PLACEHOLDER)})
    images = rec.get("images", rec.get("image", []))
    return {"id": rec.get("id"), "messages": msgs, "images": [images] if isinstance(images, str) else images}


def _count_placeholders(content: Any) -> int:
    if isinstance(content, str):
        return content.count(PLACEHOLDER)
    if isinstance(content, list):
        return sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image") + sum(
            p.get("text", "").count(PLACEHOLDER) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return 0


def _prepend(content: Any, text: str) -> Any:
    if isinstance(content, str):
        return text + content
    return [{"type": "image"} for _ in range(text.count(PLACEHOLDER))] + list(content)


def load_image_bytes(path: str) -> bytes:
    """The bytes to store for an image: RGB PNG / JPEG files as they are, anything else as an RGB PNG.

    Raises BadImage when the file is missing or does not fully decode (truncated, not an image).
    """
    from PIL import Image, UnidentifiedImageError
    p = Path(path)
    if not p.is_file():
        raise BadImage(f"{p}: image file not found")
    data = p.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # decodes every pixel: catches truncated / corrupt files now, not during training
            if fmt in ("PNG", "JPEG") and im.mode == "RGB":
                return data
            # Everything else becomes an RGB PNG, converted as the processor would (PIL's
            # convert("RGB"): alpha dropped, colour under transparent pixels kept, spec 9.1 / 9.3).
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"{p}: not a readable image ({type(e).__name__}: {e})") from None


def make_example(item: RawItem) -> tuple[str, dict]:
    """(key, TFDS example) of one item. Raises DataError (malformed) or BadImage."""
    rid, messages, paths = parse_item(item)
    images = [load_image_bytes(p) for p in paths]
    return item.key, {"id": rid, "messages": json.dumps(messages, ensure_ascii=False), "images": images}


def _beam_example(item: RawItem, on_bad_image: str):
    """Beam DoFn body: yields the example, or nothing (counted) for a bad image under 'skip'."""
    import apache_beam as beam
    try:
        yield make_example(item)
        beam.metrics.Metrics.counter("jinavlm_data", "examples").inc()
    except BadImage:
        if on_bad_image == "error":
            raise
        beam.metrics.Metrics.counter("jinavlm_data", "skipped_bad_images").inc()


# ---------------------------------------------------------------------------------------- builder

class _QuietTFDS:
    """Drops two TFDS log lines that are expected here: every build uses a custom config, and images
    decode with PIL (OpenCV is not a dependency)."""

    def filter(self, record) -> bool:
        msg = str(record.msg)
        return not ("Using custom data configuration" in msg or "OpenCV is not installed" in msg)


def _tfds():
    import logging
    import tensorflow_datasets as tfds
    log = logging.getLogger("absl")
    if not any(isinstance(f, _QuietTFDS) for f in log.filters):
        log.addFilter(_QuietTFDS())
    return tfds


def _builder_class():
    """The TFDS builder class (defined lazily so importing this module does not import TFDS)."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    tfds = _tfds()

    class ConversationsConfig(tfds.core.BuilderConfig):
        """One local source: `source` (JSONL file / folder) and the bad-image policy."""

        def __init__(self, *, source: str = "", on_bad_image: str = "skip", **kw):
            super().__init__(**kw)
            self.source = source
            self.on_bad_image = on_bad_image

    class JinaVLMConversations(tfds.core.GeneratorBasedBuilder):
        """Image-text conversations from local files (see `jinavlm_jax.data.builder`)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Conversations with images, from JSONL files or captioned image folders."}
        BUILDER_CONFIGS = []  # configs are made per source by build_dataset
        # TFDS derives this from the package with importlib_resources (not a dependency here); the
        # builder has no checksums or metadata files beside it anyway.
        code_path = Path(__file__)

        def __init__(self, *, use_beam: bool = False, **kw):
            self._use_beam = use_beam
            self.report: dict[str, dict] = {}
            super().__init__(**kw)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Conversations (JSON text) with their images, for jina-vlm training.",
                features=tfds.features.FeaturesDict({
                    "id": tfds.features.Text(),
                    "messages": tfds.features.Text(),
                    "images": tfds.features.Sequence(
                        tfds.features.Image(shape=(None, None, 3), encoding_format=None)),
                }),
            )

        def _split_generators(self, dl_manager):
            splits = discover_splits(self.builder_config.source)
            return {name: self._generate_examples(name, items) for name, items in splits.items()}

        def _generate_examples(self, split: str, items: Sequence[RawItem]):
            policy = self.builder_config.on_bad_image
            if self._use_beam:
                import apache_beam as beam
                if not items:
                    raise DataError(f"{self.builder_config.source}: split {split!r} is empty")
                return (beam.Create(list(items))
                        | f"examples_{split}" >> beam.FlatMap(_beam_example, on_bad_image=policy))
            return self._local_examples(split, items, policy)

        def _local_examples(self, split: str, items: Sequence[RawItem], policy: str) -> Iterator:
            rep = self.report.setdefault(split, {"lines": len(items), "examples": 0, "skipped_bad_images": 0,
                                                 "skipped": []})
            for item in items:
                try:
                    key, ex = make_example(item)
                except BadImage as e:
                    if policy == "error":
                        raise BadImage(f"{item.origin}: {e} (data.bad_image / --on-bad-image=error; use "
                                       "skip to leave such samples out)") from None
                    rep["skipped_bad_images"] += 1
                    if len(rep["skipped"]) < 20:
                        rep["skipped"].append(str(e))
                    continue
                rep["examples"] += 1
                yield key, ex
            if rep["examples"] == 0:
                raise DataError(f"{self.builder_config.source}: split {split!r} has no usable sample "
                                f"({rep['lines']} read, {rep['skipped_bad_images']} skipped for bad images)")

    _BUILDER = (JinaVLMConversations, ConversationsConfig)
    return _BUILDER


_BUILDER = None


def build_dataset(source: str | Path, name: str, data_dir: str | Path, *, on_bad_image: str = "skip",
                  beam_runner: str | None = None, beam_options: Sequence[str] = (), overwrite: bool = False,
                  verbose: bool = True) -> Path:
    """Build (once) the array_record dataset of `source`; returns the dataset directory.

    An existing complete build is reused unless `overwrite`. `beam_runner` runs the build as an
    Apache Beam pipeline on that runner (`beam_options`: "--key=value" pipeline options).
    """
    if on_bad_image not in ("skip", "error"):
        raise DataError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    tfds = _tfds()
    cls, config_cls = _builder_class()
    cfg = config_cls(name=_config_name(name), source=str(Path(source).absolute()), on_bad_image=on_bad_image,
                     version=cls.VERSION, description=f"built from {source}")
    data_dir = Path(data_dir).absolute()
    builder = cls(config=cfg, data_dir=str(data_dir), use_beam=beam_runner is not None)
    out = Path(builder.data_dir)
    if (out / "dataset_info.json").is_file() and not overwrite:
        return out
    if overwrite and out.exists():
        import shutil
        shutil.rmtree(out)
    kw: dict[str, Any] = {"file_format": "array_record"}
    if beam_runner is not None:
        try:
            import apache_beam as beam
        except ImportError:
            raise DataError("beam_runner needs Apache Beam: pip install 'jinavlm-jax[beam]' "
                            "(or pip install apache-beam)") from None
        kw["download_config"] = tfds.download.DownloadConfig(
            beam_runner=beam_runner, beam_options=beam.options.pipeline_options.PipelineOptions(list(beam_options)))
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints its progress lines; stdout is for results
        builder.download_and_prepare(**kw)
    report = {"source": str(source), "name": name, "beam_runner": beam_runner,
              "splits": {s: int(info.num_examples) for s, info in builder.info.splits.items()},
              "local_counts": builder.report}
    for split, n in report["splits"].items():
        if n == 0:
            raise DataError(f"{source}: split {split!r} has no usable sample")
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if verbose:
        skipped = sum(r.get("skipped_bad_images", 0) for r in builder.report.values())
        print(f"built {name}: {report['splits']} -> {out}" + (f" ({skipped} bad images skipped)" if skipped else ""),
              file=sys.stderr)
    return out


def _config_name(name: str) -> str:
    import re
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_").lower()
    if not clean:
        raise DataError(f"dataset name {name!r} has no usable characters (letters, digits, _)")
    return clean


def is_built_dataset(path: str | Path) -> bool:
    """True for a directory holding a built TFDS dataset (dataset_info.json)."""
    return (Path(path) / "dataset_info.json").is_file()


def open_split(path: str | Path, split: str):
    """Random-access data source of one split of a built dataset (tfds `as_data_source`, no TensorFlow).

    Records are dicts: `id` (bytes), `messages` (JSON bytes), `images` (list of HWC uint8 arrays).
    """
    tfds = _tfds()
    p = Path(path)
    if not is_built_dataset(p):
        raise DataError(f"{p}: not a built dataset (no dataset_info.json); build it with "
                        "`python -m jinavlm_jax.data.builder SOURCE --name NAME --data-dir DIR`")
    builder = tfds.builder_from_directory(str(p))
    if split not in builder.info.splits:
        raise DataError(f"{p}: no split {split!r} (available: {sorted(builder.info.splits)})")
    if builder.info.splits[split].num_examples == 0:
        raise DataError(f"{p}: split {split!r} is empty")
    return builder.as_data_source(split=split)


def dataset_splits(path: str | Path) -> dict[str, int]:
    """{split: number of examples} of a built dataset."""
    tfds = _tfds()
    b = tfds.builder_from_directory(str(path))
    return {s: int(i.num_examples) for s, i in b.info.splits.items()}


# ---------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jinavlm_jax.data.builder SOURCE --name NAME --data-dir DIR`: build a dataset."""
    ap = argparse.ArgumentParser(prog="python -m jinavlm_jax.data.builder",
                                 description="Build a jina-vlm training dataset (TFDS array_record) from "
                                             "local JSONL conversations or a captioned image folder.")
    ap.add_argument("source", help="a .jsonl file, a folder of {split}.jsonl files, or a captioned image folder")
    ap.add_argument("--name", required=True, help="dataset name (the TFDS builder config)")
    ap.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    ap.add_argument("--on-bad-image", choices=("skip", "error"), default="skip")
    ap.add_argument("--beam-runner", default=None,
                    help="run the build as an Apache Beam pipeline on this runner (e.g. DirectRunner)")
    ap.add_argument("--beam-option", action="append", default=[], metavar="--KEY=VALUE",
                    help="an Apache Beam pipeline option (repeatable), e.g. --beam-option=--direct_num_workers=4")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = build_dataset(args.source, args.name, args.data_dir, on_bad_image=args.on_bad_image,
                            beam_runner=args.beam_runner, beam_options=args.beam_option, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
