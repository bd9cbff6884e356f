"""The OpenAI chat-completions wire format: request validation and response objects.

`parse_chat_request(body, ...)` turns a decoded JSON body into a `ChatRequest` (the prompt's messages
in our chat format, the images as bytes, the sampling settings) or raises `APIError` naming the field,
the way OpenAI's API does: `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import base64
import binascii
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlparse

MAX_STOP_STRINGS = 16


class APIError(Exception):
    """An error answered with `status` and the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


@dataclass
class ChatRequest:
    """A validated chat-completion request."""

    messages: list[dict]            # our chat format: content parts {"type": "text"} / {"type": "image"}
    images: list[bytes]             # one per image part, in order
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str | None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and int(v) != v):
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r:.40}", key, "invalid_type")
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be in [{lo}, {hi}], got {v}", key)
    return int(v) if integer else float(v)


def resolve_image(url: Any, param: str, allowed_media: Sequence[Path]) -> bytes:
    """The bytes of an `image_url`: a `data:image/...;base64,` URI, or a local path / `file://` URI
    inside one of `allowed_media`. Remote URLs are refused: the server never fetches from the network."""
    if not isinstance(url, str) or not url:
        raise bad(f"'{param}' must be a non-empty string (a data: URI or an allowed local path)", param,
                  "invalid_type")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or ";base64" not in head or not head[5:].startswith("image/"):
            raise bad(f"'{param}': a data URI must look like data:image/<type>;base64,<data>", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad(f"'{param}': the base64 data does not decode ({e})", param) from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(url)
    else:
        raise bad(f"'{param}': {parsed.scheme}:// URLs are not fetched (this server has no network access); "
                  "send the image as a data:image/...;base64, URI or a path under --allowed-local-media", param,
                  "unsupported_url")
    if not allowed_media:
        raise bad(f"'{param}': local paths are not allowed (start the server with --allowed-local-media DIR)",
                  param, "local_media_not_allowed")
    real = Path(os.path.realpath(path))
    if not any(real == d or d in real.parents for d in allowed_media):
        raise bad(f"'{param}': {path} is outside the allowed directories "
                  f"{[str(d) for d in allowed_media]} (--allowed-local-media)", param, "local_media_not_allowed")
    try:
        return real.read_bytes()
    except OSError as e:
        raise bad(f"'{param}': cannot read {path} ({e.strerror})", param, "file_not_found") from None


def parse_chat_request(body: Any, allowed_media: Sequence[Path] = ()) -> ChatRequest:
    """Validate a decoded `/v1/chat/completions` body. Raises APIError (400) naming the field."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages",
                  "missing" if msgs is None else "invalid_type")
    messages, images = [], []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise bad(f"'{where}.role' must be 'system', 'user' or 'assistant', got {role!r:.40}",
                      f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad(f"'{pw}.text' must be a string", f"{pw}.text", "invalid_type")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    images.append(resolve_image(url, f"{pw}.image_url.url", allowed_media))
                    parts.append({"type": "image"})
                else:
                    raise bad(f"'{pw}.type' must be 'text' or 'image_url', got {kind!r:.40}", f"{pw}.type")
        elif content is None and role == "assistant":
            parts = []
        else:
            raise bad(f"'{where}.content' must be a string or a list of content parts", f"{where}.content",
                      "invalid_type")
        messages.append({"role": role, "content": parts})

    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"'n' must be 1 (one choice per request), got {n!r:.20}", "n")
    max_tokens = _number(body, "max_completion_tokens", None, 1, 2**31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", None, 1, 2**31, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS} are supported", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    top_k = _number(body, "top_k", 0, -1, 2**31, integer=True)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    return ChatRequest(
        messages=messages, images=images, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=max(top_k, 0), seed=_number(body, "seed", 0, -2**63, 2**64 - 1, integer=True), stop=stop,
        stream=stream, include_usage=bool(opts.get("include_usage", False)), model=model)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: ChatRequest, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    """A `chat.completion` object."""
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(req: ChatRequest, model: str, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """A `chat.completion.chunk` object (no choices and a usage for the final usage chunk)."""
    out = {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": model,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out
