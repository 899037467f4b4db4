"""Export a trained checkpoint for serving: a TensorFlow SavedModel and a StableHLO artifact.

Besides :mod:`apem_jax.data`, this is the one module that imports TensorFlow (for ``jax2tf`` and
the SavedModel format); the in-graph raw-feature preprocessing itself lives in
:mod:`apem_jax.data.serving`, and checkpoints are read through :mod:`apem_jax.checkpointing`.

``export(workdir, output)`` restores a checkpoint of a training workdir (the best one unless told
otherwise), rebuilds its config (stored in the checkpoint), model (registry) and preprocessing
(``<workdir>/preprocessing.json``), and writes ``output/``:

* ``saved_model/``: a TensorFlow SavedModel (``jax2tf``, native serialization) whose
  ``serving_default`` signature takes every raw feature by name, ``tf.string [None]`` for
  categorical fields and ``tf.float32 [None]`` for numeric ones, any batch size, and returns
  ``float32 [None]`` per task by name: the probability of a binary task, the value of a
  regression task. Vocabulary lookup (unseen values -> OOV id) and numeric normalisation run in
  the graph. Data without preprocessing (synthetic) takes its numeric features as they are
  (already normalised).
* ``model.stablehlo``: ``jax.export`` serialization of the model on preprocessed inputs,
  ``(categorical int32 [b, Fc], numeric float32 [b, Fn]) -> predictions float32 [b, T]`` with a
  symbolic batch dimension ``b`` (load with ``jax.export.deserialize``, call ``.call``).
* ``metadata.json``: schema, tasks, config, checkpoint step and validation metrics, signatures,
  the results of the export checks, and library versions.
* ``preprocessing.json`` (when the data has preprocessing): vocabularies and statistics.

Before the export is put in place, both artifacts are reloaded (the SavedModel in TensorFlow, the
StableHLO artifact in JAX) and run on a batch of validation examples (the first row with every
categorical value unseen); the export fails if either differs from the JAX model by more than ``TOLERANCE`` on any prediction.
The SavedModel needs raw values: the data package keeps only encoded arrays, so they are
rebuilt with :func:`apem_jax.data.serving.decode` (ids -> vocabulary strings, OOV ids -> a string
in no vocabulary, numeric values un-normalised and un-transformed), and the JAX reference for the
SavedModel is the model on those raw values encoded by :func:`apem_jax.data.encode`.

Everything is written to a temporary directory next to ``output`` and renamed into place only
when complete and checked: a failed export leaves nothing behind.

Command line (``apem-export`` or ``python -m apem_jax.export``): see :mod:`apem_jax.export_main`.
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

from apem_jax import checkpointing, config_validation, losses, trainer
from apem_jax.data import encode as encode_raw
from apem_jax.data import Preprocessing
from apem_jax.data import serving
from apem_jax.schema import Schema

tf = serving.tf  # TensorFlow as the data package configured it (quiet, no GPUs).

SAVED_MODEL_DIR = "saved_model"
STABLEHLO_FILE = "model.stablehlo"
METADATA_FILE = "metadata.json"
PREPROCESSING_FILE = "preprocessing.json"
SIGNATURE = "serving_default"
TOLERANCE = 1e-5
FORMAT_VERSION = 1


class ExportCheckError(RuntimeError):
  """A reloaded artifact does not reproduce the JAX model's predictions."""


@dataclasses.dataclass
class Run:
  """A restored training run: what an export needs."""

  config: ml_collections.ConfigDict
  meta: dict
  kind: str
  step: int
  experiment: trainer.Experiment
  params: Any  # host numpy arrays
  preprocessing: Preprocessing | None

  @property
  def schema(self) -> Schema:
    return self.experiment.schema


# --------------------------------------------------------------------------------------------
# Restoring
# --------------------------------------------------------------------------------------------

def checkpoint_steps(workdir: str, kind: str) -> list[int]:
  """Steps of the complete checkpoints of ``kind`` in ``workdir`` (without creating anything)."""
  directory = os.path.join(workdir, "checkpoints", kind)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _merge(base: dict, over: dict) -> dict:
  """``base`` with ``over``'s values written over it, recursively."""
  out = dict(base)
  for key, value in over.items():
    out[key] = (_merge(base[key], value) if isinstance(value, dict)
                and isinstance(base.get(key), dict) else value)
  return out


