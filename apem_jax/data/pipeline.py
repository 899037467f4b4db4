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

Census encoded arrays are cached in ``<data_dir>/census_income/encoded_<hash>.npz`` (hash of the
settings that change them), so only the first run pays for TFDS preparation.

TensorFlow and TFDS are imported lazily (importing this package is cheap and leaves TF alone),
and ``jax.process_*`` is only called inside the batch methods, so ``XLA_FLAGS`` set by the caller
before its first JAX device use still apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from apem_jax import schema as schema_lib
from apem_jax.data import census_source
from apem_jax.data import preprocessing as prep_lib
from apem_jax.data import synthetic
from apem_jax.data import synthetic_funnel

SPLITS = ("train", "validation", "test")
DATASETS = ("census_income", "synthetic_mmoe", "synthetic_funnel", "spec")
# Arrays evaluation reads but training batches leave out: the true conditional probabilities of
# synthetic funnels (for oracle metrics).
EVAL_ONLY_KEYS = ("true_q",)
INCONSISTENT_FUNNEL_POLICIES = ("error", "drop")
# Bump when the encoded arrays change for the same config (invalidates the .npz caches).
ENCODING_VERSION = 3
CENSUS_TFDS_VERSION = "1.1.0"

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
    preprocessing: the fitted Preprocessing (None for synthetic data).
    arrays: ``{split: {'categorical', 'numeric', 'labels', 'label_mask'}}`` (unpadded); synthetic
      funnels add ``true_q`` [N, T], the true conditional step probabilities (evaluation only).
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

  def train_batches(self, batch_size: int, seed: int, skip: int = 0) -> Iterator[Batch]:
    """Infinite iterator of this process's training batches of ``batch_size // process_count``.

    Same seed -> same sequence. Each epoch is a fresh permutation of this process's shard, cut
    into full batches (the remainder is dropped; epochs do not mix). ``skip``: start at that
    batch of the sequence (a resumed run's position; only row indices are skipped, no rows read).
    """
    per_process, count, index = self._per_process(batch_size)
    arrays = self._split("train")
    n = self.num_examples("train")
    shard = np.arange(index, n, count, dtype=np.int64)
    if len(shard) < per_process:
      raise ValueError(f"train split has {len(shard)} rows on this process, fewer than one "
                       f"batch of {per_process}")
    tf = _import_tf()
    tensors = {k: tf.constant(v) for k, v in arrays.items() if k not in EVAL_ONLY_KEYS}
    shard_rows = tf.constant(shard)
    batches_per_epoch = len(shard) // per_process

    def epoch_batches(epoch):
      # One permutation per epoch, drawn in a single op and cut into batches of row indices:
      # per-row shuffling in tf.data costs more than the step of a small model.
      perm = tf.random.experimental.stateless_shuffle(
          shard_rows, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
      rows = tf.reshape(perm[:batches_per_epoch * per_process], [batches_per_epoch, per_process])
      return tf.data.Dataset.from_tensor_slices(rows)

    def gather(indices):
      batch = {k: tf.gather(t, indices) for k, t in tensors.items()}
      batch["weight"] = tf.ones(tf.shape(indices), tf.float32)
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
  labels 0/1 where present), and any :data:`EVAL_ONLY_KEYS` with N rows."""
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
    extra = sorted(set(split_arrays) - set(widths) - set(EVAL_ONLY_KEYS))
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

def _get(config: Any, key: str, default: Any) -> Any:
  if config is None:
    return default
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value


def load_dataset(data_config: Any) -> DatasetSplits:
  """Loads, encodes (or reads from cache) and returns the dataset a config names.

  Args:
    data_config: an ``ml_collections.ConfigDict`` (or mapping) with ``name``
      ('census_income' | 'synthetic_mmoe' | 'synthetic_funnel'), ``data_dir`` (default 'data'),
      ``task_group`` (census: 'income_marital' | 'education_marital'), ``numeric_transform``
      ('none' | 'log1p', default 'log1p'), ``min_count`` (default 1) and, for synthetic data,
      ``synthetic`` (input_dim, scale, correlation, num_sines, alpha, beta, noise_std,
      num_examples, seed); for synthetic funnels ``funnel`` (``synthetic_funnel.DEFAULTS``).
      ``inconsistent_funnel`` ('error' | 'drop', default 'error'): what to do with rows of a funnel
      schema whose later step is positive where an earlier one is negative.

  Raises:
    ValueError: unknown ``data.name``, ``data.task_group`` or ``data.numeric_transform``.
  """
  name = _get(data_config, "name", None)
  policy = _get(data_config, "inconsistent_funnel", "error")
  if policy not in INCONSISTENT_FUNNEL_POLICIES:
    raise ValueError(f"data.inconsistent_funnel={policy!r}; expected one of "
                     f"{INCONSISTENT_FUNNEL_POLICIES}")
  if name == "census_income":
    splits = _load_census(data_config)
    source = str(pathlib.Path(_get(data_config, "data_dir", "data")) / "census_income")
  elif name == "synthetic_mmoe":
    splits = _load_synthetic(data_config)
    source = "dataset 'synthetic_mmoe'"
  elif name == "synthetic_funnel":
    splits = _load_synthetic_funnel(data_config)
    source = "dataset 'synthetic_funnel'"
  elif name == "spec":
    # A user's own files, described by a dataset spec (data/spec.py), prepared once into
    # <data_dir>/prepared/ (data/prepare.py). Funnel consistency was settled at preparation by
    # the spec's own "inconsistent_funnel" (training rows only), so it is not enforced again here.
    from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
    return prepare.load_spec_dataset(data_config)
  else:
    raise ValueError(f"data.name: unknown dataset {name!r}; known: {list(DATASETS)}")
  if splits.schema.has_funnel:
    for split in list(splits.arrays):
      splits.arrays[split], dropped = enforce_funnel_consistency(
          splits.arrays[split], splits.schema, policy, f"{source}, split {split!r}")
      splits.inconsistent_funnel_rows[split] = dropped
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
                               policy: str, source: str) -> tuple[dict[str, np.ndarray], int]:
  """Checks that no later funnel step is positive where an earlier one is negative.

  Args:
    arrays: one split's arrays (``labels``, ``label_mask``, ...), rows aligned.
    schema: the tasks (``depends_on``).
    policy: ``'error'``: raise, naming ``source``, the first bad row and the count; ``'drop'``:
      return the arrays without the bad rows (and log the count).
    source: where the rows come from (a file, or a dataset and split), for the messages.

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
        f"or set data.inconsistent_funnel='drop' to drop such rows")
  if policy != "drop":
    raise ValueError(f"data.inconsistent_funnel={policy!r}; expected one of "
                     f"{INCONSISTENT_FUNNEL_POLICIES}")
  logging.warning("%s: dropped %d of %d rows with an inconsistent funnel "
                  "(data.inconsistent_funnel='drop')", source, count, len(bad))
  return {k: v[~bad] for k, v in arrays.items()}, count


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------

