"""How fast does ``apem-data prepare`` turn a user's files into training shards?

  python benchmarks/prepare_rate.py                      # 1,000,000 rows, CSV and Parquet
  python benchmarks/prepare_rate.py --rows 200000 --formats csv --dir /tmp/rate

Generates (NumPy + pyarrow, seeded) a CSV and a Parquet file of ``--rows`` Census-width rows:
32 string categorical columns (2 to 52 distinct values each, values like Census's: 8 to 40
characters), 7 numeric columns (ages, wages, capital gains... mostly-zero heavy-tailed ones
included), 2 binary label columns (a funnel: ``conversion`` only where ``click``) and nothing
else; then prepares each with a spec like Census's (32 vocabulary features, 7 numeric features
bucketed at 32 quantiles, two funnel tasks, an 80/10/10 hash split by row), each in a fresh
process (so that its peak RSS is its own) and a fresh cache directory, and prints a markdown table:
rows per second of pass 1 (fit), pass 2 (encode + write shards) and the whole preparation
(``prepare()`` from the spec's validation to the cache directory renamed into place), and the
process's peak RSS (``machine.peak_rss_mb``: its own ``VmHWM``).

The issue's target: >= 200,000 rows/s for 40-column Census-width rows on the 2-core development
machine. The numbers depend on what else the machine runs: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import arguments  # noqa: E402  (benchmarks/arguments.py)
import machine  # noqa: E402  (benchmarks/machine.py)

NUM_CATEGORICAL, NUM_NUMERIC = 32, 7
_WORDS = ("Not in universe", "Private", "Self-employed", "Married-civilian spouse present",
          "Never married", "High school graduate", "Some college but no degree", "Nonfiler",
          "Householder", "Child <18 never marr not in subfamily", "Native- Born in the United "
          "States", "Full-time schedules", "Children or Armed Forces", "Midwest", "South",
          "White", "Black", "Female", "Male", "Other service", "Manufacturing-durable goods")


def _vocabulary(j: int, rng: np.random.Generator) -> np.ndarray:
  size = int(rng.integers(2, 53))
  words = rng.choice(_WORDS, size)
  lengths = rng.integers(4, 25, size)  # Census's values: 12 characters on average
  return np.array([f"{i}:{w}"[:k] for i, (w, k) in enumerate(zip(words, lengths))])


def generate(rows: int, directory: str, seed: int = 0) -> dict[str, str]:
  """Writes ``census_like.csv`` and ``census_like.parquet`` (same rows); returns their paths."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.csv as pa_csv  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  columns = {}
  for j in range(NUM_CATEGORICAL):
    vocab = _vocabulary(j, rng)
    p = rng.dirichlet(np.full(len(vocab), 0.5))
    columns[f"cat_{j:02d}"] = pa.DictionaryArray.from_arrays(
        pa.array(rng.choice(len(vocab), rows, p=p).astype(np.int32)), pa.array(vocab))
  zero_heavy = lambda scale: np.where(rng.random(rows) < 0.9, 0.0,  # noqa: E731
                                      np.round(rng.lognormal(np.log(scale), 1.0, rows)))
  numeric = {
      "age": rng.integers(0, 91, rows).astype(np.float64),
      "wage_per_hour": zero_heavy(800),
      "capital_gains": zero_heavy(5000),
      "capital_losses": zero_heavy(1500),
      "dividends_from_stocks": zero_heavy(1000),
      "num_persons_worked_for_employer": rng.integers(0, 7, rows).astype(np.float64),
      "weeks_worked_in_year": rng.integers(0, 53, rows).astype(np.float64),
  }
  columns.update({k: pa.array(v) for k, v in numeric.items()})
  click = rng.random(rows) < 0.2
  columns["click"] = pa.array(click.astype(np.int64))
  columns["conversion"] = pa.array((click & (rng.random(rows) < 0.3)).astype(np.int64))
  table = pa.table(columns)
  paths = {"csv": os.path.join(directory, "census_like.csv"),
           "parquet": os.path.join(directory, "census_like.parquet")}
  pa_csv.write_csv(table, paths["csv"],
                   write_options=pa_csv.WriteOptions(quoting_style="needed"))
  pq.write_table(table, paths["parquet"])
  return paths


