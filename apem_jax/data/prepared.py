"""The prepared-data format: what :mod:`apem_jax.data.prepare` writes, and reading it back.

A prepared dataset is one directory (written whole under a temporary name and renamed into place
when complete, so a directory under this name is always complete)::

  <cache_root>/prepared/<spec name>-<key>/
    metadata.json        format version, key, the spec with its defaults, the input files'
                         fingerprints, per split its rows and shards, rows dropped, timings
    schema.json          apem_jax.schema.Schema.to_dict()
    statistics.json      per feature: vocabulary / hashing, mean, std, bucket boundaries,
                         missing values seen in training
    preprocessing.json   apem_jax.data.preprocessing.Preprocessing: what export's in-graph
                         raw-feature encoder reads (vocabularies or hash buckets, transforms,
                         statistics, missing-value policies)
    train-00000.tfrecord, train-00001.tfrecord, ..., validation-00000.tfrecord, test-...

**Shards**: TFRecord files of ``tf.train.Example`` records, ``shard_rows`` rows per file (the last
one of a split fewer), uncompressed, in the order the rows were read. A record holds
:data:`RECORD_ROWS` consecutive rows (a shard's last record fewer), each feature the rows' values
one row after the other::

  categorical  int64_list  [r * Fc]  ids (OOV id = vocabulary size; hashed: farmhash % num_buckets)
  numeric      float_list  [r * Fn]  normalised values
  labels       float_list  [r * T]   0/1 (binary) or the value (regression); 0 where masked
  label_mask   float_list  [r * T]   1 where the row has the task's label
  weight       float_list  [r]       the spec's weight column, else 1

``tf.io.parse_single_example`` with ``FixedLenSequenceFeature`` reads a record back as ``[r, Fc]``,
``[r, Fn]``, ... tensors (:func:`parse_record`), and every field is a dense tensor of a fixed width
(no ragged or per-feature keys: 40 features are two lists, not 40 map entries), so any TFRecord
reader in any language can read it.

Why many rows a record (format 3; format 2 held one row a record): tf.data's cost is per element,
and one element per row held the streamed input to about 440-480k rows/s on the 2-core
development machine (reading alone ran at 810k), not the 2x of a small model's train step that
the input must deliver. With 128 rows a record the same pipeline (read, parse, permute windows,
batch) runs at 1.1-1.5M rows/s, 3-4x that step (docs/data_scale.md, last section). Rows still
shuffle one by one: the streamed input permutes windows of parsed rows, not records
(:mod:`apem_jax.data.stream`).

The records are serialised and framed (length, masked CRC-32C) here with NumPy, many records at a
time; building ``tf.train.Example`` protos in Python costs more than everything else the
preparation does (measured: ~650k rows/s for ``TFRecordWriter.write`` alone, ~330k rows/s for
``tf.io.encode_proto``). Every record parses to TensorFlow's own ``tf.train.Example`` of its
rows, framed byte for byte as ``tf.io.TFRecordWriter`` frames it (tested).

:func:`load_prepared` reads a prepared directory back into the in-memory
:class:`apem_jax.data.pipeline.DatasetSplits` the trainer takes today.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from apem_jax import schema as schema_lib
from apem_jax.data import preprocessing as prep_lib

# 2: preprocessing.json for every spec (hashed features, missing-value policies and per-feature
# transforms included), so that export serves it. 3: RECORD_ROWS rows a record, not one. 4: the
# CSV format's missing-value tokens in preprocessing.json (the serving encoder reads them as
# missing). A directory of an older version is prepared again.
FORMAT_VERSION = 4
RECORD_ROWS = 128
WRITE_ROWS = 65_536  # rows a RecordWriter serialises at a time
METADATA_FILE = "metadata.json"
SCHEMA_FILE = "schema.json"
STATISTICS_FILE = "statistics.json"
PREPROCESSING_FILE = "preprocessing.json"
SPLITS = ("train", "validation", "test")
FEATURE_KEYS = ("categorical", "numeric", "labels", "label_mask", "weight")
READ_BUFFER_BYTES = 1 << 20  # TFRecordDataset's read buffer per open file


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.tfrecord"


def widths(dims: Mapping[str, int]) -> dict[str, int]:
  """Values per row of each of :data:`FEATURE_KEYS`, from the metadata's ``dims``."""
  return {"categorical": int(dims["categorical"]), "numeric": int(dims["numeric"]),
          "labels": int(dims["tasks"]), "label_mask": int(dims["tasks"]), "weight": 1}


