"""The grain pipeline: mixture schedule, per-process sharding, processing, packing, checkpointable state,
and bad input at read time (acceptance 7: over-long samples truncated with a warning or rejected;
undecodable images skipped and counted, or a clear error)."""
from __future__ import annotations

import io
import json
import warnings
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from jinavlm_jax.data.builder import DataError
from jinavlm_jax.data.pipeline import (BatchSpec, EncodeSample, EncodeSpec, MixtureMap, SourceSpec, eval_dataset,
                                       train_dataset)
from jinavlm_jax.processing import Processor

from test_train_support import shared_setup


# ---------------------------------------------------------------------------------------- the schedule

def test_mixture_proportions_and_single_source_phase():
    m = MixtureMap([0.85, 0.15], global_batch=20, local_batch=20, process_index=0, single_source_steps=10, seed=3)
    # Phase 1: every global batch comes from one source, drawn by weight.
    for k in range(10):
        assert len({m[k * 20 + r][0] for r in range(20)}) == 1
    # Phase 2: 17:3 in every batch of 20, and no source index is used twice.
    counts = Counter(m[200 + i][0] for i in range(2000))
    assert counts == {0: 1700, 1: 300}
    seen = [m[i] for i in range(200 + 2000)]
    assert len(seen) == len(set(seen))
    first_phase2 = {src: min(idx for s, idx in seen[200:] if s == src) for src in (0, 1)}
    used_phase1 = Counter(s for s, _ in seen[:200])
    assert first_phase2 == {0: used_phase1[0], 1: used_phase1[1]}   # each source continues where it was


def test_processes_read_their_rows_of_the_same_global_batches():
    one = MixtureMap([0.5, 0.3, 0.2], 8, 8, 0, single_source_steps=3, seed=0)
    procs = [MixtureMap([0.5, 0.3, 0.2], 8, 4, p, single_source_steps=3, seed=0) for p in range(2)]
    for step in range(10):
        glob = [one[step * 8 + r] for r in range(8)]
        split = [procs[p][step * 4 + r] for p in range(2) for r in range(4)]
        assert glob == split


# ---------------------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    s = shared_setup(tmp_path_factory)
    proc = Processor.from_dir(s["model"])
    enc = EncodeSpec(str(s["model"]), proc.config.to_hf(), proc.always_start_with_space, seq_len=256, crops_per_row=2)
    srcs = [SourceSpec("vqa", str(s["vqa"]), "train", 0.85), SourceSpec("text", str(s["text"]), "train", 0.15)]
    return {"setup": s, "proc": proc, "enc": enc, "sources": srcs}


def _spec(env, b, length, crops, packing=False):
    return BatchSpec.for_processor(env["proc"].config, b, length, crops, packing)


def _check_rows(batch, proc, packed: bool):
    """Weights sit exactly on answer tokens + EOS; image features point at <im_patch> tokens."""
    patch = proc.tokenizer.special.patch
    eos = proc.tokenizer.special.eos
    b = batch["input_ids"].shape[0]
    for r in range(b):
        seg = batch["segment_ids"][r]
        for sid in range(1, seg.max() + 1):
            pos = np.nonzero(seg == sid)[0]
            assert (np.diff(pos) == 1).all()
            assert (batch["positions"][r, pos] == np.arange(len(pos))).all()     # restart per sample
            w = batch["weights"][r, pos]
            lab = batch["labels"][r, pos]
            assert w.sum() >= 2 and lab[w > 0][-1] == eos                         # answer + <|endoftext|>
            assert (batch["input_ids"][r, pos[1:]] == lab[:-1]).all()              # labels = next tokens
        idx = batch["image_input_idx"][r]
        used = idx[idx >= 0]
        assert (batch["input_ids"][r, used] == patch).all()
        n_patch = int((batch["input_ids"][r] == patch).sum())
        assert len(used) == n_patch                                                # every patch token fed
        if not packed:
            assert seg.max() <= 1


