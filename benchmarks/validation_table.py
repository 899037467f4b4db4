"""Variants compared on the validation split only: mean and spread over seeds of each run's best
validation score (what the trainer selects on) and per-task validation AUC at that checkpoint.

  python benchmarks/validation_table.py default=runs/balancing/census/apem/fixed \
      field_ffn=runs/ablation5/field_ffn/census/apem

Each ``NAME=DIR`` is one variant: the runs are ``DIR/seed*/metrics.json`` (as benchmarks/quality.py
lays them out). A run that has not finished (no ``eval/test.json`` beside it) is left out and
counted. The test split is not read: this is the table that chooses defaults. Prints markdown.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np


def finished_runs(directory: str) -> tuple[list[dict], int]:
  """(metrics.json of each finished run under ``directory/seed*``, how many are unfinished)."""
  runs, unfinished = [], 0
  for path in sorted(glob.glob(os.path.join(directory, "seed*", "metrics.json"))):
    if os.path.exists(os.path.join(os.path.dirname(path), "eval", "test.json")):
      with open(path) as f:
        runs.append(json.load(f))
    else:
      unfinished += 1
  return runs, unfinished


def mean_std(values: list[float]) -> str:
  if len(values) < 2:
    return f"{values[0]:.5f}" if values else "-"
  return f"{np.mean(values):.5f} ± {np.std(values, ddof=1):.5f}"


def table(variants: list[tuple[str, str]]) -> str:
  rows = {name: finished_runs(directory) for name, directory in variants}
  tasks = sorted({t for runs, _ in rows.values() for r in runs for t in r["best_validation"]})
  lines = ["| variant | runs | validation score | " + " | ".join(f"{t} AUC" for t in tasks) +
           " |", "|---|---:|---:|" + "---:|" * len(tasks)]
  for name, (runs, unfinished) in rows.items():
    count = f"{len(runs)}" + (f" (+{unfinished} unfinished)" if unfinished else "")
    cells = [mean_std([r["best_validation_score"] for r in runs])]
    cells += [mean_std([r["best_validation"][t]["auc"] for r in runs if t in r["best_validation"]])
              for t in tasks]
    lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def variant(arg: str) -> tuple[str, str]:
  """``NAME=DIR`` -> (name, directory)."""
  name, sep, directory = arg.partition("=")
  if not sep or not name or not os.path.isdir(directory):
    raise argparse.ArgumentTypeError(f"{arg!r}: expected NAME=DIR with DIR an existing directory "
                                     f"of seed*/ runs")
  return name, directory


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("variants", nargs="+", type=variant, metavar="NAME=DIR")
  print(table(parser.parse_args().variants))


if __name__ == "__main__":
  main()
