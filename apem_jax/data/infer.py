"""A first dataset spec from a sample of the files: ``apem-data infer FILES --output spec.json``.

Reads the first ``sample_rows`` rows (default 100,000) of the files and guesses, column by column
(every guess is listed in the notes :func:`infer_spec` returns, for the user to check and edit):

* **tasks**: a column of 0/1 (or true/false) values whose name says label (``click``,
  ``conversion``, ``purchase``, ``label``, ``target``, ``is_*``...) becomes a binary task; columns
  given with ``labels`` become tasks whatever their names (binary if 0/1, else regression). Binary
  tasks are ordered by positive rate, and a task whose positives are all positive in an earlier one
  in the sample gets ``depends_on`` it (a funnel step). A label of two other numbers (-1/1) is
  binary, the larger positive (``positive_values``). Refused: a column named like a label holding
  3 to 20 distinct integers, 0 and 1 among them (a class id: tasks are binary or regression).
* **split**: a column named ``split``/``set``/``fold`` holding train/validation/test values is the
  split column; else an 80/10/10 hash split, by a user-id-like column if there is one. A 0/1
  column named like a split flag (``is_train``, ``in_test``, ``valid_flag``: an optional ``is_``
  or ``in_``, a split's name, an optional ``_flag``/``_set``/``_split``...) is refused, not taken
  for a task or a feature: a spec's split column holds train/validation/test values.
* **weight**: a non-negative numeric column named like a weight.
* **features**: integer or float columns are numeric (``log1p`` when non-negative and heavy-tailed,
  32 quantile buckets when they have more than 32 distinct values, ``"missing": "indicator"`` when
  the sample has missing values), except id-like names (``*_id``, ``id``, ``uuid``...) and integer
  columns with at most 20 distinct values, which are categorical; string columns are categorical:
  a vocabulary, or hashed with ``num_buckets`` when the sample holds more than 10,000 distinct
  values (or more than 1,000 that are mostly unique): 4 buckets per distinct value, a power of 2,
  at most ``MAX_BUCKETS`` (4,194,304; the note says when capped). When the sample is not the
  whole input, a mostly-unique column's distinct count is first scaled by the input's rows over
  the sampled rows (Parquet: the files' metadata, exact; CSV and TFRecord: estimated from the
  bytes read over the files' bytes). A column with one value is ignored, and so
  are an unnamed column (``""``: CSV lines that end with the delimiter) and a column whose name
  cannot name an input of the exported model (:func:`apem_jax.data.spec.check_feature_names`).
  Parquet decimals are numeric; a column of a type the preparation does not read (dates,
  timestamps, lists, structs...) is ignored (refused as a ``labels`` column), and a name two
  columns share is refused.

A missing value is a null or a NaN: a float NaN, or in a CSV the text ``NaN`` (any spelling Arrow
reads as one), which the spec's ``format.missing_values`` then lists beside ``""`` so that the
preparation reads it as missing too (it refuses an unlisted one). A CSV's values are read as the
preparation reads them: a number may have spaces or tabs around it (``a, 1.5, 0``), a category
value or a label's text loses the ASCII whitespace around it, and a blank of spaces in a column
of numbers is a missing value (listed in ``format.missing_values``, as written). Compressed
files (``.gz``, ``.bz2``...) are refused: the preparation does not read them.

Nothing here is more than a guess from a sample: a value outside the sample (a missing value where
the sample had none, a category never seen) shows up as an error or an OOV id at preparation.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from apem_jax.data import preprocessing as prep_lib
from apem_jax.data import spec as spec_lib

SAMPLE_ROWS = 100_000
HASH_DISTINCT = 10_000        # more distinct values than this in the sample: hashed
HASH_DISTINCT_UNIQUE = 1_000  # ... or more than this, most of them seen once
MAX_BUCKETS = 1 << 22
SMALL_INTEGER_DISTINCT = 20   # integer columns with at most this many values: categorical
NUMERIC_BUCKETS = 32

_LABEL_NAME = re.compile(
    r"(^|_)(label|labels|target|y|click|clicked|clicks|clk|ctr|conversion|conversions|converted|"
    r"convert|cvr|purchase|purchased|buy|bought|order|ordered|install|installed|signup|"
    r"add_to_cart|cart|carted|like|liked|share|shared|engaged|engagement)($|_)|^is_|^has_|^did_",
    re.IGNORECASE)
_ID_NAME = re.compile(r"(^|_)(id|uid|uuid|guid|hash|key)$|_id(_|$)|^id_", re.IGNORECASE)
_USER_NAME = re.compile(r"^(user|user_id|uid|userid|customer|customer_id|visitor|visitor_id|"
                        r"member|member_id|account|account_id|device_id|session_id)$",
                        re.IGNORECASE)
_WEIGHT_NAME = re.compile(r"(^|_)(weight|weights|sample_weight|instance_weight|w)$",
                          re.IGNORECASE)
# Texts (lower-cased, stripped) that mark a missing value in a column of numbers ("": a blank of
# spaces, as in "a, , 1", which the preparation reads as a missing value only when listed).
_MISSING_MARKERS = ["na", "n/a", "#n/a", "null", "none", "nan", "-", "?", "missing", ""]
# What Arrow's CSV reader (the preparation's) strips from around a number; a cast strips nothing.
_CSV_NUMBER_SPACES = " \t"
_SPLIT_NAME = re.compile(r"^(split|set|fold|subset|partition|dataset_split)$", re.IGNORECASE)
# A 0/1 column that says whether a row is in one split (is_train, in_test, valid_flag).
_SPLIT_FLAG_NAME = re.compile(
    r"^(is_|in_)?(train|training|test|testing|valid|validation|val|eval|dev|holdout)"
    r"(_(flag|set|split|row|rows|sample|indicator|mask))?$", re.IGNORECASE)
_BINARY_WORDS = {"yes": "no", "y": "n", "true": "false", "t": "f", "positive": "negative",
                 "pos": "neg"}
_SPLIT_VALUES = {"train": "train", "training": "train", "validation": "validation",
                 "valid": "validation", "val": "validation", "dev": "validation",
                 "eval": "validation", "test": "test", "testing": "test"}


# The preparation reads files as they are (spec._open: no decompression), so infer refuses these
# rather than sample bytes the preparation would fail on.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _refuse_compressed(path: str) -> None:
  if path.lower().endswith(_COMPRESSED):
    raise ValueError(f"{path}: compressed files are not read; decompress it and give the "
                     f"decompressed file")


def guess_format(path: str) -> str:
  _refuse_compressed(path)
  name = path.lower()
  if name.endswith((".parquet", ".pq")):
    return "parquet"
  if name.endswith((".tfrecord", ".tfrecords", ".tfrec", ".tfr")):
    return "tfrecord"
  if name.endswith((".csv", ".tsv", ".txt")):
    return "csv"
  raise ValueError(f"{path}: cannot tell the format from the file name; give --format "
                   f"(one of {list(spec_lib.FORMATS)})")


def _splits_by_file_name(paths: Sequence[str]) -> dict[str, list[str]] | None:
  """``{split: paths}`` when every file's name names one split (``train.csv``, ``events_valid``,
  ``test-00001.parquet``) and the three are there; None when some name none, or all the same
  one (the files are pooled and hash-split). Raises ValueError when the names give two splits
  (pooled, the user's splits would mix)."""
  by_split: dict[str, list[str]] = {}
  for path in paths:
    words = re.split(r"[^a-z]+", os.path.basename(path).lower())
    named = {_SPLIT_VALUES[w] for w in words if w in _SPLIT_VALUES}
    if len(named) != 1:
      return None
    by_split.setdefault(named.pop(), []).append(path)
  missing = [s for s in ("train", "validation", "test") if s not in by_split]
  if len(missing) == 2:
    return None
  if missing:
    raise ValueError(f"the files' names give the splits {sorted(by_split)} and no file for "
                     f"{missing}: write the spec's splits by hand ({{\"splits\": {{\"train\": "
                     f"[...], \"validation\": [...], \"test\": [...]}}}})")
  return {s: by_split[s] for s in ("train", "validation", "test")}


def _refuse_duplicates(path: str, names: Sequence[str]) -> None:
  """Refuses a name two columns share (prepare refuses the file)."""
  for i, name in enumerate(names):
    if name in names[:i]:
      raise ValueError(f"{path}: column {name!r} appears twice; rename one of them")


def _input_rows(paths: Sequence[str], rows_read: int, bytes_read: int, header: int = 0
                ) -> tuple[int, bool]:
  """(the rows of all of ``paths``, exact?): ``rows_read`` when the ``bytes_read`` (of rows)
  were all of the files' bytes but a ``header`` each, else estimated from the bytes per row
  read (rows of similar lengths)."""
  total = sum(spec_lib.stat(p).size - header for p in paths)
  if bytes_read >= total or not bytes_read:
    return rows_read, True
  return max(rows_read + 1, round(rows_read * total / bytes_read)), False


def _sample_csv(paths: Sequence[str], fmt: spec_lib.FileFormat, rows: int
                ) -> tuple[pa.Table, int, bool]:
  """The first ``rows`` data rows and the input's rows (:func:`_input_rows`)."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  names = prepare._csv_header(paths[0], fmt)  # pylint: disable=protected-access
  _refuse_duplicates(paths[0], names)
  options = prepare._csv_options(  # pylint: disable=protected-access
      fmt, names, {c: pa.string() for c in names})
  first_line = prepare._csv_first_line(paths[0], fmt)[0]  # pylint: disable=protected-access
  header = len(first_line) if fmt.header else 0  # bytes of each file that hold no row
  tables = []
  read = 0  # bytes of data lines
  for path in paths:
    if sum(len(t) for t in tables) >= rows:
      break
    if prepare._csv_header(path, fmt) != names:  # pylint: disable=protected-access
      raise ValueError(f"{path}: its columns differ from those of {paths[0]}")
    for segment, done in prepare._csv_segments(path, fmt):  # pylint: disable=protected-access
      tables.append(prepare.read_csv_segment(path, fmt, names, {c: "str" for c in names}, {},
                                             segment, (1 if fmt.header else 0) + done + 1,
                                             options))
      read += len(segment)
      if sum(len(t) for t in tables) >= rows:
        break
  total, exact = _input_rows(paths, sum(len(t) for t in tables), read, header)
  if not tables:
    return pa.table({c: pa.array([], pa.string()) for c in names}), total, exact
  return pa.concat_tables(tables).slice(0, rows), total, exact


def _sample_parquet(paths: Sequence[str], rows: int) -> tuple[pa.Table, int, bool]:
  """The first ``rows`` rows and the input's rows (exact: the files' metadata)."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  tables = []
  for path in paths:
    if sum(len(t) for t in tables) >= rows:
      break
    pf = pq.ParquetFile(prepare._source(path))  # pylint: disable=protected-access
    _refuse_duplicates(path, pf.schema_arrow.names)
    for batch in pf.iter_batches(batch_size=min(rows, 65_536)):
      tables.append(pa.Table.from_batches([batch]))
      if sum(len(t) for t in tables) >= rows:
        break
  total = sum(pq.read_metadata(prepare._source(p)).num_rows  # pylint: disable=protected-access
              for p in paths)
  return pa.concat_tables(tables, promote_options="default").slice(0, rows), total, True