def test_batches_padding_and_packing(env):
    for packing in (False, True):
        spec = _spec(env, 4, 512 if packing else 256, 4 if packing else 2, packing)
        it = iter(train_dataset(env["sources"], env["enc"], spec, global_batch=4, seed=0))
        for _ in range(3):
            b = next(it)
            assert b["input_ids"].shape == (4, spec.seq_len)
            assert b["images"].shape == (4, spec.crops_per_row, spec.n_patches, spec.patch_dim)
            _check_rows(b, env["proc"], packing)
        if packing:
            assert b["segment_ids"].max() >= 2


def test_iterator_state_resumes_exactly(env):
    spec = _spec(env, 4, 256, 2)
    ds = train_dataset(env["sources"], env["enc"], spec, global_batch=4, seed=1, single_source_steps=2)
    it = iter(ds)
    ref = [next(it) for _ in range(5)]
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))        # what the checkpoint stores
    it2 = iter(ds)
    it2.set_state(state)
    for want in ref[2:]:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The single-source phase: the first 2 batches each hold one source.
    for b in ref[:2]:
        assert len(set(b["source"].tolist())) == 1


def test_two_processes_build_the_global_batch(env):
    spec1 = _spec(env, 4, 256, 2)
    one = iter(train_dataset(env["sources"], env["enc"], spec1, global_batch=4, seed=0, process_index=0,
                             process_count=1))
    halves = [iter(train_dataset(env["sources"], env["enc"], _spec(env, 2, 256, 2), global_batch=4, seed=0,
                                 process_index=p, process_count=2)) for p in range(2)]
    for _ in range(3):
        g = next(one)
        parts = [next(h) for h in halves]
        for k in ("input_ids", "labels", "images"):
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])


def test_eval_stream_cycles_and_covers(env):
    s = env["setup"]
    held = [SourceSpec("vqa", str(s["vqa"]), "validation")]
    ds, n_cover = eval_dataset(held, env["enc"], _spec(env, 4, 256, 2), global_batch=4)
    assert n_cover == 2                                     # 8 held-out samples / 4
    it = iter(ds)
    batches = [next(it) for _ in range(3)]
    np.testing.assert_array_equal(batches[2]["input_ids"], batches[0]["input_ids"])   # cycles


# ---------------------------------------------------------------------------------------- bad input

def _record(text_q="<|image|>What colour?", image=None):
    msgs = [{"role": "user", "content": text_q}, {"role": "assistant", "content": "red"}]
    if image is None:
        buf = io.BytesIO()
        Image.new("RGB", (224, 224), (200, 20, 20)).save(buf, format="PNG")
        image = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return {"source": 0, "record": {"id": b"r1", "messages": json.dumps(msgs).encode(), "images": [image]}}


def test_too_long_truncated_with_warning_or_rejected(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = EncodeSample(EncodeSpec(**{**env["enc"].__dict__, "seq_len": 4096}))(0, _record())
    n = int(full["image_input_idx"].max()) - 2     # a cut inside the last crop's image tokens
    spec = EncodeSpec(**{**env["enc"].__dict__, "seq_len": n})
    with pytest.warns(UserWarning, match=rf"sample r1: \d+ tokens > data.seq_len={n}; truncated"):
        out = EncodeSample(spec)(0, _record())
    assert out["truncated"] and len(out["input_ids"]) == n
    assert out["image_input_idx"].max() < n and (out["image_input_idx"] == -1).any()
    out = EncodeSample(EncodeSpec(**{**spec.__dict__, "too_long": "reject"}))(0, _record())
    assert out["skip"] == "too_long" and f"data.seq_len={n}" in out["detail"]
    out = EncodeSample(EncodeSpec(**{**env["enc"].__dict__, "crops_per_row": 1, "too_long": "reject"}))(0, _record())
    assert out["skip"] == "too_long" and "crops > data.crops_per_row=1" in out["detail"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = EncodeSample(env["enc"])(0, _record())     # fits: no warning
    assert not out["truncated"]


def test_undecodable_image_skipped_or_error(env):
    bad = _record(image=b"\x89PNG not really")
    out = EncodeSample(env["enc"])(0, bad)
    assert out["skip"] == "bad_image" and "r1" in out["detail"]
    with pytest.raises(DataError, match=r"sample r1: .*data.bad_image=error"):
        EncodeSample(EncodeSpec(**{**env["enc"].__dict__, "bad_image": "error"}))(0, bad)
