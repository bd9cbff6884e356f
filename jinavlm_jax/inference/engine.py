"""Continuous batching: many requests share a fixed number of decode slots (JetStream's engine shape).

    engine = Engine(config, params, processor, max_batch=8, max_model_len=4096)
    engine.start()                                    # compiles every bucket, then runs the scheduler
    req = engine.submit(prompt, [image_bytes], max_tokens=64, sampling=Sampling(0.7), seed=1,
                        stop=["\\n\\n"], sink=print)   # sink receives an `Output` per step
    engine.stop()

Device side: a KV cache `[layers][slots, max_len, kv_heads, head_dim]` in a `DecodeState`, and four
jitted programs (params and state are arguments, the state is donated so it is updated in place):

* `encode(images) -> features`: vision tower and connector for one image's crops (crop-count buckets);
* `prefill(prompt, features) -> Prefix`: the prompt's K/V for every layer and its first token;
* `insert(prefix, state, slot) -> state`: the prefix into one slot (the prompt's left padding
  rolled to the end, so the slot holds exactly the prompt's tokens), with the request's sampling;
* `generate(state, active) -> state, tokens`: every slot advances by `steps_per_call` tokens, each
  slot at its own length, with its own temperature / top-k / top-p / seed.

Host side: requests are validated and tokenized in the caller's thread (`submit`, errors raise
there), then a scheduler thread admits waiting requests into free slots between decode steps, streams
each request's text as it comes (holding back what could still become a stop string), and frees a
slot when its request stops: a stop id, a stop string, `max_tokens`, or `cancel` (a client gone).

Vision cache: an LRU of connector outputs keyed by the image's content hash and the processing
settings, so a multi-turn chat about one image runs the ViT once (`vision_cache` entries).

A request's tokens do not depend on the other requests in the batch: its K/V sit in its own slot,
masked slots contribute exact zeros, and its draws use `fold_in(key(seed), step)`.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model import JinaVLMConfig, merge_image_features
from ..model.layers import QuantizedKV, constrain, dtype_of, quantize_kv
from .buckets import crop_bucket, prompt_bucket, prompt_buckets
from .params import InferenceParams, prepare_params
from .placement import mesh_context, put
from .programs import (CACHE_AXES, constrain_cache, decode_step, flat_caches, model_for, parse_kv_cache_dtype,
                       prompt_forward)
from .sampling import GenerateError, Sampling, row_keys, sample

STATE_AXES = ("cache_batch",)
DECODE_BLOCK = 128  # cache slots per block of the decode attention (`cache_slots` are multiples of 128)


class RequestError(GenerateError):
    """A request the engine refuses (names the field and the limit); a server answers 400.
    `param` names the request field at fault ("messages" for the prompt and its images)."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue is at `max_queue`; a server answers 429."""


class EngineStopped(RuntimeError):
    """The engine is not running (not started, or shutting down); a server answers 503."""


# ------------------------------------------------------------------------------------- device side

class Prefix(NamedTuple):
    """A prefilled prompt: one (k, v) [1, Lp, KV, hd] per layer (left padded), its real length [1]
    and its first sampled token [1]."""

    caches: tuple
    length: jax.Array
    token: jax.Array


