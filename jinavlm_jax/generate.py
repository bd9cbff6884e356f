"""Text generation: a jitted prefill and a jitted `lax.while_loop` decode over a donated KV cache.

    gen = Generator(config, params)                      # or generate(config, params, batch, ...)
    out = gen.generate(processor(prompts, images), max_new_tokens=64, stop_ids=processor.stop_ids,
                       tokenizer=processor)
    out.texts, out.tokens, out.stop_reasons

Two compiled programs serve every request in the same buckets (spec 6.5):

* **prefill** (once per request): vision tower on every crop, connector, scatter-add of the image
  features into the token embeddings, all decoder layers over the prompt, K/V written into a cache
  of `cache_length` slots, logits of the last prompt position (the batch is left padded, so that
  position is real for every row);
* **decode**: samples the first token from the prefill logits, then a `lax.while_loop` feeds one
  token per step (images are not seen again), writes its K/V at slot `prompt_length + step` and
  stops early once every row has produced a stop id. No Python runs per token (unless a streaming
  callback is asked for, which is one `io_callback` per step).

Shapes are bucketed so that new prompts and images rarely compile: the prompt length is padded on
the left to a power of two (multiples of 1024 beyond 1024), the crop count to a power of two or a
multiple of 13 (thumbnail + 12 tiles, the released processor's maximum for one image), the cache
to a power of two >= prompt + max_new_tokens, and max_new_tokens, the stop ids, temperature and
top-p are traced values. Only greedy/sampling, top-k and whether top-p is on are compiled in.

Parameter layout: the decoder layers are applied one by one from per-layer parameter trees
(`InferenceParams.layers`) and each layer has its own cache buffer `[batch, cache_length, kv_heads,
head_dim]` (the `[layers, ...]` cache split on its leading axis). On XLA:CPU a layer scan slices
its stacked weights and cache with a copy every step, which makes weight-bound decoding several
times slower; separate buffers let every matmul and the attention read them in place.
`prepare_params` converts the stacked tree of `init_params` / `load_jina_vlm` once.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from .model import JinaVLM, JinaVLMConfig, causal_mask, check_inputs, positions_from_mask
from .model.layers import constrain, dtype_of
from .model.text import DecoderLayer, SegmentMask

CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", None)
MAX_STOP_IDS = 16
CROP_MULTIPLE = 13  # thumbnail + 12 tiles: the released processor's crops for one image


class GenerateError(ValueError):
    """A request generate() cannot serve: budget, sampling or batch-layout problems (names the limit)."""


# ---------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 means greedy (argmax, first index on ties).

    top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the smallest set of most likely tokens
    whose probability reaches top_p (always at least one). Both apply after the temperature.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise GenerateError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise GenerateError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True for temperature 0 (argmax decoding)."""
        return self.temperature == 0


@dataclass
class Generation:
    """Result of generate(), one entry per input row.

    tokens: generated ids, the stop token excluded; stop_reasons: "stop" (a stop id was produced;
    it is in stop_tokens) or "length" (max_new_tokens reached); texts: tokenizer.decode(tokens),
    or None when no tokenizer was given; steps: decode steps run (the loop exits early once every
    row stopped).
    """

    tokens: list[list[int]]
    stop_reasons: list[str]
    stop_tokens: list[int | None]
    texts: list[str] | None
    prompt_lengths: list[int]
    steps: int


class InferenceParams(NamedTuple):
    """Params for generation: everything but the decoder layers (`shared`, the usual tree without
    text/layers) and one param tree per decoder layer (`layers`)."""

    shared: dict
    layers: tuple


# ---------------------------------------------------------------------------------------- buckets

