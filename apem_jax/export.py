"""Export a trained checkpoint for serving: a TensorFlow SavedModel and a StableHLO artifact.

Besides :mod:`apem_jax.data`, this is the one module that imports TensorFlow (for ``jax2tf`` and
the SavedModel format); the in-graph raw-feature preprocessing itself lives in
:mod:`apem_jax.data.serving`, and checkpoints are read through :mod:`apem_jax.checkpointing`.

``export(workdir, output)`` restores the parameters of a checkpoint of a training workdir (the
best one unless told otherwise) onto one device, whatever mesh trained them, with the config and
schema stored in the checkpoint, the model from the registry and the preprocessing of
``<workdir>/preprocessing.json``: it reads neither the dataset nor the optimizer state. It
writes ``output/``:

* ``saved_model/``: a TensorFlow SavedModel (``jax2tf``, native serialization) whose
  ``serving_default`` signature takes every raw feature by name, ``tf.string [None]`` for
  categorical fields and ``tf.float32 [None]`` for numeric ones, any batch size of at least 1,
  and returns ``float32 [None]`` per task by name: the probability of a binary task, the value of a
  regression task. Vocabulary lookup (unseen values -> OOV id) or hashing, the numeric
  transforms, normalisation and missing-value policies (a missing numeric value is sent as NaN, a
  missing categorical one as ``""``; missing-value indicator fields are computed, not inputs) run
  in the graph (:class:`apem_jax.data.serving.RawFeatureEncoder`). Data without preprocessing
  (synthetic) takes its numeric features as they are (already normalised).
* ``model.stablehlo``: ``jax.export`` serialization of the model on preprocessed inputs,
  ``(categorical int32 [b, Fc], numeric float32 [b, Fn]) -> predictions float32 [b, T]`` with a
  symbolic batch dimension ``b`` (load with ``jax.export.deserialize``, call ``.call``).
* ``metadata.json``: schema, tasks, config, checkpoint step and validation metrics, signatures,
  the results of the export checks, and library versions.
* ``preprocessing.json`` (when the data has preprocessing): vocabularies and statistics.

Before the export is put in place, both artifacts are reloaded (the SavedModel in TensorFlow, the
StableHLO artifact in JAX) and run on validation rows that training stored in
``<workdir>/validation_sample.npz`` (the first row made all-unseen); the export fails if either
differs from the JAX model by more than ``TOLERANCE`` on any prediction (absolute up to 1, as
probabilities are; relative beyond: float32's spacing is already 1.5e-5 at a regression value
of 150).
The SavedModel needs raw values: the data package keeps only encoded arrays, so they are
rebuilt with :func:`apem_jax.data.serving.decode` (ids -> vocabulary strings, OOV ids -> a string
in no vocabulary, hashed ids -> some string, numeric values un-normalised and un-transformed, an
indicator's 1 -> NaN), the first row's numeric values of every feature that accepts missing
values are made missing (NaN), and the JAX reference for the SavedModel is the model on those
raw values encoded by :func:`apem_jax.data.encode`.

Everything is written to a temporary directory next to ``output`` and renamed into place only
when complete and checked: a failed export leaves nothing behind.

Command line (``apem-export`` or ``python -m apem_jax.export_main``): see :mod:`apem_jax.export_main`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import jax2tf

from apem_jax import checkpointing, config_validation, losses, parallel, reporting, trainer
from apem_jax.data import encode as encode_raw
from apem_jax.data import files as files_lib
from apem_jax.data import Preprocessing
from apem_jax.data import serving
from apem_jax.schema import Schema

tf = serving.tf  # TensorFlow as the data package configured it (quiet, no GPUs).

SAVED_MODEL_DIR = "saved_model"
STABLEHLO_FILE = "model.stablehlo"
METADATA_FILE = "metadata.json"
PREPROCESSING_FILE = "preprocessing.json"
SIGNATURE = "serving_default"
TOLERANCE = 1e-5  # of |a - b| / max(1, |b|)
FORMAT_VERSION = 1


class ExportCheckError(RuntimeError):
  """A reloaded artifact does not reproduce the JAX model's predictions."""


