"""Shape buckets: prompts, crops and caches are padded to a few sizes so that jit compiles rarely."""
from __future__ import annotations

CROP_MULTIPLE = 13  # thumbnail + 12 tiles: the released processor's crops for one image


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


PROMPT_STEP = 256  # prompt buckets above 1024 tokens: multiples of this (a 1,777-token photo prompt -> 1,792)
CACHE_STEP = 128   # KV-cache lengths: multiples of this where that is less than the next power of two


def prompt_bucket(n: int, minimum: int = 32, multiple: int | None = None) -> int:
    """Padded prompt length: a power of two up to 1024, then a multiple of PROMPT_STEP (at most 255
    padded positions, < 25% above 1024). `multiple`: the next multiple of it instead (1: the exact
    length; one compile per distinct length, no padded positions to prefill)."""
    if multiple is not None:
        return -(-max(int(n), 1) // multiple) * multiple
    n = max(int(n), minimum)
    return _next_pow2(n) if n <= 1024 else -(-n // PROMPT_STEP) * PROMPT_STEP


def prompt_buckets(max_length: int, minimum: int = 32) -> list[int]:
    """Every prompt bucket a prompt of at most `max_length` tokens can land in, ascending."""
    out, n = [], minimum
    while True:
        b = prompt_bucket(n, minimum)
        out.append(b)
        if b >= max_length:
            return out
        n = b + 1


def crop_bucket(n: int, multiple: int = CROP_MULTIPLE) -> int:
    """Padded crop count: the smaller of the next power of two and the next multiple of `multiple`."""
    if n <= 0:
        return 0
    return min(_next_pow2(n), -(-n // multiple) * multiple)


def cache_bucket(n: int) -> int:
    """KV-cache length: the smaller of the next power of two and the next multiple of CACHE_STEP (every
    decode step attends over the whole cache, so its padding costs on every token)."""
    return min(_next_pow2(n), -(-int(n) // CACHE_STEP) * CACHE_STEP)
