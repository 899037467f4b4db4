"""Training and evaluation streamed from prepared shards: :class:`StreamedSplits`.

The in-memory :class:`apem_jax.data.pipeline.DatasetSplits` holds every split's encoded arrays in
host memory. ``StreamedSplits`` has the same interface (the trainer takes either) but reads the
TFRecord shards of a prepared directory (:mod:`apem_jax.data.prepared`) with tf.data as it goes:
no split is ever held whole in host memory. What it holds: the metadata, the schema and the
preprocessing; per row group, a shuffle window of ``shuffle_buffer`` parsed rows (and its
permuted copy); a few batches in flight (prefetch). Nothing grows with the number of rows.

**Training order** (``train_batches``). The training rows are divided into ``groups`` *row
groups* (``data.stream_groups``; default: one per process). A global batch of ``batch_size`` rows
is the concatenation of one sub-batch of ``batch_size // groups`` rows from each group, in group
order, and process ``i`` of ``k`` reads the contiguous groups ``[i*groups/k, (i+1)*groups/k)``:
its local batch is its groups' sub-batches, concatenated. The global batches therefore do not
depend on the number of processes, only on ``groups``: one process with ``data.stream_groups=2``
trains on exactly the global batches of a two-process run (same rows, same order).

Epoch ``e`` of the sequence of ``seed``:

1. the training files are permuted with ``SeedSequence([seed, e])`` (the same on every process)
   and read, one after the other, as one sequence of the ``n`` training rows; group ``g`` takes
   rows ``[g*n//groups, (g+1)*n//groups)`` of it (:meth:`StreamedSplits.epoch_segments`): whole
   files, and at its two ends a part of a file (read from the record that holds the part's
   first row, each record cut to the part's rows);
2. each group reads its files with ``interleave`` (``interleave_cycle`` files at a time, one
   record of up to ``prepared.RECORD_ROWS`` rows from each in turn, parsed as it is read), cuts
   the rows into windows of ``shuffle_buffer`` rows, permutes each window's rows (seeded with
   ``SeedSequence([seed, e, group])`` and the window's index), cuts them into sub-batches
   (remainder dropped) and takes ``n // batch_size`` of them (:func:`shuffled_batches`): every
   group, so every process, yields the same number of batches per epoch (what the trainer takes);
3. the groups' sub-batches are concatenated, then prefetched.

An epoch reads every training row at most once, whatever the shards' sizes: a group holds
``n // groups`` rows or one more, at least the ``n // batch_size * batch_size // groups`` it
needs, and what is left out of the epoch is the last rows of each group's shuffled stream
(``n % batch_size`` rows in all with one group). As the file permutation changes every epoch,
which rows those are changes too. Shuffling is exact (a uniform permutation) only when
``shuffle_buffer`` is at least a group's rows; below that each window of ``shuffle_buffer`` rows
(across ``interleave_cycle`` files) is permuted uniformly, the bounded approximation of a shuffle
buffer.

*Skip* (a resumed run's position): whole epochs are skipped without reading anything; within an
epoch, the first ``skip`` batches are read and permuted and dropped, so a resume costs reading
up to one epoch's rows before its first batch.

**Evaluation** (``eval_batches``) reads a split's shards in file order, process ``i`` of ``k``
keeping rows ``i, i + k, ...`` (every process reads and parses the whole split and keeps its
rows of each ``k * batch_size // k`` rows), in batches of ``batch_size // k`` padded exactly as
``DatasetSplits.eval_batches``: every process yields ``ceil(ceil(n / k) / (batch_size // k))``
batches, padding rows are zeros with ``weight = 0`` and ``label_mask = 0``. Real rows have weight 1
(as in memory): the prepared example weight applies to the training loss only; the trainer's exact
metrics are over every real row, unweighted.

**Weights.** Training batches carry the prepared example ``weight`` (a spec's ``weight_column``,
else 1); ``losses.py`` multiplies every task's mask by it.

**Memory.** Besides the buffers above, each epoch builds a new tf.data pipeline (a few tens of
KB that TensorFlow keeps for the functions it traced). On glibc, TensorFlow's threads spread
their freed buffers over many malloc arenas, so the resident size wanders by 10-20 MB over
epochs although nothing is kept; ``MALLOC_ARENA_MAX=1`` or ``2`` keeps it flat
(``tests/test_stream.py::test_memory_does_not_grow_with_the_rows``).
"""

