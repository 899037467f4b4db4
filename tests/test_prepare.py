"""Streamed preparation (apem_jax.data.prepare), the shard format (apem_jax.data.prepared) and
training on a spec (data.name='spec').

Every input file here is written by the test itself (Python's csv module, pyarrow, TensorFlow's
tf.train.Example), not by the project's generators; the expected encodings come from the in-memory
path (``preprocessing.fit_preprocessing`` / ``encode``) on the same raw values.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import time

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apem_jax.data import files as files_lib
from apem_jax.data import pipeline
from apem_jax.data import prepare
from apem_jax.data import prepared
from apem_jax.data import preprocessing as prep_lib
from apem_jax.data import spec as spec_lib

COUNTRIES = ["fr", "de", " us ", "jp", "br"]  # " us " is stripped to "us"
DEVICES = ["ios", "android", "web"]


def make_rows(n: int = 600, seed: int = 0) -> list[dict]:
  """A click -> purchase funnel with string categories, split by a column (8:1:1)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    click = rng.random() < 0.35
    buy = bool(click and rng.random() < 0.4)
    rows.append({
        "split": "validation" if i % 10 == 8 else "test" if i % 10 == 9 else "train",
        "user": f"u{int(rng.zipf(1.5)) % 60}",
        "country": COUNTRIES[int(rng.integers(0, len(COUNTRIES)))],
        "device": DEVICES[int(rng.integers(0, len(DEVICES)))],
        "price": f"{rng.exponential(30):.3f}",
        "age": str(int(rng.integers(18, 80))),
        "clicked": str(int(click)),
        "bought": "yes" if buy else "no",
        "w": f"{rng.uniform(0.5, 2):.3f}",
        "ts": str(1_700_000_000 + i),
    })
  return rows


def write_csv(path: pathlib.Path, rows: list[dict], columns: list[str] | None = None) -> None:
  columns = columns or list(rows[0])
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([row[c] for c in columns])


def base_spec(files=("events.csv",), fmt="csv", **changes) -> dict:
  spec = {
      "format": fmt,
      "files": list(files),
      "split": {"split_column": "split"},
      "features": [
          {"name": "user", "type": "categorical"},
          {"name": "country", "type": "categorical"},
          {"name": "device", "type": "categorical"},
          {"name": "price", "type": "numeric", "transform": "log1p", "buckets": 8},
          {"name": "age", "type": "numeric", "transform": "log1p", "buckets": 8},
      ],
      "weight_column": "w",
      "tasks": [
          {"name": "click", "label_column": "clicked"},
          {"name": "purchase", "label_column": "bought", "positive_values": ["yes"],
           "negative_values": ["no"], "depends_on": "click"},
      ],
      "ignore": ["ts"],
  }
  spec.update(changes)
  return spec


def write_spec(directory: pathlib.Path, spec: dict, name: str = "spec.json") -> pathlib.Path:
  path = directory / name
  path.write_text(json.dumps(spec))
  return path


def all_files(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def raw_columns(rows: list[dict]) -> dict[str, np.ndarray]:
  return {"user": np.array([r["user"] for r in rows]),
          "country": np.array([r["country"] for r in rows]),
          "device": np.array([r["device"] for r in rows]),
          "price": np.array([float(r["price"]) for r in rows]),
          "age": np.array([float(r["age"]) for r in rows])}


@pytest.fixture
def funnel_csv(tmp_path):
  rows = make_rows()
  write_csv(tmp_path / "events.csv", rows)
  return tmp_path, rows


# ---------------------------------------------------------------------------------------------
# Correctness against the in-memory path
# ---------------------------------------------------------------------------------------------

def test_csv_matches_in_memory_preprocessing(funnel_csv):
  directory, rows = funnel_csv
  result = prepare.prepare(write_spec(directory, base_spec()), directory / "cache")
  assert not result.reused
  # Readable as a plain mkdir's directory would be (mkdtemp's 0700 stayed on it).
  assert result.path.stat().st_mode & 0o777 == 0o777 & ~files_lib.umask()
  by_split = {s: [r for r in rows if r["split"] == s] for s in prepared.SPLITS}
  expected_prep = prep_lib.fit_preprocessing(
      raw_columns(by_split["train"]), ["user", "country", "device"], ["price", "age"],
      numeric_transform="log1p", numeric_buckets=8)

  with open(result.path / prepared.PREPROCESSING_FILE) as f:
    prep = prep_lib.Preprocessing.from_json(f.read())
  assert prep.vocabularies == expected_prep.vocabularies
  assert "us" in prep.vocabularies[1] and " us " not in prep.vocabularies[1]
  np.testing.assert_allclose(prep.means, expected_prep.means, rtol=1e-12)
  np.testing.assert_allclose(prep.stds, expected_prep.stds, rtol=1e-12)
  for got, want in zip(prep.bucket_boundaries, expected_prep.bucket_boundaries):
    np.testing.assert_allclose(got, want, rtol=1e-6)  # all distinct values fit the sample

  data = prepared.load_prepared(result.path)
  assert data.schema.task_names == ("click", "purchase")
  assert data.schema.tasks[1].depends_on == "click"
  assert data.schema.vocab_sizes == tuple(len(v) for v in expected_prep.vocabularies)
  assert [f.boundaries for f in data.schema.numeric] == list(prep.bucket_boundaries)
  for split, split_rows in by_split.items():
    arrays = data.arrays[split]
    encoded = prep_lib.encode(raw_columns(split_rows), prep)
    np.testing.assert_array_equal(arrays["categorical"], encoded["categorical"])
    np.testing.assert_allclose(arrays["numeric"], encoded["numeric"], rtol=1e-6, atol=1e-6)
    click = np.array([float(r["clicked"]) for r in split_rows])
    buy = np.array([float(r["bought"] == "yes") for r in split_rows])
    np.testing.assert_array_equal(arrays["labels"], np.stack([click, buy], 1))
    np.testing.assert_array_equal(arrays["label_mask"], np.ones((len(split_rows), 2)))
    weight = prepared.read_split(result.path, split)["weight"]
    np.testing.assert_allclose(weight, [float(r["w"]) for r in split_rows], rtol=1e-6)
  assert data.inconsistent_funnel_rows == {"train": 0, "validation": 0, "test": 0}
  # Nothing else in the cache: the directory, no temporary one, no spill file.
  names = all_files(directory / "cache")
  assert not [n for n in names if ".tmp" in n or n.endswith(".arrow")], names


def test_a_header_with_spaces_after_its_delimiters_names_the_columns_without_them(funnel_csv):
  """``user, country, ...``: the names kept their leading space, so the spec's ``country`` was
  "not a column" (values lose theirs: ``fr`` for `` fr``)."""
  directory, rows = funnel_csv
  plain = prepare.prepare(write_spec(directory, base_spec()), directory / "cache")
  lines = (directory / "events.csv").read_text().splitlines()
  spaced = directory / "spaced"
  spaced.mkdir()
  (spaced / "events.csv").write_text(
      "\n".join([", ".join(lines[0].split(",")) + " "] + lines[1:]) + "\n")
  result = prepare.prepare(write_spec(spaced, base_spec()), spaced / "cache")
  a, b = prepared.load_prepared(plain.path), prepared.load_prepared(result.path)
  for split in prepared.SPLITS:
    for key in ("categorical", "numeric", "labels"):
      np.testing.assert_array_equal(a.arrays[split][key], b.arrays[split][key])


def test_exports_raw_feature_encoder_reproduces_the_prepared_arrays(funnel_csv):
  """preprocessing.json is what apem-export's in-graph encoder (serving.RawFeatureEncoder)
  reads: fed the raw validation values, it gives the prepared validation arrays."""
  from apem_jax.data import serving  # pylint: disable=g-import-not-at-top
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  directory, rows = funnel_csv
  data = pipeline.load_dataset(ml_collections.ConfigDict(dict(
      name="spec", spec=str(write_spec(directory, base_spec())),
      data_dir=str(directory / "cache"), stream=False)))  # the arrays, in memory
  encoder = serving.RawFeatureEncoder(data.preprocessing)
  validation = [r for r in rows if r["split"] == "validation"]
  raw = raw_columns(validation)
  features = {k: tf.constant(v) if v.dtype.kind == "U" else tf.constant(v, tf.float32)
              for k, v in raw.items()}
  out = encoder(features)
  np.testing.assert_array_equal(out["categorical"].numpy(),
                                data.arrays["validation"]["categorical"])
  np.testing.assert_allclose(out["numeric"].numpy(), data.arrays["validation"]["numeric"],
                             atol=1e-5)  # served values are float32


def _same_arrays(a: pipeline.DatasetSplits, b: pipeline.DatasetSplits) -> None:
  assert a.schema == b.schema
  for split in prepared.SPLITS:
    for key in a.arrays[split]:
      np.testing.assert_array_equal(a.arrays[split][key], b.arrays[split][key], err_msg=key)


def test_parquet_and_tfrecord_inputs_give_the_csv_result(funnel_csv):
  directory, rows = funnel_csv
  from_csv = prepared.load_prepared(
      prepare.prepare(write_spec(directory, base_spec()), directory / "cache").path)

  # Parquet: typed columns (floats, ints, strings) in two files.
  table = pa.table({
      "split": [r["split"] for r in rows], "user": [r["user"] for r in rows],
      "country": [r["country"] for r in rows], "device": [r["device"] for r in rows],
      "price": [float(r["price"]) for r in rows], "age": [int(r["age"]) for r in rows],
      "clicked": [int(r["clicked"]) for r in rows], "bought": [r["bought"] for r in rows],
      "w": [float(r["w"]) for r in rows], "ts": [int(r["ts"]) for r in rows]})
  pq.write_table(table.slice(0, 250), directory / "a.parquet")
  pq.write_table(table.slice(250), directory / "b.parquet")
  spec = base_spec(files=["*.parquet"], fmt="parquet")
  from_parquet = prepared.load_prepared(
      prepare.prepare(write_spec(directory, spec, "pq.json"), directory / "cache").path)
  _same_arrays(from_csv, from_parquet)

  # TFRecord of tf.train.Example, one value per feature.
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  with tf.io.TFRecordWriter(str(directory / "events.tfrecord")) as writer:
    for r in rows:
      feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[r[k].encode()]))
                 for k in ("split", "user", "country", "device", "bought")}
      feature["price"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(r["price"])]))
      for k in ("age", "clicked", "ts"):
        feature[k] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(r[k])]))
      feature["w"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(r["w"])]))
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())
  spec = base_spec(files=["events.tfrecord"], fmt="tfrecord")
  from_tfrecord = prepared.load_prepared(
      prepare.prepare(write_spec(directory, spec, "tfr.json"), directory / "cache").path)
  # float_list holds float32: prices differ from the CSV's float64 in the last bits.
  assert from_tfrecord.schema.categorical == from_csv.schema.categorical
  for split in prepared.SPLITS:
    for key in ("categorical", "labels", "label_mask"):
      np.testing.assert_array_equal(from_tfrecord.arrays[split][key],
                                    from_csv.arrays[split][key])
    np.testing.assert_allclose(from_tfrecord.arrays[split]["numeric"],
                               from_csv.arrays[split]["numeric"], atol=1e-5)


