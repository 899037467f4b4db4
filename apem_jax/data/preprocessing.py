"""Feature preprocessing fitted on the training split: vocabularies, hashing, numeric normalisation.

Plain data (lists of strings and floats, JSON round-trip) so that the export step can rebuild
the same encoder inside a SavedModel. No TensorFlow or JAX at import time (hashed categorical
fields call TensorFlow's farmhash op, imported on first use, as preparation does).

* Categorical field, vocabulary (``num_buckets`` 0): vocabulary = sorted distinct training values
  seen at least ``min_count`` times; value -> its index in the vocabulary, anything else
  (unseen, or rarer than ``min_count``) -> the OOV id ``len(vocabulary)``
  (= ``CategoricalField.vocab_size``).
* Categorical field, hashed (``num_buckets`` > 0): value -> ``farmhash64(value) % num_buckets``
  (``tf.strings.to_hash_bucket_fast``); no vocabulary, no OOV.
  Either way a value is first stripped of surrounding ASCII whitespace; a missing value (None,
  NaN, one of ``missing_values``, or blank once stripped) is the empty string, or refused under
  the field's policy ``'error'``.
* Numeric field: ``z = (t(x) - mean) / std`` with ``t`` (per field) = identity (``'none'``) or
  ``sign(x) * log1p(|x|)`` (``'log1p'``), mean/std (population, ddof=0) of ``t(x)`` over the
  training rows; a constant field (``std <= 1e-12 * |mean|``) gets ``std = 1``. A missing value
  (NaN, or equal in float32 to one of the field's ``numeric_missing_values``) is handled by the
  field's policy: ``'error'`` (refused), ``'fill'`` (replaced by the fill value, in the column's
  units, before ``t``), ``'indicator'`` (``z = 0``, the training mean, and an extra categorical
  column ``<name>_missing`` with id 1 where missing, 0 where present).

The ``categorical`` array has one column per categorical field, plus one per indicator at the
position ``indicator_columns`` names (preparation appends them after the categorical fields, in
numeric-field order); the categorical fields fill the other columns in order.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import numpy as np

NUMERIC_TRANSFORMS = ("none", "log1p")
# ``numeric_transform`` when the numeric fields' transforms differ (``numeric_transforms`` holds
# them). Code that predates per-field transforms refuses it instead of applying one to every field.
PER_FIELD = "per_field"
MISSING_POLICIES = ("error", "fill", "indicator")  # a numeric field's missing-value policy
CATEGORICAL_MISSING = ("value", "error")  # a categorical field's
INDICATOR_SUFFIX = "_missing"  # an indicator column's name: <numeric field> + this (as in specs)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Everything needed to turn raw columns into the model's ``categorical``/``numeric`` arrays.

  Attributes:
    categorical_fields: the categorical inputs' names, in the order their columns have in the
      ``categorical`` array (indicator columns aside).
    numeric_fields: names, in the column order of the ``numeric`` array.
    vocabularies: per categorical field, its sorted vocabulary (OOV id = its length); empty for
      a hashed field.
    means, stds: per numeric field, statistics of the transformed training values.
    numeric_transform: 'none' | 'log1p': every numeric field's transform; or ``PER_FIELD`` when
      ``numeric_transforms`` differ.
    min_count: the vocabulary threshold it was fitted with (informational).
    bucket_boundaries: per numeric field, increasing cut points on the normalised value at
      quantiles of the field's distinct training values (empty when bucketing is off); the
      models embed each value's bucket besides the value itself.
    num_buckets: per categorical field, its hash bucket count (ids ``farmhash64(value) %
      num_buckets``), 0 for a vocabulary field.
    numeric_transforms: per numeric field, 'none' | 'log1p'.
    numeric_missing: per numeric field, what a missing value (NaN) becomes: 'error' (refused),
      'fill', 'indicator'.
    numeric_fills: per numeric field, the fill value (column units) where 'fill', else None.
    indicator_columns: per numeric field, the column of its missing-value indicator in the
      ``categorical`` array where 'indicator', else -1.
    missing_values: raw categorical values read as missing, i.e. as ``""`` (a CSV spec's
      ``format.missing_values``: preparation reads them as missing), compared before stripping.
    categorical_missing: per categorical field, what a missing value is: 'value' (the id of
      ``""``, as any value) or 'error' (refused, as preparation refused it).
    numeric_missing_values: per numeric field, the finite numbers read as missing (a CSV spec's
      number-like ``format.missing_values``), compared in float32 (the serving dtype).

  The last eight were added later: a file without them (written before) loads with what they
  meant then: every categorical field a vocabulary whose missing value is ``""``, every numeric
  field ``numeric_transform``, no missing values accepted, no indicators, no missing numbers.
  Constructed with them left empty, they are filled in the same way (indicators, if any, after
  the categorical fields).
  """

  categorical_fields: tuple[str, ...]
  numeric_fields: tuple[str, ...]
  vocabularies: tuple[tuple[str, ...], ...]
  means: tuple[float, ...]
  stds: tuple[float, ...]
  numeric_transform: str = "log1p"
  min_count: int = 1
  bucket_boundaries: tuple[tuple[float, ...], ...] = ()
  num_buckets: tuple[int, ...] = ()
  numeric_transforms: tuple[str, ...] = ()
  numeric_missing: tuple[str, ...] = ()
  numeric_fills: tuple[float | None, ...] = ()
  indicator_columns: tuple[int, ...] = ()
  missing_values: tuple[str, ...] = ()
  categorical_missing: tuple[str, ...] = ()
  numeric_missing_values: tuple[tuple[float, ...], ...] = ()

  def __post_init__(self):
    fc, fn = len(self.categorical_fields), len(self.numeric_fields)
    set_ = lambda name, value: object.__setattr__(self, name, value)  # frozen: normalise once
    if len(self.vocabularies) != fc:
      raise ValueError("Preprocessing: one vocabulary per categorical field is required")
    if not len(self.means) == len(self.stds) == fn:
      raise ValueError("Preprocessing: one mean and one std per numeric field are required")
    if self.numeric_transform not in NUMERIC_TRANSFORMS + (PER_FIELD,):
      raise ValueError(f"numeric_transform must be one of {NUMERIC_TRANSFORMS}, "
                       f"got {self.numeric_transform!r}")
    # Categorical: vocabulary or hashed.
    num_buckets = tuple(int(b) for b in self.num_buckets) or (0,) * fc
    if len(num_buckets) != fc:
      raise ValueError("Preprocessing: one num_buckets (0 = vocabulary) per categorical field "
                       "is required")
    for name, b, vocab in zip(self.categorical_fields, num_buckets, self.vocabularies):
      if not 0 <= b < 2**31:
        raise ValueError(f"field {name!r}: num_buckets must be in [0, 2**31), got {b}")
      if b and vocab:
        raise ValueError(f"field {name!r}: a hashed field (num_buckets={b}) has no vocabulary")
    set_("num_buckets", num_buckets)
    categorical_missing = tuple(self.categorical_missing) or ("value",) * fc
    if len(categorical_missing) != fc or set(categorical_missing) - set(CATEGORICAL_MISSING):
      raise ValueError(f"Preprocessing: one missing-value policy {CATEGORICAL_MISSING} per "
                       f"categorical field is required, got {categorical_missing}")
    set_("categorical_missing", categorical_missing)
    # Numeric: transform, missing-value policy, fill value, indicator column.
    transforms = tuple(self.numeric_transforms)
    if not transforms:
      if self.numeric_transform == PER_FIELD and fn:
        raise ValueError(f"numeric_transform={PER_FIELD!r} needs numeric_transforms")
      transforms = (self.numeric_transform,) * fn
    if len(transforms) != fn:
      raise ValueError("Preprocessing: one transform per numeric field is required")
    for name, t in zip(self.numeric_fields, transforms):
      if t not in NUMERIC_TRANSFORMS:
        raise ValueError(f"field {name!r}: transform must be one of {NUMERIC_TRANSFORMS}, "
                         f"got {t!r}")
    if self.numeric_transform != PER_FIELD and set(transforms) - {self.numeric_transform}:
      raise ValueError(f"numeric_transform={self.numeric_transform!r} but the fields' "
                       f"transforms are {transforms} (use {PER_FIELD!r})")
    set_("numeric_transforms", transforms)
    missing = tuple(self.numeric_missing) or ("error",) * fn
    fills = tuple(None if v is None else float(v) for v in self.numeric_fills) or (None,) * fn
    if not len(missing) == len(fills) == fn:
      raise ValueError("Preprocessing: one missing-value policy and one fill value (or None) "
                       "per numeric field are required")
    for name, policy, fill in zip(self.numeric_fields, missing, fills):
      if policy not in MISSING_POLICIES:
        raise ValueError(f"field {name!r}: missing-value policy must be one of "
                         f"{MISSING_POLICIES}, got {policy!r}")
      if (policy == "fill") != (fill is not None) or (fill is not None and not np.isfinite(fill)):
        raise ValueError(f"field {name!r}: a finite fill value is required with policy 'fill' "
                         f"and only then (policy {policy!r}, fill {fill!r})")
    set_("numeric_missing", missing)
    set_("numeric_fills", fills)
    with_indicator = [j for j, p in enumerate(missing) if p == "indicator"]
    columns = tuple(int(c) for c in self.indicator_columns)
    if not columns:
      columns = [-1] * fn
      for k, j in enumerate(with_indicator):
        columns[j] = fc + k
      columns = tuple(columns)
    if len(columns) != fn:
      raise ValueError("Preprocessing: one indicator column (or -1) per numeric field is required")
    width = fc + len(with_indicator)
    used = [c for c in columns if c >= 0]
    if ([j for j, c in enumerate(columns) if c >= 0] != with_indicator
        or len(set(used)) != len(used) or any(not 0 <= c < width for c in used)
        or any(c < -1 for c in columns)):
      raise ValueError(f"indicator_columns {columns}: each field with policy 'indicator' (and "
                       f"only those) needs its own column in [0, {width})")
    set_("indicator_columns", columns)
    set_("missing_values", tuple(str(v) for v in self.missing_values))
    markers = tuple(tuple(float(v) for v in vs) for vs in self.numeric_missing_values) or (
        ((),) * fn)
    if len(markers) != fn or not all(np.isfinite(v) for vs in markers for v in vs):
      raise ValueError(f"Preprocessing: one tuple of finite missing numbers per numeric field is "
                       f"required, got {markers}")
    set_("numeric_missing_values", markers)

  @property
  def vocab_sizes(self) -> tuple[int, ...]:
    """Per categorical field, its number of ids besides OOV: vocabulary size or bucket count."""
    return tuple(b or len(v) for b, v in zip(self.num_buckets, self.vocabularies))

  @property
  def hashed(self) -> tuple[bool, ...]:
    return tuple(b > 0 for b in self.num_buckets)

  @property
  def categorical_positions(self) -> tuple[int, ...]:
    """Per categorical field, its column in the ``categorical`` array."""
    taken = {c for c in self.indicator_columns if c >= 0}
    free = [c for c in range(len(self.categorical_fields) + len(taken)) if c not in taken]
    return tuple(free)

  @property
  def column_names(self) -> tuple[str, ...]:
    """The names of the ``categorical`` array's columns (indicators: ``<field>_missing``)."""
    names = [""] * (len(self.categorical_fields) + self.num_indicators)
    for name, c in zip(self.categorical_fields, self.categorical_positions):
      names[c] = name
    for name, c in zip(self.numeric_fields, self.indicator_columns):
      if c >= 0:
        names[c] = name + INDICATOR_SUFFIX
    return tuple(names)

  @property
  def column_vocab_sizes(self) -> tuple[int, ...]:
    """Per column of the ``categorical`` array, its vocabulary size (``Schema.vocab_sizes``)."""
    sizes = [2] * (len(self.categorical_fields) + self.num_indicators)
    for size, c in zip(self.vocab_sizes, self.categorical_positions):
      sizes[c] = size
    return tuple(sizes)

  @property
  def num_indicators(self) -> int:
    return sum(c >= 0 for c in self.indicator_columns)

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
        "num_buckets": list(self.num_buckets),
        "numeric_transforms": list(self.numeric_transforms),
        "numeric_missing": list(self.numeric_missing),
        "numeric_fills": list(self.numeric_fills),
        "indicator_columns": list(self.indicator_columns),
        "missing_values": list(self.missing_values),
        "numeric_missing_values": [list(v) for v in self.numeric_missing_values],
        "categorical_missing": list(self.categorical_missing),  # last: see prepare.py's
        # _record_categorical_missing, which appends it to a file written before it
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
        num_buckets=tuple(int(b) for b in d.get("num_buckets", ())),
        numeric_transforms=tuple(d.get("numeric_transforms", ())),
        numeric_missing=tuple(d.get("numeric_missing", ())),
        numeric_fills=tuple(None if v is None else float(v) for v in d.get("numeric_fills", ())),
        indicator_columns=tuple(int(c) for c in d.get("indicator_columns", ())),
        missing_values=tuple(d.get("missing_values", ())),
        categorical_missing=tuple(d.get("categorical_missing", ())),
        numeric_missing_values=tuple(tuple(float(x) for x in v)
                                     for v in d.get("numeric_missing_values", ())),
    )

  def to_json(self) -> str:
    return json.dumps(self.to_dict())

  @classmethod
  def from_json(cls, text: str) -> "Preprocessing":
    return cls.from_dict(json.loads(text))


