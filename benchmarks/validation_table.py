"""Variants compared on the validation split only: mean and spread over seeds of each run's best
validation score (what the trainer selects on) and per-task validation AUC (MSE for a regression
task) at that checkpoint.

  python benchmarks/validation_table.py default=runs/balancing/census/apem/fixed \
      field_ffn=runs/ablation5/field_ffn/census/apem

Each ``NAME=DIR`` is one variant: the runs are the ``metrics.json`` under ``DIR/seed*/``, at any
depth (``seed0/metrics.json``, or ``seed0/p0.5/metrics.json`` as benchmarks/quality.py lays out a
synthetic sweep). A run that has not finished (no ``eval/test.json`` beside it) is left out and
counted. The test split is not read: this is the table that chooses defaults. Prints markdown.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np


def run_paths(directory: str) -> list[str]:
  """Each run's metrics.json under ``directory/seed*/``, at any depth."""
  return sorted(glob.glob(os.path.join(directory, "seed*", "**", "metrics.json"), recursive=True))


def finished_runs(directory: str) -> dict[str, tuple[list[dict], int]]:
  """``{where: (metrics.json of each finished run, how many are unfinished)}`` under
  ``directory/seed*``, by where a run lies below its seed directory (``""``, or ``p0.5`` for
  ``seed0/p0.5/metrics.json``): runs of several cells of a sweep are never pooled."""
  cells: dict[str, tuple[list[dict], int]] = {}
  for path in run_paths(directory):
    seed_dir = os.path.relpath(os.path.dirname(path), directory).split(os.sep)
    runs, unfinished = cells.get(os.sep.join(seed_dir[1:]), ([], 0))
    if os.path.exists(os.path.join(os.path.dirname(path), "eval", "test.json")):
      with open(path) as f:
        runs.append(json.load(f))
    else:
      unfinished += 1
    cells[os.sep.join(seed_dir[1:])] = (runs, unfinished)
  return cells


def mean_std(values: list[float]) -> str:
  if len(values) < 2:
    return f"{values[0]:.5f}" if values else "-"
  return f"{np.mean(values):.5f} ± {np.std(values, ddof=1):.5f}"


def table(variants: list[tuple[str, str]]) -> str:
  rows = {}
  for name, directory in variants:
    cells = finished_runs(directory)
    rows.update({f"{name} {where}" if len(cells) > 1 else name: runs
                 for where, runs in sorted(cells.items())})
  tasks = sorted({t for runs, _ in rows.values() for r in runs for t in r["best_validation"]})
  # auc where the task has it, else mse (a regression task).
  metric = {t: "auc" if any("auc" in r["best_validation"].get(t, {}) for runs, _ in rows.values()
                            for r in runs) else "mse" for t in tasks}
  header = ["variant", "runs", "validation score"] + [f"{t} {metric[t].upper()}" for t in tasks]
  lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * len(tasks)]
  for name, (runs, unfinished) in rows.items():
    count = f"{len(runs)}" + (f" (+{unfinished} unfinished)" if unfinished else "")
    cells = [mean_std([r["best_validation_score"] for r in runs])]
    cells += [mean_std([r["best_validation"][t][metric[t]] for r in runs
                        if t in r["best_validation"]]) for t in tasks]
    lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def variant(arg: str) -> tuple[str, str]:
  """``NAME=DIR`` -> (name, directory)."""
  name, sep, directory = arg.partition("=")
  if not sep or not name or not os.path.isdir(directory):
    raise argparse.ArgumentTypeError(f"{arg!r}: expected NAME=DIR with DIR an existing directory "
                                     f"of seed*/ runs")
  if not run_paths(directory):
    raise argparse.ArgumentTypeError(f"{arg!r}: no run (seed*/.../metrics.json) under "
                                     f"{directory}")
  return name, directory


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("variants", nargs="+", type=variant, metavar="NAME=DIR")
  print(table(parser.parse_args().variants))


if __name__ == "__main__":
  main()