def test_number_and_boolean_categories_and_nan_read_alike_in_every_path(tmp_path):
  """Categorical columns of floats, booleans and integers (Parquet, TFRecord) are the strings
  Arrow writes ("1", "2.5", "true"), and a float NaN is a missing value (""), in preparation and
  in the NumPy encoder; a NaN label is a missing label."""
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  tier = ([1.0, 2.5, np.nan, 3.0, 1.0] * 5)[:24]
  flag, count = [True, False, True] * 8, ([7, 8, 9, 10, 7] * 5)[:24]
  label = [1.0, 0.0, np.nan, 0.0, 1.0, 1.0] * 4
  splits = ["train", "train", "validation", "test"] * 6
  pq.write_table(pa.table({"tier": tier, "flag": flag, "count": count, "y": label,
                           "split": splits}), tmp_path / "t.parquet")
  with tf.io.TFRecordWriter(str(tmp_path / "t.tfrecord")) as writer:
    for i in range(24):
      feature = {"tier": tf.train.Feature(float_list=tf.train.FloatList(value=[tier[i]])),
                 "count": tf.train.Feature(int64_list=tf.train.Int64List(value=[count[i]])),
                 "flag": tf.train.Feature(bytes_list=tf.train.BytesList(
                     value=[str(flag[i]).lower().encode()])),
                 "y": tf.train.Feature(float_list=tf.train.FloatList(value=[label[i]])),
                 "split": tf.train.Feature(bytes_list=tf.train.BytesList(
                     value=[splits[i].encode()]))}
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())
  spec = {"split": {"split_column": "split"},
          "features": [{"name": n, "type": "categorical"} for n in ("tier", "flag", "count")],
          "tasks": [{"name": "y", "label_column": "y", "missing": "mask"}]}
  for fmt in ("parquet", "tfrecord"):
    data = prepared.load_prepared(prepare.prepare(
        write_spec(tmp_path, dict(spec, format=fmt, files=[f"t.{fmt}"]), f"{fmt}.json"),
        tmp_path / "cache").path)
    assert data.preprocessing.vocabularies == (("", "1", "2.5", "3"), ("false", "true"),
                                               ("10", "7", "8", "9"))
    train = [i for i in range(24) if splits[i] == "train"]
    raw = {"tier": np.array(tier)[train], "flag": np.array(flag)[train],
           "count": np.array(count)[train]}
    np.testing.assert_array_equal(prep_lib.encode(raw, data.preprocessing)["categorical"],
                                  data.arrays["train"]["categorical"])
    np.testing.assert_array_equal(data.arrays["train"]["label_mask"][:, 0],
                                  ~np.isnan(np.array(label)[train]))


@pytest.mark.parametrize("feature", [{"name": "x", "type": "numeric"},
                                     {"name": "x", "type": "categorical"}])
