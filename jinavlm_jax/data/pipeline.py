"""grain input pipelines over the built datasets: mixture, per-process sharding, processing, packing.

The training stream is one deterministic, random-access sequence of samples (a grain `MapDataset`):

1. every source is a tfds data source, shuffled with the seed (a new order each epoch) and repeated;
2. `MixtureMap` decides which source feeds each position of the *global* stream: for the first
   `single_source_steps` steps a whole global batch comes from one source (drawn by weight, seeded;
   the paper's stage-2 schedule), afterwards sources are interleaved by weight inside every batch
   (e.g. 15 % text-only in stage 1);
3. each process (`ShardByJaxProcess`) reads its own block of rows of every global batch, so one
   process with 4 devices and two processes with 2 devices each train on identical global batches;
4. `EncodeSample` runs the processor (`Processor.training_batch`) on each sample: chat template,
   image tiling, the assistant-token loss mask, truncation or rejection of over-long samples,
   skipping (counted) of images that fail to decode;
5. optional grain worker processes do steps 1-4; their outputs are interleaved back in order, so
   the data order does not depend on the number of workers;
6. `PackBatch` places samples into fixed-shape rows, one sample per row (padding) or several
   (`packing`, first fit, segment ids and per-sample positions), and emits numpy batches.

The iterator is checkpointable (`get_state` / `set_state`, saved by Orbax through grain's handler):
its state is the position in the stream of the first sample not yet in an emitted batch.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import grain
import numpy as np

from .builder import DataError, open_split

PAD = -1


# ---------------------------------------------------------------------------------------- mixture

class MixtureMap(grain.transforms.DatasetSelectionMap):
    """Position in this process's stream -> (source, index in that source's shuffled, repeated order).

    Global position g = step * global_batch + row. Process p reads rows [p*b, (p+1)*b) of every
    global batch (b = global_batch / processes). Phase 1 (g < single_source_steps * global_batch):
    global batch k comes entirely from source `choice[k]` (seeded draw by weight). Phase 2: sources
    are interleaved by weight in a fixed pattern of `sum(w)` positions (weights as small integers).
    Each source continues where phase 1 left it, so no sample repeats before its epoch ends.
    """

    def __init__(self, weights: Sequence[float], global_batch: int, local_batch: int, process_index: int,
                 single_source_steps: int = 0, seed: int = 0):
        if not weights or min(weights) <= 0:
            raise DataError(f"source weights must all be > 0, got {list(weights)}")
        self.b_global, self.b_local, self.proc = int(global_batch), int(local_batch), int(process_index)
        n = len(weights)
        p = np.asarray(weights, np.float64) / np.sum(weights)
        rng = np.random.default_rng([int(seed), 7919])
        self.choice = rng.choice(n, size=int(single_source_steps), p=p).astype(np.int32)
        # rank[k]: how many earlier phase-1 batches used the same source.
        self.rank = np.zeros(len(self.choice), np.int64)
        seen = np.zeros(n, np.int64)
        for k, c in enumerate(self.choice):
            self.rank[k] = seen[c]
            seen[c] += 1
        self.offset = seen * self.b_global  # samples each source gave in phase 1
        # Phase 2: integer weights (limited precision), then a smooth weighted round-robin pattern.
        fr = [Fraction(float(x)).limit_denominator(200) for x in p]
        den = math.lcm(*[f.denominator for f in fr])
        w = [max(1, int(f * den)) for f in fr]
        g = math.gcd(*w)
        self.w = [x // g for x in w]
        self.pattern, self.within = _interleave(self.w)
        self.n1 = len(self.choice) * self.b_global

    def __len__(self) -> int:
        return sys.maxsize

    def global_position(self, i: int) -> int:
        step, j = divmod(int(i), self.b_local)
        return step * self.b_global + self.proc * self.b_local + j

    def __getitem__(self, i: int) -> tuple[int, int]:
        g = self.global_position(i)
        if g < self.n1:
            k, r = divmod(g, self.b_global)
            return int(self.choice[k]), int(self.rank[k] * self.b_global + r)
        c, pos = divmod(g - self.n1, len(self.pattern))
        src = self.pattern[pos]
        return src, int(self.offset[src] + c * self.w[src] + self.within[pos])


def _interleave(w: Sequence[int]) -> tuple[list[int], list[int]]:
    """Smooth weighted round robin over integer weights: the source of each of sum(w) slots and its
    rank among that source's slots (spreads e.g. 17:3 evenly rather than 17 then 3)."""
    total = sum(w)
    current = [0] * len(w)
    pattern, within, seen = [], [], [0] * len(w)
    for _ in range(total):
        for k in range(len(w)):
            current[k] += w[k]
        k = max(range(len(w)), key=lambda j: (current[j], -j))
        current[k] -= total
        pattern.append(k)
        within.append(seen[k])
        seen[k] += 1
    return pattern, within


