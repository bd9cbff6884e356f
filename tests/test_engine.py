"""The continuous-batching engine on a self-contained tiny model (no golden data needed).

Independent reference: `generate()` (a static batch through its own while-loop decode). Greedy
requests must give generate()'s tokens; every request, whatever its sampling, must give exactly the
tokens it gets when sent alone, while 16 requests with different images, prompts, max_tokens and
seeds share 4 slots (so most are admitted while others are mid-decode).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from jax import monitoring

from jinavlm_jax import checkpoint
from jinavlm_jax.generate import Sampling, generate
from jinavlm_jax.inference.engine import Engine, QueueFull, RequestError
from jinavlm_jax.processing import Processor
from jinavlm_jax.testing import png_bytes

pytestmark = pytest.mark.slow  # compiles the engine / starts servers: minutes on 2 cores

COMPILED = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def model(tiny_vlm_dir):
    config, params = checkpoint.load(tiny_vlm_dir / "ckpt")
    return config, params, Processor.from_dir(tiny_vlm_dir)


@pytest.fixture(scope="module")
def engine(model):
    config, params, proc = model
    eng = Engine(config, params, proc, max_batch=4, max_model_len=1024, max_images=2, max_queue=64,
                 vision_cache=4).start()
    yield eng
    eng.stop(timeout=5)


IMAGES = [png_bytes(300, 200, 1), png_bytes(200, 360, 2), png_bytes(500, 380, 3)]
WORDS = "what colour is the shape how many where left right top bottom".split()


def chat(proc, text: str, n_images: int) -> str:
    return proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n_images
                                      + [{"type": "text", "text": text}]}])


def requests(proc):
    """16 requests: 0-2 images (repeats included), prompts of different lengths, max_tokens 1-24,
    greedy and sampled (temperature, top-k, top-p) with different seeds."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(16):
        n_img = [0, 1, 1, 2][i % 4]
        imgs = [IMAGES[(i + k) % 3] for k in range(n_img)]
        text = " ".join(rng.choice(WORDS, 1 + 3 * (i % 5)))
        sampling = [Sampling(), Sampling(0.9), Sampling(1.2, top_k=5), Sampling(0.7, top_p=0.8)][i % 4]
        out.append(dict(prompt=chat(proc, text, n_img), images=imgs, max_tokens=1 + (i * 7) % 24,
                        sampling=sampling, seed=100 + i))
    return out


def run_all(engine, reqs, stagger: float = 0.0) -> list[list[int]]:
    """Submit every request (optionally one every `stagger` seconds) and wait for all of them."""
    results = [[] for _ in reqs]
    done = [threading.Event() for _ in reqs]

    def sink_for(i):
        def sink(out):
            results[i].append(out)
            if out.finish_reason:
                done[i].set()
        return sink

    for i, r in enumerate(reqs):
        engine.submit(r["prompt"], r["images"], max_tokens=r["max_tokens"], sampling=r["sampling"],
                      seed=r["seed"], sink=sink_for(i))
        if stagger:
            done[i].wait(stagger)
    for d in done:
        assert d.wait(120), "a request did not finish"
    return results


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def test_batching_gives_every_request_its_own_tokens(engine, model):
    """Acceptance 2: 16 concurrent requests == each sent alone; greedy ones == generate()."""
    config, params, proc = model
    reqs = requests(proc)
    events = []
    listener = lambda name, *a, **k: events.append(name) if name == COMPILED else None
    monitoring.register_event_duration_secs_listener(listener)
    try:
        together = run_all(engine, reqs)
        alone = [run_all(engine, [r])[0] for r in reqs]
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert not events, f"{len(events)} compilations after warm-up"
    for i, (a, b) in enumerate(zip(together, alone)):
        assert tokens(a) == tokens(b), f"request {i}: batched {tokens(a)} != alone {tokens(b)}"
        assert a[-1].finish_reason == b[-1].finish_reason in ("stop", "length")
        assert "".join(o.text for o in a) == "".join(o.text for o in b)
    for i in (0, 4, 8, 12):  # the greedy ones, against the independent static-batch path
        r = reqs[i]
        g = generate(config, params, proc([r["prompt"]], [r["images"]]), max_new_tokens=r["max_tokens"],
                     stop_ids=proc.stop_ids, tokenizer=proc)
        stop = [] if g.stop_tokens[0] is None else [g.stop_tokens[0]]
        assert tokens(together[i]) == g.tokens[0] + stop
        assert "".join(o.text for o in together[i]) == g.texts[0]
        assert together[i][-1].prompt_tokens == int(proc([r["prompt"]], [r["images"]])["attention_mask"].sum())


