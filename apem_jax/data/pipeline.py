"""The one entry point the trainer uses: ``load_dataset(data_config) -> DatasetSplits``.

``DatasetSplits`` holds the encoded arrays of train / validation / test in host memory (Census is
~300k rows x 46 columns, a few tens of MB) and serves batches in the format of
:mod:`apem_jax.schema`:

* ``train_batches(batch_size, seed)``: an infinite tf.data iterator; each process reads its own
  shard (``shard(jax.process_count(), jax.process_index())``), shuffled with ``seed`` and
  reshuffled every epoch, ``batch_size // process_count`` rows per batch, remainder dropped.
* ``eval_batches(split, batch_size)``: a finite numpy iterator over this process's shard; every
  batch has exactly ``batch_size // process_count`` rows, the last padded with ``weight = 0``,
  ``label_mask = 0`` rows; every process yields the same number of batches.

``load_dataset(data_config)`` gives the dataset a config names: a user's files described by a
dataset spec (prepared once into shards, ``prepare.py``; streamed by ``stream.py`` or read into
a ``DatasetSplits``), or a built-in source (``sources.py``).

TensorFlow is imported lazily (importing this package is cheap and leaves TF alone),
and ``jax.process_*`` is only called inside the batch methods, so ``XLA_FLAGS`` set by the caller
before its first JAX device use still apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from apem_jax import schema as schema_lib
from apem_jax.data import preprocessing as prep_lib
from apem_jax.data.config_access import config_value

SPLITS = ("train", "validation", "test")
# Arrays evaluation reads but training batches leave out: the true conditional probabilities of
# synthetic funnels (for oracle metrics).
EVAL_ONLY_KEYS = ("true_q",)
WEIGHT_KEY = "weight"  # a training row's loss weight (train split only)
INCONSISTENT_FUNNEL_POLICIES = ("error", "drop")

Batch = dict[str, np.ndarray]


def _import_tf():
  """TensorFlow, imported on first use, quiet, and without any GPU (JAX owns accelerators)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # Already initialised: nothing more to do.
    pass
  return tf


def _tf_options(tf) -> Any:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 1  # the host has few cores; JAX needs them
  options.threading.max_intra_op_parallelism = 1
  return options


