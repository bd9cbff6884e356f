"""Processor tests: set-1 golden inputs of the official processor, a tiny multilingual BPE tokenizer,
placeholder expansion and index shifts, collation and buckets, chat template, training labels,
and bad prompts."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jinavlm_jax.processing import (ImageInputError, ImageProcessor, PreprocessConfig, ProcessingError, Processor,
                                    PromptError, TextTokenizer, TokenizerError)

SPECIAL = ["<|endoftext|>", "<|im_end|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"]
SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund.",
    "zh": "敏捷的棕色狐狸跳过了懒狗。",
    "ar": "الثعلب البني السريع يقفز فوق الكلب الكسول.",
}
TRAIN_TEXT = list(SENTENCES.values()) + [
    "Describe the image in detail.", "Beschreibe das Bild ausführlich.", "请详细描述这张图片。",
    "صف الصورة بالتفصيل.", "User: What is in the picture? Assistant: A cat on a sofa."]
SET1_KEYS = ["input_ids", "attention_mask", "images", "image_masks", "image_input_idx"]


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a few multilingual sentences, plus the special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def proc(bpe_path):
    return Processor(bpe_path)


# ------------------------------------------------------------------ set 1 golden inputs (acceptance 2)

@pytest.mark.parametrize("which", ["main", "batch"])
def test_set1_matches_official_processor(testdata, which):
    info = json.loads((testdata / "set1_info.json").read_text())["inputs"][which]
    gold = np.load(testdata / f"set1_{which}.npz")
    proc = Processor(testdata / "tiny_tokenizer.json")
    text, files = info["text"], info["image_files"]
    if isinstance(text, str):
        out = proc(text, [testdata / f for f in files])
    else:
        out = proc(text, [[testdata / f for f in fs] for fs in files])
    for key in SET1_KEYS:
        assert out[key].shape == gold[key].shape, key
        assert out[key].dtype == gold[key].dtype, key
    # Tolerance 1e-6 on pixels (acceptance 2); measured maximum 0.0 (bit-equal resize).
    assert float(np.abs(out["images"] - gold["images"]).max()) == 0.0
    for key in ("input_ids", "attention_mask", "image_masks"):
        np.testing.assert_array_equal(out[key], gold[key], err_msg=key)
    # Official fills unused slots with -40960 (+ pad); ours with -1: every negative means unused (spec 9.8).
    np.testing.assert_array_equal(np.maximum(out["image_input_idx"], -1), np.maximum(gold["image_input_idx"], -1))
    assert info["prompt_token_ids"] == [proc.tokenizer.encode(t) for t in ([text] if isinstance(text, str) else text)]


def test_set1_special_ids(testdata):
    proc = Processor(testdata / "tiny_tokenizer.json")
    s = proc.tokenizer.special
    assert (s.patch, s.start, s.end, s.col, s.image, s.eos, s.im_end) == (500, 501, 502, 503, 504, 510, 511)
    assert proc.bos_id == 510 and proc.stop_ids == (510, 511)


# ------------------------------------------------------------------ tokenizer (acceptance 4)

@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_bpe_round_trip(proc, lang):
    for text in (SENTENCES[lang], SENTENCES[lang][:7] + " " + SENTENCES[lang][3:]):
        ids = proc.tokenizer.encode(text)
        assert ids and max(ids) < 600
        assert proc.decode(ids) == text


def test_special_tokens_single_ids(proc):
    s = proc.tokenizer.special
    ids = {s.patch, s.start, s.end, s.col, s.image, s.eos, s.im_end}
    assert len(ids) == 7 and proc.bos_id == s.eos
    assert proc.tokenizer.encode("a<|image|>b").count(s.image) == 1


def test_tokenizer_without_image_tokens_is_refused(tmp_path):
    tok = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "<|endoftext|>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="<im_patch>.*not in the vocabulary"):
        Processor(tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="not found"):
        TextTokenizer.from_file(tmp_path / "missing.json")


def test_two_image_prompt(proc):
    s = proc.tokenizer.special
    prompt = "Bild eins: <|image|> und 图二 <|image|> صف الصورة."
    a, b = _rgb(100, 80, 1), _rgb(480, 640, 2)
    out = proc(prompt, [a, b])
    ids = out["input_ids"][0]
    blocks = [ImageProcessor(PreprocessConfig(), s.patch, s.start, s.end, s.col).process(x) for x in (a, b)]
    n_a, n_b = len(blocks[0]["image_tokens"]), len(blocks[1]["image_tokens"])

    text_ids = proc.tokenizer.encode(prompt)
    p0, p1 = [i for i, t in enumerate(text_ids) if t == s.image]
    start_a = 1 + p0                      # after BOS and the text before the first placeholder
    start_b = start_a + n_a + (p1 - p0 - 1)
    assert ids[0] == proc.bos_id and len(ids) == 1 + len(text_ids) - 2 + n_a + n_b
    np.testing.assert_array_equal(ids[start_a:start_a + n_a], blocks[0]["image_tokens"])
    np.testing.assert_array_equal(ids[start_b:start_b + n_b], blocks[1]["image_tokens"])
    assert proc.decode(ids[start_a + n_a:start_b]) == proc.decode(text_ids[p0 + 1:p1])
    assert proc.decode(ids[start_b + n_b:]) == proc.decode(text_ids[p1 + 1:])

    t_a = len(blocks[0]["images"])
    idx = out["image_input_idx"][0]
    for k, (blk, start, rows) in enumerate([(blocks[0], start_a, slice(0, t_a)),
                                            (blocks[1], start_b, slice(t_a, None))]):
        expected = np.where(blk["image_input_idx"] >= 0, blk["image_input_idx"] + start, -1)
        np.testing.assert_array_equal(idx[rows], expected, err_msg=f"image {k}")
        np.testing.assert_array_equal(out["images"][0, rows], blk["images"])
    valid = idx[idx >= 0]
    assert (ids[valid] == s.patch).all() and len(np.unique(valid)) == (ids == s.patch).sum()


# ------------------------------------------------------------------ collation (acceptance 5)

def test_left_padded_batch_text_only_and_image(proc):
    image_prompt = " User: <|image|>Describe the image. Assistant:"
    text_prompt = " User: The quick brown fox? Assistant:"
    single = proc(image_prompt, _rgb(300, 400))
    out = proc([text_prompt, image_prompt], [None, _rgb(300, 400)])
    n_text, n_img = len(proc.tokenizer.encode(text_prompt)) + 1, single["input_ids"].shape[1]
    L, T = out["input_ids"].shape[1], single["images"].shape[1]
    assert L == n_img and out["images"].shape == (2, T, 729, 588)
    pad = L - n_text
    # row 0: text only, left padded
    assert (out["input_ids"][0, :pad] == -1).all() and out["input_ids"][0, pad] == proc.bos_id
    assert out["attention_mask"][0].tolist() == [False] * pad + [True] * n_text
    assert (out["images"][0] == -1).all() and (out["image_masks"][0] == -1).all()
    assert (out["image_input_idx"][0] == -1).all()
    # row 1: no padding, identical to the single-sample call
    for key in ("input_ids", "images", "image_masks", "image_input_idx", "attention_mask"):
        np.testing.assert_array_equal(out[key][1], single[key][0], err_msg=key)
    assert out["attention_mask"].dtype == bool and out["image_masks"].dtype == np.int64

    # swap the lengths: the image row is the one padded, so its valid indices shift by the pad (6.1 step 5)
    long_text = " User: " + " ".join(SENTENCES.values()) * 40 + " Assistant:"
    out2 = proc([image_prompt, long_text], [_rgb(300, 400), None])
    pad2 = out2["input_ids"].shape[1] - n_img
    assert pad2 > 0
    idx = out2["image_input_idx"][0]
    ref = single["image_input_idx"][0]
    np.testing.assert_array_equal(idx[ref >= 0], ref[ref >= 0] + pad2)
    assert (idx[ref < 0] == -1).all()
    ids = out2["input_ids"][0]
    assert (ids[idx[idx >= 0]] == proc.tokenizer.special.patch).all()
    np.testing.assert_array_equal(out2["attention_mask"], out2["input_ids"] != -1)


def test_right_padding_keeps_indices(proc):
    prompts = [" User: <|image|>Hi Assistant:", " User: " + SENTENCES["de"] * 5 + " Assistant:"]
    single = proc(prompts[0], _rgb(60, 60))
    out = proc(prompts, [_rgb(60, 60), None], padding_side="right")
    n = single["input_ids"].shape[1]
    np.testing.assert_array_equal(out["input_ids"][0, :n], single["input_ids"][0])
    assert (out["input_ids"][0, n:] == -1).all() and out["attention_mask"][0].sum() == n
    np.testing.assert_array_equal(out["image_input_idx"][0], single["image_input_idx"][0])


def test_text_only_batch_has_zero_crops(proc):
    out = proc(["hello", "the quick brown fox"])
    assert out["images"].shape == (2, 0, 729, 588) and out["image_input_idx"].shape == (2, 0, 196)
    assert out["image_masks"].shape == (2, 0, 729)


def test_shape_buckets(proc):
    budget = proc.crop_budget(1)
    assert budget == 13
    shapes = set()
    for h, w in [(50, 50), (480, 640), (750, 1000), (3000, 400)]:
        out = proc(" User: <|image|>What? Assistant:", _rgb(h, w), pad_crops_to=budget, pad_length_to=[512, 2048])
        shapes.add(tuple((k, v.shape) for k, v in sorted(out.items())))
        t = 1 + np.prod(proc.image_processor.tiling(h, w))
        assert (out["images"][0, t:] == -1).all() and (out["image_input_idx"][0, t:] == -1).all()
        assert out["input_ids"].shape[1] in (512, 2048)
    assert len({dict(s)["images"] for s in shapes}) == 1
    text_only = proc("no image", pad_crops_to=budget, pad_length_to=64)
    assert text_only["images"].shape == (1, 13, 729, 588) and text_only["input_ids"].shape == (1, 64)
    with pytest.raises(PromptError, match="crop count 13 exceeds the largest bucket 5"):
        proc("<|image|>", _rgb(750, 1000), pad_crops_to=5)
    with pytest.raises(PromptError, match="sequence length .* exceeds the largest bucket 16"):
        proc("<|image|>", _rgb(60, 60), pad_length_to=16)
    bucketed = Processor(proc.tokenizer, pad_crops_to=26, pad_length_to=4096)
    assert bucketed("<|image|>", _rgb(60, 60))["images"].shape[1] == 26


# ------------------------------------------------------------------ chat template and training

def test_chat_template(proc):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert proc.apply_chat_template(msgs) == " User: <|image|>What is this? Assistant:"
    multi = msgs + [{"role": "assistant", "content": "A fox."}, {"role": "user", "content": "Colour?"}]
    assert proc.apply_chat_template(multi) == \
        " User: <|image|>What is this? Assistant: A fox. User: Colour? Assistant:"
    assert proc.apply_chat_template(multi[:2], add_generation_prompt=False) == \
        " User: <|image|>What is this? Assistant: A fox."
    no_space = Processor(proc.tokenizer, always_start_with_space=False)
    assert no_space.apply_chat_template([{"role": "user", "content": "Hi"}]) == "User: Hi Assistant:"
    with pytest.raises(PromptError, match="role"):
        proc.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(PromptError, match="part 0"):
        proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


def test_training_batch_labels_and_loss_mask(proc):
    convs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
         {"role": "assistant", "content": "The quick brown fox."}],
        [{"role": "user", "content": "Bild?"}, {"role": "assistant", "content": "Der Hund."},
         {"role": "user", "content": "请详细描述这张图片。"}, {"role": "assistant", "content": "الكلب الكسول."}],
    ]
    out = proc.training_batch(convs, [_rgb(100, 150), None])
    eos = proc.tokenizer.special.eos
    assert out["labels"].shape == out["input_ids"].shape == out["loss_mask"].shape
    for b, answers in enumerate([["The quick brown fox."], ["Der Hund.", "الكلب الكسول."]]):
        ids, labels, mask = out["input_ids"][b], out["labels"][b], out["loss_mask"][b]
        n = int(out["attention_mask"][b].sum())
        assert out["attention_mask"][b, :n].all()                                 # right padded
        np.testing.assert_array_equal(labels[:n - 1], ids[1:n])                   # labels = next token
        assert labels[n - 1] == eos and mask[n - 1] and not mask[n:].any()
        # one contiguous run of loss positions per answer; the last one ends with EOS. (Whether the
        # space after "Assistant:" belongs to the first answer token depends on the BPE merges.)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        runs = [proc.decode(labels[a:e], skip_special_tokens=False).strip() for a, e in edges.reshape(-1, 2)]
        assert runs == answers[:-1] + [answers[-1] + "<|endoftext|>"]
        assert not mask[labels == proc.tokenizer.special.patch].any()
    # the image indices are those of the inference prompt for the same conversation
    prompt = proc.apply_chat_template(convs[0][:1])
    infer = proc(prompt, _rgb(100, 150), padding_side="right")
    np.testing.assert_array_equal(out["image_input_idx"][0], infer["image_input_idx"][0])
    n = infer["input_ids"].shape[1]
    np.testing.assert_array_equal(out["input_ids"][0, :n], infer["input_ids"][0])
    with pytest.raises(PromptError, match="no assistant message"):
        proc.training_batch([[{"role": "user", "content": "hi"}]])


def test_trailing_eos_dropped_like_official(proc):
    a = proc("hello<|endoftext|>")["input_ids"][0]
    b = proc("hello")["input_ids"][0]
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ bad prompts (acceptance 6)

@pytest.mark.parametrize("prompt,n_images,needle", [
    ("<|image|> <|image|> two?", 1, "2 <\\|image\\|> placeholder\\(s\\) but 1 image"),
    ("<|image|> one", 2, "1 <\\|image\\|> placeholder\\(s\\) but 2 image"),
    ("no placeholder", 1, "0 <\\|image\\|> placeholder\\(s\\) but 1 image"),
    ("<|image|> none given", 0, "1 <\\|image\\|> placeholder\\(s\\) but 0 image"),
])
def test_placeholder_count_mismatch(proc, prompt, n_images, needle):
    with pytest.raises(PromptError, match=needle):
        proc(prompt, [_rgb(20, 20)] * n_images)


def test_prompt_over_max_length(bpe_path):
    small = Processor(bpe_path, max_length=300)
    with pytest.raises(PromptError, match=r"sample 0: 4\d\d tokens \(\d+ text \+ 424 image\) exceed .* 300"):
        small("<|image|>", _rgb(60, 60))
    with pytest.raises(PromptError, match="exceed the model's max sequence length 300"):
        small(SENTENCES["en"] * 60)
    assert small(SENTENCES["en"])["input_ids"].shape[1] < 300


def test_batch_argument_errors(proc):
    with pytest.raises(PromptError, match="2 prompts need a list of 2 image entries"):
        proc(["<|image|>", "<|image|>"], [_rgb(20, 20)])
    with pytest.raises(PromptError, match="padding_side"):
        proc("hi", padding_side="middle")
    with pytest.raises(PromptError, match="no prompts"):
        proc([])
    with pytest.raises(ImageInputError, match="sample 1, image 0: .*not a readable image"):
        proc(["<|image|>", "<|image|>"], [_rgb(20, 20), b"garbage"])


# ------------------------------------------------------------------ from_dir

def test_from_dir(tmp_path, bpe_path, testdata):
    (tmp_path / "tokenizer.json").write_text(bpe_path.read_text())
    assert Processor.from_dir(tmp_path).max_length == 40960
    assert Processor.from_dir(tmp_path).config == PreprocessConfig()
    cfg = json.loads((testdata / "jina-vlm-2.4b_config.json").read_text())
    cfg["text_config"]["max_sequence_length"] = 1000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    pre = json.loads((testdata / "jina-vlm_preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**pre, "max_crops": 6}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"always_start_with_space": False}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<|im_end|>"}}))
    p = Processor.from_dir(tmp_path)
    assert p.max_length == 1000 and p.config.max_crops == 6 and not p.always_start_with_space
    assert p.bos_id == p.tokenizer.special.im_end != p.tokenizer.special.eos
    assert p("hi")["input_ids"][0, 0] == p.bos_id
    assert Processor.from_dir(tmp_path, max_length=50).max_length == 50
    with pytest.raises(ProcessingError, match="not a directory"):
        Processor.from_dir(tmp_path / "nope")