def spec_for(path: str, fmt: str) -> dict:
  features = [{"name": f"cat_{j:02d}", "type": "categorical"} for j in range(NUM_CATEGORICAL)]
  features += [{"name": n, "type": "numeric", "buckets": 32} for n in (
      "age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
      "num_persons_worked_for_employer", "weeks_worked_in_year")]
  return {"format": fmt, "files": [path],
          "split": {"fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}},
          "features": features,
          "tasks": [{"name": "click", "label_column": "click"},
                    {"name": "conversion", "label_column": "conversion", "depends_on": "click"}]}


def run_one(spec_path: str, cache_root: str) -> dict:
  """Prepares in this process; returns timings and peak RSS."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  usage = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  result = prepare.prepare(spec_path, cache_root)
  total = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  cpu = after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime
  t = result.metadata["timing"]
  rows = sum(s["rows"] for s in result.metadata["splits"].values())
  return {"rows": rows, "pass1_rows": t["pass1_rows"], "pass1_seconds": t["pass1_seconds"],
          "pass2_rows": t["pass2_rows"], "pass2_seconds": t["pass2_seconds"],
          "total_seconds": total, "cpu_seconds": cpu, "reused": result.reused,
          "peak_rss_mib": machine.peak_rss_mb(),
          "shard_bytes": sum(os.path.getsize(os.path.join(result.path, f))
                             for f in os.listdir(result.path) if f.endswith(".tfrecord"))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", type=arguments.at_least(1), default=1_000_000)
  parser.add_argument("--formats", type=arguments.names(("csv", "parquet")), default="csv,parquet")
  parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
  parser.add_argument("--run", default=None, help=argparse.SUPPRESS)   # internal: spec path
  parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)  # internal
  args = parser.parse_args()
  if args.run:
    print(json.dumps(run_one(args.run, args.cache)))
    return
  directory = args.dir or tempfile.mkdtemp(prefix="prepare_rate_")
  if not args.dir:  # its generated files and caches go, also when a preparation fails
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
  os.makedirs(directory, exist_ok=True)
  start = time.perf_counter()
  paths = generate(args.rows, directory)
  print(f"generated {args.rows:,} rows in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{os.path.basename(p)} {os.path.getsize(p) / 2**20:.0f} MiB"
                    for p in paths.values()), flush=True)
  load = os.getloadavg()[0]
  results = {}
  for fmt in args.formats:
    spec_path = os.path.join(directory, f"spec_{fmt}.json")
    with open(spec_path, "w") as f:
      json.dump(spec_for(os.path.basename(paths[fmt]), fmt), f, indent=1)
    cache = tempfile.mkdtemp(prefix=f"cache_{fmt}_", dir=directory)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", spec_path,
                          "--cache", cache], capture_output=True, text=True)
    if out.returncode:  # its stderr's tail, then what failed
      sys.stderr.write(out.stderr[-4000:])
      sys.exit(f"{parser.prog}: error: preparing {paths[fmt]} failed (exit "
               f"{out.returncode}; its stderr above)")
    results[fmt] = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"\nload average before the runs: {load:.2f} on {os.cpu_count()} CPUs; CPU s: user + system "
        f"time of the preparing process (all its threads)\n")
  print(f"| input ({args.rows:,} rows, 41 columns) | pass 1 rows/s | pass 2 rows/s | total rows/s "
        f"| total s | CPU s | peak RSS MiB | shards MiB |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for fmt, r in results.items():
    size = os.path.getsize(paths[fmt]) / 2**20
    print(f"| {fmt} ({size:.0f} MiB, {size * 2**20 / args.rows:.0f} B/row) | {r['pass1_rows'] / r['pass1_seconds']:,.0f} | "
          f"{r['pass2_rows'] / r['pass2_seconds']:,.0f} | {r['rows'] / r['total_seconds']:,.0f} | "
          f"{r['total_seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['peak_rss_mib']:,.0f} | {r['shard_bytes'] / 2**20:,.0f} |")


if __name__ == "__main__":
  main()