def test_a_tfrecord_value_that_is_not_utf8_names_its_record(tmp_path, feature):
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  for split in prepared.SPLITS:
    with tf.io.TFRecordWriter(str(tmp_path / f"{split}.tfrecord")) as writer:
      for i, x in enumerate([b"1.5", b"2", b"\xff\xfe", b"3"]):
        example = {"x": tf.train.Feature(bytes_list=tf.train.BytesList(value=[x])),
                   "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}
        writer.write(tf.train.Example(features=tf.train.Features(feature=example))
                     .SerializeToString())
  spec = {"format": "tfrecord", "splits": {s: [f"{s}.tfrecord"] for s in prepared.SPLITS},
          "features": [feature], "tasks": [{"name": "y", "label_column": "y"}]}
  _fails(tmp_path, spec, r"train.tfrecord, record 3, feature 'x': b'\\xff\\xfe' is not UTF-8 "
                         r"text")


def _tfrecord_files(directory, records) -> None:
  """Every split's file: the records ``records(i)`` ({feature: Feature}) for i in 0..7."""
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  for split in prepared.SPLITS:
    with tf.io.TFRecordWriter(str(directory / f"{split}.tfrecord")) as writer:
      for i in range(8):
        writer.write(tf.train.Example(features=tf.train.Features(feature=records(i)))
                     .SerializeToString())


def test_tfrecord_features_are_those_of_the_first_records_not_the_first_alone(
    tmp_path, monkeypatch):
  """A record may leave a feature out (a missing value), the first one too; a feature the spec
  does not name, or of another kind, is refused naming the record, also where it is not in the
  first records read for the features (TensorFlow's parse error, in one line)."""
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  floats = lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
  text = lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
  label = lambda i: tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))
  spec = {"format": "tfrecord", "splits": {s: [f"{s}.tfrecord"] for s in prepared.SPLITS},
          "features": [{"name": "x", "type": "numeric", "missing": "indicator"}],
          "tasks": [{"name": "y", "label_column": "y"}]}
  _tfrecord_files(tmp_path, lambda i: {"y": label(i), **({} if i == 0 else {"x": floats(i)})})
  result = prepare.prepare(write_spec(tmp_path, spec), tmp_path / "c")
  statistics = json.loads((result.path / "statistics.json").read_text())
  assert statistics["numeric"][0]["missing_in_train"] == 1
  _tfrecord_files(tmp_path, lambda i: {"y": label(i), "x": floats(i),
                                       **({"secret": floats(1.0)} if i == 5 else {})})
  _fails(tmp_path, spec, r"train.tfrecord: feature 'secret' is not in .*spec.json")
  _tfrecord_files(tmp_path, lambda i: {"y": label(i), "x": text(b"3.5") if i == 5 else floats(i)})
  _fails(tmp_path, spec, r"train.tfrecord, record 6: feature 'x' is a bytes_list, it is a "
                         r"float_list in record 1")
  monkeypatch.setattr(prepare, "TFRECORD_HEAD_RECORDS", 2)
  _fails(tmp_path, spec, r"train.tfrecord, record 6, feature 'x': its values are not a "
                         r"float_list, as in the file's first records")


def test_a_parquet_value_that_is_not_utf8_names_its_row(tmp_path, monkeypatch):
  """A binary category column: the bad value's row is named, not the batch's first; batches of
  a row group (which share its dictionary) that do not hold it read."""
  monkeypatch.setattr(prepare, "BATCH_ROWS", 3)  # rows 1-3, then 4-6 (row 5 is bad)
  for split in prepared.SPLITS:
    pq.write_table(pa.table({"x": pa.array([b"a", b"b", None, b"b", b"\xff\xfe", b"a"],
                                           pa.binary()),
                             "y": [0, 1, 0, 1, 0, 1]}), tmp_path / f"{split}.parquet")
  spec = {"format": "parquet", "splits": {s: [f"{s}.parquet"] for s in prepared.SPLITS},
          "features": [{"name": "x", "type": "categorical"}],
          "tasks": [{"name": "y", "label_column": "y"}]}
  _fails(tmp_path, spec, r"train.parquet, row 5, column 'x': b'\\xff\\xfe' is not UTF-8 text")
  chunks = prepare.read_file(str(tmp_path / "train.parquet"),
                             spec_lib.parse_spec(spec, base_dir=str(tmp_path)))
  assert next(chunks).columns["x"].dictionary.to_pylist() == ["a", "b"]


def test_files_per_split_give_the_split_column_result(funnel_csv):
  directory, rows = funnel_csv
  from_column = prepared.load_prepared(
      prepare.prepare(write_spec(directory, base_spec()), directory / "cache").path)
  train = [r for r in rows if r["split"] == "train"]
  write_csv(directory / "train-1.csv", train[:200])
  write_csv(directory / "train-2.csv", train[200:])
  write_csv(directory / "val.csv", [r for r in rows if r["split"] == "validation"])
  write_csv(directory / "test.csv", [r for r in rows if r["split"] == "test"])
  spec = base_spec(splits={"train": ["train-*.csv"], "validation": ["val.csv"],
                           "test": ["test.csv"]}, ignore=["ts", "split"])
  del spec["files"], spec["split"]
  result = prepare.prepare(write_spec(directory, spec, "per_split.json"), directory / "cache")
  _same_arrays(from_column, prepared.load_prepared(result.path))
  assert [f["path"] for f in result.metadata["files"]["train"]] == [
      str(directory / "train-1.csv"), str(directory / "train-2.csv")]


def test_remote_paths_go_through_gfile(funnel_csv):
  """``scheme://`` files are globbed, stat-ed and read with tf.io.gfile (TensorFlow's in-memory
  ``ram://`` file system stands in for gs:// here)."""
  directory, rows = funnel_csv
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  local = prepared.load_prepared(
      prepare.prepare(write_spec(directory, base_spec()), directory / "cache").path)
  root = f"ram://apem-test-{os.getpid()}/{directory.name}"
  tf.io.gfile.makedirs(root)
  tf.io.gfile.copy(str(directory / "events.csv"), f"{root}/events-1.csv")
  result = prepare.prepare(write_spec(directory, base_spec(files=[f"{root}/events-*.csv"]),
                                      "remote.json"), directory / "cache")
  assert [f["path"] for f in result.metadata["files"]["all"]] == [f"{root}/events-1.csv"]
  _same_arrays(local, prepared.load_prepared(result.path))
  with pytest.raises(spec_lib.SpecError, match=r"no file matches 'ram://"):
    prepare.prepare(write_spec(directory, base_spec(files=[f"{root}/nope-*.csv"]), "r2.json"),
                    directory / "cache")


def test_csv_is_read_in_bounded_pieces(tmp_path, monkeypatch):
  rows = make_rows(20_000)
  write_csv(tmp_path / "events.csv", rows)
  size = (tmp_path / "events.csv").stat().st_size
  piece = 1 << 16
  monkeypatch.setattr(prepare, "CSV_SEGMENT_BYTES", piece)
  opened = []
  real_open = prepare._open  # pylint: disable=protected-access

  def counting_open(path, mode="rb"):
    f = real_open(path, mode)
    counted = {"bytes": 0}
    read = f.read

    def counting_read(n=-1):
      data = read(n)
      counted["bytes"] += len(data)
      return data
    f.read = counting_read
    opened.append(counted)
    return f
  monkeypatch.setattr(prepare, "_open", counting_open)
  chunks = prepare.read_file(str(tmp_path / "events.csv"),
                             spec_lib.parse_spec(base_spec(), base_dir=str(tmp_path)))
  first = next(chunks)
  assert size > 10 * piece
  assert opened[-1]["bytes"] <= piece, (opened[-1]["bytes"], size)
  lines = [first.first_row]
  total = first.num_rows
  for chunk in chunks:
    lines.append(chunk.first_row)
    total += chunk.num_rows
  with open(tmp_path / "events.csv", "rb") as f:
    header = len(f.readline())
  assert total == len(rows) and opened[-1]["bytes"] == size - header
  assert lines == sorted(lines) and len(lines) > 10
  # Rows are numbered across pieces: the last chunk's last row is the file's last line.
  assert chunk.where(chunk.num_rows - 1).endswith(f"line {len(rows) + 1}")