def parse_record(dims: Mapping[str, int], tf=None):
  """A function: one serialised record (a scalar string tensor) -> its rows, ``{categorical
  int32 [r, Fc], numeric [r, Fn], labels [r, T], label_mask [r, T], weight [r]}``."""
  if tf is None:
    from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    tf = pipeline._import_tf()  # pylint: disable=protected-access
  width = widths(dims)
  dtypes = {k: tf.int64 if k == "categorical" else tf.float32 for k in FEATURE_KEYS}
  # A feature of width 0 has no values to count its rows by: it is made from the weights' rows.
  spec = {k: tf.io.FixedLenSequenceFeature([] if k == "weight" else [width[k]], dtypes[k],
                                           allow_missing=True)
          for k in FEATURE_KEYS if width[k]}

  def parse(serialized):
    rows = tf.io.parse_single_example(serialized, spec)
    r = tf.shape(rows["weight"])[0]
    for k in FEATURE_KEYS:
      if not width[k]:
        rows[k] = tf.zeros([r, 0], dtypes[k])
    rows["categorical"] = tf.cast(rows["categorical"], tf.int32)
    return rows
  return parse


def read_rows(files: Sequence[str], dims: Mapping[str, int], tf=None):
  """A ``tf.data.Dataset`` of the records of ``files`` (in order), each element one record's
  rows (:func:`parse_record`); ``.rebatch(n)`` makes batches of ``n`` rows of it."""
  if tf is None:
    from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    tf = pipeline._import_tf()  # pylint: disable=protected-access
  return tf.data.TFRecordDataset(list(files), buffer_size=READ_BUFFER_BYTES).map(
      parse_record(dims, tf))


# --------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TFRecord frames use it, for many records at once
# --------------------------------------------------------------------------------------------

def _crc_tables() -> list[np.ndarray]:
  t = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    t = np.where(t & 1, (t >> np.uint32(1)) ^ np.uint32(0x82F63B78),
                 t >> np.uint32(1)).astype(np.uint32)
  tables = [t]
  for _ in range(3):  # slicing-by-4
    prev = tables[-1]
    tables.append((t[prev & 0xFF] ^ (prev >> np.uint32(8))).astype(np.uint32))
  return tables


_CRC_TABLES = _crc_tables()
_ZEROS_CRC: list[np.ndarray] = [np.array([0xFFFFFFFF], np.uint32)]


def _zeros_crc(n: int) -> np.ndarray:
  """``z[k]``: the CRC register after ``k`` zero bytes from the initial ``0xFFFFFFFF``."""
  z = _ZEROS_CRC[0]
  if len(z) <= n:
    t = _CRC_TABLES[0]
    out = np.empty(max(n + 1, 2 * len(z)), np.uint32)
    out[:len(z)] = z
    c = z[-1]
    for k in range(len(z), len(out)):
      c = t[c & 0xFF] ^ (c >> np.uint32(8))
      out[k] = c
    _ZEROS_CRC[0] = z = out
  return z


_CRC16_TABLES: list[np.ndarray] = []


def _crc16_tables() -> tuple[np.ndarray, np.ndarray]:
  """Slicing-by-4 with two 16-bit tables: a word's low and high halves each in one lookup."""
  if not _CRC16_TABLES:
    t0, t1, t2, t3 = _CRC_TABLES
    x = np.arange(65536, dtype=np.uint32)
    lo, hi = x & 0xFF, x >> 8
    _CRC16_TABLES.extend([(t3[lo] ^ t2[hi]).astype(np.uint32),
                          (t1[lo] ^ t0[hi]).astype(np.uint32)])
  return _CRC16_TABLES[0], _CRC16_TABLES[1]


