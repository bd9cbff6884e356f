"""`jinavlm serve`: the OpenAI-compatible server on a self-contained tiny model.

* A real server (`jinavlm serve` in a subprocess on 127.0.0.1) and the real `openai` client:
  greedy text equals `generate()` streaming and not, usage equals the processor's counts; a client
  that disconnects mid-stream frees its slot; SIGTERM exits 0.
* The app in-process (httpx over ASGI) for the walk through every bad input: each gets its status
  and an OpenAI error object naming the problem, and a valid request is answered afterwards.
"""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from jinavlm_jax import checkpoint
from jinavlm_jax.generate import generate
from jinavlm_jax.processing import Processor
from jinavlm_jax.testing import png_bytes

openai = pytest.importorskip("openai", reason="the [test] extra (openai client) is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")

pytestmark = pytest.mark.slow  # compiles the engine / starts servers: minutes on 2 cores

IMAGE = png_bytes(300, 200, 1)
URI = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_vlm_dir, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "photo.png").write_bytes(IMAGE)
    port = free_port()
    cmd = [sys.executable, "-m", "jinavlm_jax.cli", "serve", "--checkpoint", str(tiny_vlm_dir / "ckpt"),
           "--tokenizer", str(tiny_vlm_dir), "--port", str(port), "--max-batch", "4", "--max-model-len", "1024",
           "--allowed-local-media", str(media), "--no-warmup", "--shutdown-timeout", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    yield {"base": base, "proc": proc, "media": media}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir):
    """generate()'s greedy answer and the processor's prompt count for the test request."""
    config, params = checkpoint.load(tiny_vlm_dir / "ckpt")
    proc = Processor.from_dir(tiny_vlm_dir)
    prompt = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what colour is the shape"}]}])
    batch = proc([prompt], [[IMAGE]])
    g = generate(config, params, batch, max_new_tokens=12, stop_ids=proc.stop_ids, tokenizer=proc)
    n_generated = len(g.tokens[0]) + (g.stop_tokens[0] is not None)
    return {"text": g.texts[0], "finish": g.stop_reasons[0], "prompt_tokens": int(batch["attention_mask"].sum()),
            "completion_tokens": n_generated}


MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URI}},
                                         {"type": "text", "text": "what colour is the shape"}]}]