@dataclasses.dataclass
class Run:
  """A restored checkpoint: what an export needs, and nothing of training (no dataset, optimizer
  state or training mesh)."""

  config: ml_collections.ConfigDict
  meta: dict
  kind: str
  step: int
  schema: Schema
  model: Any
  head: losses.TaskHead
  params: Any  # host numpy arrays
  preprocessing: Preprocessing | None
  sample: dict[str, np.ndarray]  # validation rows' model inputs, stored at training time


# --------------------------------------------------------------------------------------------
# Restoring
# --------------------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
  """``base`` with ``over``'s values written over it, recursively."""
  out = dict(base)
  for key, value in over.items():
    out[key] = (_merge(base[key], value) if isinstance(value, dict)
                and isinstance(base.get(key), dict) else value)
  return out


def _run_config(workdir: str, kind: str, step: int, saved: dict | None,
                config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The checkpoint's config, checked against ``<workdir>/config.json`` and ``config``."""
  config_path = os.path.join(workdir, "config.json")
  on_disk = None
  if os.path.exists(config_path):
    with open(config_path) as f:
      on_disk = json.load(f)
  if saved is None:
    if on_disk is None:
      raise ValueError(f"{workdir}: the {kind} checkpoint (step {step}) holds no config and "
                       f"there is no config.json")
    saved = on_disk
  elif on_disk is not None:
    diff = config_validation.model_data_diff(saved, on_disk)
    if diff:
      raise ValueError(f"{workdir}: config.json does not match the config of the {kind} "
                       f"checkpoint (step {step}); differing keys: {diff}")
  if config is not None:
    given = config.to_dict()
    diff = config_validation.model_data_diff(saved, given)
    if diff:
      raise ValueError(f"{workdir}: the {kind} checkpoint (step {step}) was trained with a "
                       f"different config than the one given; differing keys: {diff}")
    # The checkpoint's values win; the given config fills keys that this version of the code
    # requires and an older run's config lacks.
    saved = _merge(given, saved)
  run_config = ml_collections.ConfigDict(saved)
  try:
    config_validation.validate(run_config)
  except ValueError as e:
    if "missing required key" not in str(e) or config is not None:
      raise
    raise ValueError(f"{workdir}: the {kind} checkpoint's config lacks a key this version "
                     f"requires ({e}); pass --config with the run's config file to fill it "
                     f"in") from e
  return run_config


def restore_run(workdir: str, kind: str = checkpointing.BEST, step: int | None = None,
                config: ml_collections.ConfigDict | None = None) -> Run:
  """Restores the parameters of a checkpoint of ``workdir`` with the config it was trained with,
  onto this process's first device, whatever mesh trained them.

  Args:
    workdir: a training workdir.
    kind: ``'best'`` (the best evaluated checkpoint) or ``'latest'``.
    step: a specific checkpoint step (default: the one ``kind`` names); the run's kind is then
      ``'step'``, and its meta's ``best_step``/``best_score`` are the workdir's best now.
    config: optional; must agree with the checkpoint's config on every ``model.*`` and ``data.*``
      key (``data.data_dir`` aside). It also fills in keys the checkpoint's config lacks (a run
      trained before this version of the code required them).

  Raises:
    FileNotFoundError: no such workdir, checkpoint, or stored validation sample.
    ValueError: the checkpoint, ``<workdir>/config.json``, ``config`` or the stored
      preprocessing disagree.
  """
  if kind not in checkpointing.KINDS:
    raise ValueError(f"checkpoint must be one of {checkpointing.KINDS}, got {kind!r}")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  try:
    resolved = ckpt.step_of(kind, step)
    if resolved is None:
      steps = ckpt.steps()
      hint = (f"; it has unevaluated checkpoints {steps} (--checkpoint latest)" if steps else
              f"; train first (train.py --workdir {workdir})")
      raise FileNotFoundError(f"{workdir}: no {kind} checkpoint under {ckpt.directory}{hint}")
    meta = ckpt.restore_meta(step=resolved)
    run_config = _run_config(workdir, kind, resolved, meta.get("config"), config)
    schema = Schema.from_dict(meta["schema"])
    model = trainer.stored_model(run_config, schema)
    params, meta = ckpt.restore_params(trainer.abstract_params(model, schema), step=resolved)
    if step is not None:  # a checkpoint by its step: the run's best is the one named now
      kind, best = "step", ckpt.step_of(checkpointing.BEST)
      best_meta = ckpt.restore_meta(step=best) if best is not None else {}
      meta = dict(meta, best_step=best_meta.get("best_step"),
                  best_score=best_meta.get("best_score"))
  finally:
    ckpt.close()
  if isinstance(model, parallel.RowPaddedModel):  # serve the tables without their padding rows
    model, params = model.model, model.unpad(params)
  return Run(run_config, meta, kind, resolved, schema, model,
             trainer.task_head(run_config, schema, model), jax.device_get(params),
             _run_preprocessing(workdir, schema), _validation_sample(workdir, schema))


def _run_preprocessing(workdir: str, schema: Schema) -> Preprocessing | None:
  """``<workdir>/preprocessing.json`` (None for data without preprocessing), checked against the
  checkpoint's schema."""
  path = os.path.join(workdir, PREPROCESSING_FILE)
  if not os.path.exists(path):
    if schema.categorical:
      raise FileNotFoundError(
          f"{path} is missing: the run's vocabularies are needed to serve raw categorical values "
          f"(data prepared by an older version for a spec with hashed features, missing-value "
          f"indicators or different numeric transforms had none: delete that prepared "
          f"directory, prepare again (apem-data prepare) and copy its {PREPROCESSING_FILE} "
          f"here; preparation is deterministic)")
    return None
  with open(path) as f:
    prep = Preprocessing.from_json(f.read())
  if (prep.column_names != tuple(f.name for f in schema.categorical)
      or prep.numeric_fields != tuple(f.name for f in schema.numeric)
      or prep.column_vocab_sizes != schema.vocab_sizes):
    raise ValueError(f"{path} does not match the checkpoint's schema (fields or vocabulary "
                     f"sizes)")
  return prep


def _validation_sample(workdir: str, schema: Schema) -> dict[str, np.ndarray]:
  path = os.path.join(workdir, trainer.VALIDATION_SAMPLE_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: the export checks run on the validation rows "
                            f"training stores there; rerun train.py --workdir {workdir} with the "
                            f"run's config (it resumes and writes the file)")
  sample = reporting.read_npz(path)
  widths = {"categorical": len(schema.categorical), "numeric": len(schema.numeric)}
  if any(sample[k].ndim != 2 or sample[k].shape[1] != w for k, w in widths.items()):
    raise ValueError(f"{path} does not hold rows of the checkpoint's schema (expected "
                     f"categorical [n, {widths['categorical']}], numeric [n, {widths['numeric']}])")
  return sample


# --------------------------------------------------------------------------------------------
# The exported functions
# --------------------------------------------------------------------------------------------

def predict_fn(run: Run) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """``predict(params, categorical [b, Fc], numeric [b, Fn]) -> predictions [b, T]`` (funnel
  steps: entire-space probabilities ``p_t``, as evaluation reports them)."""
  model, schema, head = run.model, run.schema, run.head

  def predict(params, categorical, numeric):
    out = model.apply({"params": params}, {"categorical": categorical, "numeric": numeric},
                      train=False)
    return losses.task_predictions(out["logits"], schema, head)
  return predict


def export_stablehlo(run: Run, platforms: Sequence[str]) -> jax.export.Exported:
  """The model with its parameters as constants, on preprocessed inputs, batch dim ``b``."""
  predict, params = predict_fn(run), run.params
  b, = jax.export.symbolic_shape("b")
  specs = (jax.ShapeDtypeStruct((b, len(run.schema.categorical)), jnp.int32),
           jax.ShapeDtypeStruct((b, len(run.schema.numeric)), jnp.float32))
  fn = jax.jit(lambda categorical, numeric: predict(params, categorical, numeric))
  return jax.export.export(fn, platforms=tuple(platforms))(*specs)


def build_saved_model(run: Run, platforms: Sequence[str]) -> tf.Module:
  """A ``tf.Module`` (parameters as variables, vocabulary tables, ``serve`` function)."""
  schema = run.schema
  if schema.categorical and run.preprocessing is None:
    raise ValueError("the data has categorical fields but no preprocessing (vocabularies): "
                     "cannot build a raw-feature signature")
  encoder = serving.RawFeatureEncoder(run.preprocessing,
                                      numeric_fields=[f.name for f in schema.numeric])
  tf_predict = jax2tf.convert(
      predict_fn(run), polymorphic_shapes=[None, "(b, _)", "(b, _)"], with_gradient=False,
      native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.encoder = encoder
  module.params = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), run.params)
  task_names = schema.task_names

  @tf.function(input_signature=[encoder.input_specs()], autograph=False)
  def serve(features):
    inputs = encoder(features)
    predictions = tf_predict(module.params, inputs["categorical"], inputs["numeric"])
    return {name: predictions[:, i] for i, name in enumerate(task_names)}

  module.serve = serve
  return module


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _vocabulary_columns(run: Run) -> np.ndarray:
  """Indices of the ``categorical`` columns looked up in a vocabulary (all of them without
  preprocessing; not hashed fields, not missing-value indicators)."""
  prep = run.preprocessing
  if prep is None:
    return np.arange(len(run.schema.categorical))
  return np.asarray([c for c, hashed in zip(prep.categorical_positions, prep.hashed)
                     if not hashed], np.int64)


