"""Preparation: the files a dataset spec names -> a prepared directory (:mod:`.prepared`), streamed.

Two passes over record batches, never a whole file in memory: CSV is read in line-aligned pieces of
``CSV_SEGMENT_BYTES`` parsed by ``pyarrow.csv.read_csv`` (its blocks in parallel), Parquet with
``ParquetFile.iter_batches``, TFRecord with ``tf.data.TFRecordDataset`` + ``parse_example``:

1. **Fit**, over the training rows: vocabulary counts (per batch ``bincount`` of the dictionary
   indices the CSV reader produces directly, merged with an Arrow ``group_by``), numeric mean and
   variance (per-batch moments merged with Chan's parallel update, float64), and for bucketed
   numeric features a **bounded sample of the distinct values**: the ``QUANTILE_SAMPLE_SIZE``
   distinct transformed values with the smallest 64-bit hash (a bottom-k sketch: a uniform sample
   of the distinct values, deterministic, independent of row order). While a feature has at most
   that many distinct training values the sample is all of them and the bucket boundaries are
   those of :func:`preprocessing.quantile_boundaries` in the in-memory path (up to the last bits
   of the streamed mean and std); above it they are quantiles of the sample, an approximation
   with rank error ~1/sqrt(k). Every value of the rows read is checked here (labels, missing
   values, funnels): with a split rule that is every row, with files per split the training
   files' (the others are checked in pass 2). The parsed
   batches of a CSV or TFRecord input are spilled to an Arrow IPC stream in the temporary
   directory, so pass 2 parses no text again (Parquet is read again: that is as fast).
2. **Encode** every split: vocabulary lookup by ``numpy.searchsorted`` on the (few) distinct values
   of each batch, farmhash for hashed features, standardisation, labels and masks; the rows are
   serialised as ``tf.train.Example`` into TFRecord shards (:mod:`.prepared`).

Memory is bounded by the batch size (16 MB pieces of CSV, 65,536 rows otherwise; a Parquet row
group's compressed column chunks) plus the vocabularies being counted (one entry per distinct value of a vocabulary feature: hash huge id spaces with
``num_buckets``) plus ``QUANTILE_SAMPLE_SIZE`` values per bucketed feature.

**Cache.** The directory is ``<cache_root>/prepared/<spec name>-<key>``; the key is a SHA-256 of the
spec with its defaults, every input file's path, size and modification time (ns), the shard size
and the format version. Everything is written into ``<cache_root>/prepared/.tmp-*`` and renamed
into place when complete; on any error the temporary directory is removed (and the cache folders
it created, if left empty), so a half-written cache never exists under a real name. A preparation
killed outright (SIGKILL) leaves its ``.tmp-*`` directory, which nothing reads.

**Errors** name the file and the line (CSV: physical line, header included; blank lines count
and are themselves an error), row (Parquet) or record (TFRecord), the column and the value.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import pathlib
import queue
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq

from apem_jax import schema as schema_lib
from apem_jax.data import files as files_lib
from apem_jax.data.config_access import config_value
from apem_jax.data import preprocessing as prep_lib
from apem_jax.data import prepared as prepared_lib
from apem_jax.data import spec as spec_lib

DEFAULT_SHARD_ROWS = 100_000
QUANTILE_SAMPLE_SIZE = 100_000  # distinct values kept per bucketed numeric feature
CSV_SEGMENT_BYTES = 16 << 20  # CSV bytes read and parsed at a time
CSV_BLOCK_BYTES = 4 << 20     # pyarrow's parse block (the blocks of a segment parse in parallel)
BATCH_ROWS = 65_536
PREPARED_SUBDIR = "prepared"
SPLIT_IDS = {s: i for i, s in enumerate(prepared_lib.SPLITS)}
SPLIT_HASH_BUCKETS = 1 << 30
SPLIT_HASH_KEY = (0x6170656D2D6A6178, 0x73706C69742D3031)  # fixed: changing it moves rows
_COMPACT_AT = 1 << 20  # pending vocabulary entries before they are merged
_DICT = pa.dictionary(pa.int32(), pa.string())


class DataError(ValueError):
  """A data file that does not match its spec (the message names the file, line and column)."""


# --------------------------------------------------------------------------------------------
# Record batches and where their rows come from
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Chunk:
  """Rows of one file: normalised columns (``dictionary<int32, string>`` for values read as
  strings, ``float64`` for numbers) and how to name a row in a message."""

  columns: dict[str, pa.Array]
  num_rows: int
  file: str
  first_row: int      # data rows of the file before this batch
  unit: str           # 'line' | 'row' | 'record'
  line_offset: int = 0  # CSV: lines before the first data row (the header)
  _parts: dict[str, tuple[pa.Array, np.ndarray]] = dataclasses.field(default_factory=dict)

  def where(self, i: int) -> str:
    n = self.first_row + int(i) + 1
    if self.unit == "line":
      return f"{self.file}, line {n + self.line_offset}"
    return f"{self.file}, {self.unit} {n}"

  def span(self) -> str:
    """The chunk's rows as ``'lines 2-101'`` (``rows``, ``records``)."""
    first = self.first_row + 1 + (self.line_offset if self.unit == "line" else 0)
    return f"{self.unit}s {first}-{first + self.num_rows - 1}"

  def parts(self, column: str) -> tuple[pa.Array, np.ndarray]:
    """A string column as (distinct values stripped of ASCII whitespace, int32 index per row,
    -1 where missing)."""
    if column not in self._parts:
      arr = self.columns[column]
      values = pc.utf8_trim(arr.dictionary, characters=prep_lib.ASCII_WHITESPACE)
      indices = arr.indices
      if indices.null_count:
        indices = pc.fill_null(indices, -1)
      self._parts[column] = (values, indices.to_numpy(zero_copy_only=False).astype(
          np.int32, copy=False))
    return self._parts[column]

  def missing_count(self, column: str) -> int:
    return self.columns[column].null_count

  def codes(self, column: str) -> np.ndarray:
    """``parts(column)[1]`` with a missing value as ``len(values)`` (an extra last entry)."""
    values, idx = self.parts(column)
    return np.where(idx < 0, len(values), idx) if self.missing_count(column) else idx

  def numbers(self, column: str) -> np.ndarray:
    """A numeric column as float64, NaN where missing."""
    return self.columns[column].to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def column_kinds(spec: spec_lib.Spec) -> dict[str, str]:
  """Column -> 'str' (read as dictionary strings) or 'num' (float64), for every used column."""
  kinds = {}
  for f in spec.features:
    kinds[f.name] = "str" if f.type == "categorical" else "num"
  for t in spec.tasks:
    kinds[t.label_column] = "num" if t.reads_numbers else "str"
  if spec.weight_column:
    kinds[spec.weight_column] = "num"
  if spec.split_rule is not None:
    for c in (spec.split_rule.split_column, spec.split_rule.hash_column):
      if c:
        kinds[c] = "str"
  return kinds


def _check_columns(path: str, names: Sequence[str], spec: spec_lib.Spec,
                   what: str = "column") -> None:
  seen = set()
  for name in names:
    if name in seen:
      raise DataError(f"{path}: {what} {name!r} appears twice")
    seen.add(name)
  roles = spec.roles()
  for column in spec.used_columns():
    if column not in seen:
      shown = ", ".join(repr(n) for n in list(names)[:30]) + (", ..." if len(names) > 30 else "")
      raise DataError(f"{path}: has no {what} {column!r} ({roles[column]} in {spec.source}); "
                      f"its {what}s: {shown}")
  if what == "column":  # (not a TFRecord's features: read from its first records, they may
    # leave out an ignored one)
    for i, name in enumerate(spec.ignore):
      if name not in seen:
        raise DataError(f"{path}: has no column {name!r} ({spec.source}: ignore[{i}]); remove it "
                        f"from \"ignore\" or check its spelling")
  known = set(spec.used_columns()) | set(spec.ignore)
  for name in names:
    if name not in known:
      raise DataError(f"{path}: {what} {name!r} is not in {spec.source}: make it a feature, a "
                      f"task's label_column, the weight_column or the split column, or list it "
                      f"in \"ignore\"")


def _open(path: str, mode: str = "rb"):
  return spec_lib._open(path, mode)  # pylint: disable=protected-access


def _source(path: str):
  return _open(path) if spec_lib._is_remote(path) else path  # pylint: disable=protected-access


# CSV ------------------------------------------------------------------------------------------

def _csv_dialect(fmt: spec_lib.FileFormat) -> dict[str, Any]:
  import csv  # pylint: disable=g-import-not-at-top
  if fmt.quote_char is None:
    return dict(delimiter=fmt.delimiter, quoting=csv.QUOTE_NONE)
  return dict(delimiter=fmt.delimiter, quotechar=fmt.quote_char, doublequote=True, strict=True)


def _csv_first_line(path: str, fmt: spec_lib.FileFormat) -> tuple[bytes, list[str] | None]:
  """(line 1 as read, its fields; None when it is empty)."""
  import csv  # pylint: disable=g-import-not-at-top
  with _open(path) as f:
    line = f.readline()
  try:
    text = line.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    what = "the header is" if fmt.header else "it is"
    raise DataError(f"{path}, line 1: {what} not UTF-8 text ({e})") from None
  if not text.strip("\r\n"):
    return line, None
  try:
    return line, next(csv.reader([text.rstrip("\r\n")], **_csv_dialect(fmt)))
  except csv.Error as e:
    raise DataError(f"{path}, line 1: {e}") from None


def _csv_header(path: str, fmt: spec_lib.FileFormat) -> list[str]:
  """The header's names, without the ASCII whitespace around them (``a, b``: ``b``, as the
  values' categories lose theirs)."""
  line, fields = _csv_first_line(path, fmt)
  if fields is None:
    raise DataError(f"{path}: {'the file is empty' if not line else 'line 1 is empty'}: "
                    f"expected a header line naming the columns")
  return [name.strip(prep_lib.ASCII_WHITESPACE) for name in fields]