def restore_run(workdir: str, kind: str = checkpointing.BEST, step: int | None = None,
                config: ml_collections.ConfigDict | None = None,
                data_dir: str | None = None) -> Run:
  """Restores a checkpoint of ``workdir`` with the config it was trained with.

  Args:
    workdir: a training workdir.
    kind: ``'best'`` or ``'latest'``.
    step: a specific step of that kind (default: the newest).
    config: optional; must agree with the checkpoint's config on every ``model.*`` and ``data.*``
      key (``data.data_dir`` aside, whose value it then supplies). It also fills in keys the
      checkpoint's config lacks (a run trained before this version of the code required them).
    data_dir: overrides ``data.data_dir`` (where the dataset is read for the checks).

  Raises:
    FileNotFoundError: no such workdir or checkpoint.
    ValueError: the checkpoint, ``<workdir>/config.json``, ``config`` or the dataset disagree.
  """
  if kind not in (checkpointing.BEST, checkpointing.LATEST):
    raise ValueError(f"checkpoint must be {checkpointing.BEST!r} or {checkpointing.LATEST!r}, "
                     f"got {kind!r}")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  steps = checkpoint_steps(workdir, kind)
  if not steps:
    other = checkpointing.LATEST if kind == checkpointing.BEST else checkpointing.BEST
    hint = (f"; it has {other} checkpoints {checkpoint_steps(workdir, other)} "
            f"(--checkpoint {other})" if checkpoint_steps(workdir, other) else
            f"; train first (train.py --workdir {workdir})")
    raise FileNotFoundError(f"{workdir}: no {kind} checkpoint under "
                            f"{os.path.join(workdir, 'checkpoints', kind)}{hint}")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{workdir}: no {kind} checkpoint at step {step}; available {kind} "
                            f"steps: {steps}")
  step = steps[-1] if step is None else step

  ckpt = checkpointing.Checkpoints(workdir)
  try:
    meta = ckpt.restore_meta(kind, step)
    saved = meta.get("config")
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
      # requires and an older run's config lacks, and supplies data.data_dir.
      saved = _merge(given, saved)
      if given.get("data", {}).get("data_dir") is not None:
        saved["data"]["data_dir"] = given["data"]["data_dir"]
    run_config = ml_collections.ConfigDict(saved)
    if data_dir is not None:
      run_config.data.data_dir = data_dir

    try:
      exp = trainer.Experiment(run_config)
    except ValueError as e:
      if "missing required key" not in str(e) or config is not None:
        raise
      raise ValueError(f"{workdir}: the {kind} checkpoint's config lacks a key this version "
                       f"requires ({e}); pass --config with the run's config file to fill it "
                       f"in") from e
    if "schema" in meta and Schema.from_dict(meta["schema"]) != exp.schema:
      raise ValueError(f"{workdir}: the dataset's schema no longer matches the one the {kind} "
                       f"checkpoint (step {step}) was trained on")
    state, meta = ckpt.restore(kind, exp.abstract_state, step)
  finally:
    ckpt.close()
  params = jax.device_get(state.params)  # host numpy: exported functions are not sharded
  return Run(run_config, meta, kind, step, exp, params,
             _run_preprocessing(workdir, exp))


def _run_preprocessing(workdir: str, exp: trainer.Experiment) -> Preprocessing | None:
  """``<workdir>/preprocessing.json``, checked against the dataset's (they must be equal)."""
  path = os.path.join(workdir, PREPROCESSING_FILE)
  data_prep = exp.data.preprocessing
  if not os.path.exists(path):
    return data_prep
  with open(path) as f:
    prep = Preprocessing.from_json(f.read())
  if data_prep is not None and prep.to_dict() != data_prep.to_dict():
    raise ValueError(f"{path} differs from the dataset's preprocessing: the data changed since "
                     f"training")
  schema = exp.schema
  if (prep.categorical_fields != tuple(f.name for f in schema.categorical)
      or prep.numeric_fields != tuple(f.name for f in schema.numeric)
      or prep.vocab_sizes != schema.vocab_sizes):
    raise ValueError(f"{path} does not match the model's schema (fields or vocabulary sizes)")
  return prep


# --------------------------------------------------------------------------------------------
# The exported functions
# --------------------------------------------------------------------------------------------

