"""A small byte-level BPE tokenizer for the demo, trained on its corpus with `tokenizers`.

The layout follows the released tokenizer: the base vocabulary (which the LM head covers) holds the
text tokens plus `<|endoftext|>` (EOS / BOS / pad) and `<|im_end|>`; the six image tokens come after
it, in the rows of the embedding table's `new_embedding` part (spec 1.4, trap 17), so they can never
be generated. The processor finds all of them by string.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT_SPECIALS = ("<|endoftext|>", "<|im_end|>")
IMAGE_SPECIALS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>", "<im_slice>")


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> dict:
    """Train and save `tokenizer.json` (+ tokenizer_config.json) in `out_dir`.

    Returns {"path", "vocab_size" (base rows, for the LM head), "additional_vocab_size" (image-token
    rows, rounded up to 8)}.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TEXT_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The chat template's words are part of every sample: teach them to the merges too.
    template = [" User: ", " Assistant: ", "Return only the letter."]
    tok.train_from_iterator(list(texts) + template * 50, trainer=trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens(list(IMAGE_SPECIALS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None,
         "model_max_length": 40960}, indent=1))
    extra = len(IMAGE_SPECIALS)
    return {"path": str(out / "tokenizer.json"), "vocab_size": base,
            "additional_vocab_size": -(-extra // 8) * 8}
