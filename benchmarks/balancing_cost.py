"""What each task-balancing method costs per train step, against ``fixed`` (apem_jax/balancing.py).

  python benchmarks/balancing_cost.py                       # MMoE and APEM, batch 1024: minutes
  python benchmarks/balancing_cost.py --models mmoe --steps 2 --reps 2     # a smoke run

What is timed: the jitted train step (``apem_jax.step.train_step`` with ``balancing=...``, state
donated, the trainer's optimizer and task head) of the Census-Income config of each model, on the
Census schema of ``benchmarks/census_schema.json`` with random batches (as
``benchmarks/gpu_step.py``; throughput does not depend on the values), one device. For each model
every method is compiled first, then the repetitions go round the methods in turn (``--reps``
rounds of ``--steps`` steps each, after 2 warm-up steps), so that all methods see the same
machine load; the table gives the median time per step and its ratio to ``fixed``'s median.

Loss weighting (``uncertainty``, ``dwa``) takes one backward pass, as ``fixed`` does; the
per-task-gradient methods (``gradnorm``, ``pcgrad``, ``cagrad``, ``mgda``) take one forward pass and
a backward pass vmapped over the T tasks, then a [T, T] Gram matrix over the shared parameters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from apem_jax import balancing as balancing_lib, losses, step as step_lib  # noqa: E402
from apem_jax.models import build_model  # noqa: E402
from apem_jax.models import MODELS  # noqa: E402
from benchmarks.gpu_step import get_config, load_schema, random_batch  # noqa: E402
import arguments  # noqa: E402  (benchmarks/arguments.py)


def compile_method(name: str, method: str, batch_size: int, schema, batch):
  """(compiled step, fresh state, compile seconds) of one model under one method."""
  config = get_config(name, "float32", batch_size)
  config.train.balancing = method
  balancing = balancing_lib.balancing_from_config(config.train)
  model = build_model(config.model, schema)
  tx = step_lib.make_optimizer(config, total_steps=10_000)
  head = losses.make_head(schema, getattr(model, "output_space", None),
                          funnel=config.train.get("funnel", "entire_space"),
                          calibration_weight=config.train.get("calibration_weight", None))
  weights = tuple(config.train.task_weights) or (1.0,) * schema.num_tasks
  train_step, _ = step_lib.bind_steps(model, tx, schema, weights, head=head, balancing=balancing)
  example = {k: batch[k][:1] for k in step_lib.MODEL_INPUTS}
  state = jax.jit(lambda r: step_lib.init_state(model, tx, r, example, balancing=balancing))(
      jax.random.key(0))
  t0 = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
  return compiled, state, time.perf_counter() - t0


def bench_model(name: str, methods: list[str], batch_size: int, steps: int, reps: int,
                schema) -> list[dict]:
  batch = jax.device_put(random_batch(schema, batch_size))
  runs = {}
  for method in methods:
    compiled, state, compile_s = compile_method(name, method, batch_size, schema, batch)
    for _ in range(2):  # warm-up
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    runs[method] = {"compiled": compiled, "state": state, "compile_s": compile_s, "times": []}
  for _ in range(reps):
    for method in methods:
      run = runs[method]
      state = run["state"]
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = run["compiled"](state, batch)
      jax.block_until_ready((state, metrics))
      run["times"].append((time.perf_counter() - t0) / steps)
      run["state"] = state
  rows = []
  for method in methods:
    ms = 1e3 * statistics.median(runs[method]["times"])
    rows.append({"model": name, "method": method, "ms": ms, "compile_s": runs[method]["compile_s"],
                 "times_ms": [1e3 * t for t in runs[method]["times"]]})
  base = next((r["ms"] for r in rows if r["method"] == "fixed"), float("nan"))
  for r in rows:
    r["ratio"] = r["ms"] / base
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", type=arguments.names(MODELS), default="mmoe,apem")
  p.add_argument("--methods", type=arguments.names(balancing_lib.METHODS),
                 default=",".join(balancing_lib.METHODS))
  p.add_argument("--batch_size", type=arguments.at_least(1), default=1024)
  p.add_argument("--steps", type=arguments.at_least(1), default=5,
                 help="steps per timed repetition")
  p.add_argument("--reps", type=arguments.at_least(1), default=5,
                 help="repetitions (rounds over the methods)")
  args = p.parse_args(argv)
  start = time.time()
  schema = load_schema()
  methods = args.methods
  if "fixed" not in methods:
    methods = ["fixed"] + methods
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}; Census schema: {len(schema.categorical)} categorical, "
        f"{len(schema.numeric)} numeric fields, tasks {list(schema.task_names)}; batch "
        f"{args.batch_size}; median of {args.reps} x {args.steps} steps", flush=True)
  rows = []
  for name in args.models:
    rows += bench_model(name, methods, args.batch_size, args.steps, args.reps, schema)
  print()
  print("| model | method | median ms/step | ratio to fixed | compile s |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    print(f"| {r['model']} | {r['method']} | {r['ms']:.1f} | {r['ratio']:.2f} | "
          f"{r['compile_s']:.1f} |")
  print(f"\ntotal {time.time() - start:.0f}s")


if __name__ == "__main__":
  main()
