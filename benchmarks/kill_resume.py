"""Kill a training run at random moments with SIGKILL, restart it with the same command, and check
that it ends bit-identical to an uninterrupted run.

python benchmarks/kill_resume.py --trials 20 --out docs/reliability_kills.md

One uninterrupted ``train.py`` run of a small APEM on synthetic data (4 epochs of 30 steps, a
checkpoint every 5 steps, an evaluation every epoch) is the reference. Each trial starts the same
command in a fresh workdir, waits for its first checkpoint, kills it with SIGKILL after a delay
drawn uniformly from [0, 0.9 x the time the reference took from its first checkpoint to its
end] (train steps, evaluations and background saves), restarts the same command once, and
compares: exit status 0, the final train state (parameters, Adam moments, step, key) bit for
bit, and every validation metric. A trial that finished before its kill (the machine ran faster
than the reference) is listed but not counted: trials go on until ``--trials`` runs were killed.
Prints a markdown table and the summary line; ``--out`` also writes them to a file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top

from apem_jax import checkpointing, trainer  # pylint: disable=g-import-not-at-top
from benchmarks import machine  # pylint: disable=g-import-not-at-top

CONFIG = textwrap.dedent("""
    import ml_collections
    from apem_jax.configs import common
    from apem_jax.models.defaults import default_model_config

    def get_config():
      config = common.base_config()
      config.data = ml_collections.ConfigDict(dict(
          name="synthetic_mmoe",
          synthetic=dict(input_dim=6, num_examples=2400, correlation=0.9, task_kind="binary",
                         seed=3)))
      config.model = default_model_config("apem")
      config.model.update(embed_dim=8, num_blocks=1, num_groups=4, tower_hidden=(16,),
                          indicator_hidden=8)
      config.train.update(batch_size=64, eval_batch_size=128, num_epochs=4, log_every=10,
                          progress_bar=False, patience=5, checkpoint_every_steps=5)
      config.optimizer.update(schedule="constant", learning_rate=3e-3)
      return config
""")


def _command(config_file: str, workdir: str) -> list[str]:
  return [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}"]


def _env() -> dict[str, str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  return env


def _reference(config_file: str, workdir: str) -> tuple[float, float]:
  """Runs the uninterrupted reference; returns (seconds until its first checkpoint, total)."""
  start = time.time()
  process = subprocess.Popen(_command(config_file, workdir), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first = None
  while process.poll() is None:
    if first is None and _steps(workdir):
      first = time.time() - start
    time.sleep(0.01)
  if process.returncode != 0:
    raise RuntimeError(f"the reference run failed:\n{process.stderr.read()[-3000:]}")
  return first, time.time() - start


def _steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _saving(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any("tmp" in d for d in os.listdir(directory))


def _final(config, workdir: str):
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  state, _ = ckpt.restore(trainer.Experiment(config).abstract_state)
  ckpt.close()
  with open(os.path.join(workdir, "metrics.json")) as f:
    history = json.load(f)["history"]
  leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(state)]
  return leaves, [{k: v for k, v in h.items() if k != "train_seconds"} for h in history]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="Also write the table to this markdown file.")
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  root = tempfile.mkdtemp(prefix="kill_resume_")
  config_file = os.path.join(root, "config.py")
  with open(config_file, "w") as f:
    f.write(CONFIG)
  spec = importlib.util.spec_from_file_location("kill_resume_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()

  first, total = _reference(config_file, os.path.join(root, "reference"))
  expected_leaves, expected_history = _final(config, os.path.join(root, "reference"))
  print(f"reference: first checkpoint after {first:.1f}s, done after {total:.1f}s", flush=True)

  rows, killed_runs, resumed, identical, trial = [], 0, 0, 0, 0
  while killed_runs < args.trials and trial < 3 * args.trials:
    workdir = os.path.join(root, f"trial_{trial}")
    trial += 1
    kill_after = float(rng.uniform(0.0, 0.9 * (total - first)))
    process = subprocess.Popen(_command(config_file, workdir), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not _steps(workdir) and process.poll() is None:
      time.sleep(0.005)
    try:
      process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      saving = _saving(workdir)
      process.send_signal(signal.SIGKILL)
      process.wait()
    else:
      saving = False
    killed = process.returncode == -signal.SIGKILL
    at_kill = _steps(workdir)
    restart = subprocess.run(_command(config_file, workdir), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=900)
    ok = restart.returncode == 0
    same = False
    if ok:
      leaves, history = _final(config, workdir)
      same = (history == expected_history and len(leaves) == len(expected_leaves) and
              all(a.dtype == b.dtype and np.array_equal(a, b)
                  for a, b in zip(leaves, expected_leaves)))
    if killed:
      killed_runs += 1
      resumed += ok
      identical += same
    if not ok:
      print(restart.stderr[-3000:], flush=True)
    row = (trial - 1, f"{kill_after:.2f}", "yes" if killed else "no (it had finished)",
           str(at_kill[-1]) if at_kill else "none", "yes" if saving else "no",
           "yes" if ok else f"no (exit {restart.returncode})", "yes" if same else "no")
    rows.append(row)
    print(" | ".join(map(str, row)), flush=True)

  header = ("trial", "killed (s after its first checkpoint)", "killed", "newest checkpoint then",
            "save in progress", "resumed", "bit-identical")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
  summary = (f"{resumed}/{killed_runs} resumed, {identical}/{killed_runs} bit-identical "
             f"(reference: first checkpoint after {first:.1f}s, done after {total:.1f}s; "
             f"{machine.describe()})")
  text = "\n".join(lines + ["", summary])
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(f"Generated by `python benchmarks/kill_resume.py --trials {args.trials} --seed "
              f"{args.seed} --out {args.out}` on {time.strftime('%Y-%m-%d')}.\n\n{text}\n")


if __name__ == "__main__":
  main()