def test_admission_mid_decode_does_not_change_running_requests(engine, model):
    proc = model[2]
    reqs = requests(proc)[:6]
    for r in reqs:
        r["max_tokens"] = 24
    alone = [tokens(run_all(engine, [r])[0]) for r in reqs]
    staggered = [tokens(o) for o in run_all(engine, reqs, stagger=0.01)]
    assert staggered == alone


def test_vision_cache_runs_the_vit_once_per_image(engine, model):
    proc = model[2]
    image = png_bytes(240, 240, 9)
    before = engine.stats()["images_encoded"]
    first = run_all(engine, [dict(prompt=chat(proc, "what colour", 1), images=[image], max_tokens=4,
                                  sampling=Sampling(), seed=0)])
    again = run_all(engine, [dict(prompt=chat(proc, "what colour", 1), images=[image], max_tokens=4,
                                  sampling=Sampling(), seed=0)])
    assert engine.stats()["images_encoded"] == before + 1
    assert tokens(first[0]) == tokens(again[0])


def test_stop_strings_cut_the_text_and_end_the_request(engine, model):
    proc = model[2]
    base = dict(prompt=chat(proc, "how many", 0), images=[], max_tokens=20, sampling=Sampling(), seed=0)
    full = run_all(engine, [base])[0]
    text = "".join(o.text for o in full)
    assert len(text) > 4, text
    stop = text[3:5]
    results = []
    done = threading.Event()
    engine.submit(base["prompt"], [], max_tokens=20, stop=[stop],
                  sink=lambda o: (results.append(o), o.finish_reason and done.set()))
    assert done.wait(60)
    assert "".join(o.text for o in results) == text[:text.find(stop)]
    assert results[-1].finish_reason == "stop"


def test_bad_requests_are_refused_with_the_limit_named(engine, model):
    proc = model[2]
    with pytest.raises(RequestError, match="max_model_len=1024"):
        engine.submit(chat(proc, "red " * 1100, 0), [], max_tokens=1, sink=print)
    with pytest.raises(RequestError, match="at most 2"):
        engine.submit(chat(proc, "x", 3), IMAGES, max_tokens=1, sink=print)
    with pytest.raises(RequestError, match="image 0"):
        engine.submit(chat(proc, "x", 1), [b"not an image"], max_tokens=1, sink=print)
    with pytest.raises(RequestError, match="placeholder"):
        engine.submit(chat(proc, "x", 0), [IMAGES[0]], max_tokens=1, sink=print)


def test_full_queue_raises(model):
    config, params, proc = model
    eng = Engine(config, params, proc, max_batch=1, max_model_len=1024, max_queue=1).start(warmup=False)
    try:
        admitted = threading.Event()
        long = chat(proc, "red", 0)
        eng.submit(long, [], max_tokens=900, sink=lambda o: admitted.set())
        assert admitted.wait(60)
        eng.submit(long, [], max_tokens=900, sink=lambda o: None)       # waits for the slot
        with pytest.raises(QueueFull, match="--max-queue 1"):
            eng.submit(long, [], max_tokens=900, sink=lambda o: None)
    finally:
        eng.stop(timeout=0)
    assert eng.stats()["finished_cancelled"] == 2


