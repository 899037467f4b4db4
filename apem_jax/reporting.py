"""What a run leaves beside its checkpoints: TensorBoard event files, JSON and array files, tables.

Only process 0 writes. Every path goes through ``etils.epath`` (the filesystem layer Orbax uses
for the checkpoints), so a workdir may be local or on ``gs://`` and other filesystems
``tf.io.gfile`` or fsspec reach; TensorBoard files go through tensorboardX, which writes to
``gs://`` with ``google-cloud-storage`` installed.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Mapping

from etils import epath
import jax
import numpy as np


def _is_writer() -> bool:
  return jax.process_index() == 0


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file renamed over it, so readers never see
  half a file (on object stores, where a write is atomic anyway, the rename is a copy)."""
  if not _is_writer():
    return
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path``, atomically (:func:`write_bytes_atomic`)."""
  text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
  write_bytes_atomic(path, text.encode())


def write_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes ``arrays`` as an ``.npz`` file to ``path``, atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes_atomic(path, buffer.getvalue())


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  with epath.Path(path).open("rb") as f:
    with np.load(io.BytesIO(f.read())) as arrays:
      return dict(arrays)


def flatten_metrics(metrics: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, float]:
  """``{task: {name: v}}`` -> ``{"prefix/task/name": v}``."""
  return {f"{prefix}/{task}/{name}": float(v) for task, d in metrics.items() for name, v in d.items()}


class ScalarWriter:
  """TensorBoard scalars under ``<workdir>/tensorboard`` (no-op on processes other than 0). A value
  that is not finite (an AUC undefined where a batch of validation rows holds one class) is left
  out: TensorBoard draws no point for it, and tensorboardX warned at every one."""

  def __init__(self, workdir: str):
    self._writer = None
    if _is_writer():
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      if math.isfinite(value):
        self._writer.add_scalar(name, value, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def evaluation_name(split: str, checkpoint: str = "best", step: int | None = None) -> str:
  """The name an evaluation's files take under a workdir (``eval/<name>.json``,
  ``explain/<name>/``): the split for the best checkpoint, which the quality tables read;
  ``<split>_latest`` or ``<split>_step<N>`` for another."""
  if step is not None:
    return f"{split}_step{step}"
  return split if checkpoint == "best" else f"{split}_{checkpoint}"


def format_table(metrics: Mapping[str, Mapping[str, float]], title: str = "") -> str:
  """A plain-text table, one row per task, one column per metric (``-`` where a task has no such
  metric, such as a regression task's AUC; ``nan`` where the metric is undefined)."""
  columns = []
  for d in metrics.values():
    columns += [c for c in d if c not in columns]
  def cell(v):
    if v is None:
      return "-"
    if isinstance(v, int):
      return str(v)
    return "nan" if math.isnan(v) else f"{v:.4f}"
  rows = [["task"] + columns] + [[task] + [cell(d.get(c)) for c in columns]
                                 for task, d in metrics.items()]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(([title] if title else []) + lines)