def _sample_tfrecord(paths: Sequence[str], rows: int) -> tuple[pa.Table, int, bool]:
  """The first ``rows`` records and the input's records (:func:`_input_rows`); each file's
  features are those prepare reads: the union over its first records
  (``prepare._tfrecord_head``); a record without one has it missing."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  kinds: dict[str, str] = {}
  first: dict[str, str] = {}  # feature -> the file that gave its kind
  parts: list[dict[str, list]] = []
  read = 0  # bytes
  for path in paths:
    taken = sum(len(next(iter(p.values()), [])) for p in parts)
    if taken >= rows:
      break
    head = prepare._tfrecord_head(path)  # pylint: disable=protected-access
    for name, kind in head.items():
      if kinds.setdefault(name, kind) != kind:
        raise ValueError(f"{path}: feature {name!r} is a {kind}, it is a {kinds[name]} in "
                         f"{first[name]}")
      first.setdefault(name, path)
    if head:
      values, size = _tfrecord_values(path, head, rows - taken)
      parts.append(values)
      read += size
    else:  # (no features in its first records: left out, as a file read)
      read += spec_lib.stat(path).size
  if not kinds:
    raise ValueError(f"{paths[0]}: no records")
  columns: dict[str, list] = {k: [] for k in kinds}
  for part in parts:
    n = len(next(iter(part.values())))
    for k in kinds:
      columns[k] += part.get(k, [None] * n)
  table = pa.table({k: pa.array(v) for k, v in columns.items()})
  return (table, *_input_rows(paths, len(table), read))


# A TFRecord's framing around each record: its length (8 bytes) and two CRCs (4 each).
_TFRECORD_FRAMING = 16


def _tfrecord_values(path: str, head: dict[str, str], rows: int
                     ) -> tuple[dict[str, list], int]:
  """({feature: one value (str, int or float) or None per record} of the first ``rows``, the
  bytes of the file they take)."""
  from apem_jax.data import pipeline, prepare  # pylint: disable=g-import-not-at-top
  tf = pipeline._import_tf()  # pylint: disable=protected-access
  dtype = {"bytes_list": tf.string, "float_list": tf.float32, "int64_list": tf.int64}
  features = {k: tf.io.RaggedFeature(dtype.get(v, tf.string)) for k, v in head.items()}
  columns: dict[str, list] = {k: [] for k in head}
  size = 0
  ds = tf.data.TFRecordDataset(path).take(rows).batch(prepare.BATCH_ROWS)
  iterator = iter(ds.map(lambda x: (tf.io.parse_example(x, features),
                                    tf.reduce_sum(tf.strings.length(x)))))
  while True:
    done = len(columns[next(iter(head))])
    try:
      batch, length = next(iterator)
    except StopIteration:
      return columns, size
    except tf.errors.OpError as e:
      raise prepare._tfrecord_parse_error(  # pylint: disable=protected-access
          path, done, e.message, head) from None
    for k in head:
      for row in batch[k].to_list():
        v = row[0] if len(row) == 1 else None
        columns[k].append(v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
    size += int(length) + _TFRECORD_FRAMING * (len(columns[next(iter(head))]) - done)


def _stripped(strings: pa.Array) -> pa.Array:
  """Category values as the preparation reads them: ASCII whitespace stripped
  (``prepare.Chunk.parts``)."""
  return pc.utf8_trim(strings, characters=prep_lib.ASCII_WHITESPACE)


def _numbers(arr: pa.Array, csv: bool = False) -> tuple[np.ndarray | None, bool]:
  """(float64 [n] of the values that are not null, NaN kept (a missing value to the preparation:
  a float NaN, or the text ``NaN`` of a CSV); whether all the others are integers) or
  (None, False) if not numbers. ``csv``: texts of a CSV, read as the preparation reads them
  (Arrow's CSV reader: spaces and tabs around a number are dropped, `` 1.5`` is 1.5)."""
  arr = arr.drop_null()
  if pa.types.is_dictionary(arr.type):
    arr = arr.dictionary_decode()
  if pa.types.is_boolean(arr.type):
    return pc.cast(arr, pa.float64()).to_numpy(), True
  if pa.types.is_decimal(arr.type):  # (never "integers": prepare reads decimals as numbers only)
    return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), False
  if pa.types.is_integer(arr.type):
    return pc.cast(arr, pa.float64()).to_numpy(), True
  if pa.types.is_floating(arr.type):
    x = arr.to_numpy(zero_copy_only=False).astype(np.float64)
    ok = x[~np.isnan(x)]
    return x, bool(np.all(np.isfinite(ok)) and np.all(ok == np.round(ok)))
  if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
    lowered = pc.utf8_lower(_stripped(arr))  # (a label's text: read as a category value)
    if len(arr) and pc.all(pc.is_in(lowered, pa.array(["true", "false"]))).as_py():
      return pc.cast(pc.equal(lowered, "true"), pa.float64()).to_numpy(), True
    if csv:
      arr = pc.utf8_trim(arr, characters=_CSV_NUMBER_SPACES)
    try:
      x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      return None, False
    integer = True
    try:
      pc.cast(arr, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      integer = False
    return x, integer
  return None, False


def _binary_words(strings: pa.Array) -> tuple[str, str] | None:
  """(positive, negative) when the values are the two words of a pair like yes/no."""
  values = pc.unique(strings).to_pylist()
  if len(values) != 2:
    return None
  lower = {v.lower(): v for v in values}
  for positive, negative in _BINARY_WORDS.items():
    if set(lower) == {positive, negative}:
      return lower[positive], lower[negative]
  return None


_READ_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal,
               pa.types.is_null, pa.types.is_string, pa.types.is_large_string,
               pa.types.is_binary, pa.types.is_large_binary)


