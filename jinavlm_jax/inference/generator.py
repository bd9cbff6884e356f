"""`generate()` and `Generator`: static batches through a jitted prefill and a jitted decode loop.

    gen = Generator(config, params)                      # or generate(config, params, batch, ...)
    out = gen.generate(processor(prompts, images), max_new_tokens=64, stop_ids=processor.stop_ids,
                       tokenizer=processor)
    out.texts, out.tokens, out.stop_reasons

Shapes are bucketed so that new prompts and images rarely compile: the prompt length is padded on
the left to a power of two (multiples of 256 beyond 1024), the crop count to a power of two or a
multiple of 13 (thumbnail + 12 tiles, the released processor's maximum for one image), the cache
to a power of two or a multiple of 128 (the smaller) >= prompt + max_new_tokens (`buckets`), and
max_new_tokens, the stop ids, temperature, top-k
and top-p are traced values. Only whether top-k / top-p filtering runs at all is compiled in.
For many users at once, see `engine.Engine` (continuous batching over decode slots).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from ..model import JinaVLMConfig, check_inputs
from .buckets import CROP_MULTIPLE, cache_bucket, crop_bucket, prompt_bucket
from .params import prepare_params
from .placement import batch_shards, mesh_context, put
from .programs import STREAM_LOCK, decode_loop_jit, parse_kv_cache_dtype, prefill_jit, set_stream_sink
from .sampling import GenerateError, Sampling, sampling_arrays

MAX_STOP_IDS = 16


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


def stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    stop = [int(s) for s in (stop_ids or ())]
    if len(stop) > MAX_STOP_IDS:
        raise GenerateError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(stop)}")
    return np.array(stop + [-2] * (MAX_STOP_IDS - len(stop)), np.int32)  # -2 never matches a token


class Generator:
    """A model ready to generate: params prepared once (and sharded when a mesh is given).

    Compiled prefill / decode programs are shared by every Generator with the same config, mesh
    and bucket shapes, so creating several is cheap after the first compile.
    """

    def __init__(self, config: JinaVLMConfig, params, mesh=None, *, quantize=None, kv_cache_dtype=None,
                 kernel_layout=None):
        """quantize: None (the params as they are), "int8" (decoder kernels int8 with per-channel scales,
        activations in the compute dtype; `adapt.quant`) or "int8+vision". kv_cache_dtype: None / "auto"
        (the KV cache in the compute dtype) or "int8" (int8 codes with a float32 scale per token:
        half a bf16 cache's bytes; `model.layers.QuantizedKV`). kernel_layout: None / "auto" (the
        decoder's kernels stored output-major on CPU, as the checkpoint elsewhere), "in_out" or "out_in"
        (`inference.prepare_params`)."""
        self.config = config
        self.mesh = mesh
        self.params = prepare_params(config, params, mesh, quantize, kernel_layout)
        self.kv_cache_dtype = parse_kv_cache_dtype(kv_cache_dtype)

    # -------------------------------------------------------------------------------- generate
    def generate(self, batch: Mapping[str, Any], *, max_new_tokens: int, sampling: Sampling | None = None,
                 seed: int | Sequence[int] = 0, stop_ids: Sequence[int] = (), tokenizer=None,
                 on_token: Callable[[int, np.ndarray], None] | None = None, cache_length: int | None = None,
                 crop_multiple: int = CROP_MULTIPLE, prompt_multiple: int | None = None) -> Generation:
        """Generate for a processor batch (see `generate`)."""
        cfg = self.config
        sampling = sampling or Sampling()
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        max_new_tokens = int(max_new_tokens)
        if prompt_multiple is not None and (int(prompt_multiple) != prompt_multiple or prompt_multiple < 1):
            raise GenerateError(f"prompt_multiple must be None (the default buckets) or an integer >= 1, "
                                f"got {prompt_multiple!r}")
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

        lp = prompt_bucket(length, multiple=prompt_multiple)
        need = lp + max_new_tokens
        if cache_length is None:
            cache_length = cache_bucket(need)
        elif cache_length < need:
            raise GenerateError(f"max_new_tokens={max_new_tokens} does not fit the KV cache: the padded prompt "
                                f"takes {lp} of its {cache_length} slots, leaving {cache_length - lp}; use a "
                                f"cache_length >= {need} (or leave it unset)")
        rows = -(-n // batch_shards(self.mesh)) * batch_shards(self.mesh)
        crops = 0 if b["images"] is None else crop_bucket(b["images"].shape[1], crop_multiple)
        p = _pad_batch(b, rows, lp, crops)

        batch_axes = lambda x: ("act_batch",) + (None,) * (x.ndim - 1)
        with mesh_context(self.mesh):
            inputs = [None if p[k] is None else put(p[k], self.mesh, batch_axes(p[k]))
                      for k in ("input_ids", "attention_mask", "images", "image_masks", "image_input_idx")]
            logits0, caches, kv_valid, last_pos = prefill_jit(cfg, cache_length, self.params, *inputs,
                                                                   kv_cache_dtype=self.kv_cache_dtype)
            seeds = put(_row_seeds(seed, n, rows), self.mesh, ("act_batch",))
            done0 = put(np.arange(rows) >= n, self.mesh, ("act_batch",))  # padding rows never hold the loop open
            temperature, top_k, top_p = (put(a, self.mesh, ("act_batch",)) for a in sampling_arrays(sampling, rows))
            static = (cfg, lp, sampling.filtered, on_token is not None)
            with STREAM_LOCK:
                set_stream_sink(None if on_token is None else (lambda step, toks: on_token(step, toks[:n])))
                try:
                    out, steps, _, _ = decode_loop_jit(
                        *static, self.params, caches, kv_valid, logits0, last_pos, seeds, temperature, top_k,
                        top_p, stop_array(stop_ids), np.int32(max_new_tokens), done0)
                    out = np.asarray(jax.device_get(out))[:n, :max_new_tokens]
                    steps = int(steps)
                finally:
                    set_stream_sink(None)
        return _collect(out, steps, stop_ids, tokenizer, counts.tolist())


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
             cache_length: int | None = None, crop_multiple: int = CROP_MULTIPLE, quantize=None,
             kv_cache_dtype=None, prompt_multiple: int | None = None) -> Generation:
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
    cache_length: KV-cache slots (default: `cache_bucket(padded prompt + max_new_tokens)`).
    prompt_multiple: None pads the prompt to its bucket (`prompt_bucket`: few compiled shapes); an
    integer k pads it to the next multiple of k (1: the exact length, e.g. for the lowest time to first
    token of one long prompt, at one compile per length).

    params: the model's param tree (it is re-laid out for decoding on every call; build a `Generator`
    once to serve many requests) or `InferenceParams`. quantize: "int8" runs the decoder with int8
    weights; kv_cache_dtype: "int8" keeps the KV cache in int8 (see `Generator`).
    Raises GenerateError / InputError (ValueError) naming the problem.
    """
    return Generator(config, params, mesh, quantize=quantize, kv_cache_dtype=kv_cache_dtype).generate(
        batch, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids,
        tokenizer=tokenizer, on_token=on_token, cache_length=cache_length, crop_multiple=crop_multiple,
        prompt_multiple=prompt_multiple)




__all__ = ["GenerateError", "Generation", "Generator", "Sampling", "generate"]