def test_hashing_missing_values_and_vocabulary_limits(tmp_path):
  rng = np.random.default_rng(3)
  n = 400
  rows = [{"user": f"user-{i % 97}", "city": ["a", "b", "c", "d"][min(int(rng.zipf(2)), 4) - 1],
           "price": "" if i % 7 == 0 else f"{rng.normal(5, 2):.4f}",
           "age": "" if i % 5 == 0 else str(20 + i % 40), "tag": "" if i % 3 == 0 else "x",
           "clicked": str(i % 2), "buy": "" if i % 4 == 0 else str(int(i % 9 == 1))}
          for i in range(n)]
  write_csv(tmp_path / "d.csv", rows)
  spec = {"format": "csv", "files": ["d.csv"],
          "split": {"fractions": {"train": 0.6, "validation": 0.2, "test": 0.2}},
          "features": [{"name": "user", "type": "categorical", "num_buckets": 50},
                       {"name": "city", "type": "categorical", "max_size": 2},
                       {"name": "tag", "type": "categorical"},
                       {"name": "price", "type": "numeric", "missing": {"fill": -1.0}},
                       {"name": "age", "type": "numeric", "missing": "indicator"}],
          "tasks": [{"name": "click", "label_column": "clicked"},
                    {"name": "buy", "label_column": "buy", "missing": "mask"}]}
  result = prepare.prepare(write_spec(tmp_path, spec), tmp_path / "cache")
  data = prepared.load_prepared(result.path)
  with open(result.path / prepared.STATISTICS_FILE) as f:
    stats = json.load(f)
  assert result.metadata["preprocessing"] == prepared.PREPROCESSING_FILE
  assert (result.path / prepared.PREPROCESSING_FILE).exists()  # export serves hashed specs too
  names = [f.name for f in data.schema.categorical]
  assert names == ["user", "city", "tag", "age_missing"]
  assert data.schema.vocab_sizes == (50, 2, 2, 2)
  # The row-hash split is a fixed function of (file, row): rows come back in file order.
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  chunk = next(prepare.read_file(str(tmp_path / "d.csv"), spec_lib.load_spec(
      tmp_path / "spec.json")))
  ids = prepare.split_ids(chunk, spec_lib.load_spec(tmp_path / "spec.json"), None)
  assert 0.45 < np.mean(ids == 0) < 0.75 and np.mean(ids == 1) > 0.1 and np.mean(ids == 2) > 0.1
  # max_size keeps the two most frequent training cities (ties by value); a missing tag is "".
  cities, counts = np.unique([r["city"] for r, i in zip(rows, ids) if i == 0], return_counts=True)
  top2 = sorted(sorted(zip(-counts, cities))[:2], key=lambda x: x[1])
  assert stats["vocabularies"]["city"] == [c for _, c in top2]
  assert stats["vocabularies"]["tag"] == ["", "x"]
  for sid, split in enumerate(prepared.SPLITS):
    split_rows = [r for r, i in zip(rows, ids) if i == sid]
    arrays = data.arrays[split]
    assert len(arrays["labels"]) == len(split_rows)
    users = np.array([r["user"] for r in split_rows])
    np.testing.assert_array_equal(
        arrays["categorical"][:, 0], tf.strings.to_hash_bucket_fast(users, 50).numpy())
    age_missing = np.array([r["age"] == "" for r in split_rows])
    np.testing.assert_array_equal(arrays["categorical"][:, 3], age_missing)
    np.testing.assert_array_equal(arrays["numeric"][age_missing, 1], 0.0)  # the training mean
    buy_missing = np.array([r["buy"] == "" for r in split_rows])
    np.testing.assert_array_equal(arrays["label_mask"][:, 1], ~buy_missing)
  train_rows = [r for r, i in zip(rows, ids) if i == 0]
  price = np.array([-1.0 if r["price"] == "" else float(r["price"]) for r in train_rows])
  age = np.array([float(r["age"]) for r in train_rows if r["age"] != ""])
  numeric = {s["name"]: s for s in stats["numeric"]}
  np.testing.assert_allclose([numeric["price"]["mean"], numeric["price"]["std"]],
                             [price.mean(), price.std()], rtol=1e-10)
  np.testing.assert_allclose([numeric["age"]["mean"], numeric["age"]["std"]],
                             [age.mean(), age.std()], rtol=1e-10)
  assert numeric["age"]["missing_in_train"] == sum(r["age"] == "" for r in train_rows)
  assert numeric["price"]["missing_in_train"] == sum(r["price"] == "" for r in train_rows) > 0


def test_hash_column_split_keeps_a_users_rows_together(tmp_path):
  rows = [{"user": f"u{i % 300}", "x": "a" if i % 2 else "b", "clicked": str(i % 3 == 0)}
          for i in range(3000)]
  write_csv(tmp_path / "d.csv", rows)
  spec = {"format": "csv", "files": ["d.csv"],
          "split": {"hash_column": "user",
                    "fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}},
          "features": [{"name": "x", "type": "categorical"}],
          "tasks": [{"name": "click", "label_column": "clicked"}]}
  s = spec_lib.parse_spec(spec, base_dir=str(tmp_path))
  chunk = next(prepare.read_file(str(tmp_path / "d.csv"), s))
  ids = prepare.split_ids(chunk, s, None)
  split_of_user: dict[str, set] = {}
  for r, i in zip(rows, ids):
    split_of_user.setdefault(r["user"], set()).add(int(i))
  assert all(len(v) == 1 for v in split_of_user.values())
  users_per_split = np.bincount([next(iter(v)) for v in split_of_user.values()], minlength=3)
  assert 200 <= users_per_split[0] <= 280 and users_per_split[1] >= 10 and users_per_split[2] >= 10


def test_quantile_sample_is_exact_below_its_size_and_close_above(monkeypatch):
  rng = np.random.default_rng(0)
  x = rng.normal(size=50_000)
  sample = prepare._DistinctSample(100_000)  # pylint: disable=protected-access
  for part in np.array_split(x, 7):
    sample.add(part)
  np.testing.assert_array_equal(np.sort(sample.values), np.unique(x))
  small = prepare._DistinctSample(2_000)  # pylint: disable=protected-access
  for part in np.array_split(x, 7):
    small.add(part)
  assert len(small.values) == 2_000 and len(np.unique(small.values)) == 2_000
  # A uniform sample of the distinct values: its quantiles are close to the exact ones.
  exact = np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9])
  np.testing.assert_allclose(np.quantile(small.values, [0.1, 0.25, 0.5, 0.75, 0.9]), exact,
                             atol=0.1)
  # Order-independent: the same values in another order give the same sample.
  again = prepare._DistinctSample(2_000)  # pylint: disable=protected-access
  for part in np.array_split(x[::-1], 3):
    again.add(part)
  np.testing.assert_array_equal(np.sort(small.values), np.sort(again.values))


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------

def _example(tf, rows: dict):
  """What TensorFlow's own protos make of ``rows`` (one record): each feature's values, row after
  row."""
  return tf.train.Example(features=tf.train.Features(feature={
      "categorical": tf.train.Feature(int64_list=tf.train.Int64List(
          value=np.ravel(rows["categorical"]))),
      **{k: tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(rows[k])))
         for k in ("numeric", "labels", "label_mask", "weight")}}))


