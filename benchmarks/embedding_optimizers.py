"""Train-step time and optimizer-state size of the embedding tables' optimizers.

python benchmarks/embedding_optimizers.py [--models mmoe,apem] [--batch_size 1024] [--rounds 5]

A funnel-like schema (user 1,000,000 ids, item 100,000, category 500, two small fields, four
numeric, three tasks) and each model's default config; ``optimizer.embedding_optimizer`` is
``same`` (Adam on everything, the default), ``adagrad`` (row-wise) or ``lazy_adam``
(apem_jax/optimizers.py). The steps of the three are timed in turn within each round (jit, state
donated, one device-resident random batch, ``block_until_ready``), so the machine's load falls
on all alike; the table gives the median over rounds and the ratio to ``same``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import arguments  # noqa: E402  (benchmarks/arguments.py)
import machine  # noqa: E402  (benchmarks/machine.py)
from apem_jax import step as step_lib  # noqa: E402
from apem_jax.configs import common  # noqa: E402
from apem_jax.models import MODELS, build_model  # noqa: E402
from apem_jax.schema import make_schema  # noqa: E402

VOCAB_SIZES = (1_000_000, 100_000, 500, 10, 5)
OPTIMIZERS = ("same", "adagrad", "lazy_adam")


def _batch(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  categorical = np.stack([rng.integers(0, v, size) for v in VOCAB_SIZES], -1).astype(np.int32)
  labels = (rng.random((size, 3)) < 0.3).astype(np.float32)
  return {"categorical": categorical, "numeric": rng.normal(size=(size, 4)).astype(np.float32),
          "labels": labels, "label_mask": np.ones_like(labels),
          "weight": np.ones(size, np.float32)}


def _step(model_name: str, optimizer: str, schema, batch):
  config = common.base_config(model_name)
  config.optimizer.embedding_optimizer = optimizer
  model = build_model(config.model, schema)
  tx = step_lib.make_optimizer(config, total_steps=1000)
  state = step_lib.init_state(model, tx, jax.random.key(0), batch)
  step = jax.jit(step_lib.bind_steps(model, tx, schema, (1.0, 1.0, 1.0))[0], donate_argnums=0)
  state, _ = step(state, batch)  # compile
  jax.block_until_ready(state)
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  return step, state, opt_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", type=arguments.names(MODELS), default="mmoe,apem")
  parser.add_argument("--batch_size", type=arguments.at_least(1), default=1024)
  parser.add_argument("--rounds", type=arguments.at_least(1), default=5)
  parser.add_argument("--steps", type=arguments.at_least(1), default=5,
                      help="Steps per timed repetition.")
  args = parser.parse_args()
  schema = make_schema(VOCAB_SIZES, 4, ("click", "cart", "buy"))
  batch = jax.device_put(_batch(args.batch_size, np.random.default_rng(0)))
  rows = []
  for model_name in args.models:
    runs = {name: list(_step(model_name, name, schema, batch)) for name in OPTIMIZERS}
    times = {name: [] for name in OPTIMIZERS}
    for _ in range(args.rounds):
      for name, run in runs.items():
        step, state = run[0], run[1]
        t0 = time.perf_counter()
        for _ in range(args.steps):
          state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        run[1] = state
    base = statistics.median(times["same"])
    for name in OPTIMIZERS:
      ms = statistics.median(times[name])
      rows.append(f"| {model_name} | {name} | {ms:.1f} | {ms / base:.2f} | "
                  f"{runs[name][2] / 2**20:.0f} |")
  print(f"Batch {args.batch_size}, median of {args.rounds} rounds x {args.steps} steps; "
        f"{machine.describe()}, {jax.default_backend()}.\n")
  print("| model | embedding optimizer | ms / step | ratio to same | optimizer state MiB |")
  print("|---|---|---:|---:|---:|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
