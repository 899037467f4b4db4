"""Checkpoints: the only module that imports Orbax.

A workdir holds two Orbax ``CheckpointManager`` directories:

* ``checkpoints/latest``: saved every evaluation (the last ``keep`` kept); a restarted run resumes
  from here.
* ``checkpoints/best``: the checkpoint with the best validation selection score (one kept).

Each checkpoint holds the train state (``state``) and a JSON ``meta`` item (step, epoch, metrics,
early-stopping bookkeeping, the config and the schema). Orbax writes to a temporary directory and
renames it when complete, so an interrupted save never leaves a checkpoint that restores.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


def _manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


class Checkpoints:
  """The latest and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep_latest: int = 1):
    root = os.path.join(workdir, "checkpoints")
    self._managers = {LATEST: _manager(os.path.join(root, LATEST), keep_latest),
                      BEST: _manager(os.path.join(root, BEST), 1)}

  def save(self, kind: str, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` and ``meta`` as checkpoint ``step`` of ``kind`` (``latest`` or ``best``)."""
    manager = self._managers[kind]
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

  def latest_step(self, kind: str) -> int | None:
    return self._managers[kind].latest_step()

  def restore(self, kind: str, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)``; ``abstract_state`` gives shapes, dtypes and shardings."""
    manager = self._managers[kind]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no {kind} checkpoint under {manager.directory}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no {kind} checkpoint at step {step} under {manager.directory}; "
                              f"available steps: {sorted(manager.all_steps())}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_meta(self, kind: str, step: int | None = None) -> dict:
    """Only the JSON ``meta`` of a checkpoint (no arrays read)."""
    manager = self._managers[kind]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no {kind} checkpoint under {manager.directory}")
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()

