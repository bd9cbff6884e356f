"""A small synthetic multilingual VQA corpus: rendered shapes with colours, counts and positions.

    write_synthetic_vqa("runs/demo/raw", n_train=6000, n_val=300, languages=("en", "de", "zh", "ar"))

writes, in the JSONL layout that `jinavlm_jax.data.builder` reads:

    raw/vqa/{train,validation}.jsonl     image questions (one 378x378 PNG each, under raw/vqa/images/)
    raw/text/{train,validation}.jsonl    text-only questions (word translations between the languages)

Each image (`size` x `size` pixels, 378 by default) holds one to four shapes (circle, square,
triangle) of one colour on a light background.
Questions ask, in English, German, Chinese or Arabic, for the colour, the shape, the count or the
position (left / right / top / bottom) and are answered in the same language; a share are
multiple-choice colour questions answered with a letter ("Return only the letter."). With `size`
equal to the processor's crop size, every image is exactly one tile plus the thumbnail.
Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 378
COLOURS = {  # name -> RGB
    "red": (215, 35, 35), "green": (40, 160, 60), "blue": (35, 80, 215),
    "yellow": (235, 200, 25), "purple": (140, 55, 175), "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3, 4)

WORDS = {
    "en": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple",
           "orange": "orange", "circle": "circle", "square": "square", "triangle": "triangle",
           "left": "left", "right": "right", "top": "top", "bottom": "bottom",
           1: "one", 2: "two", 3: "three", 4: "four"},
    "de": {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "purple": "lila",
           "orange": "orange", "circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck",
           "left": "links", "right": "rechts", "top": "oben", "bottom": "unten",
           1: "eins", 2: "zwei", 3: "drei", 4: "vier"},
    "zh": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
           "orange": "橙色", "circle": "圆形", "square": "正方形", "triangle": "三角形",
           "left": "左边", "right": "右边", "top": "上面", "bottom": "下面",
           1: "一个", 2: "两个", 3: "三个", 4: "四个"},
    "ar": {"red": "أحمر", "green": "أخضر", "blue": "أزرق", "yellow": "أصفر", "purple": "بنفسجي",
           "orange": "برتقالي", "circle": "دائرة", "square": "مربع", "triangle": "مثلث",
           "left": "يسار", "right": "يمين", "top": "أعلى", "bottom": "أسفل",
           1: "واحد", 2: "اثنان", 3: "ثلاثة", 4: "أربعة"},
}
QUESTIONS = {
    "colour": {"en": "What colour is the shape?", "de": "Welche Farbe hat die Form?",
               "zh": "这个形状是什么颜色？", "ar": "ما لون الشكل؟"},
    "shape": {"en": "What shape is shown?", "de": "Welche Form ist zu sehen?",
              "zh": "图中是什么形状？", "ar": "ما هو الشكل في الصورة؟"},
    "count": {"en": "How many shapes are there?", "de": "Wie viele Formen gibt es?",
              "zh": "图中有几个形状？", "ar": "كم عدد الأشكال؟"},
    "position": {"en": "Where is the shape?", "de": "Wo ist die Form?",
                 "zh": "形状在哪里？", "ar": "أين يقع الشكل؟"},
}
# The paper's multiple-choice prompts end with "Return only the letter" (kept in English, as there).
CHOICE_SUFFIX = "Return only the letter."
LANGUAGE_NAMES = {
    "en": {"en": "English", "de": "German", "zh": "Chinese", "ar": "Arabic"},
    "de": {"en": "Englisch", "de": "Deutsch", "zh": "Chinesisch", "ar": "Arabisch"},
    "zh": {"en": "英语", "de": "德语", "zh": "中文", "ar": "阿拉伯语"},
    "ar": {"en": "الإنجليزية", "de": "الألمانية", "zh": "الصينية", "ar": "العربية"},
}
TRANSLATE = {
    "en": "What is \"{word}\" in {lang}?",
    "de": "Was heißt \"{word}\" auf {lang}?",
    "zh": "“{word}”用{lang}怎么说？",
    "ar": "ما معنى \"{word}\" باللغة {lang}؟",
}
TASKS = ("colour", "shape", "count", "position", "choice")
TASK_WEIGHTS = {"colour": 0.22, "shape": 0.22, "count": 0.22, "position": 0.22, "choice": 0.12}


def task_probabilities(weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Draw probabilities over `TASKS` from {task: weight} (missing tasks weigh 0; normalised)."""
    weights = TASK_WEIGHTS if weights is None else weights
    bad = sorted(set(weights) - set(TASKS))
    if bad:
        raise ValueError(f"task weights: unknown task(s) {bad} (valid: {list(TASKS)})")
    p = np.array([float(weights.get(t, 0.0)) for t in TASKS])
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"task weights: need non-negative weights with a positive sum, got {dict(weights)}")
    return p / p.sum()


