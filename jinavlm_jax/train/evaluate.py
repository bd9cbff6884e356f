"""Evaluation during and after training: held-out loss, and accuracy of generated answers.

Generation-based accuracy greedily answers held-out questions (the conversation without its last
assistant message) with `jinavlm_jax.generate` and compares with the reference answer:

* `exact`: after normalisation (case, surrounding whitespace and punctuation, Unicode NFKC);
* `choice`: multiple-choice questions (options on lines "A. ...", or the paper's "Return only the
  letter" prompts): the first standalone option letter in the answer is compared with the reference
  letter;
* `auto` picks `choice` when the reference is a single letter and the question lists options.

The majority baseline is the accuracy of always answering the most frequent reference answer.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

_PUNCT = " \t\n\r.,;:!?。，；：！？、؟،\"'“”‘’()[]{}«»"
_OPTION_LINE = re.compile(r"(?m)^\s*\(?([A-Z])[.)]\s+\S")


def normalize_answer(text: str) -> str:
    """Lower-case, NFKC, surrounding whitespace / punctuation stripped, inner whitespace collapsed."""
    t = unicodedata.normalize("NFKC", text).casefold().strip().strip(_PUNCT)
    return re.sub(r"\s+", " ", t)


def option_letters(question: str) -> str:
    """The option letters listed in a multiple-choice question ('' when there are none)."""
    return "".join(_OPTION_LINE.findall(question))


def extract_choice(answer: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The first standalone option letter in a generated answer ('B', '(B)', 'B.', 'Answer: B')."""
    m = re.search(rf"(?<![A-Za-z])([{re.escape(letters)}])(?![A-Za-z])", answer.strip())
    return m.group(1) if m else None


def question_text(messages: Sequence[dict]) -> str:
    """The last user message's text (parts joined)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content", "")
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def metric_for(question: str, reference: str, metric: str = "auto") -> str:
    """Which metric scores this example: 'choice' or 'exact'."""
    if metric != "auto":
        return metric
    letters = option_letters(question)
    ref = reference.strip().strip(".)(")
    return "choice" if len(ref) == 1 and letters and ref in letters else "exact"


def score(prediction: str, reference: str, question: str, metric: str = "auto") -> bool:
    """True if the prediction answers correctly under the example's metric."""
    if metric_for(question, reference, metric) == "choice":
        letters = option_letters(question) or "ABCDEFGHIJ"
        return extract_choice(prediction, letters) == reference.strip().strip(".)(")
    return normalize_answer(prediction) == normalize_answer(reference)


@dataclass
class GenerationReport:
    """Accuracy of generated answers, overall and per source; the majority baseline; the predictions."""

    accuracy: float
    majority_baseline: float
    majority_answer: str
    n: int
    per_source: dict[str, dict[str, float]]
    predictions: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        out = {"gen_accuracy": self.accuracy, "majority_baseline": self.majority_baseline, "gen_n": self.n}
        for name, d in self.per_source.items():
            out[f"gen_n/{name}"] = d["n"]
            out[f"gen_accuracy/{name}"] = d["accuracy"]
            out[f"majority_baseline/{name}"] = d["majority_baseline"]
        return out


def majority(references: Sequence[str]) -> tuple[str, float]:
    """(most frequent normalised answer, its share)."""
    if not references:
        return "", 0.0
    c = Counter(normalize_answer(r) for r in references)
    ans, n = c.most_common(1)[0]
    return ans, n / len(references)


def generation_accuracy(model_cfg, params, processor, examples: Sequence[dict], *, max_new_tokens: int = 16,
                        batch_size: int = 16, metric: str = "auto", mesh=None, quantize=None,
                        kv_cache_dtype=None) -> GenerationReport:
    """Answer `examples` (from `data.pipeline.eval_examples`) greedily and score them (`quantize`,
    `kv_cache_dtype`: see `Generator`)."""
    from ..generate import Generator
    gen = Generator(model_cfg, params, mesh, quantize=quantize, kv_cache_dtype=kv_cache_dtype)
    preds: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        prompts = [processor.apply_chat_template(ex["prompt_messages"]) for ex in chunk]
        images = [list(ex["images"]) for ex in chunk]
        if not any(images):
            images = None
        batch = processor(prompts, images, padding_side="left")
        out = gen.generate(batch, max_new_tokens=max_new_tokens, stop_ids=processor.stop_ids,
                           tokenizer=processor.tokenizer)
        for ex, text in zip(chunk, out.texts):
            q = question_text(ex["prompt_messages"])
            preds.append({"source": ex["source"], "id": ex["id"], "question": q, "reference": ex["reference"],
                          "prediction": text.strip(), "metric": metric_for(q, ex["reference"], metric),
                          "correct": score(text, ex["reference"], q, metric)})
    by_src: dict[str, list[dict]] = defaultdict(list)
    for p in preds:
        by_src[p["source"]].append(p)
    per_source = {}
    for name, ps in by_src.items():
        top, base = majority([p["reference"] for p in ps])
        per_source[name] = {"accuracy": float(np.mean([p["correct"] for p in ps])), "majority_baseline": base,
                            "majority_answer": top, "n": len(ps)}
    ans, base = majority([p["reference"] for p in preds])
    acc = float(np.mean([p["correct"] for p in preds])) if preds else 0.0
    return GenerationReport(acc, base, ans, len(preds), per_source, preds)


def heldout_loss(eval_fn, state, batches) -> dict[str, float]:
    """Token-level loss and next-token accuracy over held-out batches (global arrays)."""
    loss = correct = tokens = 0.0
    for b in batches:
        s = eval_fn(state, b)
        loss += float(s["loss_sum"])
        correct += float(s["correct"])
        tokens += float(s["tokens"])
    if tokens == 0:
        return {"loss": float("nan"), "token_accuracy": float("nan"), "tokens": 0.0}
    return {"loss": loss / tokens, "token_accuracy": correct / tokens, "tokens": tokens}