class CycleMap(grain.transforms.DatasetSelectionMap):
    """Held-out stream: the concatenated eval splits in order, cycled, read in process blocks like
    training (every process yields the same number of full batches)."""

    def __init__(self, lengths: Sequence[int], global_batch: int, local_batch: int, process_index: int):
        self.starts = np.cumsum([0] + list(lengths))
        self.total = int(self.starts[-1])
        self.b_global, self.b_local, self.proc = global_batch, local_batch, process_index

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, i: int) -> tuple[int, int]:
        step, j = divmod(int(i), self.b_local)
        g = (step * self.b_global + self.proc * self.b_local + j) % self.total
        src = int(np.searchsorted(self.starts, g, side="right") - 1)
        return src, int(g - self.starts[src])


def _tag(source: int, record: dict) -> dict:
    return {"source": source, "record": record}


# ---------------------------------------------------------------------------------------- processing

@dataclass
class EncodeSpec:
    """Everything `EncodeSample` needs to build the processor in a worker process (picklable)."""

    tokenizer_path: str
    preprocess: dict                 # PreprocessConfig.from_hf-style dict (released defaults if empty)
    always_start_with_space: bool = True
    seq_len: int = 2048
    crops_per_row: int = 13
    too_long: str = "truncate"
    bad_image: str = "skip"
    image_dtype: str = "float32"
    single_source_local: int = 0     # local stream positions in the single-source phase


