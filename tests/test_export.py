"""Export for serving: a SavedModel on raw features and a StableHLO artifact, checked end to end.

Tiny runs, each trained for one epoch: raw files in the Census format (the real 42 columns,
random values, test rows holding values never seen in training) taken through the whole path a
user takes (raw files -> the Census source's spec -> preparation -> training -> export -> the
SavedModel fed the raw rows), and the synthetic numeric-only data.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from apem_jax import checkpointing, export as export_lib, trainer
from apem_jax.data import census_source, synthetic
from apem_jax.configs import common
from census_like import write_census_like
from test_trainer import tiny_config
import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

def _census_like_files(data_dir, mp, num_train: int, num_test: int):
  """Raw files in the Census format (``census_like``) that the Census source accepts."""
  for split, rows in (("train", num_train), ("test", num_test)):
    mp.setitem(census_source.EXPECTED_ROWS, split, rows)
  mp.setattr(census_source, "NUM_TRAIN_ROWS", num_train)
  mp.setattr(census_source, "NUM_TEST_ROWS", num_test)
  mp.setattr(census_source, "NUM_VALIDATION_ROWS", num_test // 2)
  return write_census_like(data_dir, num_train, num_test)


def _raw_validation(data_dir) -> dict[str, np.ndarray]:
  """The validation rows' raw columns (the source's split file, read with the project's own
  reader): strings, and float32 numbers as a serving client sends them."""
  columns = census_source.read_raw_file(data_dir / census_source.SPLITS_SUBDIR / "validation.csv")
  return {k: v.astype(np.float32) if v.dtype != object else v for k, v in columns.items()}


@pytest.fixture(scope="module")
def census_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("census")
  config = tiny_config()
  config.data = common.census_data()
  config.train.num_epochs = 1
  workdir = str(root / "run")
  with pytest.MonkeyPatch.context() as mp:  # (never a download)
    data_dir = _census_like_files(root / "data", mp, 640, 2000)
    config.data.data_dir = str(data_dir)
    trainer.train_and_evaluate(config, workdir)
    exp = trainer.Experiment(config)
    raw = {"validation": _raw_validation(data_dir)}
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  state, meta = ckpt.restore(exp.abstract_state, checkpointing.BEST)
  ckpt.close()
  predictions = exp.predict(state, "validation")["predictions"]  # the eval path
  return dict(config=config, workdir=workdir, raw=raw, exp=exp, meta=meta,
              predictions=predictions, root=root)


@pytest.fixture(scope="module")
def census_export(census_run):
  output = str(census_run["root"] / "export")
  meta = export_lib.export(census_run["workdir"], output)
  return dict(output=output, meta=meta)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  config = tiny_config("shared_bottom")  # a second model of the registry, quick to compile
  config.data.synthetic.num_examples = 1200
  config.train.num_epochs = 1
  workdir = str(root / "run")
  trainer.train_and_evaluate(config, workdir)
  return dict(config=config, workdir=workdir, root=root)


def _leftovers(parent) -> list[str]:
  return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


# --------------------------------------------------------------------------------------------
# In-graph preprocessing (no model)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transform", ["log1p", "none"])
def test_in_graph_encoder_matches_numpy_encode(transform):
  from apem_jax.data import preprocessing as prep_lib, serving  # imports TensorFlow
  train = {"color": np.array(["red", "blue", "red", "green"]),
           "size": np.array([b"S", b"M", b"L", b"M"], dtype=object),
           "price": np.array([0.0, 12.5, -3.0, 99_999.0]), "count": np.array([1.0, 1.0, 1.0, 1.0])}
  prep = prep_lib.fit_preprocessing(train, ["color", "size"], ["price", "count"],
                                    numeric_transform=transform)
  raw = {"color": np.array(["blue", "purple", "", "red", " red ", "\u00a0red", "red\x1f"]),
         "size": np.array(["M", "XL", "S", "m", "\tL", "\vM\f\r\n", "S"]),
         "price": np.array([5.0, -7.25, 1e6, 0.0, 1.0, 2.0, 3.0], np.float32),
         "count": np.array([1.0, 2.0, 0.0, -1.0, 1.0, 1.0, 1.0], np.float32)}
  expected = prep_lib.encode(raw, prep)
  # Surrounding ASCII whitespace is not part of a value, in training and in the graph alike;
  # other characters (a no-break space, a unit separator) are, in both.
  np.testing.assert_array_equal(expected["categorical"],
                                [[0, 1], [3, 3], [3, 2], [2, 3], [2, 0], [3, 1], [3, 2]])
  encoder = serving.RawFeatureEncoder(prep)
  got = encoder({k: serving.tf.constant(v) for k, v in raw.items()})
  np.testing.assert_array_equal(got["categorical"].numpy(), expected["categorical"])
  np.testing.assert_allclose(got["numeric"].numpy(), expected["numeric"], rtol=1e-6, atol=1e-7)
  # decode inverts encode: ids exactly, numeric values to float32 rounding.
  decoded = serving.decode(expected["categorical"], expected["numeric"], prep)
  assert decoded["color"][1] == serving.unseen_value(prep) == "<unseen>"
  again = prep_lib.encode(decoded, prep)
  np.testing.assert_array_equal(again["categorical"], expected["categorical"])
  np.testing.assert_allclose(again["numeric"], expected["numeric"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Census-like: raw features, OOV, fresh TensorFlow process, StableHLO
# --------------------------------------------------------------------------------------------

def test_census_export_writes_artifacts_and_metadata(census_run, census_export):
  output, meta = census_export["output"], census_export["meta"]
  assert sorted(os.listdir(output)) == ["metadata.json", "model.stablehlo", "preprocessing.json",
                                        "saved_model"]
  assert not _leftovers(census_run["root"])
  with open(os.path.join(output, "metadata.json")) as f:
    assert json.load(f) == json.loads(json.dumps(meta))
  categorical, numeric = census_source.feature_columns("income_marital")
  inputs = meta["saved_model"]["inputs"]
  assert list(inputs) == list(categorical + numeric)
  assert {inputs[c]["dtype"] for c in categorical} == {"string"}
  assert {inputs[c]["dtype"] for c in numeric} == {"float32"}
  assert list(meta["saved_model"]["outputs"]) == ["income", "marital"]
  assert [t["output"] for t in meta["tasks"]] == ["probability", "probability"]
  assert meta["checkpoint"]["kind"] == "best"
  assert meta["checkpoint"]["step"] == census_run["meta"]["step"] == 10
  assert meta["checkpoint"]["validation"] == census_run["meta"]["validation"]
  assert meta["config"]["model"]["name"] == "apem"
  train = census_source.read_raw_file(
      census_source.raw_dir(census_run["root"] / "data") / "train.csv")
  assert [f["vocab_size"] for f in meta["fields"][:len(categorical)]] == [
      len(set(train[c])) for c in categorical]
  assert set(meta["versions"]) >= {"jax", "flax", "tensorflow"}
  assert meta["checks"]["max_diff_saved_model"] <= ATOL
  assert meta["checks"]["max_diff_stablehlo"] <= ATOL


_TF_ONLY_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    model_dir, inputs_path, outputs_path = sys.argv[1:]
    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    with np.load(inputs_path) as f:
      raw = {k: f[k] for k in f.files}
    out = {}
    for size in (1, 1000):
      got = serve(**{k: tf.constant(v[:size]) for k, v in raw.items()})
      for task, value in got.items():
        out[f"{task}.{size}"] = value.numpy()
    np.savez(outputs_path, **out)
    assert not any(m.split(".")[0] == "apem_jax" for m in sys.modules)
    print("ok")
""")