def _load_synthetic(data_config: Any) -> DatasetSplits:
  sub = _get(data_config, "synthetic", None)
  kwargs = {}
  for key, default in synthetic.DEFAULTS.items():
    value = _get(sub, key, default)
    kwargs[key] = list(value) if key in ("alpha", "beta") and value is not None else value
  unknown = sorted(set(sub.keys() if sub is not None and hasattr(sub, "keys") else ())
                   - set(synthetic.DEFAULTS))
  if unknown:
    raise ValueError(f"data.synthetic: unknown keys {unknown}; known: {sorted(synthetic.DEFAULTS)}")
  task_kind = kwargs.pop("task_kind")
  if task_kind not in synthetic.TASK_KINDS:
    raise ValueError(f"data.synthetic.task_kind={task_kind!r}; expected one of {synthetic.TASK_KINDS}")
  data = synthetic.generate(**kwargs)
  if task_kind == "binary":
    data["labels"] = synthetic.binarize(data["labels"])
  data["label_mask"] = np.ones_like(data["labels"])
  data["categorical"] = np.zeros((len(data["labels"]), 0), np.int32)
  schema = schema_lib.Schema(
      categorical=(),
      numeric=tuple(schema_lib.NumericField(f"x{i}") for i in range(kwargs["input_dim"])),
      tasks=tuple(schema_lib.Task(t, task_kind) for t in synthetic.TASK_NAMES))
  return DatasetSplits(schema, None, synthetic.split(data))


def _load_synthetic_funnel(data_config: Any) -> DatasetSplits:
  sub = _get(data_config, "funnel", None)
  given = set(sub.keys() if sub is not None and hasattr(sub, "keys") else ())
  unknown = sorted(given - set(synthetic_funnel.DEFAULTS))
  if unknown:
    raise ValueError(f"data.funnel: unknown keys {unknown}; known: "
                     f"{sorted(synthetic_funnel.DEFAULTS)}")
  kwargs = {k: _get(sub, k, d) for k, d in synthetic_funnel.DEFAULTS.items()}
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
  start = time.perf_counter()
  data = synthetic_funnel.generate(**kwargs)
  logging.info("synthetic_funnel: %d examples generated in %.1f s", kwargs["num_examples"],
               time.perf_counter() - start)
  data["label_mask"] = np.ones_like(data["labels"])
  steps = synthetic_funnel.STEP_NAMES[:kwargs["num_steps"]]
  schema = schema_lib.Schema(
      categorical=tuple(schema_lib.CategoricalField(n, v) for n, v in zip(
          synthetic_funnel.CATEGORICAL_FIELDS, synthetic_funnel.vocab_sizes(
              kwargs["num_users"], kwargs["num_items"], kwargs["num_categories"]))),
      numeric=tuple(schema_lib.NumericField(n) for n in synthetic_funnel.NUMERIC_FIELDS),
      tasks=tuple(schema_lib.Task(t, "binary", depends_on=steps[i - 1] if i else None)
                  for i, t in enumerate(steps)))
  return DatasetSplits(schema, None, synthetic.split(data))