class EncodeSample:
    """A grain map: tagged record -> one processed sample, or a skip marker (bad image, rejected)."""

    def __init__(self, spec: EncodeSpec):
        self.spec = spec
        self._processor = None
        self._warned = 0

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    @property
    def processor(self):
        if self._processor is None:
            self._processor = make_processor(self.spec)
        return self._processor

    def __call__(self, index: int, tagged: dict) -> dict:
        from ..processing import ImageInputError, PromptError
        s = self.spec
        rec = tagged["record"]
        rid = _text(rec.get("id", b"?"))
        try:
            messages = json.loads(_text(rec["messages"]))
        except (KeyError, json.JSONDecodeError) as e:
            raise DataError(f"sample {rid}: the stored messages are not valid JSON ({e})") from None
        images = list(rec.get("images", []))
        try:
            out = self.processor.training_batch([messages], [images], padding_side="right")
        except ImageInputError as e:
            if s.bad_image == "error":
                raise DataError(f"sample {rid}: {e} (data.bad_image=error; use skip to leave it out)") from None
            return {"skip": "bad_image", "detail": f"{rid}: {e}"}
        except PromptError as e:
            raise DataError(f"sample {rid}: {e}") from None
        ids, labels, mask = out["input_ids"][0], out["labels"][0], self._with_separators(out["loss_mask"][0],
                                                                                        out["labels"][0])
        crops = out["images"][0]
        masks, idx = out["image_masks"][0], out["image_input_idx"][0]
        n, t = len(ids), len(crops)
        truncated = False
        if n > s.seq_len or t > s.crops_per_row:
            what = (f"{n} tokens > data.seq_len={s.seq_len}" if n > s.seq_len
                    else f"{t} crops > data.crops_per_row={s.crops_per_row}")
            if s.too_long == "reject":
                return {"skip": "too_long", "detail": f"{rid}: {what}"}
            truncated = True
            if self._warned < 3:
                self._warned += 1
                warnings.warn(f"sample {rid}: {what}; truncated (data.too_long=truncate; set reject to "
                              "skip such samples)", stacklevel=2)
            ids, labels, mask = ids[:s.seq_len], labels[:s.seq_len], mask[:s.seq_len]
            crops, masks, idx = crops[:s.crops_per_row], masks[:s.crops_per_row], idx[:s.crops_per_row]
            idx = np.where(idx < s.seq_len, idx, PAD)
        dtype = _np_dtype(s.image_dtype)
        return {
            "input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
            "weights": mask.astype(np.float32), "images": crops.astype(dtype),
            "image_masks": masks.astype(np.int32), "image_input_idx": idx.astype(np.int32),
            "source": np.int32(tagged["source"]), "phase1": bool(index < s.single_source_local),
            "truncated": truncated,
        }


    def _with_separators(self, mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Also train on a whitespace-only token right before an answer.

        The chat template writes "Assistant: " + answer, and a byte-level BPE may encode the space
        as a token of its own ("Ġ", then "Quadrat") when it has no merge of the space with the
        answer's first letters. That token lies outside the answer's characters, so the processor's
        mask leaves it out, yet at generation time it is the first token the model must produce
        after "Assistant:"; without it, answers starting with such a split are never generated.
        """
        nxt = np.zeros_like(mask)
        nxt[:-1] = mask[1:]
        cand = np.nonzero(nxt & ~mask)[0]
        if not len(cand):
            return mask
        mask = mask.copy()
        for t in cand:
            if self._is_space(int(labels[t])):
                mask[t] = True
        return mask

    def _is_space(self, token: int) -> bool:
        cache = self.__dict__.setdefault("_space_cache", {})
        if token not in cache:
            text = self.processor.tokenizer.decode([token], skip_special_tokens=False)
            cache[token] = bool(text) and not text.strip()
        return cache[token]


def make_processor(spec: EncodeSpec):
    """The processor of the preprocessing module, with a length limit that never refuses (the
    pipeline truncates or rejects by its own policy)."""
    from ..processing import PreprocessConfig, Processor
    cfg = PreprocessConfig.from_hf(spec.preprocess) if spec.preprocess else PreprocessConfig()
    return Processor(spec.tokenizer_path, cfg, max_length=1 << 30,
                     always_start_with_space=spec.always_start_with_space)


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ---------------------------------------------------------------------------------------- packing

@dataclass
class BatchSpec:
    batch_size: int                  # rows of this process
    seq_len: int
    crops_per_row: int
    packing: bool
    image_dtype: str = "float32"
    n_patches: int = 729
    patch_dim: int = 588
    tokens_per_crop: int = 196

    @classmethod
    def for_processor(cls, preprocess, batch_size: int, seq_len: int, crops_per_row: int, packing: bool = False,
                      image_dtype: str = "float32") -> "BatchSpec":
        """A spec whose crop geometry is the processor's (`PreprocessConfig`)."""
        return cls(batch_size, seq_len, crops_per_row, packing, image_dtype, preprocess.n_patches,
                   preprocess.patch_dim, preprocess.tokens_per_crop)


class PackBatch(grain.IterDataset):
    """Samples -> fixed-shape numpy batches (see the module docstring, step 6)."""

    def __init__(self, parent: grain.IterDataset, spec: BatchSpec):
        super().__init__(parent)
        self.spec = spec

    def __iter__(self):
        return _PackBatchIterator(self._parent.__iter__(), self.spec)

    def __str__(self) -> str:
        return f"PackBatch({self.spec})"


class _PackBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, spec: BatchSpec):
        super().__init__(parent)
        self.spec = spec
        self._pending = None
        self._pending_state = None
        self.counters = {"samples": 0, "skipped_bad_image": 0, "skipped_too_long": 0, "truncated": 0,
                         "batches": 0}
        self.last_skips: list[str] = []

    def _empty(self) -> dict:
        s = self.spec
        b, l, t = s.batch_size, s.seq_len, s.crops_per_row
        out = {"input_ids": np.full((b, l), PAD, np.int32), "labels": np.full((b, l), PAD, np.int32),
               "weights": np.zeros((b, l), np.float32), "positions": np.zeros((b, l), np.int32),
               "segment_ids": np.zeros((b, l), np.int32)}
        if t:
            out["images"] = np.full((b, t, s.n_patches, s.patch_dim), -1, _np_dtype(s.image_dtype))
            out["image_masks"] = np.full((b, t, s.n_patches), -1, np.int32)
            out["image_input_idx"] = np.full((b, t, s.tokens_per_crop), PAD, np.int32)
        return out

    def _next_sample(self):
        """The next usable sample (skips counted); remembers the parent state before reading it."""
        while True:
            state = self._parent.get_state()
            el = next(self._parent)
            if "skip" in el:
                self.counters["skipped_" + el["skip"]] += 1
                self.last_skips = (self.last_skips + [el["detail"]])[-5:]
                continue
            return el, state

    def __next__(self) -> dict:
        s = self.spec
        batch = self._empty()
        used = np.zeros(s.batch_size, np.int64)
        crops = np.zeros(s.batch_size, np.int64)
        segs = np.zeros(s.batch_size, np.int64)
        source = None
        n_placed = 0
        while True:
            if self._pending is not None:
                el, state = self._pending, self._pending_state
                self._pending = self._pending_state = None
            else:
                try:
                    el, state = self._next_sample()
                except StopIteration:
                    if n_placed:
                        break
                    raise
            n, t = len(el["input_ids"]), len(el["images"])
            if el["phase1"] and source is not None and int(el["source"]) != source:
                row = None  # single-source phase: a batch never mixes sources
            elif s.packing:
                fits = np.nonzero((used + n <= s.seq_len) & (crops + t <= s.crops_per_row))[0]
                row = int(fits[0]) if len(fits) else None
            else:
                free = np.nonzero(segs == 0)[0]
                row = int(free[0]) if len(free) else None
            if row is None:
                self._pending, self._pending_state = el, state
                break
            self._place(batch, row, int(used[row]), int(crops[row]), int(segs[row]) + 1, el)
            used[row] += n
            crops[row] += t
            segs[row] += 1
            n_placed += 1
            source = int(el["source"]) if source is None else source
            self.counters["samples"] += 1
            self.counters["truncated"] += int(el["truncated"])
            if not s.packing and n_placed == s.batch_size:
                break
        self.counters["batches"] += 1
        batch["source"] = np.full((s.batch_size,), -1 if source is None else source, np.int32)
        return batch

    def _place(self, batch: dict, row: int, off: int, c0: int, seg: int, el: dict) -> None:
        n, t = len(el["input_ids"]), len(el["images"])
        sl = slice(off, off + n)
        batch["input_ids"][row, sl] = el["input_ids"]
        batch["labels"][row, sl] = el["labels"]
        batch["weights"][row, sl] = el["weights"]
        batch["positions"][row, sl] = np.arange(n, dtype=np.int32)
        batch["segment_ids"][row, sl] = seg
        if t:
            cs = slice(c0, c0 + t)
            batch["images"][row, cs] = el["images"]
            batch["image_masks"][row, cs] = el["image_masks"]
            idx = el["image_input_idx"]
            batch["image_input_idx"][row, cs] = np.where(idx >= 0, idx + off, PAD)

    def get_state(self) -> dict:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent, "counters": dict(self.counters)}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self.counters = dict(state.get("counters", self.counters))


