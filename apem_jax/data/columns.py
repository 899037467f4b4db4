"""A dataset from columns held in Python: a researcher's own data, straight into an experiment.

``dataset_from_columns(splits, categorical=..., numeric=..., tasks=...)`` takes, per split, a
mapping of column name -> values (a dict of arrays or lists, or anything with ``to_pydict()``
such as a ``pyarrow.Table``, or with ``columns`` and ``__getitem__`` such as a pandas
``DataFrame``), fits the preprocessing on the training split only (vocabularies, numeric
statistics, optional quantile buckets), encodes every split and returns a validated
:class:`~apem_jax.data.pipeline.DatasetSplits` to pass as ``data=`` to
:func:`apem_jax.trainer.train_and_evaluate`, :class:`~apem_jax.trainer.Experiment` and
:func:`apem_jax.trainer.evaluate_checkpoint`.

Every column must be a feature, a task's label or listed in ``ignore``: a column left out by
mistake is an error, not silently dropped. A task's label column is named as the task; a binary
label is 0 or 1 (both present in training), and a missing one (NaN or None) is masked out of the
loss and the metrics. Numeric values whose training mean or variance overflows, or whose
standardised value overflows float32, are refused by name.
Funnel steps (``Task(..., depends_on=...)``) of the training split are checked for consistency
(a step positive where the step it depends on is not): an error naming the row, or, with
``inconsistent_funnel='drop'``, those rows dropped (validation and test are never filtered by
their labels).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from apem_jax import schema as schema_lib
from apem_jax.data import pipeline
from apem_jax.data import preprocessing as prep_lib


def _as_columns(table: Any, split: str) -> dict[str, np.ndarray]:
  if hasattr(table, "to_pydict"):
    table = table.to_pydict()
  elif hasattr(table, "columns") and not isinstance(table, Mapping):
    table = {name: table[name] for name in table.columns}
  if not isinstance(table, Mapping):
    raise TypeError(f"split {split!r}: expected a mapping of column name -> values, a "
                    f"pyarrow Table or a DataFrame, got {type(table).__name__}")
  columns = {str(k): np.asarray(v) for k, v in table.items()}
  for name, values in columns.items():
    if values.ndim != 1:
      raise ValueError(f"split {split!r}, column {name!r}: values of shape {values.shape}; "
                       f"expected one value per row (a 1-D column)")
  lengths = {k: len(v) for k, v in columns.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"split {split!r}: columns of different lengths {lengths}")
  return columns


def _labels(columns: Mapping[str, np.ndarray], tasks: Sequence[schema_lib.Task],
            split: str) -> tuple[np.ndarray, np.ndarray]:
  """labels, label_mask: float32 [N, T]; a missing value (None, NaN, '') is masked."""
  labels, mask = [], []
  for task in tasks:
    raw = columns[task.name]
    present = (np.array([v is not None and v != "" and v != b"" for v in raw], bool)
               if raw.dtype.kind in "OUS" else np.ones(len(raw), bool))
    try:
      values = (raw.astype(np.float64) if raw.dtype.kind in "biuf" else
                np.array([float(v) if p else np.nan for v, p in zip(raw, present)], np.float64))
    except (TypeError, ValueError):
      bad = next(v for v, p in zip(raw, present) if p and not _is_number(v))
      raise ValueError(f"split {split!r}, label column {task.name!r}: {_show(bad)} is not a number; "
                       f"expected 0/1 (binary) or a real value (regression)") from None
    present &= ~np.isnan(values)
    if task.kind == "binary" and np.any(present & (values != 0) & (values != 1)):
      row = int(np.argmax(present & (values != 0) & (values != 1)))
      raise ValueError(f"split {split!r}, row {row}, label column {task.name!r}: "
                       f"{_show(raw[row])}; expected 0 or 1 for a binary task (or missing)")
    labels.append(np.where(present, values, 0.0))
    mask.append(present)
  return (np.stack(labels, -1).astype(np.float32), np.stack(mask, -1).astype(np.float32))


def _check_both_classes(labels: np.ndarray, label_mask: np.ndarray,
                        tasks: Sequence[schema_lib.Task]) -> None:
  """A binary task needs positive and negative labels among the training rows kept (labels,
  label_mask: [N, T])."""
  for t, task in enumerate(tasks):
    present = label_mask[:, t] > 0
    positives, labelled = int(labels[present, t].sum()), int(present.sum())
    if task.kind == "binary" and positives in (0, labelled):
      raise ValueError(f"split 'train', label column {task.name!r}: no "
                       f"{'positive (1)' if positives == 0 else 'negative (0)'} label among its "
                       f"{labelled} labelled rows; a binary task needs both")


def _check_standardised(numeric: np.ndarray, columns: Mapping[str, np.ndarray],
                        prep: prep_lib.Preprocessing, split: str) -> None:
  """Refuses a value whose standardised form (numeric: float32 [N, Fn]) overflows float32."""
  for j, name in enumerate(prep.numeric_fields):
    if not np.isfinite(numeric[:, j]).all():
      row = int(np.argmax(~np.isfinite(numeric[:, j])))
      raise ValueError(f"split {split!r}, row {row}, numeric column {name!r}: "
                       f"{columns[name][row]} standardised (training mean {prep.means[j]}, std "
                       f"{prep.stds[j]}) overflows float32")


_NO_MISSING = ("is missing; a numeric feature given in Python takes no missing value (fill it, "
               "or prepare the data from a spec, whose \"missing\" policies do)")


def _show(v: Any) -> str:
  """``repr`` of a value as the user wrote it (numpy scalars as Python ones)."""
  return repr(v.item() if isinstance(v, np.generic) else v)


def _is_number(v: Any) -> bool:
  try:
    float(v)
    return True
  except (TypeError, ValueError):
    return False


def dataset_from_columns(splits: Mapping[str, Any], *, categorical: Sequence[str] = (),
                         numeric: Sequence[str] = (),
                         tasks: Sequence[schema_lib.Task | str],
                         ignore: Sequence[str] = (), numeric_transform: str = "none",
                         min_count: int = 1, numeric_buckets: int = 0,
                         inconsistent_funnel: str = "error") -> pipeline.DatasetSplits:
  """Encodes ``splits`` (``{'train': table, 'validation': table[, 'test': table]}``).

  Args:
    splits: per split, the columns (see the module docstring).
    categorical, numeric: the feature columns, in the order the model sees them.
    tasks: :class:`~apem_jax.schema.Task` (or a name, for a binary task) per label column.
    ignore: columns present in the tables that are neither features nor labels.
    numeric_transform: 'none' or 'log1p', before standardisation with training statistics.
    min_count: categorical values seen fewer times in training become the OOV id.
    numeric_buckets: > 1: also embed each numeric value's training-quantile bucket.
    inconsistent_funnel: 'error' or 'drop' (training split only).

  Raises:
    ValueError: naming the split, column (and row) that does not fit.
  """
  if not isinstance(splits, Mapping):
    raise TypeError(f"splits: expected a mapping of split name -> columns ({{'train': ..., "
                    f"'validation': ...}}), got {type(splits).__name__}")
  for argument, names in (("categorical", categorical), ("numeric", numeric), ("tasks", tasks),
                          ("ignore", ignore)):
    if isinstance(names, (str, bytes)):
      raise TypeError(f"{argument}={names!r}: expected a list of column names ([{names!r}])")
  tasks = tuple(schema_lib.Task(t) if isinstance(t, str) else t for t in tasks)
  columns = {split: _as_columns(table, split) for split, table in splits.items()}
  named = list(categorical) + list(numeric) + [t.name for t in tasks] + list(ignore)
  duplicates = sorted({n for n in named if named.count(n) > 1})
  if duplicates:
    raise ValueError(f"columns named more than once (features, tasks, ignore): {duplicates}")
  for split, cols in columns.items():
    missing = [n for n in named if n not in cols and n not in ignore]
    unused = sorted(set(cols) - set(named))
    if missing or unused:
      raise ValueError(f"split {split!r}: " + "; ".join(
          (([f"no column {missing} (named as a feature or task)"] if missing else []) +
           ([f"columns {unused} are neither features nor tasks: add them to categorical=, "
             f"numeric=, tasks= or ignore="] if unused else []))))
  if "train" not in columns:
    raise ValueError(f"splits {sorted(columns)}: a 'train' split is required (the preprocessing "
                     f"is fitted on it)")
  for split, cols in columns.items():
    for name in categorical:  # as strings once, here, so that an error can name the column
      try:
        cols[name] = prep_lib.as_str_array(cols[name])
      except ValueError as e:
        raise ValueError(f"split {split!r}, categorical column {name!r}: {e}") from None
    for name in numeric:
      values = cols[name]
      row = None if values.dtype.kind in "biuf" else next(
          (i for i, v in enumerate(values) if v is None or not _is_number(v)), None)
      if row is not None:
        raise ValueError(f"split {split!r}, row {row}, numeric column {name!r}: "
                         f"{_show(values[row])} " +
                         (_NO_MISSING if values[row] is None else "is not a number"))
      cols[name] = values.astype(np.float64)
      if not np.all(np.isfinite(cols[name])):
        row = int(np.argmax(~np.isfinite(cols[name])))
        raise ValueError(f"split {split!r}, row {row}, numeric column {name!r}: "
                         f"{values[row]} " + (_NO_MISSING if np.isnan(cols[name][row])
                                              else "is not a finite number"))
  prep = prep_lib.fit_preprocessing(columns["train"], categorical, numeric,
                                    numeric_transform=numeric_transform, min_count=min_count,
                                    numeric_buckets=numeric_buckets)
  schema = schema_lib.Schema(
      categorical=tuple(schema_lib.CategoricalField(n, v) for n, v in
                        zip(prep.categorical_fields, prep.vocab_sizes)),
      numeric=tuple(schema_lib.NumericField(n, b) for n, b in zip(
          prep.numeric_fields, prep.bucket_boundaries or ((),) * len(numeric))),
      tasks=tasks)
  arrays = {}
  for split, cols in columns.items():
    labels, label_mask = _labels(cols, tasks, split)
    with np.errstate(over="ignore"):  # (refused by name below)
      arrays[split] = dict(prep_lib.encode(cols, prep), labels=labels, label_mask=label_mask)
    _check_standardised(arrays[split]["numeric"], cols, prep, split)
  dropped = {}
  if schema.has_funnel:  # training rows only: evaluation never filters examples by their labels
    arrays["train"], dropped["train"] = pipeline.enforce_funnel_consistency(
        arrays["train"], schema, inconsistent_funnel, "split 'train'", "inconsistent_funnel")
  _check_both_classes(arrays["train"]["labels"], arrays["train"]["label_mask"], tasks)
  return pipeline.DatasetSplits(schema, prep, arrays, dropped)