def test_sharded_engine_gives_the_same_tokens(tiny_vlm_dir):
    """On 8 simulated devices (slots over data x fsdp, heads over tensor) the engine gives the tokens
    it gives on one device, greedy and sampled, with and without images."""
    from test_sharding import run_8_devices
    script = f"""
import json, threading
from jinavlm_jax import checkpoint
from jinavlm_jax.generate import Sampling
from jinavlm_jax.inference.engine import Engine
from jinavlm_jax.processing import Processor
from jinavlm_jax.sharding import make_mesh
from jinavlm_jax.testing import png_bytes
config, params = checkpoint.load({str(tiny_vlm_dir / "ckpt")!r})
proc = Processor.from_dir({str(tiny_vlm_dir)!r})
def run(mesh):
    eng = Engine(config, params, proc, max_batch=4, max_model_len=1024, mesh=mesh).start(warmup=False)
    out, done = {{}}, []
    for i, (n, s) in enumerate([(1, Sampling()), (0, Sampling(0.9, top_k=5)), (1, Sampling(0.8)), (0, Sampling())]):
        p = proc.apply_chat_template([{{"role": "user", "content": [{{"type": "image"}}] * n
                                       + [{{"type": "text", "text": "red blue " * (i + 1)}}]}}])
        ev = threading.Event(); done.append(ev); out[i] = []
        eng.submit(p, [png_bytes(300, 200, i)] * n, max_tokens=10, sampling=s, seed=i,
                   sink=lambda o, i=i, ev=ev: (out[i].extend(o.token_ids), o.finish_reason and ev.set()))
    assert all(ev.wait(300) for ev in done)
    eng.stop(0)
    return [out[i] for i in range(4)]
print(json.dumps([run(None), run(make_mesh(data=2, fsdp=2, tensor=2))]))
"""
    import json
    one, sharded = json.loads(run_8_devices(script))
    assert all(len(t) == 10 for t in one)
    assert sharded == one


def test_prompt_bucket_longer_than_the_slot(model):
    """max_model_len 300: slots of 384 positions, while a 290-token prompt is prefilled in the 512
    bucket; its tokens still equal generate()'s."""
    config, params, proc = model
    eng = Engine(config, params, proc, max_batch=2, max_model_len=300).start(warmup=False)
    try:
        k = 1
        while (n := int(proc([prompt := chat(proc, " ".join(["red"] * k), 0)])["attention_mask"].sum())) <= 256:
            k += 1
        assert 256 < n <= 290 and eng.cache_length == 384
        out = run_all(eng, [dict(prompt=prompt, images=[], max_tokens=300 - n, sampling=Sampling(), seed=0)])[0]
    finally:
        eng.stop(timeout=0)
    g = generate(config, params, proc([prompt]), max_new_tokens=300 - n, stop_ids=proc.stop_ids)
    assert tokens(out) == g.tokens[0] + ([] if g.stop_tokens[0] is None else [g.stop_tokens[0]])


def test_int8_kv_cache_engine_gives_generates_tokens(model):
    """kv_cache_dtype="int8": the engine quantizes a prefix as it inserts it (per token, so the codes do
    not depend on where the slot puts it) and decodes over int8 codes; greedy requests with and
    without images give generate()'s tokens with the same int8 cache."""
    config, params, proc = model
    eng = Engine(config, params, proc, max_batch=2, max_model_len=1024, kv_cache_dtype="int8").start(warmup=False)
    reqs = [dict(r, sampling=Sampling()) for r in requests(proc)[1:4]]  # 1, 1 and 2 images
    assert [len(r["images"]) for r in reqs] == [1, 1, 2]
    try:
        got = run_all(eng, reqs)
    finally:
        eng.stop(timeout=0)
    for r, out in zip(reqs, got):
        g = generate(config, params, proc([r["prompt"]], [r["images"]]), max_new_tokens=r["max_tokens"],
                     stop_ids=proc.stop_ids, kv_cache_dtype="int8")
        assert tokens(out) == g.tokens[0] + ([] if g.stop_tokens[0] is None else [g.stop_tokens[0]])
