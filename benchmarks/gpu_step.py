"""Train-step throughput on one accelerator (GPU), float32 and bfloat16, APEM and MMoE.

  python benchmarks/gpu_step.py                                  # defaults: a few minutes on a GPU
  python benchmarks/gpu_step.py --batch_sizes 512 --steps 3      # smoke test (runs on CPU too)

What is timed: the benchmark (a) of ``benchmarks/throughput.py``: the jitted train step
(``apem_jax.step.train_step``, state donated, the trainer's optimizer and task head) on one
device-resident batch, ``--steps`` steps per repetition, ``block_until_ready``, median of ``--reps``
repetitions after warm-up (compile + 2 steps). ``model.dtype='bfloat16'`` is the bfloat16 row
(parameters and optimizer state stay float32, as in training). FLOPs per example come from XLA's
``cost_analysis`` of the compiled step.

Self-contained for a bare GPU machine: imports neither TensorFlow nor ``apem_jax.data``. The
schema is Census-Income's (field vocabulary sizes, numeric bucket boundaries, tasks) read from
``benchmarks/census_schema.json`` (written from the real schema: ``json.dump(trainer.
load_dataset_prepared_once(census.get_config().data).schema.to_dict(), f, indent=1)``); batches
are random (ids uniform in each field's ``[0, vocab_size]``, normal numerics, Bernoulli labels):
throughput does not depend on values.

Needs jax (with the GPU plugin), flax, optax, numpy, and ml-collections (the configs use it). If
ml-collections is missing on the GPU machine, carry a wheel from here:
  pip download ml-collections==1.1.0 --no-deps -d .whl        # on this machine, in the repo root
  # on the GPU machine, in the repo root (a wheel is a zip; PYTHONPATH can point at it):
  PYTHONPATH=.:$(ls .whl/ml_collections-*.whl) python benchmarks/gpu_step.py
  # or: pip install --no-deps .whl/ml_collections-*.whl
``--max_seconds`` (default 420) stops starting new rows once that much time has passed, so a run
stays under 8 minutes; skipped rows are listed. ``--json`` is rewritten after every row, so a run
that fails later (out of memory at a large batch) keeps the rows measured before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from apem_jax import losses, step as step_lib  # noqa: E402
from apem_jax.models import MODELS, build_model  # noqa: E402
from apem_jax.models.layers import DTYPES  # noqa: E402
from apem_jax.schema import Schema  # noqa: E402
from apem_jax.configs import census, census_apem  # noqa: E402
import arguments  # noqa: E402  (benchmarks/arguments.py)

SCHEMA_JSON = os.path.join(ROOT, "benchmarks", "census_schema.json")


def load_schema(path: str = SCHEMA_JSON) -> Schema:
  with open(path) as f:
    return Schema.from_dict(json.load(f))


def random_batch(schema: Schema, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch in the format of ``apem_jax.schema`` with random values."""
  rng = np.random.default_rng(seed)
  vocab = np.asarray(schema.vocab_sizes, np.int64)
  return {
      "categorical": (rng.integers(0, 1 << 30, (batch_size, len(vocab))) % (vocab + 1)).astype(np.int32),
      "numeric": rng.standard_normal((batch_size, len(schema.numeric))).astype(np.float32),
      "labels": (rng.random((batch_size, schema.num_tasks)) < 0.2).astype(np.float32),
      "label_mask": np.ones((batch_size, schema.num_tasks), np.float32),
      "weight": np.ones((batch_size,), np.float32),
  }


def get_config(name: str, dtype: str, batch_size: int):
  config = census_apem.get_config() if name == "apem" else census.get_config(name)
  config.model.dtype = dtype
  config.train.batch_size = batch_size
  return config


