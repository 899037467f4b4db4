"""Training and evaluation streamed from prepared shards (apem_jax.data.stream.StreamedSplits).

The reference is the in-memory path on the same prepared directory (``data.stream=false``:
``prepared.load_prepared`` -> ``DatasetSplits``). The data is test_prepare's click -> purchase
funnel CSV (480 training rows, 60 validation, 60 test), with some example weights set to 0,
prepared in shards of 48 rows (10 training shards) unless a test says otherwise.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from apem_jax.data import pipeline
from apem_jax.data import prepare
from apem_jax.data import prepared
from apem_jax.data import stream
from test_prepare import base_spec, make_rows, write_csv, write_spec

HERE = pathlib.Path(__file__).resolve().parent
TRAIN_ROWS = 480
BATCH = 96  # 5 batches an epoch; a multiple of the 8 test devices


@pytest.fixture(scope="module")
def funnel(tmp_path_factory):
  directory = tmp_path_factory.mktemp("stream")
  rows = make_rows()
  for i, row in enumerate(rows):
    if i % 7 == 3:
      row["w"] = "0"
  write_csv(directory / "events.csv", rows)
  return directory, write_spec(directory, base_spec())


def data_config(funnel, **changes) -> ml_collections.ConfigDict:
  directory, spec_path = funnel
  config = dict(name="spec", spec=str(spec_path), data_dir=str(directory / "cache"), shard_rows=48)
  config.update(changes)
  return ml_collections.ConfigDict(config)


def streamed(funnel, **changes) -> stream.StreamedSplits:
  data = prepare.load_spec_dataset(data_config(funnel, **changes))
  assert isinstance(data, stream.StreamedSplits)
  return data


def in_memory(funnel, **changes) -> pipeline.DatasetSplits:
  data = prepare.load_spec_dataset(data_config(funnel, stream=False, **changes))
  assert isinstance(data, pipeline.DatasetSplits)
  return data


def table(batches, weight: bool = True) -> np.ndarray:
  """The rows of ``batches`` (dicts of arrays) as one float64 table, one row per example."""
  if isinstance(batches, dict):
    batches = [batches]
  keys = ("categorical", "numeric", "labels", "label_mask") + (("weight",) if weight else ())
  return np.concatenate([np.concatenate(
      [np.asarray(b[k], np.float64).reshape(len(b["labels"]), -1) for k in keys], axis=1)
      for b in batches])


def sorted_rows(t: np.ndarray) -> np.ndarray:
  return t[np.lexsort(t.T[::-1])]


def split_rows(data: stream.StreamedSplits, split: str) -> np.ndarray:
  """Every row of a split, with its prepared weight, read whole (the reference)."""
  return table(prepared.read_split(data.directory, split))


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def processes(monkeypatch, count: int, index: int) -> None:
  monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(jax, "process_index", lambda: index)


# ---------------------------------------------------------------------------------------------
# What the trainer asks without reading rows; the config
# ---------------------------------------------------------------------------------------------

def test_wiring_metadata_head_and_fingerprint(funnel):
  data, memory = streamed(funnel), in_memory(funnel)
  assert data.schema == memory.schema
  assert data.preprocessing.to_dict() == memory.preprocessing.to_dict()
  assert data.inconsistent_funnel_rows == memory.inconsistent_funnel_rows
  for split in ("train", "validation", "test"):
    assert data.num_examples(split) == memory.num_examples(split)
    for rows in (0, 1, 7, 50):  # 0: one row came back
      for k, v in memory.head(split, rows).items():
        got = data.head(split, rows)[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, v)
  assert data.num_examples("train") == TRAIN_ROWS
  with pytest.raises(ValueError, match="unknown split"):
    data.num_examples("nope")
  # The fingerprint identifies the prepared data (spec, files, shard size), not the stream's
  # settings, and is stable across loads.
  assert data.fingerprint() == streamed(funnel, shuffle_buffer=7).fingerprint()
  assert data.fingerprint() != streamed(funnel, shard_rows=100).fingerprint()
  directory, _ = funnel
  changed = json.loads(write_spec(directory, base_spec()).read_text())
  changed["features"][3]["buckets"] = 4
  other = prepare.load_spec_dataset(ml_collections.ConfigDict(dict(
      name="spec", spec=str(write_spec(directory, changed, "other.json")),
      data_dir=str(directory / "cache"), shard_rows=48)))
  assert other.fingerprint() != data.fingerprint()
  # Config checks.
  with pytest.raises(ValueError, match=r"data.shuffle_buffer: used only by the streamed input"):
    prepare.load_spec_dataset(data_config(funnel, stream=False, shuffle_buffer=10))
  with pytest.raises(ValueError, match=r"data.stream='yes': expected true or false"):
    prepare.load_spec_dataset(data_config(funnel, stream="yes"))
  with pytest.raises(ValueError, match=r"data.shuffle_buffer=0"):
    prepare.load_spec_dataset(data_config(funnel, shuffle_buffer=0))
  with pytest.MonkeyPatch.context() as mp:
    processes(mp, 2, 0)
    with pytest.raises(ValueError, match=r"data.stream_groups=3 must be a multiple"):
      streamed(funnel, stream_groups=3).train_batches(BATCH, seed=0)
    with pytest.raises(ValueError, match=r"batch_size=96 must be a multiple of the 10 row groups"):
      streamed(funnel, stream_groups=10).train_batches(BATCH, seed=0)


# ---------------------------------------------------------------------------------------------
# (a) training order
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,buffer", [(0, 1000), (0, 16), (2, 1000), (2, 30)])
def test_an_epoch_reads_every_training_row_once(funnel, groups, buffer):
  data = streamed(funnel, stream_groups=groups, shuffle_buffer=buffer)
  expected = sorted_rows(split_rows(data, "train"))
  assert (expected[:, -1] == 0).any() and (expected[:, -1] > 1).any()  # the spec's weights
  batches = take(data.train_batches(BATCH, seed=5), 2 * TRAIN_ROWS // BATCH)
  assert all(b["weight"].shape == (BATCH,) and b["categorical"].dtype == np.int32
             for b in batches)
  epochs = [table(batches[:5]), table(batches[5:])]
  for rows in epochs:
    np.testing.assert_array_equal(sorted_rows(rows), expected)
  assert not np.array_equal(epochs[0], epochs[1])  # each epoch in another order


def test_shuffled_batches_permute_whole_windows():
  """1,000 rows in records of 7 rows, batches of 64 and windows of 200 rows (rounded up to 256):
  15 batches, four per full window, each window's rows a permutation of its rows (the features
  of a row kept together); the last window's remainder (40 rows) dropped; the same seed the same
  batches, another seed another order."""
  tf = pipeline._import_tf()  # pylint: disable=protected-access

  def batches(seed):
    records = tf.data.Dataset.range(1000).batch(7).map(
        lambda x: {"id": x, "pair": tf.stack([x, -x], axis=1)})
    got = list(stream.shuffled_batches(tf, records, 64, 200, seed).as_numpy_iterator())
    for b in got:
      np.testing.assert_array_equal(b["pair"], np.stack([b["id"], -b["id"]], axis=1))
    return [b["id"] for b in got]

  got = batches(7)
  assert len(got) == 15 and all(b.shape == (64,) for b in got)
  for w in range(4):
    rows = np.concatenate(got[4 * w:4 * w + 4])
    if w < 3:  # a full window: exactly its 256 rows
      np.testing.assert_array_equal(np.sort(rows), np.arange(256 * w, 256 * (w + 1)))
    else:      # the last 232 rows: 192 of them, each once
      assert len(set(rows)) == 192 and rows.min() >= 768
    assert not np.array_equal(rows, np.sort(rows))
  np.testing.assert_array_equal(np.concatenate(batches(7)), np.concatenate(got))
  assert not np.array_equal(np.concatenate(batches(8)), np.concatenate(got))


def test_same_seed_same_batches_other_seed_other_order_skip(funnel):
  data = streamed(funnel, shuffle_buffer=64)
  first = take(data.train_batches(BATCH, seed=3), 12)
  again = take(data.train_batches(BATCH, seed=3), 12)
  for a, b in zip(first, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = take(data.train_batches(BATCH, seed=4), 5)
  assert not np.array_equal(table(other), table(first[:5]))
  np.testing.assert_array_equal(sorted_rows(table(other)), sorted_rows(table(first[:5])))
  for skip in (3, 5, 7):  # within the first epoch, at its end, in the second
    skipped = take(data.train_batches(BATCH, seed=3, skip=skip), 12 - skip)
    np.testing.assert_array_equal(table(skipped), table(first[skip:]))


def test_two_processes_read_their_own_rows_and_make_the_one_process_global_batches(
    funnel, monkeypatch):
  """2 row groups: process i's rows of an epoch are exactly its group's rows, and its local
  batches, put side by side with the other process's, are the global batches of one process
  reading both groups (data.stream_groups=2)."""
  data = streamed(funnel, stream_groups=2, shuffle_buffer=100)
  one = take(data.train_batches(BATCH, seed=9), 10)
  local = []
  for index in range(2):
    processes(monkeypatch, 2, index)
    local.append(take(data.train_batches(BATCH, seed=9), 10))
    assert all(b["labels"].shape[0] == BATCH // 2 for b in local[-1])
    for epoch in range(2):
      np.testing.assert_array_equal(
          sorted_rows(table(local[-1][5 * epoch:5 * epoch + 5])),
          sorted_rows(group_rows(data, data.epoch_segments(9, epoch, 2)[index])))
  for g, a, b in zip(one, *local):
    np.testing.assert_array_equal(table(g), np.concatenate([table(a), table(b)]))


def group_rows(data: stream.StreamedSplits, segments) -> np.ndarray:
  """The rows of a group's ``(file, start, stop)`` segments, read whole (the reference)."""
  return np.concatenate([split_rows_of_file(data, f)[a:b] for f, a, b in segments])