def predict_fn(run: Run) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """``predict(params, categorical [b, Fc], numeric [b, Fn]) -> predictions [b, T]`` (funnel
  steps: entire-space probabilities ``p_t``, as evaluation reports them)."""
  model, schema, head = run.experiment.model, run.schema, run.experiment.head

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

def check_examples(run: Run, num_examples: int) -> dict[str, np.ndarray]:
  """Encoded validation rows (the first ``num_examples``); the first row made all-OOV."""
  arrays = run.experiment.data.arrays["validation"]
  n = min(num_examples, len(arrays["numeric"]))
  categorical = np.array(arrays["categorical"][:n], np.int32)
  numeric = np.array(arrays["numeric"][:n], np.float32)
  if n and categorical.shape[1]:
    categorical[0] = np.asarray(run.schema.vocab_sizes, np.int32)  # every field unseen
  return {"categorical": categorical, "numeric": numeric}


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
  if a.shape != b.shape:
    raise ExportCheckError(f"output shape {a.shape} != expected {b.shape}")
  return float(np.max(np.abs(a - b))) if a.size else 0.0


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
    raw = serving.decode(examples["categorical"], examples["numeric"], run.preprocessing)
    encoded = encode_raw(raw, run.preprocessing)
    if not np.array_equal(encoded["categorical"], examples["categorical"]):
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
            "max_abs_diff_stablehlo": hlo_diff, "max_abs_diff_saved_model": sm_diff,
            "raw_values": "decoded from encoded validation rows (row 0: every categorical "
                          "field unseen)" if run.preprocessing is not None else
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


def metadata(run: Run, exported: jax.export.Exported, platforms: Sequence[str],
             checks: dict) -> dict:
  schema, prep = run.schema, run.preprocessing
  fields = []
  for f in schema.categorical:
    fields.append({"name": f.name, "type": "categorical", "dtype": "string",
                   "vocab_size": f.vocab_size, "oov_id": f.oov_id})
  for j, f in enumerate(schema.numeric):
    entry = {"name": f.name, "type": "numeric", "dtype": "float32"}
    if prep is not None:
      entry.update(transform=prep.numeric_transform, mean=prep.means[j], std=prep.stds[j])
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
      "tasks": [{"name": t.name, "kind": t.kind, "depends_on": t.depends_on,
                 "output": "probability" if t.kind == "binary" else "value"}
                for t in schema.tasks],
      "schema": schema.to_dict(),
      "config": run.config.to_dict(),
      "saved_model": {
          "path": SAVED_MODEL_DIR, "tag": "serve", "signature": SIGNATURE,
          "inputs": {f["name"]: {"dtype": f["dtype"], "shape": [None]} for f in fields},
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
  return os.path.exists(os.path.join(directory, METADATA_FILE)) or os.path.exists(
      os.path.join(directory, SAVED_MODEL_DIR))


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
           data_dir: str | None = None, num_check_examples: int = 256) -> dict:
  """Exports a checkpoint of ``workdir`` to ``output`` (see the module docstring).

  Args:
    workdir: the training workdir.
    output: the export directory to create.
    checkpoint: ``'best'`` (default) or ``'latest'``.
    step: a specific step of that kind (default: its newest).
    config: optional config to verify against the checkpoint's (see :func:`restore_run`).
    overwrite: replace an existing export at ``output``.
    platforms: what to lower for: a subset of 'cpu', 'cuda', 'rocm', 'tpu'.
    data_dir: where the dataset is (default: the config's ``data.data_dir``).
    num_check_examples: validation rows the built-in checks run on.

  Returns:
    The metadata written to ``output/metadata.json``.

  Raises:
    FileNotFoundError: no workdir or checkpoint. FileExistsError: ``output`` holds an export
    (without ``overwrite``) or something else. ValueError: configs disagree.
    ExportCheckError: a reloaded artifact does not reproduce the model.
  """
  output = os.path.abspath(output)
  _check_output(output, overwrite)
  run = restore_run(workdir, checkpoint, step, config, data_dir)

  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stay on the export
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
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return meta


def main(argv: Sequence[str] | None = None) -> None:
  """The ``apem-export`` command (flags in :mod:`apem_jax.export_main`)."""
  from apem_jax import export_main  # pylint: disable=g-import-not-at-top
  export_main.main(argv)


if __name__ == "__main__":
  main()