# --------------------------------------------------------------------------------------------
# Census-Income
# --------------------------------------------------------------------------------------------

def census_cache_key(task_group: str, numeric_transform: str, min_count: int,
                     numeric_buckets: int = 0) -> str:
  settings = dict(encoding=ENCODING_VERSION, tfds=CENSUS_TFDS_VERSION, task_group=task_group,
                  numeric_transform=numeric_transform, min_count=int(min_count),
                  numeric_buckets=int(numeric_buckets), split_seed=census_source.SPLIT_SEED)
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def read_census_tfds(data_dir: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """Prepares (first time) the TFDS dataset in ``<data_dir>/tfds`` and reads all splits."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _import_tf()
  from apem_jax.data import census_tfds  # pylint: disable=g-import-not-at-top
  builder = census_tfds.CensusIncomeKdd(data_dir=os.fspath(pathlib.Path(data_dir) / "tfds"),
                                        raw_data_dir=data_dir)
  start = time.perf_counter()
  builder.download_and_prepare(download_config=census_tfds.download_config())
  logging.info("census_income TFDS ready in %.1f s", time.perf_counter() - start)
  return {split: census_tfds.read_split(builder, split) for split in SPLITS}


def _census_schema(preprocessing: prep_lib.Preprocessing, tasks: tuple[str, ...]
                   ) -> schema_lib.Schema:
  return schema_lib.Schema(
      categorical=tuple(schema_lib.CategoricalField(n, v) for n, v in
                        zip(preprocessing.categorical_fields, preprocessing.vocab_sizes)),
      numeric=tuple(schema_lib.NumericField(n, b) for n, b in zip(
          preprocessing.numeric_fields,
          preprocessing.bucket_boundaries or ((),) * len(preprocessing.numeric_fields))),
      tasks=tuple(schema_lib.Task(t, "binary") for t in tasks))


def encode_census(raw: Mapping[str, Mapping[str, np.ndarray]], task_group: str,
                  numeric_transform: str = "log1p", min_count: int = 1, numeric_buckets: int = 0
                  ) -> tuple[prep_lib.Preprocessing, dict[str, dict[str, np.ndarray]]]:
  """Fits preprocessing on ``raw['train']`` and encodes every split of raw columns."""
  tasks = census_source.task_names(task_group)
  categorical, numeric = census_source.feature_columns(task_group)
  preprocessing = prep_lib.fit_preprocessing(raw["train"], categorical, numeric,
                                             numeric_transform=numeric_transform,
                                             min_count=min_count,
                                             numeric_buckets=numeric_buckets)
  arrays = {}
  for split, columns in raw.items():
    encoded = prep_lib.encode(columns, preprocessing)
    labels = np.stack([np.asarray(columns[census_source.label_key(t)], np.float32)
                       for t in tasks], axis=-1)
    arrays[split] = dict(encoded, labels=labels, label_mask=np.ones_like(labels))
  return preprocessing, arrays


def _save_npz_atomic(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _load_census(data_config: Any) -> DatasetSplits:
  data_dir = pathlib.Path(_get(data_config, "data_dir", "data"))
  task_group = _get(data_config, "task_group", "income_marital")
  tasks = census_source.task_names(task_group)  # validates the group
  numeric_transform = _get(data_config, "numeric_transform", "log1p")
  if numeric_transform not in prep_lib.NUMERIC_TRANSFORMS:
    raise ValueError(f"data.numeric_transform: unknown {numeric_transform!r}; "
                     f"known: {list(prep_lib.NUMERIC_TRANSFORMS)}")
  min_count = int(_get(data_config, "min_count", 1))
  if min_count < 1:
    raise ValueError(f"data.min_count must be >= 1, got {min_count}")
  numeric_buckets = int(_get(data_config, "numeric_buckets", 0))
  if numeric_buckets < 0:
    raise ValueError(f"data.numeric_buckets must be >= 0, got {numeric_buckets}")

  cache = data_dir / "census_income" / (
      f"encoded_{census_cache_key(task_group, numeric_transform, min_count, numeric_buckets)}.npz")
  if cache.exists():
    with np.load(cache, allow_pickle=False) as f:
      preprocessing = prep_lib.Preprocessing.from_json(str(f["preprocessing_json"]))
      arrays = {s: {k: f[f"{s}.{k}"] for k in ("categorical", "numeric", "labels",
                                                 "label_mask")} for s in SPLITS}
  else:
    start = time.perf_counter()
    raw = read_census_tfds(data_dir)
    preprocessing, arrays = encode_census(raw, task_group, numeric_transform, min_count,
                                          numeric_buckets)
    flat = {f"{s}.{k}": v for s, d in arrays.items() for k, v in d.items()}
    flat["preprocessing_json"] = np.array(preprocessing.to_json())
    _save_npz_atomic(cache, flat)
    logging.info("census_income encoded and cached in %.1f s: %s",
                 time.perf_counter() - start, cache)
  return DatasetSplits(_census_schema(preprocessing, tasks), preprocessing, arrays)