def bench(name: str, dtype: str, batch_size: int, schema: Schema, steps: int, reps: int) -> dict:
  config = get_config(name, dtype, batch_size)
  model = build_model(config.model, schema)
  tx = step_lib.make_optimizer(config, total_steps=10_000)
  head = losses.make_head(schema, getattr(model, "output_space", None),
                          funnel=config.train.get("funnel", "entire_space"),
                          calibration_weight=config.train.get("calibration_weight", None))
  weights = tuple(config.train.task_weights) or (1.0,) * schema.num_tasks
  train_step, _ = step_lib.bind_steps(model, tx, schema, weights, head=head)
  step = jax.jit(train_step, donate_argnums=0)
  batch = jax.device_put(random_batch(schema, batch_size))
  example = {k: batch[k][:1] for k in step_lib.MODEL_INPUTS}
  state = jax.jit(lambda r: step_lib.init_state(model, tx, r, example))(jax.random.key(0))

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", float("nan")))

  def run(k, state):
    for _ in range(k):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return state

  state = run(2, state)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state = run(steps, state)
    times.append((time.perf_counter() - t0) / steps)
  sec = statistics.median(times)
  return {"model": name, "dtype": dtype, "batch": batch_size, "ms_per_step": 1e3 * sec,
          "examples_per_s": batch_size / sec, "mflop_per_example": flops / batch_size / 1e6,
          "tflop_per_s": flops / sec / 1e12, "compile_s": compile_s}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", type=arguments.names(MODELS), default="apem,mmoe")
  p.add_argument("--dtypes", type=arguments.names(DTYPES), default="float32,bfloat16")
  p.add_argument("--batch_sizes", type=arguments.positive_ints, default="1024,4096,16384,65536")
  p.add_argument("--steps", type=arguments.at_least(1), default=50,
                 help="steps per timed repetition")
  p.add_argument("--reps", type=arguments.at_least(1), default=3)
  p.add_argument("--max_seconds", type=arguments.at_least(0, float), default=420.0)
  p.add_argument("--json", default="", help="also write the rows to this JSON file (after each)")
  args = p.parse_args(argv)
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    p.error(f"--json {args.json}: its directory does not exist")
  start = time.time()
  schema = load_schema()
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')} ({jax.device_count()} devices), "
        f"jax {jax.__version__}; schema: {len(schema.categorical)} categorical, "
        f"{len(schema.numeric)} numeric fields, tasks {schema.task_names}", flush=True)
  rows, skipped = [], []
  header = (f"{'model':6s} {'dtype':9s} {'batch':>7s} {'ms/step':>9s} {'examples/s':>12s} "
            f"{'MFLOP/ex':>9s} {'TFLOP/s':>8s} {'compile s':>9s}")
  print(header, flush=True)
  # Every model at one dtype and batch size before the next, so that a run cut short by
  # --max_seconds still holds side-by-side rows to compare.
  for dtype in args.dtypes:
    for bs in args.batch_sizes:
      for name in args.models:
        if time.time() - start > args.max_seconds:
          skipped.append(f"{name}/{dtype}/{bs}")
          continue
        r = bench(name, dtype, bs, schema, args.steps, args.reps)
        rows.append(r)
        print(f"{r['model']:6s} {r['dtype']:9s} {r['batch']:7d} {r['ms_per_step']:9.2f} "
              f"{r['examples_per_s']:12,.0f} {r['mflop_per_example']:9.3f} {r['tflop_per_s']:8.3f} "
              f"{r['compile_s']:9.1f}", flush=True)
        write_json(args.json, dev, rows, skipped)
  if skipped:
    print(f"skipped (over --max_seconds={args.max_seconds:g}): {', '.join(skipped)}")
    write_json(args.json, dev, rows, skipped)
  print(f"total {time.time() - start:.0f}s")


def write_json(path: str, dev, rows: list[dict], skipped: list[str]) -> None:
  """The rows so far to ``path`` (if given), replaced whole: a run that fails later keeps them."""
  if not path:
    return
  with open(path + ".tmp", "w") as f:
    json.dump({"device": str(dev), "rows": rows, "skipped": skipped}, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  main()