def _jitter(rgb, rng, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        h = r * 1.1
        draw.polygon([(cx, cy - h), (cx - h * 0.95, cy + h * 0.75), (cx + h * 0.95, cy + h * 0.75)], fill=fill)


def render(shape: str, colour: str, centres: Sequence[tuple[float, float]], radius: float,
           rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    """A size x size RGB image with `shape`s of `colour` at `centres` on a light, slightly tinted background."""
    bg = tuple(int(v) for v in rng.integers(225, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for cx, cy in centres:
        _draw_shape(draw, shape, cx, cy, radius, _jitter(COLOURS[colour], rng))
    return im


def _place(n: int, radius: float, rng: np.random.Generator, region=None, size: int = SIZE
           ) -> list[tuple[float, float]]:
    """n non-overlapping centres inside the image (or inside `region` = (x0, y0, x1, y1))."""
    m = 8 * size / SIZE
    x0, y0, x1, y1 = region or (radius + m, radius + m, size - radius - m, size - radius - m)
    for _ in range(1000):
        pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(n)]
        if all(math.dist(a, b) > 2.3 * radius for i, a in enumerate(pts) for b in pts[i + 1:]):
            return pts
    raise RuntimeError("could not place shapes")  # cannot happen for n <= 4 at these radii


def _position_region(pos: str, r: float, size: int = SIZE):
    """Centre region for a shape that is clearly on one side (and central on the other axis)."""
    k = size / SIZE
    lo, hi, mid_lo, mid_hi = r + 8 * k, size / 3 - r / 3, size / 2 - 50 * k, size / 2 + 50 * k
    return {"left": (lo, mid_lo, hi, mid_hi), "right": (size - hi, mid_lo, size - lo, mid_hi),
            "top": (mid_lo, lo, mid_hi, hi), "bottom": (mid_lo, size - hi, mid_hi, size - lo)}[pos]


def make_vqa_example(idx: int, rng: np.random.Generator, languages: Sequence[str], size: int = SIZE,
                     task: str | None = None, lang: str | None = None, task_p: np.ndarray | None = None):
    """One (image, question, answer, meta) sample; shape sizes scale with the image `size`.
    `task` / `lang` force the question type / language (the random draws happen either way, so the
    stream of a corpus does not depend on them); `task_p`: `task_probabilities(...)` (default weights)."""
    k = size / SIZE
    drawn_task = TASKS[int(rng.choice(len(TASKS), p=task_probabilities() if task_p is None else task_p))]
    drawn_lang = languages[int(rng.integers(len(languages)))]
    task, lang = task or drawn_task, lang or drawn_lang
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    words = WORDS[lang]
    if task == "count":
        n = COUNTS[int(rng.integers(len(COUNTS)))]
        r = float(rng.uniform(26, 40)) * k
        centres = _place(n, r, rng, size=size)
        question, answer = QUESTIONS["count"][lang], words[n]
    elif task == "position":
        pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
        r = float(rng.uniform(30, 45)) * k
        centres = _place(1, r, rng, _position_region(pos, r, size), size)
        question, answer = QUESTIONS["position"][lang], words[pos]
    else:
        r = float(rng.uniform(45, 80)) * k
        centres = _place(1, r, rng, size=size)
        if task == "shape":
            question, answer = QUESTIONS["shape"][lang], words[shape]
        elif task == "colour":
            question, answer = QUESTIONS["colour"][lang], words[colour]
        else:  # multiple choice over four colours, one of them right
            others = [c for c in COLOURS if c != colour]
            opts = [colour] + [others[i] for i in rng.choice(len(others), 3, replace=False)]
            opts = [opts[i] for i in rng.permutation(4)]
            letters = "ABCD"
            lines = [f"{letters[i]}. {words[o]}" for i, o in enumerate(opts)]
            question = "\n".join([QUESTIONS["colour"][lang], *lines, CHOICE_SUFFIX])
            answer = letters[opts.index(colour)]
    image = render(shape, colour, centres, r, rng, size)
    meta = {"task": task, "lang": lang, "shape": shape, "colour": colour, "n": len(centres)}
    return image, question, answer, meta


def conversation(question: str, answer: str, with_image: bool) -> list[dict]:
    """The chat messages of one sample (an image placeholder first when there is an image)."""
    return [{"role": "user", "content": ("<|image|>" if with_image else "") + question},
            {"role": "assistant", "content": answer}]


def text_only_examples(languages: Sequence[str]) -> list[dict]:
    """Every word-translation question between the given languages (a few hundred)."""
    keys = list(COLOURS) + list(SHAPES) + list(POSITIONS) + list(COUNTS)
    out = []
    for src in languages:
        for dst in languages:
            if src == dst:
                continue
            for q_lang in (src,):
                for k in keys:
                    q = TRANSLATE[q_lang].format(word=WORDS[src][k], lang=LANGUAGE_NAMES[q_lang][dst])
                    out.append({"question": q, "answer": WORDS[dst][k],
                                "meta": {"task": "translate", "lang": q_lang, "to": dst}})
    return out


def write_synthetic_vqa(out_dir: str | Path, n_train: int = 6000, n_val: int = 300,
                        languages: Sequence[str] = ("en", "de", "zh", "ar"), seed: int = 0,
                        progress: bool = True, size: int = SIZE, task_weights: Mapping[str, float] | None = None
                        ) -> dict:
    """Write the corpus under `out_dir` (see the module docstring). Returns counts and the baseline.

    The held-out split is drawn from the same distribution with a different seed stream; the
    returned `majority_baseline` is the share of the most frequent held-out VQA answer.
    `task_weights`: {task: weight} for the question types (default `TASK_WEIGHTS`).
    """
    task_p = task_probabilities(task_weights)
    out = Path(out_dir)
    vqa, text = out / "vqa", out / "text"
    (vqa / "images").mkdir(parents=True, exist_ok=True)
    text.mkdir(parents=True, exist_ok=True)
    answers: Counter = Counter()
    bar = _progress(n_train + n_val, "rendering synthetic VQA images", progress)
    for split, n, stream in (("train", n_train, 1), ("validation", n_val, 2)):
        rng = np.random.default_rng([seed, stream])
        lines = []
        for i in range(n):
            image, question, answer, meta = make_vqa_example(i, rng, languages, size, task_p=task_p)
            name = f"images/{split}_{i:06d}.png"
            image.save(vqa / name, optimize=False, compress_level=1)
            lines.append(json.dumps({"id": f"{split}-{i}", "images": [name],
                                     "messages": conversation(question, answer, True), "meta": meta},
                                    ensure_ascii=False))
            if split == "validation":
                answers[answer] += 1
            bar.update(1)
        (vqa / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bar.close()
    examples = text_only_examples(languages)
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(len(examples))
    n_text_val = max(1, len(examples) // 10)
    for split, idx in (("validation", order[:n_text_val]), ("train", order[n_text_val:])):
        lines = [json.dumps({"id": f"text-{split}-{j}", "images": [],
                             "messages": conversation(examples[j]["question"], examples[j]["answer"], False),
                             "meta": examples[j]["meta"]}, ensure_ascii=False) for j in idx]
        (text / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    top = answers.most_common(1)[0] if answers else ("", 0)
    return {"vqa_train": n_train, "vqa_validation": n_val, "text_train": len(examples) - n_text_val,
            "text_validation": n_text_val, "majority_answer": top[0],
            "majority_baseline": top[1] / max(n_val, 1)}


# The questions `python -m jinavlm_jax` asks the shipped demo model: every type, all four languages.
SHOWCASE = (("colour", "en"), ("shape", "de"), ("count", "zh"), ("position", "ar"), ("choice", "en"),
            ("shape", "en"), ("count", "de"), ("colour", "zh"), ("position", "en"), ("colour", "ar"))


def write_showcase(out_dir: str | Path, size: int, seed: int = 7) -> list[dict]:
    """Render the `SHOWCASE` images (PNG) into `out_dir` and write `questions.json` beside them:
    [{"image", "question", "answer", "task", "lang"}]. A seed stream no corpus uses (held out)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 9])
    items = []
    for i, (task, lang) in enumerate(SHOWCASE):
        image, question, answer, meta = make_vqa_example(i, rng, tuple(WORDS), size, task=task, lang=lang)
        name = f"{i:02d}_{task}_{lang}.png"
        image.save(out / name, optimize=True)
        items.append({"image": name, "question": question, "answer": answer, "task": task, "lang": lang})
    (out / "questions.json").write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return items


def corpus_text(out_dir: str | Path) -> Iterable[str]:
    """Every question and answer of the corpus (for training the demo tokenizer)."""
    for path in sorted(Path(out_dir).glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                for m in json.loads(line)["messages"]:
                    yield m["content"].replace("<|image|>", "")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