def _csv_columns(path: str, fmt: spec_lib.FileFormat) -> list[str]:
  """The header's names, or ``format.column_names`` when the file has no header (its line 1,
  data, must have as many fields)."""
  if not fmt.column_names:
    return _csv_header(path, fmt)
  _, fields = _csv_first_line(path, fmt)
  if fields is not None and len(fields) != len(fmt.column_names):
    raise DataError(f"{path}, line 1: {len(fields)} fields, expected {len(fmt.column_names)} "
                    f"(format.column_names; a value may not hold a line break)")
  return list(fmt.column_names)


def _csv_options(fmt: spec_lib.FileFormat, names: Sequence[str], types: Mapping[str, Any]):
  """Options to parse a segment of data lines (no header) with pyarrow."""
  read = pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=True,
                            column_names=list(names))
  parse = pa_csv.ParseOptions(delimiter=fmt.delimiter, quote_char=fmt.quote_char or False,
                              double_quote=True, newlines_in_values=False,
                              ignore_empty_lines=False)
  convert = pa_csv.ConvertOptions(
      column_types=dict(types), include_columns=list(types),
      null_values=list(fmt.missing_values), strings_can_be_null=True,
      quoted_strings_can_be_null=True)
  return dict(read_options=read, parse_options=parse, convert_options=convert)


def _csv_segments(path: str, fmt: spec_lib.FileFormat) -> Iterator[tuple[bytes, int]]:
  """The file's data lines in pieces of about ``CSV_SEGMENT_BYTES`` that end at a line break:
  ``(bytes, data rows before it)``.

  Each piece is parsed from memory (``pyarrow.csv.read_csv`` on a buffer, its blocks in parallel):
  memory stays bounded by the piece size. (Arrow's streaming reader, given a file, reads blocks
  ahead of a slower consumer without bound: the whole of a 500 MB file before the first batch
  was taken, measured; and it would call a Python file object from its own threads.) Values may
  not hold line breaks (``newlines_in_values`` is off), so a line break always ends a row."""
  with _open(path) as f:
    if fmt.header:
      f.readline()
    rows = 0
    carry = b""
    while True:
      data = f.read(CSV_SEGMENT_BYTES)
      if not data:
        if carry:
          yield carry, rows
        return
      data = carry + data if carry else data
      cut = data.rfind(b"\n")
      if cut < 0:
        carry = data
        continue
      segment, carry = data[:cut + 1], data[cut + 1:]
      yield segment, rows
      rows += segment.count(b"\n")


def _first_not_number(arr: pa.Array) -> int | None:
  """Index of the first value of a string array that is not a number: one that does not convert
  to float64 (found by bisection), or the text nan, which Arrow converts to NaN (a missing value
  is a null, as a CSV's is one of its missing_values)."""
  end = len(arr)
  try:
    pc.cast(arr, pa.float64())
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    lo, hi = 0, len(arr)
    while hi - lo > 1:
      mid = (lo + hi) // 2
      try:
        pc.cast(arr.slice(lo, mid - lo), pa.float64())
        lo = mid
      except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        hi = mid
    end = lo
  nan = pc.fill_null(pc.is_nan(pc.cast(arr.slice(0, end), pa.float64())), False)
  nan = nan.to_numpy(zero_copy_only=False)
  if nan.any():
    return int(np.argmax(nan))
  return end if end < len(arr) else None


def _not_a_number(where: str, column: str, value: Any, role: str,
                  fmt: spec_lib.FileFormat | None = None) -> DataError:
  hint = ""
  if fmt is not None and fmt.type == "csv":
    hint = (f" (missing values are written as one of {list(fmt.missing_values)}: "
            f"format.missing_values, matched exactly)")
  return DataError(f"{where}, column {column!r} ({role}): {value!r} is not a number{hint}")


def _diagnose_csv(path: str, fmt: spec_lib.FileFormat, names: Sequence[str],
                  kinds: Mapping[str, str], roles: Mapping[str, str], segment: bytes,
                  first_line: int, error: Exception) -> DataError:
  """Why pyarrow could not parse a segment whose first line is ``first_line``: the first line
  with the wrong number of fields or a broken quote, else the first value of a numeric column
  that is not a number."""
  import csv  # pylint: disable=g-import-not-at-top
  try:
    table = pa_csv.read_csv(pa.BufferReader(segment),
                            **_csv_options(fmt, names, {c: pa.string() for c in kinds}))
  except pa.ArrowInvalid:
    dialect = _csv_dialect(fmt)
    for n, line in enumerate(segment.split(b"\n")):
      try:
        text = line.rstrip(b"\r").decode("utf-8")
      except UnicodeDecodeError as e:
        return DataError(f"{path}, line {first_line + n}: not UTF-8 text ({e})")
      try:
        fields = next(csv.reader([text], **dialect), [])
      except csv.Error as e:
        return DataError(f"{path}, line {first_line + n}: {e} (a value may not hold a line "
                         f"break)")
      # (the piece after the last line break is a line unless it is empty: no break at the end)
      if len(fields) != len(names) and (n < segment.count(b"\n") or text):
        what = "an empty line" if not text else f"{len(fields)} fields"
        columns = "the columns of the header" if fmt.header else "format.column_names"
        return DataError(f"{path}, line {first_line + n}: {what}, expected {len(names)} "
                         f"({columns}; a value may not hold a line break)")
    return DataError(f"{path}: cannot read the lines from {first_line}: {error}")
  found = []
  for c, kind in kinds.items():
    if kind == "num":
      column = table.column(c).combine_chunks()
      # (Arrow's CSV reader takes a number with spaces around it; a cast does not.)
      i = _first_not_number(pc.utf8_trim_whitespace(column))
      if i is not None:
        found.append((i, c, column[i].as_py()))
  if found:
    i, c, value = min(found)
    return _not_a_number(f"{path}, line {first_line + i}", c, value, roles[c], fmt)
  return DataError(f"{path}: cannot read the lines from {first_line}: {error}")


# A line with nothing on it (its line break, group 2, at the start or after another).
_EMPTY_LINE = re.compile(rb"(^|\n)(\r?\n)")


def read_csv_segment(path: str, fmt: spec_lib.FileFormat, names: Sequence[str],
                     kinds: Mapping[str, str], roles: Mapping[str, str], segment: bytes,
                     first_line: int, options: Mapping[str, Any]) -> pa.Table:
  """A piece of a CSV file whose first line is ``first_line``, read with ``options``; a blank
  line (Arrow reads one as a row of missing values) or a line Arrow cannot parse is a
  :class:`DataError` naming the line."""
  empty = _EMPTY_LINE.search(segment)
  if empty:
    line = first_line + segment.count(b"\n", 0, empty.start(2))
    raise DataError(f"{path}, line {line}: an empty line, expected {len(names)} fields (a "
                    f"blank line is not a row: remove it)")
  try:
    return pa_csv.read_csv(pa.BufferReader(segment), **options)
  except pa.ArrowInvalid as e:
    raise _diagnose_csv(path, fmt, names, kinds, roles, segment, first_line, e) from None


def _iter_csv(path: str, spec: spec_lib.Spec, kinds: Mapping[str, str]) -> Iterator[Chunk]:
  fmt = spec.format
  names = _csv_columns(path, fmt)
  _check_columns(path, names, spec)
  types = {c: (_DICT if k == "str" else pa.float64()) for c, k in kinds.items()}
  header = 1 if fmt.header else 0
  roles = spec.roles()
  options = _csv_options(fmt, names, types)
  for segment, rows in _csv_segments(path, fmt):
    table = read_csv_segment(path, fmt, names, kinds, roles, segment, header + rows + 1, options)
    for c in (c for c, kind in kinds.items() if kind == "num"):
      # Arrow reads the text nan/NaN as a number; a missing value is one of missing_values.
      nan = pc.fill_null(pc.is_nan(table.column(c)), False).combine_chunks().to_numpy(
          zero_copy_only=False)
      if nan.any():
        i = int(np.argmax(nan))
        text = pa_csv.read_csv(pa.BufferReader(segment), **_csv_options(
            fmt, names, {c: pa.string()})).column(c)[i].as_py()  # as written
        raise _not_a_number(f"{path}, line {header + rows + 1 + i}", c, text, roles[c], fmt)
    for batch in table.to_batches():
      if batch.num_rows:
        yield Chunk({c: batch.column(c) for c in kinds}, batch.num_rows, path, rows, "line",
                    header)
      rows += batch.num_rows


# Parquet --------------------------------------------------------------------------------------

def _as_dictionary_strings(arr: pa.Array, chunk_where, column: str) -> pa.Array:
  """A column of category values as a dictionary array of strings; a value that is not UTF-8
  is named by its row (``chunk_where(i)``)."""
  where = chunk_where(0)
  if pa.types.is_floating(arr.type):  # NaN is a missing value, as in the NumPy encoder
    arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
  if not pa.types.is_dictionary(arr.type):
    if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_boolean(
        arr.type) or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or (
            pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type)):
      arr = arr.dictionary_encode()
    else:
      raise DataError(f"{where}, column {column!r}: type {arr.type} cannot be read as category "
                      f"values (expected strings, integers, floats or booleans)")
  values = arr.dictionary
  if not pa.types.is_string(values.type):
    try:
      values = pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
      if not (pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)):
        raise DataError(f"{where}, column {column!r}: values of type {arr.type} cannot be read "
                        f"as strings: {e}") from None
      # A Parquet row group's dictionary is shared by its batches: only the entries this batch
      # uses are its values.
      indices = pc.fill_null(arr.indices, -1).to_numpy(zero_copy_only=False)
      present = np.flatnonzero(indices >= 0)
      for i in np.sort(present[np.unique(indices[present], return_index=True)[1]]).tolist():
        value = values[int(indices[i])].as_py()  # (rows in order of each value's first)
        try:
          value.decode("utf-8")
        except UnicodeDecodeError as bad:
          raise DataError(f"{chunk_where(i)}, column {column!r}: {value[:40]!r} is not UTF-8 "
                          f"text ({bad.reason})") from None
      arr = pc.cast(arr.dictionary_decode(), pa.string()).dictionary_encode()
      values = arr.dictionary
  return pa.DictionaryArray.from_arrays(pc.cast(arr.indices, pa.int32()), values)


