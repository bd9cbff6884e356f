"""The TFDS builder (array_record, no TensorFlow): layouts, bad input (acceptance 7), Apache Beam.

Bad input: an image path that does not exist and a corrupt image are skipped and counted
(`on_bad_image="skip"`) or stop the build with an error naming the file and line ("error"); a
malformed line or a placeholder / image count mismatch always stops it naming the line; an empty
source or a split with nothing usable is refused. The Beam build (DirectRunner) must write the same
records as the local build.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from jinavlm_jax.data.builder import BadImage, DataError, build_dataset, dataset_splits, open_split

MSG = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    (d / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "img" / "red.png")
    Image.new("RGB", (20, 20), (10, 10, 200)).save(d / "img" / "blue.jpg", quality=90)
    Image.new("RGBA", (16, 16), (0, 200, 0, 128)).save(d / "img" / "green.webp")
    good = (d / "img" / "red.png").read_bytes()
    (d / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "img" / "notanimage.png").write_text("hello")
    rows = [
        {"id": "a", "images": ["img/red.png"], "messages": MSG("<|image|>What colour?", "red")},
        {"id": "b", "images": ["img/blue.jpg"], "messages": MSG("What colour?", "blue")},   # placeholder added
        {"id": "c", "images": ["img/green.webp"], "messages": MSG("<|image|>Colour?", "green")},
        {"id": "d", "images": ["img/missing.png"], "messages": MSG("<|image|>?", "x")},
        {"id": "e", "images": ["img/truncated.png"], "messages": MSG("<|image|>?", "x")},
        {"id": "f", "images": ["img/notanimage.png"], "messages": MSG("<|image|>?", "x")},
        {"id": "g", "images": [], "messages": MSG("Say hi", "hi")},
        {"id": "h", "image": "img/red.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a square"}]},
    ]
    _jsonl(d / "train.jsonl", rows)
    _jsonl(d / "validation.jsonl", rows[:1])
    return d


def _records(path, split):
    ds = open_split(path, split)
    return {ds[i]["id"].decode(): ds[i] for i in range(len(ds))}


def test_build_skips_and_counts_bad_images(src, tmp_path):
    out = build_dataset(src, "mixed", tmp_path / "tfds", verbose=False)
    assert dataset_splits(out) == {"train": 5, "validation": 1}
    rep = json.loads((out / "build_report.json").read_text())["local_counts"]["train"]
    assert rep["lines"] == 8 and rep["examples"] == 5 and rep["skipped_bad_images"] == 3
    assert any("missing.png: image file not found" in s for s in rep["skipped"])
    assert any("truncated.png" in s for s in rep["skipped"]) and any("notanimage.png" in s for s in rep["skipped"])
    recs = _records(out, "train")
    assert set(recs) == {"a", "b", "c", "g", "h"}
    assert recs["a"]["images"][0].shape == (30, 40, 3) and recs["a"]["images"][0][0, 0].tolist() == [200, 10, 10]
    assert recs["c"]["images"][0].shape == (16, 16, 3)            # webp RGBA stored as an RGB PNG
    assert recs["g"]["images"] == [] or len(recs["g"]["images"]) == 0
    msgs = json.loads(recs["b"]["messages"])
    assert msgs[0]["content"] == "<|image|>What colour?"            # placeholder put first
    msgs = json.loads(recs["h"]["messages"])                        # LLaVA layout
    assert msgs == MSG("<|image|>What is it?", "a square")
    # reused, not rebuilt
    assert build_dataset(src, "mixed", tmp_path / "tfds", verbose=False) == out


def test_build_error_policy_names_file_and_line(src, tmp_path):
    with pytest.raises(BadImage, match=r"train.jsonl:4: .*missing.png: image file not found"):
        build_dataset(src, "strict", tmp_path / "tfds", on_bad_image="error", verbose=False)


@pytest.mark.parametrize("line, match", [
    ("{not json", r"bad.jsonl:2: not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), r"bad.jsonl:2: no assistant message"),
    (json.dumps({"images": ["a.png", "b.png"], "messages": MSG("<|image|>q", "a")}),
     r"bad.jsonl:2: 1 <\|image\|> placeholder\(s\) but 2 image\(s\)"),
    (json.dumps({"messages": [{"role": "robot", "content": "q"}]}), r"bad.jsonl:2: message 0 must be"),
])
def test_malformed_lines_stop_the_build(tmp_path, line, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"messages": MSG("hi", "ho")}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        build_dataset(p, "bad", tmp_path / "tfds", verbose=False)


def test_empty_sources_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="split 'train' has no usable sample"):
        build_dataset(empty, "empty", tmp_path / "tfds", verbose=False)
    d = tmp_path / "allbad"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"images": ["nope.png"], "messages": MSG("<|image|>q", "a")}])
    with pytest.raises(DataError, match=r"no usable sample \(1 read, 1 skipped for bad images\)"):
        build_dataset(d, "allbad", tmp_path / "tfds", verbose=False)
    with pytest.raises(DataError, match="data source not found"):
        build_dataset(tmp_path / "nothing_here", "x", tmp_path / "tfds", verbose=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no {split}.jsonl files and no image files"):
        build_dataset(tmp_path / "emptydir", "x", tmp_path / "tfds", verbose=False)


def test_caption_folder_and_missing_split(tmp_path):
    d = tmp_path / "caps"
    for split in ("train", "validation"):
        (d / split).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(d / split / f"{i}.png")
            (d / split / f"{i}.txt").write_text(f"a dark square number {i}")
    out = build_dataset(d, "caps", tmp_path / "tfds", verbose=False)
    assert dataset_splits(out) == {"train": 2, "validation": 2}
    rec = _records(out, "train")["0"]
    assert json.loads(rec["messages"])[1]["content"] == "a dark square number 0"
    with pytest.raises(DataError, match=r"no split 'test' \(available: \['train', 'validation'\]\)"):
        open_split(out, "test")
    with pytest.raises(DataError, match="not a built dataset"):
        open_split(d, "train")


@pytest.mark.slow
def test_beam_direct_runner_builds_the_same_records(src, tmp_path):
    pytest.importorskip("apache_beam", reason="apache-beam is an optional extra (pip install 'jinavlm-jax[beam]')")
    local = build_dataset(src, "local", tmp_path / "tfds", verbose=False)
    beam = build_dataset(src, "beam", tmp_path / "tfds", beam_runner="DirectRunner", verbose=False)
    assert dataset_splits(beam) == dataset_splits(local)
    a, b = _records(local, "train"), _records(beam, "train")
    assert set(a) == set(b)
    for k in a:
        assert a[k]["messages"] == b[k]["messages"]
        assert [x.tobytes() for x in a[k]["images"]] == [x.tobytes() for x in b[k]["images"]]


def test_record_order_does_not_depend_on_where_the_data_lives(tmp_path):
    """TFDS shuffles the built records by their keys: keys relative to the source (not absolute paths)
    give two copies of one corpus the same record order, so a training run does not depend on its
    directory."""
    order = []
    for where in ("a", "somewhere/else"):
        d = tmp_path / where / "raw"
        d.mkdir(parents=True)
        lines = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                               {"role": "assistant", "content": f"a{i}"}]} for i in range(40)]
        (d / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        out = build_dataset(d, "order", tmp_path / where / "tfds", verbose=False)
        src = open_split(out, "train")
        order.append([src[i]["id"] for i in range(len(src))])
    assert order[0] == order[1] and sorted(order[0]) != order[0]   # shuffled, and the same way