def _random_rows(rng, n: int, fc: int, fn: int, t: int, max_id: int) -> dict[str, np.ndarray]:
  """``n`` rows of every feature key, the first ids of field 0 at varint length edges."""
  arrays = {"categorical": rng.integers(0, max_id, (n, fc)),
            "numeric": rng.normal(size=(n, fn)).astype(np.float32),
            "labels": rng.integers(0, 2, (n, t)).astype(np.float32),
            "label_mask": rng.integers(0, 2, (n, t)).astype(np.float32),
            "weight": rng.random(n).astype(np.float32)}
  arrays["categorical"][:5, 0] = [0, 127, 128, 16383, 16384]
  return arrays


def test_shards_are_what_tensorflow_writes_and_read_rows_reads(tmp_path):
  """23 rows in shards of 10 and records of 4 rows, written in two calls that cut a record:
  shards of 10, 10, 3 rows, records of 4, 4, 2 | 4, 4, 2 | 3 rows, each record TensorFlow's own
  ``tf.train.Example`` of its rows (protobuf leaves the order of map entries free, so the bytes
  are compared as protos), framed byte for byte as ``tf.io.TFRecordWriter`` frames it, and
  ``read_rows`` gives the rows back."""
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  n, fc, fn, t = 23, 3, 2, 2
  arrays = _random_rows(np.random.default_rng(1), n, fc, fn, t, max_id=1 << 33)
  arrays["label_mask"][:] = 1.0
  records = prepared.records_of(*prepared.serialize_examples(
      *(arrays[k] for k in prepared.FEATURE_KEYS)))
  for i, record in enumerate(records):  # one row a record
    assert tf.train.Example.FromString(record) == _example(tf, {k: v[i] for k, v in
                                                                 arrays.items()})
  writer = prepared.ShardWriter(tmp_path, "train", shard_rows=10, record_rows=4)
  writer.write({k: v[:15] for k, v in arrays.items()})
  writer.write({k: v[15:] for k, v in arrays.items()})
  shards = writer.close()
  assert [s["rows"] for s in shards] == [10, 10, 3]
  bounds = [0, 4, 8, 10, 14, 18, 20, 23]
  files = [str(tmp_path / s["file"]) for s in shards]
  ours = [r.numpy() for r in tf.data.TFRecordDataset(files)]
  assert [tf.train.Example.FromString(r) for r in ours] == [
      _example(tf, {k: v[lo:hi] for k, v in arrays.items()}) for lo, hi in zip(bounds, bounds[1:])]
  with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as tf_writer:  # the same framing
    for record in ours:
      tf_writer.write(record)
  assert b"".join(pathlib.Path(f).read_bytes() for f in files) == (
      tmp_path / "tf.tfrecord").read_bytes()
  dims = {"categorical": fc, "numeric": fn, "tasks": t}
  assert [len(r["weight"]) for r in prepared.read_rows(files, dims, tf).as_numpy_iterator()] == [
      hi - lo for lo, hi in zip(bounds, bounds[1:])]
  parsed = next(prepared.read_rows(files, dims, tf).rebatch(100).as_numpy_iterator())
  assert parsed["categorical"].dtype == np.int32
  arrays["categorical"] = arrays["categorical"].astype(np.int32)
  for key in prepared.FEATURE_KEYS:
    np.testing.assert_array_equal(parsed[key], arrays[key])


def test_read_split_reads_in_numpy_what_tensorflow_reads_and_names_a_damaged_record(tmp_path):
  """``read_split`` (in-memory loading, no TensorFlow) reads the records TensorFlow's reader
  reads and the rows ``read_rows`` parses; a flipped byte or a cut file names the shard and the
  record."""
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  n, fc, fn, t = 23, 3, 2, 2
  arrays = _random_rows(np.random.default_rng(2), n, fc, fn, t, max_id=1 << 30)
  writer = prepared.ShardWriter(tmp_path, "train", shard_rows=10, record_rows=4)
  writer.write(arrays)
  shards = writer.close()
  files = [str(tmp_path / s["file"]) for s in shards]
  dims = {"categorical": fc, "numeric": fn, "tasks": t}
  metadata = {"dims": dims, "splits": {"train": {"shards": shards, "rows": n}}}
  assert [prepared.read_records(f) for f in files] == [
      [r.numpy() for r in tf.data.TFRecordDataset([f])] for f in files]
  got = prepared.read_split(tmp_path, "train", metadata)
  want = next(prepared.read_rows(files, dims, tf).rebatch(100).as_numpy_iterator())
  for key in prepared.FEATURE_KEYS:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key])

  second = pathlib.Path(files[1]).read_bytes()
  start = 16 + len(prepared.read_records(files[1])[0])  # the second record's frame
  flipped = bytearray(second)
  flipped[start + 12 + 7] ^= 0x01
  pathlib.Path(files[1]).write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match=f"{files[1]}: record 1 fails its CRC-32C checksum"):
    prepared.read_split(tmp_path, "train", metadata)
  pathlib.Path(files[1]).write_bytes(second[:start + 20])
  with pytest.raises(ValueError, match=f"{files[1]}: record 1 is cut short"):
    prepared.read_split(tmp_path, "train", metadata)


def test_rows_without_numeric_features_read_back(tmp_path):
  """A feature of width 0 (no numeric columns) still reads back one row per row."""
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  arrays = {"categorical": np.arange(10).reshape(5, 2), "numeric": np.zeros((5, 0), np.float32),
            "labels": np.ones((5, 1), np.float32), "label_mask": np.ones((5, 1), np.float32),
            "weight": np.ones(5, np.float32)}
  writer = prepared.ShardWriter(tmp_path, "train", shard_rows=10, record_rows=2)
  writer.write(arrays)
  files = [str(tmp_path / s["file"]) for s in writer.close()]
  parsed = next(prepared.read_rows(files, {"categorical": 2, "numeric": 0, "tasks": 1}, tf)
                .rebatch(10).as_numpy_iterator())
  assert parsed["numeric"].shape == (5, 0)
  np.testing.assert_array_equal(parsed["categorical"], arrays["categorical"])


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

def test_cache_is_reused_and_keyed_by_spec_and_files(funnel_csv):
  directory, rows = funnel_csv
  spec_path = write_spec(directory, base_spec())
  first = prepare.prepare(spec_path, directory / "cache")
  mtime = (first.path / prepared.METADATA_FILE).stat().st_mtime_ns
  again = prepare.prepare(spec_path, directory / "cache")
  assert again.reused and again.path == first.path
  assert (first.path / prepared.METADATA_FILE).stat().st_mtime_ns == mtime
  # A changed spec and a changed file each get their own directory.
  changed = base_spec()
  changed["features"][3]["buckets"] = 4
  other = prepare.prepare(write_spec(directory, changed), directory / "cache")
  assert other.path != first.path and not other.reused
  write_csv(directory / "events.csv", rows[:-10])
  os.utime(directory / "events.csv", ns=(time.time_ns(), time.time_ns() + 10**9))
  newer = prepare.prepare(write_spec(directory, base_spec()), directory / "cache")
  assert newer.path not in (first.path, other.path) and not newer.reused
  assert sum(s["rows"] for s in newer.metadata["splits"].values()) == len(rows) - 10
  assert sorted(p.name for p in (directory / "cache" / "prepared").iterdir()) == sorted(
      p.name for p in (first.path, other.path, newer.path))


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing left in the cache
# ---------------------------------------------------------------------------------------------

def _fails(directory: pathlib.Path, spec: dict, match: str, error=prepare.DataError) -> str:
  cache = directory / "cache"
  with pytest.raises(error, match=match) as info:
    prepare.prepare(write_spec(directory, spec), cache)
  assert all_files(cache) == [], all_files(cache)
  assert "\n" not in str(info.value)
  return str(info.value)


