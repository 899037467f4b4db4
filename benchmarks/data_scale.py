"""Does training on your own files scale? Prepare, then train one epoch streamed from the shards.

  python benchmarks/data_scale.py                        # 5,000,000 rows
  python benchmarks/data_scale.py --rows 50000000 --dir /big/disk/scale

Generates (NumPy + pyarrow, seeded, written in 1,000,000-row row groups) a funnel-like Parquet
file of ``--rows`` rows: a user id drawn from ``--user_ids`` (10,000,000) ids (Zipf-like: a
few heavy users, a long tail), an item category (5,000), a country (60), a device (3), price, age
and hour of day, a ``click`` label and a ``purchase`` label only where clicked; an 80/10/10 hash
split by row. Writes a spec (the user id a vocabulary feature unless ``--user_buckets`` hashes
it), prepares it (``prepare.prepare``, in this process), then, each in a fresh process:

* ``pipeline``: the streamed input alone (``StreamedSplits.train_batches``, one epoch of
  ``batch_size`` batches, nothing else): examples/s;
* ``step``: the train step alone, on one batch fed again and again (no input): examples/s;
* ``train``: ``trainer.train_and_evaluate`` for one epoch of a small MMoE (embed_dim 4, 8
  experts of [16], towers [8], row-wise Adagrad for the tables) on the streamed path, with its
  validation pass: training examples/s (steps x batch / the trainer's
  ``train_seconds_this_run``, which includes compiling the step and starting the input, both of
  which the two rates above leave out; validation excluded) and the process's peak RSS
  (``machine.peak_rss_mb``: its own ``VmHWM``; ``ru_maxrss`` would start from this parent's size).

``--reuse`` keeps a ``--dir`` that already holds the Parquet file and its prepared shards: the
preparation is then found, not measured, and only the three processes run.

Prints a markdown table. The numbers depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

import machine  # noqa: E402  (benchmarks/machine.py)

ROW_GROUP = 1_000_000


def generate(path: str, rows: int, user_ids: int, seed: int = 0) -> None:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  writer = None
  countries = np.array([f"c{i:02d}" for i in range(60)])
  devices = np.array(["ios", "android", "web"])
  for start in range(0, rows, ROW_GROUP):
    n = min(ROW_GROUP, rows - start)
    # Zipf-like ids over [0, user_ids): a log-uniform rank, so small ids are frequent.
    user = np.minimum((np.exp(rng.random(n) * np.log(user_ids + 1)) - 1).astype(np.int64),
                      user_ids - 1)
    item = rng.integers(0, 5000, n)
    country = countries[rng.integers(0, len(countries), n)]
    device = devices[rng.integers(0, 3, n)]
    price = rng.exponential(30.0, n)
    age = rng.integers(18, 80, n).astype(np.float64)
    hour = rng.integers(0, 24, n).astype(np.float64)
    logit = (-1.2 + 0.3 * (device == "ios") - 0.01 * (price - 30) + 0.2 * np.sin(hour / 4)
             + 0.4 * ((user % 7) == 0) + 0.3 * ((item % 11) == 0))
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    purchase = click & (rng.random(n) < 1 / (1 + np.exp(-(logit - 1.0))))
    table = pa.table({"user": user, "item": item, "country": country, "device": device,
                      "price": price, "age": age, "hour": hour,
                      "click": click.astype(np.int8), "purchase": purchase.astype(np.int8)})
    if writer is None:
      writer = pq.ParquetWriter(path, table.schema)
    writer.write_table(table, row_group_size=ROW_GROUP)
  writer.close()


def spec_dict(user_buckets: int) -> dict:
  user = {"name": "user", "type": "categorical"}
  if user_buckets:
    user["num_buckets"] = user_buckets
  return {
      "format": "parquet",
      "files": ["events.parquet"],
      "split": {"fractions": {"train": 0.8, "validation": 0.1, "test": 0.1}},
      "features": [user, {"name": "item", "type": "categorical"},
                   {"name": "country", "type": "categorical"},
                   {"name": "device", "type": "categorical"},
                   {"name": "price", "type": "numeric", "transform": "log1p", "buckets": 16},
                   {"name": "age", "type": "numeric", "buckets": 16},
                   {"name": "hour", "type": "numeric"}],
      "tasks": [{"name": "click", "label_column": "click"},
                {"name": "purchase", "label_column": "purchase", "depends_on": "click"}],
  }


def make_config(spec_path: str, data_dir: str, batch_size: int, shuffle_buffer: int):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from apem_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.base_config("mmoe")
  config.model.update(embed_dim=4, num_experts=8, expert_hidden=(16,), tower_hidden=(8,))
  config.data = ml_collections.ConfigDict(dict(name="spec", spec=spec_path, data_dir=data_dir,
                                               shuffle_buffer=shuffle_buffer))
  config.optimizer.embedding_optimizer = "adagrad"
  config.train.update(batch_size=batch_size, eval_batch_size=4 * batch_size, num_epochs=1,
                      progress_bar=False, log_every=100)
  return config


def child(args) -> dict:
  """One measurement in this (fresh) process; returns what it prints."""
  config = make_config(args.spec, args.data_dir, args.batch_size, args.shuffle_buffer)
  out = {}
  if args.child == "pipeline":
    from apem_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    data = pipeline.load_dataset(config.data)
    steps = data.num_examples("train") // args.batch_size
    batches = data.train_batches(args.batch_size, seed=0)
    next(batches)
    start = time.perf_counter()
    for _ in range(steps - 1):
      next(batches)
    out["examples_per_second"] = (steps - 1) * args.batch_size / (time.perf_counter() - start)
  elif args.child == "step":
    import jax  # pylint: disable=g-import-not-at-top
    from apem_jax import trainer  # pylint: disable=g-import-not-at-top
    exp = trainer.Experiment(config)
    batch = exp.device_batch(next(exp.data.train_batches(args.batch_size, seed=0)))
    state = exp.to_train(exp.init_state())
    for _ in range(3):  # compile and warm up
      state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    steps = 50
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    out["examples_per_second"] = steps * args.batch_size / (time.perf_counter() - start)
  elif args.child == "train":
    from apem_jax import trainer  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    summary = trainer.train_and_evaluate(config, args.workdir)
    out["wall_seconds"] = time.perf_counter() - start
    out["steps"] = summary["steps"]
    out["train_seconds"] = summary["train_seconds_this_run"]
    out["examples_per_second"] = summary["steps"] * args.batch_size / summary[
        "train_seconds_this_run"]
    out["validation"] = summary["best_validation"]
    out["num_params"] = summary["num_params"]
  out["max_rss_mb"] = machine.peak_rss_mb()
  return out


def run_child(kind: str, args, spec_path: str, data_dir: str, workdir: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={kind}", f"--spec={spec_path}",
         f"--data_dir={data_dir}", f"--batch_size={args.batch_size}",
         f"--shuffle_buffer={args.shuffle_buffer}", f"--workdir={workdir}"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["process_seconds"] = time.perf_counter() - start
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=5_000_000)
  parser.add_argument("--user_ids", type=int, default=10_000_000)
  parser.add_argument("--user_buckets", type=int, default=0,
                      help="hash the user id into this many buckets (0: a vocabulary)")
  parser.add_argument("--batch_size", type=int, default=4096)
  parser.add_argument("--shuffle_buffer", type=int, default=100_000)
  parser.add_argument("--dir", default=None, help="working directory (default: a temporary one, "
                      "removed at the end)")
  parser.add_argument("--reuse", action="store_true", help="with --dir: keep its Parquet file and "
                      "prepared shards if there (the preparation is not measured)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--data_dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args)))
    return

  root = args.dir or tempfile.mkdtemp(prefix="data_scale-")
  os.makedirs(root, exist_ok=True)
  try:
    parquet = os.path.join(root, "events.parquet")
    spec_path = os.path.join(root, "spec.json")
    data_dir = os.path.join(root, "cache")
    reuse = args.reuse and args.dir and os.path.exists(parquet)
    start = time.perf_counter()
    if not reuse:
      generate(parquet, args.rows, args.user_ids)
      shutil.rmtree(data_dir, ignore_errors=True)
    generate_seconds = time.perf_counter() - start
    with open(spec_path, "w") as f:
      json.dump(spec_dict(args.user_buckets), f)
    from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    prepared = prepare.prepare(spec_path, data_dir)
    prepare_seconds = time.perf_counter() - start
    meta = prepared.metadata
    if meta["splits"]["train"]["rows"] + meta["splits"]["validation"]["rows"] + meta["splits"][
        "test"]["rows"] != args.rows:
      raise SystemExit(f"{root}: holds another number of rows than --rows={args.rows}")
    shard_bytes = sum(os.path.getsize(prepared.path / s["file"])
                      for split in meta["splits"].values() for s in split["shards"])
    prepare_rss = machine.peak_rss_mb()
    with open(prepared.path / "schema.json") as f:
      user_vocab = json.load(f)["categorical"][0]["vocab_size"]
    results = {}
    for kind in ("pipeline", "step", "train"):
      workdir = os.path.join(root, f"run_{kind}")
      shutil.rmtree(workdir, ignore_errors=True)
      results[kind] = run_child(kind, args, spec_path, data_dir, workdir)
      print(f"{kind}: {json.dumps(results[kind])}", file=sys.stderr, flush=True)
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)

  train_rows = meta["splits"]["train"]["rows"]
  print(f"\n{args.rows:,} rows ({train_rows:,} training), user field: "
        f"{'hashed into ' + format(args.user_buckets, ',') + ' buckets' if args.user_buckets else 'vocabulary'} "
        f"of {user_vocab:,} ids (+ OOV) drawn from {args.user_ids:,}; shards: "
        f"{shard_bytes / 1e9:.2f} GB; batch {args.batch_size}, shuffle buffer "
        f"{args.shuffle_buffer:,} rows; MMoE {results['train']['num_params']:,} parameters; "
        f"os.cpu_count()={os.cpu_count()}\n")
  print("| measure | value |")
  print("|---|---|")
  if prepared.reused:
    print("| generate Parquet, prepare | reused (--reuse) |")
  else:
    print(f"| generate Parquet | {generate_seconds:.1f} s |")
    print(f"| prepare (both passes, shards written) | {prepare_seconds:.1f} s, "
          f"**{args.rows / prepare_seconds:,.0f} rows/s** (peak RSS {prepare_rss:,.0f} MB) |")
  print(f"| input pipeline alone (train_batches, 1 epoch) | "
        f"**{results['pipeline']['examples_per_second']:,.0f} examples/s** (peak RSS "
        f"{results['pipeline']['max_rss_mb']:,.0f} MB) |")
  print(f"| train step alone (one batch, fed again) | "
        f"**{results['step']['examples_per_second']:,.0f} examples/s** |")
  t = results["train"]
  print(f"| training, 1 epoch streamed ({t['steps']} steps; compilation included) | "
        f"**{t['examples_per_second']:,.0f} examples/s** ({t['train_seconds']:.1f} s; "
        f"{t['wall_seconds']:.1f} s with validation and start-up) |")
  print(f"| training process peak RSS | **{t['max_rss_mb']:,.0f} MB** |")
  v = t["validation"] or {}
  print("| validation AUC after 1 epoch | " + ", ".join(
      f"{task} {m.get('auc', float('nan')):.4f}" for task, m in v.items()) + " |")


if __name__ == "__main__":
  main()
