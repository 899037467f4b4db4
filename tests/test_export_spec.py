"""Export of a run trained on a dataset spec whose features the in-graph encoder once could not
serve: a hashed categorical feature, a vocabulary feature with ``min_count``/``max_size`` and
missing values, a numeric feature filled where missing, one with a missing-value indicator, and
different numeric transforms. The raw rows of the validation file (missing values as a client
sends them: NaN, and the empty string) through the SavedModel in a TensorFlow-only process give
the eval path's predictions; the NumPy encoder and the graph encoder give the prepared arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from apem_jax import checkpointing, export as export_lib, trainer
from apem_jax.data import prepare
from apem_jax.data import prepared
from apem_jax.data import preprocessing as prep_lib
from apem_jax.data import spec as spec_lib
from test_export import _TF_ONLY_SCRIPT
from test_prepare import write_csv, write_spec
from test_trainer import tiny_config

ATOL = 1e-5
CATEGORICAL = ("user", "country")
NUMERIC = ("price", "age", "visits")
SPEC = {
    "format": "csv",
    "files": ["events.csv"],
    "split": {"split_column": "split"},
    "features": [
        {"name": "user", "type": "categorical", "num_buckets": 16},
        {"name": "country", "type": "categorical", "min_count": 2, "max_size": 3},
        {"name": "price", "type": "numeric", "transform": "log1p", "missing": {"fill": 5.0}},
        {"name": "age", "type": "numeric", "missing": "indicator", "buckets": 4},
        {"name": "visits", "type": "numeric", "transform": "log1p", "buckets": 4},
    ],
    "tasks": [{"name": "click", "label_column": "clicked"}],
}


def _rows(n: int = 420, seed: int = 0) -> list[dict]:
  """Every 6th row validation, the next test; missing prices, ages and countries (""), countries
  with surrounding spaces, a country too rare for the vocabulary and one seen only outside
  training."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    split = "validation" if i % 6 == 4 else "test" if i % 6 == 5 else "train"
    country = ["fr", " de", "us ", "fr", "", "jp", "fr"][int(rng.integers(0, 7))]
    if i == 7:
      country = "rare"  # once in training: under min_count
    elif split != "train" and i % 5 == 0:
      country = "zz"  # never in training
    age = "" if i % 5 == 1 else str(int(rng.integers(18, 80)))
    price = "" if i % 7 == 3 else f"{rng.exponential(30):.2f}"
    visits = int(rng.poisson(3))
    logit = 0.8 * (age == "") + 0.05 * visits - 0.5 * (country == "fr")
    rows.append({"split": split, "user": f"u{int(rng.integers(0, 50))}", "country": country,
                 "price": price, "age": age, "visits": str(visits),
                 "clicked": str(int(rng.random() < 1 / (1 + np.exp(-logit))))})
  return rows


def _raw(rows: list[dict]) -> dict[str, np.ndarray]:
  """Raw columns as a serving client sends them: strings ("" when missing), float32 (NaN)."""
  raw = {c: np.array([r[c] for r in rows], dtype=str) for c in CATEGORICAL}
  raw.update({c: np.array([np.nan if r[c] == "" else float(r[c]) for r in rows], np.float32)
              for c in NUMERIC})
  return raw


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("spec_export")
  rows = _rows()
  write_csv(root / "events.csv", rows)
  spec_path = write_spec(root, SPEC)
  config = tiny_config("shared_bottom")
  config.data = ml_collections.ConfigDict(dict(name="spec", spec=str(spec_path),
                                               data_dir=str(root / "cache"), stream=False))
  config.train.num_epochs = 1
  workdir, output = str(root / "run"), str(root / "export")
  trainer.train_and_evaluate(config, workdir)
  exp = trainer.Experiment(config)
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  state, _ = ckpt.restore(exp.abstract_state, checkpointing.BEST)
  ckpt.close()
  predictions = exp.predict(state, "validation")["predictions"]  # the eval path
  meta = export_lib.export(workdir, output)
  return dict(root=root, rows=rows, spec_path=spec_path, exp=exp, predictions=predictions,
              workdir=workdir, output=output, meta=meta)


