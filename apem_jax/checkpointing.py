"""Checkpoints: the only module that imports Orbax.

A workdir's checkpoints live in one Orbax ``CheckpointManager`` directory, ``checkpoints/``, one
subdirectory per step. Orbax's own preservation policy decides what is kept: the newest
``keep_latest`` checkpoints and the one with the best validation selection score (its metric,
stored by Orbax beside each evaluated checkpoint). Checkpoints saved between evaluations carry no
metric and are kept only while they are among the newest. There is one manager, so there is no
moment at which a "best" and a "latest" copy disagree.

Each checkpoint holds the train state (``state``) and a JSON ``meta`` item (step, epoch, data
position, metrics, early-stopping bookkeeping, the config and the schema). Saves are
asynchronous (the arrays are copied to the host, then written by a background thread while
training goes on) and atomic: Orbax writes into a temporary directory and renames it when
complete, so an interrupted save never leaves a checkpoint that restores half-written.

Orbax does not notice bytes changed inside a data file when its compression still decodes. So
``meta`` also holds a checksum of every leaf of the state (two sums of its 32-bit words modulo
2**32, one of them position-weighted: exact integer arithmetic, so the same in any reduction
order and on any sharding), and :meth:`Checkpoints.restore` recomputes them: a checkpoint whose
files were changed raises :class:`CorruptCheckpointError` naming its directory, as does one whose
files Orbax cannot read. One holding another model's parameters (an earlier version's model)
raises :class:`OtherModelError` naming them, before any array is read.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store

LATEST = "latest"
BEST = "best"
KINDS = (BEST, LATEST)


class CorruptCheckpointError(ValueError):
  """A checkpoint's files cannot be read, or do not hold what was saved."""


class OtherModelError(ValueError):
  """A checkpoint holds the parameters of another model than the one to restore it into (one
  an earlier version built otherwise): not damage, and no other checkpoint of the run differs."""


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


def _path_name(path: tuple) -> str:
  """``'params/tower_0/kernel'``: a leaf's path, the same for a dataclass field and a dict key."""
  return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _leaf_paths(tree: Any) -> set[str]:
  """The :func:`_path_name` of every leaf (a flax ``Partitioned`` box: ``<path>/value``, as its
  checkpoint metadata has it)."""
  return {_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_checksums(state: Any) -> dict[str, list[int]]:
  """Per leaf of ``state``, by its path: ``[sum, position-weighted sum]``."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  sums = jax.device_get(_checksums([x for _, x in flat])) if flat else []
  return {_path_name(p): [int(a), int(b)] for (p, _), (a, b) in zip(flat, sums)}


def _read(manager: ocp.CheckpointManager, step: int, **items) -> dict:
  """``manager.restore`` of ``step``; any failure to read raises :class:`CorruptCheckpointError`
  naming the checkpoint directory (Orbax and TensorStore raise many types for unreadable files)."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:
    raise CorruptCheckpointError(
        f"checkpoint {os.path.join(os.fspath(manager.directory), str(step))} cannot be read: "
        f"{type(e).__name__}: {str(e)[:300]}") from e


class _ExpectedWarnings(logging.Filter):
  """Orbax warns about what this module does by design: checkpoints between evaluations have no
  metric, and evaluation and export open the checkpoints read-only."""

  EXPECTED = ("did not provide metrics", "read_only=True, setting", "directory is read only")

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in self.EXPECTED)


logging.getLogger("absl").addFilter(_ExpectedWarnings())


def _drop_closed_loop_callbacks(previous):
  """An ``sys.unraisablehook`` that drops the errors TensorStore's late callbacks raise into the
  closed event loop of a restore that failed early (one per pending read, each a traceback on
  stderr after the error that matters was already reported); anything else goes to ``previous``."""
  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)
  return hook


sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _rank(metrics: dict) -> tuple[float, int]:
  """Orders evaluated checkpoints: higher score first, then the earlier step (the trainer's
  rule: a checkpoint is the best only if it beats every earlier score strictly). A score that is
  not a number ranks below every other (NaN compares false with everything, so sorting on it
  put it anywhere, the best included, and deleted the true best)."""
  score = metrics["score"]
  return (score if math.isfinite(score) else -math.inf), -metrics["step"]


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler, without Orbax's replica-parallel saving (each replica of a
  replicated array copies a slice) for one process on CPU devices. They share the host's memory:
  slicing each of hundreds of small replicated leaves into one piece a device (a compiled slice
  per shape, eight copies a leaf) made a save of a test model's state on 8 simulated devices
  take 0.9 s, against 0.2 s from one replica. Accelerators, and several
  processes (each writes its part of a replicated array), keep Orbax's default."""
  array_handler = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=jax.default_backend() != "cpu" or jax.process_count() > 1,
      array_metadata_store=array_metadata_store.Store())  # as Orbax's default handler's
  registry = ocp.type_handlers.create_type_handler_registry(*[
      (kind, array_handler if kind is jax.Array else ocp.type_handlers.get_type_handler(kind))
      for kind in ocp.type_handlers.supported_types()])
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _manager(directory: str, keep_latest: int, async_save: bool,
             read_only: bool) -> ocp.CheckpointManager:
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep_latest),
      checkpoint_managers.BestN(get_metric_fn=_rank, reverse=False, n=1,
                                keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=_rank, best_mode="max", create=not read_only,
      read_only=read_only, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers={"state": _state_handler(),
                                              "meta": ocp.JsonCheckpointHandler()})