def split_rows_of_file(data: stream.StreamedSplits, file: str) -> np.ndarray:
  meta = json.loads(json.dumps(data.metadata))
  shard = next(s for s in meta["splits"]["train"]["shards"] if file.endswith(s["file"]))
  meta["splits"]["train"] = {"rows": shard["rows"], "shards": [shard]}
  return table(prepared.read_split(data.directory, "train", meta))


@pytest.mark.parametrize("shard_rows, groups, batch", [
    (100, 2, BATCH),  # shards of 100, 100, 100, 100, 80: each group 240 rows, files cut in two
    (470, 2, BATCH),  # shards of 470 and 10 (records of 128 rows: cuts inside later records)
    (470, 3, BATCH),  # 160 rows a group
    (100, 2, 64)])    # 7 batches an epoch: 16 rows of each group's 240 left out
def test_unequal_shards_give_every_group_its_share_and_every_row_at_most_once(
    funnel, monkeypatch, shard_rows, groups, batch):
  """Whatever the shards' sizes, each row group holds n // groups rows of the permuted files
  (parts of files included), so an epoch of every process together reads no row twice; with
  batches that divide the rows, every row exactly once."""
  data = streamed(funnel, stream_groups=groups, shuffle_buffer=50, shard_rows=shard_rows)
  assert len({s["rows"] for s in data.metadata["splits"]["train"]["shards"]}) == 2
  train = split_rows(data, "train")
  steps = TRAIN_ROWS // batch
  for epoch in range(2):
    segments = data.epoch_segments(1, epoch, groups)
    assert [sum(b - a for _, a, b in s) for s in segments] == [
        (g + 1) * TRAIN_ROWS // groups - g * TRAIN_ROWS // groups for g in range(groups)]
    np.testing.assert_array_equal(
        sorted_rows(np.concatenate([group_rows(data, s) for s in segments])), sorted_rows(train))
  per_process = []
  for index in range(2 if groups % 2 == 0 else 1):
    processes(monkeypatch, 2 if groups % 2 == 0 else 1, index)
    per_process.append(take(data.train_batches(batch, seed=1), 2 * steps))
  for epoch in range(2):
    rows = table([b for p in per_process for b in p[epoch * steps:(epoch + 1) * steps]])
    assert len(rows) == steps * batch
    # No row more often than the training split holds it (a row read twice would be).
    held = {tuple(r): c for r, c in zip(*np.unique(train, axis=0, return_counts=True))}
    read = dict(zip(map(tuple, np.unique(rows, axis=0)),
                    np.unique(rows, axis=0, return_counts=True)[1]))
    assert all(c <= held.get(r, 0) for r, c in read.items())
    if steps * batch == TRAIN_ROWS:
      np.testing.assert_array_equal(sorted_rows(rows), sorted_rows(train))


# ---------------------------------------------------------------------------------------------
# (b) evaluation
# ---------------------------------------------------------------------------------------------

def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    assert sorted(a) == sorted(b)
    for k in b:
      assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("count", [1, 2])
def test_eval_batches_are_the_in_memory_ones(funnel, monkeypatch, count):
  data, memory = streamed(funnel), in_memory(funnel)
  for split in ("validation", "test", "train"):
    for batch_size in (16, 32, 48, 256):
      rows = []
      for index in range(count):
        processes(monkeypatch, count, index)
        got = list(data.eval_batches(split, batch_size))
        _assert_same_batches(got, list(memory.eval_batches(split, batch_size)))
        rows.append(table([{k: v[b["weight"] > 0] for k, v in b.items()} for b in got],
                          weight=False))
      n = data.num_examples(split)
      assert sum(len(r) for r in rows) == n
      np.testing.assert_array_equal(sorted_rows(np.concatenate(rows)),
                                    sorted_rows(split_rows(data, split)[:, :-1]))


# ---------------------------------------------------------------------------------------------
# (c) the trainer, end to end; (e) the example weight in the loss
# ---------------------------------------------------------------------------------------------

def tiny_config(funnel, **data_changes) -> ml_collections.ConfigDict:
  from test_trainer import tiny_config as base  # pylint: disable=g-import-not-at-top
  config = base("shared_bottom")
  config.model.update(bottom_hidden=(16,), tower_hidden=(8,))
  config.data = data_config(funnel, **data_changes)
  config.train.update(batch_size=BATCH, eval_batch_size=32, num_epochs=2, log_every=5)
  return config


def test_trains_streamed_and_evaluates_exactly_as_in_memory(funnel, tmp_path):
  from apem_jax import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_config(funnel, shuffle_buffer=200)
  workdir = str(tmp_path / "run")
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary["steps"] == 2 * TRAIN_ROWS // BATCH and summary["epochs"] == 2
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["steps"] == summary["steps"]
  assert set(summary["best_validation"]) == {"click", "purchase"}
  memory = in_memory(funnel)
  for kind in ("best", "latest"):
    got = trainer.evaluate_checkpoint(config, workdir, "validation", kind=kind)
    ref = trainer.evaluate_checkpoint(config, workdir, "validation", kind=kind, data=memory)
    assert got == ref
    assert got["metrics"]["click"]["examples"] == 60
  best = trainer.evaluate_checkpoint(config, workdir, "validation")
  assert best["metrics"] == summary["best_validation"]
  # The run's preprocessing.json is the prepared file, copied without being parsed by the
  # training process (a vocabulary of millions of ids would cost it hundreds of MB).
  data = streamed(funnel, shuffle_buffer=200)
  trainer.write_preprocessing(data, str(tmp_path / "copy.json"))
  assert "preprocessing" not in vars(data)  # the lazy property was never read
  assert (tmp_path / "copy.json").read_bytes() == data.preprocessing_file.read_bytes() == (
      pathlib.Path(workdir) / "preprocessing.json").read_bytes()
  test = trainer.evaluate_checkpoint(config, workdir, "test")
  assert test == trainer.evaluate_checkpoint(config, workdir, "test", data=memory)


def test_row_groups_that_do_not_divide_the_batch_are_refused_before_the_run_writes(funnel,
                                                                                  tmp_path):
  """The check ran at the first batch, once config.json, the checkpoint directory and the
  TensorBoard events were written."""
  from apem_jax import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_config(funnel, stream_groups=5)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"batch_size=96 must be a multiple of the 5 row groups"):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("damage", ["empty", "cut", "flipped"])
