"""Feature preprocessing fitted on the training split: vocabularies and numeric normalisation.

Plain data (lists of strings and floats, JSON round-trip) so that the export step can rebuild
the same lookups inside a SavedModel. No TensorFlow or JAX here.

* Categorical field: vocabulary = sorted distinct training values seen at least ``min_count``
  times; value -> its index in the vocabulary, anything else (unseen, or rarer than
  ``min_count``) -> the OOV id ``len(vocabulary)`` (= ``CategoricalField.vocab_size``).
* Numeric field: ``z = (t(x) - mean) / std`` with ``t`` = identity (``'none'``) or
  ``sign(x) * log1p(|x|)`` (``'log1p'``), mean/std (population, ddof=0) of ``t(x)`` over the
  training rows; a constant field gets ``std = 1``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import numpy as np

NUMERIC_TRANSFORMS = ("none", "log1p")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Everything needed to turn raw columns into the model's ``categorical``/``numeric`` arrays.

  Attributes:
    categorical_fields: names, in the column order of the ``categorical`` array.
    numeric_fields: names, in the column order of the ``numeric`` array.
    vocabularies: per categorical field, its sorted vocabulary (OOV id = its length).
    means, stds: per numeric field, statistics of the transformed training values.
    numeric_transform: 'none' | 'log1p'.
    min_count: the vocabulary threshold it was fitted with (informational).
    bucket_boundaries: per numeric field, increasing cut points on the normalised value at
      quantiles of the field's distinct training values (empty when bucketing is off); the
      models embed each value's bucket besides the value itself.
  """

  categorical_fields: tuple[str, ...]
  numeric_fields: tuple[str, ...]
  vocabularies: tuple[tuple[str, ...], ...]
  means: tuple[float, ...]
  stds: tuple[float, ...]
  numeric_transform: str = "log1p"
  min_count: int = 1
  bucket_boundaries: tuple[tuple[float, ...], ...] = ()

  def __post_init__(self):
    if len(self.vocabularies) != len(self.categorical_fields):
      raise ValueError("Preprocessing: one vocabulary per categorical field is required")
    if not len(self.means) == len(self.stds) == len(self.numeric_fields):
      raise ValueError("Preprocessing: one mean and one std per numeric field are required")
    if self.numeric_transform not in NUMERIC_TRANSFORMS:
      raise ValueError(f"numeric_transform must be one of {NUMERIC_TRANSFORMS}, "
                       f"got {self.numeric_transform!r}")

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    return tuple(len(v) for v in self.vocabularies)

  def to_dict(self) -> dict:
    return {
        "categorical_fields": list(self.categorical_fields),
        "numeric_fields": list(self.numeric_fields),
        "vocabularies": [list(v) for v in self.vocabularies],
        "means": [float(m) for m in self.means],
        "stds": [float(s) for s in self.stds],
        "numeric_transform": self.numeric_transform,
        "min_count": int(self.min_count),
        "bucket_boundaries": [list(b) for b in self.bucket_boundaries],
    }

  @classmethod
  def from_dict(cls, d: Mapping) -> "Preprocessing":
    return cls(
        categorical_fields=tuple(d["categorical_fields"]),
        numeric_fields=tuple(d["numeric_fields"]),
        vocabularies=tuple(tuple(v) for v in d["vocabularies"]),
        means=tuple(float(m) for m in d["means"]),
        stds=tuple(float(s) for s in d["stds"]),
        numeric_transform=d.get("numeric_transform", "log1p"),
        min_count=int(d.get("min_count", 1)),
        bucket_boundaries=tuple(tuple(float(x) for x in b) for b in d.get("bucket_boundaries", ())),
    )

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> "Preprocessing":
    return cls.from_dict(json.loads(text))


def as_str_array(values: np.ndarray | Sequence) -> np.ndarray:
  """A fixed-width ``str`` array from str/bytes values (bytes decoded as UTF-8)."""
  values = np.asarray(values)
  if values.dtype.kind == "U":
    return values
  if values.dtype.kind == "S":
    return np.char.decode(values, "utf-8")
  if values.dtype == object and values.size and isinstance(values.flat[0], bytes):
    return np.char.decode(values.astype(np.bytes_), "utf-8")
  return values.astype(str)


# The characters stripped from both ends of a categorical value: ASCII whitespace, exactly what
# ``tf.strings.strip`` removes in the serving graph. (Python's ``str.strip()`` would also remove
# Unicode spaces and the separators \x1c-\x1f, which the graph keeps: a value holding them would
# be known in training and OOV when served.)
ASCII_WHITESPACE = " \t\n\v\f\r"


def categorical_values(values: np.ndarray | Sequence) -> np.ndarray:
  """The strings a categorical value is looked up as: str, surrounding ASCII whitespace removed.
  The serving graph applies the same rule (``tf.strings.strip`` in
  ``serving.RawFeatureEncoder``), so a raw value served with its original spacing finds the
  vocabulary entry training made."""
  return np.char.strip(as_str_array(values), ASCII_WHITESPACE)