def _as_float64(arr: pa.Array, chunk_where, column: str, role: str) -> pa.Array:
  if pa.types.is_dictionary(arr.type):
    arr = arr.dictionary_decode()
  if pa.types.is_float64(arr.type):
    return arr
  if (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
      or pa.types.is_boolean(arr.type) or pa.types.is_decimal(arr.type)
      or pa.types.is_null(arr.type)):
    return pc.cast(arr, pa.float64())
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    i = _first_not_number(arr)
    if i is not None:
      raise _not_a_number(chunk_where(i), column, arr[i].as_py(), role)
    return pc.cast(arr, pa.float64())
  raise DataError(f"{chunk_where(0)}, column {column!r} ({role}): type {arr.type}, expected "
                  f"numbers")


def _iter_parquet(path: str, spec: spec_lib.Spec, kinds: Mapping[str, str]) -> Iterator[Chunk]:
  try:
    pf = pq.ParquetFile(_source(path), read_dictionary=[c for c, k in kinds.items()
                                                        if k == "str"])
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"{path}: not a Parquet file: {e}") from None
  _check_columns(path, pf.schema_arrow.names, spec)
  roles = spec.roles()
  rows = 0
  # No Arrow threads on a Python file object (a remote file): they would call into Python.
  threads = not spec_lib._is_remote(path)  # pylint: disable=protected-access
  for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(kinds), use_threads=threads):
    if not batch.num_rows:
      continue
    chunk = Chunk({}, batch.num_rows, path, rows, "row")
    for c, k in kinds.items():
      arr = batch.column(c)
      chunk.columns[c] = (_as_dictionary_strings(arr, chunk.where, c) if k == "str" else
                          _as_float64(arr, chunk.where, c, roles[c]))
    yield chunk
    rows += batch.num_rows


# TFRecord -------------------------------------------------------------------------------------

# How many records of a TFRecord file are read for its features and their types: a record may
# leave a feature out (its value is then missing), so the first one alone does not say them.
TFRECORD_HEAD_RECORDS = 1000


def _tfrecord_head(path: str) -> dict[str, str]:
  """{feature: its value kind ('bytes_list', ...)} of the first ``TFRECORD_HEAD_RECORDS``
  records, in order of appearance; empty for an empty file.

  Raises:
    DataError: not a TFRecord file; a record that is no ``tf.train.Example``; a feature whose
      kind differs between two of those records (naming both).
  """
  tf = _tf()
  kinds, first_of = {}, {}
  try:
    for i, record in enumerate(tf.data.TFRecordDataset(path).take(TFRECORD_HEAD_RECORDS), 1):
      try:
        features = tf.train.Example.FromString(record.numpy()).features.feature
      except Exception as e:  # pylint: disable=broad-except  (protobuf's DecodeError)
        raise DataError(f"{path}, record {i}: not a tf.train.Example: {e}") from None
      for name, feature in features.items():
        kind = feature.WhichOneof("kind")
        if kind is None:
          continue
        if name in kinds and kinds[name] != kind:
          raise DataError(f"{path}, record {i}: feature {name!r} is a {kind}, it is a "
                          f"{kinds[name]} in record {first_of[name]}")
        kinds.setdefault(name, kind)
        first_of.setdefault(name, i)
  except tf.errors.OpError as e:
    raise DataError(f"{path}: not a TFRecord file: {e.message}") from None
  return kinds


def _tfrecord_parse_error(path: str, rows: int, message: str, head_kinds: Mapping[str, str]
                          ) -> DataError:
  """TensorFlow's error parsing a batch of records, as one line naming the record and feature
  where TensorFlow names them (``Key: <feature>, Index: <record in the batch>``)."""
  found = re.search(r"Key: (\S+?),? Index: (\d+)", message)
  if found is None:
    return DataError(f"{path}, records {rows + 1} to {rows + BATCH_ROWS}: "
                     f"{' '.join(message.split())[:300]}")
  name, index = found.group(1), int(found.group(2))
  return DataError(f"{path}, record {rows + index + 1}, feature {name!r}: its values are not "
                   f"a {head_kinds.get(name, 'bytes_list')}, as in the file's first records")


def _iter_tfrecord(path: str, spec: spec_lib.Spec, kinds: Mapping[str, str]) -> Iterator[Chunk]:
  tf = _tf()
  head_kinds = _tfrecord_head(path)
  if not head_kinds:
    return
  _check_columns(path, list(head_kinds), spec, what="feature")
  types = {"bytes_list": tf.string, "float_list": tf.float32, "int64_list": tf.int64}
  dtypes = {c: types[head_kinds.get(c, "bytes_list")] for c in kinds}
  spec_tf = {c: tf.io.RaggedFeature(dtypes[c]) for c in kinds}
  ds = (tf.data.TFRecordDataset(path).batch(BATCH_ROWS)
        .map(lambda x: tf.io.parse_example(x, spec_tf)))
  roles = spec.roles()
  rows = 0
  iterator = iter(ds)
  while True:
    try:
      parsed = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise _tfrecord_parse_error(path, rows, e.message, head_kinds) from None
    n = int(parsed[next(iter(kinds))].nrows())
    chunk = Chunk({}, n, path, rows, "record")
    for c, k in kinds.items():
      ragged = parsed[c]
      lengths = ragged.row_lengths().numpy()
      if (lengths > 1).any():
        i = int(np.argmax(lengths > 1))
        raise DataError(f"{chunk.where(i)}, feature {c!r}: {lengths[i]} values, expected one")
      present = lengths == 1
      values = ragged.flat_values.numpy()
      if k == "num":
        if values.dtype == object:
          strings = _utf8(values, present, chunk, c)
          bad = _first_not_number(strings)
          if bad is not None:
            i = int(np.flatnonzero(present)[bad])
            raise _not_a_number(chunk.where(i), c, strings[bad].as_py(), roles[c])
          values = pc.cast(strings, pa.float64()).to_numpy()
        full = np.zeros(n, np.float64)
        full[present] = values
        chunk.columns[c] = pa.array(full, mask=~present)
      else:
        if values.dtype == object:
          strings = _utf8(values, present, chunk, c)
        else:
          if values.dtype.kind == "f":  # NaN is a missing value, as in the NumPy encoder
            present[np.flatnonzero(present)[np.isnan(values)]] = False
            values = values[~np.isnan(values)]
          strings = pc.cast(pa.array(values), pa.string())
        encoded = strings.dictionary_encode()
        indices = np.zeros(n, np.int32)
        indices[present] = encoded.indices.to_numpy()
        chunk.columns[c] = pa.DictionaryArray.from_arrays(
            pa.array(indices, mask=~present), encoded.dictionary)
    yield chunk
    rows += n


def _utf8(values: np.ndarray, present: np.ndarray, chunk: Chunk, feature: str) -> pa.Array:
  """A bytes_list feature's values (those of the records where ``present``) as strings; a
  value that is not UTF-8 is named by its record."""
  try:
    return pa.array(values, type=pa.binary()).cast(pa.string())
  except pa.ArrowInvalid:
    for i, value in zip(np.flatnonzero(present), values):
      try:
        value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{chunk.where(i)}, feature {feature!r}: {value[:40]!r} is not UTF-8 "
                        f"text ({e.reason})") from None
    raise


def read_file(path: str, spec: spec_lib.Spec, kinds: Mapping[str, str] | None = None
              ) -> Iterator[Chunk]:
  """The batches of one input file, columns normalised (see :class:`Chunk`)."""
  kinds = column_kinds(spec) if kinds is None else kinds
  reader = {"csv": _iter_csv, "parquet": _iter_parquet, "tfrecord": _iter_tfrecord}[
      spec.format.type]
  return reader(path, spec, kinds)


def file_columns(path: str, spec: spec_lib.Spec) -> list[str]:
  """The column names of one input file (CSV header, Parquet schema, the features of a
  TFRecord's first ``TFRECORD_HEAD_RECORDS`` records), read without the rest of its data."""
  fmt = spec.format
  if fmt.type == "csv":
    return _csv_columns(path, fmt)
  if fmt.type == "parquet":
    try:
      return list(pq.ParquetFile(_source(path)).schema_arrow.names)
    except (pa.ArrowInvalid, OSError) as e:
      raise DataError(f"{path}: not a Parquet file: {e}") from None
  # (an empty file: nothing to check)
  return list(_tfrecord_head(path)) or list(spec.used_columns())


def check_files(spec: spec_lib.Spec) -> dict[str, tuple[spec_lib.FileInfo, ...]]:
  """Resolves the spec's files and checks every file's columns against the spec (no data read).

  Raises:
    SpecError: a path that does not exist or a glob that matches nothing.
    DataError: a file that lacks a column of the spec or has one the spec does not mention.
  """
  files = spec_lib.resolve_files(spec)
  for infos in files.values():
    for info in infos:
      what = "feature" if spec.format.type == "tfrecord" else "column"
      _check_columns(info.path, file_columns(info.path, spec), spec, what)
  return files


