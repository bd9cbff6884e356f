"""Preemption and resume, end to end through `train.py` in subprocesses (acceptance 2 and 3).

One uninterrupted run A gives the reference losses. Then one interrupted run goes:
  B   hangs while finalising the checkpoint of step 4 and is SIGKILLed there: no directory that
      looks like a complete checkpoint of step 4 may exist (Orbax's temporary directory is left);
  B2  restarts (resumes from step 2, the last complete checkpoint) and gets SIGTERM mid-run: it must
      exit 143 naming step S, with a complete checkpoint of exactly step S;
  C   restarts and finishes.
The losses of every step of B/B2/C (the last record of each step: re-run steps replace earlier ones)
must equal A's bit for bit (same data order, same params, same optimizer state on CPU).
"""
from __future__ import annotations

import json
import re
import signal

import pytest

from test_train_support import child_env, losses_of, run_child, shared_cache, shared_setup, start_child, wait_for

pytestmark = pytest.mark.slow  # training runs in subprocesses, killed and resumed

STEPS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_setup(tmp_path_factory)


def test_sigkill_during_save_and_sigterm_then_resume_is_bit_identical(setup, tmp_path, tmp_path_factory):
    from jinavlm_jax.train.checkpointing import TrainCheckpointer
    cache = shared_cache(tmp_path_factory)
    base = setup["overrides"] + [f"run.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=10"]

    a_dir = tmp_path / "a"
    rc = run_child(base + [f"run.output_dir={a_dir}"], child_env(cache), tmp_path / "a.log")
    assert rc == 0, (tmp_path / "a.log").read_text()[-3000:]
    ref = losses_of(a_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))

    run = tmp_path / "b"
    args = base + [f"run.output_dir={run}"]
    ckdir = run / "checkpoints"

    # B: SIGKILL while the checkpoint of step 4 is being finalised.
    marker = tmp_path / "finalizing"
    log = tmp_path / "b.log"
    p = start_child(args, child_env(cache, HANG_FINALIZE_STEP=4, MARKER=marker), log)
    try:
        wait_for(marker.exists, 240, "the save of step 4 to start finalising", p, log)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    names = sorted(x.name for x in ckdir.iterdir())
    assert "4" not in names, names                       # nothing that looks complete
    assert any(n.startswith("4.") and "tmp" in n for n in names), names   # the half-written save
    assert TrainCheckpointer(ckdir).latest_step() == 2

    # B2: resume, then SIGTERM once B2 itself has logged step 5. B's save ran asynchronously, so B may
    # have logged steps past 4 before it was killed: only records appended after B2 started count.
    metrics = run / "metrics.jsonl"
    seen = len(metrics.read_text(encoding="utf-8").splitlines()) if metrics.exists() else 0

    def b2_reached_step_5():
        for line in metrics.read_text(encoding="utf-8").splitlines()[seen:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # still being written
            if rec.get("kind") == "train" and rec["step"] >= 5:
                return True
        return False

    log2 = tmp_path / "b2.log"
    p = start_child(args, child_env(cache, PAUSE_PER_STEP=0.4), log2)
    try:
        wait_for(b2_reached_step_5, 240, "step 5 of the resumed run", p, log2)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
    out = log2.read_text()
    assert rc == 143, out[-3000:]
    m = re.search(r"saved a checkpoint of step (\d+)", out)
    assert m, out[-3000:]
    stopped = int(m.group(1))
    assert 5 <= stopped < STEPS
    ck = TrainCheckpointer(ckdir)
    assert ck.latest_step() == stopped                    # a complete checkpoint of the current step
    assert (ckdir / str(stopped) / "state").is_dir() and (ckdir / str(stopped) / "data").is_dir()
    assert not any("tmp" in x.name for x in ckdir.iterdir())   # the killed save's leftovers were removed

    # C: resume to the end.
    rc = run_child(args, child_env(cache), tmp_path / "c.log")
    assert rc == 0, (tmp_path / "c.log").read_text()[-3000:]
    got = losses_of(run)
    assert sorted(got) == sorted(ref)
    diff = {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
    assert not diff, f"losses differ after resume (step: (uninterrupted, resumed)): {diff}"
