"""The dataset spec (apem_jax.data.spec), spec inference (apem_jax.data.infer) and the apem-data
command line. Every data file is written here by the test."""

from __future__ import annotations

import copy
import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apem_jax.data import infer
from apem_jax.data import prepare
from apem_jax.data import prepared
from apem_jax.data import spec as spec_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

VALID = {
    "format": {"type": "csv", "delimiter": ",", "missing_values": ["", "NA"]},
    "files": ["events.csv"],
    "split": {"hash_column": "user_id",
              "fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}},
    "features": [
        {"name": "user_id", "type": "categorical", "num_buckets": 1024},
        {"name": "country", "type": "categorical", "min_count": 2, "max_size": 100},
        {"name": "price", "type": "numeric", "transform": "log1p", "buckets": 16,
         "missing": {"fill": 0}},
        {"name": "age", "type": "numeric", "missing": "indicator"},
    ],
    "weight_column": "w",
    "tasks": [
        {"name": "click", "label_column": "clicked"},
        {"name": "purchase", "label_column": "bought", "positive_values": ["yes"],
         "negative_values": ["no"], "depends_on": "click"},
    ],
    "ignore": ["ts"],
}


def test_the_documented_example_is_valid():
  doc = spec_lib.__doc__
  example = doc[doc.index("  {\n"):doc.index("\n  }\n") + 4]
  spec = spec_lib.parse_spec(json.loads(example))
  assert [f.name for f in spec.features] == ["user_id", "country", "price", "age"]
  assert spec.tasks[1].depends_on == "click"


def test_a_valid_spec_with_its_defaults():
  spec = spec_lib.parse_spec(VALID)
  assert spec.format.missing_values == ("", "NA") and spec.format.quote_char == '"'
  assert spec.split_rule.hash_column == "user_id" and spec.split_rule.fractions == (0.8, 0.1, 0.1)
  price = spec.features[2]
  assert (price.transform, price.buckets, price.missing, price.fill) == ("log1p", 16, "fill", 0.0)
  assert spec.features[3].missing == "indicator" and spec.features[1].missing == "value"
  assert spec.features[0].hashed and not spec.features[1].hashed
  assert spec.tasks[0].kind == "binary" and spec.tasks[0].missing == "error"
  assert spec.used_columns() == ("user_id", "country", "price", "age", "clicked", "bought", "w")
  assert spec.inconsistent_funnel == "error"
  d = spec.to_dict()
  assert d["features"][1]["min_count"] == 2 and json.loads(json.dumps(d)) == d


def _edit(path: str, value):
  """A copy of VALID with the key at ``path`` (dots and [i]) set to ``value`` (or deleted if
  value is ...)."""
  spec = copy.deepcopy(VALID)
  keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
  node = spec
  for k in keys[:-1]:
    node = node[k]
  if value is ...:
    del node[keys[-1]]
  else:
    node[keys[-1]] = value
  return spec


@pytest.mark.parametrize("path,value,message", [
    ("features.1.type", "catgorical",
     "spec.json: features[1].type: 'catgorical' is not one of ['categorical', 'numeric']"),
    ("colour", "red", "spec.json: colour: unknown key (known: ['features', 'files', 'format', "
     "'ignore', 'inconsistent_funnel', 'split', 'splits', 'tasks', 'weight_column'])"),
    ("features.0.num_bucket", 8, "spec.json: features[0].num_bucket: unknown key"),
    ("features.2.buckets", "16", "spec.json: features[2].buckets: expected an integer, got '16'"),
    ("features.1.min_count", 0, "spec.json: features[1].min_count: 0 is less than the minimum 1"),
    ("features.2.missing", "zero",
     "spec.json: features[2].missing: 'zero' is not 'error', 'indicator' or {\"fill\": <number>}"),
    ("features.2.missing", {"fill": "0"},
     "spec.json: features[2].missing.fill: expected a number, got '0'"),
    ("tasks.0.label_column", ..., "spec.json: tasks[0]: missing required key 'label_column'"),
    ("tasks.0.kind", "classification",
     "spec.json: tasks[0].kind: 'classification' is not one of ['binary', 'regression']"),
    ("tasks", [], "spec.json: tasks: expected at least 1 item, got 0"),
    ("format", "xlsx", "spec.json: format: 'xlsx' is not one of ['csv', 'parquet', 'tfrecord'] "
     "or an object with 'type'"),
    ("format.delimiter", ";;", "spec.json: format.delimiter: ';;' is longer than 1 character"),
    ("features.0.min_count", 2, "spec.json: features[0]: num_buckets (hashing) cannot be "
     "combined with min_count or max_size (a vocabulary)"),
    ("tasks.1.depends_on", "view", "spec.json: tasks[1].depends_on: 'view' must name an earlier "
     "task (earlier: ['click'])"),
    ("split.fractions.test", 0.2, "spec.json: split.fractions: must add up to 1, got 1.1"),
    ("split", ..., "spec.json: missing required key 'split'"),
    ("splits", {"train": ["a.csv"], "validation": ["b.csv"], "test": ["c.csv"]},
     "spec.json: files: give either 'splits' (files per split) or 'files' with a 'split' rule"),
    ("tasks.0.label_column", "country", "spec.json: tasks[0].label_column: 'country' is also a "
     "feature (features[1]): a label cannot be an input"),
    ("weight_column", "age", "spec.json: weight_column: 'age' is already a feature or a label"),
    ("ignore", ["ts", "price"], "spec.json: ignore[1]: 'price' is used by the spec"),
    ("features.3.name", "price", "spec.json: features[3].name: 'price' is already features[2]"),
    ("tasks.1.negative_values", ["yes"], "spec.json: tasks[1].negative_values: 'yes' is also a "
     "positive value"),
    ("tasks.0.threshold", 0.5, None),  # valid: a binary task from a numeric column
    # Hash ids are int32 (preprocessing requires num_buckets < 2**31).
    ("features.0.num_buckets", 2**31, "spec.json: features[0].num_buckets: 2147483648 is more "
     "than the maximum 2147483647"),
    ("features.0.num_buckets", 2**31 - 1, None),
    ("features.2.buckets", 2**16 + 1, "spec.json: features[2].buckets: 65537 is more than the "
     "maximum 65536"),
    ("features.2.buckets", 2**16, None),
    # A non-finite float (only a Python caller can pass one: JSON has none).
    ("features.2.missing.fill", float("inf"),
     "spec.json: features[2].missing.fill: expected a finite number, got Infinity"),
    ("tasks.0.threshold", float("nan"), "spec.json: tasks[0].threshold: expected a finite "
     "number, got NaN"),
    # A list or object where a variant's name goes was a TypeError (unhashable) traceback.
    ("features.1.type", ["categorical"], "spec.json: features[1].type: [\"categorical\"] is not "
     "one of ['categorical', 'numeric']"),
    ("format.type", {"csv": True}, "spec.json: format.type: {\"csv\": true} is not one of"),
    # A character the CSV reader refuses failed at preparation without naming the key.
    ("format.delimiter", "§", "spec.json: format.delimiter: '§': expected one ASCII character "
     "other than a line break"),
    ("format.delimiter", "\n", "spec.json: format.delimiter: '\\n': expected one ASCII"),
    ("format.quote_char", "«", "spec.json: format.quote_char: '«': expected one ASCII"),
    # A boolean among numbers: [true, 2] labelled 2 negative, [2, true] refused 'true'.
    ("tasks.1.positive_values", [True, 2], "spec.json: tasks[1].positive_values: give all "
     "strings, all numbers or all booleans, not a mix (true, 2)"),
    ("tasks.1.positive_values", [2, True], "spec.json: tasks[1].positive_values: give all "),
])
def test_validation_errors_name_the_key_and_what_was_expected(path, value, message):
  spec = _edit(path, value)
  if message is None:
    spec_lib.parse_spec(spec)
    return
  with pytest.raises(spec_lib.SpecError) as info:
    spec_lib.parse_spec(spec, source="spec.json")
  assert str(info.value).startswith(message), str(info.value)
  assert "\n" not in str(info.value)


def test_load_spec_errors(tmp_path):
  with pytest.raises(spec_lib.SpecError, match=r"nope.json: the spec file does not exist"):
    spec_lib.load_spec(tmp_path / "nope.json")
  (tmp_path / "bad.json").write_text('{"format": "csv",\n "files": [}')
  with pytest.raises(spec_lib.SpecError, match=r"bad.json: not valid JSON: .* at line 2 column"):
    spec_lib.load_spec(tmp_path / "bad.json")


def test_label_values_lose_the_whitespace_around_them_as_the_data_does():
  """The data's texts are compared stripped; the spec's were not: "yes " matched no row and
  every label was 0."""
  spec = _edit("tasks.1.positive_values", [" yes "])
  spec["tasks"][1]["negative_values"] = ["no\t"]
  purchase = spec_lib.parse_spec(spec).tasks[1]
  assert purchase.positive_values == ("yes",) and purchase.negative_values == ("no",)


def test_load_spec_refuses_a_key_given_twice(tmp_path):
  """JSON keeps the last of a repeated key: {"type": "numeric", "type": "categorical"} was a
  categorical feature, silently."""
  text = json.dumps(VALID).replace('"type": "numeric", "transform": "log1p"',
                                   '"type": "numeric", "type": "categorical", "transform": "log1p"')
  (tmp_path / "spec.json").write_text(text)
  with pytest.raises(spec_lib.SpecError) as info:
    spec_lib.load_spec(tmp_path / "spec.json")
  assert str(info.value) == (f"{tmp_path / 'spec.json'}: features[2].type: the key is given "
                             f"twice (JSON keeps the last one); give it once")


@pytest.mark.parametrize("edit,message", [
    (('"threshold": 0.5', '"threshold": NaN'), "spec.json: tasks[0].threshold: NaN is not a "
     "JSON number (JSON has no NaN or Infinity)"),
    (('{"fill": 0}', '{"fill": Infinity}'), "spec.json: features[0].missing.fill: Infinity is "
     "not a JSON number (JSON has no NaN or Infinity)"),
    (('"positive_values": [1]', '"positive_values": [1, -Infinity]'),
     "spec.json: tasks[1].positive_values[1]: -Infinity is not a JSON number"),
    # A number too large for a float reads as infinite: refused too.
    (('{"fill": 0}', '{"fill": 1e400}'), "spec.json: features[0].missing.fill: expected a finite "
     "number, got Infinity"),
])
def test_load_spec_refuses_nan_and_infinity(tmp_path, edit, message):
  """Python's json reads NaN / Infinity / -Infinity (not JSON): a NaN threshold would make every
  label negative, an infinite fill would fail only after the preparation."""
  spec = {"format": "csv", "files": ["x.csv"], "split": {"fractions": {
              "train": 0.8, "validation": 0.1, "test": 0.1}},
          "features": [{"name": "x", "type": "numeric", "missing": {"fill": 0}}],
          "tasks": [{"name": "y", "label_column": "y", "threshold": 0.5},
                    {"name": "z", "label_column": "z", "positive_values": [1]}]}
  text = json.dumps(spec)
  assert edit[0] in text
  (tmp_path / "spec.json").write_text(text.replace(*edit))
  with pytest.raises(spec_lib.SpecError) as info:
    spec_lib.load_spec(tmp_path / "spec.json")
  assert str(info.value).startswith(f"{tmp_path / 'spec.json'}: ") and "\n" not in str(info.value)
  assert str(info.value)[len(str(tmp_path)) + 1:].startswith(message), str(info.value)


@pytest.mark.parametrize("names,index,message", [
    (["user", "unit price"], 1, "feature 'unit price' cannot name a SavedModel input (TensorFlow "
     "takes names matching [A-Za-z0-9.][A-Za-z0-9_.\\-/]*); rename the column"),
    (["_id", "x"], 0, "feature '_id' cannot name a SavedModel input"),
    (["Price", "user", "price"], 2, "features 'Price' and 'price' differ only in case, which a "
     "SavedModel's input names do not tell apart; rename one"),
])
def test_a_feature_name_no_savedmodel_input_can_take_is_refused(names, index, message):
  """The exported model names its inputs by feature: a name TensorFlow refuses fails at the
  spec, not after preparation and training."""
  with pytest.raises(ValueError) as info:
    spec_lib.check_feature_names(names)
  assert str(info.value).startswith(message), str(info.value)
  spec_lib.check_feature_names(("user", "unit_price", "a.b", "x-1", "9lives", "a/b", ".x"))
  spec = _edit("features", [{"name": n, "type": "categorical"} for n in names])
  with pytest.raises(spec_lib.SpecError) as info:
    spec_lib.parse_spec(spec, source="spec.json")
  assert str(info.value).startswith(f"spec.json: features[{index}].name: {message}"), (
      str(info.value))
  assert "\n" not in str(info.value)
  # Columns that are not inputs (labels, the weight, ignored) may have any name.
  spec = _edit("ignore", ["ts", "a b", "_x"])
  spec["weight_column"] = "Sample Weight"
  spec_lib.parse_spec(spec)


def test_an_unnamed_last_column_can_be_ignored(tmp_path):
  """Lines that end with the delimiter have an unnamed last column ``""``: the error says to
  list it in "ignore", and that works."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  (tmp_path / "x.csv").write_text("c,y,\na,1,\nb,0,\n")
  spec = {"format": "csv", "files": ["x.csv"],
          "split": {"fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}},
          "features": [{"name": "c", "type": "categorical"}],
          "tasks": [{"name": "y", "label_column": "y"}]}
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  with pytest.raises(ValueError, match=r"column '' is not in .*or list it in \"ignore\""):
    prepare.check_files(spec_lib.load_spec(tmp_path / "spec.json"))
  spec["ignore"] = [""]
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  prepare.check_files(spec_lib.load_spec(tmp_path / "spec.json"))
  # Only "ignore" takes an empty name.
  with pytest.raises(spec_lib.SpecError, match=r"spec.json: features\[0\].name: must not be "
                     r"empty"):
    spec_lib.parse_spec(_edit("features.0.name", ""), source="spec.json")


def test_files_resolve_relative_to_the_spec_and_must_exist(tmp_path):
  (tmp_path / "data").mkdir()
  for name in ("b.csv", "a.csv", "c.csv"):
    (tmp_path / "data" / name).write_text("x\n")
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(_edit("files", ["data/*.csv"])))
  files = spec_lib.resolve_files(spec_lib.load_spec(spec_path))
  assert [pathlib.Path(f.path).name for f in files["all"]] == ["a.csv", "b.csv", "c.csv"]
  assert all(f.size == 2 and f.mtime_ns > 0 for f in files["all"])

  def fails(spec, match):
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(spec_lib.SpecError, match=match):
      spec_lib.resolve_files(spec_lib.load_spec(spec_path))
  fails(_edit("files", ["data/*.tsv"]), r"spec.json: files\[0\]: no file matches 'data/\*.tsv'")
  fails(_edit("files", ["data/a.csv", "data/d.csv"]),
        r"spec.json: files\[1\]: 'data/d.csv' does not exist")
  fails(_edit("files", ["data"]), r"spec.json: files\[0\]: 'data' is a directory, not a file")
  splits = {"train": ["data/*.csv"], "validation": ["data/b.csv"], "test": ["data/c.csv"]}
  spec = _edit("split", ...)
  del spec["files"]
  spec["splits"] = splits
  fails(spec, r"splits.validation\[0\]: .*b.csv is also matched by splits.train\[0\]")


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------

def _events(n: int = 3000, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    click = rng.random() < 0.3
    rows.append({
        "user_id": f"u{rng.integers(0, 2500)}",          # id-like, many values: hashed
        "country": rng.choice(["fr", "de", "us"]),
        "price": f"{rng.lognormal(1, 2):.2f}",          # heavy tail: log1p
        "rating": "" if i % 9 == 0 else f"{rng.normal(3, 1):.3f}",  # missing: indicator
        "slot": str(rng.integers(0, 5)),                 # small integer: categorical
        "constant": "x",
        "click": str(int(click)),
        "conversion": str(int(click and rng.random() < 0.3)),
    })
  return rows


def _write_csv(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def test_infer_guesses_types_ids_tasks_and_the_funnel(tmp_path):
  _write_csv(tmp_path / "events.csv", _events())
  spec, notes = infer.infer_spec([str(tmp_path / "events.csv")], output_dir=str(tmp_path))
  features = {f["name"]: f for f in spec["features"]}
  assert set(features) == {"user_id", "country", "price", "rating", "slot"}
  assert features["user_id"]["type"] == "categorical" and features["user_id"]["num_buckets"] >= 8192
  assert features["country"] == {"name": "country", "type": "categorical"}
  assert features["price"]["type"] == "numeric" and features["price"]["transform"] == "log1p"
  assert features["rating"]["missing"] == "indicator" and "transform" not in features["rating"]
  assert features["slot"]["type"] == "categorical"
  assert spec["ignore"] == ["constant"]
  assert spec["tasks"] == [{"name": "click", "label_column": "click"},
                           {"name": "conversion", "label_column": "conversion",
                            "depends_on": "click"}]
  assert spec["split"] == {"hash_column": "user_id",
                           "fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}}
  assert spec["files"] == ["events.csv"]  # relative to where the spec goes
  assert any("user_id: categorical, hashed" in n for n in notes)


def test_infer_reads_parquet_and_finds_a_split_column(tmp_path):
  rows = _events(500)
  table = pa.table({"user": [r["user_id"] for r in rows],
                    "price": [float(r["price"]) for r in rows],
                    "clicked": [r["click"] == "1" for r in rows],
                    "split": ["train", "valid", "test", "train", "train"] * 100})
  pq.write_table(table, tmp_path / "events.parquet")
  spec, _ = infer.infer_spec([str(tmp_path / "events.parquet")], output_dir=str(tmp_path))
  assert spec["format"] == "parquet"
  assert spec["split"] == {"split_column": "split", "values": {
      "test": ["test"], "train": ["train"], "validation": ["valid"]}}
  assert spec["tasks"] == [{"name": "clicked", "label_column": "clicked"}]


def test_infer_takes_a_split_column_in_any_case_and_refuses_one_it_sees_partly(tmp_path):
  """A split column of Train/Valid/Test, or one whose sample holds two splits, fell through to a
  categorical feature and an 80/10/10 hash split: the user's test rows reached training."""
  rows = _events(300)
  for row, name in zip(rows, ["Train", "Valid", "Test"] * 100):
    row["split"] = name
  _write_csv(tmp_path / "cased.csv", rows)
  spec, _ = infer.infer_spec([str(tmp_path / "cased.csv")], output_dir=str(tmp_path))
  assert spec["split"] == {"split_column": "split", "values": {
      "test": ["Test"], "train": ["Train"], "validation": ["Valid"]}}
  assert "split" not in [f["name"] for f in spec["features"]]
  for row, name in zip(rows, ["train", "test"] * 150):
    row["split"] = name
  _write_csv(tmp_path / "two.csv", rows)
  with pytest.raises(ValueError, match=r"column 'split' names the split of each row, but the "
                                       r"sampled rows hold only \['test', 'train'\]"):
    infer.infer_spec([str(tmp_path / "two.csv")], output_dir=str(tmp_path))


def test_infer_keeps_files_named_by_split_apart(tmp_path):
  """train.csv, valid.csv and test.csv were pooled and hash-split 80/10/10: the user's test rows
  reached training. Their names give the splits; two of three are refused."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  rows = _events(300)
  for i, name in enumerate(("train", "valid", "test")):
    _write_csv(tmp_path / f"{name}.csv", rows[100 * i:100 * (i + 1)])
  paths = [str(tmp_path / f"{name}.csv") for name in ("train", "valid", "test")]
  spec, _ = infer.infer_spec(paths, output_dir=str(tmp_path))
  assert "files" not in spec and "split" not in spec
  assert spec["splits"] == {"train": ["train.csv"], "validation": ["valid.csv"],
                            "test": ["test.csv"]}
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  result = prepare.prepare(tmp_path / "spec.json", tmp_path / "cache")
  assert {k: sum(s["rows"] for s in v["shards"]) for k, v in result.metadata["splits"].items()
          } == {"train": 100, "validation": 100, "test": 100}
  with pytest.raises(ValueError, match=r"the files' names give the splits \['test', 'train'\] "
                                       r"and no file for \['validation'\]"):
    infer.infer_spec([paths[0], paths[2]], output_dir=str(tmp_path))
  spec, _ = infer.infer_spec([paths[0]], output_dir=str(tmp_path))  # train.csv alone: hashed
  assert spec["files"] == ["train.csv"] and "fractions" in spec["split"]


def test_infer_reads_a_few_missing_value_texts_in_a_column_of_numbers(tmp_path):
  """A click label and a price with a few "N/A" were taken for categorical features (the label
  then an input beside the other tasks): the text becomes a missing value."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  rows = _events(300)
  for row in rows[::50]:
    row["click"], row["price"] = "N/A", "n/a"
  _write_csv(tmp_path / "events.csv", rows)
  spec, notes = infer.infer_spec([str(tmp_path / "events.csv")], output_dir=str(tmp_path))
  assert spec["format"]["missing_values"] == ["", "N/A", "n/a"]
  tasks = {t["name"]: t for t in spec["tasks"]}
  assert tasks["click"].get("missing") == "mask"
  assert {f["name"]: f["type"] for f in spec["features"]}["price"] == "numeric"
  assert "click" not in [f["name"] for f in spec["features"]]
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  prepare.prepare(tmp_path / "spec.json", tmp_path / "cache")


def test_infer_names_the_line_it_cannot_read_as_prepare_does(tmp_path):
  """A ragged line was "cannot read the rows after line 1"; a blank line was read as a row of
  missing values (turning on missing-value indicators and masks that prepare then refused)."""
  rows = ["user_id,price,click"] + [f"u{i},{i}.5,{i % 2}" for i in range(60)]
  (tmp_path / "ragged.csv").write_text("\n".join(rows[:40] + ["u9,1.5,0,extra"] + rows[40:]))
  with pytest.raises(ValueError, match=r"ragged.csv, line 41: 4 fields, expected 3"):
    infer.infer_spec([str(tmp_path / "ragged.csv")], output_dir=str(tmp_path))
  (tmp_path / "blank.csv").write_text("\n".join(rows) + "\n\n")
  with pytest.raises(ValueError, match=r"blank.csv, line 62: an empty line"):
    infer.infer_spec([str(tmp_path / "blank.csv")], output_dir=str(tmp_path))


def test_infer_without_a_label_says_what_to_do(tmp_path):
  _write_csv(tmp_path / "x.csv", [{"a": str(i % 3), "b": "q"} for i in range(50)])
  with pytest.raises(ValueError, match=r"no task found: .* name the label columns with --label"):
    infer.infer_spec([str(tmp_path / "x.csv")])


def test_infer_ignores_an_unnamed_column_and_names_no_input_can_take(tmp_path):
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  rows = ["city,Region,region,unit price,click,"]
  rows += [f"c{i % 4},r{i % 3},s{i % 5},{i * 1.5},{i % 2}," for i in range(60)]
  (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
  spec, notes = infer.infer_spec([str(tmp_path / "data.csv")], output_dir=str(tmp_path))
  assert [f["name"] for f in spec["features"]] == ["city", "Region"]
  assert spec["ignore"] == ["region", "unit price", ""]
  assert any(n.startswith("unit price: ignored (feature 'unit price' cannot name a SavedModel "
                          "input") for n in notes), notes
  assert any(n.startswith("'': ignored (an unnamed column") for n in notes), notes
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  prepare.check_files(spec_lib.load_spec(tmp_path / "spec.json"))


def test_infer_counts_nan_as_missing(tmp_path):
  """A float column's NaN is a missing value to the preparation: to infer too (a missing-value
  policy, distinct values without NaN, row-aligned labels)."""
  n = 200
  rng = np.random.default_rng(0)
  price = rng.normal(size=n) * 100
  price[5] = np.nan
  click = np.array([1.0, 0.0] * (n // 2))
  click[3] = np.nan
  purchase = np.where(np.arange(n) % 4 == 0, 1.0, 0.0)
  level = np.array([0.5, 1.5, np.nan, 2.5] * (n // 4))  # 3 distinct values and NaN
  pq.write_table(pa.table({"price": price, "level": level, "click": click,
                           "purchase": purchase, "user_id": [f"u{i % 37}" for i in range(n)],
                           "score": [str(x) for x in level]}),  # text NaN: no CSV key for it
                 tmp_path / "data.parquet")
  spec, notes = infer.infer_spec([str(tmp_path / "data.parquet")], output_dir=str(tmp_path))
  assert spec["format"] == "parquet"
  features = {f["name"]: f for f in spec["features"]}
  assert features["price"]["missing"] == "indicator"
  assert features["level"] == {"name": "level", "type": "numeric", "missing": "indicator"}
  assert any(n.startswith("level: numeric (3 distinct in the sample, 50 missing") for n in notes)
  tasks = {t["name"]: t for t in spec["tasks"]}
  assert tasks["click"]["missing"] == "mask" and "missing" not in tasks["purchase"]
  # The funnel is not guessed when a label has missing values (as with nulls).
  assert "depends_on" not in tasks["click"] and "depends_on" not in tasks["purchase"]


def test_infer_lists_the_csv_texts_read_as_nan_so_that_its_spec_prepares(tmp_path):
  """In a CSV the text NaN is read as a number by Arrow, and refused by the preparation unless
  format.missing_values lists it: the inferred spec lists the spellings seen (tab-separated
  here: the delimiter is kept), and prepares, the NaN rows missing."""
  lines = ["split\tprice\tlevel\tclick\tuser_id"]
  for i in range(120):
    price = "NaN" if i % 10 == 3 else f"{(i * 7) % 50 + 0.5}"
    level = "nan" if i % 4 == 1 else str(i % 4)
    lines.append(f"{['train', 'validation', 'test'][i % 3]}\t{price}\t{level}\t{i % 2}\tu{i % 9}")
  (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
  spec, notes = infer.infer_spec([str(tmp_path / "data.tsv")], output_dir=str(tmp_path))
  assert spec["format"] == {"type": "csv", "delimiter": "\t", "missing_values": ["", "NaN", "nan"]}
  assert "format.missing_values: ['', 'NaN', 'nan'] (the text NaN and nan is a missing value)" in (
      notes)
  features = {f["name"]: f for f in spec["features"]}
  assert features["price"]["missing"] == "indicator"
  assert features["level"]["type"] == "categorical"  # 3 integers: its nan is the missing ""
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  data = prepared.load_prepared(prepare.prepare(tmp_path / "spec.json", tmp_path / "cache").path)
  prep = data.preprocessing
  assert prep.vocabularies[prep.categorical_fields.index("level")] == ("", "0", "2", "3")
  column = prep.column_names.index("price_missing")
  train = [i for i in range(120) if i % 3 == 0]
  np.testing.assert_array_equal(data.arrays["train"]["categorical"][:, column],
                                [i % 10 == 3 for i in train])


def test_infer_funnel_compares_the_same_rows(tmp_path):
  """Label values stay row-aligned: a float label (NaN-free) and a string one (yes/no) are
  compared row by row."""
  n = 40
  click = np.array([1.0, 0.0] * (n // 2))
  bought = np.where(np.arange(n) % 4 == 0, "yes", "no")
  pq.write_table(pa.table({"f": [f"v{i % 5}" for i in range(n)], "click": click,
                           "bought": bought}), tmp_path / "data.parquet")
  spec, _ = infer.infer_spec([str(tmp_path / "data.parquet")], output_dir=str(tmp_path))
  assert spec["tasks"][1] == {"name": "bought", "label_column": "bought",
                              "positive_values": ["yes"], "negative_values": ["no"],
                              "depends_on": "click"}


@pytest.mark.parametrize("name,given", [("data.csv.gz", None), ("data.csv.bz2", None),
                                        ("data.gz", "csv")])
def test_infer_refuses_a_compressed_file(tmp_path, name, given):
  """The preparation reads files as they are: a compressed file is refused by name, not read as
  a header that is not UTF-8."""
  import gzip  # pylint: disable=g-import-not-at-top
  (tmp_path / name).write_bytes(gzip.compress(b"city,click\na,1\nb,0\n"))
  with pytest.raises(ValueError) as info:
    infer.infer_spec([str(tmp_path / name)], file_format=given)
  assert str(info.value) == (f"{tmp_path / name}: compressed files are not read; decompress it "
                             f"and give the decompressed file")


@pytest.mark.parametrize("flag", ["is_train", "train_flag", "in_test", "is_valid"])
def test_infer_refuses_a_split_flag_as_a_task(tmp_path, flag):
  """A 0/1 is_train was a binary task (train_flag a feature) and the rows were hash-split: no
  spec says "is_train 1: train", so the flag is refused, unless --label names it."""
  rows = _events(300)
  for i, row in enumerate(rows):
    row[flag] = str(int(i % 5 != 0))
  _write_csv(tmp_path / "events.csv", rows)
  with pytest.raises(ValueError) as info:
    infer.infer_spec([str(tmp_path / "events.csv")], output_dir=str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"column '{flag}' looks like a split flag") and "\n" not in message
  assert '"split_column"' in message and f"'{flag}' in \"ignore\"" in message
  spec, _ = infer.infer_spec([str(tmp_path / "events.csv")], output_dir=str(tmp_path),
                             labels=[flag])
  assert {"name": flag, "label_column": flag} in spec["tasks"]


def test_infer_refuses_a_label_of_class_ids(tmp_path):
  """A label of 0/1/2 (named like a label: no task) became a categorical input, silently."""
  rows = _events(300)
  for i, row in enumerate(rows):
    row["label"] = str(i % 3)
  _write_csv(tmp_path / "events.csv", rows)
  with pytest.raises(ValueError, match=r"^column 'label' is named like a label but holds the "
                                       r"values \[0, 1, 2\]: a task is binary \(0/1\) or a "
                                       r"regression; map it to 0/1 columns"):
    infer.infer_spec([str(tmp_path / "events.csv")], output_dir=str(tmp_path))
  spec, _ = infer.infer_spec([str(tmp_path / "events.csv")], output_dir=str(tmp_path),
                             labels=["label"])
  assert {"name": "label", "label_column": "label", "kind": "regression"} in spec["tasks"]


def test_infer_makes_a_label_of_two_other_numbers_binary(tmp_path):
  """--label y with values -1/1 became a regression task: it is binary, 1 positive, and the
  spec prepares with those labels."""
  lines = ["user_id,price,y"] + [f"u{i % 37},{i * 1.5},{1 if i % 3 == 0 else -1}"
                                 for i in range(300)]
  (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
  spec, notes = infer.infer_spec([str(tmp_path / "data.csv")], output_dir=str(tmp_path),
                                 labels=["y"])
  assert spec["tasks"] == [{"name": "y", "label_column": "y", "positive_values": [1],
                            "negative_values": [-1]}]
  assert any(n.startswith("y: task (binary, positive rate 0.3333, 1 positive and -1 negative")
             for n in notes), notes
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  data = prepared.load_prepared(prepare.prepare(tmp_path / "spec.json", tmp_path / "cache").path)
  labels = np.concatenate([data.arrays[s]["labels"][:, 0] for s in prepared.SPLITS])
  assert sorted(set(labels.tolist())) == [0.0, 1.0] and labels.sum() == 100


def test_infer_refuses_a_name_two_csv_columns_share(tmp_path):
  """Two header columns named 'a': infer kept one; prepare refused the file."""
  lines = ["a,price,click,a"] + [f"u{i % 7},{i * 1.5},{i % 2},{i % 3}" for i in range(60)]
  (tmp_path / "dup.csv").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError) as info:
    infer.infer_spec([str(tmp_path / "dup.csv")], output_dir=str(tmp_path))
  assert str(info.value) == f"{tmp_path / 'dup.csv'}: column 'a' appears twice; rename one of them"


def test_infer_reads_parquet_decimals_as_numbers_and_ignores_types_prepare_does_not_read(
    tmp_path):
  """Decimal, timestamp and date columns were categorical (prepare refused them); a list or
  struct column was a traceback. Such a column is ignored, with a note saying why (refused as a
  label the user names)."""
  import datetime  # pylint: disable=g-import-not-at-top
  import decimal  # pylint: disable=g-import-not-at-top
  n = 200
  base = {"price": [float(i) for i in range(n)], "click": [i % 2 for i in range(n)],
          "amount": pa.array([decimal.Decimal(i % 7) / 4 for i in range(n)],
                             pa.decimal128(10, 2)),
          "shop_id": pa.array([decimal.Decimal(i % 5) for i in range(n)], pa.decimal128(6, 0))}
  pq.write_table(pa.table(base), tmp_path / "dec.parquet")
  spec, _ = infer.infer_spec([str(tmp_path / "dec.parquet")], output_dir=str(tmp_path))
  types = {f["name"]: f["type"] for f in spec["features"]}
  assert types == {"price": "numeric", "amount": "numeric", "shop_id": "numeric"}
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  prepare.prepare(tmp_path / "spec.json", tmp_path / "cache")
  day = datetime.date(2020, 1, 1)
  for name, values, shown, todo in [
      ("ts", [datetime.datetime(2020, 1, 1, i % 24) for i in range(n)], "timestamp[us]",
       "convert it to a number (such as seconds since the epoch) or a string to use it"),
      ("day", [day + datetime.timedelta(days=i) for i in range(n)], "date32[day]",
       "convert it to a number (such as seconds since the epoch) or a string to use it"),
      ("tags", [["a", str(i)] for i in range(n)], "list<element: string>",
       "one value per row is read: make a column of each part to use it"),
      ("st", [{"a": i} for i in range(n)], "struct<a: int64>",
       "one value per row is read: make a column of each part to use it")]:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({**base, name: values}), path)
    spec, notes = infer.infer_spec([str(path)], output_dir=str(tmp_path))
    reason = (f"of Arrow type {shown}, which the preparation does not read: {todo}")
    assert name in spec["ignore"] and f"{name}: ignored ({reason})" in notes
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    prepare.prepare(tmp_path / "spec.json", tmp_path / f"cache_{name}")
    with pytest.raises(ValueError) as info:
      infer.infer_spec([str(path)], output_dir=str(tmp_path), labels=[name])
    assert str(info.value) == f"{path}: label column {name!r} is {reason}"


def _tf_feature(tf, value):
  if isinstance(value, str):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
  if isinstance(value, float):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def test_infer_takes_tfrecord_features_from_the_records_prepare_reads(tmp_path):
  """A feature the first record left out was not in the spec (prepare then refused the file);
  features are those of the first records, as prepare reads them, missing where left out."""
  from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as writer:
    for i in range(300):
      record = {"country": ["fr", "de", "us"][i % 3], "click": i % 2}
      if i % 4:
        record["price"] = i * 1.5
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          k: _tf_feature(tf, v) for k, v in record.items()})).SerializeToString())
  spec, _ = infer.infer_spec([str(tmp_path / "a.tfrecord")], output_dir=str(tmp_path))
  features = {f["name"]: f for f in spec["features"]}
  assert features["price"]["type"] == "numeric" and features["price"]["missing"] == "indicator"
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  prepare.prepare(tmp_path / "spec.json", tmp_path / "cache")
  with tf.io.TFRecordWriter(str(tmp_path / "b.tfrecord")) as writer:  # price as text
    writer.write(tf.train.Example(features=tf.train.Features(feature={
        "country": _tf_feature(tf, "fr"), "click": _tf_feature(tf, 1),
        "price": _tf_feature(tf, "3.5")})).SerializeToString())
  with pytest.raises(ValueError) as info:
    infer.infer_spec([str(tmp_path / "a.tfrecord"), str(tmp_path / "b.tfrecord")],
                     output_dir=str(tmp_path))
  assert str(info.value) == (f"{tmp_path / 'b.tfrecord'}: feature 'price' is a bytes_list, it "
                             f"is a float_list in {tmp_path / 'a.tfrecord'}")


def test_infer_reads_csv_values_with_spaces_as_prepare_does(tmp_path):
  """``a, 1.5, 0``: prepare reads 1.5 (Arrow's CSV reader drops the spaces around a number), the
  label 0 and the category fr (stripped); infer cast " 0" and " 1.5" as written, failed, and
  found no task (price and rating were categories). A blank " " is a missing number: listed."""
  rows = _events(300)
  for i, row in enumerate(rows):
    row["price"] = "" if i % 10 == 4 else row["price"]
    row["country"] += " " if i % 2 else ""  # "fr" and " fr ": one value
  lines = [",".join(rows[0])] + [", ".join(row.values()) for row in rows]  # "" is written " "
  (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
  spec, notes = infer.infer_spec([str(tmp_path / "events.csv")], output_dir=str(tmp_path))
  assert spec["format"] == {"type": "csv", "missing_values": ["", " "]}
  assert "format.missing_values: ['', ' '] (the text ' ' is a missing value)" in notes
  assert spec["tasks"] == [{"name": "click", "label_column": "click"},
                           {"name": "conversion", "label_column": "conversion",
                            "depends_on": "click"}]
  features = {f["name"]: f for f in spec["features"]}
  assert features["price"] == {"name": "price", "type": "numeric", "transform": "log1p",
                               "buckets": 32, "missing": "indicator"}
  assert features["rating"]["type"] == "numeric" and features["rating"]["missing"] == "indicator"
  assert features["country"] == {"name": "country", "type": "categorical"}
  assert "country: categorical, vocabulary (3 distinct in the sample)" in notes
  (tmp_path / "spec.json").write_text(json.dumps(spec))
  data = prepared.load_prepared(prepare.prepare(tmp_path / "spec.json", tmp_path / "cache").path)
  prep = data.preprocessing
  assert prep.vocabularies[prep.categorical_fields.index("country")] == ("de", "fr", "us")
  assert prep.vocabularies[prep.categorical_fields.index("slot")] == ("0", "1", "2", "3", "4")
  arrays = [data.arrays[s] for s in prepared.SPLITS]
  labels = np.concatenate([a["labels"] for a in arrays])
  np.testing.assert_array_equal(labels.sum(0), [sum(int(r[t]) for r in rows)
                                                for t in ("click", "conversion")])
  column = prep.column_names.index("price_missing")
  assert sum(int(a["categorical"][:, column].sum()) for a in arrays) == 30


@pytest.mark.parametrize("fmt", ["csv", "parquet", "tfrecord"])
def test_infer_sizes_hash_buckets_for_the_whole_input_not_the_sample(tmp_path, monkeypatch, fmt):
  """A mostly-unique column of 10,000 rows sampled by 2,000 got 8,192 buckets (4 per value seen);
  its distinct values are scaled by the input's rows (Parquet: the metadata; CSV, TFRecord: the
  bytes read), and the note says so. A sample of the whole input is sized as before."""
  from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  n = 10_000
  ids = [f"u{i:06d}" for i in range(n)]
  clicks = [i % 2 for i in range(n)]
  path = tmp_path / f"data.{fmt}"
  if fmt == "csv":
    path.write_text("user_id,click\n" + "".join(f"{u},{c}\n" for u, c in zip(ids, clicks)))
    monkeypatch.setattr(prepare, "CSV_SEGMENT_BYTES", 1 << 14)  # (the sample: the file's start)
  elif fmt == "parquet":
    pq.write_table(pa.table({"user_id": ids, "click": clicks}), path, row_group_size=1_000)
  else:
    tf = pipeline._import_tf()  # pylint: disable=protected-access
    with tf.io.TFRecordWriter(str(path)) as writer:
      for u, c in zip(ids, clicks):
        writer.write(tf.train.Example(features=tf.train.Features(feature={
            "user_id": _tf_feature(tf, u), "click": _tf_feature(tf, c)}
        )).SerializeToString())
  spec, notes = infer.infer_spec([str(path)], output_dir=str(tmp_path), sample_rows=2_000)
  assert spec["features"][0] == {"name": "user_id", "type": "categorical", "num_buckets": 65_536}
  of = "" if fmt == "parquet" else "about "
  assert notes[0] == f"read 2,000 rows of {of}10,000 from 1 file(s) ({fmt})"
  assert (f"user_id: categorical, hashed into 65,536 buckets (2,000 distinct values in 2,000 "
          f"sampled rows; sized for about 10,000 values, estimated from 2,000 sampled rows of "
          f"{of}10,000)") in notes
  spec, notes = infer.infer_spec([str(path)], output_dir=str(tmp_path), sample_rows=n)
  assert notes[0] == f"read 10,000 rows from 1 file(s) ({fmt})"
  assert spec["features"][0]["num_buckets"] == 65_536
  assert ("user_id: categorical, hashed into 65,536 buckets (10,000 distinct values in 10,000 "
          "sampled rows)") in notes
  monkeypatch.setattr(infer, "MAX_BUCKETS", 1 << 14)
  spec, notes = infer.infer_spec([str(path)], output_dir=str(tmp_path), sample_rows=2_000)
  assert spec["features"][0]["num_buckets"] == 1 << 14
  assert any(note.startswith("user_id: categorical, hashed into 16,384 buckets") and
             note.endswith("; capped at 16,384 buckets)") for note in notes), notes


@pytest.mark.parametrize("column, values, message", [
    ("country", np.array(["fr", 1.5] * 20, dtype=object),
     r"split 'train', categorical column 'country': categorical values of types \['float', "
     r"'str'\]"),
    ("country", np.array([b"fr", "de"] * 20, dtype=object),
     r"split 'train', categorical column 'country': categorical values of types \['bytes', "
     r"'str'\]"),
    ("price", np.zeros((40, 2)),
     r"split 'train', column 'price': values of shape \(40, 2\); expected one value per row"),
    ("click", np.zeros((40, 1)),
     r"split 'train', column 'click': values of shape \(40, 1\); expected one value per row"),
    ("click", np.array([b"x", b"1"] * 20),  # (named before too; b"" is a missing label)
     r"split 'train', label column 'click': b'x' is not a number"),
])
def test_dataset_from_columns_errors_name_the_column(column, values, message):
  """A mixed-type categorical column and a 2-D column were refused without the column's name."""
  from apem_jax.data import columns as columns_lib  # pylint: disable=g-import-not-at-top
  def table(**change):
    return {"country": np.array(["fr", "de"] * 20), "price": np.arange(40.0),
            "click": np.array([0, 1] * 20), **change}
  with pytest.raises(ValueError, match=message):
    columns_lib.dataset_from_columns({"train": table(**{column: values}), "validation": table()},
                                     categorical=["country"], numeric=["price"], tasks=["click"])


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def _apem_data(*args, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "apem_jax.data_main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_command_line_infer_validate_prepare_and_one_line_errors(tmp_path):
  _write_csv(tmp_path / "events.csv", _events(400))
  out = _apem_data("infer", "events.csv", "--output", "spec.json", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert "wrote spec.json: 5 features, 2 tasks" in out.stdout
  spec = json.loads((tmp_path / "spec.json").read_text())
  # user_id has 400 rows of ~2,500 ids here: fewer than the hashing threshold, but id-like.
  assert spec["tasks"][1]["depends_on"] == "click"
  again = _apem_data("infer", "events.csv", "--output", "spec.json", cwd=tmp_path)
  assert again.returncode == 1
  assert again.stderr.strip() == ("apem-data: error: --output spec.json exists; give "
                                  "--overwrite to replace it")
  # A directory as --output: refused before anything is written (it left 'out.tmp' behind).
  (tmp_path / "out").mkdir()
  again = _apem_data("infer", "events.csv", "--output", "out", "--overwrite", cwd=tmp_path)
  assert again.stderr.strip() == ("apem-data: error: --output out is a directory; expected the "
                                  "spec file's path")
  assert not (tmp_path / "out.tmp").exists() and not os.listdir(tmp_path / "out")

  out = _apem_data("validate", "spec.json", cwd=tmp_path)
  assert out.returncode == 0 and "spec.json: valid" in out.stdout, out.stderr

  spec["features"][0]["type"] = "catgorical"
  (tmp_path / "bad.json").write_text(json.dumps(spec))
  out = _apem_data("validate", "bad.json", cwd=tmp_path)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip() == ("apem-data: error: bad.json: features[0].type: 'catgorical' is "
                                "not one of ['categorical', 'numeric']")

  lines = (tmp_path / "events.csv").read_text().splitlines()
  lines[7] += ",extra"
  (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
  out = _apem_data("prepare", "spec.json", "--data_dir", "cache", cwd=tmp_path)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().startswith("apem-data: error: ")
  assert out.stderr.strip().endswith("events.csv, line 8: 9 fields, expected 8 (the columns of "
                                     "the header; a value may not hold a line break)")
  assert len(out.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "cache").exists()
