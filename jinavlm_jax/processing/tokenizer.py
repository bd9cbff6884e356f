"""`TextTokenizer`: a `tokenizers` tokenizer.json plus the special-token ids the pipeline needs (spec 1.4).

The ids are looked up by string, never hard-coded (mlx-vlm's hard-coded ids are wrong for the real
tokenizer), and each special token must encode to exactly one id.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from .errors import TokenizerError

IMAGE_PATCH = "<im_patch>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
IMAGE_COL = "<im_col>"
IMAGE_PROMPT = "<|image|>"       # prompt placeholder, replaced by the image's token block
END_OF_TEXT = "<|endoftext|>"     # EOS, pad, and BOS when the tokenizer has none (spec 6.1 step 3)
CHAT_END = "<|im_end|>"           # optional extra stop token


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens, resolved from the tokenizer."""

    patch: int
    start: int
    end: int
    col: int
    image: int
    eos: int
    bos: int
    im_end: int | None


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer`: plain encoding (no special tokens added), decoding, special ids.

    `bos_token`: the BOS string if the tokenizer has one (from tokenizer_config.json); None means
    `<|endoftext|>` is used, as the official processor falls back to EOS.
    """

    def __init__(self, tokenizer: Tokenizer, name: str = "tokenizer", bos_token: str | None = None):
        self.tokenizer = tokenizer
        self.name = name
        self.special = SpecialIds(
            patch=self._one_id(IMAGE_PATCH), start=self._one_id(IMAGE_START), end=self._one_id(IMAGE_END),
            col=self._one_id(IMAGE_COL), image=self._one_id(IMAGE_PROMPT), eos=self._one_id(END_OF_TEXT),
            bos=self._one_id(bos_token or END_OF_TEXT),
            im_end=self._one_id(CHAT_END) if tokenizer.token_to_id(CHAT_END) is not None else None)

    @classmethod
    def from_file(cls, path: str | Path, bos_token: str | None = None) -> "TextTokenizer":
        """Load `tokenizer.json` (a file, or a directory holding it and optionally tokenizer_config.json).

        The BOS string comes from `bos_token`, else from tokenizer_config.json's `bos_token` when the
        directory has one, else there is none (`<|endoftext|>` is used).
        """
        p = Path(path)
        cfg_path = None
        if p.is_dir():
            cfg_path, p = p / "tokenizer_config.json", p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"{p}: tokenizer.json not found")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises its own Exception type for malformed JSON
            raise TokenizerError(f"{p}: cannot load the tokenizer ({e})") from None
        if bos_token is None and cfg_path is not None and cfg_path.is_file():
            bos_token = _token_string(json.loads(cfg_path.read_text()).get("bos_token"))
        return cls(tok, str(p), bos_token)

    def _one_id(self, token: str) -> int:
        vocab_id = self.tokenizer.token_to_id(token)
        ids = self.tokenizer.encode(token, add_special_tokens=False).ids
        if vocab_id is None or ids != [vocab_id]:
            found = "is not in the vocabulary" if vocab_id is None else f"encodes to {len(ids)} ids {ids[:8]}"
            raise TokenizerError(f"{self.name}: special token {token!r} {found}; it must encode to exactly "
                                 "one id: add it to the tokenizer as an added (special) token")
        return vocab_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added (spec 6.1 step 1)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and their (start, end) character offsets in `text`."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; negative ids (padding) are dropped."""
        return self.tokenizer.decode([int(i) for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: `<|endoftext|>` and, where the tokenizer has it, `<|im_end|>`."""
        s = self.special
        return (s.eos,) if s.im_end is None else (s.eos, s.im_end)


def _token_string(value) -> str | None:
    """A tokenizer_config.json token entry (a string, or a dict with `content`) as a string."""
    if isinstance(value, dict):
        return value.get("content")
    return value