def test_saved_model_in_fresh_tensorflow_process_matches_eval_path(census_run, census_export,
                                                                   tmp_path):
  exp, raw = census_run["exp"], census_run["raw"]["validation"]
  fields = [f.name for f in exp.schema.categorical] + [f.name for f in exp.schema.numeric]
  # Values never seen in training (encoded to the OOV id) in several fields.
  unseen = exp.data.arrays["validation"]["categorical"] == np.asarray(exp.schema.vocab_sizes)
  assert unseen.any(axis=0).sum() >= 5, unseen.any(axis=0)
  inputs = {name: (raw[name].astype(np.bytes_).astype(str) if raw[name].dtype == object
                   else raw[name]) for name in fields}
  np.savez(tmp_path / "raw.npz", **inputs)
  result = subprocess.run(
      [sys.executable, "-c", _TF_ONLY_SCRIPT,
       os.path.join(census_export["output"], "saved_model"), str(tmp_path / "raw.npz"),
       str(tmp_path / "out.npz")],
      capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  expected = census_run["predictions"]
  assert expected.shape == (1000, 2)
  with np.load(tmp_path / "out.npz") as out:
    for size in (1, 1000):
      got = np.stack([out[f"income.{size}"], out[f"marital.{size}"]], axis=-1)
      assert got.dtype == np.float32 and got.shape == (size, 2)
      np.testing.assert_allclose(got, expected[:size], atol=ATOL, rtol=0)


def test_census_saved_model_serves_the_raw_files_as_eval_scores_them(tmp_path, monkeypatch):
  """The training/serving skew test: the rows of a raw test file, read with the project's own
  reader as a user's rows would be, through the SavedModel (a TensorFlow-only process), give
  eval.py's per-example test predictions to 1e-5. (The TFDS builder once stored the education
  label under the education attribute's name: the model trained on the label, the SavedModel
  asked for the attribute, and every real value was served as unknown.)

  The run is model-parallel (tables row-sharded and padded over 4 of the 8 devices); it is
  exported by the command line in a process with one device, after the dataset was moved away:
  export needs neither the training mesh nor the data."""
  data_dir = _census_like_files(tmp_path / "data", monkeypatch, 400, 300)
  config = tiny_config("shared_bottom")  # the skew is in the data path: any model shows it
  config.data = common.census_data()
  config.data.data_dir = str(data_dir)
  config.train.num_epochs = 1
  config.parallel.update(model_parallelism=4, shard_embeddings_min_rows=1)
  workdir, output = str(tmp_path / "run"), str(tmp_path / "export")
  trainer.train_and_evaluate(config, workdir)
  exp = trainer.Experiment(config)
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  state, _ = ckpt.restore(exp.abstract_state, checkpointing.BEST)
  ckpt.close()
  table = state.params["embedding"]["categorical_table"]
  assert len(table.sharding.device_set) == 8 and table.shape[0] % 4 == 0  # sharded, padded
  expected = exp.predict(state, "test")["predictions"]  # eval.py's path
  moved = tmp_path / "data_moved"
  os.rename(data_dir, moved)
  one_device = xla_env.with_devices(1)
  result = subprocess.run(
      [sys.executable, "-m", "apem_jax.export_main", f"--workdir={workdir}", f"--output={output}"],
      capture_output=True, text=True, timeout=300, cwd=REPO, env=one_device)
  assert result.returncode == 0, result.stderr[-3000:]

  source = census_source.read_raw_file(census_source.raw_dir(moved) / "test.csv")
  _, test_rows = census_source.split_validation_test(census_source.task_labels(source)["income"])
  categorical, numeric = census_source.feature_columns("income_marital")
  assert len(set(source["education"])) > 2  # the raw attribute, not a 0/1 label
  inputs = {c: source[c][test_rows].astype(str) for c in categorical}
  inputs.update({c: source[c][test_rows].astype(np.float32) for c in numeric})
  np.savez(tmp_path / "raw.npz", **inputs)
  result = subprocess.run(
      [sys.executable, "-c", _TF_ONLY_SCRIPT, os.path.join(output, "saved_model"),
       str(tmp_path / "raw.npz"), str(tmp_path / "out.npz")],
      capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(tmp_path / "out.npz") as out:
    got = np.stack([out["income.1000"], out["marital.1000"]], axis=-1)
  assert got.shape == expected.shape == (150, 2)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_stablehlo_round_trip(census_run, census_export):
  with open(os.path.join(census_export["output"], "model.stablehlo"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert str(exported.in_avals[0].shape[0]) == "b"
  assert exported.in_avals[0].shape[1] == 32 and exported.in_avals[1].shape[1] == 7
  arrays = census_run["exp"].data.arrays["validation"]
  expected = census_run["predictions"]
  for size in (1, 1000):
    got = np.asarray(exported.call(arrays["categorical"][:size], arrays["numeric"][:size]))
    assert got.shape == (size, 2)
    np.testing.assert_allclose(got, expected[:size], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Synthetic (numeric only): command line, overwrite, failure leaves nothing
# --------------------------------------------------------------------------------------------

def test_synthetic_export_command_line_and_overwrite(synthetic_run):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, output = synthetic_run["workdir"], str(synthetic_run["root"] / "out")
  result = subprocess.run(
      [sys.executable, "-m", "apem_jax.export_main", f"--workdir={workdir}", f"--output={output}",
       "--checkpoint=latest"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Exported the latest checkpoint" in result.stdout
  with open(os.path.join(output, "metadata.json")) as f:
    meta = json.load(f)
  assert list(meta["saved_model"]["inputs"]) == [f"x{i}" for i in range(6)]
  assert meta["stablehlo"]["inputs"][0]["shape"] == ["b", 0]

  run = export_lib.restore_run(workdir, checkpointing.LATEST)
  numeric = run.sample["numeric"][:7]
  expected = np.asarray(jax.jit(export_lib.predict_fn(run))(
      run.params, np.zeros((7, 0), np.int32), numeric))
  # The SavedModel takes the raw values: the generator's own validation rows (the run's
  # sample is their first rows, standardised with the training statistics).
  settings = synthetic_run["config"].data.synthetic.to_dict()
  del settings["task_kind"]
  raw = synthetic.split(synthetic.generate(**settings))["validation"]["numeric"][:7]
  serve = tf.saved_model.load(os.path.join(output, "saved_model")).signatures["serving_default"]
  got = serve(**{f"x{i}": tf.constant(raw[:, i]) for i in range(6)})
  np.testing.assert_allclose(np.stack([got["y1"], got["y2"]], -1), expected, atol=ATOL, rtol=0)

  # An existing export is refused, then replaced with --overwrite.
  with pytest.raises(FileExistsError, match="already holds an export; pass --overwrite"):
    export_lib.export(workdir, output)
  assert meta == json.load(open(os.path.join(output, "metadata.json")))
  new = export_lib.export(workdir, output, overwrite=True, num_check_examples=16)
  assert new["checkpoint"]["kind"] == "best" and new["checks"]["examples"] == 16
  assert not _leftovers(synthetic_run["root"])


def test_failed_check_leaves_nothing_behind(synthetic_run, monkeypatch, tmp_path):
  def failing_check(run, directory, num_examples):
    assert sorted(os.listdir(directory)) == [  # half written
        "model.stablehlo", "preprocessing.json", "saved_model"]
    raise export_lib.ExportCheckError("the reloaded SavedModel differs from the JAX model")

  monkeypatch.setattr(export_lib, "check_export", failing_check)
  with pytest.raises(export_lib.ExportCheckError, match="differs from the JAX model"):
    export_lib.export(synthetic_run["workdir"], str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []
  # Nor the directories it made for --output.
  with pytest.raises(export_lib.ExportCheckError, match="differs from the JAX model"):
    export_lib.export(synthetic_run["workdir"], str(tmp_path / "new" / "deep" / "out"))
  assert os.listdir(tmp_path) == []


def test_sigterm_during_an_export_leaves_nothing_behind(synthetic_run, tmp_path):
  script = (
      "import os, signal, sys\n"
      "from apem_jax import export, export_main\n"
      "def sigterm(run, directory, num_examples):\n"
      "  os.kill(os.getpid(), signal.SIGTERM)\n"
      "export.check_export = sigterm\n"
      "export_main.main(sys.argv)\n")
  result = subprocess.run(
      [sys.executable, "-c", script, f"--workdir={synthetic_run['workdir']}",
       f"--output={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
  assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_a_checkpoint_named_by_its_step_is_not_called_the_best(tmp_path):
  """``apem-export --step=N`` printed "Exported the best checkpoint (step N)" and its metadata
  said kind 'best' with the best step as it was when step N was saved."""
  config = tiny_config("shared_bottom")
  config.data.synthetic.num_examples = 1200
  config.train.num_epochs = 2
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  steps, best = ckpt.steps(), ckpt.step_of(checkpointing.BEST)
  best_score = ckpt.restore_meta(step=best)["best_score"]
  ckpt.close()
  assert len(steps) == 2
  for step in steps:
    run = export_lib.restore_run(workdir, step=step)
    assert (run.kind, run.step, run.meta["best_step"], run.meta["best_score"]) == (
        "step", step, best, best_score)
  assert export_lib.restore_run(workdir).kind == "best"


def test_workdir_without_checkpoints(tmp_path):
  empty = tmp_path / "empty_run"
  empty.mkdir()
  output = tmp_path / "out"
  with pytest.raises(FileNotFoundError, match="no best checkpoint.*train first"):
    export_lib.export(str(empty), str(output))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export_lib.export(str(tmp_path / "missing"), str(output))
  assert sorted(os.listdir(tmp_path)) == ["empty_run"] and os.listdir(empty) == []


def test_missing_step_lists_available(census_run, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7.*steps: \[10\]"):
    export_lib.export(census_run["workdir"], str(tmp_path / "out"), checkpoint="latest", step=7)
  assert os.listdir(tmp_path) == []


def test_config_mismatch(census_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(census_run["workdir"], workdir)
  with open(workdir / "config.json") as f:
    config = json.load(f)
  config["model"]["embed_dim"] = 4
  with open(workdir / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"config.json does not match.*\['model.embed_dim'\]"):
    export_lib.export(str(workdir), str(tmp_path / "out"))

  given = ml_collections.ConfigDict(census_run["config"].to_dict())
  given.model.num_groups = 2
  given.data.data_dir = "/elsewhere"  # a location, not a mismatch
  with pytest.raises(ValueError, match=r"different config.*\['model.num_groups'\]"):
    export_lib.export(census_run["workdir"], str(tmp_path / "out"), config=given)
  assert sorted(os.listdir(tmp_path)) == ["run"]


def test_the_check_tolerance_is_relative_beyond_one():
  """A regression value of 150 keeps about 7 digits in float32: 4.6e-5 apart is rounding there,
  and the export check must pass it; a probability 2e-5 apart is not rounding."""
  assert export_lib._max_diff(np.array([[150.0 + 4.6e-5]]), np.array([[150.0]])) < \
      export_lib.TOLERANCE
  assert export_lib._max_diff(np.array([[0.50002]]), np.array([[0.5]])) > export_lib.TOLERANCE


def test_output_that_is_not_an_export_is_never_replaced(census_run, tmp_path):
  output = tmp_path / "out"
  output.mkdir()
  (output / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="holds no export"):
    export_lib.export(census_run["workdir"], str(output), overwrite=True)
  assert os.listdir(output) == ["notes.txt"]
  # A prepared dataset (a metadata.json beside its shards) is not an export either.
  (output / "metadata.json").write_text('{"format_version": 3}')
  with pytest.raises(FileExistsError, match="holds no export"):
    export_lib.export(census_run["workdir"], str(output), overwrite=True)
  assert sorted(os.listdir(output)) == ["metadata.json", "notes.txt"]