def check_examples(run: Run, num_examples: int) -> dict[str, np.ndarray]:
  """Encoded validation rows (the first ``num_examples`` of the run's stored sample); the first
  row made OOV in every vocabulary field."""
  arrays = run.sample
  n = min(num_examples, len(arrays["numeric"]))
  categorical = np.array(arrays["categorical"][:n], np.int32)
  numeric = np.array(arrays["numeric"][:n], np.float32)
  columns = _vocabulary_columns(run)
  if n and len(columns):
    categorical[0, columns] = np.asarray(run.schema.vocab_sizes, np.int32)[columns]  # unseen
  return {"categorical": categorical, "numeric": numeric}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
  """The largest ``|a - b| / max(1, |b|)``: the absolute difference of probabilities, the
  relative one of regression values beyond 1 (float32 keeps about 7 digits of either)."""
  if a.shape != b.shape:
    raise ExportCheckError(f"output shape {a.shape} != expected {b.shape}")
  scale = np.maximum(1.0, np.abs(b))
  return float(np.max(np.abs(a - b) / scale)) if a.size else 0.0


def check_export(run: Run, directory: str, num_examples: int) -> dict:
  """Reloads both artifacts from ``directory`` and compares them with the JAX model.

  Raises:
    ExportCheckError: an artifact's predictions differ by more than ``TOLERANCE``.
  """
  examples = check_examples(run, num_examples)
  n = len(examples["numeric"])
  if n == 0:
    raise ExportCheckError("the validation split is empty: nothing to check the export on")
  predict = jax.jit(predict_fn(run))
  params = run.params
  reference = np.asarray(predict(params, examples["categorical"], examples["numeric"]))

  # StableHLO, on the encoded arrays.
  with open(os.path.join(directory, STABLEHLO_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  out = np.asarray(exported.call(examples["categorical"], examples["numeric"]))
  hlo_diff = _max_diff(out, reference)

  # SavedModel, on raw values.
  if run.preprocessing is not None:
    prep = run.preprocessing
    raw = serving.decode(examples["categorical"], examples["numeric"], prep)
    for name, policy in zip(prep.numeric_fields, prep.numeric_missing):
      if policy != "error":
        raw[name][0] = np.nan  # served missing: filled, or the mean and its indicator
    encoded = encode_raw(raw, prep)
    columns = _vocabulary_columns(run)
    if not np.array_equal(encoded["categorical"][:, columns], examples["categorical"][:, columns]):
      raise ExportCheckError("decoded categorical values do not encode back to their ids")
    raw_reference = np.asarray(predict(params, encoded["categorical"], encoded["numeric"]))
  else:
    raw = {f.name: examples["numeric"][:, j] for j, f in enumerate(run.schema.numeric)}
    raw_reference = reference
  signature = tf.saved_model.load(os.path.join(directory, SAVED_MODEL_DIR)).signatures[SIGNATURE]
  out = signature(**{k: tf.constant(v) for k, v in raw.items()})
  if sorted(out) != sorted(run.schema.task_names):
    raise ExportCheckError(f"SavedModel outputs {sorted(out)} != tasks "
                           f"{sorted(run.schema.task_names)}")
  got = np.stack([out[t].numpy() for t in run.schema.task_names], axis=-1)
  sm_diff = _max_diff(got, raw_reference)

  result = {"examples": n, "tolerance": TOLERANCE,
            "max_diff_stablehlo": hlo_diff, "max_diff_saved_model": sm_diff,
            "raw_values": "decoded from encoded validation rows (row 0: every categorical "
                          "vocabulary field unseen, every numeric field that accepts missing "
                          "values missing)" if run.preprocessing is not None else
                          "normalised numeric validation rows"}
  for name, diff in (("StableHLO artifact", hlo_diff), ("SavedModel", sm_diff)):
    if not diff <= TOLERANCE:
      raise ExportCheckError(f"the reloaded {name} differs from the JAX model by {diff:.3g} "
                             f"(> {TOLERANCE}) on {n} validation examples")
  return result


# --------------------------------------------------------------------------------------------
# Metadata and the export itself
# --------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
  out = {"jax": jax.__version__, "tensorflow": tf.__version__, "numpy": np.__version__}
  for dist in ("jaxlib", "flax", "orbax-checkpoint", "apem-jax"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def missing_values_text(prep: Preprocessing) -> dict[str, str]:
  """How a client sends a missing value to the SavedModel, per kind of feature (metadata.json's
  ``saved_model.missing_values``): NaN, or a number-like token a numeric field reads as missing,
  and ``""``, or a categorical token read as missing."""
  markers = {name: list(m) for name, m in zip(prep.numeric_fields, prep.numeric_missing_values)
             if m}
  numeric = (f"send {serving.MISSING_NUMERIC}" +
             (f" (or, for {', '.join(markers)}, one of {sorted(set().union(*markers.values()))})"
              if markers else "") +
             ": a feature with missing 'fill' gets its fill value, one with 'indicator' the "
             "training mean and 1 in its indicator field; one with 'error' fails the call")
  categorical = ("send the empty string (what preparation reads a missing value as)" +
                 (f" or one of {list(prep.missing_values)}"
                  if set(prep.missing_values) - {""} else "") +
                 (f"; a feature with missing 'error' fails the call on one of "
                  f"{list(prep.missing_values)}"
                  if prep.missing_values and "error" in prep.categorical_missing else ""))
  return {"numeric": numeric, "categorical": categorical}


def metadata(run: Run, exported: jax.export.Exported, platforms: Sequence[str],
             checks: dict) -> dict:
  schema, prep = run.schema, run.preprocessing
  fields, indicators = [], []
  if prep is None:
    for f in schema.categorical:  # (not reached: export needs preprocessing for these)
      fields.append({"name": f.name, "type": "categorical", "dtype": "string",
                     "vocab_size": f.vocab_size, "oov_id": f.oov_id})
  else:
    for name, buckets, c, policy in zip(prep.categorical_fields, prep.num_buckets,
                                        prep.categorical_positions, prep.categorical_missing):
      f = schema.categorical[c]
      entry = {"name": name, "type": "categorical", "dtype": "string", "column": c,
               "vocab_size": f.vocab_size, "oov_id": f.oov_id, "missing": policy}
      entry.update({"encoding": "hash", "num_buckets": buckets,
                    "hash": "farmhash64 % num_buckets (tf.strings.to_hash_bucket_fast)"}
                   if buckets else {"encoding": "vocabulary"})
      fields.append(entry)
    for j, c in enumerate(prep.indicator_columns):
      if c >= 0:
        indicators.append({"name": schema.categorical[c].name, "column": c,
                           "of": prep.numeric_fields[j], "ids": {"present": 0, "missing": 1}})
  for j, f in enumerate(schema.numeric):
    entry = {"name": f.name, "type": "numeric", "dtype": "float32"}
    if prep is not None:
      policy = prep.numeric_missing[j]
      entry.update(transform=prep.numeric_transforms[j], mean=prep.means[j], std=prep.stds[j],
                   missing=policy)
      if prep.numeric_missing_values[j]:
        entry["missing_values"] = list(prep.numeric_missing_values[j])
      if policy == "fill":
        entry["fill"] = prep.numeric_fills[j]
      elif policy == "indicator":
        entry["indicator"] = schema.categorical[prep.indicator_columns[j]].name
    else:
      entry.update(transform="given already normalised")
    fields.append(entry)
  meta = run.meta
  return {
      "format_version": FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "checkpoint": {"kind": run.kind, "step": run.step, "epoch": meta.get("epoch"),
                     "validation": meta.get("validation"), "score": meta.get("score"),
                     "best_step": meta.get("best_step"), "best_score": meta.get("best_score")},
      "fields": fields,
      "indicators": indicators,
      "tasks": [{"name": t.name, "kind": t.kind, "depends_on": t.depends_on,
                 "output": "probability" if t.kind == "binary" else "value"}
                for t in schema.tasks],
      "schema": schema.to_dict(),
      "config": run.config.to_dict(),
      "saved_model": {
          "path": SAVED_MODEL_DIR, "tag": "serve", "signature": SIGNATURE,
          "inputs": {f["name"]: {"dtype": f["dtype"], "shape": [None]} for f in fields},
          "missing_values": missing_values_text(prep) if prep is not None else None,
          "outputs": {t.name: {"dtype": "float32", "shape": [None]} for t in schema.tasks},
          "platforms": list(platforms),
          "preprocessing": PREPROCESSING_FILE if prep is not None else None},
      "stablehlo": {
          "path": STABLEHLO_FILE,
          "inputs": [{"name": "categorical", "dtype": "int32",
                      "shape": ["b", len(schema.categorical)]},
                     {"name": "numeric", "dtype": "float32", "shape": ["b", len(schema.numeric)]}],
          "outputs": [{"name": "predictions", "dtype": "float32",
                       "shape": ["b", schema.num_tasks], "columns": list(schema.task_names)}],
          "platforms": list(exported.platforms),
          "calling_convention_version": exported.calling_convention_version},
      "checks": checks,
      "versions": _versions(),
  }


def is_export(directory: str) -> bool:
  """Whether ``directory`` holds an export: its SavedModel directory and its metadata (a
  ``metadata.json`` alone is not one: a prepared dataset has one too)."""
  return (os.path.isdir(os.path.join(directory, SAVED_MODEL_DIR))
          and os.path.isfile(os.path.join(directory, METADATA_FILE)))


def _check_output(output: str, overwrite: bool) -> None:
  if not os.path.lexists(output):
    return
  if not os.path.isdir(output) or os.path.islink(output):
    raise FileExistsError(f"--output {output} exists and is not a directory")
  if not os.listdir(output):
    return
  if not is_export(output):
    raise FileExistsError(f"--output {output} is a non-empty directory that holds no export; "
                          f"refusing to replace it (choose another --output)")
  if not overwrite:
    raise FileExistsError(f"--output {output} already holds an export; pass --overwrite to "
                          f"replace it")


def _put_in_place(tmp: str, output: str) -> None:
  """Renames the finished ``tmp`` to ``output``, replacing an existing export there."""
  if os.path.isdir(output) and os.listdir(output):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output))
    os.rmdir(old)
    os.rename(output, old)
    try:
      os.rename(tmp, output)
    except BaseException:
      os.rename(old, output)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, output)  # output absent or an empty directory