def _is_missing(value) -> bool:
  """None, or a NaN of any float type (Python's, or NumPy's float32/float64)."""
  return value is None or (isinstance(value, (float, np.floating)) and value != value)


def as_str_array(values: np.ndarray | Sequence) -> np.ndarray:
  """A fixed-width ``str`` array of categorical values as preparation reads them: bytes decoded
  as UTF-8; numbers and booleans in Arrow's string form (``1.0`` -> ``"1"``, ``2.5`` ->
  ``"2.5"``, ``True`` -> ``"true"``); a missing value (None, NaN) -> ``""``."""
  values = np.asarray(values)
  if values.dtype.kind == "U":
    return values
  if values.dtype.kind == "S":
    return np.char.decode(values, "utf-8")
  if values.dtype.kind in "biuf" or values.dtype == object:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    flat = values.reshape(-1)
    if values.dtype == object:
      missing = np.array([_is_missing(v) for v in flat], bool)
      kinds = {str if isinstance(v, str) else bytes if isinstance(v, bytes) else
               bool if isinstance(v, (bool, np.bool_)) else
               float if isinstance(v, (int, float, np.number)) else type(v)
               for v in flat[~missing]}
      if len(kinds) > 1 or kinds - {str, bytes, bool, float}:
        raise ValueError(f"categorical values of types {sorted(k.__name__ for k in kinds)}; "
                         f"expected one of strings, bytes, numbers or booleans")
      present = np.asarray(flat[~missing].tolist())
      out = np.full(flat.shape, "", dtype=object)
      out[~missing] = as_str_array(present) if present.size else present
      return out.astype(str).reshape(values.shape)
    missing = np.isnan(flat) if values.dtype.kind == "f" else np.zeros(flat.shape, bool)
    strings = pc.cast(pa.array(flat, mask=missing), pa.string()).fill_null("")
    return np.asarray(strings.to_pylist(), dtype=str).reshape(values.shape)
  return values.astype(str)


