"""What a run leaves for people to read: TensorBoard event files, ``metrics.json``, tables.

Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax


def _is_writer() -> bool:
  return jax.process_index() == 0


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` through a temporary file, so readers never see half."""
  if not _is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
    f.write("\n")
  os.replace(tmp, path)


def flatten_metrics(metrics: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, float]:
  """``{task: {name: v}}`` -> ``{"prefix/task/name": v}``."""
  return {f"{prefix}/{task}/{name}": float(v) for task, d in metrics.items() for name, v in d.items()}


class ScalarWriter:
  """TensorBoard scalars under ``<workdir>/tensorboard`` (no-op on processes other than 0)."""

  def __init__(self, workdir: str):
    self._writer = None
    if _is_writer():
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name, value, step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def format_table(metrics: Mapping[str, Mapping[str, float]], title: str = "") -> str:
  """A plain-text table, one row per task, one column per metric."""
  columns = []
  for d in metrics.values():
    columns += [c for c in d if c not in columns]
  def cell(v):
    if isinstance(v, int):
      return str(v)
    return "nan" if math.isnan(v) else f"{v:.4f}"
  rows = [["task"] + columns] + [[task] + [cell(d.get(c, float("nan"))) for c in columns]
                                 for task, d in metrics.items()]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(([title] if title else []) + lines)
