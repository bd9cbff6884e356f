"""`Processor`: prompts + images -> the batched model inputs of spec 6.1, as numpy arrays.

    proc = Processor.from_dir("jina-vlm/")              # tokenizer.json + the configs
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                        {"type": "text", "text": "Describe the image."}]}])
    batch = proc([prompt], [["photo.jpg"]])             # input_ids, attention_mask, images, ...

Per sample (spec 6.1): tokenize without special tokens; replace each `<|image|>` by that image's
token block and shift its image_input_idx; prepend BOS; concatenate the crops of all images. The
batch is padded with -1 on the left (inference, the official default) or right (training), and
optionally to fixed shape buckets so that jit sees few shapes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .chat import Message, render_chat
from .config import PreprocessConfig
from .errors import ImageInputError, ProcessingError, PromptError
from .image import ImageProcessor
from .loading import ImageLike, is_image_like
from .tokenizer import TextTokenizer

# Official default max_sequence_length of the text model (spec 1.3), used without a config.json.
DEFAULT_MAX_LENGTH = 40960
PAD_ID = -1


@dataclass
class _Sample:
    """One sample before collation; image_input_idx holds absolute positions, -1 = unused."""

    input_ids: np.ndarray           # int64 [n]
    images: np.ndarray              # float32 [t, 729, 588]
    image_masks: np.ndarray         # float32 [t, 729]
    image_input_idx: np.ndarray     # int64 [t, 196]
    labels: np.ndarray | None = None       # int64 [n]: the next token (training only)
    loss_mask: np.ndarray | None = None    # bool [n]: labels that are assistant tokens


# What a model directory holds for the processor, besides weights and config.json (`Processor.from_dir`
# reads them; exports and conversions copy them along).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                   "processor_config.json")


class Processor:
    """Official jina-vlm processor in numpy: tokenizer + `ImageProcessor` + chat format + collation.

    Args:
        tokenizer: a `TextTokenizer`, or a path to tokenizer.json (or to its directory).
        config: image settings; defaults to the released `PreprocessConfig()`.
        max_length: the model's max sequence length; longer samples are refused.
        always_start_with_space: chat-template flag of the released processor config.
        pad_crops_to, pad_length_to: default shape buckets for `__call__` (see there).
    """

    def __init__(self, tokenizer: TextTokenizer | str | Path, config: PreprocessConfig | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, always_start_with_space: bool = True,
                 pad_crops_to: int | None = None, pad_length_to: int | Sequence[int] | None = None):
        self.tokenizer = tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer.from_file(tokenizer)
        self.config = config or PreprocessConfig()
        self.max_length = int(max_length)
        self.always_start_with_space = always_start_with_space
        self.pad_crops_to = pad_crops_to
        self.pad_length_to = pad_length_to
        s = self.tokenizer.special
        self.image_processor = ImageProcessor(self.config, s.patch, s.start, s.end, s.col)

    @classmethod
    def from_dir(cls, hf_dir: str | Path, **overrides) -> "Processor":
        """Build from a model directory: tokenizer.json (+ tokenizer_config.json for BOS),
        preprocessor_config.json (defaults when absent), config.json's
        `text_config.max_sequence_length` and processor_config.json's `always_start_with_space`
        when present. Keyword `overrides` replace any constructor argument."""
        d = Path(hf_dir)
        if not d.is_dir():
            raise ProcessingError(f"{d}: not a directory (expected tokenizer.json and the configs)")
        kw: dict[str, Any] = {"tokenizer": TextTokenizer.from_file(d)}
        if (d / "preprocessor_config.json").is_file():
            kw["config"] = PreprocessConfig.from_hf(d / "preprocessor_config.json")
        text_cfg = _read_json(d / "config.json").get("text_config") or {}
        if text_cfg.get("max_sequence_length"):
            kw["max_length"] = int(text_cfg["max_sequence_length"])
        proc_cfg = _read_json(d / "processor_config.json")
        if "always_start_with_space" in proc_cfg:
            kw["always_start_with_space"] = bool(proc_cfg["always_start_with_space"])
        kw.update(overrides)
        return cls(**kw)

    # ------------------------------------------------------------------ public API
    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end generation (`<|endoftext|>`, and `<|im_end|>` where the tokenizer has it)."""
        return self.tokenizer.stop_ids

    @property
    def bos_id(self) -> int:
        """The id prepended to every sample (BOS, or `<|endoftext|>` when the tokenizer has none)."""
        return self.tokenizer.special.bos

    def crop_budget(self, images_per_sample: int = 1) -> int:
        """A crop bucket that fits any image: (max_crops + 1) per image."""
        return self.config.max_crops_per_image * images_per_sample

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation in the chat format (spec 6.6) as a prompt string for `__call__`."""
        return render_chat(messages, add_generation_prompt, self.always_start_with_space)[0]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (padding -1 ignored)."""
        return self.tokenizer.decode(ids, skip_special_tokens)

    def __call__(self, prompts: str | Sequence[str], images=None, padding_side: str = "left",
                 pad_crops_to: int | None = None, pad_length_to: int | Sequence[int] | None = None
                 ) -> dict[str, np.ndarray]:
        """Prompt strings (taken as given, like the official `text`) and their images -> model inputs.

        `images`: for one prompt, None, an image or a list of images; for a list of prompts, a list
        with one such entry per prompt. Each prompt needs exactly one `<|image|>` per image.
        `pad_crops_to` pads the crop axis to this many crops (e.g. `crop_budget(n)`), `pad_length_to`
        pads the sequence to this length or to the smallest of these bucket lengths that fits.

        Returns `input_ids` int64 [B, L] (-1 padding), `attention_mask` bool [B, L], `images`
        float32 [B, T, 729, 588] (padding crops all -1), `image_masks` int64 [B, T, 729] (-1 rows as
        the official code), `image_input_idx` int64 [B, T, 196] (absolute positions, -1 unused).
        """
        prompts, per_sample = _batch_inputs(prompts, images)
        samples = []
        for b, (text, imgs) in enumerate(zip(prompts, per_sample)):
            if not isinstance(text, str):
                raise PromptError(f"sample {b}: prompt must be a string, got {type(text).__name__}")
            samples.append(self._build(self._prompt_ids(text), None, imgs, b))
        return self._collate(samples, padding_side, pad_crops_to, pad_length_to)

    def training_batch(self, conversations: Sequence[Sequence[Message]], images=None,
                       padding_side: str = "right", pad_crops_to: int | None = None,
                       pad_length_to: int | Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Conversations with assistant answers -> the inputs of `__call__` plus `labels` and `loss_mask`.

        The rendered conversation is followed by `<|endoftext|>`; the model input is BOS + tokens
        without that last token, and `labels[b, t]` is the token at t + 1 (so logits at t are
        compared with labels at t, no further shift). `loss_mask[b, t]` is true where `labels[b, t]`
        is an assistant token (answer text or the final `<|endoftext|>`); prompt, template, image and
        padding positions are false. Padding is on the right by default.
        """
        if isinstance(conversations, Sequence) and conversations and isinstance(conversations[0], dict):
            raise PromptError("training_batch takes a list of conversations (each a list of messages)")
        _, per_sample = _batch_inputs(["" for _ in conversations], images)
        eos = self.tokenizer.special.eos
        samples = []
        for b, (messages, imgs) in enumerate(zip(conversations, per_sample)):
            text, spans = render_chat(messages, False, self.always_start_with_space)
            if not spans:
                raise PromptError(f"conversation {b}: no assistant message, nothing to train on")
            ids, offsets = self.tokenizer.encode_with_offsets(text)
            off = np.asarray(offsets, np.int64).reshape(-1, 2)
            sp = np.asarray(spans, np.int64)
            # A token is an answer token if its characters overlap an assistant content span.
            is_answer = ((off[:, None, 0] < sp[None, :, 1]) & (off[:, None, 1] > sp[None, :, 0])).any(axis=1)
            samples.append(self._build(np.append(np.asarray(ids, np.int64), eos),
                                       np.append(is_answer, True), imgs, b))
        return self._collate(samples, padding_side, pad_crops_to, pad_length_to)

    # ------------------------------------------------------------------ one sample (spec 6.1 steps 1-4)
    def _build(self, ids: np.ndarray, is_answer: np.ndarray | None, images: list, b: int) -> _Sample:
        """Expand image placeholders, prepend BOS, shift indices; with `is_answer` (training) the
        last token is dropped from the input and every input position gets its next-token label."""
        self._check_placeholders(ids, len(images), b)  # before the pixel work
        feats = []
        for k, image in enumerate(images):
            try:
                feats.append(self.image_processor.process(image))
            except ImageInputError as e:
                raise ImageInputError(f"sample {b}, image {k}: {e}") from None
        seq, idx, labels, loss_mask = self._layout(ids, is_answer, feats, b)
        n = self.config
        return _Sample(
            input_ids=seq,
            images=(np.concatenate([f["images"] for f in feats]) if feats
                    else np.zeros((0, n.n_patches, n.patch_dim), np.float32)),
            image_masks=(np.concatenate([f["image_masks"] for f in feats]) if feats
                         else np.zeros((0, n.n_patches), np.float32)),
            image_input_idx=idx, labels=labels, loss_mask=loss_mask)

    def prompt_layout(self, prompt: str, images: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """One prompt whose images are already processed -> (input_ids int64 [n], image_input_idx
        int64 [T, 196] with absolute positions, -1 unused), unpadded: the token layout of `__call__`
        without the pixels.

        `images`: per `<|image|>`, the output of `image_processor.process` or any mapping with its
        `image_tokens` and `image_input_idx` (a serving cache keeps these and the image features, and
        needs no pixels for an image it has seen)."""
        seq, idx, _, _ = self._layout(self._prompt_ids(prompt), None, list(images), 0)
        return seq, idx

    def _prompt_ids(self, text: str) -> np.ndarray:
        ids = np.asarray(self.tokenizer.encode(text), np.int64)
        if len(ids) and ids[-1] == self.tokenizer.special.eos:
            ids = ids[:-1]   # official: a sequence ending in EOS is training data; the input drops it
        return ids

    def _check_placeholders(self, ids: np.ndarray, n_images: int, b: int) -> np.ndarray:
        """Positions of the `<|image|>` placeholders; PromptError unless there is one per image."""
        where = np.flatnonzero(ids == self.tokenizer.special.image)
        if len(where) != n_images:
            raise PromptError(f"sample {b}: the prompt has {len(where)} {'<|image|>'} placeholder(s) but "
                              f"{n_images} image(s) were given; put exactly one <|image|> per image in "
                              "the prompt (apply_chat_template does this for {'type': 'image'} parts)")
        return where

    def _layout(self, ids: np.ndarray, is_answer: np.ndarray | None, feats: list, b: int):
        """Token layout (spec 6.1 steps 1-4) of ids whose `<|image|>` placeholders get the processed
        images' token blocks -> (input ids, image_input_idx [T, 196], labels, loss_mask)."""
        where = self._check_placeholders(ids, len(feats), b)
        pieces, flags, idx = [np.array([self.bos_id], np.int64)], [np.zeros(1, bool)], []
        length, prev = 1, 0
        answer = np.zeros(len(ids), bool) if is_answer is None else is_answer
        for p, f in zip(where, feats):
            pieces.append(ids[prev:p])
            flags.append(answer[prev:p])
            length += p - prev
            block_idx = f["image_input_idx"].astype(np.int64)
            # Positions inside the block become absolute; unused slots stay masked (-1) instead of
            # receiving the offset as in the official code (trap 19).
            idx.append(np.where(block_idx >= 0, block_idx + length, PAD_ID))
            pieces.append(f["image_tokens"])
            flags.append(np.zeros(len(f["image_tokens"]), bool))
            length += len(f["image_tokens"])
            prev = p + 1
        pieces.append(ids[prev:])
        flags.append(answer[prev:])
        seq, seq_flags = np.concatenate(pieces), np.concatenate(flags)

        labels = loss_mask = None
        if is_answer is not None:
            seq, labels, loss_mask = seq[:-1], seq[1:], seq_flags[1:]
        if len(seq) > self.max_length:
            n_image = sum(len(f["image_tokens"]) for f in feats)
            raise PromptError(f"sample {b}: {len(seq)} tokens ({len(seq) - n_image} text + {n_image} image) "
                              f"exceed the model's max sequence length {self.max_length}; shorten the "
                              "prompt, use fewer or smaller images, or lower max_crops")
        idx = np.concatenate(idx) if idx else np.zeros((0, self.config.tokens_per_crop), np.int64)
        return seq, idx, labels, loss_mask

    # ------------------------------------------------------------------ batch (spec 6.1 step 5)
    def _collate(self, samples: list[_Sample], padding_side: str, pad_crops_to, pad_length_to
                 ) -> dict[str, np.ndarray]:
        """Pad to [B, L] and [B, T, ...] with -1; left padding shifts each row's indices by its pad."""
        if padding_side not in ("left", "right"):
            raise PromptError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        c = self.config
        L = _bucket(max(len(s.input_ids) for s in samples), pad_length_to or self.pad_length_to, "sequence length")
        T = _bucket(max(len(s.images) for s in samples), pad_crops_to or self.pad_crops_to, "crop count")
        B = len(samples)
        out = {
            "input_ids": np.full((B, L), PAD_ID, np.int64),
            "images": np.full((B, T, c.n_patches, c.patch_dim), -1, np.float32),
            # int64 as the official collation (fractions would truncate; ours are 1 and -1).
            "image_masks": np.full((B, T, c.n_patches), -1, np.int64),
            "image_input_idx": np.full((B, T, c.tokens_per_crop), PAD_ID, np.int64),
        }
        training = samples[0].labels is not None
        if training:
            out["labels"] = np.full((B, L), PAD_ID, np.int64)
            out["loss_mask"] = np.zeros((B, L), bool)
        for b, s in enumerate(samples):
            n, t = len(s.input_ids), len(s.images)
            pad = L - n if padding_side == "left" else 0
            out["input_ids"][b, pad:pad + n] = s.input_ids
            if training:
                out["labels"][b, pad:pad + n] = s.labels
                out["loss_mask"][b, pad:pad + n] = s.loss_mask
            out["images"][b, :t] = s.images
            out["image_masks"][b, :t] = s.image_masks.astype(np.int64)
            out["image_input_idx"][b, :t] = np.where(s.image_input_idx >= 0, s.image_input_idx + pad, PAD_ID)
        out["attention_mask"] = out["input_ids"] != PAD_ID
        return out


# ---------------------------------------------------------------------- helpers

def _batch_inputs(prompts, images) -> tuple[list, list[list[ImageLike]]]:
    """Normalise (prompts, images) to a list of prompts and one list of images per prompt."""
    def as_list(entry) -> list:
        if entry is None:
            return []
        if is_image_like(entry):
            return [entry]
        if isinstance(entry, (list, tuple)):
            return list(entry)
        raise ImageInputError(f"unsupported image entry of type {type(entry).__name__}")

    if isinstance(prompts, str):
        return [prompts], [as_list(images)]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    if images is None:
        return prompts, [[] for _ in prompts]
    if is_image_like(images) or len(images) != len(prompts):
        raise PromptError(f"{len(prompts)} prompts need a list of {len(prompts)} image entries (None, an "
                          f"image or a list of images each), got {type(images).__name__}"
                          + ("" if is_image_like(images) else f" of length {len(images)}"))
    return prompts, [as_list(e) for e in images]


def _bucket(needed: int, spec: int | Sequence[int] | None, what: str) -> int:
    """The padded size: `needed`, or a fixed size, or the smallest of several bucket sizes that fits."""
    if spec is None:
        return needed
    sizes = sorted([spec] if isinstance(spec, (int, np.integer)) else spec)
    fits = [s for s in sizes if s >= needed]
    if not fits:
        raise PromptError(f"{what} {needed} exceeds the largest bucket {sizes[-1]}; raise the bucket "
                          "(pad_crops_to / pad_length_to) or shorten the input")
    return int(fits[0])


def _read_json(path: Path) -> dict:
    """A JSON file as a dict, {} when absent."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ProcessingError(f"{path}: not valid JSON ({e})") from None