def _set_fields(*changes: tuple[int, int, str]):
  """An edit for :func:`_csv_with`: ``(line index, field index, value)`` per change; the value
  may hold ``{}``, the field's old value."""
  def edit(lines):
    for i, j, value in changes:
      fields = lines[i].split(",")
      fields[j] = value.format(fields[j])
      lines[i] = ",".join(fields)
  return edit


def _csv_with(directory: pathlib.Path, edit) -> None:
  """events.csv with ``edit(lines)`` applied to its text lines (header = line 1)."""
  rows = make_rows(60)
  write_csv(directory / "events.csv", rows)
  lines = (directory / "events.csv").read_text().splitlines()
  edit(lines)
  (directory / "events.csv").write_text("\n".join(lines) + "\n")


def test_missing_files_and_globs(tmp_path):
  _fails(tmp_path, base_spec(files=["nope.csv"]),
         r"spec.json: files\[0\]: 'nope.csv' does not exist", spec_lib.SpecError)
  _fails(tmp_path, base_spec(files=["data/*.csv"]),
         r"spec.json: files\[0\]: no file matches 'data/\*.csv'", spec_lib.SpecError)


def test_wrong_number_of_fields_names_file_and_line(tmp_path):
  _csv_with(tmp_path, lambda lines: lines.__setitem__(41, ",".join(lines[41].split(",")[:-2])))
  message = _fails(tmp_path, base_spec(), r"events.csv, line 42: 8 fields, expected 10")
  assert str(tmp_path / "events.csv") in message
  # The last line, without a line break after it.
  _csv_with(tmp_path, lambda lines: lines.__setitem__(-1, ",".join(lines[-1].split(",")[:3])))
  text = (tmp_path / "events.csv").read_text()
  (tmp_path / "events.csv").write_text(text.rstrip("\n"))
  _fails(tmp_path, base_spec(), r"events.csv, line 61: 3 fields, expected 10")


@pytest.mark.parametrize("segment_bytes", [None, 64])
def test_an_empty_line_names_file_and_line(tmp_path, monkeypatch, segment_bytes):
  """Arrow reads an empty line as a row of missing values; it is refused wherever it is: in
  the middle, as \\r\\n, first in a segment, or at the end of the file."""
  if segment_bytes:
    monkeypatch.setattr(prepare, "CSV_SEGMENT_BYTES", segment_bytes)
  _csv_with(tmp_path, lambda lines: lines.insert(41, ""))  # becomes line 42
  _fails(tmp_path, base_spec(), r"events.csv, line 42: an empty line, expected 10 fields")
  _csv_with(tmp_path, lambda lines: lines.insert(9, "\r"))
  _fails(tmp_path, base_spec(), r"events.csv, line 10: an empty line")
  _csv_with(tmp_path, lambda lines: lines.append(""))
  _fails(tmp_path, base_spec(), r"events.csv, line 62: an empty line")


def test_lines_without_a_header_are_checked_against_the_column_names(tmp_path):
  """With ``"header": false`` the columns are ``format.column_names``: line 1 (data) must have
  as many fields, checked with the columns (apem-data validate), not only by the preparation."""
  rows = make_rows(60)
  write_csv(tmp_path / "events.csv", rows)
  names = (tmp_path / "events.csv").read_text().splitlines()[0].split(",")
  lines = (tmp_path / "events.csv").read_text().splitlines()[1:]
  (tmp_path / "events.csv").write_text("\n".join(lines) + "\n")
  spec = base_spec(format={"type": "csv", "header": False, "column_names": names})
  data = prepared.load_prepared(prepare.prepare(write_spec(tmp_path, spec), tmp_path / "c").path)
  assert sum(data.num_examples(s) for s in prepared.SPLITS) == 60
  spec["format"]["column_names"] = names[:-1] + ["extra", names[-1]]
  spec["ignore"].append("extra")
  with pytest.raises(prepare.DataError, match=r"events.csv, line 1: 10 fields, expected 11 "
                                              r"\(format.column_names;"):
    prepare.check_files(spec_lib.parse_spec(spec, str(tmp_path / "spec.json"), str(tmp_path)))


def test_text_in_a_numeric_column_names_file_line_column_and_value(tmp_path):
  # Price: text, and a number with spaces around it (read as the number).
  _csv_with(tmp_path, _set_fields((29, 4, "12abc"), (5, 4, " {} ")))
  _fails(tmp_path, base_spec(),
         r"events.csv, line 30, column 'price' \(a numeric feature\): '12abc' is not a number")
  # The text nan, which Arrow reads as a number, is no missing value unless listed as one.
  _csv_with(tmp_path, _set_fields((12, 4, "NaN")))
  _fails(tmp_path, base_spec(), r"events.csv, line 13, column 'price' \(a numeric feature\): "
                                r"'NaN' is not a number \(missing values are written as one of "
                                r"\[''\]: format.missing_values, matched exactly\)")
  # Parquet: the row.
  table = pa.table({"split": ["train"] * 3, "user": ["a"] * 3, "country": ["x"] * 3,
                    "device": ["d"] * 3, "price": ["1.5", "2", "n/a"], "age": [1, 2, 3],
                    "clicked": [0, 1, 0], "bought": ["no"] * 3, "w": [1.0] * 3, "ts": [1] * 3})
  pq.write_table(table, tmp_path / "t.parquet")
  _fails(tmp_path, base_spec(files=["t.parquet"], fmt="parquet"),
         r"t.parquet, row 3, column 'price' \(a numeric feature\): 'n/a' is not a number")
  # The text nan there too (a missing value is a null), before a text that does not convert.
  table = table.set_column(4, "price", pa.array(["1.5", "nan", "n/a"]))
  pq.write_table(table, tmp_path / "t.parquet")
  _fails(tmp_path, base_spec(files=["t.parquet"], fmt="parquet"),
         r"t.parquet, row 2, column 'price' \(a numeric feature\): 'nan' is not a number")


def test_label_outside_the_allowed_values(tmp_path):
  _csv_with(tmp_path, _set_fields((9, 6, "2")))  # clicked
  _fails(tmp_path, base_spec(), r"events.csv, line 10, column 'clicked' \(the label of task "
         r"'click'\): '2' is not an allowed label; expected 0 or 1")

  # bought, on a test-split row: caught in pass 2, after shards were written
  _csv_with(tmp_path, _set_fields((59, 7, "maybe")))
  _fails(tmp_path, base_spec(), r"line 60, column 'bought' \(the label of task 'purchase'\): "
         r"'maybe' is not an allowed label; expected one of positive_values \['yes'\] or "
         r"negative_values \['no'\]")


def test_missing_label_of_a_required_task(tmp_path):
  _csv_with(tmp_path, _set_fields((5, 6, "")))
  _fails(tmp_path, base_spec(), r"events.csv, line 6, column 'clicked': the label of task "
         r"'click' is missing")


def test_missing_numeric_value_without_a_policy(tmp_path):
  _csv_with(tmp_path, _set_fields((12, 5, "")))  # age
  _fails(tmp_path, base_spec(), r"events.csv, line 13, column 'age' \(a numeric feature\): the "
         r"value is missing")


def test_empty_split(tmp_path):
  rows = [r for r in make_rows(60) if r["split"] != "validation"]
  write_csv(tmp_path / "events.csv", rows)
  _fails(tmp_path, base_spec(), r"the validation split has no rows")
  write_csv(tmp_path / "events.csv", [r for r in rows if r["split"] != "train"])
  _fails(tmp_path, base_spec(), r"the train split has no rows")


