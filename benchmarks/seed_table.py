"""Sweeps compared seed by seed: mean and sample std, over the seeds every sweep holds, of one test
metric per task (and of each run's best validation score, where the runs are at hand).

  D=docs/results/funnel_optimizers R=runs/funnel_optimizers
  python benchmarks/seed_table.py --metric oracle_gap \
      before=$D/same/funnel_runs.json@$R/same/funnel \
      after=$D/lazy_adam_l2/funnel_runs.json@$R/lazy_adam_l2/funnel

Each ``NAME=RECORD[@RUNS]`` is one sweep: ``RECORD`` is the ``<dataset>_runs.json`` that
``benchmarks/quality.py`` writes beside its table (run name ``<model>[/<balancing>]/seed<k>``
``[/p<corr>][/<mode>]`` -> test metrics); ``RUNS``, its ``--runs``/``<dataset>`` directory, adds
the validation score from each run's ``metrics.json``. A row is a run name less its ``/seed<k>``
(``apem/cagrad/seed0/p0.5`` is row ``apem/cagrad/p0.5``); it is compared over the seeds that every
sweep holds for it (``--seeds`` narrows them, e.g. ``--seeds 1,2,3,4``). Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np

_SEED = re.compile(r"^(?P<row>.+?)/seed(?P<seed>\d+)(?P<suffix>(/.*)?)$")


class Unusable(Exception):
  """The sweeps cannot give the table asked for (reported as a usage error)."""


def mean_std(values: list[float], digits: int) -> str:
  """``mean ± sample std`` (the mean alone for one value)."""
  if len(values) < 2:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def seeds_by_row(record: dict) -> dict[str, dict[int, str]]:
  """``{row: {seed: run name}}`` of a record's run names ``<prefix>/seed<k>[<suffix>]``, whose
  row is ``<prefix><suffix>``."""
  rows: dict[str, dict[int, str]] = {}
  for name in record:
    match = _SEED.match(name)
    if match:
      rows.setdefault(match["row"] + match["suffix"], {})[int(match["seed"])] = name
  return rows


def validation_score(runs: str, name: str) -> float:
  with open(os.path.join(runs, name, "metrics.json")) as f:
    return json.load(f)["best_validation_score"]


def table(sweeps: list[tuple[str, str, str | None]], metric: str, seeds: set[int] | None = None,
          tasks: list[str] | None = None, digits: int = 4) -> str:
  """Markdown: a row per row name every sweep holds, columns ``seeds``, then (when every sweep
  has its runs) the validation score of each sweep, then ``metric`` of each task (``tasks``, or
  every task of the record holding it) for each sweep. Raises ``Unusable`` when no row has a seed
  every sweep holds, or a task or the metric is missing."""
  records = []
  for _, record_path, _ in sweeps:
    with open(record_path) as f:
      records.append(json.load(f))
  held = [seeds_by_row(r) for r in records]
  rows = [row for row in held[0] if all(row in h for h in held[1:])]
  with_validation = all(runs for _, _, runs in sweeps)
  names = [name for name, _, _ in sweeps]
  header = ["row", "seeds"]
  if with_validation:
    header += [f"validation score, {n}" for n in names]
  lines = []
  for row in rows:
    common = sorted(set.intersection(*(set(h[row]) for h in held)) & (seeds or set(range(10**6))))
    if not common:
      continue
    tests = [(n, r[h[row][k]]["test"]) for n, r, h in zip(names, records, held) for k in common]
    tasks = tasks or [t for t in tests[0][1] if metric in tests[0][1][t]]  # the record's order
    if not tasks:
      raise Unusable(f"--metric {metric!r}: no task of row {row!r} in sweep {names[0]!r} has it; "
                     f"its metrics: {sorted({m for v in tests[0][1].values() for m in v})}")
    for n, test in tests:
      for t in tasks:
        if t not in test:
          raise Unusable(f"--tasks: sweep {n!r} has no task {t!r} in row {row!r}; its tasks: "
                         f"{list(test)}")
        if metric not in test[t]:
          raise Unusable(f"--metric {metric!r}: task {t!r} of row {row!r} in sweep {n!r} has "
                         f"only {list(test[t])}")
    cells = [row, str(len(common))]
    if with_validation:
      cells += [mean_std([validation_score(runs, h[row][k]) for k in common], digits)
                for (_, _, runs), h in zip(sweeps, held)]
    cells += [mean_std([r[h[row][k]]["test"][t][metric] for k in common], digits)
              for t in tasks for r, h in zip(records, held)]
    lines.append("| " + " | ".join(cells) + " |")
  if not lines:
    raise Unusable("no row has a seed that every sweep holds" +
                   (f" among --seeds {sorted(seeds)}" if seeds else "") + ": " +
                   "; ".join(f"{n} holds " + (", ".join(f"{row} (seeds {sorted(h[row])})"
                                                         for row in h) or "no run")
                             for n, h in zip(names, held)))
  header += [f"{t} {metric}, {n}" for t in tasks for n in names]
  return "\n".join(["| " + " | ".join(header) + " |",
                    "|---|---:|" + "---|" * (len(header) - 2)] + lines)


def sweep(arg: str) -> tuple[str, str, str | None]:
  """``NAME=RECORD[@RUNS]`` -> (name, record path, runs directory or None)."""
  name, sep, rest = arg.partition("=")
  record, _, runs = rest.partition("@")
  if not sep or not name or not os.path.isfile(record) or (runs and not os.path.isdir(runs)):
    raise argparse.ArgumentTypeError(
        f"{arg!r}: expected NAME=RECORD[@RUNS], RECORD an existing <dataset>_runs.json and RUNS "
        f"an existing directory of its runs")
  return name, record, runs or None


def seed_list(arg: str) -> set[int]:
  try:
    return {int(s) for s in arg.split(",")}
  except ValueError:
    raise argparse.ArgumentTypeError(f"--seeds {arg!r}: expected comma-separated integers")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("sweeps", nargs="+", type=sweep, metavar="NAME=RECORD[@RUNS]")
  parser.add_argument("--metric", default="auc", help="test metric per task (default auc)")
  parser.add_argument("--seeds", type=seed_list, default=None, help="e.g. 1,2,3,4")
  parser.add_argument("--tasks", type=lambda a: a.split(","), default=None,
                      help="the tasks' columns in this order (default: every task, record order)")
  parser.add_argument("--digits", type=int, default=4)
  args = parser.parse_args()
  try:
    print(table(args.sweeps, args.metric, args.seeds, args.tasks, args.digits))
  except Unusable as e:
    parser.error(str(e))


if __name__ == "__main__":
  main()