def crc32c_rows(right_aligned: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """CRC-32C of each row's last ``lengths[i]`` bytes; ``right_aligned`` [N, W] uint8 holds zeros
  before them (W a multiple of 4).

  The CRC register update is linear over GF(2), so ``crc(I, m) = crc(I, 0^len(m)) ^ crc(0, m)``,
  and a register at 0 stays 0 over leading zero bytes: every row runs through the same W bytes
  together, four at a time (slicing-by-4 with 16-bit tables), then the initial value's part is
  added per length."""
  n, width = right_aligned.shape
  low, high = _crc16_tables()
  words = np.ascontiguousarray(np.ascontiguousarray(right_aligned).view("<u4").T)  # [W/4, N]
  crc = np.zeros(n, np.uint32)
  c = np.empty(n, np.uint32)
  a = np.empty(n, np.uint32)
  for j in range(width // 4):
    np.bitwise_xor(crc, words[j], out=c)
    np.bitwise_and(c, np.uint32(0xFFFF), out=a)
    np.right_shift(c, np.uint32(16), out=c)
    np.bitwise_xor(low.take(a), high.take(c), out=crc)
  z = _zeros_crc(int(lengths.max()) if len(lengths) else 0)
  return crc ^ z[lengths] ^ np.uint32(0xFFFFFFFF)


def _masked(crc: np.ndarray) -> np.ndarray:
  return (((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(0xA282EAD8)).astype(
      np.uint32)


# --------------------------------------------------------------------------------------------
# tf.train.Example, serialised with NumPy
# --------------------------------------------------------------------------------------------

_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], np.uint64)


def _varint_len(v: np.ndarray) -> np.ndarray:
  """Bytes of each non-negative value's varint."""
  v = np.asarray(v)
  if not v.size or int(v.max()) < 128:
    return np.ones(v.shape, np.int64)
  return np.searchsorted(_VARINT_LIMITS, v.astype(np.uint64), side="right").astype(np.int64) + 1


def _varint(v: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Varint bytes of each value: ``([..., width] uint8, [..., width] valid)``."""
  v = v.astype(np.uint64)
  lens = _varint_len(v)
  shifts = (7 * np.arange(width, dtype=np.uint64))
  b = ((v[..., None] >> shifts) & np.uint64(0x7F)).astype(np.uint8)
  pos = np.arange(width)
  b |= ((pos < (lens[..., None] - 1)).astype(np.uint8) << 7)
  return b, pos < lens[..., None]


def _varint_bytes(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _float_entry_prefix(key: str, count: int) -> bytes:
  """A ``Features.feature`` map entry holding a FloatList of ``count`` values, without them."""
  payload = 4 * count
  float_list = b"\x0a" + _varint_bytes(payload)  # + payload bytes
  fl_len = len(float_list) + payload
  feature = b"\x12" + _varint_bytes(fl_len) + float_list
  f_len = len(feature) + payload
  k = key.encode()
  entry = b"\x0a" + _varint_bytes(len(k)) + k + b"\x12" + _varint_bytes(f_len) + feature
  e_len = len(entry) + payload
  return b"\x0a" + _varint_bytes(e_len) + entry


def serialize_examples(categorical: np.ndarray, numeric: np.ndarray, labels: np.ndarray,
                       label_mask: np.ndarray, weight: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Serialised ``tf.train.Example`` of each row of the arguments, right-aligned: ``(bytes uint8
  [N, W], lengths int64 [N])``, example ``i`` in the last ``lengths[i]`` bytes of row ``i``, zeros
  before, ``W`` a multiple of 4 (what :func:`crc32c_rows` and :func:`frame_records` take). A
  record of ``r`` data rows is one row here, its values side by side (:func:`serialize_records`).

  ``categorical`` [N, Fc] non-negative integers; ``numeric`` [N, Fn], ``labels`` and
  ``label_mask`` [N, T], ``weight`` [N] or [N, r]: cast to float32 (little-endian, as protobuf
  stores them).
  The categorical entry comes first in the ``Features`` map and the float entries after it
  (protobuf map order is free): only the first part of a record varies in length.
  """
  n = len(weight)
  cat = np.asarray(categorical).reshape(n, -1)
  if not np.issubdtype(cat.dtype, np.integer):
    raise ValueError(f"serialize_examples: categorical ids must be integers, got {cat.dtype}")
  if cat.size and cat.min() < 0:
    raise ValueError("serialize_examples: categorical ids must be >= 0")
  floats = [("numeric", np.asarray(numeric, "<f4").reshape(n, -1)),
            ("labels", np.asarray(labels, "<f4").reshape(n, -1)),
            ("label_mask", np.asarray(label_mask, "<f4").reshape(n, -1)),
            ("weight", np.asarray(weight, "<f4").reshape(n, -1))]

  # The variable part: the Example and Features headers and the categorical entry.
  segments: list[tuple[np.ndarray, np.ndarray | None]] = []  # (bytes [N, w], valid or None)

  def const(b: bytes):
    segments.append((np.broadcast_to(np.frombuffer(b, np.uint8), (n, len(b))), None))

  def var(values: np.ndarray):
    width = int(_varint_len(np.asarray([values.max() if len(values) else 0]))[0])
    segments.append(_varint(values, width))

  vlen = _varint_len(cat)                          # [N, Fc]
  payload = vlen.sum(axis=1)                       # packed varints
  int64_list = 1 + _varint_len(payload) + payload  # 0x0a len payload
  feature = 1 + _varint_len(int64_list) + int64_list  # 0x1a len Int64List
  key = b"categorical"
  entry = 2 + len(key) + 1 + _varint_len(feature) + feature  # 0x0a len key 0x12 len Feature
  float_prefixes = [_float_entry_prefix(k, a.shape[1]) for k, a in floats]
  floats_len = sum(len(p) + 4 * a.shape[1] for p, (_, a) in zip(float_prefixes, floats))
  features = 1 + _varint_len(entry) + entry + floats_len
  record = 1 + _varint_len(features) + features

  const(b"\x0a")
  var(features)
  const(b"\x0a")
  var(entry)
  const(b"\x0a" + _varint_bytes(len(key)) + key + b"\x12")
  var(feature)
  const(b"\x1a")
  var(int64_list)
  const(b"\x0a")
  var(payload)
  if cat.shape[1] and int(vlen.max()) == 1:
    segments.append((cat.astype(np.uint8), None))
  elif cat.shape[1]:
    b, valid = _varint(cat, int(vlen.max()))
    segments.append((b.reshape(n, -1), valid.reshape(n, -1)))
  data = np.concatenate([s[0] for s in segments], axis=1)
  valid = np.concatenate([np.ones(s[0].shape, bool) if s[1] is None else s[1]
                          for s in segments], axis=1)
  var_len = record - floats_len
  var_width = data.shape[1]
  # The fixed part: the float entries.
  fixed = []
  for prefix, (_, a) in zip(float_prefixes, floats):
    fixed.append(np.broadcast_to(np.frombuffer(prefix, np.uint8), (n, len(prefix))))
    if a.shape[1]:
      fixed.append(np.ascontiguousarray(a).view(np.uint8).reshape(n, -1))
  width = -(-(var_width + floats_len) // 4) * 4
  out = np.zeros((n, width), np.uint8)
  var_end = width - floats_len
  out[:, :var_end][np.arange(var_end)[None, :] >= (var_end - var_len)[:, None]] = data[valid]
  out[:, var_end:] = np.concatenate(fixed, axis=1)
  return out, record


def records_of(right_aligned: np.ndarray, lengths: np.ndarray) -> list[bytes]:
  """The records of :func:`serialize_examples` as ``bytes`` (for tests and small uses)."""
  width = right_aligned.shape[1]
  return [right_aligned[i, width - int(k):].tobytes() for i, k in enumerate(lengths)]


def frame_records(right_aligned: np.ndarray, lengths: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """TFRecord framing of the records of :func:`serialize_examples`: ``(bytes, framed lengths)``,
  each record ``uint64 length, uint32 masked_crc32c(length), data, uint32 masked_crc32c(data)``,
  one after the other."""
  n, width = right_aligned.shape
  lengths = np.asarray(lengths, np.int64)
  if n == 0:
    return np.zeros(0, np.uint8), lengths
  len_bytes = lengths.astype("<u8").view(np.uint8).reshape(n, 8)
  len_crc = _masked(crc32c_rows(len_bytes, np.full(n, 8)))
  data_crc = _masked(crc32c_rows(right_aligned, lengths))
  framed = np.zeros((n, 12 + width + 4), np.uint8)
  framed[:, 12:12 + width] = right_aligned
  framed[:, 12 + width:] = data_crc.astype("<u4").view(np.uint8).reshape(n, 4)
  header = np.concatenate([len_bytes, len_crc.astype("<u4").view(np.uint8).reshape(n, 4)], 1)
  framed[np.arange(n)[:, None], (width - lengths)[:, None] + np.arange(12)] = header
  keep = np.arange(framed.shape[1])[None, :] >= (width - lengths)[:, None]
  return framed[keep], lengths + 16


def _rows(arrays: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
  return {k: arrays[k][start:stop] for k in FEATURE_KEYS}


def serialize_records(arrays: Mapping[str, np.ndarray], record_rows: int = RECORD_ROWS
                      ) -> np.ndarray:
  """``arrays`` (:data:`FEATURE_KEYS`, ``n >= 1`` rows aligned) as framed TFRecord records of
  ``record_rows`` rows each, the last one the rest: ``bytes uint8``, ready to be written."""
  n = len(arrays["weight"])
  whole = n // record_rows * record_rows
  parts = []
  for start, stop, records in ((0, whole, whole // record_rows), (whole, n, 1)):
    if stop > start:
      parts.append(frame_records(*serialize_examples(
          *(np.asarray(arrays[k][start:stop]).reshape(records, -1) for k in FEATURE_KEYS)))[0])
  return np.concatenate(parts)


class RecordWriter:
  """Rows appended to an open binary file as records of ``record_rows`` rows: rows are kept
  until :data:`WRITE_ROWS` have come (the framing's cost per call grows with the record's width,
  not the rows), then the whole records among them are written; :meth:`close` writes the rest,
  the last record shorter (and leaves the file open)."""

  def __init__(self, file, record_rows: int = RECORD_ROWS):
    self.file = file
    self.record_rows = int(record_rows)
    self._pending: list[Mapping[str, np.ndarray]] = []
    self._pending_rows = 0

  def write(self, arrays: Mapping[str, np.ndarray]) -> None:
    self._pending.append(arrays)
    self._pending_rows += len(arrays["weight"])
    if self._pending_rows >= WRITE_ROWS:
      self._flush(whole_records_only=True)

  def _flush(self, whole_records_only: bool) -> None:
    if not self._pending_rows:
      return
    rows = {k: np.concatenate([a[k] for a in self._pending]) for k in FEATURE_KEYS}
    n = self._pending_rows
    end = n // self.record_rows * self.record_rows if whole_records_only else n
    if end:
      self.file.write(memoryview(serialize_records(_rows(rows, 0, end), self.record_rows)))
    self._pending = [_rows(rows, end, n)] if end < n else []
    self._pending_rows = n - end

  def close(self) -> None:
    self._flush(whole_records_only=False)


class ShardWriter:
  """Writes one split's rows into ``<split>-NNNNN.tfrecord`` files of ``shard_rows`` rows, in
  records of ``record_rows`` rows (:class:`RecordWriter`; a shard's last record fewer)."""

  def __init__(self, directory: str | os.PathLike, split: str, shard_rows: int,
               record_rows: int = RECORD_ROWS):
    if shard_rows < 1:
      raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    self.directory = pathlib.Path(directory)
    self.split = split
    self.shard_rows = int(shard_rows)
    self.record_rows = int(record_rows)
    self.shards: list[dict[str, Any]] = []  # {"file", "rows"}
    self._file = None
    self._records: RecordWriter | None = None
    self.rows = 0

  def _close_file(self):
    if self._file is not None:
      self._records.close()
      self._file.close()
      self._file = self._records = None

  def write(self, arrays: Mapping[str, np.ndarray]) -> None:
    """Appends rows: ``arrays`` holds :data:`FEATURE_KEYS`, rows aligned."""
    n = len(arrays["weight"])
    done = 0
    while done < n:
      if self._file is None:
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.directory / name, "wb")  # pylint: disable=consider-using-with
        self._records = RecordWriter(self._file, self.record_rows)
        self.shards.append({"file": name, "rows": 0})
      take = min(n - done, self.shard_rows - self.shards[-1]["rows"])
      self._records.write(_rows(arrays, done, done + take))
      self.shards[-1]["rows"] += take
      done += take
      if self.shards[-1]["rows"] == self.shard_rows:
        self._close_file()
    self.rows += n

  def close(self) -> list[dict[str, Any]]:
    self._close_file()
    return self.shards


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------

def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  with open(pathlib.Path(directory) / METADATA_FILE) as f:
    return json.load(f)


def _varints(b: np.ndarray) -> np.ndarray:
  """The values of packed varints ``b`` (uint8 [n]) as int64 [m]."""
  last = b < 128  # the last byte of each value
  if last.all():
    return b.astype(np.int64)
  ends = np.flatnonzero(last)
  if not len(ends) or ends[-1] != len(b) - 1:
    raise ValueError("a packed varint list ends inside a value")
  starts = np.concatenate([[0], ends[:-1] + 1])
  count = ends - starts + 1
  values = np.zeros(len(ends), np.uint64)
  for k in range(int(count.max())):
    at = k < count
    values[at] |= (b[starts[at] + k] & np.uint8(0x7F)).astype(np.uint64) << np.uint64(7 * k)
  return values.view(np.int64)


def _varint_at(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if byte < 128:
      return value, pos
    shift += 7


def _fields(buf: bytes, pos: int, end: int):
  """``(field number, wire type, value)`` of a protobuf message ``buf[pos:end]``; a
  length-delimited value as its ``(start, end)``."""
  while pos < end:
    tag, pos = _varint_at(buf, pos)
    wire = tag & 7
    if wire == 0:
      value, pos = _varint_at(buf, pos)
    elif wire == 2:
      size, pos = _varint_at(buf, pos)
      value, pos = (pos, pos + size), pos + size
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = buf[pos:pos + size], pos + size
    else:
      raise ValueError(f"protobuf wire type {wire}")
    if pos > end:
      raise ValueError("a protobuf field runs past its message")
    yield tag >> 3, wire, value


def parse_example(record: bytes) -> dict[str, np.ndarray]:
  """One serialised ``tf.train.Example`` of float and int64 lists -> ``{key: values}`` (float32
  or int64 [n]), in NumPy (the protobuf wire format; packed or unpacked lists)."""
  out = {}
  for number, wire, (fs, fe) in _fields(record, 0, len(record)):
    if number != 1 or wire != 2:
      continue
    for number, wire, (es, ee) in _fields(record, fs, fe):  # map<string, Feature> entries
      if number != 1 or wire != 2:
        continue
      key, feature = None, None
      for number, wire, value in _fields(record, es, ee):
        if number == 1 and wire == 2:
          key = record[value[0]:value[1]].decode()
        elif number == 2 and wire == 2:
          feature = value
      if key is None or feature is None:
        raise ValueError("a feature map entry without its key or value")
      for kind, wire, (ls, le) in _fields(record, *feature):  # 2 float_list, 3 int64_list
        parts = []
        for number, wire, value in _fields(record, ls, le):
          if number != 1:
            continue
          if kind == 2:
            parts.append(np.frombuffer(record, "<f4", (value[1] - value[0]) // 4, value[0])
                         if wire == 2 else np.frombuffer(value, "<f4"))
          elif kind == 3:
            parts.append(_varints(np.frombuffer(record, np.uint8, value[1] - value[0], value[0]))
                         if wire == 2 else np.array([value], np.uint64).view(np.int64))
          else:
            raise ValueError(f"feature {key!r} is a bytes list; expected floats or integers")
        out[key] = (np.concatenate(parts) if parts else
                    np.zeros(0, np.float32 if kind == 2 else np.int64))
  return out


def read_records(path: str | os.PathLike) -> list[bytes]:
  """The records of a TFRecord file, both CRC-32C checksums of each verified (as TensorFlow's
  reader does), in NumPy.

  Raises:
    ValueError: naming the file and the record that is cut short or fails its checksum.
  """
  buf = pathlib.Path(path).read_bytes()
  spans, pos = [], 0
  while pos < len(buf):
    if pos + 12 > len(buf):
      raise ValueError(f"{path}: record {len(spans)} is cut short (its header)")
    length = int.from_bytes(buf[pos:pos + 8], "little")
    if pos + 16 + length > len(buf):
      raise ValueError(f"{path}: record {len(spans)} is cut short ({length} bytes announced)")
    spans.append((pos, length))
    pos += 16 + length
  if not spans:
    return []
  starts = np.array([s for s, _ in spans], np.int64)
  lengths = np.array([n for _, n in spans], np.int64)
  raw = np.frombuffer(buf, np.uint8)
  headers = raw[starts[:, None] + np.arange(12)]  # length, masked CRC of the length
  footers = raw[(starts + 12 + lengths)[:, None] + np.arange(4)]  # masked CRC of the data
  width = -(-int(lengths.max()) // 4) * 4
  right_aligned = np.zeros((len(spans), width), np.uint8)
  records = [buf[s + 12:s + 12 + n] for s, n in spans]
  for i, record in enumerate(records):
    right_aligned[i, width - len(record):] = np.frombuffer(record, np.uint8)
  bad = np.flatnonzero(
      (_masked(crc32c_rows(headers[:, :8], np.full(len(spans), 8)))
       != np.ascontiguousarray(headers[:, 8:]).view("<u4").ravel()) |
      (_masked(crc32c_rows(right_aligned, lengths)) != footers.view("<u4").ravel()))
  if len(bad):
    raise ValueError(f"{path}: record {int(bad[0])} fails its CRC-32C checksum")
  return records


def read_split(directory: str | os.PathLike, split: str, metadata: Mapping[str, Any] | None = None
               ) -> dict[str, np.ndarray]:
  """One split's shards -> ``{'categorical' int32, 'numeric', 'labels', 'label_mask',
  'weight'}`` arrays, read in NumPy (:func:`read_records`, :func:`parse_example`; the same rows
  as :func:`read_rows`, without importing TensorFlow).

  Raises:
    ValueError: a shard that is damaged (naming the file and record) or holds another number of
      rows than the metadata says.
  """
  directory = pathlib.Path(directory)
  metadata = metadata or read_metadata(directory)
  width = widths(metadata["dims"])
  parts: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
  for shard in metadata["splits"][split]["shards"]:
    path = directory / shard["file"]
    for i, record in enumerate(read_records(path)):
      try:
        example = parse_example(record)
      except (ValueError, IndexError) as e:
        raise ValueError(f"{path}: record {i} is no tf.train.Example of this format: {e}") from e
      rows = len(example.get("weight", ()))
      for k in FEATURE_KEYS:
        values = example.get(k, np.zeros(0, np.float32))
        if values.size != rows * width[k]:
          raise ValueError(f"{path}: record {i} holds {values.size} {k} values for {rows} "
                           f"rows; expected {width[k]} a row")
        parts[k].append(values.reshape((rows,) if k == "weight" else (rows, width[k])))
  out = {}
  for k in FEATURE_KEYS:
    dtype = np.int32 if k == "categorical" else np.float32
    out[k] = (np.concatenate(parts[k]).astype(dtype, copy=False) if parts[k] else
              np.zeros((0,) if k == "weight" else (0, width[k]), dtype))
  expected = metadata["splits"][split]["rows"]
  if len(out["weight"]) != expected:
    raise ValueError(f"{directory}: split {split!r} holds {len(out['weight'])} rows, its "
                     f"metadata says {expected}: the prepared data is damaged; delete the "
                     f"directory and prepare again")
  return out


def load_prepared(directory: str | os.PathLike, splits: Sequence[str] = SPLITS):
  """A prepared directory -> :class:`apem_jax.data.pipeline.DatasetSplits` (schema,
  preprocessing when the spec allows one, arrays of every split in memory).

  The training split's ``weight`` column (a spec's ``weight_column``) is kept where a weight is
  not 1, and weights the training loss as the streamed input's does; evaluation is unweighted.
  """
  from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  metadata = read_metadata(directory)
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{directory}: prepared with format version "
                     f"{metadata.get('format_version')}, this code reads {FORMAT_VERSION}")
  with open(directory / SCHEMA_FILE) as f:
    schema = schema_lib.Schema.from_dict(json.load(f))
  preprocessing = None
  if (directory / PREPROCESSING_FILE).exists():
    with open(directory / PREPROCESSING_FILE) as f:
      preprocessing = prep_lib.Preprocessing.from_json(f.read())
  arrays = {}
  for split in splits:
    data = read_split(directory, split, metadata)
    weight = data.pop("weight")
    if split == "train" and np.any(weight != 1):
      data["weight"] = weight
    arrays[split] = data
  dropped = {s: int(metadata["splits"][s].get("inconsistent_funnel_dropped", 0)) for s in splits}
  return pipeline.DatasetSplits(schema, preprocessing, arrays, inconsistent_funnel_rows=dropped)