def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prompt_bucket(n: int, minimum: int = 32) -> int:
    """Padded prompt length: a power of two up to 1024, then a multiple of 1024 (bounded waste)."""
    n = max(int(n), minimum)
    return _next_pow2(n) if n <= 1024 else -(-n // 1024) * 1024


def crop_bucket(n: int, multiple: int = CROP_MULTIPLE) -> int:
    """Padded crop count: the smaller of the next power of two and the next multiple of `multiple`."""
    if n <= 0:
        return 0
    return min(_next_pow2(n), -(-n // multiple) * multiple)


def cache_bucket(n: int) -> int:
    """KV-cache length: the next power of two."""
    return _next_pow2(n)


# ---------------------------------------------------------------------------------------- params

@partial(jax.jit, static_argnums=1)
def _unstack(layers, n: int):
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], layers) for i in range(n))


def _layer_sharding(s):
    """Sharding of one layer's slice of a stacked param: the stacked spec without the leading axis."""
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[1:]))


def prepare_params(config: JinaVLMConfig, params, mesh=None) -> InferenceParams:
    """Stacked params (as from init_params / load_jina_vlm / checkpoint.load) -> InferenceParams.

    Copies the decoder layers once into per-layer buffers (the caller can then drop the stacked
    tree). With a mesh, every param is placed on its sharding from the rule table (FSDP over the
    model dimension, tensor parallelism over heads / MLP / vocab).
    """
    if isinstance(params, InferenceParams):
        return params
    try:
        stacked = params["text"]["layers"]
    except (KeyError, TypeError):
        raise GenerateError("params must be the model's param tree (with text/layers) or InferenceParams") from None
    shared = {k: v for k, v in params.items() if k != "text"}
    shared["text"] = {k: v for k, v in params["text"].items() if k != "layers"}
    if mesh is not None:
        from .sharding import param_shardings
        shardings = param_shardings(config, mesh)
        layer_sh = jax.tree_util.tree_map(_layer_sharding, shardings["text"]["layers"])
        sh_shared = {k: v for k, v in shardings.items() if k != "text"}
        sh_shared["text"] = {k: v for k, v in shardings["text"].items() if k != "layers"}
        shared = jax.tree_util.tree_map(jax.device_put, shared, sh_shared)
        layers = tuple(jax.tree_util.tree_map(jax.device_put, lp, layer_sh)
                       for lp in _unstack(stacked, config.text.n_layers))
    else:
        layers = _unstack(stacked, config.text.n_layers)
    return InferenceParams(shared, layers)


def abstract_inference_params(config: JinaVLMConfig) -> InferenceParams:
    """InferenceParams of ShapeDtypeStructs (nothing materialised): for lowering and cost analysis."""
    from .model import abstract_params
    tree = abstract_params(config)
    one = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree["text"]["layers"])
    shared = {k: v for k, v in tree.items() if k != "text"}
    shared["text"] = {k: v for k, v in tree["text"].items() if k != "layers"}
    return InferenceParams(shared, (one,) * config.text.n_layers)


# ---------------------------------------------------------------------------------------- model pieces

def _run_layers(config: JinaVLMConfig, layers, x, positions, mask, cache_index=0, caches=None):
    """All decoder layers, each from its own params (and cache buffers). Returns (x, ((k, v), ...))."""
    layer = DecoderLayer(config.text, dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype),
                         attention_impl=config.attention_impl)
    out = []
    for i, p in enumerate(layers):
        x, kv = layer.apply({"params": p}, x, positions, mask, cache_index,
                            None if caches is None else caches[i])
        out.append(kv)
    return x, tuple(out)


def _final_logits(model: JinaVLM, h):
    return model.logits_from_hidden(model.text.ln_f(h))


