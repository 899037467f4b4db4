"""How close the balancing methods' solvers come to the optimum, on random problems.

  python benchmarks/solver_accuracy.py                 # 150 problems of 3 to 6 tasks
  python benchmarks/solver_accuracy.py --problems 500 --max_tasks 8

CAGrad's ``w = argmin_{w in simplex} <g_w, g0> + c ||g0|| ||g_w||`` and MGDA's min-norm point,
from float32 Gram matrices of random task gradients (a third of the problems with a second task
that conflicts with the first), against SciPy's SLSQP in float64 started from every vertex and
the centre (the best of those). For each solver: the largest excess of its objective over the
reference's, as a fraction of max|K|, and, for CAGrad, in how many problems its direction ``d``
conflicts with a task (``min_t <g_t, d> < 0``) where the reference's does not, which is what
CAGrad is for. Prints a markdown table.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy import optimize  # noqa: E402

from apem_jax import balancing as bl, cli  # noqa: E402

_PROBLEMS = flags.DEFINE_integer("problems", 150, "Random problems.", lower_bound=1)
_MAX_TASKS = flags.DEFINE_integer("max_tasks", 6, "Tasks per problem: 3 to this.", lower_bound=3)
_C = flags.DEFINE_float("c", 0.5, "CAGrad's c.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the problems.", lower_bound=0)


def _slsqp(objective, num_tasks: int) -> np.ndarray:
  b = np.full(num_tasks, 1 / num_tasks)
  return min((optimize.minimize(objective, x0, method="SLSQP", bounds=[(0, 1)] * num_tasks,
                                constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                                options={"ftol": 1e-14})
              for x0 in [b] + list(np.eye(num_tasks))), key=lambda r: r.fun).x


def _direction(g: np.ndarray, w: np.ndarray, kappa: float) -> np.ndarray:
  gw = w @ g
  return g.mean(0) + kappa / (np.linalg.norm(gw) + 1e-8) * gw


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rng = np.random.default_rng(_SEED.value)
  c = _C.value
  solvers = {
      "CAGrad, exact (<= 8 tasks)": lambda k: bl.cagrad_weights(k, c),
      "CAGrad, Frank-Wolfe 100 steps (> 8 tasks)": lambda k: bl.cagrad_frank_wolfe(
          k, c * jnp.sqrt(jnp.mean(k) + 1e-8)),
      "MGDA, exact (<= 8 tasks)": bl.min_norm_weights,
      "MGDA, Frank-Wolfe 100 steps (> 8 tasks)": bl.min_norm_frank_wolfe,
  }
  compiled = {name: jax.jit(f) for name, f in solvers.items()}
  worst = dict.fromkeys(solvers, 0.0)
  conflicts = dict.fromkeys(solvers, 0)
  for trial in range(_PROBLEMS.value):
    num_tasks, dim = int(rng.integers(3, _MAX_TASKS.value + 1)), int(rng.integers(2, 12))
    g = rng.normal(size=(num_tasks, dim)) * rng.uniform(0.1, 3, size=(num_tasks, 1))
    if trial % 3 == 0:
      g[1] = -g[0] * rng.uniform(0.5, 2) + 0.1 * rng.normal(size=dim)
    k = g @ g.T
    b = np.full(num_tasks, 1 / num_tasks)
    kappa = c * math.sqrt(b @ k @ b + 1e-8)
    objectives = {
        "CAGrad": lambda x: x @ k @ b + kappa * math.sqrt(max(x @ k @ x, 0.0) + 1e-8),
        "MGDA": lambda x: x @ k @ x}
    references = {kind: _slsqp(f, num_tasks) for kind, f in objectives.items()}
    for name, solve in compiled.items():
      kind = name.split(",")[0]
      w = np.asarray(solve(jnp.asarray(k, jnp.float32)), np.float64)
      excess = (objectives[kind](w) - objectives[kind](references[kind])) / np.abs(k).max()
      worst[name] = max(worst[name], excess)
      if kind == "CAGrad":
        ref_conflict = min(g @ _direction(g, references[kind], kappa)) < 0
        conflicts[name] += int(min(g @ _direction(g, w, kappa)) < 0 and not ref_conflict)
  command = "python benchmarks/solver_accuracy.py " + " ".join(
      f"--{f.name}={f.value}" for f in (_PROBLEMS, _MAX_TASKS, _SEED, _C))
  print(f"{_PROBLEMS.value} random problems of 3 to {_MAX_TASKS.value} tasks (seed "
        f"{_SEED.value}, c {c:g}), against SLSQP in float64; `{command}`\n")
  print("| solver | worst objective excess / max abs K | d conflicts where the optimum's does not |")
  print("|---|---:|---:|")
  for name in solvers:
    extra = str(conflicts[name]) if name.startswith("CAGrad") else "-"
    print(f"| {name} | {worst[name]:.1e} | {extra} |")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("benchmarks/solver_accuracy.py"))
