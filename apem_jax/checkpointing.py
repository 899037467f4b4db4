"""Checkpoints: the only module that imports Orbax.

A workdir holds two Orbax ``CheckpointManager`` directories:

* ``checkpoints/latest``: saved every evaluation (the last ``keep`` kept); a restarted run resumes
  from here.
* ``checkpoints/best``: the checkpoint with the best validation selection score (one kept).

Each checkpoint holds the train state (``state``) and a JSON ``meta`` item (step, epoch, metrics,
early-stopping bookkeeping, the config and the schema). Orbax writes to a temporary directory and
renames it when complete, so an interrupted save never leaves a checkpoint that restores.

Orbax does not notice bytes changed inside a data file when its compression still decodes. So
``meta`` also holds a checksum of every leaf of the state (two sums of its 32-bit words modulo
2**32, one of them position-weighted: exact integer arithmetic, so the same in any reduction
order and on any sharding), and :meth:`Checkpoints.restore` recomputes them: a checkpoint whose
files were changed raises :class:`CorruptCheckpointError` naming its directory, as does one whose
files Orbax cannot read.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


class CorruptCheckpointError(ValueError):
  """A checkpoint's files cannot be read, or do not hold what was saved."""


def _words(x: jax.Array) -> jax.Array:
  """The leaf's bits as uint32 words [N] (PRNG keys: their key data)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype.itemsize != 4:
    x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()


@jax.jit
def _checksums(state: Any) -> jax.Array:
  """uint32 [leaves, 2]: per leaf, the sum of its words and their position-weighted sum."""
  def one(x):
    words = _words(x)
    weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                      jnp.sum(words * weights, dtype=jnp.uint32)])
  return jnp.stack([one(x) for x in jax.tree.leaves(state)])


def state_checksums(state: Any) -> list[list[int]]:
  """Per leaf of ``state`` (in ``jax.tree.leaves`` order), ``[sum, position-weighted sum]``."""
  return [[int(a), int(b)] for a, b in jax.device_get(_checksums(state))]


def _read(manager: ocp.CheckpointManager, step: int, **items) -> dict:
  """``manager.restore`` of ``step``; any failure to read raises :class:`CorruptCheckpointError`
  naming the checkpoint directory (Orbax and TensorStore raise many types for unreadable files)."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:
    raise CorruptCheckpointError(
        f"checkpoint {os.path.join(os.fspath(manager.directory), str(step))} cannot be read: "
        f"{type(e).__name__}: {str(e)[:300]}") from e


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
    if step in manager.all_steps():  # a run resumed from before a crash that came between the
      manager.delete(step)           # best and the latest save redoes the step: same state
    meta = dict(meta, checksums=state_checksums(state))
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
    restored = _read(manager, step, state=ocp.args.StandardRestore(abstract_state),
                     meta=ocp.args.JsonRestore())
    state, meta = restored["state"], restored["meta"]
    if "checksums" in meta:
      got = state_checksums(state)
      if got != meta["checksums"]:
        changed = [jax.tree_util.keystr(p) for (p, _), a, b in zip(
            jax.tree_util.tree_flatten_with_path(state)[0], got, meta["checksums"]) if a != b]
        raise CorruptCheckpointError(
            f"checkpoint {os.path.join(os.fspath(manager.directory), str(step))} does not hold "
            f"what was saved: the checksums of {changed[:3]} differ")
    return state, meta

  def restore_meta(self, kind: str, step: int | None = None) -> dict:
    """Only the JSON ``meta`` of a checkpoint (no arrays read)."""
    manager = self._managers[kind]
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no {kind} checkpoint under {manager.directory}")
    return _read(manager, step, meta=ocp.args.JsonRestore())["meta"]

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()