from __future__ import annotations

import hashlib
import functools
import json
import os
import pathlib
from typing import Any, Iterator

import jax
import numpy as np

from apem_jax import schema as schema_lib
from apem_jax.data import pipeline
from apem_jax.data import prepared as prepared_lib
from apem_jax.data import preprocessing as prep_lib

DEFAULT_SHUFFLE_BUFFER = 100_000   # rows per row group
DEFAULT_INTERLEAVE_CYCLE = 4       # files a group reads at a time
BATCH_KEYS = ("categorical", "numeric", "labels", "label_mask", "weight")

Batch = dict[str, np.ndarray]


def _seed(*entropy: int) -> int:
  """A non-negative int63 derived from ``entropy`` (tf.data takes int64 seeds)."""
  return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(
      1, np.uint64)[0] >> np.uint64(1))


def shuffled_batches(tf, records, batch_rows: int, window_rows: int, seed: int):
  """``records`` (a dataset whose elements are dicts of tensors of a leading row dimension, e.g.
  :func:`apem_jax.data.prepared.read_rows`) cut into windows of ``window_rows`` rows (rounded up
  to whole batches), each window's rows permuted (``stateless_shuffle`` seeded with ``[seed,
  window index]``) and cut into batches of ``batch_rows`` (the last window's remainder dropped):
  a dataset of dicts of ``[batch_rows, ...]`` tensors.

  A window is permuted as one tensor, so no row is an element of its own: the per-row cost of
  ``Dataset.shuffle`` (which kept the pipeline at half its reading rate) is gone. Within a window
  the permutation is uniform; a row stays in its window, where a shuffle buffer lets a few drift
  further."""
  window = max(1, -(-int(window_rows) // batch_rows)) * batch_rows

  def permute(index, rows):
    n = tf.shape(next(iter(rows.values())))[0]
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n), seed=tf.stack([tf.constant(seed, tf.int64), index]))
    order = order[:n // batch_rows * batch_rows]
    return tf.data.Dataset.from_tensor_slices({
        k: tf.reshape(tf.gather(v, order), tf.concat([[-1, batch_rows], tf.shape(v)[1:]], 0))
        for k, v in rows.items()})

  return records.rebatch(window).enumerate().flat_map(permute)


class StreamedSplits:
  """A prepared directory read as a stream; the interface of ``pipeline.DatasetSplits``.

  Args:
    directory: a prepared directory (``prepare.prepare(...).path``).
    shuffle_buffer: rows in each row group's shuffle window (see :func:`shuffled_batches`).
    groups: row groups of the training order (0: one per process); a multiple of
      ``jax.process_count()`` dividing the batch size.
    interleave_cycle: files each group reads at a time.
  """

  def __init__(self, directory: str | os.PathLike, *, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
               groups: int = 0, interleave_cycle: int = DEFAULT_INTERLEAVE_CYCLE):
    directory = pathlib.Path(directory)
    metadata = prepared_lib.read_metadata(directory)
    if metadata.get("format_version") != prepared_lib.FORMAT_VERSION:
      raise ValueError(f"{directory}: prepared with format version "
                       f"{metadata.get('format_version')}, this code reads "
                       f"{prepared_lib.FORMAT_VERSION}")
    for name, value, low in (("shuffle_buffer", shuffle_buffer, 1), ("stream_groups", groups, 0),
                             ("interleave_cycle", interleave_cycle, 1)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"data.{name}={value!r}: expected an integer >= {low}")
    self.directory = directory
    self.metadata = metadata
    self.shuffle_buffer = int(shuffle_buffer)
    self.groups = int(groups)
    self.interleave_cycle = int(interleave_cycle)
    with open(directory / prepared_lib.SCHEMA_FILE) as f:
      self.schema = schema_lib.Schema.from_dict(json.load(f))
    # Read when asked for (export's encoder, not training): the vocabulary of an id field with
    # millions of values is hundreds of MB as Python strings.
    self.preprocessing_file = directory / prepared_lib.PREPROCESSING_FILE
    if not self.preprocessing_file.exists():
      self.preprocessing_file = None
    splits = metadata["splits"]
    self.inconsistent_funnel_rows = {
        s: int(splits[s].get("inconsistent_funnel_dropped", 0)) for s in splits}
    for split in ("train", "validation"):
      if split not in splits or not splits[split]["rows"]:
        raise ValueError(f"{directory}: the prepared data has no {split!r} rows")
    missing = [s["file"] for split in splits.values() for s in split["shards"]
               if not (directory / s["file"]).exists()]
    if missing:
      raise ValueError(f"{directory}: shard files missing ({missing[:3]}): the prepared data is "
                       f"damaged; delete the directory and prepare again")
    dims = metadata["dims"]
    self._dims = (int(dims["categorical"]), int(dims["numeric"]), int(dims["tasks"]))

  # -- What the trainer asks, without reading rows ------------------------------------------

  def _split(self, split: str) -> dict[str, Any]:
    splits = self.metadata["splits"]
    if split not in splits or not splits[split]["rows"]:
      known = sorted(s for s in splits if splits[s]["rows"])
      raise ValueError(f"unknown split {split!r}; known: {known}")
    return splits[split]

  @functools.cached_property
  def preprocessing(self) -> prep_lib.Preprocessing | None:
    """The prepared preprocessing (vocabularies, statistics), read on first use."""
    if self.preprocessing_file is None:
      return None
    with open(self.preprocessing_file) as f:
      return prep_lib.Preprocessing.from_json(f.read())

  def num_examples(self, split: str) -> int:
    """Rows of ``split`` (all processes together), from the prepared metadata."""
    return int(self._split(split)["rows"])

  def fingerprint(self) -> str:
    """SHA-256 of what identifies the prepared data: its cache key (the spec with its defaults,
    the input files' paths, sizes and modification times, the shard size, the format version)
    and the metadata written with it (rows and shards per split), not the rows themselves. A
    rerun of the same preparation gives the same fingerprint; a resume refuses other data."""
    meta = {k: v for k, v in self.metadata.items() if k not in ("created", "timing")}
    payload = json.dumps({"streamed_prepared_data": meta}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()

  def _files(self, split: str) -> list[str]:
    return [os.fspath(self.directory / s["file"]) for s in self._split(split)["shards"]]

  # -- Reading ------------------------------------------------------------------------------

  def _tf(self):
    return pipeline._import_tf()  # pylint: disable=protected-access

  def _options(self, tf):
    return pipeline._tf_options(tf)  # pylint: disable=protected-access

  def _rows(self, tf, files: list[str]):
    return prepared_lib.read_rows(files, self.metadata["dims"], tf)

  def head(self, split: str, rows: int) -> Batch:
    """The model inputs (``categorical``, ``numeric``) of the first ``rows`` rows of ``split``;
    reads only those rows' records."""
    rows = min(int(rows), self.num_examples(split))
    tf = self._tf()
    ds = self._rows(tf, self._files(split)).rebatch(max(rows, 1)).with_options(self._options(tf))
    batch = next(iter(ds.as_numpy_iterator()))
    return {k: batch[k][:rows] for k in ("categorical", "numeric")}

  def _per_process(self, batch_size: int) -> tuple[int, int, int]:
    return pipeline.DatasetSplits._per_process(batch_size)  # pylint: disable=protected-access

  def check_batch_size(self, batch_size: int) -> None:
    """Raises ``ValueError`` unless ``batch_size`` splits into the processes and row groups."""
    self._per_process(batch_size)
    self._groups(batch_size)

  def _groups(self, batch_size: int) -> tuple[int, range]:
    """``(groups, this process's groups)`` for ``batch_size``."""
    count, index = jax.process_count(), jax.process_index()
    groups = self.groups or count
    if groups % count:
      raise ValueError(f"data.stream_groups={groups} must be a multiple of "
                       f"jax.process_count()={count}")
    if batch_size % groups:
      raise ValueError(f"train.batch_size={batch_size} must be a multiple of the "
                       f"{groups} row groups of the streamed input (data.stream_groups)")
    per = groups // count
    return groups, range(index * per, (index + 1) * per)

  def epoch_segments(self, seed: int, epoch: int, groups: int
                     ) -> list[list[tuple[str, int, int]]]:
    """Each row group's training rows in epoch ``epoch`` of the sequence of ``seed``: a list of
    ``(file, first row, end row)`` ranges of the files in their permuted order (see the module
    docstring)."""
    shards = self._split("train")["shards"]
    order = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(
        len(shards))
    n = self.num_examples("train")
    bounds = [g * n // groups for g in range(groups + 1)]
    segments: list[list[tuple[str, int, int]]] = [[] for _ in range(groups)]
    offset = 0
    for j in order:
      path, rows = os.fspath(self.directory / shards[j]["file"]), int(shards[j]["rows"])
      for g in range(groups):
        lo, hi = max(bounds[g], offset), min(bounds[g + 1], offset + rows)
        if lo < hi:
          segments[g].append((path, lo - offset, hi - offset))
      offset += rows
    return segments

  def _segment_rows(self, tf, path, start, stop):
    """The records of rows ``[start, stop)`` of one shard file (tensors), each cut to its rows
    in the range: a dataset of :func:`apem_jax.data.prepared.parse_record` elements."""
    record = prepared_lib.RECORD_ROWS
    first = start // record  # every record of a shard holds RECORD_ROWS rows but its last
    parse = prepared_lib.parse_record(self.metadata["dims"], tf)

    def cut(i, serialized):
      rows, begin = parse(serialized), (first + i) * record
      return {k: v[tf.maximum(start - begin, 0):stop - begin] for k, v in rows.items()}

    return (tf.data.TFRecordDataset(path, buffer_size=prepared_lib.READ_BUFFER_BYTES)
            .skip(first).take((stop + record - 1) // record - first).enumerate().map(cut))

  def _epoch(self, tf, batch_size: int, seed: int, epoch: int, skip: int):
    """This process's batches of one epoch."""
    groups, mine = self._groups(batch_size)
    sub = batch_size // groups
    steps = self.num_examples("train") // batch_size
    parts = []
    for g, segments in enumerate(self.epoch_segments(seed, epoch, groups)):
      if g not in mine:
        continue
      paths, starts, stops = zip(*segments)
      ds = tf.data.Dataset.from_tensor_slices(
          (list(paths), np.array(starts, np.int64), np.array(stops, np.int64))).interleave(
              lambda f, a, b: self._segment_rows(tf, f, a, b),
              cycle_length=min(self.interleave_cycle, len(segments)), block_length=1)
      parts.append(shuffled_batches(tf, ds, sub, self.shuffle_buffer, _seed(seed, epoch, g))
                   .take(steps))
    ds = parts[0] if len(parts) == 1 else tf.data.Dataset.zip(tuple(parts)).map(
        lambda *xs: {k: tf.concat([x[k] for x in xs], axis=0) for k in xs[0]})
    return ds.skip(skip) if skip else ds

  def train_batches(self, batch_size: int, seed: int, skip: int = 0) -> Iterator[Batch]:
    """Infinite iterator of this process's training batches of ``batch_size // process_count``
    rows: ``categorical``, ``numeric``, ``labels``, ``label_mask``, ``weight`` (the prepared
    example weight). Same seed -> same sequence; ``skip``: start at that batch of the sequence
    (see the module docstring for the order and the cost of skipping)."""
    self.check_batch_size(batch_size)  # errors now, not at the first next()
    steps = self.num_examples("train") // batch_size
    if steps < 1:
      raise ValueError(f"batch_size={batch_size} exceeds the {self.num_examples('train')} "
                       f"training examples")
    if skip < 0:
      raise ValueError(f"skip={skip} must be >= 0")
    return self._train_iterator(batch_size, int(seed), int(skip), steps)

  def _train_iterator(self, batch_size: int, seed: int, skip: int, steps: int) -> Iterator[Batch]:
    tf = self._tf()
    epoch, skip = divmod(skip, steps)
    while True:
      ds = (self._epoch(tf, batch_size, seed, epoch, skip)
            .prefetch(2)
            .with_options(self._options(tf)))
      got = yield from self._read(tf, ds, "train")
      if got != steps - skip:  # a shard shorter than its metadata: the epoch would end early
        raise self._damaged("train", f"epoch {epoch} gave {skip + got} batches of {batch_size} "
                                     f"rows, its metadata's {self.num_examples('train')} rows "
                                     f"make {steps}")
      epoch, skip = epoch + 1, 0

  def _read(self, tf, ds, split: str) -> Iterator[Batch]:
    """Yields ``ds``'s elements (NumPy) and returns how many; a damaged record is a ValueError
    naming the directory and split (TensorFlow's DataLossError named neither)."""
    count = 0
    try:
      for batch in ds.as_numpy_iterator():
        count += 1
        yield batch
    except tf.errors.DataLossError as e:
      raise self._damaged(split, e.message.splitlines()[0] if e.message else str(e)) from None
    return count

  def _damaged(self, split: str, what: str) -> ValueError:
    return ValueError(f"{self.directory}: split {split!r}: {what}: the prepared data is damaged; "
                      f"delete the directory and prepare again")

  def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
    """Finite iterator over this process's rows of ``split``, fixed batch shape, padded last.

    Process ``i`` of ``k`` reads rows ``i, i + k, ...`` (in file order); all processes yield
    ``ceil(ceil(n / k) / (batch_size // k))`` batches. Padding rows are zeros with
    ``weight = 0`` and ``label_mask = 0``; real rows have ``weight = 1``.
    """
    per_process, count, index = self._per_process(batch_size)
    n = self.num_examples(split)
    num_batches = -(-(-(-n // count)) // per_process)
    mine = len(range(index, n, count))
    tf = self._tf()
    ds = self._rows(tf, self._files(split)).rebatch(count * per_process)
    if count > 1:  # rows index, index + count, ... of each count * per_process
      ds = ds.map(lambda rows: {k: v[index::count] for k, v in rows.items()})
    ds = ds.prefetch(2).with_options(self._options(tf))
    fc, fn, t = self._dims
    widths = {"categorical": (fc, np.int32), "numeric": (fn, np.float32),
              "labels": (t, np.float32), "label_mask": (t, np.float32)}
    read = 0
    for batch in self._read(tf, ds, split):
      real = len(batch["weight"])
      read += real
      if read > mine:
        break
      out = {}
      for k, (width, dtype) in widths.items():
        a = np.zeros((per_process, width), dtype)
        a[:real] = batch[k]
        out[k] = a
      weight = np.zeros((per_process,), np.float32)
      weight[:real] = 1.0
      out["weight"] = weight
      num_batches -= 1
      yield out
    if read != mine:
      raise self._damaged(split, f"gave {read} rows to process {index} of {count}, its metadata "
                                 f"says {mine}")
    for _ in range(num_batches):
      out = {k: np.zeros((per_process, width), dtype) for k, (width, dtype) in widths.items()}
      out["weight"] = np.zeros((per_process,), np.float32)
      yield out