def transform_numeric(values: np.ndarray, transform: str) -> np.ndarray:
  """float64 ``t(x)``: identity for 'none', ``sign(x) * log1p(|x|)`` for 'log1p'."""
  x = np.asarray(values, dtype=np.float64)
  if transform == "none":
    return x
  if transform == "log1p":
    return np.sign(x) * np.log1p(np.abs(x))
  raise ValueError(f"numeric_transform must be one of {NUMERIC_TRANSFORMS}, got {transform!r}")


def fit_preprocessing(train_columns: Mapping[str, np.ndarray],
                      categorical_fields: Sequence[str], numeric_fields: Sequence[str], *,
                      numeric_transform: str = "log1p", min_count: int = 1,
                      numeric_buckets: int = 0) -> Preprocessing:
  """Fits vocabularies and numeric statistics on the TRAINING columns only.

  Args:
    train_columns: ``{name: array[N]}`` raw training values (str/bytes or numbers).
    categorical_fields, numeric_fields: the feature names, in batch column order.
    numeric_transform: 'none' | 'log1p'.
    min_count: values seen fewer times in training map to OOV (>= 1).
    numeric_buckets: at most this many buckets per numeric field (0 = no bucketing).

  Raises:
    ValueError: bad ``min_count``/``numeric_transform``, or a field left with an empty
      vocabulary.
  """
  if int(min_count) < 1:
    raise ValueError(f"min_count must be >= 1, got {min_count}")
  vocabularies = []
  for name in categorical_fields:
    values, counts = np.unique(categorical_values(train_columns[name]), return_counts=True)
    vocab = values[counts >= min_count]
    if vocab.size == 0:
      raise ValueError(f"field {name!r}: no value occurs >= min_count={min_count} times "
                       f"in the training split")
    vocabularies.append(tuple(str(v) for v in vocab))
  if int(numeric_buckets) < 0:
    raise ValueError(f"numeric_buckets must be >= 0, got {numeric_buckets}")
  means, stds, boundaries = [], [], []
  for name in numeric_fields:
    t = transform_numeric(train_columns[name], numeric_transform)
    mean, std = float(t.mean()), float(t.std())
    std = std if std > 1e-12 else 1.0
    means.append(mean)
    stds.append(std)
    if numeric_buckets > 1:
      boundaries.append(quantile_boundaries(((t - mean) / std).astype(np.float32), numeric_buckets))
  return Preprocessing(tuple(categorical_fields), tuple(numeric_fields), tuple(vocabularies),
                       tuple(means), tuple(stds), numeric_transform, int(min_count),
                       tuple(boundaries))


def quantile_boundaries(values: np.ndarray, num_buckets: int) -> tuple[float, ...]:
  """At most ``num_buckets - 1`` cut points at quantiles of the DISTINCT values of ``values``.

  Distinct values, not rows: a field that is 0 for most rows (capital gains) still gets cut
  points across the range of its non-zero values, and the smallest value (usually the mode of
  such a field) gets a bucket of its own. Each cut point is the midpoint between two adjacent
  distinct values, so no training value lies on a boundary.
  """
  distinct = np.unique(values.astype(np.float64))
  if len(distinct) < 2:
    return ()
  positions = np.linspace(0, len(distinct) - 1, num_buckets)[:-1]
  lower = np.unique(np.floor(positions).astype(np.int64))
  lower = lower[lower < len(distinct) - 1]
  return tuple(float(x) for x in np.unique((distinct[lower] + distinct[lower + 1]) / 2.0))


def encode_categorical(values: np.ndarray, vocabulary: Sequence[str]) -> np.ndarray:
  """int32 ``[N]`` ids: the index in the sorted ``vocabulary``, or ``len(vocabulary)`` (OOV)."""
  values = categorical_values(values)
  vocab = np.asarray(vocabulary, dtype=str)
  idx = np.searchsorted(vocab, values)
  hit = vocab[np.minimum(idx, len(vocab) - 1)] == values
  return np.where(hit, idx, len(vocab)).astype(np.int32)


def encode(raw_columns: Mapping[str, np.ndarray], preprocessing: Preprocessing
           ) -> dict[str, np.ndarray]:
  """Raw columns -> ``{'categorical': int32 [N, Fc], 'numeric': float32 [N, Fn]}``."""
  lengths = {len(raw_columns[f]) for f in
             preprocessing.categorical_fields + preprocessing.numeric_fields}
  if len(lengths) > 1:
    raise ValueError(f"encode: columns have different lengths {sorted(lengths)}")
  n = lengths.pop() if lengths else 0
  categorical = np.zeros((n, len(preprocessing.categorical_fields)), dtype=np.int32)
  for j, (name, vocab) in enumerate(zip(preprocessing.categorical_fields,
                                        preprocessing.vocabularies)):
    categorical[:, j] = encode_categorical(raw_columns[name], vocab)
  numeric = np.zeros((n, len(preprocessing.numeric_fields)), dtype=np.float32)
  for j, name in enumerate(preprocessing.numeric_fields):
    t = transform_numeric(raw_columns[name], preprocessing.numeric_transform)
    numeric[:, j] = (t - preprocessing.means[j]) / preprocessing.stds[j]
  return {"categorical": categorical, "numeric": numeric}
