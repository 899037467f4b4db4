"""What the test suite's XLA flags (tests/conftest.py) change: compile time and step time of
the trainer's train step, for the tests' tiny APEM and shared-bottom configs, on 8 simulated CPU
devices.

  python benchmarks/compile_flags.py                  # 3 rounds: about 3 minutes on 2 cores
  python benchmarks/compile_flags.py --reps 1         # a smoke run

Each flag set runs in processes of its own (XLA reads XLA_FLAGS once per process), the flag sets
taking turns round after round so that all see the same machine load; no persistent compilation
cache. Per process and model: the train step (``Experiment.train_step``: jitted over the 8-device
mesh, state donated) is lowered and compiled three times after clearing JAX's caches (the least
counts), then stepped 30 times, each step waited for (the median counts). The table gives the
medians over the rounds and the ratio to XLA's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import arguments  # noqa: E402  (benchmarks/arguments.py)
import xla_env  # tests/xla_env.py: the flags the suite compiles with  # noqa: E402

DEVICES = "--xla_force_host_platform_device_count=8"
FLAG_SETS = {
    "XLA defaults": "",
    "level 0": "--xla_backend_optimization_level=0",
    "level 0, no fusion emitters (tests)": " ".join(xla_env.COMPILER_FLAGS),
}
MODELS = ("apem", "shared_bottom")


def measure(models: list[str]) -> dict:
  """In this process: ``{model: {"compile_s": least of 3, "step_ms": median of 30}}``."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from apem_jax import trainer  # pylint: disable=g-import-not-at-top
  from test_trainer import tiny_config  # the tests' configs  # pylint: disable=g-import-not-at-top
  out = {}
  for name in models:
    exp = trainer.Experiment(tiny_config(name))
    state = exp.init_state()
    batches = exp.data.train_batches(exp.config.train.batch_size, seed=0)
    batch = exp.device_batch(next(batches))
    compile_s = []
    for _ in range(3):
      jax.clear_caches()
      lowered = exp.train_step.lower(state, batch)
      start = time.perf_counter()
      lowered.compile()
      compile_s.append(time.perf_counter() - start)
    state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_ms = []
    for _ in range(30):
      batch = exp.device_batch(next(batches))
      start = time.perf_counter()
      state, metrics = exp.train_step(state, batch)
      jax.block_until_ready(metrics)  # one step at a time, as the trainer runs them
      step_ms.append(1e3 * (time.perf_counter() - start))
    out[name] = {"compile_s": min(compile_s), "step_ms": statistics.median(step_ms)}
  return out


def run_child(flags: str, models: list[str]) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XLA_FLAGS=f"{DEVICES} {flags}".strip(), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             TF_USE_LEGACY_KERAS="1")
  result = subprocess.run([sys.executable, __file__, "--child", "--models", ",".join(models)],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"benchmarks/compile_flags.py: the run with XLA_FLAGS={env['XLA_FLAGS']!r} failed:\n"
             f"{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def table(rounds: list[dict], models: list[str]) -> str:
  names = list(FLAG_SETS)
  med = {(f, m, k): statistics.median(r[f][m][k] for r in rounds)
         for f in names for m in models for k in ("compile_s", "step_ms")}
  lines = ["| XLA flags | model | compile s | vs defaults | step ms | vs defaults |",
           "|---|---|---|---|---|---|"]
  for f in names:
    for m in models:
      c, s = med[f, m, "compile_s"], med[f, m, "step_ms"]
      lines.append(f"| {f} | {m} | {c:.2f} | {c / med[names[0], m, 'compile_s']:.2f}x | "
                   f"{s:.1f} | {s / med[names[0], m, 'step_ms']:.2f}x |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=arguments.at_least(1), default=3,
                      help="rounds over the flag sets")
  parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: apem, "
                      "shared_bottom or any registered model (the tests' tiny config)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  models = args.models.split(",")
  if args.child:
    print(json.dumps(measure(models)))
    return
  rounds = []
  for rep in range(args.reps):
    rounds.append({f: run_child(flags, models) for f, flags in FLAG_SETS.items()})
    print(f"round {rep + 1}/{args.reps}: {json.dumps(rounds[-1])}", file=sys.stderr)
  print(f"Medians over {args.reps} rounds; 8 simulated CPU devices; "
        f"`python benchmarks/compile_flags.py --reps {args.reps} --models {args.models}`\n")
  print(table(rounds, models))


if __name__ == "__main__":
  main()