# ---------------------------------------------------------------------------------------- assembly

@dataclass
class SourceSpec:
    name: str
    path: str          # built dataset directory
    split: str
    weight: float = 1.0


def _mark_parsed_flags() -> None:
    # grain's worker processes read absl flags; a plain script never parsed them.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_dataset(sources: Sequence[SourceSpec], encode: EncodeSpec, batch: BatchSpec, *, global_batch: int,
                  seed: int, single_source_steps: int = 0, process_index: int | None = None,
                  process_count: int | None = None, worker_count: int = 0, worker_buffer_size: int = 4
                  ) -> grain.IterDataset:
    """The training `IterDataset` of this process (infinite; iterate it with `iter(...)`)."""
    shard = grain.sharding.ShardByJaxProcess() if process_index is None else grain.sharding.ShardOptions(
        process_index, process_count or 1)
    if global_batch % shard.shard_count:
        raise DataError(f"data.batch_size={global_batch} is not divisible by the {shard.shard_count} processes")
    local = global_batch // shard.shard_count
    if local != batch.batch_size:
        raise DataError(f"BatchSpec.batch_size={batch.batch_size} != global {global_batch} / {shard.shard_count} "
                        "processes")
    parts = []
    for k, src in enumerate(sources):
        ds = grain.MapDataset.source(open_split(src.path, src.split))
        parts.append(ds.seed(seed * 1000 + k).shuffle().repeat().map(_Tag(k)))
    mix = MixtureMap([s.weight for s in sources], global_batch, local, shard.shard_index, single_source_steps, seed)
    encode = EncodeSpec(**{**encode.__dict__, "single_source_local": single_source_steps * local})
    stream = grain.MapDataset.select_from_datasets(parts, mix).map_with_index(EncodeSample(encode))
    return _finish(stream, batch, worker_count, worker_buffer_size)