def _prefill_impl(config: JinaVLMConfig, cache_length: int, params: InferenceParams, input_ids, attention_mask,
                  images, image_masks, image_input_idx):
    """Prompt [B, L] (left padded) -> (last-position logits [B, V], caches, kv_valid [B, S], last positions)."""
    model = JinaVLM(config)
    shared = {"params": params.shared}
    b, length = input_ids.shape
    x = model.apply(shared, input_ids, images, image_masks, image_input_idx, method=JinaVLM.embed_inputs)
    positions = positions_from_mask(attention_mask)
    if config.attention_impl == "splash":  # the kernel takes the left padding as segment ids
        mask = SegmentMask(attention_mask.astype(jnp.int32))
    else:
        mask = causal_mask(attention_mask, length)
    h, kvs = _run_layers(config, params.layers, x, positions, mask)
    logits = model.apply(shared, h[:, -1:], method=_final_logits)[:, 0]
    pad = ((0, 0), (0, cache_length - length), (0, 0), (0, 0))
    caches = tuple((constrain(jnp.pad(k, pad), CACHE_AXES), constrain(jnp.pad(v, pad), CACHE_AXES))
                   for k, v in kvs)
    kv_valid = jnp.pad(attention_mask.astype(bool), ((0, 0), (0, cache_length - length)))
    return logits, caches, kv_valid, positions[:, -1]


_prefill = jax.jit(_prefill_impl, static_argnums=(0, 1))