@dataclasses.dataclass
class DatasetSplits:
  """Encoded train / validation / test arrays and their schema.

  Attributes:
    schema: fields and tasks (tasks in config order).
    preprocessing: the fitted Preprocessing (None for data given without one).
    arrays: ``{split: {'categorical', 'numeric', 'labels', 'label_mask'}}`` (unpadded); synthetic
      funnels add ``true_q`` [N, T], the true conditional step probabilities (evaluation only);
      the training split may hold ``weight`` [N], each row's weight in the training loss (a
      spec's ``weight_column``; 1 where absent; evaluation is unweighted).
    inconsistent_funnel_rows: ``{split: rows dropped}`` by ``data.inconsistent_funnel='drop'``
      (funnel schemas only; see :func:`enforce_funnel_consistency`).
  """

  schema: schema_lib.Schema
  preprocessing: prep_lib.Preprocessing | None
  arrays: dict[str, dict[str, np.ndarray]]
  inconsistent_funnel_rows: dict[str, int] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    check_arrays(self.schema, self.arrays)

  def _split(self, split: str) -> dict[str, np.ndarray]:
    if split not in self.arrays:
      raise ValueError(f"unknown split {split!r}; known: {sorted(self.arrays)}")
    return self.arrays[split]

  def num_examples(self, split: str) -> int:
    """Rows of `split` (all processes together)."""
    return int(self._split(split)["labels"].shape[0])

  def fingerprint(self) -> str:
    """SHA-256 of every split's encoded arrays (names, dtypes, shapes and bytes): a resume
    refuses data that differs from what the checkpoint was trained on."""
    digest = hashlib.sha256()
    for split in sorted(self.arrays):
      for name in sorted(self.arrays[split]):
        a = np.ascontiguousarray(self.arrays[split][name])
        digest.update(f"{split}/{name}/{a.dtype.str}/{a.shape}".encode())
        digest.update(a.data)
    return digest.hexdigest()

  def head(self, split: str, rows: int) -> dict[str, np.ndarray]:
    """The model inputs (``categorical``, ``numeric``) of the first ``rows`` rows of ``split``."""
    arrays = self._split(split)
    return {k: arrays[k][:rows] for k in ("categorical", "numeric")}

  @staticmethod
  def _per_process(batch_size: int) -> tuple[int, int, int]:
    count, index = jax.process_count(), jax.process_index()
    if batch_size <= 0 or batch_size % count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                       f"jax.process_count()={count}")
    return batch_size // count, count, index

  def check_batch_size(self, batch_size: int) -> None:
    """Raises ``ValueError`` unless ``batch_size`` splits into the processes."""
    self._per_process(batch_size)

  def train_batches(self, batch_size: int, seed: int, skip: int = 0) -> Iterator[Batch]:
    """Infinite iterator of this process's training batches of ``batch_size // process_count``.

    Same seed -> same sequence. Each epoch is a fresh permutation of this process's shard, cut
    into ``train rows // batch_size`` full batches on every process, so the processes' epochs
    end at the same step (the remainder is dropped; epochs do not mix). ``skip``: start at that
    batch of the sequence (a resumed run's position; only row indices are skipped, no rows read).
    """
    per_process, count, index = self._per_process(batch_size)
    arrays = self._split("train")
    n = self.num_examples("train")
    shard = np.arange(index, n, count, dtype=np.int64)
    # The same on every process (shards differ by a row): n // batch_size, the global epoch.
    batches_per_epoch = (n // count) // per_process
    if not batches_per_epoch:
      raise ValueError(f"train split has {n // count} rows on the smallest process's shard, "
                       f"fewer than one batch of {per_process}")
    tf = _import_tf()
    tensors = {k: tf.constant(v) for k, v in arrays.items() if k not in EVAL_ONLY_KEYS}
    shard_rows = tf.constant(shard)

    def epoch_batches(epoch):
      # One permutation per epoch, drawn in a single op and cut into batches of row indices:
      # per-row shuffling in tf.data costs more than the step of a small model.
      perm = tf.random.experimental.stateless_shuffle(
          shard_rows, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      rows = tf.reshape(perm[:batches_per_epoch * per_process], [batches_per_epoch, per_process])
      return tf.data.Dataset.from_tensor_slices(rows)

    def gather(indices):
      batch = {k: tf.gather(t, indices) for k, t in tensors.items()}
      if WEIGHT_KEY not in batch:
        batch[WEIGHT_KEY] = tf.ones(tf.shape(indices), tf.float32)
      return batch

    ds = (tf.data.Dataset.range(np.iinfo(np.int64).max)
          .flat_map(epoch_batches)
          .skip(skip)
          .map(gather)
          .prefetch(2)
          .with_options(_tf_options(tf)))
    return ds.as_numpy_iterator()

  def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
    """Finite iterator over this process's rows of `split`, fixed batch shape, padded last.

    Process ``i`` of ``k`` reads rows ``i, i + k, ...``; all processes yield
    ``ceil(ceil(n / k) / (batch_size // k))`` batches. Padding rows are zeros with
    ``weight = 0`` and ``label_mask = 0``.
    """
    per_process, count, index = self._per_process(batch_size)
    arrays = self._split(split)
    n = self.num_examples(split)
    rows = np.arange(index, n, count)
    num_batches = -(-(-(-n // count)) // per_process)
    for b in range(num_batches):
      idx = rows[b * per_process:(b + 1) * per_process]
      real = len(idx)
      batch = {}
      for k, v in arrays.items():
        out = np.zeros((per_process,) + v.shape[1:], dtype=v.dtype)
        out[:real] = v[idx]
        batch[k] = out
      weight = np.zeros((per_process,), np.float32)
      weight[:real] = 1.0
      batch["weight"] = weight
      yield batch


def check_arrays(schema: schema_lib.Schema, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Raises ``ValueError`` naming the split, array and what was expected unless ``arrays`` are
  encoded splits of ``schema``: split names among :data:`SPLITS` with ``train`` and
  ``validation``; per split ``categorical`` int [N, Fc] with field i's ids in [0, vocab_size_i],
  ``numeric`` float [N, Fn] finite, ``labels`` and ``label_mask`` float [N, T] (mask 0/1, binary
  labels 0/1 where present), any :data:`EVAL_ONLY_KEYS` float [N, T] finite, and in the training
  split optionally ``weight`` float [N], finite and >= 0."""
  unknown = sorted(set(arrays) - set(SPLITS))
  missing = [s for s in ("train", "validation") if s not in arrays]
  if unknown or missing:
    raise ValueError(f"dataset: splits {sorted(arrays)}; expected 'train', 'validation' and "
                     f"optionally 'test'" + (f" (unknown: {unknown})" if unknown else ""))
  widths = {"categorical": len(schema.categorical), "numeric": len(schema.numeric),
            "labels": schema.num_tasks, "label_mask": schema.num_tasks}
  vocab = np.asarray(schema.vocab_sizes, np.int64)
  binary = np.asarray([t.kind == "binary" for t in schema.tasks])
  for split, split_arrays in arrays.items():
    extra = sorted(set(split_arrays) - set(widths) - set(EVAL_ONLY_KEYS)
                   - ({WEIGHT_KEY} if split == "train" else set()))
    if extra:
      raise ValueError(f"dataset: split {split!r} has arrays {extra} the schema does not use")
    rows = None
    for key, width in widths.items():
      if key not in split_arrays:
        raise ValueError(f"dataset: split {split!r} has no {key!r} array")
      a = np.asarray(split_arrays[key])
      if a.ndim != 2 or a.shape[1] != width or (rows is not None and a.shape[0] != rows):
        raise ValueError(f"dataset: {split}/{key} has shape {a.shape}; expected "
                         f"[{rows if rows is not None else 'N'}, {width}] for the schema's "
                         f"{width} {'fields' if key in ('categorical', 'numeric') else 'tasks'}")
      rows = a.shape[0]
    if rows == 0:
      raise ValueError(f"dataset: split {split!r} is empty")
    categorical = np.asarray(split_arrays["categorical"])
    if categorical.size:
      if not np.issubdtype(categorical.dtype, np.integer):
        raise ValueError(f"dataset: {split}/categorical has dtype {categorical.dtype}; expected "
                         f"integer ids")
      bad = (categorical < 0) | (categorical > vocab)
      if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(f"dataset: {split}/categorical row {row}, field "
                         f"{schema.categorical[col].name!r}: id {categorical[row, col]} outside "
                         f"[0, {vocab[col]}] (vocab_size {vocab[col]}; {vocab[col]} is the OOV id)")
    for key in ("numeric", "labels", "label_mask"):
      a = np.asarray(split_arrays[key])
      if not np.issubdtype(a.dtype, np.floating) and a.size:
        raise ValueError(f"dataset: {split}/{key} has dtype {a.dtype}; expected float")
    if not np.all(np.isfinite(split_arrays["numeric"])):
      row, col = map(int, np.argwhere(~np.isfinite(split_arrays["numeric"]))[0])
      raise ValueError(f"dataset: {split}/numeric row {row}, field {schema.numeric[col].name!r}: "
                       f"{split_arrays['numeric'][row, col]} is not a finite number")
    for key in set(EVAL_ONLY_KEYS) & set(split_arrays):
      a = np.asarray(split_arrays[key])
      if a.shape != (rows, schema.num_tasks) or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"dataset: {split}/{key} has shape {a.shape} and dtype {a.dtype}; "
                         f"expected float [{rows}, {schema.num_tasks}] (a row per example, a "
                         f"column per task)")
      if not np.all(np.isfinite(a)):
        row, col = map(int, np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"dataset: {split}/{key} row {row}, task {schema.tasks[col].name!r}: "
                         f"{a[row, col]} is not a finite number")
    if WEIGHT_KEY in split_arrays:
      weight = np.asarray(split_arrays[WEIGHT_KEY])
      if weight.shape != (rows,) or not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"dataset: {split}/weight has shape {weight.shape} and dtype "
                         f"{weight.dtype}; expected float [{rows}]")
      bad = ~(np.isfinite(weight) & (weight >= 0))
      if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"dataset: {split}/weight row {row}: {weight[row]}; expected a finite "
                         f"number >= 0")
    mask, labels = np.asarray(split_arrays["label_mask"]), np.asarray(split_arrays["labels"])
    if not np.all((mask == 0) | (mask == 1)):
      raise ValueError(f"dataset: {split}/label_mask holds values other than 0 and 1")
    bad = (mask == 1) & ~np.isfinite(labels)
    if bad.any():
      row, col = map(int, np.argwhere(bad)[0])
      raise ValueError(f"dataset: {split}/labels row {row}, task {schema.tasks[col].name!r}: "
                       f"{labels[row, col]} where label_mask says the label is present")
    bad = (mask == 1) & binary[None, :] & (labels != 0) & (labels != 1)
    if bad.any():
      row, col = map(int, np.argwhere(bad)[0])
      raise ValueError(f"dataset: {split}/labels row {row}, task {schema.tasks[col].name!r}: "
                       f"{labels[row, col]} is not a binary label (0 or 1)")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def load_dataset(data_config: Any) -> DatasetSplits:
  """The dataset a config names: ``data.name='spec'`` (a user's files, described by the dataset
  spec ``data.spec``; ``prepare.load_spec_dataset``) or a built-in source registered in
  ``apem_jax/data/sources.py`` ('census_income', 'synthetic_mmoe', 'synthetic_funnel'), which
  reads the rest of ``data``.

  ``data.inconsistent_funnel`` ('error' | 'drop', default 'error'): what to do with rows of a
  source's training split whose later funnel step is positive where an earlier one is negative
  (validation and test are scored as they are; a spec sets it in the spec).

  Raises:
    ValueError: unknown ``data.name``, or a key the dataset does not take or a bad value.
  """
  from apem_jax.data import sources  # pylint: disable=g-import-not-at-top
  name = config_value(data_config, "name", None)
  if name == "spec":
    # Funnel consistency was settled at preparation by the spec's own "inconsistent_funnel"
    # (training rows only), so it is not enforced again here.
    from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
    return prepare.load_spec_dataset(data_config)
  if name not in sources.SOURCES:
    raise ValueError(f"data.name: unknown dataset {name!r}; known: "
                     f"{['spec', *sources.SOURCES]}")
  policy = config_value(data_config, "inconsistent_funnel", None)
  if name not in sources.IN_MEMORY:
    if policy is not None:  # else ignored: the source's files were checked by its spec
      raise ValueError(f"data.inconsistent_funnel: not used by data.name={name!r}, a source of "
                       f"files (its spec's \"inconsistent_funnel\" applies); a source that "
                       f"builds its splits in Python takes it when registered with "
                       f"in_memory=True")
    return sources.SOURCES[name](data_config)
  policy = policy or "error"
  if policy not in INCONSISTENT_FUNNEL_POLICIES:
    raise ValueError(f"data.inconsistent_funnel={policy!r}; expected one of "
                     f"{INCONSISTENT_FUNNEL_POLICIES}")
  splits = sources.SOURCES[name](data_config)
  if splits.schema.has_funnel and "train" in splits.arrays:  # validation and test: as they are
    splits.arrays["train"], dropped = enforce_funnel_consistency(
        splits.arrays["train"], splits.schema, policy, f"dataset {name!r}, split 'train'")
    rows = splits.inconsistent_funnel_rows
    rows["train"] = rows.get("train", 0) + dropped  # (the source may have dropped some itself)
  return splits


# --------------------------------------------------------------------------------------------
# Funnel label consistency
# --------------------------------------------------------------------------------------------

def inconsistent_funnel_rows(labels: np.ndarray, label_mask: np.ndarray,
                             parents: tuple[int, ...]) -> np.ndarray:
  """Rows [N] (bool) where a funnel step is positive while the step it depends on is negative
  (both labels present). ``parents[t]``: the index of task t's parent step, -1 for none."""
  bad = np.zeros(labels.shape[0], dtype=bool)
  for t, parent in enumerate(parents):
    if parent >= 0:
      bad |= ((label_mask[:, t] > 0) & (labels[:, t] > 0)
              & (label_mask[:, parent] > 0) & (labels[:, parent] <= 0))
  return bad


def enforce_funnel_consistency(arrays: Mapping[str, np.ndarray], schema: schema_lib.Schema,
                               policy: str, source: str, setting: str = "data.inconsistent_funnel"
                               ) -> tuple[dict[str, np.ndarray], int]:
  """Checks that no later funnel step is positive where an earlier one is negative.

  Args:
    arrays: one split's arrays (``labels``, ``label_mask``, ...), rows aligned.
    schema: the tasks (``depends_on``).
    policy: ``'error'``: raise, naming ``source``, the first bad row and the count; ``'drop'``:
      return the arrays without the bad rows (and log the count).
    source: where the rows come from (a file, or a dataset and split), for the messages.
    setting: what the messages call the policy (the config key, or a function's argument).

  Returns:
    (arrays, number of rows dropped).
  """
  bad = inconsistent_funnel_rows(arrays["labels"], arrays["label_mask"], schema.parents)
  count = int(bad.sum())
  if count == 0:
    return dict(arrays), 0
  if policy == "error":
    row = int(np.flatnonzero(bad)[0])
    names = schema.task_names
    steps = ", ".join(f"{names[t]}={arrays['labels'][row, t]:g}" for t in range(len(names))
                      if arrays["label_mask"][row, t] > 0)
    raise ValueError(
        f"{source}: {count} of {len(bad)} rows are inconsistent funnels (a step is positive "
        f"where the step it depends on is negative); first at row {row} ({steps}). Fix the data, "
        f"or set {setting}='drop' to drop such rows")
  if policy != "drop":
    raise ValueError(f"{setting}={policy!r}; expected one of {INCONSISTENT_FUNNEL_POLICIES}")
  logging.warning("%s: dropped %d of %d rows with an inconsistent funnel (%s='drop')", source,
                  count, len(bad), setting)
  return {k: v[~bad] for k, v in arrays.items()}, count