# The characters stripped from both ends of a categorical value: ASCII whitespace, exactly what
# ``tf.strings.strip`` removes in the serving graph. (Python's ``str.strip()`` would also remove
# Unicode spaces and the separators \x1c-\x1f, which the graph keeps: a value holding them would
# be known in training and OOV when served.)
ASCII_WHITESPACE = " \t\n\v\f\r"


def categorical_missing(values: np.ndarray | Sequence, missing_values: Sequence[str] = ()
                        ) -> np.ndarray:
  """bool ``[N]``: where a raw categorical value is missing (None, NaN, exactly one of
  ``missing_values``, or blank once stripped), as preparation reads it."""
  raw = np.asarray(values)
  if raw.dtype == object:
    missing = np.array([_is_missing(v) for v in raw.reshape(-1)], bool).reshape(raw.shape)
  else:
    missing = np.isnan(raw) if raw.dtype.kind == "f" else np.zeros(raw.shape, bool)
  strings = as_str_array(raw)
  if len(missing_values):
    missing |= np.isin(strings, np.asarray(missing_values, dtype=str))
  return missing | (np.char.strip(strings, ASCII_WHITESPACE) == "")


def categorical_values(values: np.ndarray | Sequence, missing_values: Sequence[str] = ()
                       ) -> np.ndarray:
  """The strings a categorical value is looked up as: str, ``""`` where the raw value is one of
  ``missing_values`` (exactly, as preparation compares), else surrounding ASCII whitespace
  removed. The serving graph applies the same rule (``serving.RawFeatureEncoder``), so a raw
  value served as it was in the file finds the vocabulary entry training made."""
  values = as_str_array(values)
  if len(missing_values):
    values = np.where(np.isin(values, np.asarray(missing_values, dtype=str)), "", values)
  return np.char.strip(values, ASCII_WHITESPACE)


