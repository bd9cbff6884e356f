"""Host memory for XLA:CPU training steps: transparent huge pages under glibc's malloc.

A train step on XLA:CPU allocates its temporaries (the activations kept for the backward pass, the
gradients, the logits) afresh on every call. glibc serves blocks above 32 MiB with `mmap` and gives
them back with `munmap`, so every step first-touches gigabytes again, one 4 KiB page fault at a
time: at the mid size of `benchmarks/bench_train.py` (273M parameters, 2 x 512 tokens) 935k page
faults and 3.1 s of kernel time per 8.4 s step. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >=
2.35) marks those blocks for transparent huge pages (`madvise`, the kernel's default THP mode):
2 MiB per fault, about 10k faults per step, and the step 8.4 -> 7.1 s (measured in
docs/performance.md, "Eighth round"). PyTorch's step is unchanged by it; inference programs (weights
resident, temporaries reused) measured within noise.

glibc reads tunables once, when the process starts, so `with_huge_pages()` re-executes the program
(same interpreter, arguments and environment, plus the tunable) before anything else has run. The
training entry points call it (`python train.py`, `jinavlm train`, `benchmarks/bench_train.py`,
`benchmarks/profile_train_step.py`); a script of your own can do the same first thing, or be started
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. `JINAVLM_HUGEPAGES=0` opts out. Nothing happens where
it cannot help: not Linux with glibc >= 2.35, the kernel's THP mode "never" (no huge pages) or
"always" (malloc's blocks get them already), or the tunable already set.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "JINAVLM_HUGEPAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = open(path).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _tunable(environ) -> str | None:
    """GLIBC_TUNABLES' malloc huge-page entry ("glibc.malloc.hugetlb=N"), None when it has none."""
    return next((t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.split("=")[0] == TUNABLE), None)


def tunable_set(environ=None) -> bool:
    """True when GLIBC_TUNABLES already names the malloc huge-page tunable (any value)."""
    return _tunable(os.environ if environ is None else environ) is not None


def reason_not(environ=None, glibc=None, mode=None) -> str | None:
    """Why re-executing with the tunable would not help (a sentence), or None when it would.
    The arguments replace the process's environment, glibc version and THP mode (for tests)."""
    environ = os.environ if environ is None else environ
    glibc = glibc_version() if glibc is None else glibc
    mode = thp_mode() if mode is None else mode
    if environ.get(OPT_OUT, "1") == "0":
        return f"{OPT_OUT}=0"
    if tunable_set(environ):
        return f"GLIBC_TUNABLES already sets {TUNABLE}"
    if not sys.platform.startswith("linux") or glibc is None or glibc < (2, 35):
        return "needs Linux with glibc >= 2.35"
    if not sys.executable:
        return "no interpreter path to re-execute (sys.executable is empty)"
    if mode != "madvise":
        return f"the kernel's transparent huge pages are {mode or 'unavailable'}, not madvise"
    return None


def status(environ=None) -> str:
    """One line for benchmark headers: whether malloc's large blocks use huge pages, and why."""
    environ = os.environ if environ is None else environ
    if (value := _tunable(environ)) is not None:
        return f"malloc huge pages: GLIBC_TUNABLES {value}"
    if thp_mode() == "always":
        return "malloc huge pages: the kernel's THP mode is always"
    return f"malloc huge pages: off ({reason_not(environ) or 'tunable not set'})"


def with_huge_pages() -> None:
    """Re-execute this program with GLIBC_TUNABLES extended by glibc.malloc.hugetlb=1, when that helps
    (see the module docstring); otherwise return. Call it first thing in a `__main__` block."""
    if reason_not() is not None:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), f"{TUNABLE}=1") if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
