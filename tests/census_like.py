"""Small files in the raw UCI Census-Income format, written by the tests, so that parsing, the
TFDS builder and the raw-file-to-SavedModel path run on any machine without the real data."""

import pathlib

import numpy as np

from apem_jax.data import census_source as cs

_EDUCATION = sorted(cs.COLLEGE_DEGREES) + ["Children", "High school graduate",
                                            "Some college but no degree"]
_MARITAL = [cs.NEVER_MARRIED, "Married-civilian spouse present", "Divorced", "Widowed"]


def census_like_lines(num_rows: int, seed: int) -> list[str]:
  """``num_rows`` lines in the raw Census-Income format (42 comma+space separated columns, real
  label spellings, a few values per categorical column, about 1 in 8 incomes above 50K)."""
  rng = np.random.default_rng(seed)
  columns = []
  for col in cs.COLUMNS:
    if col == cs.LABEL_COLUMN:
      values = np.where(rng.random(num_rows) < 0.125, cs.INCOME_POSITIVE, cs.INCOME_NEGATIVE)
    elif col == cs.WEIGHT_COLUMN:
      values = [f"{w:.2f}" for w in rng.uniform(100, 5000, num_rows)]
    elif col in cs.NUMERIC_COLUMNS:
      values = rng.integers(0, 90, num_rows).astype(str)
    else:
      choices = {"education": _EDUCATION, "marital_stat": _MARITAL}.get(
          col, [f"{col[:6]} {k}" for k in range(int(rng.integers(2, 7)))])
      values = rng.choice(choices, num_rows)
    columns.append(values)
  return [", ".join(row) + "\n" for row in zip(*columns)]


def write_census_like(data_dir: pathlib.Path, num_train: int, num_test: int) -> pathlib.Path:
  """Writes ``<data_dir>/census_income/raw/{train,test}.csv`` as :func:`census_like_lines`."""
  raw = cs.raw_dir(data_dir)
  raw.mkdir(parents=True)
  (raw / "train.csv").write_text("".join(census_like_lines(num_train, seed=0)))
  (raw / "test.csv").write_text("".join(census_like_lines(num_test, seed=1)))
  return data_dir