def _unread_type(arrow_type: pa.DataType) -> str | None:
  """Why the preparation cannot read a column of ``arrow_type``, or None when it can."""
  t = arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
  if any(is_type(t) for is_type in _READ_TYPES):
    return None
  if pa.types.is_nested(t):
    todo = "one value per row is read: make a column of each part to use it"
  elif pa.types.is_temporal(t):
    todo = "convert it to a number (such as seconds since the epoch) or a string to use it"
  else:
    todo = "convert it to a number or a string to use it"
  return f"of Arrow type {t}, which the preparation does not read: {todo}"


def _refuse_split_flag(name: str) -> None:
  raise ValueError(
      f"column {name!r} looks like a split flag (0/1, named like a split), not a task or a "
      f"feature: a spec splits by a column of train/validation/test values "
      f"({{\"split\": {{\"split_column\": ...}}}}), by files ({{\"splits\": ...}}) or by a hash "
      f"({{\"split\": {{\"fractions\": ...}}}}); write one by hand with {name!r} in "
      f"\"ignore\", or give --label {name} if it is a label")


def _refuse_class_ids(name: str, x: np.ndarray) -> None:
  """Refuses 3 to SMALL_INTEGER_DISTINCT integers, 0 and 1 among them, in a label-named column."""
  values = np.unique(x)
  if 3 <= len(values) <= SMALL_INTEGER_DISTINCT and {0.0, 1.0} <= set(values.tolist()):
    raise ValueError(
        f"column {name!r} is named like a label but holds the values "
        f"{[int(v) for v in values]}: a task is binary (0/1) or a regression; map it to 0/1 "
        f"columns (one per class), give --label {name} for a regression task, or rename it (or "
        f"write the spec by hand) to make it a feature")