def test_a_damaged_shard_is_named_damaged_not_read_around(funnel, tmp_path, damage):
  """A training shard emptied (a valid TFRecord file of no record) ended each epoch early, and
  the trainer took its batches from the next epoch: rows seen twice, no error. A shard cut
  mid-record or with a flipped byte raised TensorFlow's DataLossError, naming no file."""
  import shutil  # pylint: disable=g-import-not-at-top
  directory = tmp_path / "prepared"
  shutil.copytree(streamed(funnel).directory, directory)
  shard = directory / json.loads((directory / prepared.METADATA_FILE).read_text())[
      "splits"]["train"]["shards"][3]["file"]
  record = shard.read_bytes()
  if damage == "flipped":
    record = record[:-10] + bytes([record[-10] ^ 0xFF]) + record[-9:]
  shard.write_bytes({"empty": b"", "cut": record[:len(record) // 2]}.get(damage, record))
  data = stream.StreamedSplits(directory)
  message = rf"{directory}: split 'train': .*the prepared data is damaged; delete the directory"
  batches = data.train_batches(BATCH, seed=0)
  with pytest.raises(ValueError, match=message):
    for _ in range(TRAIN_ROWS // BATCH):
      next(batches)
  with pytest.raises(ValueError, match=message):
    list(data.eval_batches("train", BATCH))


def test_example_weight_reaches_the_loss(funnel):
  """Rows of weight 0 do not move the parameters; rows of weight > 0 do, and their weights
  count (the same batch at weight 1 trains to other parameters)."""
  from apem_jax import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_config(funnel)
  exp = trainer.Experiment(config)
  batch = next(exp.data.train_batches(BATCH, seed=0))
  zero = batch["weight"] == 0
  assert zero.any() and (batch["weight"] > 1).any()

  def params_after(b):
    state, _ = exp.train_step(exp.init_state(), exp.device_batch(b))
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]

  def changed(rows):
    b = {k: v.copy() for k, v in batch.items()}
    b["labels"][rows] = np.where(b["label_mask"][rows] > 0, 1 - b["labels"][rows], 0)
    vocab = np.asarray(exp.schema.vocab_sizes)
    b["categorical"][rows] = (b["categorical"][rows] + 1) % (vocab + 1)
    b["numeric"][rows] += 1.5
    return b

  reference = params_after(batch)
  for a, b in zip(reference, params_after(changed(zero))):
    np.testing.assert_array_equal(a, b)
  positive = np.flatnonzero(~zero)[:3]
  assert any(not np.array_equal(a, b)
             for a, b in zip(reference, params_after(changed(positive))))
  ones = dict(batch, weight=np.ones_like(batch["weight"]))
  assert any(not np.array_equal(a, b) for a, b in zip(reference, params_after(ones)))


# ---------------------------------------------------------------------------------------------
# (d) bounded memory
# ---------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from apem_jax.data import prepared, stream

    def rss_mb():
      with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    directory, batch = sys.argv[1], 256
    data = stream.StreamedSplits(directory, shuffle_buffer=2000)
    steps = data.num_examples("train") // batch
    batches = data.train_batches(batch, seed=0)
    next(batches)                                  # TensorFlow's own start-up, not the rows
    list(data.eval_batches("validation", batch))
    base = peak = rss_mb()
    for _ in range(3 * steps - 1):                 # three epochs
      next(batches)
      peak = max(peak, rss_mb())
    for _ in data.eval_batches("train", batch):    # the training split, evaluated
      peak = max(peak, rss_mb())
    streamed = peak - base
    start = rss_mb()
    whole = prepared.read_split(directory, "train")  # the control: the split in memory
    held = rss_mb() - start
    print(json.dumps({"streamed_mb": streamed, "in_memory_mb": held,
                      "arrays_mb": sum(v.nbytes for v in whole.values()) / 2**20}))
""")


def test_memory_does_not_grow_with_the_rows(tmp_path):
  """Three epochs and an evaluation of a 270,000-row training split (29 MB as arrays, 60 MB of
  shards) through 2,000-row shuffle buffers: the process's resident memory grows by less than a
  third of the split's arrays (measured: ~4 MB), where reading the split into memory grows it by
  more than them (~80 MB).

  Measured in a fresh process with ``MALLOC_ARENA_MAX=1``: with glibc's default of up to 8 malloc
  arenas per core, TensorFlow's threads leave freed memory scattered over many arenas and the
  resident size wanders by ~10-20 MB over epochs (no allocation is kept: with one arena it stays
  flat)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  n, width = 300_000, 24
  rng = np.random.default_rng(0)
  columns = {"user": rng.integers(0, 5000, n).astype(str),
             "clicked": (rng.random(n) < 0.3).astype(np.int64),
             "split": np.array(["train", "validation", "test"])[
                 (np.arange(n) % 20 >= 18).astype(int) + (np.arange(n) % 20 == 19)]}
  columns.update({f"x{j}": rng.standard_normal(n).astype(np.float32) for j in range(width)})
  pq.write_table(pa.table(columns), tmp_path / "rows.parquet")
  spec = {"format": "parquet", "files": ["rows.parquet"], "split": {"split_column": "split"},
          "features": [{"name": "user", "type": "categorical"}] +
                      [{"name": f"x{j}", "type": "numeric"} for j in range(width)],
          "tasks": [{"name": "click", "label_column": "clicked"}]}
  result = prepare.prepare(write_spec(tmp_path, spec), tmp_path / "cache", shard_rows=20_000)
  env = dict(os.environ, MALLOC_ARENA_MAX="1", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(result.path)], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  probe = json.loads(out.stdout.strip().splitlines()[-1])
  assert probe["arrays_mb"] > 25
  assert probe["in_memory_mb"] > probe["arrays_mb"], probe     # the control can fail the bound
  assert probe["streamed_mb"] < probe["arrays_mb"] / 3, probe