def test_openai_client_greedy_equals_generate(server, reference):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none")
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == reference["text"]
    assert r.choices[0].finish_reason == reference["finish"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (reference["prompt_tokens"],
                                                                 reference["completion_tokens"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == reference["text"] and finish == reference["finish"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (reference["prompt_tokens"],
                                                             reference["completion_tokens"])


def test_local_media_and_models(server, reference):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none")
    path = str(server["media"] / "photo.png")
    for url in (path, "file://" + path):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what colour is the shape"}]}]
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == reference["text"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["ckpt"]


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_disconnect_mid_stream_frees_the_slot(server):
    base = server["base"]
    before = metric(base, "jinavlm_engine_finished_cancelled")
    body = {"messages": [{"role": "user", "content": "red"}], "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while metric(base, "jinavlm_engine_finished_cancelled") == before:
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.1)
    assert metric(base, "jinavlm_busy_slots") == 0
    text = httpx.get(base + "/metrics").text
    for name in ("jinavlm_time_to_first_token_seconds_bucket", "jinavlm_inter_token_latency_seconds_bucket",
                 "jinavlm_queue_depth", "jinavlm_prompt_tokens_total", "jinavlm_generated_tokens_total"):
        assert name in text


def test_sigterm_exits_zero(server):
    """Runs last in this module: stops the module's server."""
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]


# ------------------------------------------------------------------------------ bad input, in-process

@pytest.fixture(scope="module")
def app(tiny_vlm_dir, tmp_path_factory):
    from jinavlm_jax.inference.engine import Engine
    from jinavlm_jax.serve.app import create_app

    config, params = checkpoint.load(tiny_vlm_dir / "ckpt")
    proc = Processor.from_dir(tiny_vlm_dir)
    proc = Processor.from_dir(tiny_vlm_dir, config=proc.config.replace(max_image_pixels=300 * 200))
    media = tmp_path_factory.mktemp("allowed")
    engine = Engine(config, params, proc, max_batch=1, max_model_len=1024, max_images=2, max_queue=1).start(
        warmup=False)
    yield create_app(engine, "tiny", [media]), engine
    engine.stop(timeout=0)


def user(*parts):
    return {"messages": [{"role": "user", "content": list(parts)}]}


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "what colour"}
BIG = "data:image/png;base64," + base64.b64encode(png_bytes(400, 300, 2)).decode()
BAD_CASES = [
    # (what, body, status, param, words in the message)
    ("malformed JSON", b"{not json", 400, None, "not valid JSON"),
    ("not an object", [1, 2], 400, None, "JSON object"),
    ("no messages", {"model": "tiny"}, 400, "messages", "messages"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "tool"),
    ("bad content", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "content"),
    ("unknown part", user({"type": "audio", "audio": "x"}), 400, "messages[0].content[0].type", "audio"),
    ("remote url", user(image("https://example.com/a.png"), TEXT), 400, "messages[0].content[0].image_url.url",
     "network"),
    ("bad base64", user(image("data:image/png;base64,@@@"), TEXT), 400, "messages[0].content[0].image_url.url",
     "base64"),
    ("not an image", user(image("data:image/png;base64," + base64.b64encode(b"hello").decode()), TEXT), 400,
     "messages", "image 0"),
    ("over the pixel limit", user(image(BIG), TEXT), 400, "messages", "pixel"),
    ("path not allowed", user(image("/etc/passwd"), TEXT), 400, "messages[0].content[0].image_url.url",
     "allowed"),
    ("too many images", user(image(URI), image(URI), image(URI), TEXT), 400, "messages", "at most 2"),
    ("prompt too long", {"messages": [{"role": "user", "content": "red " * 1100}]}, 400, "messages",
     "max_model_len"),
    ("n = 2", {**user(TEXT), "n": 2}, 400, "n", "'n' must be 1"),
    ("temperature", {**user(TEXT), "temperature": 7}, 400, "temperature", "temperature"),
    ("max_tokens 0", {**user(TEXT), "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("stop type", {**user(TEXT), "stop": 3}, 400, "stop", "stop"),
    ("stream type", {**user(TEXT), "stream": "yes"}, 400, "stream", "stream"),
]


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(app, monkeypatch):
    app, engine = app

    async def walk():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            for what, body, status, param, words in BAD_CASES:
                kw = {"content": body} if isinstance(body, bytes) else {"json": body}
                r = await c.post("/v1/chat/completions", **kw)
                assert r.status_code == status, (what, r.status_code, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, what
                assert err["param"] == param and words.lower() in err["message"].lower(), (what, err)
            assert (await c.get("/v1/nothing")).status_code == 404

            # A full queue: one request decoding, one waiting, the next one gets 429.
            long = {"messages": [{"role": "user", "content": "red"}], "max_tokens": 900, "temperature": 0}
            first = asyncio.create_task(c.post("/v1/chat/completions", json=long))
            while engine.stats()["busy_slots"] == 0:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(c.post("/v1/chat/completions", json=long))
            while engine.stats()["waiting"] == 0:
                await asyncio.sleep(0.01)
            r = await c.post("/v1/chat/completions", json=long)
            assert r.status_code == 429 and "--max-queue" in r.json()["error"]["message"]
            assert (await first).status_code == 200 and (await second).status_code == 200

            # An exception inside the engine fails that request with a 500; the next one is served.
            real = engine._prefill_into

            def broken(req, slot):
                raise RuntimeError("injected prefill failure")
            monkeypatch.setattr(engine, "_prefill_into", broken)
            r = await c.post("/v1/chat/completions", json={**user(TEXT), "max_tokens": 3})
            assert r.status_code == 500 and "injected prefill failure" in r.json()["error"]["message"]
            monkeypatch.setattr(engine, "_prefill_into", real)

            r = await c.post("/v1/chat/completions", json={**user(image(URI), TEXT), "max_tokens": 3,
                                                            "temperature": 0})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["choices"][0]["finish_reason"] in ("stop", "length") and out["usage"]["completion_tokens"] >= 1
            assert (await c.get("/health")).json() == {"status": "ok"}

    asyncio.run(walk())
