"""hostmem: the training entry points re-execute themselves with glibc's malloc on huge pages.

The decision is checked for every case with a stand-in environment; the re-execution itself runs in
a child process (it replaces the process), through the same `run_cli` path `python train.py` and
`jinavlm train` take, and is skipped with the reason where this machine cannot use it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jinavlm_jax import hostmem

REPO = Path(__file__).resolve().parents[1]


def test_when_re_execution_helps():
    ok = dict(environ={}, glibc=(2, 36), mode="madvise")
    assert hostmem.reason_not(**ok) is None
    assert "JINAVLM_HUGEPAGES=0" in hostmem.reason_not(**{**ok, "environ": {"JINAVLM_HUGEPAGES": "0"}})
    assert hostmem.reason_not(**{**ok, "environ": {"JINAVLM_HUGEPAGES": "1"}}) is None
    already = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}
    assert "already sets" in hostmem.reason_not(**{**ok, "environ": already})
    assert hostmem.reason_not(**{**ok, "environ": {"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=1"}}) is None
    assert "glibc >= 2.35" in hostmem.reason_not(**{**ok, "glibc": (2, 31)})
    assert "always, not madvise" in hostmem.reason_not(**{**ok, "mode": "always"})
    assert "never, not madvise" in hostmem.reason_not(**{**ok, "mode": "never"})


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hostmem.thp_mode(str(f)) == "always"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


CHILD = """
import os, sys
from jinavlm_jax.command import Command, run_cli
show = Command("show", "print the tunables", lambda ap: ap.add_argument("word"),
               lambda a: print(a.word, os.environ.get("GLIBC_TUNABLES", "-"), os.getpid()), huge_pages=True)
print("start", os.getpid(), flush=True)
sys.exit(run_cli(show, None, "show"))
"""


def _child(env_extra: dict) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", CHILD, "hello"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")


def test_entry_point_re_executes_once_with_the_tunable():
    why = hostmem.reason_not(environ={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    if why is not None:
        pytest.skip(f"this machine cannot use malloc huge pages: {why}")
    lines = _child({})
    starts = [l for l in lines if l.startswith("start")]
    assert len(starts) == 2, lines             # the program ran twice: before and after exec
    word, tunables, pid = next(l for l in lines if l.startswith("hello")).split()
    assert "glibc.malloc.hugetlb=1" in tunables.split(":")
    assert pid == starts[0].split()[1] == starts[1].split()[1]   # the same process, re-executed
    off = _child({"JINAVLM_HUGEPAGES": "0"})
    assert len([l for l in off if l.startswith("start")]) == 1
    assert next(l for l in off if l.startswith("hello")).split()[1] == "-"


def test_in_process_callers_never_re_execute():
    from jinavlm_jax.command import Command, run_cli
    seen = []
    cmd = Command("x", "", lambda ap: None, lambda a: seen.append(os.getpid()), huge_pages=True)
    assert run_cli(cmd, [], "x") == 0 and seen == [os.getpid()]