def export(workdir: str, output: str, *, checkpoint: str = checkpointing.BEST,
           step: int | None = None, config: ml_collections.ConfigDict | None = None,
           overwrite: bool = False, platforms: Sequence[str] = ("cpu",),
           num_check_examples: int = 256) -> dict:
  """Exports a checkpoint of ``workdir`` to ``output`` (see the module docstring).

  Args:
    workdir: the training workdir.
    output: the export directory to create.
    checkpoint: ``'best'`` (default) or ``'latest'``.
    step: a specific step of that kind (default: its newest).
    config: optional config to verify against the checkpoint's (see :func:`restore_run`).
    overwrite: replace an existing export at ``output``.
    platforms: what to lower for: a subset of 'cpu', 'cuda', 'rocm', 'tpu'.
    num_check_examples: validation rows the built-in checks run on.

  Returns:
    The metadata written to ``output/metadata.json``.

  Raises:
    FileNotFoundError: no workdir or checkpoint. FileExistsError: ``output`` holds an export
    (without ``overwrite``) or something else. ValueError: configs disagree.
    ExportCheckError: a reloaded artifact does not reproduce the model.
  """
  if isinstance(num_check_examples, bool) or not isinstance(num_check_examples, int) or \
      num_check_examples < 1:
    raise ValueError(f"--check_examples={num_check_examples}: the export checks need at least "
                     f"1 validation example")
  platforms = _check_platforms(platforms)
  output = os.path.abspath(output)
  _check_output(output, overwrite)
  run = restore_run(workdir, checkpoint, step, config)

  parent = os.path.dirname(output)
  created = parent  # the outermost directory this export creates, removed if it fails
  while not os.path.exists(os.path.dirname(created)):
    created = os.path.dirname(created)
  created = None if os.path.exists(created) else created
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  try:
    files_lib.give_default_mode(tmp, directory=True)  # not mkdtemp's 0700
    exported = export_stablehlo(run, platforms)
    with open(os.path.join(tmp, STABLEHLO_FILE), "wb") as f:
      f.write(exported.serialize())
    module = build_saved_model(run, platforms)
    tf.saved_model.save(module, os.path.join(tmp, SAVED_MODEL_DIR),
                        signatures={SIGNATURE: module.serve})
    if run.preprocessing is not None:
      with open(os.path.join(tmp, PREPROCESSING_FILE), "w") as f:
        json.dump(run.preprocessing.to_dict(), f, indent=2)
    checks = check_export(run, tmp, num_check_examples)
    meta = metadata(run, exported, platforms, checks)
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
      json.dump(meta, f, indent=2, allow_nan=True)
      f.write("\n")
    _check_output(output, overwrite)  # nothing appeared there meanwhile
    _put_in_place(tmp, output)
  except BaseException:
    shutil.rmtree(created or tmp, ignore_errors=True)
    raise
  return meta


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """``platforms`` as a tuple, refused (``ValueError``) unless distinct names of
  :data:`PLATFORMS` that include this machine's (the export's checks run here)."""
  platforms = tuple(platforms)
  here = jax.export.default_export_platform()
  if (not platforms or len(set(platforms)) != len(platforms)
      or not set(platforms) <= set(PLATFORMS) or here not in platforms):
    raise ValueError(f"--platforms={','.join(platforms)}: expected distinct names among "
                     f"{', '.join(PLATFORMS)}, including {here!r} (this machine's: the export's "
                     f"checks run here)")
  return platforms