def eval_dataset(sources: Sequence[SourceSpec], encode: EncodeSpec, batch: BatchSpec, *, global_batch: int,
                 process_index: int | None = None, process_count: int | None = None) -> tuple[grain.IterDataset, int]:
    """The held-out `IterDataset` (the eval splits in order, cycled; padding layout) and the number of
    global batches that cover them once."""
    shard = grain.sharding.ShardByJaxProcess() if process_index is None else grain.sharding.ShardOptions(
        process_index, process_count or 1)
    local = global_batch // shard.shard_count
    parts = [grain.MapDataset.source(open_split(s.path, s.split)).map(_Tag(k)) for k, s in enumerate(sources)]
    lengths = [len(p) for p in parts]
    stream = grain.MapDataset.select_from_datasets(parts, CycleMap(lengths, global_batch, local, shard.shard_index))
    stream = stream.map_with_index(EncodeSample(encode))
    spec = BatchSpec(**{**batch.__dict__, "batch_size": local, "packing": False})
    return _finish(stream, spec, 0, 1), -(-sum(lengths) // global_batch)


class _Tag:
    """Picklable map: record -> {'source': k, 'record': record}."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, record):
        return _tag(self.k, record)


def _finish(stream: grain.MapDataset, batch: BatchSpec, worker_count: int, buffer: int) -> grain.IterDataset:
    # One reader thread (per worker): the processor is numpy-bound and the host has few cores to spare.
    it = stream.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if worker_count:
        _mark_parsed_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=buffer))
    return PackBatch(it, batch)


def eval_examples(sources: Sequence[SourceSpec], n_per_source: int) -> list[dict]:
    """Held-out samples for generation: the first `n_per_source` of each eval split whose last message
    is an assistant answer -> {source, id, prompt_messages, images, reference}."""
    out = []
    for src in sources:
        ds = open_split(src.path, src.split)
        taken = 0
        for i in range(len(ds)):
            if taken >= n_per_source:
                break
            rec = ds[i]
            msgs = json.loads(_text(rec["messages"]))
            if not msgs or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
                continue
            out.append({"source": src.name, "id": _text(rec["id"]), "prompt_messages": msgs[:-1],
                        "images": list(rec["images"]), "reference": msgs[-1]["content"]})
            taken += 1
    return out