# --------------------------------------------------------------------------------------------
# Values: splits, labels, weights, features
# --------------------------------------------------------------------------------------------

def _tf():
  from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline._import_tf()  # pylint: disable=protected-access


def _strings(values: pa.Array) -> np.ndarray:
  return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)


def hash_buckets(values: pa.Array, num_buckets: int) -> np.ndarray:
  """``farmhash64(value) % num_buckets`` (``tf.strings.to_hash_bucket_fast``), int64."""
  if len(values) == 0:
    return np.zeros(0, np.int64)
  tf = _tf()
  return tf.strings.to_hash_bucket_fast(tf.constant(_strings(values), tf.string),
                                        num_buckets).numpy().astype(np.int64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _fractions_to_split(u: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
  return ((u >= fractions[0]).astype(np.int8) + (u >= fractions[0] + fractions[1])).astype(np.int8)


def split_ids(chunk: Chunk, spec: spec_lib.Spec, split: str | None) -> np.ndarray:
  """int8 [n]: 0 train, 1 validation, 2 test for each row of the chunk."""
  rule = spec.split_rule
  if rule is None:
    return np.full(chunk.num_rows, SPLIT_IDS[split], np.int8)
  if rule.split_column:
    values, idx = chunk.parts(rule.split_column)
    mapping = {v: SPLIT_IDS[s] for s, vals in rule.values for v in vals}
    entries = np.array([mapping.get(v, -1) for v in values.to_pylist()] + [-2], np.int8)
    ids = entries[idx]
    if (ids < 0).any():
      i = int(np.argmax(ids < 0))
      what = "a missing value" if ids[i] == -2 else repr(values[int(idx[i])].as_py())
      raise DataError(f"{chunk.where(i)}, column {rule.split_column!r} (the split column): "
                      f"{what} names no split; expected one of {sorted(mapping)}")
    return ids
  if rule.hash_column:
    values, idx = chunk.parts(rule.hash_column)
    tf = _tf()
    strings = np.append(_strings(values), "")  # a missing value hashes as ""
    h = tf.strings.to_hash_bucket_strong(tf.constant(strings, tf.string), SPLIT_HASH_BUCKETS,
                                         list(SPLIT_HASH_KEY)).numpy()
    entries = _fractions_to_split(h / SPLIT_HASH_BUCKETS, rule.fractions)
    return entries[idx]
  name = os.path.basename(chunk.file).encode()
  salt = np.uint64(int.from_bytes(hashlib.sha256(name).digest()[:8], "little"))
  rows = (chunk.first_row + np.arange(chunk.num_rows)).astype(np.uint64)
  u = (_splitmix64(rows ^ salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
  return _fractions_to_split(u, rule.fractions)


_TRUE = {"1", "true"}
_FALSE = {"0", "false"}


def _number(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _binary_entries(values: list[str], task: spec_lib.TaskSpec) -> tuple[np.ndarray, np.ndarray]:
  """Per distinct value: (label 0/1, allowed)."""
  label = np.zeros(len(values), np.float32)
  ok = np.ones(len(values), bool)
  pos, neg = task.positive_values, task.negative_values
  for i, v in enumerate(values):
    if pos is None:
      x = _number(v)
      if x in (0.0, 1.0):
        label[i] = x
      elif v.lower() in _TRUE or v.lower() in _FALSE:
        label[i] = float(v.lower() in _TRUE)
      else:
        ok[i] = False
    elif isinstance(pos[0], bool):  # JSON true/false: the values "true"/"false" (any case)
      word = v.lower()
      words = {"true": True, "false": False, "1": True, "0": False}
      if word in words and words[word] in pos:
        label[i] = 1.0
      elif neg is not None and not (word in words and words[word] in neg):
        ok[i] = False
    elif isinstance(pos[0], str):
      if v in pos:
        label[i] = 1.0
      elif neg is not None and v not in neg:
        ok[i] = False
    else:
      x = _number(v)
      if x is None or x != x:
        ok[i] = False
      elif x in [float(p) for p in pos]:
        label[i] = 1.0
      elif neg is not None and x not in [float(p) for p in neg]:
        ok[i] = False
  return label, ok


def _allowed(task: spec_lib.TaskSpec) -> str:
  if task.positive_values is None:
    return ("0 or 1 (or true/false); give the task positive_values (and negative_values) for "
            "other labels")
  if task.negative_values is None:
    return "a number (positive_values are numbers)"
  return (f"one of positive_values {list(task.positive_values)} or negative_values "
          f"{list(task.negative_values)}")


def labels_of(chunk: Chunk, spec: spec_lib.Spec) -> tuple[np.ndarray, np.ndarray]:
  """``(labels, label_mask)`` float32 [n, T]; raises on a value the spec does not allow or a
  missing label of a task that requires one."""
  n, tasks = chunk.num_rows, spec.tasks
  labels = np.zeros((n, len(tasks)), np.float32)
  mask = np.ones((n, len(tasks)), np.float32)
  for t, task in enumerate(tasks):
    column = task.label_column
    if task.reads_numbers:
      x = chunk.numbers(column)
      missing = np.isnan(x)
      if np.isinf(x).any():
        i = int(np.argmax(np.isinf(x)))
        raise DataError(f"{chunk.where(i)}, column {column!r} (the label of task "
                        f"{task.name!r}): {x[i]} is not a finite number")
      value = x if task.kind == "regression" else (x > task.threshold)
      value = np.where(missing, 0.0, value)
    else:
      values, idx = chunk.parts(column)
      label, ok = _binary_entries(values.to_pylist(), task)
      bad = (idx >= 0) & ~ok[np.maximum(idx, 0)]
      if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{chunk.where(i)}, column {column!r} (the label of task "
                        f"{task.name!r}): {values[int(idx[i])].as_py()!r} is not an allowed "
                        f"label; expected {_allowed(task)}")
      missing = idx < 0
      value = np.where(missing, 0.0, label[np.maximum(idx, 0)])
    if missing.any():
      if task.missing == "error":
        i = int(np.argmax(missing))
        raise DataError(f"{chunk.where(i)}, column {column!r}: the label of task {task.name!r} "
                        f"is missing (give the task \"missing\": \"mask\" to leave such rows "
                        f"out of its loss)")
      mask[missing, t] = 0.0
    with np.errstate(over="ignore"):  # (refused below)
      labels[:, t] = value
    if task.kind == "regression" and np.isinf(labels[:, t]).any():
      i = int(np.argmax(np.isinf(labels[:, t])))
      raise DataError(f"{chunk.where(i)}, column {column!r} (the label of task {task.name!r}): "
                      f"{value[i]} overflows float32")
  return labels, mask


def weights_of(chunk: Chunk, spec: spec_lib.Spec) -> np.ndarray:
  if not spec.weight_column:
    return np.ones(chunk.num_rows, np.float32)
  c = spec.weight_column
  x = chunk.numbers(c)
  bad = ~np.isfinite(x) | (x < 0)
  if bad.any():
    i = int(np.argmax(bad))
    what = "is missing" if np.isnan(x[i]) else f"{x[i]} is not a finite number >= 0"
    raise DataError(f"{chunk.where(i)}, column {c!r} (the weight column): {what}")
  with np.errstate(over="ignore"):  # (refused below)
    w = x.astype(np.float32)
  if np.isinf(w).any():
    i = int(np.argmax(np.isinf(w)))
    raise DataError(f"{chunk.where(i)}, column {c!r} (the weight column): {x[i]} overflows "
                    f"float32")
  return w


def inconsistent_funnel(labels: np.ndarray, mask: np.ndarray, spec: spec_lib.Spec) -> np.ndarray:
  """Rows [n] (bool) where a funnel step is positive while the step it depends on is negative
  (both labels present): the rule of ``pipeline.inconsistent_funnel_rows``, without importing
  the pipeline (and JAX) into the preparation."""
  names = [t.name for t in spec.tasks]
  bad = np.zeros(labels.shape[0], dtype=bool)
  for t, task in enumerate(spec.tasks):
    if task.depends_on is not None:
      p = names.index(task.depends_on)
      bad |= (mask[:, t] > 0) & (labels[:, t] > 0) & (mask[:, p] > 0) & (labels[:, p] <= 0)
  return bad


def _funnel_error(chunk: Chunk, bad: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                  mask: np.ndarray, spec: spec_lib.Spec) -> DataError:
  i = int(np.argmax(bad))
  split = prepared_lib.SPLITS[int(ids[i])]
  names = [t.name for t in spec.tasks]
  for t, task in enumerate(spec.tasks):
    if task.depends_on is not None:
      p = names.index(task.depends_on)
      if mask[i, t] and labels[i, t] > 0 and mask[i, p] and labels[i, p] <= 0:
        break
  drop = (", or set \"inconsistent_funnel\": \"drop\" in the spec to drop such rows from the "
          "training split" if split == "train" else
          " (validation and test rows are never dropped for their labels)")
  return DataError(f"{chunk.where(i)}: task {task.name!r} is positive where the task it depends "
                   f"on, {task.depends_on!r}, is negative (an inconsistent funnel, {split} "
                   f"split; {int(bad.sum())} such rows, of any split, in {chunk.span()}, the "
                   f"block read when the first was found, later rows not checked); fix the "
                   f"data{drop}")


def missing_numbers(spec: spec_lib.Spec) -> tuple[float, ...]:
  """The finite numbers among a CSV spec's ``format.missing_values`` (stripped, as Arrow casts
  text): a numeric feature's value equal to one in float32 is missing, as the exported encoder,
  which is sent float32, reads it."""
  if spec.format.type != "csv":
    return ()
  numbers = set()
  for text in spec.format.missing_values:
    try:
      x = pc.cast(pa.array([text.strip(prep_lib.ASCII_WHITESPACE)]), pa.float64())[0].as_py()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      continue
    if x is not None and np.isfinite(x):
      numbers.add(x + 0.0)
  return tuple(sorted(numbers))


def _numeric(chunk: Chunk, feature: spec_lib.Feature, markers: Sequence[float] = ()
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(transformed float64 values, missing mask after fills, missing mask of the file) of a
  numeric feature; fills applied. ``markers``: :func:`missing_numbers`."""
  x = chunk.numbers(feature.name)
  missing = in_file = np.isnan(x) | prep_lib.is_missing_number(x, markers)
  if np.isinf(x).any():
    i = int(np.argmax(np.isinf(x)))
    raise DataError(f"{chunk.where(i)}, column {feature.name!r} (a numeric feature): {x[i]} is "
                    f"not a finite number")
  if missing.any():
    if feature.missing == "error":
      i = int(np.argmax(missing))
      what = "" if np.isnan(x[i]) else f" ({x[i]} is a missing value: format.missing_values)"
      raise DataError(f"{chunk.where(i)}, column {feature.name!r} (a numeric feature): the value "
                      f"is missing{what}; give the feature \"missing\": {{\"fill\": <value>}} or "
                      f"\"indicator\" to accept missing values")
    if feature.missing == "fill":
      x = np.where(missing, feature.fill, x)
      missing = np.zeros_like(missing)
  return prep_lib.transform_numeric(x, feature.transform), missing, in_file


def _categorical_missing(chunk: Chunk, feature: spec_lib.Feature, idx: np.ndarray) -> None:
  """Under the policy 'error', refuses a missing value: a null, or one blank once stripped."""
  if feature.missing != "error":
    return
  values, _ = chunk.parts(feature.name)
  blank = pc.fill_null(pc.equal(values, ""), False).to_numpy(zero_copy_only=False)
  bad = (idx < 0) | (blank[np.maximum(idx, 0)] & (idx >= 0)) if len(values) else idx < 0
  if bad.any():
    i = int(np.argmax(bad))
    what = "" if idx[i] < 0 else (
        f" ({chunk.columns[feature.name].dictionary[int(idx[i])].as_py()!r} is blank)")
    raise DataError(f"{chunk.where(i)}, column {feature.name!r} (a categorical feature): the "
                    f"value is missing{what} (the feature's \"missing\" is \"error\")")


# --------------------------------------------------------------------------------------------
# Pass 1: statistics of the training rows
# --------------------------------------------------------------------------------------------

class _ValueCounter:
  """Counts of string values over many batches, merged with Arrow's hash ``group_by``."""

  def __init__(self):
    self._tables: list[pa.Table] = []
    self._pending = 0

  def add(self, values: pa.Array, counts: np.ndarray) -> None:
    keep = counts > 0
    if not keep.all():
      values, counts = values.filter(pa.array(keep)), counts[keep]
    self._tables.append(pa.table({"value": values, "count": pa.array(counts, pa.int64())}))
    self._pending += len(counts)
    if self._pending > _COMPACT_AT and len(self._tables) > 1:
      self._compact()

  def _compact(self) -> None:
    table = pa.concat_tables(self._tables).group_by("value").aggregate([("count", "sum")])
    self._tables = [table.rename_columns(["value", "count"]).select(["value", "count"])]
    self._pending = len(self._tables[0])

  def result(self) -> pa.Table:
    if not self._tables:
      return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    self._compact()
    return self._tables[0]


class _Moments:
  """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

  def __init__(self):
    self.n, self.mean, self.m2 = 0, 0.0, 0.0

  def add(self, x: np.ndarray) -> None:
    nb = len(x)
    if not nb:
      return
    with np.errstate(over="ignore"):  # (an overflow is refused in _Fitter.finalize)
      mb = float(x.mean())
      m2b = float(np.square(x - mb).sum())
    self.merge(nb, mb, m2b)

  def merge(self, nb: int, mb: float, m2b: float) -> None:
    """Adds a batch's count, mean and M2 (no cross term into an empty state: ``inf * 0``)."""
    total = self.n + nb
    delta = mb - self.mean
    self.mean += delta * nb / total
    self.m2 += m2b + (delta * delta * self.n * nb / total if self.n else 0.0)
    self.n = total

  @property
  def std(self) -> float:
    return float(np.sqrt(self.m2 / self.n)) if self.n else 0.0


class _DistinctSample:
  """The ``size`` distinct values with the smallest 64-bit hash (a bottom-k sketch)."""

  def __init__(self, size: int):
    self.size = size
    self.values = np.zeros(0, np.float64)
    self.hashes = np.zeros(0, np.uint64)

  def add(self, x: np.ndarray) -> None:
    u = pc.unique(pa.array(x + 0.0)).to_numpy()  # + 0.0: -0.0 -> 0.0
    h = _splitmix64(u.view(np.uint64))
    if len(self.values) >= self.size:
      below = h < self.hashes.max()
      u, h = u[below], h[below]
      if not len(u):
        return
    values = np.concatenate([self.values, u])
    hashes = np.concatenate([self.hashes, h])
    values, first = np.unique(values, return_index=True)
    hashes = hashes[first]
    if len(values) > self.size:
      keep = np.argpartition(hashes, self.size - 1)[:self.size]
      values, hashes = values[keep], hashes[keep]
    self.values, self.hashes = values, hashes


@dataclasses.dataclass
class Fitted:
  """What pass 1 learned: the encoders of every feature."""

  vocabularies: dict[str, tuple[str, ...]]
  vocab_arrays: dict[str, np.ndarray]
  means: dict[str, float]
  stds: dict[str, float]
  boundaries: dict[str, tuple[float, ...]]
  statistics: dict[str, Any]


def _positive_rule(task: spec_lib.TaskSpec) -> str:
  """Which labels of a binary task are positive, for a message."""
  if task.threshold is not None:
    return f"a label > threshold {task.threshold}"
  if task.positive_values is None:
    return "1 or true"
  return f"positive_values {list(task.positive_values)}"


class _Fitter:
  def __init__(self, spec: spec_lib.Spec):
    self.spec = spec
    self.counters = {f.name: _ValueCounter() for f in spec.categorical if not f.hashed}
    self.moments = {f.name: _Moments() for f in spec.numeric}
    self.samples = {f.name: _DistinctSample(QUANTILE_SAMPLE_SIZE) for f in spec.numeric
                    if f.buckets >= 2}
    self.missing = {f.name: 0 for f in spec.features}
    self.markers = missing_numbers(spec)
    self.weighted = 0  # training rows with a weight > 0
    self.rows = 0
    self.dropped = 0
    self.positives = np.zeros(len(spec.tasks))
    self.labelled = np.zeros(len(spec.tasks))

  def add(self, chunk: Chunk, ids: np.ndarray) -> None:
    """Checks every row of the chunk; counts the training rows (``ids == 0``)."""
    spec = self.spec
    labels, mask = labels_of(chunk, spec)
    weights = weights_of(chunk, spec)
    train = ids == 0
    bad = inconsistent_funnel(labels, mask, spec)
    if bad.any():
      if spec.inconsistent_funnel == "error":
        raise _funnel_error(chunk, bad, ids, labels, mask, spec)
      self.dropped += int((bad & train).sum())
      train &= ~bad
    everything = bool(train.all())
    self.rows += int(train.sum())
    if not everything:
      labels, mask = labels[train], mask[train]
    self.positives += (labels * mask).sum(axis=0)
    self.labelled += mask.sum(axis=0)
    self.weighted += int(((weights > 0) & train).sum())
    for f in spec.categorical:
      values, idx = chunk.parts(f.name)
      _categorical_missing(chunk, f, idx)
      codes = chunk.codes(f.name)
      codes = codes if everything else codes[train]
      k = len(values)
      counts = np.bincount(codes, minlength=k + 1)
      self.missing[f.name] += int(counts[k])
      if not f.hashed:
        self.counters[f.name].add(pa.concat_arrays([values, pa.array([""])]), counts)
    for f in spec.numeric:
      t, missing, in_file = _numeric(chunk, f, self.markers)
      use = ~missing if everything else train & ~missing
      self.missing[f.name] += int((in_file & train).sum())  # a filled value was missing too
      present = t if use.all() else t[use]
      self.moments[f.name].add(present)
      if f.name in self.samples:
        self.samples[f.name].add(present)

  def finalize(self) -> Fitted:
    spec = self.spec
    vocabularies, arrays, stats = {}, {}, {"categorical": [], "numeric": []}
    for f in spec.categorical:
      entry = {"name": f.name, "missing_in_train": self.missing[f.name]}
      if f.hashed:
        entry.update(kind="hashed", num_buckets=f.num_buckets, size=f.num_buckets)
      else:
        table = self.counters[f.name].result()
        distinct = len(table)
        kept = table.filter(pc.greater_equal(table["count"], f.min_count))
        if f.max_size is not None and len(kept) > f.max_size:
          order = pc.sort_indices(kept, sort_keys=[("count", "descending"),
                                                   ("value", "ascending")])
          kept = kept.take(order[:f.max_size])
        if not len(kept):
          raise DataError(f"{spec.source}: feature {f.name!r}: no value occurs >= min_count="
                          f"{f.min_count} times in the training split ({distinct} distinct "
                          f"values)")
        vocab = kept["value"].take(pc.sort_indices(kept["value"]))
        vocabularies[f.name] = tuple(vocab.to_pylist())
        arrays[f.name] = np.asarray(vocabularies[f.name], dtype=str)
        covered = int(pc.sum(kept["count"]).as_py() or 0)
        entry.update(kind="vocabulary", min_count=f.min_count, max_size=f.max_size,
                     size=len(vocab), distinct_in_train=distinct,
                     oov_rows_in_train=self.rows - covered)
      stats["categorical"].append(entry)
    indicators = [f for f in spec.numeric if f.missing == "indicator"]
    for f in indicators:
      stats["categorical"].append({"name": f.name + spec_lib.INDICATOR_SUFFIX,
                                   "kind": "missing_indicator", "of": f.name, "size": 2})
    means, stds, boundaries = {}, {}, {}
    for f in spec.numeric:
      m = self.moments[f.name]
      if not m.n:
        raise DataError(f"{spec.source}: feature {f.name!r}: no value in the training split (its "
                        f"{self.missing[f.name]} values there are all missing)")
      mean, std = m.mean, m.std
      if not (np.isfinite(mean) and np.isfinite(std)):
        raise DataError(f"{spec.source}: feature {f.name!r}: its training values are too "
                        f"large, their mean or variance overflows float64; give it "
                        f"\"transform\": \"log1p\"")
      std = prep_lib.fitted_std(mean, std)
      means[f.name], stds[f.name] = mean, std
      b: tuple[float, ...] = ()
      entry = {"name": f.name, "transform": f.transform, "mean": mean, "std": std,
               "missing": f.missing, "missing_in_train": self.missing[f.name]}
      if f.missing == "fill":
        entry["fill"] = f.fill
      if f.name in self.samples:
        sample = self.samples[f.name]
        normalised = ((sample.values - mean) / std).astype(np.float32)
        b = prep_lib.quantile_boundaries(normalised, f.buckets)
        entry.update(buckets=f.buckets, distinct_sampled=len(sample.values),
                     exact=len(sample.values) < QUANTILE_SAMPLE_SIZE)
      boundaries[f.name] = b
      entry["boundaries"] = list(b)
      stats["numeric"].append(entry)
    stats["tasks"] = [{"name": t.name, "kind": t.kind, "labelled_in_train": int(n),
                       "positives_in_train": int(p) if t.kind == "binary" else None}
                      for t, n, p in zip(spec.tasks, self.labelled, self.positives)]
    for t, n, p in zip(spec.tasks, self.labelled, self.positives):
      if t.kind == "binary" and (p == 0 or p == n):
        raise DataError(f"{spec.source}: task {t.name!r}: no {'positive' if p == 0 else 'negative'}"
                        f" label among its {int(n)} labelled rows of the training split "
                        f"(positive: {_positive_rule(t)}); check the spec against the data")
    if spec.weight_column and not self.weighted:
      raise DataError(f"{spec.source}: the weight column {spec.weight_column!r}: every weight of "
                      f"the training split ({self.rows} rows) is 0")
    stats["vocabularies"] = {k: list(v) for k, v in vocabularies.items()}
    return Fitted(vocabularies, arrays, means, stds, boundaries, stats)


# --------------------------------------------------------------------------------------------
# Pass 2: encoding
# --------------------------------------------------------------------------------------------

def _lookup(values: pa.Array, vocab: np.ndarray) -> np.ndarray:
  """Index of each value in the sorted ``vocab``, ``len(vocab)`` (OOV) where absent."""
  v = np.asarray(_strings(values), dtype=str) if len(values) else np.zeros(0, str)
  idx = np.searchsorted(vocab, v)
  hit = vocab[np.minimum(idx, len(vocab) - 1)] == v
  return np.where(hit, idx, len(vocab)).astype(np.int64)


def encode_chunk(chunk: Chunk, ids: np.ndarray, spec: spec_lib.Spec, fitted: Fitted
                 ) -> dict[str, tuple[dict[str, np.ndarray], int, int]]:
  """The rows of a chunk, encoded, by split: ``{split: (arrays, rows dropped, inconsistent funnel
  rows kept)}``; arrays ``{'categorical', 'numeric', 'labels', 'label_mask', 'weight'}``.
  ``ids``: each row's split (0 train, 1 validation, 2 test)."""
  labels, mask = labels_of(chunk, spec)
  weight = weights_of(chunk, spec)
  bad = inconsistent_funnel(labels, mask, spec)
  if bad.any() and spec.inconsistent_funnel == "error":
    raise _funnel_error(chunk, bad, ids, labels, mask, spec)
  n = chunk.num_rows
  indicators = [f for f in spec.numeric if f.missing == "indicator"]
  # Built field by field ([F, n], contiguous rows), handed on transposed.
  id_type = np.int32 if max([2] + [f.num_buckets or 0 for f in spec.categorical]) < 2**31 else (
      np.int64)
  categorical = np.zeros((len(spec.categorical) + len(indicators), n), id_type)
  for j, f in enumerate(spec.categorical):
    values, idx = chunk.parts(f.name)
    _categorical_missing(chunk, f, idx)
    with_missing = pa.concat_arrays([values, pa.array([""])])
    if f.hashed:
      entries = hash_buckets(with_missing, f.num_buckets)
    else:
      entries = _lookup(with_missing, fitted.vocab_arrays[f.name])
    np.take(entries.astype(id_type), chunk.codes(f.name), out=categorical[j])
  numeric = np.zeros((n, len(spec.numeric)), np.float32)
  j_indicator = len(spec.categorical)
  markers = missing_numbers(spec) if spec.numeric else ()
  for j, f in enumerate(spec.numeric):
    t, missing, _ = _numeric(chunk, f, markers)
    z = (t - fitted.means[f.name]) / fitted.stds[f.name]
    if f.missing == "indicator":
      z[missing] = 0.0  # the training mean
      categorical[j_indicator] = missing
      j_indicator += 1
    with np.errstate(over="ignore"):  # (refused below)
      numeric[:, j] = z
    if np.isinf(numeric[:, j]).any():
      i = int(np.argmax(np.isinf(numeric[:, j])))
      raise DataError(f"{chunk.where(i)}, column {f.name!r} (a numeric feature): "
                      f"{chunk.numbers(f.name)[i]} standardised (training mean "
                      f"{fitted.means[f.name]}, std {fitted.stds[f.name]}) overflows float32")
  arrays = {"categorical": categorical.T, "numeric": numeric, "labels": labels,
            "label_mask": mask, "weight": weight}
  # Rows by split: train rows with an inconsistent funnel (policy 'drop') go to no split (3).
  dest = ids.astype(np.int8)
  dropped = bad & (dest == 0)
  if dropped.any():
    dest = np.where(dropped, 3, dest).astype(np.int8)
  counts = np.bincount(dest, minlength=4)
  if counts[0] == n or counts[1] == n or counts[2] == n:
    parts = {int(dest[0]): arrays}
  else:
    order = np.argsort(dest, kind="stable")
    ordered = {k: v[order] for k, v in arrays.items()}
    ends = np.cumsum(counts)
    parts = {sid: {k: v[ends[sid] - counts[sid]:ends[sid]] for k, v in ordered.items()}
             for sid in range(3) if counts[sid]}
  out = {}
  for split, sid in SPLIT_IDS.items():
    drop = int(counts[3]) if split == "train" else 0
    kept_bad = int((bad & (dest == sid)).sum()) if split != "train" and bad.any() else 0
    if sid in parts or drop:
      part = parts.get(sid) or {k: v[:0] for k, v in arrays.items()}
      out[split] = (part, drop, kept_bad)
  return out


# --------------------------------------------------------------------------------------------
# Schema, preprocessing
# --------------------------------------------------------------------------------------------

def make_schema(spec: spec_lib.Spec, fitted: Fitted) -> schema_lib.Schema:
  categorical = []
  for f in spec.categorical:
    size = f.num_buckets if f.hashed else len(fitted.vocabularies[f.name])
    categorical.append(schema_lib.CategoricalField(f.name, size))
  for f in spec.numeric:
    if f.missing == "indicator":
      categorical.append(schema_lib.CategoricalField(f.name + spec_lib.INDICATOR_SUFFIX, 2))
  return schema_lib.Schema(
      categorical=tuple(categorical),
      numeric=tuple(schema_lib.NumericField(f.name, fitted.boundaries[f.name])
                    for f in spec.numeric),
      tasks=tuple(schema_lib.Task(t.name, t.kind, t.depends_on) for t in spec.tasks))


def make_preprocessing(spec: spec_lib.Spec, fitted: Fitted) -> prep_lib.Preprocessing:
  """The :class:`Preprocessing` export's raw-feature encoder reads (every spec has one).

  It encodes raw values exactly as :func:`encode_chunk` does: vocabulary lookup or hashing per
  categorical feature, each numeric feature's transform, statistics and missing-value policy,
  and the missing-value indicators in the columns :func:`make_schema` gives them (after the
  categorical features, in numeric-feature order).
  """
  transforms = {f.transform for f in spec.numeric}
  min_counts = {f.min_count for f in spec.categorical if not f.hashed}
  indicators = [f.name for f in spec.numeric if f.missing == "indicator"]
  columns = {name: len(spec.categorical) + k for k, name in enumerate(indicators)}
  return prep_lib.Preprocessing(
      categorical_fields=tuple(f.name for f in spec.categorical),
      numeric_fields=tuple(f.name for f in spec.numeric),
      vocabularies=tuple(() if f.hashed else fitted.vocabularies[f.name]
                         for f in spec.categorical),
      means=tuple(fitted.means[f.name] for f in spec.numeric),
      stds=tuple(fitted.stds[f.name] for f in spec.numeric),
      numeric_transform=(transforms.pop() if len(transforms) == 1 else
                         prep_lib.PER_FIELD if transforms else "none"),
      min_count=min_counts.pop() if len(min_counts) == 1 else 1,
      bucket_boundaries=tuple(fitted.boundaries[f.name] for f in spec.numeric),
      num_buckets=tuple(f.num_buckets or 0 for f in spec.categorical),
      numeric_transforms=tuple(f.transform for f in spec.numeric),
      numeric_missing=tuple(f.missing for f in spec.numeric),
      numeric_fills=tuple(float(f.fill) if f.missing == "fill" else None for f in spec.numeric),
      indicator_columns=tuple(columns.get(f.name, -1) for f in spec.numeric),
      # The CSV reader reads these as missing (""); Parquet and TFRecord have nulls instead.
      missing_values=spec.format.missing_values if spec.format.type == "csv" else (),
      categorical_missing=tuple(f.missing for f in spec.categorical),
      numeric_missing_values=(missing_numbers(spec),) * len(spec.numeric))


def check_splits_have_rows(spec: spec_lib.Spec, files: Mapping[str, Sequence[spec_lib.FileInfo]],
                           rows: Mapping[str, int]) -> None:
  """Raises DataError naming the first split without rows and the files it came from."""
  for split in prepared_lib.SPLITS:
    if rows[split] == 0:
      where = ", ".join(f.path for f in files[split if spec.split_rule is None else "all"])
      raise DataError(f"{spec.source}: the {split} split has no rows (files: {where})")


def description_files(spec: spec_lib.Spec, fitted: Fitted, key: str,
                      files: Mapping[str, Sequence[spec_lib.FileInfo]], shard_rows: int,
                      splits: Mapping[str, Mapping[str, Any]], timing: Mapping[str, Any]
                      ) -> dict[str, Any]:
  """What a prepared directory holds besides its shards, ``{file name: JSON object}``: schema,
  statistics, preprocessing and metadata (written last: its presence marks the directory
  complete). ``splits``: per split its ``rows``, ``shards`` and inconsistent-funnel counts."""
  schema = make_schema(spec, fitted)
  metadata = {
      "format_version": prepared_lib.FORMAT_VERSION,
      "key": key,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "spec_source": spec.source,
      "spec": spec.to_dict(),
      "files": {s: [dataclasses.asdict(f) for f in fs] for s, fs in files.items()},
      "dims": {"categorical": len(schema.categorical), "numeric": len(schema.numeric),
               "tasks": len(schema.tasks)},
      "shard_rows": shard_rows,
      "splits": {s: dict(splits[s]) for s in prepared_lib.SPLITS},
      "preprocessing": prepared_lib.PREPROCESSING_FILE,
      "timing": dict(timing),
  }
  return {prepared_lib.SCHEMA_FILE: schema.to_dict(),
          prepared_lib.STATISTICS_FILE: fitted.statistics,
          prepared_lib.PREPROCESSING_FILE: make_preprocessing(spec, fitted).to_dict(),
          prepared_lib.METADATA_FILE: metadata}


# --------------------------------------------------------------------------------------------
# The preparation
# --------------------------------------------------------------------------------------------

def _ahead(iterable, depth: int = 2):
  """Iterates ``iterable`` in a background thread, up to ``depth`` items ahead: reading and
  parsing the next batch (Arrow and NumPy release the GIL) overlaps the work on this one. An
  exception in the iterator is raised here, where the item would have been."""
  items: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def produce():
    try:
      for item in iterable:
        while not stop.is_set():
          try:
            items.put((0, item), timeout=0.1)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
      items.put((1, None))
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      items.put((2, e))

  thread = threading.Thread(target=produce, name="apem-data-reader", daemon=True)
  thread.start()
  try:
    while True:
      kind, item = items.get()
      if kind == 0:
        yield item
      elif kind == 1:
        return
      else:
        raise item
  finally:
    stop.set()
    while thread.is_alive():
      try:
        items.get(timeout=0.1)
      except queue.Empty:
        pass
    thread.join()


class _Writers:
  """The shard writers of the three splits, fed through one background thread: serialising
  and writing a batch overlaps encoding the next. An error in the thread is raised by the next
  ``write`` or by ``close``."""

  def __init__(self, directory: pathlib.Path, shard_rows: int):
    self.writers = {s: prepared_lib.ShardWriter(directory, s, shard_rows)
                    for s in prepared_lib.SPLITS}
    self._queue: queue.Queue = queue.Queue(maxsize=2)
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, name="apem-data-writer", daemon=True)
    self._thread.start()

  def _run(self):
    while True:
      task = self._queue.get()
      if task is None:
        return
      if self._error is None:
        try:
          self.writers[task[0]].write(task[1])
        except BaseException as e:  # pylint: disable=broad-except  (raised by write/close)
          self._error = e

  def write(self, split: str, arrays: Mapping[str, np.ndarray]) -> None:
    if self._error is not None:
      raise self._error
    self._queue.put((split, arrays))

  def abort(self) -> None:
    """Stops the thread and closes the files, after an error elsewhere (nothing is raised)."""
    self._error = self._error or RuntimeError("aborted")
    try:
      self.close()
    except BaseException:  # pylint: disable=broad-except
      pass

  def close(self) -> dict[str, list[dict[str, Any]]]:
    if self._thread.is_alive():
      self._queue.put(None)
      self._thread.join()
    shards = {s: w.close() for s, w in self.writers.items()}
    if self._error is not None:
      raise self._error
    return shards


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared directory: its path, its metadata, and whether it was already there."""

  path: pathlib.Path
  metadata: dict[str, Any]
  reused: bool


def cache_key(spec: spec_lib.Spec, files: Mapping[str, Sequence[spec_lib.FileInfo]],
              shard_rows: int) -> str:
  payload = {
      "format_version": prepared_lib.FORMAT_VERSION,
      "spec": spec.to_dict(),
      "files": {s: [[f.path, f.size, f.mtime_ns] for f in fs] for s, fs in files.items()},
      "shard_rows": int(shard_rows),
      "quantile_sample_size": QUANTILE_SAMPLE_SIZE,
  }
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _name(spec: spec_lib.Spec) -> str:
  stem = pathlib.Path(spec.source).stem or "spec"
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


class _Spill:
  """Pass 1's parsed batches in an Arrow IPC stream, for pass 2 to read back without parsing;
  each row's split id in a file of its own (a column beside the data's could take a name the
  data uses)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.ids_path = path.with_name(path.name + ".ids")
    self.chunks: list[tuple[str, int, str, int]] = []  # file, first_row, unit, line_offset
    self._writer = self._ids = None

  def write(self, chunk: Chunk, ids: np.ndarray) -> None:
    batch = pa.record_batch(dict(chunk.columns))
    if self._writer is None:
      self._writer = pa_ipc.new_stream(str(self.path), batch.schema)
      self._ids = open(self.ids_path, "wb")
    self._writer.write_batch(batch)
    self._ids.write(np.asarray(ids, np.int8).tobytes())
    self.chunks.append((chunk.file, chunk.first_row, chunk.unit, chunk.line_offset))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._ids.close()
      self._writer = self._ids = None

  def read(self) -> Iterator[tuple[Chunk, np.ndarray]]:
    self.close()
    if not self.chunks:
      return
    with pa.OSFile(str(self.path)) as source, open(self.ids_path, "rb") as ids:
      reader = pa_ipc.open_stream(source)  # (not memory-mapped: RSS stays bounded)
      for (file, first_row, unit, offset), batch in zip(self.chunks, reader):
        columns = {name: batch.column(name) for name in batch.schema.names}
        yield (Chunk(columns, batch.num_rows, file, first_row, unit, offset),
               np.frombuffer(ids.read(batch.num_rows), np.int8))


def _record_categorical_missing(directory: pathlib.Path, spec: spec_lib.Spec) -> None:
  """A directory prepared before ``preprocessing.json`` recorded each categorical feature's
  missing-value policy gets it from the spec it was prepared from (the bytes a preparation now
  writes), so that serving refuses what preparation refused; one that cannot be written is left
  as it is (it then serves a missing value as the OOV id, as before), saying so."""
  path = directory / prepared_lib.PREPROCESSING_FILE
  if not path.exists() or all(f.missing != "error" for f in spec.categorical):
    return
  with open(path) as f:
    recorded = json.load(f)
  if "categorical_missing" in recorded:
    return
  recorded["categorical_missing"] = [f.missing for f in spec.categorical]
  try:
    _write_json(path.with_name(path.name + ".tmp"), recorded)
    os.replace(path.with_name(path.name + ".tmp"), path)
  except OSError as e:
    logging.warning("%s: cannot record the categorical features' missing-value policies (%s); "
                    "prepare again to serve them", path, e)


def _write_json(path: pathlib.Path, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")


def _prepare_into(directory: pathlib.Path, spec: spec_lib.Spec,
                  files: Mapping[str, Sequence[spec_lib.FileInfo]], shard_rows: int,
                  key: str) -> dict[str, Any]:
  kinds = column_kinds(spec)
  spill = _Spill(directory / "pass1.arrow") if spec.format.type in ("csv", "tfrecord") else None
  rule = spec.split_rule
  pass1 = [(None, f) for f in files["all"]] if rule else [("train", f) for f in files["train"]]

  # Pass 1: fit on the training rows (and spill what was parsed).
  start = time.perf_counter()
  fitter = _Fitter(spec)
  rows_pass1 = 0
  for split, info in pass1:
    for chunk in _ahead(read_file(info.path, spec, kinds)):
      ids = split_ids(chunk, spec, split)
      rows_pass1 += chunk.num_rows
      if spill is not None:
        spill.write(chunk, ids)
      fitter.add(chunk, ids)
  if spill is not None:
    spill.close()
  if fitter.rows == 0:
    where = ", ".join(f.path for _, f in pass1)
    extra = f" (all {fitter.dropped} dropped as inconsistent funnels)" if fitter.dropped else ""
    raise DataError(f"{spec.source}: the train split has no rows{extra} (files: {where})")
  fitted = fitter.finalize()
  pass1_seconds = time.perf_counter() - start
  logging.info("prepare %s: pass 1 read %d rows in %.1f s", spec.source, rows_pass1,
               pass1_seconds)

  # Pass 2: encode every split into shards.
  start = time.perf_counter()
  writers = _Writers(directory, shard_rows)
  dropped = {s: 0 for s in prepared_lib.SPLITS}
  inconsistent_kept = {s: 0 for s in prepared_lib.SPLITS}

  def sources() -> Iterator[tuple[Chunk, np.ndarray]]:
    if spill is not None:
      yield from spill.read()
    else:
      for split, info in pass1:
        for chunk in read_file(info.path, spec, kinds):
          yield chunk, split_ids(chunk, spec, split)
    if rule is None:
      for split in ("validation", "test"):
        for info in files[split]:
          for chunk in read_file(info.path, spec, kinds):
            yield chunk, split_ids(chunk, spec, split)

  rows_pass2 = 0
  try:
    for chunk, ids in _ahead(sources()):
      rows_pass2 += chunk.num_rows
      for split, (arrays, d, k) in encode_chunk(chunk, ids, spec, fitted).items():
        dropped[split] += d
        inconsistent_kept[split] += k
        writers.write(split, arrays)
  except BaseException:
    writers.abort()
    raise
  shards = writers.close()
  rows_written = {s: w.rows for s, w in writers.writers.items()}
  if spill is not None:
    spill.path.unlink(missing_ok=True)
    spill.ids_path.unlink(missing_ok=True)
  check_splits_have_rows(spec, files, rows_written)
  pass2_seconds = time.perf_counter() - start
  for split, count in inconsistent_kept.items():
    if count:
      logging.warning("prepare %s: %d rows of the %s split have an inconsistent funnel; kept "
                      "(validation and test are never filtered by their labels)", spec.source,
                      count, split)
  if dropped["train"]:
    logging.warning("prepare %s: dropped %d training rows with an inconsistent funnel "
                    "(\"inconsistent_funnel\": \"drop\")", spec.source, dropped["train"])

  described = description_files(
      spec, fitted, key, files, shard_rows,
      {s: {"rows": rows_written[s], "shards": shards[s],
           "inconsistent_funnel_dropped": dropped[s],
           "inconsistent_funnel_kept": inconsistent_kept[s]} for s in prepared_lib.SPLITS},
      {"pass1_rows": rows_pass1, "pass1_seconds": pass1_seconds,
       "pass2_rows": rows_pass2, "pass2_seconds": pass2_seconds})
  for name, obj in described.items():  # metadata.json last
    _write_json(directory / name, obj)
  return described[prepared_lib.METADATA_FILE]


def publish_directory(final: pathlib.Path, marker: str,
                      write: Callable[[pathlib.Path], None]) -> bool:
  """Writes the directory ``final`` (complete once it holds the file ``marker``) with
  ``write(tmp)`` into a temporary sibling, then renames it into place.

  Returns False when another process published ``final`` first (its copy stays, this one is
  removed). On any error the temporary directory, and the parent and grandparent of ``final``
  if this call created them, are removed before the error propagates: nothing half-written is
  left behind.
  """
  created = [d for d in (final.parent.parent, final.parent) if not d.exists()]
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
  files_lib.give_default_mode(tmp, directory=True)  # not mkdtemp's 0700
  try:
    write(tmp)
    try:
      os.rename(tmp, final)
    except OSError:
      if not (final / marker).exists():
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another process published it first
      return False
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    for d in reversed(created):
      try:
        d.rmdir()
      except OSError:
        pass
    raise
  return True


def prepare(spec: spec_lib.Spec | str | os.PathLike, cache_root: str | os.PathLike, *,
            shard_rows: int = DEFAULT_SHARD_ROWS) -> Prepared:
  """Prepares (or finds already prepared) the dataset a spec describes.

  Args:
    spec: a :class:`spec_lib.Spec` or the path of a spec file.
    cache_root: the directory under which ``prepared/<name>-<key>`` is written (``data.data_dir``).
    shard_rows: rows per TFRecord shard.

  Raises:
    SpecError: the spec fails validation, or a file it names does not exist.
    DataError: a file does not match the spec (the message names file, line, column, value).
  """
  if not isinstance(spec, spec_lib.Spec):
    spec = spec_lib.load_spec(spec)
  if int(shard_rows) < 1:
    raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
  files = spec_lib.resolve_files(spec)
  key = cache_key(spec, files, shard_rows)
  cache_root = pathlib.Path(cache_root)
  root = cache_root / PREPARED_SUBDIR
  final = root / f"{_name(spec)}-{key}"
  if (final / prepared_lib.METADATA_FILE).exists():
    _record_categorical_missing(final, spec)
    return Prepared(final, prepared_lib.read_metadata(final), True)
  start, metadata = time.perf_counter(), None

  def write(tmp: pathlib.Path) -> None:
    nonlocal metadata
    metadata = _prepare_into(tmp, spec, files, int(shard_rows), key)
    changed = [f.path for fs in files.values() for f in fs if spec_lib.stat(f.path) != f]
    if changed:
      raise DataError(f"{changed[0]} changed while it was being prepared; prepare again")
    metadata["timing"]["total_seconds"] = time.perf_counter() - start
    _write_json(tmp / prepared_lib.METADATA_FILE, metadata)

  if not publish_directory(final, prepared_lib.METADATA_FILE, write):
    return Prepared(final, prepared_lib.read_metadata(final), True)
  t = metadata["timing"]
  logging.info("prepared %s in %.1f s (pass 1 %.1f s, pass 2 %.1f s): %s", spec.source,
               t["total_seconds"], t["pass1_seconds"], t["pass2_seconds"], final)
  return Prepared(final, metadata, False)


# --------------------------------------------------------------------------------------------
# The data config's entry point (data.name = 'spec')
# --------------------------------------------------------------------------------------------

SPEC_CONFIG_KEYS = ("name", "spec", "data_dir", "shard_rows", "stream", "shuffle_buffer",
                    "stream_groups", "interleave_cycle")
# Keys of the streamed input (data.stream=true) -> StreamedSplits' arguments (data/stream.py).
STREAM_CONFIG_KEYS = {"shuffle_buffer": "shuffle_buffer", "stream_groups": "groups",
                      "interleave_cycle": "interleave_cycle"}


def load_spec_dataset(data_config: Any):
  """``data.name='spec'``: prepares (first time) the spec ``data.spec`` under ``data.data_dir``
  (default ``data``) and returns its splits: streamed from the prepared shards
  (``stream.StreamedSplits``, ``data.stream=true``, the default) or loaded into host memory
  (``pipeline.DatasetSplits``, ``data.stream=false``).

  The streamed input takes ``data.shuffle_buffer`` (rows per row group's shuffle window, default
  100,000), ``data.stream_groups`` (row groups of the training order, default 0: one per
  process; set it to reproduce a run of that many processes on fewer) and
  ``data.interleave_cycle`` (files a group reads at a time, default 4); they are refused with
  ``data.stream=false``.

  Funnel label consistency follows the spec's ``inconsistent_funnel`` (training rows only are
  dropped); ``data.inconsistent_funnel`` is refused here so that there is one place to set it.
  """
  get = functools.partial(config_value, data_config)
  keys = list(data_config.keys()) if hasattr(data_config, "keys") else []
  for key in keys:
    if key not in SPEC_CONFIG_KEYS and get(key, None) is not None:
      where = " (set \"inconsistent_funnel\" in the spec)" if key == "inconsistent_funnel" else (
          " (set it in the spec)")
      raise ValueError(f"data.{key}: not used with data.name='spec'{where}; data keys: "
                       f"{list(SPEC_CONFIG_KEYS)}")
  path = get("spec", None)
  if not path:
    raise ValueError("data.spec: required with data.name='spec' (the path of a dataset spec "
                     "JSON file; `apem-data infer FILES --output spec.json` writes a first one)")
  settings = input_settings(data_config, stream_default=True)
  prepared = prepare(path, settings["data_dir"], shard_rows=settings["shard_rows"])
  if not settings["stream"]:
    return prepared_lib.load_prepared(prepared.path)
  from apem_jax.data import stream as stream_lib  # pylint: disable=g-import-not-at-top
  return stream_lib.StreamedSplits(prepared.path, **settings["stream_args"])


def input_settings(data_config: Any, stream_default: bool) -> dict[str, Any]:
  """The checked values of the data keys every prepared dataset takes (``data.data_dir``,
  ``shard_rows``, ``stream`` and the streamed input's keys), refused in one line naming the key
  before anything is prepared or written.

  Returns:
    ``{"data_dir": str, "shard_rows": int, "stream": bool, "stream_args": {StreamedSplits
    argument: int}}``.
  """
  get = functools.partial(config_value, data_config)
  data_dir = get("data_dir", "data")
  if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
    raise ValueError(f"data.data_dir={data_dir!r}: expected a directory path")
  stream = get("stream", stream_default)
  if not isinstance(stream, (bool, np.bool_)):
    raise ValueError(f"data.stream={stream!r}: expected true or false")
  given = {k: get(k, None) for k in STREAM_CONFIG_KEYS if get(k, None) is not None}
  if given and not stream:
    raise ValueError(f"data.{next(iter(given))}: used only by the streamed input; not with "
                     f"data.stream=false")
  lows = {"shard_rows": 1, "shuffle_buffer": 1, "stream_groups": 0, "interleave_cycle": 1}
  values = dict(given, shard_rows=get("shard_rows", DEFAULT_SHARD_ROWS))
  for key, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lows[key]:
      raise ValueError(f"data.{key}={value!r}: expected an integer >= {lows[key]}")
  return {"data_dir": str(data_dir), "shard_rows": int(values["shard_rows"]),
          "stream": bool(stream),
          "stream_args": {STREAM_CONFIG_KEYS[k]: int(v) for k, v in given.items()}}
