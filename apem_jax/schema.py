"""The feature and task schema shared by data, models, losses and export.

Pure Python (no TensorFlow, no JAX) so that every package can import it.

A batch, as the models and the trainer see it, is a dict of arrays:

* ``categorical``: int32 ``[B, Fc]``; field ``i`` holds ids in ``[0, vocab_size_i]``,
  where ``vocab_size_i`` itself is the out-of-vocabulary id (tables have ``vocab_size + 1`` rows).
* ``numeric``: float32 ``[B, Fn]``, already normalised.
* ``labels``: float32 ``[B, T]``; a binary task holds 0/1, a regression task a real value.
* ``label_mask``: float32 ``[B, T]``; 1 where the label is present.
* ``weight``: float32 ``[B]``; 1 for real examples, 0 for padding rows (the last eval batch is
  padded to the full batch size so the compiled step never sees a new shape).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

TaskKind = Literal["binary", "regression"]
TASK_KINDS = ("binary", "regression")


@dataclasses.dataclass(frozen=True)
class CategoricalField:
  """A categorical input field; its table has ``vocab_size + 1`` rows (the last is OOV)."""

  name: str
  vocab_size: int

  def __post_init__(self):
    if self.vocab_size < 1:
      raise ValueError(f"field {self.name!r}: vocab_size must be >= 1, got {self.vocab_size}")

  @property
  def oov_id(self) -> int:
    return self.vocab_size

  @property
  def num_rows(self) -> int:
    return self.vocab_size + 1


@dataclasses.dataclass(frozen=True)
class NumericField:
  """A real-valued input field (normalised before it reaches the model).

  ``boundaries``: optional increasing cut points on the normalised value; the model then also
  embeds the bucket ``#{b : x > b}`` (``len(boundaries) + 1`` buckets).
  """

  name: str
  boundaries: tuple[float, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))
    if any(b >= c for b, c in zip(self.boundaries, self.boundaries[1:])):
      raise ValueError(f"field {self.name!r}: boundaries must be strictly increasing")


@dataclasses.dataclass(frozen=True)
class Task:
  """One prediction target.

  ``depends_on`` names the earlier step of a conversion funnel this task follows
  (impression -> click -> conversion): such a task can only be positive where that one is.
  """

  name: str
  kind: TaskKind = "binary"
  depends_on: str | None = None

  def __post_init__(self):
    if self.kind not in TASK_KINDS:
      raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Schema:
  """Fields and tasks of a dataset, in the column order of the batch arrays."""

  categorical: tuple[CategoricalField, ...]
  numeric: tuple[NumericField, ...]
  tasks: tuple[Task, ...]

  def __post_init__(self):
    names = [f.name for f in self.categorical] + [f.name for f in self.numeric]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
      raise ValueError(f"schema: duplicate field names {duplicates}")
    if not self.tasks:
      raise ValueError("schema: at least one task is required")
    task_names = [t.name for t in self.tasks]
    repeated = sorted({n for n in task_names if task_names.count(n) > 1})
    if repeated:
      raise ValueError(f"schema: duplicate task names {repeated}")
    for task in self.tasks:
      if task.depends_on is not None and task.depends_on not in task_names[:task_names.index(task.name)]:
        raise ValueError(
            f"task {task.name!r}: depends_on={task.depends_on!r} must name an earlier task "
            f"of {task_names}")
      if task.depends_on is not None and (
          task.kind != "binary" or self.tasks[task_names.index(task.depends_on)].kind != "binary"):
        raise ValueError(f"task {task.name!r}: a funnel step and the step it depends on "
                         f"({task.depends_on!r}) must both be binary tasks")

  @property
  def num_fields(self) -> int:
    return len(self.categorical) + len(self.numeric)

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def task_names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.tasks)

  @property
  def parents(self) -> tuple[int, ...]:
    """Per task, the index of the task it depends on (``depends_on``), or -1 for none."""
    names = self.task_names
    return tuple(-1 if t.depends_on is None else names.index(t.depends_on) for t in self.tasks)

  @property
  def has_funnel(self) -> bool:
    """Whether some task depends on another (a conversion funnel)."""
    return any(t.depends_on is not None for t in self.tasks)

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    return tuple(f.vocab_size for f in self.categorical)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Schema":
    return cls(
        categorical=tuple(CategoricalField(**f) for f in d["categorical"]),
        numeric=tuple(NumericField(**f) for f in d["numeric"]),
        tasks=tuple(Task(**t) for t in d["tasks"]),
    )


def make_schema(vocab_sizes: Sequence[int], num_numeric: int, task_names: Sequence[str],
                kind: TaskKind = "binary") -> Schema:
  """A schema with generated field names, for tests and synthetic data."""
  return Schema(
      categorical=tuple(CategoricalField(f"c{i}", v) for i, v in enumerate(vocab_sizes)),
      numeric=tuple(NumericField(f"n{i}") for i in range(num_numeric)),
      tasks=tuple(Task(n, kind) for n in task_names),
  )
