"""Seeds trained one after the other vs as one vmapped program, side by side in one run.

  python benchmarks/vmap_seeds.py                                  # 5 seeds of MMoE on Census, 1 epoch
  python benchmarks/vmap_seeds.py --model mmoe --seeds 5 --epochs 2 --out /tmp/vmap_seeds.md

Sequential: ``trainer.train_and_evaluate`` once per seed (each builds its experiment, compiles,
trains, evaluates on validation every epoch and checkpoints), as ``benchmarks/quality.py`` does
today. Vmapped: one ``vmap_runs.train_runs`` call for all seeds (``--unroll``: each run's step as
its own copy inside the program). Both the same config (``configs/census.py:<model>``, every
``--set`` override, ``train.num_epochs=--epochs``) and the same data, already prepared in
``data/`` (the first of the two to run would otherwise pay the download and the TFDS build).
Each path runs in a fresh subprocess (neither inherits the other's threads, caches or memory),
its wall seconds measured around the whole path after the data is read; workdirs in a fresh
temporary directory.

Then each seed's validation metrics (every evaluation of its history: AUC and logloss of each
task) are compared between the two: the largest absolute difference, and whether the best step
is the same. Finally, the per-step cost that explains the ratio: ``--profile_steps`` steps of the
trainer's compiled step (N calls, one per seed) and of the vmapped step (one call), interleaved,
on device-resident batches, compile excluded.

Prints a markdown table (and writes it to ``--out`` if given) with the machine, its load average
before and after (the development machine is shared) and the command that made it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from apem_jax import cli, config_validation, trainer, vmap_runs
from configs import census as census_configs
import machine  # benchmarks/machine.py

_MODEL = flags.DEFINE_string("model", "mmoe", "configs/census.py:<model>.")
_TASK_GROUP = flags.DEFINE_string("task_group", "income_marital", "Census task group.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds 0 .. seeds-1.")
_EPOCHS = flags.DEFINE_integer("epochs", 1, "train.num_epochs of every run.")
_UNROLL = flags.DEFINE_bool("unroll", False, "vmap_runs.train_runs(unroll=True).")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 10, "Interleaved per-step timing; 0: skip.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go (default: a temporary "
                               "directory, removed at the end).")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown table here.")
_PATH = flags.DEFINE_enum("path", None, ["sequential", "vmapped", "profile"],
                          "Internal: run one path in this process (the benchmark runs each in a "
                          "fresh subprocess, so neither inherits the other's threads and memory).")
_SET = flags.DEFINE_multi_string("set", [], "key=value config override for every run.")


def _configs():
  configs = []
  for seed in range(_SEEDS.value):
    config = census_configs.get_config(f"{_MODEL.value},{_TASK_GROUP.value}")
    config.seed = seed
    config.train.num_epochs = _EPOCHS.value
    config.train.progress_bar = False
    for override in _SET.value:
      config_validation.apply_override(config, override)
    configs.append(config)
  return configs


def _metric_diffs(a: dict, b: dict) -> tuple[float, bool]:
  """(largest |difference| of AUC and logloss over the evaluations of two summaries, whether
  their best steps and number of evaluations agree)."""
  worst = 0.0
  for ha, hb in zip(a["history"], b["history"]):
    for task, m in ha["validation"].items():
      for name in ("auc", "logloss"):
        x, y = m[name], hb["validation"][task][name]
        if not (math.isnan(x) and math.isnan(y)):
          worst = max(worst, abs(x - y))
  return worst, a["best_step"] == b["best_step"] and len(a["history"]) == len(b["history"])


def _profile(configs, steps: int) -> dict[str, float]:
  """Seconds per step: the trainer's compiled step called once per seed, and the vmapped step
  once, interleaved on device-resident batches (compile excluded); medians over ``steps``."""
  runs = vmap_runs.Runs(configs, unroll=_UNROLL.value)
  exp = runs.exp
  n = len(configs)
  states = [exp.init_state() for _ in configs]  # the same shapes; values do not matter here
  stacked = runs.init_state()
  batches = exp.data.train_batches(configs[0].train.batch_size, seed=0)
  locals_ = [next(batches) for _ in range(n)]
  one = [exp.device_batch(b) for b in locals_]
  many = runs.global_batch(locals_)
  active = jnp.ones((n,), bool)
  for i in range(n):  # compile and warm up
    states[i], _ = exp.train_step(states[i], one[i])
  stacked, _ = runs.train_step(stacked, many, active)
  jax.block_until_ready((states, stacked))
  sequential, vmapped = [], []
  for _ in range(steps):
    t = time.perf_counter()
    for i in range(n):
      states[i], _ = exp.train_step(states[i], one[i])
    jax.block_until_ready(states)
    sequential.append(time.perf_counter() - t)
    t = time.perf_counter()
    stacked, _ = runs.train_step(stacked, many, active)
    jax.block_until_ready(stacked)
    vmapped.append(time.perf_counter() - t)
  return {"sequential": float(np.median(sequential)), "vmapped": float(np.median(vmapped))}


def _run_path(root: str, configs: list) -> None:
  """--path: one path in this process; its result as JSON on the last line of stdout."""
  if _PATH.value == "profile":
    print(json.dumps(_profile(configs, _PROFILE_STEPS.value)))
    return
  trainer.Experiment(configs[0])  # the data is read before the clock starts, in both paths
  t0 = time.time()
  if _PATH.value == "sequential":
    summaries = [trainer.train_and_evaluate(c, os.path.join(root, "sequential", f"seed{c.seed}"))
                 for c in configs]
    train = sum(sum(h["train_seconds"] for h in s["history"]) for s in summaries)
  else:
    summaries = vmap_runs.train_runs(configs, os.path.join(root, "vmapped"), unroll=_UNROLL.value)
    train = summaries[0]["vmapped"]["train_seconds"]
  print(json.dumps({"seconds": time.time() - t0, "train_seconds": train,
                    "summaries": summaries}))


def _child_args(argv: list[str]) -> list[str]:
  """``argv`` without the flags that the parent sets for a child or keeps for itself (--path,
  --workdir, --out), each given as ``--flag=VALUE`` or as ``--flag VALUE``."""
  args, skip = [], False
  for arg in argv:
    name, sep, _ = arg.lstrip("-").partition("=")
    if skip or (arg.startswith("-") and name in ("path", "workdir", "out")):
      skip = not skip and not sep  # the next argument is this flag's value
      continue
    args.append(arg)
  return args


def _subprocess(path: str, root: str) -> dict:
  args = [sys.executable, os.path.abspath(__file__), f"--path={path}", f"--workdir={root}"]
  result = subprocess.run(args + _child_args(sys.argv[1:]), capture_output=True, text=True,
                          check=False)
  if result.returncode:  # its stderr's tail, then what failed
    sys.stderr.write(result.stderr[-3000:])
    sys.exit(f"benchmarks/vmap_seeds.py: error: the {path} path failed (exit "
             f"{result.returncode}; its stderr above)")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    configs = _configs()  # a bad --set: one line, before any directory is made
  except ValueError as e:
    sys.exit(f"benchmarks/vmap_seeds.py: error: {e}")
  workdir = _WORKDIR.value
  if workdir and not _PATH.value and os.path.exists(workdir) and (
      not os.path.isdir(workdir) or os.listdir(workdir)):  # runs there would resume: no timing
    sys.exit(f"benchmarks/vmap_seeds.py: error: --workdir {workdir} exists and is not an empty "
             f"directory; give a new one")
  root = workdir or tempfile.mkdtemp(prefix="vmap_seeds_")
  if _PATH.value:
    _run_path(root, configs)
    return
  try:
    _compare(root, configs)
  finally:  # a temporary workdir goes, also when a path failed
    if workdir is None:
      shutil.rmtree(root, ignore_errors=True)


def _compare(root: str, configs: list) -> None:
  """Both paths (and the profile) in subprocesses; prints the table, writes --out."""
  n = len(configs)
  trainer.Experiment(configs[0])  # data prepared (downloaded, built, encoded) before any timing
  load_before = os.getloadavg()
  seq = _subprocess("sequential", root)
  vm = _subprocess("vmapped", root)
  load_after = os.getloadavg()
  sequential, vmapped = seq["summaries"], vm["summaries"]
  sequential_s, vmapped_s = seq["seconds"], vm["seconds"]
  seq_train, vm_train = seq["train_seconds"], vm["train_seconds"]
  phases = vmapped[0]["vmapped"]["phase_seconds"]
  profile = _subprocess("profile", root) if _PROFILE_STEPS.value else None

  diffs = [_metric_diffs(s, v) for s, v in zip(sequential, vmapped)]
  worst = max(d for d, _ in diffs)
  same_best = all(ok for _, ok in diffs)

  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  kind = "unrolled" if _UNROLL.value else "vmapped"
  lines = [
      f"### {n} seeds of {_MODEL.value} on Census ({_TASK_GROUP.value}), {_EPOCHS.value} "
      f"epoch(s): sequential vs {kind}", "",
      f"Regenerate with `{command}`. Machine: {machine.describe()}, {jax.device_count()} JAX "
      f"device(s); load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after "
      f"(shared machine). Each path in a fresh process, the data already encoded.", "",
      "| | sequential (N x train_and_evaluate) | "
      f"{kind} (one train_runs) | ratio |",
      "|---|---|---|---|",
      f"| wall seconds, whole path | {sequential_s:.1f} | {vmapped_s:.1f} | "
      f"{sequential_s / vmapped_s:.2f}x |",
      f"| of which in the training loop (compile of the step included) | {seq_train:.1f} | "
      f"{vm_train:.1f} | {seq_train / max(vm_train, 1e-9):.2f}x |",
      f"| the rest (experiments, init, evaluations, checkpoints) | {sequential_s - seq_train:.1f} "
      f"| {vmapped_s - vm_train:.1f} (init {phases['init']:.1f}, validation "
      f"{phases['evaluate']:.1f}, saves {phases['save']:.1f}) | "
      f"{(sequential_s - seq_train) / max(vmapped_s - vm_train, 1e-9):.2f}x |",
  ]
  if profile:
    lines.append(f"| one step of all {n} seeds (median of {_PROFILE_STEPS.value}, interleaved, "
                 f"compiled) | {profile['sequential'] * 1e3:.0f} ms | "
                 f"{profile['vmapped'] * 1e3:.0f} ms | "
                 f"{profile['sequential'] / profile['vmapped']:.2f}x |")
  lines += [
      "",
      f"Per-seed validation metrics (AUC and logloss of every task at every evaluation), "
      f"sequential vs {kind}: largest absolute difference {worst:.3g}; best step and number of "
      f"evaluations the same for every seed: {'yes' if same_best else 'no'}.",
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
    with open(os.path.splitext(_OUT.value)[0] + ".json", "w") as f:
      json.dump({"sequential_seconds": sequential_s, "vmapped_seconds": vmapped_s,
                 "sequential_train_seconds": seq_train, "vmapped_train_seconds": vm_train,
                 "vmapped_phase_seconds": phases, "profile": profile,
                 "max_abs_metric_diff": worst, "same_best_steps": same_best,
                 "per_seed": [d for d, _ in diffs], "load_before": load_before,
                 "load_after": load_after, "command": command}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("benchmarks/vmap_seeds.py"))