def transform_numeric(values: np.ndarray, transform: str) -> np.ndarray:
  """float64 ``t(x)``: identity for 'none', ``sign(x) * log1p(|x|)`` for 'log1p'."""
  x = np.asarray(values, dtype=np.float64)
  if transform == "none":
    return x
  if transform == "log1p":
    return np.sign(x) * np.log1p(np.abs(x))
  raise ValueError(f"numeric_transform must be one of {NUMERIC_TRANSFORMS}, got {transform!r}")


# A field is constant when its std is below this fraction of its mean (rounding: the mean of n
# equal values need not be that value): relative, so that tiny values (1e-13, 2e-13) are not.
CONSTANT_RTOL = 1e-12


def fitted_std(mean: float, std: float) -> float:
  """The std a field is normalised by: ``std``, or 1 for a constant field."""
  return 1.0 if std <= CONSTANT_RTOL * abs(mean) else std


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
    ValueError: bad ``min_count``/``numeric_transform``, a field left with an empty
      vocabulary, or numeric values whose mean or variance overflows.
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
    with np.errstate(over="ignore", invalid="ignore"):  # (refused below)
      mean, std = float(t.mean()), float(t.std())
    if not (np.isfinite(mean) and np.isfinite(std)):
      raise ValueError(f"field {name!r}: its training values are too large, their mean or "
                       f"variance overflows float64; transform them first (log1p)")
    std = fitted_std(mean, std)
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


