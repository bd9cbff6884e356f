"""Training checkpoints: one Orbax `CheckpointManager` step = train state + data iterator + metadata.

    OUTPUT_DIR/checkpoints/<step>/
        state/   params, optimizer state and step counter (sharded arrays, any mesh on restore)
        data/    grain iterator state, one JSON file per process
        meta/    {"step", "config" (the recipe), "model_config" (config.json dict), "time"}

Saves are asynchronous (arrays are copied off the devices, then written in the background while
training goes on) and atomic: Orbax writes into a temporary directory and renames it to `<step>`
only when every item of every process is written, so a save cut short by SIGKILL leaves no
directory that `latest_step()` would return (the leftover temporary directory is removed on the
next start). `keep` most recent checkpoints are kept.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    """Save / restore {state, data iterator, meta} at a step; resume from the latest complete one."""

    # How a step directory becomes visible atomically: Orbax's public `TemporaryPath` protocol (None:
    # Orbax's default, write into a temporary directory and rename). Fault-injection tests set a
    # subclass whose `finalize` stops, to kill a run in the middle of a save.
    temporary_path_class: type | None = None

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        extra = {} if self.temporary_path_class is None else {"temporary_path_class": self.temporary_path_class}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            # Leftovers of a save killed half-way are deleted when the next run starts.
            cleanup_tmp_directories=True, **extra)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, *, force: bool = True) -> bool:
        """Start saving `step` (returns at once when asynchronous). The data iterator's state is read
        now, so it matches the train state of this step."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave({**meta, "step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
        """Restore `step` onto the shardings of `abstract_state` (ShapeDtypeStructs with shardings) and
        put the iterator where it was. Returns (state, meta)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore())
        out = self.manager.restore(int(step), args=args)
        return out["state"], dict(out["meta"])

    def read_meta(self, step: int) -> dict:
        """The metadata saved with `step` (recipe, model config, time)."""
        out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def wait(self) -> None:
        """Block until the pending save is written (and committed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the pending save, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) with the given shardings."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