def _two_numbers(x: np.ndarray) -> tuple[float, float] | None:
  """(larger, smaller) when the values are exactly two numbers (not 0 and 1: binary already)."""
  values = np.unique(x)
  return (float(values[1]), float(values[0])) if len(values) == 2 else None


def _json_number(v: float) -> int | float:
  return int(v) if v.is_integer() else v


def _next_pow2(n: int) -> int:
  return 1 << max(10, math.ceil(math.log2(max(n, 1))))


def _hash_buckets(distinct: int, mostly_unique: bool, n: int, total: int, exact: bool
                  ) -> tuple[int, str]:
  """(num_buckets, what the note adds): 4 per distinct value, a power of 2, at most
  MAX_BUCKETS; when the ``n`` sampled rows are not all ``total`` (``exact`` or estimated), a
  mostly-unique column's distinct values are scaled by ``total / n`` (an id grows with the
  rows)."""
  expected, said = distinct, ""
  rows = f"{n:,} sampled rows of {'' if exact else 'about '}{total:,}"
  if total > n and mostly_unique:
    expected = math.ceil(distinct * total / n)
    said = f"; sized for about {expected:,} values, estimated from {rows}"
  elif total > n:
    said = f"; sized from {rows}: more values may appear"
  wanted = _next_pow2(4 * expected)
  if wanted > MAX_BUCKETS:
    said += f"; capped at {MAX_BUCKETS:,} buckets"
  return min(MAX_BUCKETS, wanted), said