def encode_categorical(values: np.ndarray, vocabulary: Sequence[str],
                       missing_values: Sequence[str] = ()) -> np.ndarray:
  """int32 ``[N]`` ids: the index in the sorted ``vocabulary``, or ``len(vocabulary)`` (OOV)."""
  values = categorical_values(values, missing_values)
  vocab = np.asarray(vocabulary, dtype=str)
  if not len(vocab):
    return np.zeros(len(values), np.int32)
  idx = np.searchsorted(vocab, values)
  hit = vocab[np.minimum(idx, len(vocab) - 1)] == values
  return np.where(hit, idx, len(vocab)).astype(np.int32)


def hash_categorical(values: np.ndarray, num_buckets: int, missing_values: Sequence[str] = ()
                     ) -> np.ndarray:
  """int32 ``[N]`` ids ``farmhash64(value) % num_buckets`` of the stripped values: TensorFlow's
  ``tf.strings.to_hash_bucket_fast``, as preparation and the serving graph compute them."""
  values = categorical_values(values, missing_values)
  if not len(values):
    return np.zeros(0, np.int32)
  from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  return tf.strings.to_hash_bucket_fast(
      tf.constant(np.char.encode(values, "utf-8")), int(num_buckets)).numpy().astype(np.int32)


def is_missing_number(x: np.ndarray, markers: Sequence[float]) -> np.ndarray:
  """bool ``[N]``: where float ``x`` equals one of ``markers`` in float32 (the serving dtype)."""
  if not len(markers):
    return np.zeros(np.shape(x), bool)
  with np.errstate(over="ignore"):
    return np.isin(np.asarray(x).astype(np.float32), np.asarray(markers, np.float32))


