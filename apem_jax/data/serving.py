"""Raw-feature preprocessing inside a TensorFlow graph: the serving twin of ``preprocessing.encode``.

Imports TensorFlow when imported (so :mod:`apem_jax.data` does not import this module; the export
step does). :class:`RawFeatureEncoder` is a ``tf.Module`` that a SavedModel tracks (its lookup
tables are saved with it) and that turns raw columns into the model's arrays exactly as
:func:`apem_jax.data.preprocessing.encode` (and the preparation of a dataset spec) does:

* categorical field: ``tf.string [b]``, surrounding ASCII whitespace stripped
  (``tf.strings.strip``), then

  - vocabulary field: index in the sorted training vocabulary (``tf.lookup.StaticHashTable``,
    exact string match), anything else -> the OOV id ``len(vocabulary)``;
  - hashed field: ``farmhash64(value) % num_buckets`` (``tf.strings.to_hash_bucket_fast``, the op
    preparation hashes with).

  A missing value is sent as the empty string (preparation reads a missing value as ``""``), or
  as one of the CSV spec's ``format.missing_values`` (``Preprocessing.missing_values``), which
  read as ``""`` too; a value blank once stripped is missing as well (refused under the field's
  policy 'error', as preparation refuses it).
* numeric field: ``float32 [b]`` -> ``(t(x) - mean) / std`` computed in float64 (as NumPy does),
  then rounded to float32; ``t`` (per field) = identity or ``sign(x) * log1p(|x|)``. A missing
  value is sent as NaN (or as one of the field's ``numeric_missing_values``, a CSV spec's
  number-like ``format.missing_values``, compared in float32) and handled by the field's policy:
  'fill' -> the fill value before ``t``; 'indicator' -> 0 (the training mean) and id 1 in the
  field's ``<name>_missing`` column of the ``categorical`` array (0 when present); 'error' (the
  field had no missing values in preparation) -> the call fails with ``InvalidArgumentError``
  naming the feature. An infinite value fails the call under every policy (preparation refuses
  it too).

Without a :class:`~apem_jax.data.preprocessing.Preprocessing` (synthetic data: numeric fields
only, generated already normalised) the numeric inputs pass through unchanged.

:func:`decode` is the NumPy inverse of ``encode`` (ids -> vocabulary strings, OOV -> a string in
no vocabulary, numeric values un-normalised, indicator 1 -> NaN), for checking an export on raw
values when only encoded arrays are at hand.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from apem_jax.data import pipeline
from apem_jax.data import preprocessing as prep_lib
from apem_jax.data import spec as spec_lib

tf = pipeline._import_tf()  # pylint: disable=protected-access  (quiet, no GPUs for TF)

# How a client says "no value", for the signature's documentation (export metadata, README).
MISSING_NUMERIC = "NaN"
MISSING_CATEGORICAL = ""


def check_input_names(names: Sequence[str]) -> None:
  """Raises a one-line ``ValueError`` for a feature name that cannot name a SavedModel input
  (TensorFlow's pattern; no spaces) or that equals another but for case (TensorFlow lowercases
  the names of a signature's inputs): :func:`apem_jax.data.spec.check_feature_names`, which a
  dataset spec applies to its features when it is read."""
  spec_lib.check_feature_names(names)


def input_specs(categorical_fields: Sequence[str], numeric_fields: Sequence[str]
                ) -> dict[str, tf.TensorSpec]:
  """One ``[None]`` spec per raw feature, named by the feature: string (categorical) or float32
  (:func:`check_input_names` says which names can be)."""
  check_input_names(tuple(categorical_fields) + tuple(numeric_fields))
  specs = {name: tf.TensorSpec([None], tf.string, name=name) for name in categorical_fields}
  specs.update({name: tf.TensorSpec([None], tf.float32, name=name) for name in numeric_fields})
  return specs


class RawFeatureEncoder(tf.Module):
  """Raw features by name -> ``{'categorical': int32 [b, Fc + indicators], 'numeric': float32
  [b, Fn]}``."""

  def __init__(self, preprocessing: prep_lib.Preprocessing | None,
               numeric_fields: Sequence[str] = (), name: str = "raw_feature_encoder"):
    """Args:
      preprocessing: the fitted vocabularies and statistics; None for data without any
        (then only ``numeric_fields``, fed already normalised).
      numeric_fields: the numeric field names when ``preprocessing`` is None.
    """
    super().__init__(name=name)
    self._preprocessing = preprocessing
    if preprocessing is None:
      self.categorical_fields: tuple[str, ...] = ()
      self.numeric_fields = tuple(numeric_fields)
      self._tables = []
      return
    self.categorical_fields = tuple(preprocessing.categorical_fields)
    self.numeric_fields = tuple(preprocessing.numeric_fields)
    # Hashed fields have no table (None); the list keeps one entry per field.
    self._tables = [
        None if buckets else tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(vocab), tf.string),
                tf.range(len(vocab), dtype=tf.int64)),
            default_value=len(vocab), name=f"vocab_{i}")  # (op names: no feature names,
        # which may hold spaces or other characters TensorFlow refuses in one)
        for i, (vocab, buckets) in enumerate(zip(preprocessing.vocabularies,
                                                 preprocessing.num_buckets))]

  def input_specs(self) -> dict[str, tf.TensorSpec]:
    return input_specs(self.categorical_fields, self.numeric_fields)

  def __call__(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Encodes a batch; every feature is a ``[b]`` tensor (string or float32)."""
    missing = [f for f in self.categorical_fields + self.numeric_fields if f not in features]
    if missing:
      raise ValueError(f"missing features {missing}")
    first = (self.categorical_fields + self.numeric_fields)[0]
    batch = tf.shape(features[first])[0]
    p = self._preprocessing
    if p is None:
      categorical = tf.zeros([batch, 0], tf.int32)
      numeric = (tf.stack([tf.cast(tf.reshape(features[f], [-1]), tf.float32)
                           for f in self.numeric_fields], axis=1) if self.numeric_fields else
                 tf.zeros([batch, 0], tf.float32))
      return {"categorical": categorical, "numeric": numeric}

    columns: list[tf.Tensor | None] = [None] * len(p.column_names)
    for f, table, buckets, c, policy in zip(self.categorical_fields, self._tables, p.num_buckets,
                                            p.categorical_positions, p.categorical_missing):
      value = tf.reshape(features[f], [-1])
      if p.missing_values:  # read as missing, as preparation does: compared before stripping
        is_missing = tf.reduce_any(
            tf.equal(value[:, None], tf.constant(p.missing_values, tf.string)[None, :]), axis=1)
        value = tf.where(is_missing, tf.constant(""), value)
      value = tf.strings.strip(value)
      if policy == "error":  # a missing value, or a blank one, is "" now
        with tf.control_dependencies([tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(tf.equal(value, ""))),
            [f"feature {f}: a value is missing (blank, or one of the dataset spec's "
             f"missing_values), but the feature accepts none (its missing policy in the spec is "
             f"error)"], name=f"categorical_present_{c}")]):
          value = tf.identity(value)
      ids = (tf.strings.to_hash_bucket_fast(value, buckets) if buckets else table.lookup(value))
      columns[c] = tf.cast(ids, tf.int32)
    numeric = []
    for j, f in enumerate(self.numeric_fields):
      x, is_missing = self._numeric(p, j, tf.cast(tf.reshape(features[f], [-1]), tf.float64))
      numeric.append(x)
      if p.indicator_columns[j] >= 0:
        columns[p.indicator_columns[j]] = tf.cast(is_missing, tf.int32)
    categorical = (tf.stack(columns, axis=1) if columns else tf.zeros([batch, 0], tf.int32))
    numeric = (tf.stack(numeric, axis=1) if numeric else tf.zeros([batch, 0], tf.float32))
    return {"categorical": categorical, "numeric": numeric}

  @staticmethod
  def _numeric(p: prep_lib.Preprocessing, j: int, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(float32 normalised values, bool missing) of numeric field ``j`` from float64 ``x``."""
    name, policy, markers = p.numeric_fields[j], p.numeric_missing[j], p.numeric_missing_values[j]
    is_missing = tf.math.is_nan(x)
    if markers:  # compared in float32, the dtype a client sends
      is_missing |= tf.reduce_any(tf.equal(tf.cast(x, tf.float32)[:, None],
                                           tf.constant(markers, tf.float32)[None, :]), axis=1)
    # (Messages without quotes: graph mode shows them escaped.)
    checks = [tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(tf.math.is_inf(x))),
        [f"feature {name}: a value is infinite; send a finite number (or NaN for a missing "
         f"value where the feature accepts one)"], name=f"finite_{j}")]
    if policy == "error":
      checks.append(tf.debugging.Assert(
          tf.logical_not(tf.reduce_any(is_missing)),
          [f"feature {name}: a value is missing (NaN"
           + (f" or one of {list(markers)}" if markers else "") + "), but the feature accepts "
           f"none (its missing-value policy in the dataset spec is error)"], name=f"present_{j}"))
    with tf.control_dependencies(checks):
      x = tf.identity(x)
    if policy == "fill":
      x = tf.where(is_missing, tf.constant(p.numeric_fills[j], tf.float64), x)
      is_missing = tf.zeros_like(is_missing)
    elif policy == "indicator":
      x = tf.where(is_missing, tf.zeros_like(x), x)  # no NaN through the transform
    transform = p.numeric_transforms[j]
    if transform == "log1p":
      x = tf.sign(x) * tf.math.log1p(tf.abs(x))
    elif transform != "none":
      raise ValueError(f"unknown numeric transform {transform!r}")
    z = (x - tf.constant(p.means[j], tf.float64)) / tf.constant(p.stds[j], tf.float64)
    if policy == "indicator":
      z = tf.where(is_missing, tf.zeros_like(z), z)  # the training mean
    return tf.cast(z, tf.float32), is_missing


def decode(categorical: np.ndarray, numeric: np.ndarray, preprocessing: prep_lib.Preprocessing,
           unseen: str | None = None) -> dict[str, np.ndarray]:
  """The inverse of ``preprocessing.encode``: raw columns that encode back to the given arrays.

  For checking an export when the raw values themselves are not at hand (the data package keeps
  only encoded arrays). Ids map to their vocabulary strings (an entry that is one of the missing
  values, as a file's ``" NA"`` gives ``NA``, with a space before it), OOV ids to ``unseen``
  (default: a string in no vocabulary); numeric values are un-normalised and un-transformed in
  float64, then rounded to float32 (the serving dtype), so they re-encode to within float32
  rounding; where a field's indicator column is 1 the value is NaN (missing). Hashing has no
  inverse: a hashed field's id ``i`` becomes the string ``"<unseen>#i"``, which encodes to
  another bucket.

  Args:
    categorical: int32 [N, Fc + indicators] ids.
    numeric: float32 [N, Fn] normalised values.
    preprocessing: what encoded them.
    unseen: the raw value OOV ids map to; must be in no vocabulary.

  Returns:
    ``{field: str array [N] | float32 array [N]}``, the raw inputs (no indicator columns).
  """
  p = preprocessing
  unseen = unseen_value(p) if unseen is None else unseen
  if any(unseen in vocab for vocab in p.vocabularies):
    raise ValueError(f"decode: unseen={unseen!r} is in a vocabulary")
  raw = {}
  for name, vocab, buckets, c in zip(p.categorical_fields, p.vocabularies, p.num_buckets,
                                     p.categorical_positions):
    if buckets:
      raw[name] = np.char.add(f"{unseen}#", categorical[:, c].astype(str))
      continue
    table = np.asarray([_served_as(v, p.missing_values) for v in vocab] + [unseen], dtype=object)
    raw[name] = table[np.clip(categorical[:, c], 0, len(vocab))].astype(str)
  for j, name in enumerate(p.numeric_fields):
    t = numeric[:, j].astype(np.float64) * p.stds[j] + p.means[j]
    if p.numeric_transforms[j] == "log1p":
      t = np.sign(t) * np.expm1(np.abs(t))
    if p.indicator_columns[j] >= 0:
      t = np.where(categorical[:, p.indicator_columns[j]] != 0, np.nan, t)
    raw[name] = t.astype(np.float32)
  return raw


def _served_as(entry: str, missing_values: Sequence[str]) -> str:
  """A raw value that encodes to vocabulary ``entry``: the entry, with spaces before it where it
  is one of ``missing_values`` (matched exactly, before stripping), as a file's ``" NA"`` was
  read as the value ``NA`` where ``NA`` alone is missing."""
  while entry in missing_values:
    entry = " " + entry
  return entry


def unseen_value(preprocessing: prep_lib.Preprocessing) -> str:
  """A categorical value that is in none of the vocabularies (so it maps to OOV everywhere)."""
  value = "<unseen>"
  while any(value in vocab for vocab in preprocessing.vocabularies):
    value += "_"
  return value
