"""Raw-feature preprocessing inside a TensorFlow graph: the serving twin of ``preprocessing.encode``.

Imports TensorFlow when imported (so :mod:`apem_jax.data` does not import this module; the export
step does). :class:`RawFeatureEncoder` is a ``tf.Module`` that a SavedModel tracks (its lookup
tables are saved with it) and that turns raw columns into the model's arrays exactly as
:func:`apem_jax.data.preprocessing.encode` does:

* categorical field: ``tf.string [b]`` -> index in the sorted training vocabulary
  (``tf.lookup.StaticHashTable``, exact string match), anything else -> the OOV id
  ``len(vocabulary)``;
* numeric field: ``float32 [b]`` -> ``(t(x) - mean) / std`` computed in float64 (as NumPy does),
  then rounded to float32; ``t`` = identity or ``sign(x) * log1p(|x|)``.

Without a :class:`~apem_jax.data.preprocessing.Preprocessing` (synthetic data: numeric fields
only, generated already normalised) the numeric inputs pass through unchanged.

:func:`decode` is the NumPy inverse of ``encode`` (ids -> vocabulary strings, OOV -> a string in
no vocabulary, numeric values un-normalised), for checking an export on raw values when only
encoded arrays are at hand.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from apem_jax.data import pipeline
from apem_jax.data import preprocessing as prep_lib

tf = pipeline._import_tf()  # pylint: disable=protected-access  (quiet, no GPUs for TF)


def input_specs(categorical_fields: Sequence[str], numeric_fields: Sequence[str]
                ) -> dict[str, tf.TensorSpec]:
  """One ``[None]`` spec per raw feature, named by the feature: string (categorical) or float32."""
  specs = {name: tf.TensorSpec([None], tf.string, name=name) for name in categorical_fields}
  specs.update({name: tf.TensorSpec([None], tf.float32, name=name) for name in numeric_fields})
  return specs


class RawFeatureEncoder(tf.Module):
  """Raw features by name -> ``{'categorical': int32 [b, Fc], 'numeric': float32 [b, Fn]}``."""

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
    self._tables = [
        tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(vocab), tf.string),
                tf.range(len(vocab), dtype=tf.int64)),
            default_value=len(vocab), name=f"vocab_{field}")
        for field, vocab in zip(preprocessing.categorical_fields, preprocessing.vocabularies)]

  def input_specs(self) -> dict[str, tf.TensorSpec]:
    return input_specs(self.categorical_fields, self.numeric_fields)

  def __call__(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Encodes a batch; every feature is a ``[b]`` tensor (string or float32)."""
    missing = [f for f in self.categorical_fields + self.numeric_fields if f not in features]
    if missing:
      raise ValueError(f"missing features {missing}")
    first = (self.categorical_fields + self.numeric_fields)[0]
    batch = tf.shape(features[first])[0]
    if self.categorical_fields:
      categorical = tf.stack(
          [tf.cast(table.lookup(tf.strings.strip(tf.reshape(features[f], [-1]))), tf.int32)
           for f, table in zip(self.categorical_fields, self._tables)], axis=1)
    else:
      categorical = tf.zeros([batch, 0], tf.int32)
    if not self.numeric_fields:
      numeric = tf.zeros([batch, 0], tf.float32)
    elif self._preprocessing is None:
      numeric = tf.stack([tf.cast(tf.reshape(features[f], [-1]), tf.float32)
                          for f in self.numeric_fields], axis=1)
    else:
      p = self._preprocessing
      x = tf.stack([tf.cast(tf.reshape(features[f], [-1]), tf.float64)
                    for f in self.numeric_fields], axis=1)
      if p.numeric_transform == "log1p":
        x = tf.sign(x) * tf.math.log1p(tf.abs(x))
      elif p.numeric_transform != "none":
        raise ValueError(f"unknown numeric_transform {p.numeric_transform!r}")
      z = (x - tf.constant(p.means, tf.float64)) / tf.constant(p.stds, tf.float64)
      numeric = tf.cast(z, tf.float32)
    return {"categorical": categorical, "numeric": numeric}


def decode(categorical: np.ndarray, numeric: np.ndarray, preprocessing: prep_lib.Preprocessing,
           unseen: str | None = None) -> dict[str, np.ndarray]:
  """The inverse of ``preprocessing.encode``: raw columns that encode back to the given arrays.

  For checking an export when the raw values themselves are not at hand (the data package keeps
  only encoded arrays). Ids map to their vocabulary strings, OOV ids to ``unseen`` (default: a
  string in no vocabulary); numeric values are un-normalised and un-transformed in float64, then
  rounded to float32 (the serving dtype), so they re-encode to within float32 rounding.

  Args:
    categorical: int32 [N, Fc] ids.
    numeric: float32 [N, Fn] normalised values.
    preprocessing: what encoded them.
    unseen: the raw value OOV ids map to; must be in no vocabulary.

  Returns:
    ``{field: str array [N] | float32 array [N]}``.
  """
  unseen = unseen_value(preprocessing) if unseen is None else unseen
  if any(unseen in vocab for vocab in preprocessing.vocabularies):
    raise ValueError(f"decode: unseen={unseen!r} is in a vocabulary")
  raw = {}
  for j, (name, vocab) in enumerate(zip(preprocessing.categorical_fields,
                                        preprocessing.vocabularies)):
    table = np.asarray(list(vocab) + [unseen], dtype=object)
    raw[name] = table[np.clip(categorical[:, j], 0, len(vocab))].astype(str)
  for j, name in enumerate(preprocessing.numeric_fields):
    t = numeric[:, j].astype(np.float64) * preprocessing.stds[j] + preprocessing.means[j]
    if preprocessing.numeric_transform == "log1p":
      t = np.sign(t) * np.expm1(np.abs(t))
    raw[name] = t.astype(np.float32)
  return raw


def unseen_value(preprocessing: prep_lib.Preprocessing) -> str:
  """A categorical value that is in none of the vocabularies (so it maps to OOV everywhere)."""
  value = "<unseen>"
  while any(value in vocab for vocab in preprocessing.vocabularies):
    value += "_"
  return value