def _split(rows: list[dict], split: str) -> list[dict]:
  return [r for r in rows if r["split"] == split]


def test_saved_model_serves_raw_rows_with_missing_values_like_the_eval_path(spec_run, tmp_path):
  validation = _split(spec_run["rows"], "validation")
  raw = _raw(validation)
  # The rows hold what once had no raw-feature signature: missing values of every kind, and
  # countries unseen or below min_count.
  assert np.isnan(raw["price"]).sum() >= 5 and np.isnan(raw["age"]).sum() >= 5
  assert (raw["country"] == "").sum() >= 3 and (raw["country"] == "zz").sum() >= 3
  np.savez(tmp_path / "raw.npz", **raw)
  result = subprocess.run(
      [sys.executable, "-c", _TF_ONLY_SCRIPT, os.path.join(spec_run["output"], "saved_model"),
       str(tmp_path / "raw.npz"), str(tmp_path / "out.npz")],
      capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  expected = spec_run["predictions"][:, 0]
  assert expected.shape == (len(validation),) and np.ptp(expected) > 0
  with np.load(tmp_path / "out.npz") as out:
    np.testing.assert_allclose(out["click.1"], expected[:1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["click.1000"], expected, atol=ATOL, rtol=0)


def test_export_metadata_describes_encodings_and_missing_values(spec_run):
  meta = spec_run["meta"]
  assert meta["checks"]["max_diff_saved_model"] <= ATOL
  assert list(meta["saved_model"]["inputs"]) == list(CATEGORICAL + NUMERIC)  # no indicator
  assert meta["saved_model"]["missing_values"]["numeric"].startswith("send NaN: ")
  assert not any("missing_values" in f for f in meta["fields"])  # no number-like token
  fields = {f["name"]: f for f in meta["fields"]}
  assert fields["user"]["encoding"] == "hash" and fields["user"]["num_buckets"] == 16
  assert fields["country"]["encoding"] == "vocabulary"
  assert [fields[n]["transform"] for n in NUMERIC] == ["log1p", "none", "log1p"]
  assert [fields[n]["missing"] for n in NUMERIC] == ["fill", "indicator", "error"]
  assert [fields[n]["missing"] for n in CATEGORICAL] == ["value", "value"]
  assert fields["price"]["fill"] == 5.0 and fields["age"]["indicator"] == "age_missing"
  assert meta["indicators"] == [{"name": "age_missing", "column": 2, "of": "age",
                                 "ids": {"present": 0, "missing": 1}}]
  with open(os.path.join(spec_run["output"], "preprocessing.json")) as f:
    prep = prep_lib.Preprocessing.from_json(f.read())
  assert prep.numeric_transform == prep_lib.PER_FIELD
  assert prep.column_names == ("user", "country", "age_missing")
  assert prep.column_vocab_sizes == spec_run["exp"].schema.vocab_sizes == (16, 3, 2)
  assert prep_lib.INDICATOR_SUFFIX == spec_lib.INDICATOR_SUFFIX


def test_numpy_and_graph_encoders_give_the_prepared_arrays(spec_run):
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  tf = serving.tf
  result = prepare.prepare(spec_run["spec_path"], spec_run["root"] / "cache")
  assert result.reused and result.metadata["preprocessing"] == prepared.PREPROCESSING_FILE
  data = prepared.load_prepared(result.path)
  prep = data.preprocessing
  encoder = serving.RawFeatureEncoder(prep)
  for split in prepared.SPLITS:
    raw = _raw(_split(spec_run["rows"], split))
    want = data.arrays[split]
    for got in (prep_lib.encode(raw, prep),
                {k: v.numpy() for k, v in encoder({k: tf.constant(v) for k, v in raw.items()}
                                                  ).items()}):
      np.testing.assert_array_equal(got["categorical"], want["categorical"])
      np.testing.assert_allclose(got["numeric"], want["numeric"], atol=1e-6, rtol=0)
  # decode: vocabulary ids and indicators come back; a missing age is NaN again.
  decoded = serving.decode(want["categorical"], want["numeric"], prep)
  again = prep_lib.encode(decoded, prep)
  np.testing.assert_array_equal(again["categorical"][:, 1:], want["categorical"][:, 1:])
  np.testing.assert_array_equal(np.isnan(decoded["age"]), want["categorical"][:, 2] == 1)


def test_vocabulary_entries_that_are_missing_value_tokens_decode_to_themselves(spec_run):
  """A file's " NA" (not exactly the missing value "NA") and "  " (not exactly "") are the
  vocabulary entries "NA" and "": decoded ids encode back to them, as the export's check needs."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  with open(os.path.join(spec_run["output"], "preprocessing.json")) as f:
    prep = prep_lib.Preprocessing.from_json(f.read())
  c = prep.categorical_fields.index("country")
  vocabularies = list(prep.vocabularies)
  vocabularies[c] = ("", "NA", "de")
  prep = dataclasses.replace(prep, vocabularies=tuple(vocabularies), missing_values=("", "NA"))
  raw = {"country": np.array([" NA", "  ", "de", "NA"])}
  ids = prep_lib.encode_categorical(raw["country"], prep.vocabularies[c], prep.missing_values)
  np.testing.assert_array_equal(ids, [1, 0, 2, 0])
  categorical = np.zeros((4, len(prep.column_names)), np.int32)
  categorical[:, prep.categorical_positions[c]] = ids
  decoded = serving.decode(categorical, np.zeros((4, len(prep.numeric_fields)), np.float32), prep)
  np.testing.assert_array_equal(
      prep_lib.encode_categorical(decoded["country"], prep.vocabularies[c], prep.missing_values),
      ids)


def test_missing_value_under_policy_error_and_infinite_values_are_refused(spec_run):
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  tf = serving.tf
  with open(os.path.join(spec_run["output"], "preprocessing.json")) as f:
    prep = prep_lib.Preprocessing.from_json(f.read())
  encoder = serving.RawFeatureEncoder(prep)
  graph = serving.tf.function(encoder, autograph=False)  # as the SavedModel's signature runs it
  row = {"user": ["u1"], "country": ["fr"], "price": [1.0], "age": [30.0], "visits": [2.0]}
  for field, value, numpy_match, graph_match in (
      ("visits", np.nan, r"'visits', row 0: the value is missing \(NaN\)",
       r"feature visits: a value is missing \(NaN\), but the feature accepts none"),
      ("price", np.inf, "'price', row 0: inf is not a finite number",
       "feature price: a value is infinite"),
      ("age", -np.inf, "'age', row 0: -inf is not a finite number",
       "feature age: a value is infinite")):
    bad = dict(row, **{field: [value]})
    with pytest.raises(ValueError, match=numpy_match):
      prep_lib.encode({k: np.asarray(v) for k, v in bad.items()}, prep)
    features = {k: tf.constant(v, tf.string if k in CATEGORICAL else tf.float32)
                for k, v in bad.items()}
    for fn in (encoder, graph):
      with pytest.raises(tf.errors.InvalidArgumentError, match=graph_match):
        fn(features)
  # Missing values where the policies accept them: no error.
  ok = graph({k: tf.constant(v, tf.string if k in CATEGORICAL else tf.float32)
              for k, v in dict(row, user=[""], country=[""], price=[np.nan], age=[np.nan]).items()})
  assert ok["categorical"].numpy()[0, 2] == 1 and ok["numeric"].numpy()[0, 1] == 0.0


def _old_json() -> dict:
  """A preprocessing.json as the code before hashing/per-field transforms/missing-value
  policies wrote it."""
  return {"categorical_fields": ["color", "size"], "numeric_fields": ["price", "count"],
          "vocabularies": [["blue", "green", "red"], ["L", "M", "S"]],
          "means": [1.5, 0.25], "stds": [2.0, 0.5], "numeric_transform": "log1p",
          "min_count": 1, "bucket_boundaries": [[], []]}


def test_old_preprocessing_json_loads_with_todays_behaviour(tmp_path):
  from apem_jax import schema as schema_lib  # pylint: disable=g-import-not-at-top
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  old = _old_json()
  prep = prep_lib.Preprocessing.from_dict(old)
  assert prep.num_buckets == (0, 0) and prep.hashed == (False, False)
  assert prep.numeric_transforms == ("log1p", "log1p")
  assert prep.numeric_missing == ("error", "error") and prep.numeric_fills == (None, None)
  assert prep.indicator_columns == (-1, -1) and prep.num_indicators == 0
  assert prep.categorical_missing == ("value", "value")
  assert prep.column_names == prep.categorical_fields and prep.vocab_sizes == (3, 3)
  assert prep.column_vocab_sizes == (3, 3)
  assert prep_lib.Preprocessing.from_json(prep.to_json()) == prep
  assert {k: v for k, v in prep.to_dict().items() if k in old} == old
  raw = {"color": np.array(["red", " blue", "purple"]), "size": np.array(["S", "XL", "M"]),
         "price": np.array([3.0, -1.0, 0.0], np.float32),
         "count": np.array([1.0, 2.0, 0.0], np.float32)}
  got = prep_lib.encode(raw, prep)
  np.testing.assert_array_equal(got["categorical"], [[2, 2], [0, 3], [3, 1]])
  t = np.sign(raw["price"].astype(np.float64)) * np.log1p(np.abs(raw["price"].astype(np.float64)))
  np.testing.assert_allclose(got["numeric"][:, 0], ((t - 1.5) / 2.0).astype(np.float32))
  graph = serving.RawFeatureEncoder(prep)({k: serving.tf.constant(v) for k, v in raw.items()})
  np.testing.assert_array_equal(graph["categorical"].numpy(), got["categorical"])
  np.testing.assert_allclose(graph["numeric"].numpy(), got["numeric"], rtol=1e-6, atol=1e-7)
  # The export's check against a checkpoint's schema accepts it.
  (tmp_path / "preprocessing.json").write_text(json.dumps(old))
  schema = schema_lib.Schema(
      categorical=(schema_lib.CategoricalField("color", 3), schema_lib.CategoricalField("size", 3)),
      numeric=(schema_lib.NumericField("price"), schema_lib.NumericField("count")),
      tasks=(schema_lib.Task("y"),))
  run_preprocessing = export_lib._run_preprocessing  # pylint: disable=protected-access
  assert run_preprocessing(str(tmp_path), schema) == prep


@pytest.mark.parametrize("changes, match", [
    (dict(num_buckets=(8,)), "one num_buckets"),
    (dict(num_buckets=(8, 0)), "hashed field"),
    (dict(numeric_transforms=("none", "sqrt")), "transform must be one of"),
    (dict(numeric_transforms=("none", "log1p")), "use 'per_field'"),
    (dict(numeric_transform="per_field"), "needs numeric_transforms"),
    (dict(numeric_missing=("fill", "error")), "fill value is required"),
    (dict(numeric_missing=("error", "error"), numeric_fills=(1.0, None)), "fill value"),
    (dict(numeric_missing=("maybe", "error")), "policy must be one of"),
    (dict(numeric_missing=("indicator", "error"), indicator_columns=(-1, -1)), "indicator_col"),
    (dict(numeric_missing=("indicator", "indicator"), indicator_columns=(2, 2)), "indicator_col"),
])
def test_preprocessing_refuses_inconsistent_fields(changes, match):
  old = prep_lib.Preprocessing.from_dict(_old_json())
  with pytest.raises(ValueError, match=match):
    prep_lib.Preprocessing(**{**{k: getattr(old, k) for k in (
        "categorical_fields", "numeric_fields", "vocabularies", "means", "stds",
        "numeric_transform")}, **changes})


def test_indicator_columns_may_sit_anywhere():
  """Positions are data, not a convention: an indicator before the categorical fields."""
  prep = prep_lib.Preprocessing(
      ("c",), ("x", "y"), (("a", "b"),), (0.0, 1.0), (1.0, 2.0), "none",
      numeric_missing=("indicator", "fill"), numeric_fills=(None, 3.0), indicator_columns=(0, -1))
  assert prep.column_names == ("x_missing", "c") and prep.column_vocab_sizes == (2, 2)
  got = prep_lib.encode({"c": np.array(["b", ""]), "x": np.array([np.nan, 2.0]),
                         "y": np.array([np.nan, 5.0])}, prep)
  np.testing.assert_array_equal(got["categorical"], [[1, 1], [0, 2]])
  np.testing.assert_allclose(got["numeric"], [[0.0, 1.0], [2.0, 2.0]])


@pytest.mark.parametrize("names,match", [
    (("user", "unit price"), r"feature 'unit price' cannot name a SavedModel input"),
    (("_id",), r"feature '_id' cannot name a SavedModel input"),
    (("Price", "price"), r"features 'Price' and 'price' differ only in case"),
])
def test_a_feature_name_no_savedmodel_input_can_take_is_named(names, match):
  from apem_jax.data import serving
  with pytest.raises(ValueError, match=match):
    serving.check_input_names(names)
  serving.check_input_names(("user", "unit_price", "a.b", "x-1", "9lives"))


def test_the_csv_missing_value_tokens_read_as_missing_when_served(tmp_path):
  """A CSV spec's ``format.missing_values`` ("NA", "?") are missing in preparation (the id of
  ``""``); the NumPy and graph encoders read them so too, compared before stripping (" NA" is a
  value)."""
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  tf = serving.tf
  countries = ["fr", "NA", "de", "?", "", " NA", "fr", "de"]
  rows = [{"split": ["train", "validation", "test"][i % 3], "user": countries[(i + 3) % 8],
           "country": countries[i % 8], "clicked": str(i % 2)} for i in range(96)]
  write_csv(tmp_path / "events.csv", rows)
  spec = {"format": {"type": "csv", "missing_values": ["", "NA", "?"]},
          "files": ["events.csv"], "split": {"split_column": "split"},
          "features": [{"name": "user", "type": "categorical", "num_buckets": 16},
                       {"name": "country", "type": "categorical"}],
          "tasks": [{"name": "click", "label_column": "clicked"}]}
  data = prepared.load_prepared(
      prepare.prepare(write_spec(tmp_path, spec), tmp_path / "cache").path)
  prep = data.preprocessing
  assert prep.missing_values == ("", "NA", "?")
  assert prep.vocabularies[1] == ("", "NA", "de", "fr")  # " NA" stripped is a value
  encoder = serving.RawFeatureEncoder(prep)
  for split in prepared.SPLITS:
    part = _split(rows, split)
    raw = {c: np.array([r[c] for r in part], dtype=str) for c in ("user", "country")}
    want = data.arrays[split]["categorical"]
    missing = np.isin(raw["country"], ["", "NA", "?"])
    assert missing.any() and (raw["country"] == "NA").any()
    np.testing.assert_array_equal(want[missing, 1], 0)  # the id of ""
    for got in (prep_lib.encode(raw, prep)["categorical"],
                encoder({k: tf.constant(v) for k, v in raw.items()})["categorical"].numpy()):
      np.testing.assert_array_equal(got, want)
  again = prep_lib.Preprocessing.from_json(prep.to_json())
  assert again == prep


def test_a_categorical_value_missing_where_the_spec_refuses_it_is_refused_when_served(tmp_path):
  """``"missing": "error"`` on a categorical feature: preparation refuses a missing value, and so
  do the NumPy and graph encoders (they served it as the OOV id); a value that only strips to a
  missing token is a value."""
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  tf = serving.tf
  rows = [{"split": ["train", "validation", "test"][i % 3], "user": ["a", "NA", "", "b"][i % 4],
           "country": ["fr", "de"][i % 2], "clicked": str(i % 2)} for i in range(24)]
  write_csv(tmp_path / "events.csv", rows)
  spec = {"format": {"type": "csv", "missing_values": ["", "NA"]},
          "files": ["events.csv"], "split": {"split_column": "split"},
          "features": [{"name": "user", "type": "categorical"},
                       {"name": "country", "type": "categorical", "missing": "error"}],
          "tasks": [{"name": "click", "label_column": "clicked"}]}
  prep = prepared.load_prepared(
      prepare.prepare(write_spec(tmp_path, spec), tmp_path / "cache").path).preprocessing
  assert prep.categorical_missing == ("value", "error")
  assert prep_lib.Preprocessing.from_json(prep.to_json()) == prep
  # Prepared before the policy was recorded: the reused directory gets it, as prepared now.
  path = pathlib.Path(prepare.prepare(write_spec(tmp_path, spec), tmp_path / "cache").path,
                      prepared.PREPROCESSING_FILE)
  written = path.read_text()
  old = json.loads(written)
  del old["categorical_missing"]
  path.write_text(json.dumps(old))
  assert prepare.prepare(write_spec(tmp_path, spec), tmp_path / "cache").reused
  assert path.read_text() == written
  graph = tf.function(serving.RawFeatureEncoder(prep), autograph=False)
  ok = {"user": np.array(["NA", "a"]), "country": np.array(["fr", " NA"])}
  want = [[0, 1], [1, 2]]  # user "NA" is missing (""); country " NA" is an unseen value (OOV)
  np.testing.assert_array_equal(prep_lib.encode(ok, prep)["categorical"], want)
  np.testing.assert_array_equal(graph({k: tf.constant(v) for k, v in ok.items()})
                                ["categorical"].numpy(), want)
  for country in (["de", "NA"], ["de", ""], np.array(["de", None], dtype=object),
                  np.array(["de", np.float32("nan")], dtype=object)):
    bad = dict(ok, country=np.asarray(country))
    with pytest.raises(ValueError, match="'country', row 1: the value is missing"):
      prep_lib.encode(bad, prep)
    if all(isinstance(v, str) for v in country):
      with pytest.raises(tf.errors.InvalidArgumentError,
                         match="feature country: a value is missing"):
        graph({k: tf.constant(v) for k, v in bad.items()})


def test_number_like_missing_values_are_missing_when_served(tmp_path):
  """``format.missing_values`` ["", "-1"]: a numeric feature's -1 is missing in preparation (and
  so is "-1.0", the same float32); the NumPy and graph encoders, sent -1.0, read it so too."""
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  tf = serving.tf
  n = ["-1", "10", "-1.0", "20", "", "7", "-1", "3", "12", "5"]
  rows = [{"split": ["train", "validation", "test"][i % 3], "c": "a", "n": n[i % 10],
           "m": "-1" if n[(i + 2) % 10] in ("", "-1.0") else n[(i + 2) % 10],
           "clicked": str(i % 2)} for i in range(60)]
  write_csv(tmp_path / "events.csv", rows)
  spec = {"format": {"type": "csv", "missing_values": ["", "-1", "NA"]},
          "files": ["events.csv"], "split": {"split_column": "split"},
          "features": [{"name": "c", "type": "categorical"},
                       {"name": "n", "type": "numeric", "missing": "indicator"},
                       {"name": "m", "type": "numeric", "missing": {"fill": 4.0}}],
          "tasks": [{"name": "click", "label_column": "clicked"}]}
  data = prepared.load_prepared(
      prepare.prepare(write_spec(tmp_path, spec), tmp_path / "cache").path)
  prep = data.preprocessing
  assert prep.numeric_missing_values == ((-1.0,), (-1.0,))
  assert prep_lib.Preprocessing.from_json(prep.to_json()) == prep
  encoder = tf.function(serving.RawFeatureEncoder(prep), autograph=False)
  for split in prepared.SPLITS:
    part = _split(rows, split)
    raw = {"c": np.array([r["c"] for r in part]),
           "n": np.array([np.nan if r["n"] == "" else float(r["n"]) for r in part], np.float32),
           "m": np.array([float(r["m"]) for r in part], np.float32)}
    want = data.arrays[split]
    np.testing.assert_array_equal(want["categorical"][:, 1], np.isnan(raw["n"]) | (raw["n"] == -1))
    assert (raw["n"] == -1).any() and (raw["m"] == -1).any()
    for got in (prep_lib.encode(raw, prep),
                {k: v.numpy() for k, v in encoder({k: tf.constant(v) for k, v in raw.items()}
                                                  ).items()}):
      np.testing.assert_array_equal(got["categorical"], want["categorical"])
      np.testing.assert_allclose(got["numeric"], want["numeric"], atol=1e-6, rtol=0)
  # Under policy 'error' the number is refused as missing, by name.
  strict = dataclasses.replace(prep, numeric_missing=("indicator", "error"),
                               numeric_fills=(None, None))
  bad = {"c": np.array(["a"]), "n": np.array([-1.0], np.float32), "m": np.array([-1.0], np.float32)}
  with pytest.raises(ValueError, match=r"'m', row 0: the value is missing \(NaN or one of "
                                       r"\[-1.0\]\)"):
    prep_lib.encode(bad, strict)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"feature m: a value is missing \(NaN or one of \[-1.0\]\)"):
    serving.RawFeatureEncoder(strict)({k: tf.constant(v) for k, v in bad.items()})
  # The export's metadata tells a client so, in words and per field.
  text = export_lib.missing_values_text(prep)["numeric"]
  assert text.startswith("send NaN (or, for n, m, one of [-1.0]): "), text
  # A preprocessing.json written before: no missing numbers.
  old = prep_lib.Preprocessing.from_dict(
      {k: v for k, v in prep.to_dict().items() if k != "numeric_missing_values"})
  assert old.numeric_missing_values == ((), ())
  assert prep_lib.encode(bad, old)["categorical"][0, 1] == 0


def test_a_blank_category_is_missing_when_served_under_policy_error(tmp_path):
  """``"missing": "error"``: preparation refuses a value blank once stripped (" "), and so do
  the NumPy and graph encoders; under 'value' it is the value ""."""
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top  (TensorFlow)
  tf = serving.tf
  prep = prep_lib.Preprocessing(("u", "c"), (), (("", "a"), ("a", "b")), (), (), "none",
                                categorical_missing=("value", "error"))
  graph = tf.function(serving.RawFeatureEncoder(prep), autograph=False)
  ok = {"u": np.array([" ", "a"]), "c": np.array(["a", " b "])}
  np.testing.assert_array_equal(prep_lib.encode(ok, prep)["categorical"], [[0, 0], [1, 1]])
  np.testing.assert_array_equal(graph({k: tf.constant(v) for k, v in ok.items()})
                                ["categorical"].numpy(), [[0, 0], [1, 1]])
  for blank in (" ", "", "\t "):
    bad = dict(ok, c=np.array(["a", blank]))
    with pytest.raises(ValueError, match="'c', row 1: the value is missing"):
      prep_lib.encode(bad, prep)
    with pytest.raises(tf.errors.InvalidArgumentError, match="feature c: a value is missing"):
      graph({k: tf.constant(v) for k, v in bad.items()})