def infer_spec(files: Sequence[str], *, output_dir: str = ".", file_format: str | None = None,
               sample_rows: int = SAMPLE_ROWS, labels: Sequence[str] = ()
               ) -> tuple[dict[str, Any], list[str]]:
  """A starting spec for ``files`` and the notes on what was guessed.

  Args:
    files: paths or globs (all of one format, with the same columns).
    output_dir: where the spec will be written: its file paths are made relative to it.
    file_format: 'csv' | 'parquet' | 'tfrecord'; default: from the first file's name.
    sample_rows: rows read (from the first files).
    labels: columns to make tasks whatever their names.

  Raises:
    ValueError (SpecError): no file, an unreadable sample, or no task found.
  """
  if not files:
    raise ValueError("no files given")
  paths: list[str] = []
  for i, pattern in enumerate(files):
    try:
      paths += spec_lib._expand(pattern, ".")  # pylint: disable=protected-access
    except FileNotFoundError as e:
      raise spec_lib.SpecError(f"FILES[{i}]: {e}") from None
  for path in paths:
    _refuse_compressed(path)
  fmt_name = file_format or guess_format(paths[0])
  if fmt_name not in spec_lib.FORMATS:
    raise ValueError(f"--format: {fmt_name!r} is not one of {list(spec_lib.FORMATS)}")
  if sample_rows < 1:
    raise ValueError(f"--rows must be >= 1, got {sample_rows}")
  delimiter = "\t" if fmt_name == "csv" and paths[0].lower().endswith(".tsv") else ","
  csv_format = spec_lib.FileFormat("csv", delimiter=delimiter)
  if fmt_name == "csv":
    table, total, exact = _sample_csv(paths, csv_format, sample_rows)
  elif fmt_name == "parquet":
    table, total, exact = _sample_parquet(paths, sample_rows)
  else:
    table, total, exact = _sample_tfrecord(paths, sample_rows)
  n = len(table)
  # The input's rows, when the sample is not all of them: "of 1,000,000" or "of about ...".
  of_total = "" if total <= n else f" of {'' if exact else 'about '}{total:,}"
  notes = [f"read {n:,} rows{of_total} from {len(paths)} file(s) ({fmt_name})"]
  if n == 0:
    raise ValueError(f"{paths[0]}: no rows to infer a spec from")
  missing_labels = [c for c in labels if c not in table.column_names]
  if missing_labels:
    raise ValueError(f"--label {missing_labels[0]!r}: no such column; columns: "
                     f"{table.column_names}")

  features: list[dict[str, Any]] = []
  tasks: list[dict[str, Any]] = []
  ignore: list[str] = []
  weight = split_column = None
  id_columns: list[str] = []
  # Binary tasks' labels, float64 [n] row-aligned with the table: 0/1, NaN where missing.
  label_values: dict[str, np.ndarray | None] = {}
  nan_texts: set[str] = set()  # CSV texts read as NaN (missing): format.missing_values
  for name in table.column_names:
    if name == "":
      ignore.append(name)
      notes.append("'': ignored (an unnamed column: do the lines end with the delimiter?)")
      continue
    column = table.column(name).combine_chunks()
    unread = _unread_type(column.type)
    if unread and name in labels:
      raise ValueError(f"{paths[0]}: label column {name!r} is {unread}")
    if unread:
      ignore.append(name)
      notes.append(f"{name}: ignored ({unread})")
      continue
    decimal = pa.types.is_decimal(column.type)  # a number to prepare, never a category value
    if pa.types.is_dictionary(column.type):
      column = column.dictionary_decode()
    rows = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))  # row of each value
    present = column.drop_null()  # (a CSV's texts as written: missing_values match them so)
    csv = fmt_name == "csv"
    x, integer = _numbers(present, csv)
    if x is not None and np.isnan(x).any():  # NaN is missing (as to the preparation)
      keep = ~np.isnan(x)
      if fmt_name == "csv" and pa.types.is_string(present.type):  # (only a CSV has the key)
        nan_texts |= set(pc.unique(present.filter(pa.array(~keep))).to_pylist())
      present, rows = present.filter(pa.array(keep)), rows[keep]
      x, integer = _numbers(present, csv)
    if x is None and fmt_name == "csv" and pa.types.is_string(present.type) and len(present):
      # Numbers but for texts that mark a missing value (a label or price with a few "N/A"
      # was taken for a categorical feature): those texts become format.missing_values.
      marked = pc.is_in(pc.utf8_lower(_stripped(present)),
                        pa.array(_MISSING_MARKERS)).to_numpy(zero_copy_only=False)
      if (marked.any() and not marked.all()
          and _numbers(present.filter(pa.array(~marked)), csv)[0] is not None):
        nan_texts |= set(pc.unique(present.filter(pa.array(marked))).to_pylist())
        present, rows = present.filter(pa.array(~marked)), rows[~marked]
        x, integer = _numbers(present, csv)
    nulls = n - len(present)  # missing values: null or NaN
    texts = pa.types.is_string(present.type) or pa.types.is_large_string(present.type)
    distinct = (pc.count_distinct(_stripped(present) if texts else present).as_py()
                if len(present) else 0)
    binary = x is not None and len(x) > 0 and bool(np.all((x == 0) | (x == 1)))
    as_strings = (_stripped(pc.cast(present, pa.string()))
                  if x is None and len(present) else None)
    words = _binary_words(as_strings) if as_strings is not None else None
    if _SPLIT_FLAG_NAME.match(name) and name not in labels and (binary or words is not None):
      if distinct > 1:
        _refuse_split_flag(name)
      ignore.append(name)
      notes.append(f"{name}: ignored (a split flag with one value in the sample)")
      continue
    label_named = name in labels or bool(_LABEL_NAME.search(name))
    if x is not None and integer and len(x) and label_named and name not in labels:
      _refuse_class_ids(name, x)
    if words is not None and label_named:
      positive, negative = words
      x = pc.cast(pc.equal(as_strings, positive), pa.float64()).to_numpy()
      binary = True
    pair = _two_numbers(x) if x is not None and len(x) and not binary and label_named else None
    if pair is not None:  # -1/1: the larger is positive
      x, binary = (x == pair[0]).astype(np.float64), True
    if name in labels or (binary and _LABEL_NAME.search(name)):
      task = {"name": name, "label_column": name}
      if words is not None and binary:
        task["positive_values"], task["negative_values"] = [words[0]], [words[1]]
      if decimal and binary:  # read as a number: a threshold between its two values
        task["threshold"] = sum(pair) / 2 if pair is not None else 0.5
      elif pair is not None:
        task["positive_values"] = [_json_number(pair[0])]
        task["negative_values"] = [_json_number(pair[1])]
      if binary:
        label_values[name] = np.full(n, np.nan)
        label_values[name][rows] = x
      else:
        label_values[name] = None
      if not binary:
        if x is None:
          raise ValueError(f"--label {name!r}: its values are neither 0/1 nor numbers; write "
                           f"the task by hand with positive_values")
        task["kind"] = "regression"
      if nulls:
        task["missing"] = "mask"
      tasks.append(task)
      rate = float(x.mean()) if binary else None
      kind = f"binary, positive rate {rate:.4f}" if binary else "regression"
      if pair is not None:
        kind += f", {_json_number(pair[0])} positive and {_json_number(pair[1])} negative"
      notes.append(f"{name}: task ({kind}{', missing labels masked' if nulls else ''})")
      continue
    if _SPLIT_NAME.match(name) and as_strings is not None and distinct <= len(_SPLIT_VALUES):
      values = set(pc.unique(as_strings).to_pylist())
      splits = {_SPLIT_VALUES.get(v.lower()) for v in values}
      if None not in splits and len(splits) == 3:
        split_column = (name, values)
        notes.append(f"{name}: the split column (values {sorted(values)})")
        continue
      if None not in splits:  # split names, not all three: hashing would mix the user's splits
        raise ValueError(
            f"column {name!r} names the split of each row, but the sampled rows hold only "
            f"{sorted(values)}: write the spec's split by hand ({{\"split_column\": {name!r}, "
            f"\"values\": {{\"train\": [...], \"validation\": [...], \"test\": [...]}}}}), "
            f"or sample more rows (--rows) if the file is sorted by it")
    if (_WEIGHT_NAME.search(name) and x is not None and len(x) and not binary
        and float(x.min()) >= 0 and not nulls):
      weight = name
      notes.append(f"{name}: the weight column")
      continue
    if distinct <= 1:
      ignore.append(name)
      notes.append(f"{name}: ignored (one value in the sample"
                   f"{'' if not nulls else ', and missing values'})")
      continue
    try:  # a feature's name names an input of the exported model
      spec_lib.check_feature_names([f["name"] for f in features] + [name])
    except ValueError as e:
      ignore.append(name)
      notes.append(f"{name}: ignored ({e})")
      continue
    id_like = bool(_ID_NAME.search(name)) or bool(_USER_NAME.match(name))
    if x is not None and (decimal or not id_like and not (
        integer and distinct <= SMALL_INTEGER_DISTINCT)):
      feature: dict[str, Any] = {"name": name, "type": "numeric"}
      q50, q99 = np.quantile(x, [0.5, 0.99]) if len(x) else (0.0, 0.0)
      tail = ""
      if len(x) and float(x.min()) >= 0 and q99 > 50 * max(q50, 1.0):
        feature["transform"] = "log1p"
        tail = ", log1p (heavy tail)"
      if distinct > NUMERIC_BUCKETS:
        feature["buckets"] = NUMERIC_BUCKETS
      if nulls:
        feature["missing"] = "indicator"
      features.append(feature)
      notes.append(f"{name}: numeric ({distinct:,} distinct in the sample{tail}"
                   f"{f', {nulls:,} missing: indicator' if nulls else ''})")
      continue
    feature = {"name": name, "type": "categorical"}
    mostly_unique = distinct > 0.5 * len(present)
    if distinct > HASH_DISTINCT or (distinct > HASH_DISTINCT_UNIQUE and mostly_unique) or (
        id_like and distinct > HASH_DISTINCT_UNIQUE):
      feature["num_buckets"], sized = _hash_buckets(
          distinct, mostly_unique, n, total, exact)
      notes.append(f"{name}: categorical, hashed into {feature['num_buckets']:,} buckets "
                   f"({distinct:,} distinct values in {len(present):,} sampled rows{sized})")
    else:
      if distinct > 1_000:
        feature["min_count"] = 5
      notes.append(f"{name}: categorical, vocabulary ({distinct:,} distinct in the sample"
                   f"{', min_count 5' if distinct > 1_000 else ''})")
    if id_like:
      id_columns.append(name)
    features.append(feature)

  if not tasks:
    raise ValueError("no task found: no 0/1 column is named like a label (click, conversion, "
                     "purchase, label, target, is_...); name the label columns with --label")
  if not features:
    raise ValueError("no feature found: every column is a label, the weight or the split")

  # Funnels: binary tasks by positive rate; a task depends on the nearest earlier one whose
  # positives include all of its own (in the sample).
  binary_tasks = [t for t in tasks if t.get("kind", "binary") == "binary"]
  values = {t["name"]: label_values[t["label_column"]] for t in binary_tasks}
  if len(binary_tasks) > 1 and not any(np.isnan(v).any() for v in values.values()):
    binary_tasks.sort(key=lambda t: -float(values[t["name"]].mean()))
    for i, task in enumerate(binary_tasks):
      y = values[task["name"]]
      for earlier in reversed(binary_tasks[:i]):
        parent = values[earlier["name"]]
        if y.sum() > 0 and y.mean() < parent.mean() and not np.any((y == 1) & (parent == 0)):
          task["depends_on"] = earlier["name"]
          notes.append(f"{task['name']}: depends_on {earlier['name']!r} (a funnel step: every "
                       f"positive in the sample is positive there)")
          break
    tasks = binary_tasks + [t for t in tasks if t.get("kind") == "regression"]

  rel = [p if spec_lib._is_remote(p) else os.path.relpath(  # pylint: disable=protected-access
      os.path.abspath(p), os.path.abspath(output_dir)) for p in paths]
  fmt: dict[str, Any] = {"type": fmt_name}
  if delimiter != ",":
    fmt["delimiter"] = delimiter
  if nan_texts:
    fmt["missing_values"] = [""] + sorted(nan_texts)
    shown = [t if t and t == t.strip() else repr(t) for t in sorted(nan_texts)]  # ' ', ' NA'
    notes.append(f"format.missing_values: {fmt['missing_values']} (the text "
                 f"{' and '.join(shown)} is a missing value)")
  spec: dict[str, Any] = {"format": fmt_name if len(fmt) == 1 else fmt, "files": rel}
  by_file = _splits_by_file_name(rel) if split_column is None else None
  if by_file is not None:
    del spec["files"]
    spec["splits"] = by_file
    notes.append("splits: by file name (" + "; ".join(
        f"{split}: {', '.join(files)}" for split, files in by_file.items()) + ")")
  elif split_column is not None:
    name, seen = split_column
    by_split: dict[str, list[str]] = {}
    for v in sorted(seen):
      by_split.setdefault(_SPLIT_VALUES[v.lower()], []).append(v)
    spec["split"] = {"split_column": name}
    if any(vals != [s] for s, vals in by_split.items()):
      spec["split"]["values"] = by_split
  else:
    users = [c for c in id_columns if _USER_NAME.match(c)] or id_columns
    rule: dict[str, Any] = {"fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}}
    if users:
      rule = {"hash_column": users[0], **rule}
      notes.append(f"split: 80/10/10 by a hash of {users[0]!r} (all of a value's rows in one "
                   f"split)")
    else:
      notes.append("split: 80/10/10 by a hash of the file name and row number (no id column "
                   "found; set split.hash_column to keep a user's rows together)")
    spec["split"] = rule
  spec["features"] = features
  if weight:
    spec["weight_column"] = weight
  spec["tasks"] = tasks
  if ignore:
    spec["ignore"] = ignore
  spec_lib.parse_spec(spec, source="the inferred spec")  # what we write must validate
  return spec, notes