def _sample(logits, keys, step, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """[B, V] float32 logits -> [B] int32 tokens. Row b draws with fold_in(keys[b], step)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        cand = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0]  # [B, k], descending
        logits = jnp.where(logits < cand[:, -1:], neg, logits)
    if use_top_p:
        cand = cand if top_k else -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(cand, axis=-1)
        # Keep a token if the mass strictly before it is < top_p (so the top token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


# A streaming callback is one Python function shared by every compiled decode loop; it forwards to
# the sink of the running generate() call (one call at a time, hence the lock).
_SINK_LOCK = threading.Lock()
_SINK: list[Callable | None] = [None]


def _emit(step, tokens):
    sink = _SINK[0]
    if sink is not None:
        sink(int(step), np.asarray(tokens))


def _decode_impl(config: JinaVLMConfig, prompt_length: int, greedy: bool, top_k: int, use_top_p: bool,
                 stream: bool, params: InferenceParams, caches, kv_valid, logits0, last_pos, seeds,
                 temperature, top_p, stop_ids, max_new, done0):
    """The decode loop. Returns (tokens [B, S - prompt_length] with -1 after a row stopped, steps, caches,
    kv_valid). The caches come back so that the donated input buffers alias the outputs: the loop
    then updates them in place instead of copying them first."""
    model = JinaVLM(config)
    shared = {"params": params.shared}
    b, s = kv_valid.shape
    keys = jax.vmap(jax.random.key)(seeds)
    sample = partial(_sample, keys=keys, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k,
                     use_top_p=use_top_p)
    is_stop = lambda t: jnp.any(t[:, None] == stop_ids[None, :], axis=-1)

    tok = sample(logits0, step=0)
    out = jnp.full((b, s - prompt_length), -1, jnp.int32).at[:, 0].set(tok)
    done = done0 | is_stop(tok)
    if stream:
        io_callback(_emit, None, 0, tok, ordered=True)

    def cond(c):
        i, _, _, done, _, _ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, tok, out, done, caches, kv_valid = c
        slot = prompt_length + i - 1  # the slot of the token fed now (the one sampled at step i - 1)
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((b, 1), bool), (0, slot))
        x = model.apply(shared, jnp.maximum(tok, 0)[:, None], method=JinaVLM.embed_tokens)
        pos = (last_pos + i)[:, None]
        h, caches = _run_layers(config, params.layers, x, pos, causal_mask(kv_valid, 1, slot), slot, caches)
        logits = model.apply(shared, h, method=_final_logits)[:, 0]
        nxt = jnp.where(done, -1, sample(logits, step=i))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        if stream:
            io_callback(_emit, None, i, nxt, ordered=True)
        return i + 1, nxt, out, done | is_stop(nxt), caches, kv_valid

    i, _, out, _, caches, kv_valid = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, out, done, caches, kv_valid))
    return out, i, caches, kv_valid


_decode = jax.jit(_decode_impl, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(7, 8))


# ---------------------------------------------------------------------------------------- host side

def _as_numpy_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    if "input_ids" not in batch:
        raise GenerateError(f"the batch has no 'input_ids' (keys: {sorted(batch)}); pass the processor's output")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    out = {"input_ids": ids.astype(np.int64)}
    mask = batch.get("attention_mask")
    out["attention_mask"] = (ids != -1) if mask is None else np.asarray(mask).astype(bool).reshape(ids.shape)
    images = batch.get("images")
    if images is not None and np.asarray(images).ndim == 4 and np.asarray(images).shape[1] > 0:
        out["images"] = np.asarray(images, np.float32)
        out["image_masks"] = np.asarray(batch["image_masks"])
        out["image_input_idx"] = np.asarray(batch["image_input_idx"]).astype(np.int64)
    else:  # text only (the processor returns zero-size image arrays for text-only rows)
        out["images"] = out["image_masks"] = out["image_input_idx"] = None
    return out


def _left_align(b: dict) -> dict:
    """Move each row's tokens to the right end (left padding, spec 6.1) and shift image_input_idx along.

    Every negative image index is made -1 first (spec 9.8): after shifting, the official fill values
    (-10000, -max_len) could otherwise turn non-negative.
    """
    ids, mask, idx = b["input_ids"], b["attention_mask"], b["image_input_idx"]
    length = ids.shape[1]
    last = length - 1 - np.argmax(mask[:, ::-1], axis=1)
    shift = length - 1 - last
    if idx is not None:
        idx = np.where(idx >= 0, idx + shift[:, None, None], -1)
    if np.any(shift):
        ids, mask = ids.copy(), mask.copy()
        for r in np.nonzero(shift)[0]:
            ids[r] = np.roll(ids[r], shift[r])
            mask[r] = np.roll(mask[r], shift[r])
        ids = np.where(mask, ids, -1)
    return {**b, "input_ids": ids, "attention_mask": mask, "image_input_idx": idx}


def _pad_batch(b: dict, rows: int, length: int, crops: int) -> dict:
    """Pad to `rows` rows (all-padding rows), `length` tokens on the left and `crops` padding crops."""
    ids, mask, idx = b["input_ids"], b["attention_mask"], b["image_input_idx"]
    nb, nl = ids.shape
    dl, db = length - nl, rows - nb
    out = {"input_ids": np.pad(ids, ((0, db), (dl, 0)), constant_values=-1).astype(np.int32),
           "attention_mask": np.pad(mask, ((0, db), (dl, 0)), constant_values=False)}
    if b["images"] is None:
        out["images"] = out["image_masks"] = out["image_input_idx"] = None
        return out
    dt = crops - b["images"].shape[1]
    # Padding crops are all -1 (spec 3.1: their features are zeroed) and place nothing (idx -1).
    out["images"] = np.pad(b["images"], ((0, db), (0, dt), (0, 0), (0, 0)), constant_values=-1.0)
    out["image_masks"] = np.pad(b["image_masks"], ((0, db), (0, dt), (0, 0)), constant_values=-1)
    idx = np.where(idx >= 0, idx + dl, -1)
    out["image_input_idx"] = np.pad(idx, ((0, db), (0, dt), (0, 0)), constant_values=-1).astype(np.int32)
    return out


def _row_seeds(seed, n: int, rows: int) -> np.ndarray:
    if np.ndim(seed) == 0:
        # One seed for the batch: row r draws from key(seed + r), so rows differ.
        return (np.uint32(int(seed) % 2**32) + np.arange(rows, dtype=np.uint32)).astype(np.uint32)
    seeds = np.asarray(seed).reshape(-1)
    if seeds.shape[0] != n:
        raise GenerateError(f"seed: got {seeds.shape[0]} per-sequence seeds for {n} sequences")
    return np.pad(seeds.astype(np.int64) % 2**32, (0, rows - n)).astype(np.uint32)


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    stop = [int(s) for s in (stop_ids or ())]
    if len(stop) > MAX_STOP_IDS:
        raise GenerateError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(stop)}")
    return np.array(stop + [-2] * (MAX_STOP_IDS - len(stop)), np.int32)  # -2 never matches a token


class Generator:
    """A model ready to generate: params prepared once (and sharded when a mesh is given).

    Compiled prefill / decode programs are shared by every Generator with the same config, mesh
    and bucket shapes, so creating several is cheap after the first compile.
    """

    def __init__(self, config: JinaVLMConfig, params, mesh=None):
        self.config = config
        self.mesh = mesh
        self.params = prepare_params(config, params, mesh)

    # -------------------------------------------------------------------------------- shardings
    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        return int(self.mesh.shape.get("data", 1) * self.mesh.shape.get("fsdp", 1))

    def _put(self, x, axes):
        if x is None:
            return None
        if self.mesh is None:
            return x
        from .sharding import named
        return jax.device_put(x, named(self.mesh, axes, shape=np.shape(x)))

    # -------------------------------------------------------------------------------- generate
    def generate(self, batch: Mapping[str, Any], *, max_new_tokens: int, sampling: Sampling | None = None,
                 seed: int | Sequence[int] = 0, stop_ids: Sequence[int] = (), tokenizer=None,
                 on_token: Callable[[int, np.ndarray], None] | None = None, cache_length: int | None = None,
                 crop_multiple: int = CROP_MULTIPLE) -> Generation:
        """Generate for a processor batch (see `generate`)."""
        cfg = self.config
        sampling = sampling or Sampling()
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        max_new_tokens = int(max_new_tokens)
        b = _as_numpy_batch(batch)
        n, length = b["input_ids"].shape
        counts = b["attention_mask"].sum(axis=1)
        if n == 0 or length == 0 or np.any(counts == 0):
            rows = [] if length == 0 else np.nonzero(counts == 0)[0].tolist()
            raise GenerateError(f"empty prompt (row(s) {rows or 'all'} have no tokens); every sequence needs "
                                "at least one token")
        check_inputs(cfg, b["input_ids"], b["images"], b["image_masks"], b["image_input_idx"],
                     b["attention_mask"])
        limit = cfg.text.max_sequence_length
        longest = int(counts.max())
        if longest > limit:
            n_img = 0 if b["images"] is None else int(
                np.sum(~np.all(b["images"] == -1.0, axis=(2, 3))))
            raise GenerateError(f"the prompt has {longest} tokens ({n_img} image crops in the batch), more than "
                                f"the model's context of {limit}: use fewer or smaller images (--max-crops) "
                                "or a shorter prompt")
        if longest + max_new_tokens > limit:
            raise GenerateError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                f"model's context of {limit} positions; lower max_new_tokens to at most "
                                f"{limit - longest}")
        b = _left_align(b)

        lp = prompt_bucket(length)
        need = lp + max_new_tokens
        if cache_length is None:
            cache_length = cache_bucket(need)
        elif cache_length < need:
            raise GenerateError(f"max_new_tokens={max_new_tokens} does not fit the KV cache: the padded prompt "
                                f"takes {lp} of its {cache_length} slots, leaving {cache_length - lp}; use a "
                                f"cache_length >= {need} (or leave it unset)")
        rows = -(-n // self._batch_shards()) * self._batch_shards()
        crops = 0 if b["images"] is None else crop_bucket(b["images"].shape[1], crop_multiple)
        p = _pad_batch(b, rows, lp, crops)

        batch_axes = lambda x: ("act_batch",) + (None,) * (x.ndim - 1)
        with self._mesh_context():
            inputs = [None if p[k] is None else self._put(p[k], batch_axes(p[k]))
                      for k in ("input_ids", "attention_mask", "images", "image_masks", "image_input_idx")]
            logits0, caches, kv_valid, last_pos = _prefill(cfg, cache_length, self.params, *inputs)
            seeds = self._put(_row_seeds(seed, n, rows), ("act_batch",))
            done0 = self._put(np.arange(rows) >= n, ("act_batch",))  # padding rows never hold the loop open
            static = (cfg, lp, sampling.greedy, int(sampling.top_k), sampling.top_p < 1, on_token is not None)
            with _SINK_LOCK:
                _SINK[0] = None if on_token is None else (lambda step, toks: on_token(step, toks[:n]))
                try:
                    out, steps, _, _ = _decode(
                        *static, self.params, caches, kv_valid, logits0, last_pos, seeds,
                        np.float32(max(sampling.temperature, 1e-6)), np.float32(sampling.top_p),
                        _stop_array(stop_ids), np.int32(max_new_tokens), done0)
                    out = np.asarray(jax.device_get(out))[:n, :max_new_tokens]
                    steps = int(steps)
                finally:
                    _SINK[0] = None
        return _collect(out, steps, stop_ids, tokenizer, counts.tolist())

    def _mesh_context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        from .sharding import use_mesh
        return use_mesh(self.mesh)


def _collect(out: np.ndarray, steps: int, stop_ids, tokenizer, prompt_lengths) -> Generation:
    stop = set(int(s) for s in (stop_ids or ()))
    tokens, reasons, stop_tokens = [], [], []
    for row in out:
        ids = [int(t) for t in row if t >= 0]
        hit = next((j for j, t in enumerate(ids) if t in stop), None)
        if hit is None:
            tokens.append(ids), reasons.append("length"), stop_tokens.append(None)
        else:
            tokens.append(ids[:hit]), reasons.append("stop"), stop_tokens.append(ids[hit])
    texts = [tokenizer.decode(t) for t in tokens] if tokenizer is not None else None
    return Generation(tokens, reasons, stop_tokens, texts, [int(c) for c in prompt_lengths], steps)


def generate(config: JinaVLMConfig, params, batch: Mapping[str, Any], *, max_new_tokens: int,
             sampling: Sampling | None = None, seed: int | Sequence[int] = 0, stop_ids: Sequence[int] = (),
             mesh=None, tokenizer=None, on_token: Callable[[int, np.ndarray], None] | None = None,
             cache_length: int | None = None, crop_multiple: int = CROP_MULTIPLE) -> Generation:
    """Generate continuations for a batch of processor outputs.

    batch: `input_ids` [B, L] (-1 = padding; left, right or mixed padding is re-aligned to the left),
    optional `attention_mask`, and for images `images` [B, T, 729, 588], `image_masks` [B, T, 729],
    `image_input_idx` [B, T, 196] (negative = unused), as `Processor.__call__` returns them (spec 6.1).
    max_new_tokens: tokens to generate at most per row. sampling: `Sampling()` (greedy) by default.
    seed: one int (row r uses seed + r) or one per row. stop_ids: ids that end a row (e.g.
    `processor.stop_ids`); the stop token is not part of the returned tokens. mesh: a
    `sharding.make_mesh` mesh for data / FSDP / tensor parallel inference. tokenizer: anything with
    `decode(ids)`, to fill `Generation.texts`. on_token(step, tokens [B]): called once per decode
    step with the new token of every row (-1 for rows that already stopped), for streaming.
    cache_length: KV-cache slots (default: the next power of two >= padded prompt + max_new_tokens).

    params: the model's param tree (it is re-laid out for decoding on every call; build a `Generator`
    once to serve many requests) or `InferenceParams`.
    Raises GenerateError / InputError (ValueError) naming the problem.
    """
    return Generator(config, params, mesh).generate(
        batch, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
        tokenizer=tokenizer, on_token=on_token, cache_length=cache_length, crop_multiple=crop_multiple)


__all__ = ["CACHE_AXES", "GenerateError", "Generation", "Generator", "InferenceParams", "Sampling", "cache_bucket",
           "crop_bucket", "abstract_inference_params", "generate", "prepare_params", "prompt_bucket"]