def _pytree_restore(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore arguments that place every leaf as ``abstract`` says (shape, dtype, sharding)."""
  return ocp.args.PyTreeRestore(item=abstract, partial_restore=partial,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def _unreadable_metrics(directory: str) -> str | None:
  """The first ``<step>/metrics/metrics`` file under ``directory`` that is not valid JSON (None
  where the directory cannot be listed here, e.g. ``gs://``)."""
  try:
    steps = sorted(os.listdir(directory))
  except OSError:
    return None
  for step in steps:
    path = os.path.join(directory, step, "metrics", "metrics")
    try:
      with open(path) as f:
        json.load(f)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
      continue
    except ValueError:
      return path
  return None


class Checkpoints:
  """The checkpoints of one workdir (``<workdir>/checkpoints``).

  ``kind`` arguments name a checkpoint without its step: ``'latest'`` (the newest) or ``'best'``
  (the best validation score among evaluated checkpoints). ``read_only=True`` creates and deletes
  nothing (evaluation and export).
  """

  def __init__(self, workdir: str, keep_latest: int = 2, async_save: bool = False,
               read_only: bool = False):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f"workdir {workdir} is a file; expected a directory (a new one, or one a "
                       f"run made)")
    self.directory = os.path.join(workdir, "checkpoints")
    legacy = [k for k in KINDS if os.path.isdir(os.path.join(self.directory, k))]
    if legacy:
      raise ValueError(f"{self.directory} holds checkpoints in the layout of an earlier version "
                       f"({'/, '.join(legacy)}/ subdirectories); evaluate or export them with "
                       f"that version, or train again in a new --workdir")
    self._read_only = read_only
    try:
      self._manager = (None if read_only and not os.path.isdir(self.directory) else
                       _manager(self.directory, keep_latest, async_save, read_only))
    except json.JSONDecodeError as e:  # Orbax reads every step's metrics file as it opens
      raise CorruptCheckpointError(
          f"{_unreadable_metrics(self.directory) or self.directory}: not valid JSON ({e}); "
          f"delete that checkpoint's step directory to fall back to the one before it") from e

  def steps(self) -> list[int]:
    """The steps of every complete checkpoint, oldest first."""
    return sorted(self._manager.all_steps()) if self._manager else []

  def step_of(self, kind: str = LATEST, step: int | None = None) -> int | None:
    """The step ``kind`` (or the given ``step``) names; None where there is no such checkpoint.

    Raises:
      ValueError: ``kind`` is neither ``'best'`` nor ``'latest'``.
      FileNotFoundError: ``step`` is given and has no checkpoint.
    """
    if kind not in KINDS:
      raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    steps = self.steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint at step {step} under {self.directory}; "
                                f"available steps: {steps}")
      return step
    if not steps:
      return None
    if kind == LATEST:
      return steps[-1]
    best = self._manager.best_step()
    return best if self._manager.metrics(best) is not None else None

  def _resolve(self, kind: str, step: int | None) -> int:
    resolved = self.step_of(kind, step)
    if resolved is None:
      what = "evaluated checkpoint (one saved with a validation score)" if kind == BEST else \
          "checkpoint"
      raise FileNotFoundError(f"no {what} under {self.directory}")
    return resolved

  def save(self, step: int, state: Any, meta: dict, score: float | None = None) -> None:
    """Starts saving ``state`` and ``meta`` as checkpoint ``step`` (returns once the arrays are
    copied off the devices; :meth:`wait` waits for the files). ``score``: the validation
    selection score of an evaluated checkpoint, which the ``best`` checkpoint is chosen by."""
    if step in self._manager.all_steps():  # a resume from an older checkpoint redoes its steps
      self._manager.delete(step)
    # A copy all the way down: Orbax writes the JSON later, in the background, while the caller
    # goes on changing its meta (the trainer appends to ``history``).
    meta = copy.deepcopy(dict(meta, checksums=state_checksums(state)))
    # A score that is not finite is no score: the checkpoint is never the best.
    metrics = (None if score is None or not math.isfinite(score) else
               {"score": float(score), "step": int(step)})
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                     meta=ocp.args.JsonSave(meta)),
                       metrics=metrics, force=True)

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    if self._manager:
      self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """True at the step every process agreed to save at after a preemption notice (several
    processes under ``jax.distributed``; always False for one process, without asking JAX's
    preemption service, which only several processes start: the loop calls this every step)."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def _check_params(self, step: int, abstract_params: Any) -> None:
    """Raises :class:`OtherModelError` unless checkpoint ``step`` holds the parameters
    ``abstract_params`` names (read from its metadata, no arrays)."""
    try:
      saved = self._manager.item_metadata(step)["state"].tree["params"]
    except Exception:  # pylint: disable=broad-except  (unreadable, or no params: the restore
      return           # says what is wrong)
    held, wanted = _leaf_paths(saved), _leaf_paths(abstract_params)
    if held != wanted:
      extra, lacking = sorted(held - wanted), sorted(wanted - held)
      raise OtherModelError(
          f"checkpoint {self._path(step)} holds the parameters of another model than this "
          f"version builds from its config (" + "; ".join(
              [f"not built now: {extra[:3]}"] * bool(extra) +
              [f"not in the checkpoint: {lacking[:3]}"] * bool(lacking)) +
          "): it was trained by an earlier version of the model; evaluate or export it with that "
          "version, or train again in a new --workdir")

  def restore(self, abstract_state: Any, kind: str = LATEST,
              step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)``; ``abstract_state`` gives shapes, dtypes and shardings."""
    step = self._resolve(kind, step)
    params = (abstract_state.get("params") if isinstance(abstract_state, Mapping) else
              getattr(abstract_state, "params", None))
    if params is not None:
      self._check_params(step, params)
    restored = _read(self._manager, step, state=_pytree_restore(abstract_state),
                     meta=ocp.args.JsonRestore())
    state, meta = restored["state"], restored["meta"]
    _verify(self._path(step), state, meta.get("checksums"))
    return state, meta

  def restore_params(self, abstract_params: Any, kind: str = LATEST,
                     step: int | None = None) -> tuple[Any, dict]:
    """Restores only ``(params, meta)`` (the optimizer state is not read): ``abstract_params``
    gives shapes, dtypes and shardings, which may differ from training's (e.g. one device)."""
    step = self._resolve(kind, step)
    self._check_params(step, abstract_params)
    restored = _read(self._manager, step, meta=ocp.args.JsonRestore(),
                     state=_pytree_restore({"params": abstract_params}, partial=True))
    params, meta = restored["state"]["params"], restored["meta"]
    _verify(self._path(step), {"params": params}, meta.get("checksums"))
    return params, meta

  def restore_meta(self, kind: str = LATEST, step: int | None = None) -> dict:
    """Only the JSON ``meta`` of a checkpoint (no arrays read)."""
    step = self._resolve(kind, step)
    return _read(self._manager, step, meta=ocp.args.JsonRestore())["meta"]

  def _path(self, step: int) -> str:
    return os.path.join(os.path.abspath(self.directory), str(step))

  def close(self) -> None:
    if self._manager:
      self._manager.close()


def _verify(path: str, state: Any, saved: dict) -> None:
  """Raises :class:`CorruptCheckpointError` unless every leaf of ``state`` (the whole saved state
  or a part of it) has the checksum saved under its path."""
  if not isinstance(saved, dict):
    raise CorruptCheckpointError(f"checkpoint {path}: its meta holds no checksums of the state")
  got = state_checksums(state)
  changed = [name for name, sums in got.items() if saved.get(name) != sums]
  if changed:
    raise CorruptCheckpointError(f"checkpoint {path} does not hold what was saved: the "
                                 f"checksums of {changed[:3]} differ")