def encode_numeric(values: np.ndarray, preprocessing: Preprocessing, j: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(float32 ``[N]`` normalised values, bool ``[N]`` missing) of numeric field ``j``.

  Missing (NaN, None in an object array, or one of the field's ``numeric_missing_values``) per
  the field's policy: 'error' raises, 'fill' uses the fill value, 'indicator' gives 0 (the
  training mean) and reports the row as missing.

  Raises:
    ValueError: an infinite value, or a missing one under policy 'error'.
  """
  name, policy = preprocessing.numeric_fields[j], preprocessing.numeric_missing[j]
  x = np.asarray(values, dtype=np.float64)
  markers = preprocessing.numeric_missing_values[j]
  missing = np.isnan(x) | is_missing_number(x, markers)
  if np.isinf(x).any():
    i = int(np.argmax(np.isinf(x)))
    raise ValueError(f"numeric field {name!r}, row {i}: {x[i]} is not a finite number")
  if missing.any():
    if policy == "error":
      i = int(np.argmax(missing))
      what = f"NaN or one of {list(markers)}" if markers else "NaN"
      raise ValueError(f"numeric field {name!r}, row {i}: the value is missing ({what}) and the "
                       f"field accepts no missing values (policy 'error')")
    if policy == "fill":
      x = np.where(missing, preprocessing.numeric_fills[j], x)
      missing = np.zeros_like(missing)
  t = transform_numeric(x, preprocessing.numeric_transforms[j])
  z = (t - preprocessing.means[j]) / preprocessing.stds[j]
  if missing.any():
    z[missing] = 0.0  # the training mean
  return z.astype(np.float32), missing


def encode(raw_columns: Mapping[str, np.ndarray], preprocessing: Preprocessing
           ) -> dict[str, np.ndarray]:
  """Raw columns -> ``{'categorical': int32 [N, Fc + indicators], 'numeric': float32 [N, Fn]}``.

  Raises:
    ValueError: columns of different lengths; a numeric value infinite, or a value missing where
      the field's policy is 'error'.
  """
  p = preprocessing
  lengths = {len(raw_columns[f]) for f in p.categorical_fields + p.numeric_fields}
  if len(lengths) > 1:
    raise ValueError(f"encode: columns have different lengths {sorted(lengths)}")
  n = lengths.pop() if lengths else 0
  categorical = np.zeros((n, len(p.column_names)), dtype=np.int32)
  for name, vocab, buckets, c, policy in zip(p.categorical_fields, p.vocabularies, p.num_buckets,
                                             p.categorical_positions, p.categorical_missing):
    if policy == "error":
      missing = categorical_missing(raw_columns[name], p.missing_values)
      if missing.any():
        raise ValueError(f"categorical field {name!r}, row {int(np.argmax(missing))}: the value "
                         f"is missing and the field accepts no missing values (policy 'error')")
    categorical[:, c] = (hash_categorical(raw_columns[name], buckets, p.missing_values)
                         if buckets else
                         encode_categorical(raw_columns[name], vocab, p.missing_values))
  numeric = np.zeros((n, len(p.numeric_fields)), dtype=np.float32)
  for j, name in enumerate(p.numeric_fields):
    numeric[:, j], missing = encode_numeric(raw_columns[name], p, j)
    if p.indicator_columns[j] >= 0:
      categorical[:, p.indicator_columns[j]] = missing
  return {"categorical": categorical, "numeric": numeric}