def test_columns_must_match_the_spec(tmp_path):
  rows = make_rows(20)
  write_csv(tmp_path / "events.csv", rows, columns=[c for c in rows[0] if c != "device"])
  _fails(tmp_path, base_spec(), r"has no column 'device' \(a categorical feature in")
  write_csv(tmp_path / "events.csv", rows)
  spec = base_spec(ignore=[])
  _fails(tmp_path, spec, r"column 'ts' is not in .*spec.json: make it a feature, .* or list it "
         r"in \"ignore\"")
  _fails(tmp_path, base_spec(ignore=["ts", "timestamp"]),
         r"events.csv: has no column 'timestamp' \(.*spec.json: ignore\[1\]\); remove it from")


def _inconsistent_funnel_csv(directory: pathlib.Path) -> list[dict]:
  rows = make_rows(100)
  for i in (3, 15, 47):   # train rows (i % 10 < 8): bought where not clicked
    rows[i].update(clicked="0", bought="yes")
  rows[28].update(clicked="0", bought="yes")  # a validation row (28 % 10 == 8)
  write_csv(directory / "events.csv", rows)
  return rows


def test_inconsistent_funnel_error_or_drop_training_rows_only(tmp_path):
  rows = _inconsistent_funnel_csv(tmp_path)
  _fails(tmp_path, base_spec(), r"events.csv, line 5: task 'purchase' is positive where the task "
         r"it depends on, 'click', is negative \(an inconsistent funnel, train split; 4 such "
         r"rows, of any split, in lines 2-101, the block read when the first was found, later "
         r"rows not checked\); fix the data")
  result = prepare.prepare(write_spec(tmp_path, base_spec(inconsistent_funnel="drop")),
                           tmp_path / "cache")
  splits = result.metadata["splits"]
  assert splits["train"]["inconsistent_funnel_dropped"] == 3
  assert splits["validation"]["inconsistent_funnel_dropped"] == 0
  assert splits["validation"]["inconsistent_funnel_kept"] == 1
  assert splits["train"]["rows"] == sum(r["split"] == "train" for r in rows) - 3
  assert splits["validation"]["rows"] == sum(r["split"] == "validation" for r in rows)
  data = prepared.load_prepared(result.path)
  assert data.inconsistent_funnel_rows["train"] == 3
  labels = data.arrays["validation"]["labels"]
  assert ((labels[:, 1] == 1) & (labels[:, 0] == 0)).sum() == 1  # kept as it is


def test_funnel_check_is_the_pipelines_rule():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, (500, 3)).astype(np.float32)
  mask = (rng.random((500, 3)) < 0.8).astype(np.float32)
  spec = spec_lib.parse_spec({
      "format": "csv", "files": ["x.csv"], "split": {"split_column": "s"},
      "features": [{"name": "f", "type": "categorical"}],
      "tasks": [{"name": "a", "label_column": "a"},
                {"name": "b", "label_column": "b", "depends_on": "a"},
                {"name": "c", "label_column": "c", "depends_on": "b"}]})
  np.testing.assert_array_equal(prepare.inconsistent_funnel(labels, mask, spec),
                                pipeline.inconsistent_funnel_rows(labels, mask, (-1, 0, 1)))


# ---------------------------------------------------------------------------------------------
# data.name = 'spec': the pipeline and the trainer
# ---------------------------------------------------------------------------------------------

def test_the_weight_column_weights_training_in_memory_as_streamed(funnel_csv):
  directory, rows = funnel_csv
  spec_path = write_spec(directory, base_spec())
  weights = {}
  for stream in (True, False):
    data = pipeline.load_dataset(ml_collections.ConfigDict(dict(
        name="spec", spec=str(spec_path), data_dir=str(directory / "cache"), stream=stream)))
    batches = data.train_batches(32, seed=0)
    weights[stream] = sorted(float(w) for _ in range(3) for w in next(batches)["weight"])
    if not stream:
      assert [b["weight"].max() for b in data.eval_batches("validation", 32)][0] == 1.0
  assert weights[True] != [1.0] * 96 and len(set(weights[True])) > 10
  train_w = sorted(float(r["w"]) for r in rows if r["split"] == "train")
  assert set(weights[False]) <= set(np.float32(train_w).tolist())
  assert len(set(weights[False])) > 10


def test_load_dataset_dispatch_and_config_checks(funnel_csv):
  directory, rows = funnel_csv
  spec_path = write_spec(directory, base_spec())
  config = ml_collections.ConfigDict(dict(name="spec", spec=str(spec_path),
                                          data_dir=str(directory / "cache")))
  data = pipeline.load_dataset(config)
  assert data.num_examples("train") == sum(r["split"] == "train" for r in rows)
  assert data.preprocessing is not None
  with pytest.raises(ValueError, match=r"data.inconsistent_funnel: not used with "
                     r"data.name='spec' \(set \"inconsistent_funnel\" in the spec\)"):
    pipeline.load_dataset(ml_collections.ConfigDict(dict(
        name="spec", spec=str(spec_path), inconsistent_funnel="drop")))
  with pytest.raises(ValueError, match=r"data.spec: required with data.name='spec'"):
    pipeline.load_dataset(ml_collections.ConfigDict(dict(name="spec")))


def test_trains_on_a_funnel_csv_with_string_categories(funnel_csv, tmp_path):
  from apem_jax import trainer  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from apem_jax.models.defaults import default_model_config  # pylint: disable=g-import-not-at-top
  directory, _ = funnel_csv
  spec_path = write_spec(directory, base_spec())
  config = common.base_config()
  config.data = ml_collections.ConfigDict(dict(name="spec", spec=str(spec_path),
                                               data_dir=str(directory / "cache")))
  config.model = default_model_config("apem")
  config.model.embed_dim = 8
  config.model.update(num_blocks=1, num_groups=4, tower_hidden=(16,), indicator_hidden=8)
  config.train.update(batch_size=64, eval_batch_size=128, num_epochs=1, log_every=10,
                      progress_bar=False, patience=5)
  config.optimizer.update(schedule="constant", learning_rate=3e-3)
  assert config.train.funnel == "entire_space"
  workdir = tmp_path / "run"
  summary = trainer.train_and_evaluate(config, str(workdir))
  assert summary["epochs"] == 1 and summary["steps"] == 480 // 64
  assert set(summary["best_validation"]) >= {"click", "purchase"}
  with open(workdir / "preprocessing.json") as f:
    assert json.load(f)["categorical_fields"] == ["user", "country", "device"]


# ---------------------------------------------------------------------------------------------
# Values a preparation refused silently, or read wrongly (review)
# ---------------------------------------------------------------------------------------------

