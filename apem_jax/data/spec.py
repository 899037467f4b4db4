"""The dataset spec: one JSON file that describes a user's own data files.

A spec names the files of each split (or one set of files and a rule that splits them), their
format, every feature, every task and the columns to skip. :func:`load_spec` validates it against
:data:`SPEC_SCHEMA` (a JSON Schema, checked by the small validator below: the ``jsonschema``
package is not a dependency) and then across keys; the first problem found is reported in one
line naming the file, the key path and what was expected, e.g.
``spec.json: features[3].type: 'catgorical' is not one of ['categorical', 'numeric']``.

Example (every key that is not required shown with its default, or as an alternative)::

  {
    "format": {"type": "csv", "delimiter": ",", "quote_char": "\\"", "header": true,
               "missing_values": [""]},
    "files": ["events/*.csv"],
    "split": {"hash_column": "user_id",
              "fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}},
    "features": [
      {"name": "user_id", "type": "categorical", "num_buckets": 1048576},
      {"name": "country", "type": "categorical", "min_count": 5, "max_size": 1000},
      {"name": "price", "type": "numeric", "transform": "log1p", "buckets": 32,
       "missing": {"fill": 0}},
      {"name": "age", "type": "numeric", "missing": "indicator"}
    ],
    "weight_column": "sample_weight",
    "tasks": [
      {"name": "click", "label_column": "clicked"},
      {"name": "purchase", "label_column": "bought", "positive_values": ["yes"],
       "negative_values": ["no"], "depends_on": "click"}
    ],
    "ignore": ["timestamp"],
    "inconsistent_funnel": "error"
  }

Keys:

* ``format``: ``"csv"`` | ``"parquet"`` | ``"tfrecord"`` (``tf.train.Example``, one value per
  feature), or an object with ``type`` and, for CSV, ``delimiter`` (one character, default
  ``,``), ``quote_char`` (one character or null for none, default ``"``), ``header`` (default
  true: the first line names the columns), ``column_names`` (required when ``header`` is false),
  ``missing_values`` (the strings read as a missing value, default ``[""]``; ``NaN`` is not one
  unless listed). A CSV row's values may not hold line breaks.
* Splits, one of:
  ``splits``: ``{"train": [paths or globs], "validation": [...], "test": [...]}``, or
  ``files``: ``[paths or globs]`` and ``split``: ``{"split_column": "col"}`` (rows whose value is
  ``train``/``validation``/``test``; ``"values": {"validation": ["valid", "dev"], ...}`` maps other
  spellings) or ``{"hash_column": "col", "fractions": {...}}`` (a row goes to the split of the
  keyed hash of its value's string form: every row with the same value lands in the same split;
  without ``hash_column`` the hash is of the file name and row number). Relative paths are relative
  to the spec file; ``scheme://`` paths (``gs://``) go through ``tf.io.gfile``. A path without
  glob characters must exist; a glob must match at least one file; no file may be in two splits.
* ``features``: ``{"name", "type"}`` and, by type (a feature's name names an input of the
  exported SavedModel: it must match TensorFlow's ``[A-Za-z0-9.][A-Za-z0-9_.\\-/]*``, so no spaces
  and no leading ``_``, and no two names may differ only in case):

  - ``categorical``: a vocabulary of the training split's values seen at least ``min_count``
    (default 1) times, at most ``max_size`` of them (the most frequent; ties by value), everything
    else the OOV id; or ``num_buckets`` (< 2**31): ids are ``farmhash64(value) % num_buckets``
    (``tf.strings.to_hash_bucket_fast``) for id spaces too large for a vocabulary. Values are
    strings (numbers and booleans in Arrow's string form: ``1.0`` -> ``"1"``, ``true``; a float
    NaN is missing), stripped of surrounding ASCII whitespace.
    ``missing``: ``"value"`` (default: a missing value is the empty string, a value like any
    other) | ``"error"``.
  - ``numeric``: ``transform`` ``"none"`` (default) | ``"log1p"`` (``sign(x) log1p(|x|)``), then
    standardised with the training mean and std; ``buckets`` (default 0: none; 2 to 65,536: also
    embed the value's bucket, boundaries at quantiles of the distinct training values); ``missing``:
    ``"error"`` (default) | ``{"fill": x}`` (x, in the column's units, replaces a missing value
    before the statistics, as if it were data) | ``"indicator"`` (a missing value becomes the
    training mean, and a categorical field ``<name>_missing`` with ids 0 present / 1 missing is
    added after the spec's categorical features). Values are numbers (a Parquet boolean reads
    as 0/1; text that is not a number, ``nan`` included, is an error).
* ``weight_column``: optional, a non-negative number per row, a count (a batch's loss is a
  weighted mean, but one whose weights sum below 1 is scaled down: do not normalise them to 1).
* ``tasks``: ``{"name", "label_column", "kind": "binary" | "regression"}`` (kind default binary).
  A binary label is 0/1 (``0``, ``1``, ``0.0``, ``true``, ``false``...) unless the task gives
  ``positive_values`` (and optionally ``negative_values``: then any other value is an error;
  without them, every other value is negative) or ``threshold`` (positive when the number is
  > threshold). Values given as JSON numbers compare as numbers, strings as (stripped) strings.
  ``missing``: ``"error"`` (default) | ``"mask"`` (the row has no label for the task).
  ``depends_on`` names an earlier binary task: a funnel step (impression -> click -> conversion).
* ``ignore``: columns to skip (``""`` names the unnamed last column of CSV lines that end with the
  delimiter). Every column of the files must be a feature, a label, the weight, the split or hash
  column, or ignored; an ignored name must be a column of every CSV or Parquet file.
* ``inconsistent_funnel``: ``"error"`` (default: a row whose funnel step is positive where the step
  it depends on is negative stops the preparation, naming the file and line) | ``"drop"`` (such
  rows are dropped from the TRAINING split, and counted; validation and test are never filtered by
  their labels: their inconsistent rows are kept and counted).

Numbers are finite: ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's ``json`` reads, though
they are not JSON) are refused when the spec is read.

Pure Python; TensorFlow is imported only to expand ``scheme://`` paths.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

from apem_jax.data import preprocessing as prep_lib

SPLITS = ("train", "validation", "test")
FORMATS = ("csv", "parquet", "tfrecord")
FEATURE_TYPES = ("categorical", "numeric")
TASK_KINDS = ("binary", "regression")
NUMERIC_TRANSFORMS = ("none", "log1p")
INCONSISTENT_FUNNEL_POLICIES = ("error", "drop")
INDICATOR_SUFFIX = "_missing"


class SpecError(ValueError):
  """A spec that fails validation, or files it names that cannot be found."""


# What TensorFlow accepts as the name of a SavedModel signature's input: the exported model
# (apem_jax.data.serving) names its raw inputs by feature.
INPUT_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\-/]*")


def _feature_name_problem(names: Sequence[str]) -> tuple[int, str] | None:
  """(index, one-line message) of the first name that cannot name a SavedModel input, or None."""
  seen: dict[str, str] = {}
  for i, name in enumerate(names):
    if not INPUT_NAME.fullmatch(name):
      return i, (f"feature {name!r} cannot name a SavedModel input (TensorFlow takes names "
                 f"matching {INPUT_NAME.pattern}); rename the column")
    if name.lower() in seen:
      return i, (f"features {seen[name.lower()]!r} and {name!r} differ only in case, which a "
                 f"SavedModel's input names do not tell apart; rename one")
    seen[name.lower()] = name
  return None


def check_feature_names(names: Sequence[str]) -> None:
  """Raises a one-line ``ValueError`` for a feature name that cannot name a SavedModel input
  (TensorFlow's pattern :data:`INPUT_NAME`; no spaces, no leading ``_``) or that equals an
  earlier one but for case (TensorFlow lowercases the names of a signature's inputs). Pure
  Python: the spec checks its features with it, the export (``serving``) its inputs."""
  problem = _feature_name_problem(names)
  if problem is not None:
    raise ValueError(problem[1])


# --------------------------------------------------------------------------------------------
# The JSON Schema (draft 2020-12 keywords; the subset the validator below implements:
# type, enum, const, properties, required, additionalProperties, items, minItems, uniqueItems,
# minimum, maximum, exclusiveMinimum, minLength, maxLength, anyOf, and the extension
# x-discriminator/x-variants: an object's variant chosen by one key's value)
# --------------------------------------------------------------------------------------------

_NAME = {"type": "string", "minLength": 1}
_PATHS = {"type": "array", "items": _NAME, "minItems": 1}
_VALUES = {"type": "array", "minItems": 1, "items": {"type": ["string", "number", "boolean"]}}

_CSV_FORMAT = {
    "type": "object",
    "properties": {
        "type": {"const": "csv"},
        "delimiter": {"type": "string", "minLength": 1, "maxLength": 1},
        "quote_char": {"type": ["string", "null"], "minLength": 1, "maxLength": 1},
        "header": {"type": "boolean"},
        "column_names": {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True},
        "missing_values": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["type"],
    "additionalProperties": False,
}
_OTHER_FORMAT = lambda name: {  # noqa: E731
    "type": "object", "properties": {"type": {"const": name}}, "required": ["type"],
    "additionalProperties": False}

_CATEGORICAL = {
    "type": "object",
    "properties": {
        "name": _NAME, "type": {"const": "categorical"},
        "min_count": {"type": "integer", "minimum": 1},
        "max_size": {"type": "integer", "minimum": 1},
        # Hash ids are int32: preprocessing.Preprocessing requires num_buckets < 2**31.
        "num_buckets": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "missing": {"enum": ["value", "error"]},
    },
    "required": ["name", "type"],
    "additionalProperties": False,
}
_NUMERIC = {
    "type": "object",
    "properties": {
        "name": _NAME, "type": {"const": "numeric"},
        "transform": {"enum": list(NUMERIC_TRANSFORMS)},
        # Boundaries come from np.linspace(..., buckets) over the distinct values sampled
        # (prepare.QUANTILE_SAMPLE_SIZE = 100,000 of them): more buckets than that add no cut
        # point, and a count like 2**40 would fail (MemoryError) only after the first pass. Bucket
        # ids are embedded: 2**16 rows is already far finer than a quantile bucketing needs.
        "buckets": {"type": "integer", "minimum": 0, "maximum": 2**16},
        "missing": {"anyOf": [
            {"enum": ["error", "indicator"]},
            {"type": "object", "properties": {"fill": {"type": "number"}}, "required": ["fill"],
             "additionalProperties": False}],
            "x-expected": "'error', 'indicator' or {\"fill\": <number>}"},
    },
    "required": ["name", "type"],
    "additionalProperties": False,
}
_TASK = {
    "type": "object",
    "properties": {
        "name": _NAME, "label_column": _NAME,
        "kind": {"enum": list(TASK_KINDS)},
        "positive_values": _VALUES,
        "negative_values": _VALUES,
        "threshold": {"type": "number"},
        "depends_on": _NAME,
        "missing": {"enum": ["error", "mask"]},
    },
    "required": ["name", "label_column"],
    "additionalProperties": False,
}

SPEC_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "apem-jax dataset spec",
    "type": "object",
    "properties": {
        "format": {"anyOf": [
            {"enum": list(FORMATS)},
            {"type": "object", "x-discriminator": "type", "x-variants": {
                "csv": _CSV_FORMAT, "parquet": _OTHER_FORMAT("parquet"),
                "tfrecord": _OTHER_FORMAT("tfrecord")}}],
            "x-expected": f"one of {list(FORMATS)} or an object with 'type'"},
        "splits": {"type": "object",
                   "properties": {s: _PATHS for s in SPLITS},
                   "required": list(SPLITS), "additionalProperties": False},
        "files": _PATHS,
        "split": {"type": "object",
                  "properties": {
                      "split_column": _NAME,
                      "values": {"type": "object",
                                 "properties": {s: {"type": "array", "items": _NAME,
                                                    "minItems": 1} for s in SPLITS},
                                 "additionalProperties": False},
                      "hash_column": _NAME,
                      "fractions": {"type": "object",
                                    "properties": {s: {"type": "number", "minimum": 0,
                                                       "maximum": 1} for s in SPLITS},
                                    "required": list(SPLITS), "additionalProperties": False},
                  },
                  "additionalProperties": False},
        "features": {"type": "array", "minItems": 1, "items": {
            "type": "object", "x-discriminator": "type",
            "x-variants": {"categorical": _CATEGORICAL, "numeric": _NUMERIC}}},
        "weight_column": _NAME,
        "tasks": {"type": "array", "minItems": 1, "items": _TASK},
        # "" too: the unnamed last column of CSV lines that end with the delimiter.
        "ignore": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "inconsistent_funnel": {"enum": list(INCONSISTENT_FUNNEL_POLICIES)},
    },
    "required": ["format", "features", "tasks"],
    "additionalProperties": False,
}

_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, name: str) -> bool:
  if name == "integer":
    return isinstance(value, int) and not isinstance(value, bool)
  if name == "number":
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, _JSON_TYPES[name])


def _json(value: Any) -> str:
  """A value as the user wrote it (Python repr for strings, as in the examples: 'x')."""
  return repr(value) if isinstance(value, str) else json.dumps(value)


def _join(path: str, key: str | int) -> str:
  if isinstance(key, int):
    return f"{path}[{key}]"
  return f"{path}.{key}" if path else key


def schema_errors(value: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
  """Every violation of ``schema`` by ``value``, each ``'<key path>: <what is wrong>'`` (the
  first is the one to report; later ones may follow from it)."""
  where = path or "(top level)"
  if "anyOf" in schema:
    branches = [schema_errors(value, s, path) for s in schema["anyOf"]]
    if any(not b for b in branches):
      return []
    # The branch that got furthest (its type matched: its errors are about nested keys) says most.
    for sub, errs in zip(schema["anyOf"], branches):
      if "type" in sub and _type_ok(value, sub["type"]):
        return errs
    return [f"{where}: {_json(value)} is not {schema.get('x-expected', 'valid')}"]
  if "const" in schema and value != schema["const"]:
    return [f"{where}: expected {_json(schema['const'])}, got {_json(value)}"]
  if "enum" in schema and (value not in schema["enum"] or isinstance(value, bool)):
    return [f"{where}: {_json(value)} is not one of {schema['enum']}"]
  if "type" in schema:
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if not any(_type_ok(value, t) for t in types):
      expected = " or ".join(types)
      return [f"{where}: expected {'an' if expected[0] in 'aeiou' else 'a'} {expected}, got "
              f"{_json(value)}"]
    if isinstance(value, float) and not math.isfinite(value):
      # A Python caller's NaN / inf, or a JSON number too large for a float (1e400).
      return [f"{where}: expected a finite number, got {_json(value)}"]
  errors: list[str] = []
  if isinstance(value, str):
    if len(value) < schema.get("minLength", 0):
      errors.append(f"{where}: must not be empty" if schema["minLength"] == 1 else
                    f"{where}: {_json(value)} is shorter than {schema['minLength']} characters")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
      errors.append(f"{where}: {_json(value)} is longer than {schema['maxLength']} "
                    f"character{'s' if schema['maxLength'] > 1 else ''}")
  if _type_ok(value, "number"):
    if "minimum" in schema and value < schema["minimum"]:
      errors.append(f"{where}: {_json(value)} is less than the minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
      errors.append(f"{where}: {_json(value)} is more than the maximum {schema['maximum']}")
  if isinstance(value, list):
    if len(value) < schema.get("minItems", 0):
      errors.append(f"{where}: expected at least {schema['minItems']} item"
                    f"{'s' if schema['minItems'] > 1 else ''}, got {len(value)}")
    if schema.get("uniqueItems"):
      seen = []
      for i, item in enumerate(value):
        if item in seen:
          errors.append(f"{_join(path, i)}: {_json(item)} is listed twice")
        seen.append(item)
    if "items" in schema:
      for i, item in enumerate(value):
        errors += schema_errors(item, schema["items"], _join(path, i))
  if isinstance(value, dict):
    if "x-discriminator" in schema:
      key, variants = schema["x-discriminator"], schema["x-variants"]
      if key not in value:
        return [f"{where}: missing required key {key!r} (one of {list(variants)})"]
      if not isinstance(value[key], str) or value[key] not in variants:
        return [f"{_join(path, key)}: {_json(value[key])} is not one of {list(variants)}"]
      return schema_errors(value, variants[value[key]], path)
    properties = schema.get("properties", {})
    for key in schema.get("required", ()):
      if key not in value:
        errors.append(f"{where}: missing required key {key!r}")
    if schema.get("additionalProperties", True) is False:
      for key in value:
        if key not in properties:
          errors.append(f"{_join(path, key)}: unknown key (known: {sorted(properties)})")
    for key, sub in properties.items():
      if key in value:
        errors += schema_errors(value[key], sub, _join(path, key))
  return errors


# --------------------------------------------------------------------------------------------
# The parsed spec
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FileFormat:
  type: str  # csv | parquet | tfrecord
  delimiter: str = ","
  quote_char: str | None = '"'
  header: bool = True
  column_names: tuple[str, ...] | None = None
  missing_values: tuple[str, ...] = ("",)


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """How one set of files is split: by a column's value, or by a hash."""

  split_column: str | None = None
  values: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (split, accepted values)
  hash_column: str | None = None
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test

  @property
  def by_hash(self) -> bool:
    return self.split_column is None


@dataclasses.dataclass(frozen=True)
class Feature:
  name: str
  type: str  # categorical | numeric
  # categorical
  min_count: int = 1
  max_size: int | None = None
  num_buckets: int | None = None
  # numeric
  transform: str = "none"
  buckets: int = 0
  # 'value' | 'error' (categorical); 'error' | 'fill' | 'indicator' (numeric)
  missing: str = "value"
  fill: float | None = None

  @property
  def hashed(self) -> bool:
    return self.num_buckets is not None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  label_column: str
  kind: str = "binary"
  positive_values: tuple[Any, ...] | None = None
  negative_values: tuple[Any, ...] | None = None
  threshold: float | None = None
  depends_on: str | None = None
  missing: str = "error"  # error | mask

  @property
  def reads_numbers(self) -> bool:
    """Whether the label column is read as a number (else as a string)."""
    return self.kind == "regression" or self.threshold is not None


@dataclasses.dataclass(frozen=True)
class Spec:
  """A validated dataset spec. ``patterns``: ``{split: paths}`` or ``{'all': paths}`` (with
  ``split_rule``); relative paths are taken relative to ``base_dir``."""

  source: str
  base_dir: str
  format: FileFormat
  patterns: tuple[tuple[str, tuple[str, ...]], ...]
  split_rule: SplitRule | None
  features: tuple[Feature, ...]
  tasks: tuple[TaskSpec, ...]
  weight_column: str | None = None
  ignore: tuple[str, ...] = ()
  inconsistent_funnel: str = "error"
  raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def categorical(self) -> tuple[Feature, ...]:
    return tuple(f for f in self.features if f.type == "categorical")

  @property
  def numeric(self) -> tuple[Feature, ...]:
    return tuple(f for f in self.features if f.type == "numeric")

  @property
  def label_columns(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.label_column for t in self.tasks))

  def used_columns(self) -> tuple[str, ...]:
    """Every column the preparation reads, each once (features, labels, weight, split)."""
    cols = [f.name for f in self.features] + list(self.label_columns)
    if self.weight_column:
      cols.append(self.weight_column)
    if self.split_rule is not None:
      cols += [c for c in (self.split_rule.split_column, self.split_rule.hash_column) if c]
    return tuple(dict.fromkeys(cols))

  def roles(self) -> dict[str, str]:
    """Column -> what the spec makes of it (for messages)."""
    roles = {}
    if self.split_rule is not None:
      for c, role in ((self.split_rule.split_column, "the split column"),
                      (self.split_rule.hash_column, "the hash column")):
        if c:
          roles[c] = role
    if self.weight_column:
      roles[self.weight_column] = "the weight column"
    for t in self.tasks:
      roles[t.label_column] = f"the label of task {t.name!r}"
    for f in self.features:
      roles[f.name] = f"a {f.type} feature"
    return roles

  def to_dict(self) -> dict[str, Any]:
    """The spec with every default filled in: what the cache key and metadata record."""
    d = dataclasses.asdict(self)
    d.pop("raw")
    d.pop("source")
    d.pop("base_dir")
    return json.loads(json.dumps(d))


def _fail(source: str, path: str, message: str) -> SpecError:
  return SpecError(f"{source}: {path}: {message}" if path else f"{source}: {message}")


def parse_spec(raw: Any, source: str = "spec.json", base_dir: str = ".") -> Spec:
  """Validates a spec (the parsed JSON) and returns it as a :class:`Spec`.

  Raises:
    SpecError: the first problem, in one line naming ``source`` and the key path.
  """
  errors = schema_errors(raw, SPEC_SCHEMA)
  if errors:
    raise SpecError(f"{source}: {errors[0]}")

  fmt = raw["format"]
  fmt = {"type": fmt} if isinstance(fmt, str) else dict(fmt)
  if fmt.get("header", True) is False and not fmt.get("column_names"):
    raise _fail(source, "format.column_names", "required when format.header is false")
  if fmt.get("header", True) and fmt.get("column_names"):
    raise _fail(source, "format.column_names", "only with \"header\": false (the header "
                "names the columns)")
  file_format = FileFormat(
      type=fmt["type"], delimiter=fmt.get("delimiter", ","),
      quote_char=fmt.get("quote_char", '"'), header=fmt.get("header", True),
      column_names=tuple(fmt["column_names"]) if fmt.get("column_names") else None,
      missing_values=tuple(fmt.get("missing_values", ("",))))
  for key, char in (("delimiter", file_format.delimiter), ("quote_char", file_format.quote_char)):
    if char is not None and (not char.isascii() or char in "\r\n"):
      raise _fail(source, f"format.{key}", f"{char!r}: expected one ASCII character other than a "
                  f"line break (the CSV reader takes no other)")
  if file_format.quote_char is not None and file_format.quote_char == file_format.delimiter:
    raise _fail(source, "format.quote_char", "must differ from the delimiter")

  # Splits.
  has_splits, has_files, has_rule = "splits" in raw, "files" in raw, "split" in raw
  if has_splits and (has_files or has_rule):
    raise _fail(source, "splits" if not has_files else "files",
                "give either 'splits' (files per split) or 'files' with a 'split' rule, not both")
  if not has_splits and not (has_files and has_rule):
    missing = "split" if has_files else "files" if has_rule else "splits"
    raise _fail(source, "", f"missing required key {missing!r} (give either 'splits' with "
                f"train/validation/test files, or 'files' and a 'split' rule)")
  split_rule = None
  if has_splits:
    patterns = tuple((s, tuple(raw["splits"][s])) for s in SPLITS)
  else:
    patterns = (("all", tuple(raw["files"])),)
    rule = raw["split"]
    if "split_column" in rule:
      if "hash_column" in rule or "fractions" in rule:
        raise _fail(source, "split", "give either 'split_column' or 'fractions' (with an "
                    "optional 'hash_column'), not both")
      values = rule.get("values", {})
      accepted = {s: tuple(values.get(s, (s,))) for s in SPLITS}
      seen: dict[str, str] = {}
      for s, vals in accepted.items():
        for v in vals:
          if v in seen:
            raise _fail(source, f"split.values.{s}", f"{v!r} already names split {seen[v]!r}")
          seen[v] = s
      split_rule = SplitRule(split_column=rule["split_column"],
                             values=tuple(accepted.items()))
    else:
      if "values" in rule:
        raise _fail(source, "split.values", "only with 'split_column'")
      if "fractions" not in rule:
        raise _fail(source, "split", "missing required key 'split_column' or 'fractions'")
      fr = rule["fractions"]
      total = sum(fr[s] for s in SPLITS)
      if abs(total - 1.0) > 1e-6:
        raise _fail(source, "split.fractions", f"must add up to 1, got {total:g}")
      for s in SPLITS:
        if fr[s] <= 0:
          raise _fail(source, f"split.fractions.{s}", f"must be > 0 (every split needs rows), "
                      f"got {fr[s]}")
      split_rule = SplitRule(hash_column=rule.get("hash_column"),
                             fractions=tuple(float(fr[s]) for s in SPLITS))

  # Features.
  features = []
  for i, f in enumerate(raw["features"]):
    path = f"features[{i}]"
    if f["type"] == "categorical":
      if "num_buckets" in f and ("min_count" in f or "max_size" in f):
        raise _fail(source, path, "num_buckets (hashing) cannot be combined with min_count or "
                    "max_size (a vocabulary)")
      features.append(Feature(f["name"], "categorical", min_count=f.get("min_count", 1),
                              max_size=f.get("max_size"), num_buckets=f.get("num_buckets"),
                              missing=f.get("missing", "value")))
    else:
      buckets = f.get("buckets", 0)
      if buckets == 1:
        raise _fail(source, f"{path}.buckets", "must be 0 (no buckets) or >= 2")
      missing = f.get("missing", "error")
      fill = None
      if isinstance(missing, dict):
        missing, fill = "fill", float(missing["fill"])
      features.append(Feature(f["name"], "numeric", transform=f.get("transform", "none"),
                              buckets=buckets, missing=missing, fill=fill))
  names = [f.name for f in features]
  for i, name in enumerate(names):
    if name in names[:i]:
      raise _fail(source, f"features[{i}].name", f"{name!r} is already features"
                  f"[{names.index(name)}]")
  problem = _feature_name_problem(names)
  if problem is not None:
    raise _fail(source, f"features[{problem[0]}].name", problem[1])
  indicators = {f"{f.name}{INDICATOR_SUFFIX}": f.name for f in features
                if f.missing == "indicator"}

  # Tasks.
  tasks = []
  task_names: list[str] = []
  for i, t in enumerate(raw["tasks"]):
    path = f"tasks[{i}]"
    kind = t.get("kind", "binary")
    if t["name"] in task_names:
      raise _fail(source, f"{path}.name", f"{t['name']!r} is already tasks"
                  f"[{task_names.index(t['name'])}]")
    if kind == "regression":
      for key in ("positive_values", "negative_values", "threshold"):
        if key in t:
          raise _fail(source, f"{path}.{key}", "only for binary tasks")
    if "threshold" in t and ("positive_values" in t or "negative_values" in t):
      raise _fail(source, f"{path}.threshold", "cannot be combined with positive_values")
    if "negative_values" in t and "positive_values" not in t:
      raise _fail(source, f"{path}.negative_values", "only with positive_values")
    # Strings as the data's are compared: without the ASCII whitespace around them.
    pos, neg = [None if t.get(k) is None else
                [v.strip(prep_lib.ASCII_WHITESPACE) if isinstance(v, str) else v for v in t[k]]
                for k in ("positive_values", "negative_values")]
    for key, vals in (("positive_values", pos), ("negative_values", neg)):
      if vals is not None and len({_value_kind(v) for v in vals}) > 1:
        raise _fail(source, f"{path}.{key}", "give all strings, all numbers or all booleans, "
                    f"not a mix ({', '.join(_json(v) for v in vals)})")
    if pos is not None and neg is not None:
      if _value_kind(pos[0]) != _value_kind(neg[0]):
        raise _fail(source, f"{path}.negative_values", "must be strings if positive_values are "
                    "strings, numbers if they are numbers, booleans if booleans")
      both = [v for v in pos if v in neg]
      if both:
        raise _fail(source, f"{path}.negative_values", f"{_json(both[0])} is also a positive "
                    f"value")
    depends_on = t.get("depends_on")
    if depends_on is not None:
      if depends_on not in task_names:
        raise _fail(source, f"{path}.depends_on", f"{depends_on!r} must name an earlier task "
                    f"(earlier: {task_names})")
      if kind != "binary" or tasks[task_names.index(depends_on)].kind != "binary":
        raise _fail(source, f"{path}.depends_on", "a funnel step and the step it depends on "
                    "must both be binary tasks")
    tasks.append(TaskSpec(
        t["name"], t["label_column"], kind,
        positive_values=tuple(pos) if pos is not None else None,
        negative_values=tuple(neg) if neg is not None else None,
        threshold=float(t["threshold"]) if "threshold" in t else None,
        depends_on=depends_on, missing=t.get("missing", "error")))
    task_names.append(t["name"])
  for i, t in enumerate(tasks):
    if t.label_column in names:
      raise _fail(source, f"tasks[{i}].label_column", f"{t.label_column!r} is also a feature "
                  f"(features[{names.index(t.label_column)}]): a label cannot be an input")
  task_columns = {t.label_column: t for t in tasks}
  for t in tasks:
    other = task_columns[t.label_column]
    if other.reads_numbers != t.reads_numbers:
      raise _fail(source, "tasks", f"tasks {other.name!r} and {t.name!r} read column "
                  f"{t.label_column!r} both as a number and as a category value")

  # The other columns.
  weight = raw.get("weight_column")
  labels = {t.label_column for t in tasks}
  if weight is not None and (weight in names or weight in labels):
    raise _fail(source, "weight_column", f"{weight!r} is already a feature or a label")
  if split_rule is not None:
    key = "split.split_column" if split_rule.split_column else "split.hash_column"
    column = split_rule.split_column or split_rule.hash_column
    if column is not None:
      if column in labels or column == weight:
        raise _fail(source, key, f"{column!r} is already a label or the weight column")
      if split_rule.split_column and column in names:
        raise _fail(source, key, f"{column!r} is also a feature: a split column is not an input")
      numeric_names = [f.name for f in features if f.type == "numeric"]
      if column in numeric_names:
        raise _fail(source, key, f"{column!r} is a numeric feature; hash a categorical or an "
                    f"ignored column")
  ignore = tuple(raw.get("ignore", ()))
  used = set(names) | labels | {weight} | (
      {split_rule.split_column, split_rule.hash_column} if split_rule else set())
  for i, column in enumerate(ignore):
    if column in used:
      raise _fail(source, f"ignore[{i}]", f"{column!r} is used by the spec; it cannot also be "
                  f"ignored")
  for name, of in indicators.items():
    if name in used or name in ignore:
      raise _fail(source, "features", f"the missing-value indicator of {of!r} is named "
                  f"{name!r}, which is also a column of the spec; rename one")
  return Spec(source=source, base_dir=base_dir, format=file_format, patterns=patterns,
              split_rule=split_rule, features=tuple(features), tasks=tuple(tasks),
              weight_column=weight, ignore=ignore,
              inconsistent_funnel=raw.get("inconsistent_funnel", "error"), raw=raw)


@dataclasses.dataclass(frozen=True)
class _NotJson:
  """What ``json.loads`` makes of the literals ``NaN``, ``Infinity``, ``-Infinity``, so that
  :func:`load_spec` can name the key that holds one."""

  literal: str


def _value_kind(value: Any) -> str:
  """A label value's kind: booleans are not numbers here (``[true, 2]`` is a mix)."""
  return ("boolean" if isinstance(value, bool) else "string" if isinstance(value, str) else
          "number")


class _Repeated(dict):
  """A JSON object in which a key appears twice (``repeated``: the first such key)."""
  repeated: str = ""


def _object(pairs: list[tuple[str, Any]]) -> dict:
  """``json`` object hook: a dict, a :class:`_Repeated` when a key is given twice."""
  value = dict(pairs)
  if len(value) == len(pairs):
    return value
  seen = set()
  repeated = _Repeated(value)
  repeated.repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
  return repeated


def _find(value: Any, pick, path: str = "") -> tuple[str, Any] | None:
  """(key path, ``pick(node)``) of the first node of a parsed spec for which ``pick`` gives
  something other than None, or None."""
  here = pick(value)
  if here is not None:
    return path, here
  items = value.items() if isinstance(value, dict) else (
      enumerate(value) if isinstance(value, list) else ())
  for key, item in items:
    found = _find(item, pick, _join(path, key))
    if found is not None:
      return found
  return None


def load_spec(path: str | os.PathLike) -> Spec:
  """Reads and validates a spec file. Raises :class:`SpecError` (one line) if it is missing, is
  not JSON (``NaN``, ``Infinity`` and ``-Infinity``, which Python's ``json`` would read, included),
  or fails validation."""
  path = os.fspath(path)
  try:
    with _open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except (FileNotFoundError, OSError) as e:
    if _is_remote(path) or not os.path.exists(path):
      raise SpecError(f"{path}: the spec file does not exist") from e
    raise SpecError(f"{path}: cannot read the spec file: {e}") from e
  except UnicodeDecodeError as e:
    raise SpecError(f"{path}: not UTF-8 text: {e}") from e
  try:
    raw = json.loads(text, parse_constant=_NotJson, object_pairs_hook=_object)
  except json.JSONDecodeError as e:
    raise SpecError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
  repeated = _find(raw, lambda node: node.repeated if isinstance(node, _Repeated) else None)
  if repeated is not None:
    raise SpecError(f"{path}: {_join(*repeated)}: the key is given twice (JSON keeps the last "
                    f"one); give it once")
  found = _find(raw, lambda node: node.literal if isinstance(node, _NotJson) else None)
  if found is not None:
    raise SpecError(f"{path}: {found[0] or '(top level)'}: {found[1]} is not a JSON number "
                    f"(JSON has no NaN or Infinity); write a finite number")
  base = os.path.dirname(path) if not _is_remote(path) else path.rsplit("/", 1)[0]
  return parse_spec(raw, source=path, base_dir=base or ".")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_remote(path: str) -> bool:
  return bool(_REMOTE.match(path))


def _gfile():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


def _open(path: str, mode: str = "rb"):
  """A local file with ``open``, a ``scheme://`` one with ``tf.io.gfile.GFile``."""
  if _is_remote(path):
    return _gfile().GFile(path, mode)
  return open(path, mode)  # pylint: disable=unspecified-encoding


@dataclasses.dataclass(frozen=True)
class FileInfo:
  """A file and what its cache fingerprint is made of."""

  path: str
  size: int
  mtime_ns: int


def stat(path: str) -> FileInfo:
  if _is_remote(path):
    s = _gfile().stat(path)
    return FileInfo(path, int(s.length), int(s.mtime_nsec))
  s = os.stat(path)
  return FileInfo(path, int(s.st_size), int(s.st_mtime_ns))


def _expand(pattern: str, base_dir: str) -> list[str]:
  if _is_remote(pattern):
    full = pattern
  else:
    full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(pattern)))
  if _GLOB_CHARS.search(pattern):
    found = _gfile().glob(full) if _is_remote(full) else glob_lib.glob(full)
    files = sorted(p for p in found if (_is_remote(p) or os.path.isfile(p)))
    if not files:
      raise FileNotFoundError(f"no file matches {pattern!r}"
                              + (f" (looked for {full})" if full != pattern else ""))
    return files
  exists = _gfile().exists(full) if _is_remote(full) else os.path.isfile(full)
  if not exists:
    what = "is a directory, not a file" if not _is_remote(full) and os.path.isdir(full) else (
        "does not exist")
    raise FileNotFoundError(f"{pattern!r} {what}" + (f" ({full})" if full != pattern else ""))
  return [full]


def resolve_files(spec: Spec) -> dict[str, tuple[FileInfo, ...]]:
  """``{split: files}`` (or ``{'all': files}``): patterns expanded, each file stat-ed.

  Raises:
    SpecError: a path that does not exist, a glob that matches nothing, or a file in two splits.
  """
  out: dict[str, tuple[FileInfo, ...]] = {}
  owner: dict[str, str] = {}
  for split, patterns in spec.patterns:
    files: list[str] = []
    for i, pattern in enumerate(patterns):
      key = f"splits.{split}[{i}]" if split != "all" else f"files[{i}]"
      try:
        expanded = _expand(pattern, spec.base_dir)
      except FileNotFoundError as e:
        raise SpecError(f"{spec.source}: {key}: {e}") from e
      for path in expanded:
        if path in owner:
          raise SpecError(f"{spec.source}: {key}: {path} is also matched by {owner[path]}: "
                          f"a file belongs to one split")
        owner[path] = key
        files.append(path)
    out[split] = tuple(stat(p) for p in files)
  return out
