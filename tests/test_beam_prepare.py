"""The Apache Beam preparation (apem_jax.data.beam_prepare) on the DirectRunner: the directory
``prepare.prepare`` writes, byte for byte (but the time it was made), and prepare's errors.

Skipped where Apache Beam is not installed (``pip install -e '.[beam]'``).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

beam = pytest.importorskip("apache_beam")

# pylint: disable=g-import-not-at-top,wrong-import-position
from apem_jax.data import beam_prepare
from apem_jax.data import files as files_lib
from apem_jax.data import prepare
from apem_jax.data import prepared
from test_prepare import all_files, base_spec, make_rows, write_csv, write_spec
# pylint: enable=g-import-not-at-top,wrong-import-position

DIRECT = ["--runner=DirectRunner"]


def _assert_same_directory(a: pathlib.Path, b: pathlib.Path) -> None:
  """Two prepared directories hold the same files with the same bytes, but metadata's
  ``created`` and ``timing``; and read back to the same arrays."""
  assert a.name == b.name  # the same cache key
  assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
  for path in a.iterdir():
    if path.name != prepared.METADATA_FILE:
      assert path.read_bytes() == (b / path.name).read_bytes(), path.name
  meta_a, meta_b = (json.loads((d / prepared.METADATA_FILE).read_text()) for d in (a, b))
  for meta in (meta_a, meta_b):
    del meta["created"], meta["timing"]
  assert meta_a == meta_b
  data_a, data_b = prepared.load_prepared(a), prepared.load_prepared(b)
  assert data_a.schema == data_b.schema
  for split in prepared.SPLITS:
    for key, value in data_a.arrays[split].items():
      np.testing.assert_array_equal(value, data_b.arrays[split][key], err_msg=key)


def _refused_alike(spec: pathlib.Path, tmp_path: pathlib.Path) -> str:
  """The DataError message both prepare and Beam (which leaves no file) refuse ``spec`` with."""
  with pytest.raises(prepare.DataError) as expected:
    prepare.prepare(spec, tmp_path / "local")
  with pytest.raises(prepare.DataError) as got:
    beam_prepare.prepare(spec, tmp_path / "beam", pipeline_options=DIRECT)
  assert str(got.value) == str(expected.value)
  assert all_files(tmp_path / "beam") == []
  return str(got.value)


def test_direct_runner_writes_what_prepare_writes(tmp_path):
  # Three CSV files split by a column, shards smaller than a file: shards take rows of two files.
  rows = make_rows(900, seed=4)
  for i in range(3):
    write_csv(tmp_path / f"events-{i}.csv", rows[300 * i:300 * (i + 1)])
  spec = write_spec(tmp_path, base_spec(files=["events-*.csv"]))
  ours = prepare.prepare(spec, tmp_path / "local", shard_rows=128)
  result = beam_prepare.prepare(spec, tmp_path / "beam", shard_rows=128, pipeline_options=DIRECT)
  assert not result.reused and result.metadata["timing"]["runner"] == "DirectRunner"
  assert result.path.stat().st_mode & 0o777 == 0o777 & ~files_lib.umask()  # not mkdtemp's
  assert len(result.metadata["splits"]["train"]["shards"]) == 6  # 720 rows
  _assert_same_directory(ours.path, result.path)
  assert all_files(tmp_path / "beam") == all_files(tmp_path / "local")  # no temporary left
  again = beam_prepare.prepare(spec, tmp_path / "beam", shard_rows=128, pipeline_options=DIRECT)
  assert again.reused and again.path == result.path


def test_files_per_split_hashing_missing_values_and_dropped_funnels(tmp_path):
  """Parquet files per split (validation and test read in pass 2 only), a hashed feature,
  ``max_size``, fill and indicator policies, a masked task and dropped inconsistent funnels."""
  rng = np.random.default_rng(5)

  def table(n, offset):
    click = rng.random(n) < 0.4
    return pa.table({
        "user": [f"user-{(offset + i) % 97}" for i in range(n)],
        "city": [["a", "b", "c", "d"][min(int(rng.zipf(2)), 4) - 1] for _ in range(n)],
        "price": [None if i % 7 == 0 else float(rng.normal(5, 2)) for i in range(n)],
        "age": [None if i % 5 == 0 else 20 + i % 40 for i in range(n)],
        "clicked": click.astype(int),
        "bought": [None if i % 4 == 0 else int(rng.random() < 0.3) for i in range(n)]})

  for name, n in (("train-1", 300), ("train-2", 250), ("val", 90), ("test", 80)):
    pq.write_table(table(n, len(name) * 31), tmp_path / f"{name}.parquet")
  spec = {"format": "parquet",
          "splits": {"train": ["train-*.parquet"], "validation": ["val.parquet"],
                     "test": ["test.parquet"]},
          "features": [{"name": "user", "type": "categorical", "num_buckets": 50},
                       {"name": "city", "type": "categorical", "max_size": 2},
                       {"name": "price", "type": "numeric", "buckets": 6,
                        "missing": {"fill": -1.0}},
                       {"name": "age", "type": "numeric", "missing": "indicator"}],
          "tasks": [{"name": "click", "label_column": "clicked"},
                    {"name": "buy", "label_column": "bought", "missing": "mask",
                     "depends_on": "click"}],
          "inconsistent_funnel": "drop"}
  path = write_spec(tmp_path, spec)
  ours = prepare.prepare(path, tmp_path / "local", shard_rows=200)
  result = beam_prepare.prepare(path, tmp_path / "beam", shard_rows=200, pipeline_options=DIRECT)
  assert result.metadata["splits"]["train"]["inconsistent_funnel_dropped"] > 0
  assert result.metadata["splits"]["validation"]["inconsistent_funnel_kept"] > 0
  _assert_same_directory(ours.path, result.path)


def test_errors_are_prepares_and_leave_no_cache(tmp_path):
  rows = make_rows(60)
  rows[28]["price"] = "12abc"  # line 30 of the file
  write_csv(tmp_path / "events.csv", rows)
  message = _refused_alike(write_spec(tmp_path, base_spec()), tmp_path)
  assert "events.csv, line 30, column 'price' (a numeric feature): '12abc' is not a number" in (
      message)


def test_user_error_is_found_in_a_remote_runners_text():
  text = ("Workflow failed. Causes: S04:Encode failed., Traceback (most recent call last):\n"
          "  File \"beam_prepare.py\", line 1, in process\n"
          "apem_jax.data.prepare.DataError: gs://b/e.csv, line 3, column 'x' (a numeric "
          "feature): 'a' is not a number [while running 'Encode']\n")
  error = beam_prepare.user_error(RuntimeError(text))
  assert isinstance(error, prepare.DataError)
  assert str(error) == "gs://b/e.csv, line 3, column 'x' (a numeric feature): 'a' is not a number"
  assert beam_prepare.user_error(RuntimeError("worker lost")) is None


def test_command_line_passes_beam_flags(tmp_path, capsys):
  write_csv(tmp_path / "events.csv", make_rows(100))
  spec = write_spec(tmp_path, base_spec())
  beam_prepare.main(["--spec", str(spec), "--cache_root", str(tmp_path / "cache"),
                     "--shard_rows", "50", "--runner=DirectRunner", "--direct_num_workers=1"])
  out = capsys.readouterr().out
  assert out.startswith(f"prepared {tmp_path / 'cache' / 'prepared'}") and "DirectRunner" in out
  with pytest.raises(SystemExit, match=r"^beam_prepare: error: --runnr: not a Beam pipeline "):
    beam_prepare.main(["--spec", str(spec), "--cache_root", str(tmp_path / "cache"),
                       "--runnr=DataflowRunner"])
  (tmp_path / "events.csv").write_text("split,user\n")
  spec = write_spec(tmp_path, base_spec(), "other.json")
  with pytest.raises(SystemExit, match=r"^beam_prepare: error: .*events.csv: has no column "):
    beam_prepare.main(["--spec", str(spec), "--cache_root", str(tmp_path / "cache2")])


def test_object_store_publish_moves_files_with_metadata_last(tmp_path, monkeypatch):
  """Where a directory cannot be renamed (gs://), the files move one by one, metadata.json last
  (a directory is complete once it has one). Run on local files taken for remote ones."""
  tmp, final = tmp_path / ".tmp-x", tmp_path / "x"
  tmp.mkdir()
  final.mkdir()  # an object store has no directories to make
  for name in (prepared.METADATA_FILE, "schema.json", "train-00000.tfrecord"):
    (tmp / name).write_text(name)
  moved = []
  rename = beam_prepare.FileSystems.rename

  def spy(sources, destinations):
    moved.extend(pathlib.Path(d).name for d in destinations)
    rename(sources, destinations)

  monkeypatch.setattr(beam_prepare, "_is_local", lambda path: False)
  monkeypatch.setattr(beam_prepare.FileSystems, "rename", spy)
  assert beam_prepare._publish(str(tmp), str(final))  # pylint: disable=protected-access
  assert moved[-1] == prepared.METADATA_FILE and len(moved) == 3
  assert sorted(p.name for p in final.iterdir()) == sorted(moved) and not list(tmp.iterdir())


def test_object_store_publish_moves_metadata_only_once_every_file_arrived(tmp_path, monkeypatch):
  """Beam's rename goes on past a failed move and raises at the end: with metadata.json in the
  same call, a directory lacking a shard was published as complete (and reused)."""
  tmp, final = tmp_path / ".tmp-x", tmp_path / "x"
  tmp.mkdir()
  final.mkdir()
  for name in (prepared.METADATA_FILE, "schema.json", "train-00000.tfrecord"):
    (tmp / name).write_text(name)
  rename = beam_prepare.FileSystems.rename

  def lossy(sources, destinations):  # every move but the shard's; raises at the end
    kept = [(s, d) for s, d in zip(sources, destinations) if not d.endswith(".tfrecord")]
    if kept:
      rename(*map(list, zip(*kept)))
    if len(kept) < len(sources):
      raise OSError("rename failed")

  monkeypatch.setattr(beam_prepare, "_is_local", lambda path: False)
  monkeypatch.setattr(beam_prepare.FileSystems, "rename", lossy)
  with pytest.raises(OSError):
    beam_prepare._publish(str(tmp), str(final))  # pylint: disable=protected-access
  assert not (final / prepared.METADATA_FILE).exists()
  # A move that reports nothing and does not happen: found by the check before metadata.json.
  monkeypatch.setattr(beam_prepare.FileSystems, "rename", lambda sources, destinations: rename(
      *[[x for x in xs if not x.endswith(".tfrecord")] for xs in (sources, destinations)]))
  with pytest.raises(OSError, match=r"1 prepared files did not arrive .*train-00000.tfrecord"):
    beam_prepare._publish(str(tmp), str(final))  # pylint: disable=protected-access
  assert not (final / prepared.METADATA_FILE).exists()


def test_training_weights_all_zero_are_refused_as_prepare_refuses_them(tmp_path, monkeypatch):
  """The count of weighted training rows is merged across the pieces Beam reads: a training
  split over several pieces, every weight 0, is refused with prepare's message; one weight > 0
  in its last piece is enough."""
  monkeypatch.setattr(prepare, "CSV_SEGMENT_BYTES", 1000)  # pieces of about 15 rows
  rows = make_rows(60)
  for row in rows:
    row["w"] = "0" if row["split"] == "train" else "1"
  write_csv(tmp_path / "events.csv", rows)
  spec = write_spec(tmp_path, base_spec())
  assert "the weight column 'w': every weight of the training split" in _refused_alike(spec,
                                                                                       tmp_path)
  last_train = max(i for i, row in enumerate(rows) if row["split"] == "train")
  rows[last_train]["w"] = "1"
  write_csv(tmp_path / "events.csv", rows)
  _assert_same_directory(prepare.prepare(spec, tmp_path / "local").path,
                         beam_prepare.prepare(spec, tmp_path / "beam",
                                              pipeline_options=DIRECT).path)