def _tiny(directory: pathlib.Path, header: str, rows: list[str], **changes) -> dict:
  """x.csv with ``rows`` under ``header``; a spec with a split column ``split``, a categorical
  ``c`` and a task ``click`` on ``y`` (``changes`` replace keys)."""
  (directory / "x.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
  spec = {"format": "csv", "files": ["x.csv"], "split": {"split_column": "split"},
          "features": [{"name": "c", "type": "categorical"}],
          "tasks": [{"name": "click", "label_column": "y"}]}
  spec.update(changes)
  return spec


def _numeric_spec(**feature) -> list[dict]:
  return [{"name": "c", "type": "categorical"}, dict({"name": "n", "type": "numeric"}, **feature)]


def test_numbers_whose_moments_or_standardised_values_overflow_are_refused(tmp_path):
  rows = ["train,a,1e200,0", "train,a,2e200,1", "train,a,3e200,0", "validation,a,1,1",
          "test,a,1,0"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,n,y", rows, features=_numeric_spec()),
         r"spec.json: feature 'n': its training values are too large, their mean or variance "
         r"overflows float64; give it \"transform\": \"log1p\"")
  # A batch of one huge value: its M2 is 0, not inf * 0 (NaN), so its std is that of a constant.
  moments = prepare._Moments()  # pylint: disable=protected-access
  moments.add(np.array([1e160]))
  assert moments.m2 == 0.0 and moments.mean == 1e160
  # Standardised beyond float32 (a tiny training spread), and labels and weights beyond it.
  rows = ["train,a,0,0", "train,a,1e-30,1", "validation,a,1e10,1", "test,a,0,0"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,n,y", rows, features=_numeric_spec()),
         r"x.csv, line 4, column 'n' \(a numeric feature\): 10000000000.0 standardised \("
         r"training mean 5e-31, std 5e-31\) overflows float32")
  rows = ["train,a,1,2.5", "train,b,2,1e39", "validation,a,1,0", "test,a,1,0"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,w,y", rows, weight_column="w",
                         tasks=[{"name": "v", "label_column": "y", "kind": "regression"}]),
         r"x.csv, line 3, column 'y' \(the label of task 'v'\): 1e\+39 overflows float32")
  rows = ["train,a,1,1", "train,b,1e39,0", "validation,a,1,0", "test,a,1,0"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,w,y", rows, weight_column="w"),
         r"x.csv, line 3, column 'w' \(the weight column\): 1e\+39 overflows float32")


@pytest.mark.parametrize("role", ["label", "weight", "split", "hash"])
def test_a_column_may_have_any_name_the_preparation_uses_inside(tmp_path, role):
  """The split ids pass 1 spills are kept outside the data's columns: a column named
  ``__split__`` (once their name) is read as any other."""
  def arrays(name):
    changes = {"label": dict(tasks=[{"name": "click", "label_column": name}]),
               "weight": dict(weight_column=name),
               "split": dict(split={"split_column": name}),
               "hash": dict(split={"hash_column": name,
                                   "fractions": {"train": 0.6, "validation": 0.2, "test": 0.2}})}
    columns = {"label": "split,c,{},w", "weight": "split,c,y,{}", "split": "{},c,y,w",
               "hash": "h,c,y,w"}
    rows = [f"{['train', 'validation', 'test'][i % 3]},{'ab'[i % 2]},{i % 2},{1 + i % 3}"
            for i in range(60)]
    if role == "hash":
      rows = [f"k{i},{r.split(',', 1)[1]}" for i, r in enumerate(rows)]
      columns["hash"] = "{},c,y,w"
    spec = _tiny(tmp_path, columns[role].format(name), rows, **changes[role])
    spec.setdefault("tasks", [{"name": "click", "label_column": "y"}])
    if role != "weight":
      spec["weight_column"] = "w"
    result = prepare.prepare(write_spec(tmp_path, spec), tmp_path / f"cache-{name}")
    return prepared.load_prepared(result.path).arrays
  want, got = arrays("other"), arrays("__split__")
  for split in prepared.SPLITS:
    assert len(got[split]["labels"])
    for key, value in want[split].items():
      np.testing.assert_array_equal(got[split][key], value)


def test_a_numeric_feature_without_a_training_value_is_refused(tmp_path):
  rows = ["train,a,,1", "train,b,,0", "validation,a,1000000,1", "test,a,-5,0"]
  message = _fails(tmp_path, _tiny(tmp_path, "split,c,n,y", rows,
                                   features=_numeric_spec(missing="indicator")),
                   r"spec.json: feature 'n': no value in the training split \(its 2 values "
                   r"there are all missing\)")
  assert "x.csv" not in message


def test_tiny_values_are_standardised_and_a_constant_is_relative_to_the_mean(tmp_path):
  rows = ["train,a,1e-13,0", "train,a,2e-13,1", "train,a,3e-13,0", "validation,a,2e-13,1",
          "test,a,4e-13,0"]
  spec = _tiny(tmp_path, "split,c,n,y", rows, features=_numeric_spec())
  data = prepared.load_prepared(prepare.prepare(write_spec(tmp_path, spec), tmp_path / "c").path)
  z = np.sqrt(1.5)
  np.testing.assert_allclose(data.arrays["train"]["numeric"][:, 0], [-z, 0, z], atol=1e-6)
  np.testing.assert_allclose(data.arrays["test"]["numeric"][:, 0], [2 * z], atol=1e-5)
  x = np.array([1e-13, 2e-13, 3e-13])
  fitted = prep_lib.fit_preprocessing({"n": x}, (), ("n",), numeric_transform="none")
  assert fitted.stds == data.preprocessing.stds and fitted.stds[0] == pytest.approx(x.std())
  # A constant whose mean rounds off it (0.1 + 0.1 + 0.1 != 0.3): std 1, in both paths.
  rows = [f"train,a,{v},{i % 2}" for i, v in enumerate(["123456.7"] * 7)] + [
      "validation,a,1,1", "test,a,1,0"]
  spec = _tiny(tmp_path, "split,c,n,y", rows, features=_numeric_spec())
  data = prepared.load_prepared(prepare.prepare(write_spec(tmp_path, spec), tmp_path / "d").path)
  fitted = prep_lib.fit_preprocessing({"n": np.full(7, 123456.7)}, (), ("n",),
                                      numeric_transform="none")
  assert data.preprocessing.stds == fitted.stds == (1.0,)


def test_a_binary_task_without_positives_or_negatives_in_training_is_refused(tmp_path):
  rows = ["train,a,yes", "train,b,no", "validation,a,yes", "test,b,no"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,y", rows,
                         tasks=[{"name": "buy", "label_column": "y", "positive_values": ["Yes"]}]),
         r"spec.json: task 'buy': no positive label among its 2 labelled rows of the training "
         r"split \(positive: positive_values \['Yes'\]\)")
  rows = ["train,a,5", "train,b,", "train,b,7", "validation,a,1", "test,b,0"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,y", rows, tasks=[
      {"name": "big", "label_column": "y", "threshold": 2, "missing": "mask"}]),
         r"task 'big': no negative label among its 2 labelled rows of the training split "
         r"\(positive: a label > threshold 2")


def test_training_weights_that_are_all_zero_are_refused(tmp_path):
  rows = ["train,a,1,0", "train,a,0,0", "validation,a,0,1", "test,a,1,1"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,y,w", rows, weight_column="w"),
         r"spec.json: the weight column 'w': every weight of the training split \(2 rows\) is 0")


def test_a_blank_category_is_missing(tmp_path):
  rows = ["train,a,0", "train, ,1", "validation,a,0", "test,a,1"]
  _fails(tmp_path, _tiny(tmp_path, "split,c,y", rows, features=[
      {"name": "c", "type": "categorical", "missing": "error"}]),
         r"x.csv, line 3, column 'c' \(a categorical feature\): the value is missing \(' ' is "
         r"blank\) \(the feature's \"missing\" is \"error\"\)")
  # Where missing values are values, a blank one is the missing value "".
  spec = _tiny(tmp_path, "split,c,y", rows)
  data = prepared.load_prepared(prepare.prepare(write_spec(tmp_path, spec), tmp_path / "c").path)
  assert data.preprocessing.vocabularies == (("", "a"),)
