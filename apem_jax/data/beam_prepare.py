"""The preparation of :mod:`apem_jax.data.prepare` as an Apache Beam pipeline, for any Beam runner.

:func:`prepare` writes what :func:`prepare.prepare` writes: the same directory
``<cache_root>/prepared/<spec name>-<key>`` (the same cache key), the same ``schema.json``,
``statistics.json``, ``preprocessing.json`` and ``metadata.json`` (but ``created`` and ``timing``),
and shards with the same bytes: the same examples, in the same order, ``shard_rows`` to a file.
Training cannot tell which one prepared a directory. Every step is prepare.py's own function
(reading, split assignment, checks, fitting, ``encode_chunk``, the record serialisation); what
is new here is only how the work is divided and merged::

  pass-1 files -> Fit (per file: read_file, split_ids, _Fitter.add) -> partial statistics
    -> MergeStatistics (CombineGlobally) -> prepare's Fitted, a side input of what follows
  pass-2 files -> Encode (per file: read_file, split_ids, encode_chunk) -> one part per (file,
    split): the encoded rows, fixed-width binary
    -> PlanShards: each split's rows in prepare's order (pass-1 files, then the validation and
       test files) cut into shards of shard_rows -> WriteShards (the parts' rows serialised into
       records, as prepared.ShardWriter does)
    -> Finish: schema.json, statistics.json, preprocessing.json, metadata.json
  the launcher: cache key, temporary directory, file-change check, rename into place.

**Files are the unit of parallelism** (one worker reads one file, in the batches of prepare.py). The
statistics merge exactly: vocabulary counts are summed (``min_count``/``max_size`` applied once,
at the end); numeric moments keep each batch's (count, mean, M2) and replay prepare's Chan update
in prepare's read order, so means and stds are bit-identical; the bucket sample is prepare's
bottom-k sketch of distinct values, merged as a union (order-independent: exact below
``QUANTILE_SAMPLE_SIZE`` distinct values, the same sample above). CSV is parsed twice (prepare.py
spills its parsed batches to local disk instead; a worker's disk is not shared).

**Storage**: ``cache_root`` is a local directory (the DirectRunner) or anything Beam's
``FileSystems`` writes (``gs://`` for Dataflow: every worker writes its parts and shards there).
A local result is renamed into place whole, as prepare.py does; on an object store, where a
directory cannot be renamed, the files are moved one by one and ``metadata.json`` last (its
presence is what marks a prepared directory as complete). Part and shard names are fixed by the
file and shard index, so a runner that retries a bundle overwrites what the failed try wrote.

**Errors** are prepare.py's, one line naming the file, line/row/record, column and value; the
runner's ``[while running '...']`` suffix is removed. When several files are bad, which error
comes first depends on the runner's scheduling (prepare.py reports the first in file order).

Command line (flags it does not know go to Beam's ``PipelineOptions``)::

  python -m apem_jax.data.beam_prepare --spec spec.json --cache_root data [--shard_rows N] \\
      [--runner=DirectRunner | --runner=DataflowRunner --project=P --region=R \\
       --temp_location=gs://B/tmp --setup_file=./pyproject.toml ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from apem_jax.data import files as files_lib
from apem_jax.data import prepare as prep
from apem_jax.data import prepared as prepared_lib
from apem_jax.data import spec as spec_lib


class _ImportNotice(logging.Filter):
  """Drops the warning Beam logs when imported without its GCP extra ("apitools not found, and
  bigquery client libraries are not available..."): nothing here uses BigQuery."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "apitools not found" not in record.getMessage()


_NOTICE = _ImportNotice()
logging.getLogger().addFilter(_NOTICE)
# pylint: disable=g-import-not-at-top
try:
  import apache_beam as beam
  from apache_beam.io import filesystem as beam_filesystem
  from apache_beam.io.filesystems import FileSystems
  from apache_beam.options import pipeline_options as beam_options
finally:
  logging.getLogger().removeFilter(_NOTICE)
# pylint: enable=g-import-not-at-top

PROGRAM = "beam_prepare"
PARTS_DIR = "parts"  # inside the temporary directory; removed before it is renamed
COPY_ROWS = 65_536  # rows read at a time from a part into a shard
_RAW = beam_filesystem.CompressionTypes.UNCOMPRESSED


# --------------------------------------------------------------------------------------------
# Paths: local or any Beam file system
# --------------------------------------------------------------------------------------------

def _is_local(path: str) -> bool:
  return not spec_lib._is_remote(path)  # pylint: disable=protected-access


def _join(base: str, *names: str) -> str:
  return os.path.join(base, *names) if _is_local(base) else FileSystems.join(base, *names)


def _write_bytes(path: str, data: bytes) -> None:
  with FileSystems.create(path, compression_type=_RAW) as f:
    f.write(data)


def _write_json(path: str, obj: Any) -> None:
  """What prepare.py's ``_write_json`` writes (``indent=1``, a final newline), on any file
  system."""
  _write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _read_json(path: str) -> Any:
  with FileSystems.open(path, compression_type=_RAW) as f:
    return json.loads(f.read())


# --------------------------------------------------------------------------------------------
# Pass 1: partial statistics per file, merged by a CombineFn
# --------------------------------------------------------------------------------------------

class _MomentLog:
  """Stands in for ``prepare._Moments`` in a ``_Fitter``: keeps each batch's ``(position, count,
  mean, M2)`` instead of merging, so that :func:`_replay` can merge them in prepare's order.
  ``position`` is ``(file index, batch index)``, set before each batch is added."""

  def __init__(self):
    self.position = (0, 0)
    self.batches: list[tuple[tuple[int, int], int, float, float]] = []

  def add(self, x: np.ndarray) -> None:
    """``x``: float64 [n], the batch's present (transformed) training values."""
    if len(x):
      mean = float(x.mean())
      self.batches.append((self.position, len(x), mean, float(np.square(x - mean).sum())))


def _replay(batches: Sequence[tuple[tuple[int, int], int, float, float]]) -> Any:
  """``prepare._Moments`` after every batch, in read order: ``_Moments.add``'s float operations
  (Chan's update) on each batch's (count, mean, M2), so the result is bit-identical to
  prepare.py's single pass over the same batches."""
  m = prep._Moments()  # pylint: disable=protected-access
  for _, nb, mb, m2b in sorted(batches, key=lambda b: b[0]):
    total = m.n + nb
    delta = mb - m.mean
    m.mean += delta * nb / total
    m.m2 += m2b + delta * delta * m.n * nb / total
    m.n = total
  return m


@dataclasses.dataclass
class _Partial:
  """Pass-1 statistics of some files: a ``prepare._Fitter`` whose moments are :class:`_MomentLog`,
  the rows read and the seconds spent reading them."""

  fitter: Any
  rows_read: int = 0
  seconds: float = 0.0


def _new_partial(spec: spec_lib.Spec) -> _Partial:
  fitter = prep._Fitter(spec)  # pylint: disable=protected-access
  fitter.moments = {name: _MomentLog() for name in fitter.moments}
  return _Partial(fitter)


def _merge(into: _Partial, other: _Partial) -> _Partial:
  """Adds ``other``'s statistics to ``into`` (exact: counts and sums add, batch moments are
  concatenated, bottom-k samples unite)."""
  a, b = into.fitter, other.fitter
  for name, counter in b.counters.items():
    table = counter.result()
    if len(table):
      a.counters[name].add(table["value"].combine_chunks(), table["count"].to_numpy())
  for name, log in b.moments.items():
    a.moments[name].batches.extend(log.batches)
  for name, sample in b.samples.items():
    if len(sample.values):
      a.samples[name].add(sample.values)
  for name, n in b.missing.items():
    a.missing[name] += n
  a.rows += b.rows
  a.dropped += b.dropped
  a.weighted += b.weighted
  a.positives = a.positives + b.positives
  a.labelled = a.labelled + b.labelled
  into.rows_read += other.rows_read
  into.seconds += other.seconds
  return into


@dataclasses.dataclass
class _FitResult:
  """What pass 1 hands on: prepare's ``Fitted`` and how much it read."""

  fitted: Any
  rows_read: int
  seconds: float


class _FitFile(beam.DoFn):
  """One pass-1 file ``(index, split or None, path)`` -> its :class:`_Partial` (every row checked,
  the training rows counted, as prepare.py's pass 1 does)."""

  def __init__(self, spec: spec_lib.Spec):
    self.spec = spec

  def process(self, item: tuple[int, str | None, str]) -> Iterator[_Partial]:
    index, split, path = item
    start = time.perf_counter()
    partial = _new_partial(self.spec)
    kinds = prep.column_kinds(self.spec)
    chunks = prep._ahead(prep.read_file(path, self.spec, kinds))  # pylint: disable=protected-access
    for b, chunk in enumerate(chunks):
      for log in partial.fitter.moments.values():
        log.position = (index, b)
      partial.fitter.add(chunk, prep.split_ids(chunk, self.spec, split))
      partial.rows_read += chunk.num_rows
    partial.seconds = time.perf_counter() - start
    yield partial


class _FitCombine(beam.CombineFn):
  """Merges the files' :class:`_Partial` statistics; the output is prepare's ``Fitted``
  (``_Fitter.finalize``), or prepare's error when the training split has no rows."""

  def __init__(self, spec: spec_lib.Spec, pass1_paths: Sequence[str]):
    self.spec = spec
    self.pass1_paths = tuple(pass1_paths)

  def create_accumulator(self) -> _Partial:
    return _new_partial(self.spec)

  def add_input(self, accumulator: _Partial, element: _Partial) -> _Partial:
    return _merge(accumulator, element)

  def merge_accumulators(self, accumulators) -> _Partial:
    accumulators = iter(accumulators)
    out = next(accumulators)
    for other in accumulators:
      out = _merge(out, other)
    return out

  def extract_output(self, accumulator: _Partial) -> _FitResult:
    fitter = accumulator.fitter
    if fitter.rows == 0:
      extra = (f" (all {fitter.dropped} dropped as inconsistent funnels)" if fitter.dropped
               else "")
      raise prep.DataError(f"{self.spec.source}: the train split has no rows{extra} (files: "
                           f"{', '.join(self.pass1_paths)})")
    fitter.moments = {name: _replay(log.batches) for name, log in fitter.moments.items()}
    return _FitResult(fitter.finalize(), accumulator.rows_read, accumulator.seconds)


# --------------------------------------------------------------------------------------------
# Pass 2: every file encoded into parts, the parts cut into shards
# --------------------------------------------------------------------------------------------

def _row_dtype(widths: Mapping[str, int]) -> np.dtype:
  """The fixed-width layout of a part's rows: each of prepared.FEATURE_KEYS, little-endian."""
  return np.dtype([(k, "<i8" if k == "categorical" else "<f4", (widths[k],))
                   for k in prepared_lib.FEATURE_KEYS])


@dataclasses.dataclass
class _Part:
  """One file's rows of one split: ``data`` holds them one after the other in the layout of
  :func:`_row_dtype` of ``widths``."""

  split: str
  rows: int
  data: str | None  # None: no row (every training row of the file dropped)
  widths: Mapping[str, int] | None
  dropped: int
  kept_inconsistent: int


@dataclasses.dataclass
class _Encoded:
  """One pass-2 file: its index in prepare's order, rows read, seconds, parts."""

  index: int
  rows_read: int
  seconds: float
  parts: list[_Part]


class _PartWriter:
  """Appends a split's encoded batches to ``<parts>/<split>-<file index>.rows``."""

  def __init__(self, parts_dir: str, split: str, index: int):
    self.split, self.data = split, _join(parts_dir, f"{split}-{index:05d}.rows")
    self._data = self.widths = None
    self.rows = self.dropped = self.kept = 0

  def write(self, arrays: Mapping[str, np.ndarray], dropped: int, kept: int) -> None:
    """``arrays``: encode_chunk's ``{categorical [n, Fc], numeric [n, Fn], labels [n, T],
    label_mask [n, T], weight [n]}`` of this split."""
    self.dropped += dropped
    self.kept += kept
    n = len(arrays["weight"])
    if not n:
      return
    if self._data is None:
      self.widths = {k: int(np.prod(arrays[k].shape[1:], dtype=int))
                     for k in prepared_lib.FEATURE_KEYS}
      self._data = FileSystems.create(self.data, compression_type=_RAW)
    rows = np.empty(n, _row_dtype(self.widths))
    for k in prepared_lib.FEATURE_KEYS:
      rows[k] = arrays[k].reshape(n, -1)
    self._data.write(rows.tobytes())
    self.rows += n

  def close(self) -> _Part:
    if self._data is not None:
      self._data.close()
    written = self.rows > 0
    return _Part(self.split, self.rows, self.data if written else None, self.widths,
                 self.dropped, self.kept)


class _EncodeFile(beam.DoFn):
  """One pass-2 file ``(index, split or None, path)`` -> :class:`_Encoded` (its parts written),
  with the fitted encoders (a side input)."""

  def __init__(self, spec: spec_lib.Spec, parts_dir: str):
    self.spec = spec
    self.parts_dir = parts_dir

  def process(self, item: tuple[int, str | None, str], fit: _FitResult) -> Iterator[_Encoded]:
    index, split, path = item
    start = time.perf_counter()
    writers: dict[str, _PartWriter] = {}
    rows = 0
    kinds = prep.column_kinds(self.spec)
    chunks = prep._ahead(prep.read_file(path, self.spec, kinds))  # pylint: disable=protected-access
    try:
      for chunk in chunks:
        rows += chunk.num_rows
        ids = prep.split_ids(chunk, self.spec, split)
        for s, (arrays, dropped, kept) in prep.encode_chunk(chunk, ids, self.spec,
                                                            fit.fitted).items():
          if s not in writers:
            writers[s] = _PartWriter(self.parts_dir, s, index)
          writers[s].write(arrays, dropped, kept)
    finally:
      parts = [writers[s].close() for s in prepared_lib.SPLITS if s in writers]
    yield _Encoded(index, rows, time.perf_counter() - start, parts)


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """Shard ``index`` of ``split``: ``pieces`` ``(part data, first row, end row)`` in order,
  ``rows`` in all, the parts' rows of ``widths``."""

  split: str
  index: int
  pieces: tuple[tuple[str, int, int], ...]
  rows: int
  widths: Mapping[str, int]


def plan_shards(encoded: Sequence[_Encoded], shard_rows: int) -> list[ShardTask]:
  """Each split's rows, in file order then row order (prepare.py's write order), cut into shards
  of ``shard_rows`` rows (each split's last fewer)."""
  tasks = []
  for split in prepared_lib.SPLITS:
    parts = [p for e in sorted(encoded, key=lambda e: e.index) for p in e.parts
             if p.split == split and p.rows]
    starts = np.cumsum([0] + [p.rows for p in parts])
    total = int(starts[-1])
    for k in range(-(-total // shard_rows)):
      lo, hi = k * shard_rows, min(total, (k + 1) * shard_rows)
      pieces = tuple((p.data, max(lo - int(s), 0), min(hi - int(s), p.rows))
                     for p, s in zip(parts, starts) if s < hi and s + p.rows > lo)
      tasks.append(ShardTask(split, k, pieces, hi - lo, parts[0].widths))
  return tasks


def write_shard(task: ShardTask, directory: str) -> tuple[str, int, int, float]:
  """Writes ``<directory>/<split>-NNNNN.tfrecord`` from the parts' rows, in records as
  ``prepared.ShardWriter`` writes them: ``(split, index, rows, seconds)``."""
  start = time.perf_counter()
  dtype = _row_dtype(task.widths)
  with FileSystems.create(_join(directory, prepared_lib.shard_name(task.split, task.index)),
                          compression_type=_RAW) as out:
    records = prepared_lib.RecordWriter(out)
    for data, first, end in task.pieces:
      with FileSystems.open(data, compression_type=_RAW) as f:
        f.seek(first * dtype.itemsize)
        for lo in range(first, end, COPY_ROWS):
          n = min(COPY_ROWS, end - lo)
          block = f.read(n * dtype.itemsize)
          if len(block) != n * dtype.itemsize:
            raise IOError(f"{data}: ends before row {end}")
          rows = np.frombuffer(block, dtype)
          records.write({k: rows[k].reshape(n) if k == "weight" else rows[k]
                         for k in prepared_lib.FEATURE_KEYS})
    records.close()
  return task.split, task.index, task.rows, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# The JSON files (as prepare._prepare_into writes them)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Job:
  """What the launcher knows and the last step writes into metadata.json."""

  spec: spec_lib.Spec
  files: Mapping[str, Sequence[spec_lib.FileInfo]]
  key: str
  shard_rows: int
  directory: str
  runner: str


def finish(shards: Sequence[tuple[str, int, int, float]], fit: _FitResult,
           encoded: Sequence[_Encoded], job: _Job) -> None:
  """Checks that no split is empty and writes schema, statistics, preprocessing and metadata
  into ``job.directory`` (the temporary directory)."""
  spec, fitted = job.spec, fit.fitted
  rows = {s: sum(p.rows for e in encoded for p in e.parts if p.split == s)
          for s in prepared_lib.SPLITS}
  dropped = {s: sum(p.dropped for e in encoded for p in e.parts if p.split == s)
             for s in prepared_lib.SPLITS}
  kept = {s: sum(p.kept_inconsistent for e in encoded for p in e.parts if p.split == s)
          for s in prepared_lib.SPLITS}
  prep.check_splits_have_rows(spec, job.files, rows)
  listed = {s: [{"file": prepared_lib.shard_name(s, k), "rows": n}
                for s2, k, n, _ in sorted(shards, key=lambda x: x[1]) if s2 == s]
            for s in prepared_lib.SPLITS}
  described = prep.description_files(
      spec, fitted, job.key, job.files, job.shard_rows,
      {s: {"rows": rows[s], "shards": listed[s], "inconsistent_funnel_dropped": dropped[s],
           "inconsistent_funnel_kept": kept[s]} for s in prepared_lib.SPLITS},
      # Seconds summed over the workers (they overlap in wall time): prepare.py's keys.
      {"pass1_rows": fit.rows_read, "pass1_seconds": fit.seconds,
       "pass2_rows": sum(e.rows_read for e in encoded),
       "pass2_seconds": sum(e.seconds for e in encoded) + sum(s[3] for s in shards),
       "runner": job.runner})
  for name, obj in described.items():  # metadata.json last
    _write_json(_join(job.directory, name), obj)


# --------------------------------------------------------------------------------------------
# The pipeline and the launcher
# --------------------------------------------------------------------------------------------

def pass_files(spec: spec_lib.Spec, files: Mapping[str, Sequence[spec_lib.FileInfo]]
               ) -> tuple[list[tuple[int, str | None, str]], list[tuple[int, str | None, str]]]:
  """``(pass 1, pass 2)`` files as ``(index, split or None, path)``, in prepare.py's order: pass 1
  the training files (all files with a split rule), pass 2 those then validation and test."""
  if spec.split_rule is not None:
    first = [(None, f.path) for f in files["all"]]
    later = []
  else:
    first = [("train", f.path) for f in files["train"]]
    later = [(s, f.path) for s in ("validation", "test") for f in files[s]]
  numbered = [(i, s, p) for i, (s, p) in enumerate(first + later)]
  return numbered[:len(first)], numbered


def build_pipeline(pipeline: beam.Pipeline, job: _Job) -> None:
  """Adds the preparation's transforms to ``pipeline``; it writes into ``job.directory``."""
  pass1, pass2 = pass_files(job.spec, job.files)
  parts_dir = _join(job.directory, PARTS_DIR)
  fit = (pipeline
         | "Pass1Files" >> beam.Create(pass1)
         | "SpreadPass1" >> beam.Reshuffle()
         | "Fit" >> beam.ParDo(_FitFile(job.spec))
         | "MergeStatistics" >> beam.CombineGlobally(
             _FitCombine(job.spec, [p for _, _, p in pass1])))
  encoded = (pipeline
             | "Pass2Files" >> beam.Create(pass2)
             | "SpreadPass2" >> beam.Reshuffle()
             | "Encode" >> beam.ParDo(_EncodeFile(job.spec, parts_dir),
                                      beam.pvalue.AsSingleton(fit))
             | "EncodedList" >> beam.combiners.ToList())
  shards = (encoded
            | "PlanShards" >> beam.FlatMap(plan_shards, job.shard_rows)
            | "SpreadShards" >> beam.Reshuffle()
            | "WriteShards" >> beam.Map(write_shard, job.directory)
            | "ShardList" >> beam.combiners.ToList())
  _ = shards | "Finish" >> beam.Map(finish, beam.pvalue.AsSingleton(fit),
                                    beam.pvalue.AsSingleton(encoded), job)


_WHILE_RUNNING = re.compile(r"( \[while running '[^']*'\])+$")
_ERROR_LINE = re.compile(r"(?:^|[\s.])(DataError|SpecError): (.+)$", re.MULTILINE)


def user_error(error: BaseException) -> Exception | None:
  """The spec or data error behind a failed pipeline (prepare.py's message, without the runner's
  ``[while running ...]``), or None when it failed for another reason. The DirectRunner raises
  the DoFn's exception (its cause chain holds the original); a remote runner reports the
  worker's traceback as text, searched for the error's line."""
  seen, chain, found = set(), error, None
  while chain is not None and id(chain) not in seen:
    seen.add(id(chain))
    if isinstance(chain, (prep.DataError, spec_lib.SpecError)):
      found = chain
    chain = chain.__cause__ or chain.__context__
  if found is not None:
    return type(found)(_WHILE_RUNNING.sub("", str(found)))
  lines = _ERROR_LINE.findall(str(error))
  if lines:
    kind, message = lines[-1]
    cls = prep.DataError if kind == "DataError" else spec_lib.SpecError
    return cls(_WHILE_RUNNING.sub("", message.strip()))
  return None


def _options(pipeline_options: Any) -> Any:
  """Beam's options from flags; a flag that no Beam option has is refused (Beam itself only
  warns: a misspelt ``--runner`` would prepare a cluster's dataset on this machine)."""
  if isinstance(pipeline_options, beam_options.PipelineOptions):
    return pipeline_options
  # Never None: PipelineOptions(None) parses sys.argv.
  options = beam_options.PipelineOptions(list(pipeline_options or []))
  quiet = logging.getLogger(beam_options.__name__)  # "Discarding unparseable args"
  level = quiet.level
  quiet.setLevel(logging.ERROR)
  try:
    known = options.get_all_options(retain_unknown_options=False)
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
  finally:
    quiet.setLevel(level)
  if unknown:
    raise ValueError(f"--{unknown[0]}: not a Beam pipeline option (they are listed in "
                     f"apache_beam/options/pipeline_options.py)")
  return options


def _run(job: _Job, options: Any) -> None:
  """Runs the pipeline into ``job.directory``; a spec or data error is raised as prepare.py's."""
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, job)
  try:
    pipeline.run().wait_until_finish()
  except Exception as e:  # pylint: disable=broad-except  (a user error in one line, else as is)
    found = user_error(e)
    if found is None:
      raise
    raise found from None


def _publish(tmp: str, final: str) -> bool:
  """Moves the prepared files into ``final``: a local directory renamed whole, else file by file,
  metadata.json (what makes a directory complete) alone and last, once every other file is
  there. False when another preparation got there first.

  Raises:
    OSError: a file did not arrive (Beam's rename goes on past a failed move and raises at the
      end, so metadata.json is never in the same call).
  """
  if _is_local(tmp):
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.exists(os.path.join(final, prepared_lib.METADATA_FILE)):
        raise
      return False
    return True
  names = [m.path for m in FileSystems.match([_join(tmp, "*")])[0].metadata_list]
  metadata = _join(tmp, prepared_lib.METADATA_FILE)
  files = [p for p in names if p != metadata]
  destinations = [_join(final, p.rsplit("/", 1)[-1]) for p in files]
  FileSystems.rename(files, destinations)
  lost = [d for d in destinations if not FileSystems.exists(d)]
  if lost:
    raise OSError(f"{final}: {len(lost)} prepared files did not arrive ({lost[0]}, ...); it is "
                  f"left without {prepared_lib.METADATA_FILE}, so a later preparation redoes it")
  FileSystems.rename([metadata], [_join(final, prepared_lib.METADATA_FILE)])
  return True


def _delete_tree(path: str) -> None:
  """Removes a directory and everything under it, if there (``gs://``: every object under the
  prefix ``path/``)."""
  if _is_local(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  try:
    FileSystems.delete([path.rstrip("/") + "/"])
  except Exception:  # pylint: disable=broad-except  (nothing there to delete)
    pass


def _discard(tmp: str, created: Sequence[pathlib.Path]) -> None:
  _delete_tree(tmp)
  for d in reversed(created):
    try:
      d.rmdir()
    except OSError:
      pass


def prepare(spec: spec_lib.Spec | str | os.PathLike, cache_root: str | os.PathLike, *,
            shard_rows: int = prep.DEFAULT_SHARD_ROWS,
            pipeline_options: Any = None) -> prep.Prepared:
  """Prepares (or finds already prepared) a spec's dataset with a Beam pipeline: what
  :func:`prepare.prepare` does, to the same directory and files.

  Args:
    spec: a :class:`spec_lib.Spec` or the path of a spec file.
    cache_root: the directory under which ``prepared/<name>-<key>`` is written: local, or a path
      of a Beam file system (``gs://bucket/data``) that every worker can write.
    shard_rows: rows per TFRecord shard.
    pipeline_options: a ``PipelineOptions``, or Beam flags (``["--runner=DataflowRunner",
      ...]``; a flag that is not a Beam option is refused); default: none, the DirectRunner.

  Returns:
    ``prepare.Prepared``; its ``path`` is a ``pathlib.Path`` for a local cache, else the path
    string.

  Raises:
    SpecError, DataError: as :func:`prepare.prepare`.
  """
  if not isinstance(spec, spec_lib.Spec):
    spec = spec_lib.load_spec(spec)
  if int(shard_rows) < 1:
    raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
  options = _options(pipeline_options)
  files = spec_lib.resolve_files(spec)
  key = prep.cache_key(spec, files, int(shard_rows))
  cache_root = os.fspath(cache_root)
  local = _is_local(cache_root)
  root = _join(cache_root, prep.PREPARED_SUBDIR)
  final = _join(root, f"{prep._name(spec)}-{key}")  # pylint: disable=protected-access
  as_path = (lambda p: pathlib.Path(p)) if local else (lambda p: p)
  if FileSystems.exists(_join(final, prepared_lib.METADATA_FILE)):
    return prep.Prepared(as_path(final), _read_json(_join(final, prepared_lib.METADATA_FILE)),
                         True)
  created = []
  if local:
    created = [pathlib.Path(d) for d in (cache_root, root) if not os.path.exists(d)]
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=root)
    files_lib.give_default_mode(tmp, directory=True)  # not mkdtemp's 0700
  else:
    tmp = _join(root, f".tmp-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
  runner = options.view_as(beam_options.StandardOptions).runner or "DirectRunner"
  job = _Job(spec, files, key, int(shard_rows), tmp, str(runner))
  try:
    start = time.perf_counter()
    _run(job, options)
    _delete_tree(_join(tmp, PARTS_DIR))
    changed = [f.path for fs in files.values() for f in fs if spec_lib.stat(f.path) != f]
    if changed:
      raise prep.DataError(f"{changed[0]} changed while it was being prepared; prepare again")
    metadata = _read_json(_join(tmp, prepared_lib.METADATA_FILE))
    metadata["timing"]["total_seconds"] = time.perf_counter() - start
    _write_json(_join(tmp, prepared_lib.METADATA_FILE), metadata)
    if not _publish(tmp, final):
      _discard(tmp, [])
      return prep.Prepared(as_path(final), _read_json(_join(final, prepared_lib.METADATA_FILE)),
                           True)
  except BaseException:
    _discard(tmp, created)
    raise
  _log_funnels(spec, metadata)
  logging.info("prepared %s with Beam (%s) in %.1f s: %s", spec.source, runner,
               metadata["timing"]["total_seconds"], final)
  return prep.Prepared(as_path(final), metadata, False)


def _log_funnels(spec: spec_lib.Spec, metadata: Mapping[str, Any]) -> None:
  """prepare.py's warnings about inconsistent funnels."""
  splits = metadata["splits"]
  for split, info in splits.items():
    if info["inconsistent_funnel_kept"]:
      logging.warning("prepare %s: %d rows of the %s split have an inconsistent funnel; kept "
                      "(validation and test are never filtered by their labels)", spec.source,
                      info["inconsistent_funnel_kept"], split)
  if splits["train"]["inconsistent_funnel_dropped"]:
    logging.warning("prepare %s: dropped %d training rows with an inconsistent funnel "
                    "(\"inconsistent_funnel\": \"drop\")", spec.source,
                    splits["train"]["inconsistent_funnel_dropped"])


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=f"python -m apem_jax.data.{PROGRAM}",
      description="Prepare a dataset spec with an Apache Beam pipeline (the output of "
                  "`apem-data prepare`). Flags not listed here are Beam pipeline options "
                  "(--runner, --project, --region, --temp_location, --setup_file, ...).")
  parser.add_argument("--spec", required=True, help="the spec file")
  parser.add_argument("--cache_root", default="data",
                      help="the cache root (data.data_dir): local, or gs://... for a cluster")
  parser.add_argument("--shard_rows", type=int, default=prep.DEFAULT_SHARD_ROWS,
                      help="rows per TFRecord shard")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an error instead of one line")
  return parser


def _report(result: prep.Prepared) -> None:
  meta = result.metadata
  print(f"{'found' if result.reused else 'prepared'} {result.path}")
  print("  rows: " + ", ".join(f"{s} {v['rows']:,}" for s, v in meta["splits"].items()))
  if not result.reused:
    t = meta["timing"]
    rows = sum(v["rows"] for v in meta["splits"].values())
    seconds = t["total_seconds"]
    print(f"  {t['runner']}: {seconds:.1f} s, {rows / max(seconds, 1e-9):,.0f} rows/s")


def main(argv: Sequence[str] | None = None) -> None:
  """The command: ``argv`` (default ``sys.argv[1:]``); a user error exits with one line."""
  from apem_jax import cli  # pylint: disable=g-import-not-at-top
  args, beam_flags = _parser().parse_known_args(argv)
  logging.basicConfig(level=logging.WARNING, format=f"{PROGRAM}: %(message)s", force=True)
  if not args.debug:  # the runner logs a failing DoFn's traceback before raising it
    logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
  stray = [f for f in beam_flags if not f.startswith("-")]
  if stray:
    sys.exit(f"{PROGRAM}: error: unexpected argument {stray[0]!r} (Beam options are flags: "
             f"--name=value)")
  with cli.user_errors_in_one_line(PROGRAM, args.debug, also=(OSError,)):
    _report(prepare(args.spec, args.cache_root, shard_rows=args.shard_rows,
                    pipeline_options=beam_flags))


if __name__ == "__main__":
  # As apem-data's main: leave with os._exit once the output is flushed (Arrow's thread pools
  # can abort the interpreter's exit, apache/arrow#34314, turning the status into 134).
  _STATUS = 0
  try:
    main()
  except SystemExit as e:
    if isinstance(e.code, int):
      _STATUS = e.code
    elif e.code is not None:  # sys.exit(message)
      print(e.code, file=sys.stderr)
      _STATUS = 1
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(_STATUS)  # pylint: disable=protected-access