class DecodeState(NamedTuple):
    """Everything the decode slots hold on the device, one row per slot.

    caches: one (k, v) [slots, S, KV, hd] (or int8 QuantizedKV) per layer; kv_valid [slots, S]; lengths: tokens in the cache
    (= the slot and the position of the next token fed); tokens: the token fed next; steps: the
    sampling step of that token's successor; seeds, temperature, top_k, top_p: the request's sampling.
    """

    caches: tuple
    kv_valid: jax.Array
    lengths: jax.Array
    tokens: jax.Array
    steps: jax.Array
    seeds: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def cache_slots(max_model_len: int, multiple: int = 128) -> int:
    """KV positions per decode slot: max_model_len rounded up to a multiple of 128 (TPU-friendly tiles;
    every decode step attends over all of them, so no power-of-two rounding)."""
    return -(-int(max_model_len) // multiple) * multiple


def slot_config(config: JinaVLMConfig, cache_length: int, decode_block: int | None = None) -> JinaVLMConfig:
    """The config the engine's programs use for slots of `cache_length` positions: the decode attention
    in blocks of `decode_block` slots (None: DECODE_BLOCK when a slot holds more than 4 blocks, else one
    pass); see `JinaVLMConfig.decode_block`."""
    if decode_block is None:
        decode_block = DECODE_BLOCK if cache_length > 4 * DECODE_BLOCK else 0
    if decode_block and cache_length % decode_block:
        raise ValueError(f"decode_block={decode_block} must divide the slots' cache length {cache_length}")
    return config.replace(decode_block=int(decode_block))


def _sds(shape, dtype, axes, mesh):
    from ..sharding import named
    sharding = None if mesh is None else named(mesh, axes, shape=shape)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_state(config: JinaVLMConfig, slots: int, cache_length: int, mesh=None,
                   kv_cache_dtype: str | None = None) -> DecodeState:
    """The DecodeState's shapes, dtypes and (with a mesh) shardings: K/V in the compute dtype, or with
    kv_cache_dtype "int8" as QuantizedKV (int8 codes, a float32 scale per slot and position)."""
    t = config.text
    shape = (slots, cache_length, t.n_kv_heads, t.head_dim)
    if kv_cache_dtype == "int8":
        cache = lambda: QuantizedKV(_sds(shape, jnp.int8, CACHE_AXES, mesh), _sds(shape[:2], jnp.float32, CACHE_AXES[:2], mesh))
    else:
        cache = lambda: _sds(shape, dtype_of(config.dtype), CACHE_AXES, mesh)
    vec = lambda dt: _sds((slots,), dt, STATE_AXES, mesh)
    return DecodeState(tuple((cache(), cache()) for _ in range(t.n_layers)),
                       _sds((slots, cache_length), jnp.bool_, STATE_AXES + (None,), mesh), vec(jnp.int32),
                       vec(jnp.int32), vec(jnp.int32), vec(jnp.uint32), vec(jnp.float32), vec(jnp.int32),
                       vec(jnp.float32))


def prefill_shapes(config: JinaVLMConfig, length: int, mesh=None) -> tuple:
    """Abstract arguments of `prefill` after the params, for a prompt bucket of `length` (batch 1)."""
    d, i32, f32 = config.text.hidden_size, jnp.int32, jnp.float32
    row = lambda *shape_dtype: _sds(shape_dtype[:-1], shape_dtype[-1], ("act_batch",) + (None,) * (len(shape_dtype) - 2),
                                    mesh)
    return (row(1, length, i32), row(1, length, jnp.bool_), row(1, length, d, f32), row(1, length, i32),
            row(1, jnp.uint32), row(1, f32), row(1, i32), row(1, f32))


def insert_shapes(config: JinaVLMConfig, params, length: int, state: DecodeState, mesh=None) -> tuple:
    """Abstract arguments of `insert` (prefix, state, slot and sampling scalars)."""
    prefix = jax.eval_shape(partial(prefill, config), params, *prefill_shapes(config, length))
    # The prefix's layout is left to the compiler (the prefill program's output), as at run time.
    scalar = lambda dt: _sds((), dt, (), mesh)
    return (prefix, state, scalar(jnp.int32), scalar(jnp.uint32), scalar(jnp.float32), scalar(jnp.int32),
            scalar(jnp.float32))


def encode_shapes(config: JinaVLMConfig, crops: int, mesh=None) -> tuple:
    """Abstract arguments of `encode_images` after the params: one image's `crops` crops."""
    v = config.vision
    return (_sds((1, crops, v.n_patches, v.patch_dim), jnp.float32, ("act_batch", None, None, None), mesh),
            _sds((1, crops, v.n_patches), jnp.int32, ("act_batch", None, None), mesh))


def constrain_state(state: DecodeState) -> DecodeState:
    """The state's layout on a mesh (slots over data x fsdp, KV heads over tensor), so that every
    program returns it exactly as the next one takes it (no-op without a mesh)."""
    vec = lambda a: constrain(a, STATE_AXES)
    return DecodeState(tuple((constrain_cache(k), constrain_cache(v)) for k, v in state.caches),
                       constrain(state.kv_valid, STATE_AXES + (None,)), *(vec(a) for a in state[2:]))


def encode_images(config: JinaVLMConfig, params: InferenceParams, images, image_masks):
    """One image's crops [1, T, 729, 588], [1, T, 729] -> connector features [T, 196, D]."""
    model = model_for(config, params)
    return model.apply({"params": params.tree}, images, image_masks, method="encode_images")[0]


def prefill(config: JinaVLMConfig, params: InferenceParams, input_ids, attention_mask, features, feature_pos,
            seed, temperature, top_k, top_p) -> Prefix:
    """A left-padded prompt [1, Lp] whose image features [1, Lp, D] are added at feature_pos [1, Lp]
    (negative = none) -> Prefix. The first token is drawn at step 0 of key(seed)."""
    x = model_for(config, params).apply({"params": params.tree}, input_ids, method="embed_tokens")
    x = merge_image_features(x, features, feature_pos)
    logits, kvs, positions = prompt_forward(config, params, x, attention_mask)
    token = sample(logits, row_keys(seed), 0, temperature, top_k, top_p)
    return Prefix(kvs, positions[:, -1] + 1, token)


def insert(prefix: Prefix, state: DecodeState, slot, seed, temperature, top_k, top_p) -> DecodeState:
    """The prefix into decode slot `slot`: its real tokens at cache rows [0, n), the rest invalid."""
    lp, s = prefix.caches[0][0].shape[1], state.kv_valid.shape[1]
    n = prefix.length[0]
    shift = lp - n  # the prompt is left padded: roll its tokens to the front of the slot

    def place(cache, new):
        if isinstance(cache, QuantizedKV):  # an int8 cache: quantize the prompt's K/V, place codes and scales
            return QuantizedKV(*map(place, cache, quantize_kv(new)))
        # The prompt bucket may be longer than the slot: its real tokens (n <= S) are at the front now.
        rolled = jnp.roll(new[0], -shift, axis=0)[:s].astype(cache.dtype)
        return jax.lax.dynamic_update_slice(cache, rolled[None], (slot,) + (0,) * (cache.ndim - 1))

    caches = tuple((place(ck, k), place(cv, v)) for (ck, cv), (k, v) in zip(state.caches, prefix.caches))
    at = lambda a, v: a.at[slot].set(v)
    return constrain_state(DecodeState(
        caches, at(state.kv_valid, jnp.arange(s) < n), at(state.lengths, n), at(state.tokens, prefix.token[0]),
        at(state.steps, 1), at(state.seeds, seed), at(state.temperature, temperature), at(state.top_k, top_k),
        at(state.top_p, top_p)))


def generate(config: JinaVLMConfig, steps_per_call: int, filtered: bool, params: InferenceParams,
             state: DecodeState, active) -> tuple[DecodeState, jax.Array]:
    """Every slot advances `steps_per_call` tokens (inactive slots compute and are ignored; their
    length does not move). Returns (state, tokens [steps_per_call, slots])."""
    rows = jnp.arange(state.lengths.shape[0])
    keys = row_keys(state.seeds)
    step_on = active.astype(jnp.int32)

    def one(st: DecodeState, _):
        kv_valid = st.kv_valid.at[rows, st.lengths].set(True, mode="drop")
        logits, caches = decode_step(config, params, st.tokens, st.lengths, st.caches, kv_valid, st.lengths)
        nxt = sample(logits, keys, st.steps, st.temperature, st.top_k, st.top_p, filtered=filtered)
        st = st._replace(caches=caches, kv_valid=kv_valid, lengths=st.lengths + step_on,
                         tokens=jnp.where(active, nxt, st.tokens), steps=st.steps + step_on)
        return st, nxt

    caches, shaped = flat_caches(state.caches)
    state, tokens = jax.lax.scan(one, state._replace(caches=caches), None, length=steps_per_call)
    return constrain_state(state._replace(caches=shaped(state.caches))), tokens


# ------------------------------------------------------------------------------------- host side

@dataclass
class Output:
    """One streamed piece of a request: new text (stop strings held back until they cannot match),
    the new token ids, and on the last piece `finish_reason` ("stop" / "length" / "cancelled" /
    "error") and `error` (the exception, for "error"). Token counts are running totals."""

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass
class EngineRequest:
    """A submitted request (the engine fills the private fields)."""

    request_id: str
    input_ids: np.ndarray
    image_pos: np.ndarray                 # [T, 196] absolute positions, -1 unused
    images: list                          # per image: a vision-cache entry (features may still be None)
    max_tokens: int
    sampling: Sampling
    seed: int
    stop: tuple[str, ...]
    stop_ids: frozenset
    sink: Callable[[Output], None]
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0                         # characters of text already streamed
    first_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(len(self.input_ids))


@dataclass
class VisionEntry:
    """What the engine keeps of one image: its token block and, once encoded, its features."""

    key: str
    image_tokens: np.ndarray
    image_input_idx: np.ndarray
    n_crops: int
    pixels: dict | None = None            # processor output, dropped once encoded
    features: np.ndarray | None = None    # [T, 196, D]


class VisionCache:
    """LRU of `VisionEntry` by content key; capacity 0 keeps nothing."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._items: collections.OrderedDict[str, VisionEntry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> VisionEntry | None:
        """The entry (perhaps still waiting for its features: requests in flight share it), or None."""
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, entry: VisionEntry) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[entry.key] = entry
            self._items.move_to_end(entry.key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def image_bytes(image) -> bytes:
    """The bytes a content hash is taken of: encoded file bytes (bytes or a path), or raw pixels."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        return repr((image.shape, image.dtype.str)).encode() + image.tobytes()
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL
        return repr((image.size, image.mode)).encode() + image.tobytes()
    raise RequestError(f"unsupported image of type {type(image).__name__}: give bytes, a path, a PIL image "
                       "or an HWC uint8 array")


class Engine:
    """Continuous batching over `max_batch` decode slots. See the module docstring.

    Args:
        config, params: the model (stacked params or InferenceParams).
        processor: a `processing.Processor` (tokenizer, image processing, stop ids).
        max_batch: decode slots. max_model_len: prompt + generated tokens per request (each slot's KV
        cache holds `cache_slots(max_model_len)` positions). max_images: images per request. max_queue:
        waiting requests beyond which `submit` raises QueueFull. vision_cache: images kept.
        steps_per_call: tokens each slot advances per `generate` call (fewer host round trips;
        a request that stops mid-call discards the rest). mesh: a `sharding.make_mesh` mesh (slots
        split over data x fsdp, heads over tensor). quantize: "int8" serves int8 decoder weights
        (`adapt.quant`; see `Generator`). kv_cache_dtype: "int8" keeps the slots' KV cache in int8
        (half the bytes of bf16; see `Generator`). decode_block: cache slots per block of the decode
        attention, which reads only the blocks the longest live request has reached
        (`JinaVLMConfig.decode_block`); None: DECODE_BLOCK when a slot holds more than 4 blocks, else
        0 (one pass over the whole slot). kernel_layout: how the decoder's kernels are stored
        (None: output-major on CPU; see `Generator`).
    """

    def __init__(self, config: JinaVLMConfig, params, processor, *, max_batch: int = 8, max_model_len: int = 4096,
                 max_images: int = 8, max_queue: int = 256, vision_cache: int = 64, steps_per_call: int = 1,
                 mesh=None, stop_ids: Sequence[int] | None = None, quantize=None, kv_cache_dtype=None,
                 decode_block: int | None = None, kernel_layout=None):
        if max_batch < 1 or steps_per_call < 1:
            raise ValueError(f"max_batch ({max_batch}) and steps_per_call ({steps_per_call}) must be >= 1")
        limit = config.text.max_sequence_length
        if not 1 < max_model_len <= limit:
            raise ValueError(f"max_model_len={max_model_len} must be in [2, {limit}] (the model's context)")
        self.processor, self.mesh = processor, mesh
        self.params = prepare_params(config, params, mesh, quantize, kernel_layout)
        self.kv_cache_dtype = parse_kv_cache_dtype(kv_cache_dtype)
        self.max_batch, self.max_model_len = int(max_batch), int(max_model_len)
        self.cache_length = cache_slots(self.max_model_len)
        self.config = slot_config(config, self.cache_length, decode_block)
        self.max_images, self.max_queue, self.steps_per_call = int(max_images), int(max_queue), int(steps_per_call)
        self.stop_ids = frozenset(int(s) for s in (processor.stop_ids if stop_ids is None else stop_ids))
        self.vision_cache = VisionCache(vision_cache)
        self._settings_key = hashlib.sha256(repr(processor.config).encode()).hexdigest()[:16]
        self._programs: dict[tuple, Any] = {}
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._slots: list[EngineRequest | None] = [None] * self.max_batch
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._running = self._thread_exit = False
        self._state: DecodeState | None = None
        self.counters = collections.Counter({k: 0 for k in (
            "requests", "prompt_tokens", "generated_tokens", "images_encoded", "finished_stop", "finished_length",
            "finished_cancelled", "finished_error")})

    # --------------------------------------------------------------------------- programs
    def _batch(self, x):
        return put(x, self.mesh, STATE_AXES + (None,) * (np.ndim(x) - 1))

    def _program(self, key: tuple, build: Callable[[], Any]):
        """A compiled program by shape key, compiled on first use (warm-up compiles every key)."""
        prog = self._programs.get(key)
        if prog is None:
            with mesh_context(self.mesh):
                prog = self._programs[key] = build()
        return prog

    def _encode_prog(self, crops: int):
        return self._program(("encode", crops), lambda: jax.jit(partial(encode_images, self.config)).lower(
            self.params, *encode_shapes(self.config, crops, self.mesh)).compile())

    def _prefill_prog(self, length: int):
        return self._program(("prefill", length), lambda: jax.jit(partial(prefill, self.config)).lower(
            self.params, *prefill_shapes(self.config, length, self.mesh)).compile())

    def _insert_prog(self, length: int):
        state = self._abstract_state()
        return self._program(("insert", length), lambda: jax.jit(insert, donate_argnums=1).lower(
            *insert_shapes(self.config, self.params, length, state, self.mesh)).compile())

    def _generate_prog(self, filtered: bool):
        def build():
            fn = jax.jit(partial(generate, self.config, self.steps_per_call, filtered), donate_argnums=1)
            active = _sds((self.max_batch,), jnp.bool_, STATE_AXES, self.mesh)
            return fn.lower(self.params, self._abstract_state(),
                            active).compile()
        return self._program(("generate", filtered), build)

    def _empty_state(self) -> DecodeState:
        def zeros(a):
            z = np.zeros(a.shape, a.dtype)
            return jax.device_put(z, a.sharding) if a.sharding is not None else jnp.asarray(z)
        return jax.tree_util.tree_map(zeros, self._abstract_state())

    def _abstract_state(self) -> DecodeState:
        return abstract_state(self.config, self.max_batch, self.cache_length, self.mesh, self.kv_cache_dtype)

    def crop_buckets(self) -> list[int]:
        """Crop-count buckets one image can need (thumbnail + up to max_crops tiles)."""
        return sorted({crop_bucket(k) for k in range(1, self.processor.config.max_crops_per_image + 1)})

    def warmup(self, say: Callable[[str], None] | None = None) -> int:
        """Compile every program a request can need (all prompt and crop buckets); returns the count.
        After this no request compiles anything."""
        if self._state is None:
            self._state = self._empty_state()
        keys = ([("encode", c) for c in self.crop_buckets()]
                + [(kind, b) for b in prompt_buckets(self.max_model_len) for kind in ("prefill", "insert")]
                + [("generate", False), ("generate", True)])
        build = {"encode": self._encode_prog, "prefill": self._prefill_prog, "insert": self._insert_prog,
                 "generate": self._generate_prog}
        t0 = time.perf_counter()
        for i, (kind, arg) in enumerate(keys):
            build[kind](arg)
            if say:
                say(f"warm-up: {i + 1}/{len(keys)} programs compiled ({time.perf_counter() - t0:.1f} s)")
        return len(keys)

    # --------------------------------------------------------------------------- requests
    @property
    def running(self) -> bool:
        """True between start() and stop() (requests are accepted)."""
        return self._running

    def submit(self, prompt: str, images: Sequence = (), *, max_tokens: int | None, sampling: Sampling | None = None,
               seed: int = 0, stop: Sequence[str] = (), sink: Callable[[Output], None],
               request_id: str | None = None) -> EngineRequest:
        """Validate, tokenize and process the images of one request, then queue it.

        `prompt` is a rendered prompt with one `<|image|>` per image (`processor.apply_chat_template`);
        images are bytes, paths, PIL images or arrays. max_tokens None: the rest of max_model_len. Raises RequestError (a 400: names the field and
        the limit, e.g. a prompt over max_model_len or an image that does not decode), QueueFull (429)
        or EngineStopped (503). `sink(Output)` is called from the scheduler thread.
        """
        if not self._running:
            raise EngineStopped("the engine is not running (starting up or shutting down)")
        sampling = sampling or Sampling()
        if max_tokens is not None and (int(max_tokens) != max_tokens or max_tokens < 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens}", "max_tokens")
        if len(images) > self.max_images:
            raise RequestError(f"{len(images)} images in one request; at most {self.max_images} are allowed "
                               "(--max-images)")
        entries = [self._vision_entry(image, k) for k, image in enumerate(images)]
        from ..processing.errors import ProcessingError
        try:
            ids, pos = self.processor.prompt_layout(prompt, [
                {"image_tokens": e.image_tokens, "image_input_idx": e.image_input_idx} for e in entries])
        except ProcessingError as e:
            raise RequestError(str(e)) from None
        n = len(ids)
        if max_tokens is None:
            max_tokens = max(self.max_model_len - n, 1)
        if n + max_tokens > self.max_model_len:
            raise RequestError(f"the prompt has {n} tokens ({sum(len(e.image_tokens) for e in entries)} of them "
                               f"for {len(entries)} image(s)); with max_tokens={max_tokens} that is "
                               f"{n + max_tokens}, over max_model_len={self.max_model_len}: shorten the prompt, "
                               f"send fewer or smaller images, or lower max_tokens to at most "
                               f"{max(self.max_model_len - n, 0)}")
        req = EngineRequest(request_id or f"req-{next(self._ids)}", ids, pos, entries, int(max_tokens), sampling,
                            int(seed) % 2**32, tuple(s for s in stop if s), self.stop_ids, sink)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue}); "
                                "retry later")
            self._waiting.append(req)
            self.counters["requests"] += 1
            self._wake.notify_all()
        return req

    def _vision_entry(self, image, k: int) -> VisionEntry:
        from ..processing.errors import ProcessingError
        try:
            data = image_bytes(image)
        except OSError as e:
            raise RequestError(f"image {k}: cannot read it ({e})") from None
        key = hashlib.sha256(data).hexdigest() + self._settings_key
        hit = self.vision_cache.get(key)
        if hit is not None:
            return hit
        try:
            out = self.processor.image_processor.process(image)
        except ProcessingError as e:
            raise RequestError(f"image {k}: {e}") from None
        entry = VisionEntry(key, out["image_tokens"], out["image_input_idx"], len(out["images"]), pixels=out)
        self.vision_cache.put(entry)
        return entry

    def cancel(self, request: EngineRequest) -> None:
        """Stop a request (a client that went away): its slot is freed before the next decode step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify_all()

    def stats(self) -> dict[str, int]:
        """Queue depth, busy slots and counters (requests, prompt_tokens, generated_tokens, ...)."""
        return {"waiting": len(self._waiting), "busy_slots": sum(r is not None for r in self._slots),
                "vision_cache_entries": len(self.vision_cache), "vision_cache_hits": self.vision_cache.hits,
                **self.counters}

    # --------------------------------------------------------------------------- scheduler
    def start(self, warmup: bool = True, say: Callable[[str], None] | None = None) -> "Engine":
        """Compile (unless warmup=False) and start the scheduler thread."""
        if self._state is None:
            self._state = self._empty_state()
        if warmup:
            self.warmup(say)
        self._running, self._thread_exit = True, False
        self._thread = threading.Thread(target=self._loop, name="jinavlm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, let running ones finish for up to `timeout` seconds, cancel the rest."""
        self._running = False
        deadline = time.monotonic() + timeout
        with self._wake:
            self._wake.notify_all()
        while self._thread is not None and self._busy() and time.monotonic() < deadline:
            time.sleep(0.02)
        for r in list(self._waiting) + [r for r in self._slots if r is not None]:
            r.cancelled = True
        self._thread_exit = True
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout + 120)  # a step or a compile in progress ends first
            self._thread = None

    def _busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._slots)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._busy() and not self._thread_exit:
                    self._wake.wait(timeout=0.5)
            if self._thread_exit and not self._busy():
                return
            self._drop_cancelled()
            self._admit()
            if any(r is not None for r in self._slots):
                self._step()

    def _drop_cancelled(self) -> None:
        with self._wake:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                self._finish(r, "cancelled")
        for i, r in enumerate(self._slots):
            if r is not None and r.cancelled:
                self._slots[i] = None
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into free slots; a failure fails that request only."""
        while True:
            free = [i for i, r in enumerate(self._slots) if r is None]
            with self._wake:
                if not free or not self._waiting:
                    return
                req = self._waiting.popleft()
            try:
                self._prefill_into(req, free[0])
            except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
                print(f"jinavlm engine: request {req.request_id} failed in prefill: {type(e).__name__}: {e}",
                      file=sys.stderr)
                self._finish(req, "error", e)

    def _features(self, entry: VisionEntry) -> np.ndarray:
        if entry.features is None:
            px = entry.pixels
            t = entry.n_crops
            b = crop_bucket(t)
            images = np.full((1, b) + px["images"].shape[1:], -1.0, np.float32)
            masks = np.full((1, b) + px["image_masks"].shape[1:], -1, np.int32)
            images[0, :t], masks[0, :t] = px["images"], px["image_masks"]
            feats = self._encode_prog(b)(self.params, images, masks)
            entry.features, entry.pixels = np.asarray(jax.device_get(feats))[:t], None
            self.counters["images_encoded"] += 1
        return entry.features

    def _prefill_args(self, ids, pos, entries, sampling: Sampling, seed: int, length: int):
        """Host arrays of one left-padded prompt of `length` tokens with its features."""
        n, d = len(ids), self.config.text.hidden_size
        pad = length - n
        input_ids = np.full((1, length), -1, np.int32)
        input_ids[0, pad:] = ids
        mask = input_ids != -1
        feats = np.zeros((1, length, d), np.float32)
        fpos = np.full((1, length), -1, np.int32)
        if entries:
            flat = np.concatenate([self._features(e) for e in entries]).reshape(-1, d)
            where = pos.reshape(-1)
            keep = where >= 0
            k = int(keep.sum())
            feats[0, :k], fpos[0, :k] = flat[keep], where[keep] + pad
        return (input_ids, mask, feats, fpos, np.array([seed], np.uint32),
                np.array([sampling.temperature], np.float32), np.array([sampling.top_k], np.int32),
                np.array([sampling.top_p], np.float32))

    def _prefill_into(self, req: EngineRequest, slot: int) -> None:
        length = prompt_bucket(req.prompt_tokens)
        args = self._prefill_args(req.input_ids, req.image_pos, req.images, req.sampling, req.seed, length)
        with mesh_context(self.mesh):
            prefix = self._prefill_prog(length)(self.params, *args)
            self._state = self._insert_prog(length)(prefix, self._state, np.int32(slot), *(a[0] for a in args[4:]))
        token = int(np.asarray(prefix.token)[0])
        self.counters["prompt_tokens"] += req.prompt_tokens
        self._slots[slot] = req
        if self._on_token(req, token):
            self._slots[slot] = None

    def _step(self) -> None:
        active = np.array([r is not None for r in self._slots])
        filtered = any(r is not None and r.sampling.filtered for r in self._slots)
        try:
            with mesh_context(self.mesh):
                self._state, toks = self._generate_prog(filtered)(self.params, self._state, self._batch(active))
            toks = np.asarray(jax.device_get(toks))
        except Exception as e:  # noqa: BLE001 - fail the requests of this step, keep serving
            print(f"jinavlm engine: decode step failed: {type(e).__name__}: {e}", file=sys.stderr)
            for i, r in enumerate(self._slots):
                if r is not None:
                    self._slots[i] = None
                    self._finish(r, "error", e)
            self._state = self._empty_state()
            return
        for row in toks:
            for i, r in enumerate(self._slots):
                if r is not None and self._on_token(r, int(row[i])):
                    self._slots[i] = None

    def _on_token(self, req: EngineRequest, token: int) -> bool:
        """Record one generated token and stream what became final; True when the request is done."""
        if req.cancelled:
            self._finish(req, "cancelled")
            return True
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        req.tokens.append(token)
        self.counters["generated_tokens"] += 1
        if token in req.stop_ids:
            return self._finish(req, "stop", text_ids=req.tokens[:-1])
        text = self.processor.decode(req.tokens)
        for s in req.stop:
            at = text.find(s)
            if at >= 0:
                return self._finish(req, "stop", text=text[:at])
        if len(req.tokens) >= req.max_tokens:
            return self._finish(req, "length", text=text)
        # Hold back an incomplete character and any tail that could still grow into a stop string.
        safe = len(text.rstrip("\ufffd"))
        for s in req.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        self._emit(req, text[:max(safe, req.sent)], [token])
        return False

    def _emit(self, req: EngineRequest, text: str, ids: list[int], finish: str | None = None,
              error: BaseException | None = None) -> None:
        delta = text[req.sent:]
        req.sent = max(req.sent, len(text))
        try:
            req.sink(Output(req.request_id, delta, ids, req.prompt_tokens, len(req.tokens), finish, error))
        except Exception as e:  # noqa: BLE001 - a broken sink cancels its own request only
            print(f"jinavlm engine: request {req.request_id}: output callback failed: {e}", file=sys.stderr)
            req.cancelled = True

    def _finish(self, req: EngineRequest, reason: str, error: BaseException | None = None, *,
                text: str | None = None, text_ids: list[int] | None = None) -> bool:
        if text is None:
            text = self.processor.decode(req.tokens if text_ids is None else text_ids)
        new = req.tokens[-1:] if req.tokens and reason in ("stop", "length") else []
        self.counters[f"finished_{reason}"] += 1
        self._emit(req, text if reason in ("stop", "length") else text[:req.sent], new, reason, error)
        return True
