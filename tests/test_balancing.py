"""apem_jax.balancing: each method against a hand-computed or independently computed result, the
shared-parameter rule against per-element gradients of real models, ``fixed`` against the train
step as it was before balancing existed (bit for bit), and jit over a mesh against pmap.

The two-task quadratic: ``l_t(theta) = 1/2 ||theta - m_t||^2`` at ``theta = 0`` has gradients
``g_t = -m_t``; with ``m_1 = (-1, 0)``, ``m_2 = (1, -1)``: ``g_1 = (1, 0)``, ``g_2 = (-1, 1)``,
``<g_1, g_2> = -1`` (they conflict), ``K = [[1, -1], [-1, 2]]``.
"""

from __future__ import annotations

import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import optimize

from apem_jax import balancing as bl
from apem_jax import config_validation, losses, parallel, step as step_lib
from apem_jax.models import build_model
from apem_jax.models.defaults import default_model_config
from apem_jax.schema import CategoricalField, NumericField, Schema, Task, make_schema
from apem_jax.configs import common

M = np.array([[-1.0, 0.0], [1.0, -1.0]], np.float32)  # the quadratic's minima m_t


def _quadratic(theta):
  """The two task losses [2] of the quadratic, with the shared parameter under 'shared'."""
  diff = theta["shared"][None, :] - jnp.asarray(M)
  return 0.5 * jnp.sum(diff * diff, axis=1), None


def _quadratic_grads():
  theta = {"shared": jnp.zeros((2,), jnp.float32)}
  values, grads, _ = bl.task_gradients(_quadratic, theta)
  return values, grads, {"shared": True}


# --------------------------------------------------------------------------------------------
# Per-task gradients
# --------------------------------------------------------------------------------------------

def test_task_gradients_equal_the_jacobian():
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)

  def fn(p):
    h = jnp.tanh(x @ p["a"] + p["b"])  # [5, 4]
    return jnp.stack([jnp.sum(h ** 2), jnp.sum(jnp.sin(h)), jnp.mean(h[:, 0])]), jnp.sum(h)

  values, grads, aux = bl.task_gradients(fn, params)
  chex.assert_trees_all_close(values, fn(params)[0], atol=1e-6)
  chex.assert_trees_all_close(aux, fn(params)[1], atol=1e-6)
  chex.assert_trees_all_close(grads, jax.jacrev(lambda p: fn(p)[0])(params), atol=1e-5)
  values, grads, _ = _quadratic_grads()
  np.testing.assert_allclose(grads["shared"], [[1.0, 0.0], [-1.0, 1.0]])
  np.testing.assert_allclose(bl.gram(grads, {"shared": True}), [[1.0, -1.0], [-1.0, 2.0]])


# --------------------------------------------------------------------------------------------
# Gradient surgery on the quadratic
# --------------------------------------------------------------------------------------------

def _surgery(method, grads, shared, **kwargs):
  k = bl.gram(grads, shared)
  coefs = bl.Balancing(method, **kwargs).shared_coefficients(k, (True,) * k.shape[0],
                                                             jax.random.key(0))
  return coefs, bl.combine(grads, shared, coefs, jnp.ones_like(coefs))


def test_pcgrad_removes_exactly_the_conflicting_component():
  _, grads, shared = _quadratic_grads()
  coefs, update = _surgery("pcgrad", grads, shared)
  # By hand: g1^PC = g1 - <g1,g2>/|g2|^2 g2 = (1,0) + (-1,1)/2 = (0.5, 0.5);
  #          g2^PC = g2 - <g2,g1>/|g1|^2 g1 = (-1,1) + (1,0) = (0, 1); the update is their sum,
  # (g1 + g2/2) + (g2 + g1) = 2 g1 + 1.5 g2.
  np.testing.assert_allclose(coefs, [2.0, 1.5], atol=1e-6)
  np.testing.assert_allclose(update["shared"], [0.5, 1.5], atol=1e-6)
  # The update is the sum of the two projections of the computed task gradients, each orthogonal
  # to the gradient it conflicted with: the conflict is gone.
  g = np.asarray(grads["shared"], np.float64)
  g1_pc = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]
  g2_pc = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]
  np.testing.assert_allclose(g1_pc + g2_pc, np.asarray(update["shared"]), atol=1e-6)
  assert abs(g1_pc @ g[1]) < 1e-7 and abs(g2_pc @ g[0]) < 1e-7
  # Gradients that do not conflict are left alone: the update is their sum.
  theta = {"shared": jnp.zeros((2,), jnp.float32)}
  agreeing = lambda p: (0.5 * jnp.sum((p["shared"][None] - jnp.array([[-1.0, 0.0], [-1.0, -1.0]]))
                                      ** 2, axis=1), None)
  _, grads2, _ = bl.task_gradients(agreeing, theta)
  coefs2, update2 = _surgery("pcgrad", grads2, shared)
  np.testing.assert_allclose(coefs2, [1.0, 1.0])
  np.testing.assert_allclose(update2["shared"], [2.0, 1.0])


def test_pcgrad_three_tasks_projects_in_a_random_order():
  # g1 conflicts with g2 and g3; g2 and g3 agree. Task 1's result depends on the order it meets
  # the other two in; tasks 2 and 3 only conflict with task 1.
  g = np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, 0.5, 1.0]])
  k = jnp.asarray(g @ g.T, jnp.float32)

  def by_hand(orders):  # Algorithm 1 of Yu et al., on the vectors
    total = np.zeros(3)
    for i, order in enumerate(orders):
      gi = g[i].copy()
      for j in order:
        if gi @ g[j] < 0:
          gi -= gi @ g[j] / (g[j] @ g[j]) * g[j]
      total += gi
    return tuple(np.round(total, 5))

  others = [[j for j in range(3) if j != i] for i in range(3)]
  possible = {by_hand(o) for o in itertools.product(*[(x, x[::-1]) for x in others])}
  got = {tuple(np.round(np.asarray(bl.pcgrad_coefficients(k, jax.random.key(seed))) @ g, 5))
         for seed in range(12)}
  assert len(possible) == 2 and got == possible


def test_mgda_min_norm_point_of_two_gradients():
  _, grads, shared = _quadratic_grads()
  coefs, update = _surgery("mgda", grads, shared)
  # By hand: a_1 = (K22 - K12) / (K11 + K22 - 2 K12) = (2 + 1) / (1 + 2 + 2) = 3/5;
  # d = 0.6 (1, 0) + 0.4 (-1, 1) = (0.2, 0.4), equally good for both tasks: <d, g1> = <d, g2>.
  np.testing.assert_allclose(coefs, [0.6, 0.4], atol=1e-6)
  np.testing.assert_allclose(update["shared"], [0.2, 0.4], atol=1e-6)
  # One gradient inside the other's half-space beyond it: the min-norm point is the smaller one.
  k = jnp.array([[1.0, 2.0], [2.0, 5.0]])  # g1 = (1, 0), g2 = (2, 1): <g1, g2> > |g1|^2
  np.testing.assert_allclose(bl.min_norm_weights(k), [1.0, 0.0], atol=1e-7)


def test_mgda_three_tasks_satisfies_the_optimality_conditions():
  rng = np.random.default_rng(3)
  g = rng.normal(size=(3, 5))
  g[2] = -0.3 * g[0] + 0.2 * rng.normal(size=5)  # a conflicting third task
  k = g @ g.T
  a = np.asarray(bl.min_norm_weights(jnp.asarray(k, jnp.float32)), np.float64)
  assert np.all(a >= -1e-7) and abs(a.sum() - 1.0) < 1e-5
  # KKT of min a^T K a on the simplex: (K a)_t >= a^T K a, with equality where a_t > 0.
  ka, value = k @ a, a @ k @ a
  assert np.all(ka >= value - 1e-5 * np.abs(k).max()), (ka, value)
  np.testing.assert_allclose(ka[a > 1e-3], value, atol=1e-5 * np.abs(k).max())
  ref = optimize.minimize(lambda x: x @ k @ x, np.full(3, 1 / 3), method="SLSQP",
                          bounds=[(0, 1)] * 3,
                          constraints={"type": "eq", "fun": lambda x: x.sum() - 1})
  assert value <= ref.fun + 1e-6 * np.abs(k).max()
  np.testing.assert_allclose(a, ref.x, atol=1e-3)
  assert np.all(a > 1e-3)  # the optimum uses all three: not a vertex or an edge
  # Zero in the hull (three directions at 120 degrees): the min-norm point is 0, at a = 1/3 each.
  g = np.array([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
  np.testing.assert_allclose(bl.min_norm_weights(jnp.asarray(g @ g.T, jnp.float32)), [1 / 3] * 3,
                             atol=1e-5)
  # Frank-Wolfe (the solver beyond 8 tasks) approaches the same value, slowly.
  fw = np.asarray(bl.min_norm_frank_wolfe(jnp.asarray(k, jnp.float32), 2000), np.float64)
  assert value <= fw @ k @ fw <= value + 1e-3 * np.abs(k).max()


def _cagrad_reference(g: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
  """(w, d before the rescale) by SLSQP, as the CAGrad authors' code solves it (float64)."""
  k = g @ g.T
  b = np.full(len(g), 1 / len(g))
  kappa = c * math.sqrt(b @ k @ b + 1e-8)
  res = optimize.minimize(lambda x: x @ k @ b + kappa * math.sqrt(x @ k @ x + 1e-8), b,
                          method="SLSQP", bounds=[(0, 1)] * len(g), options={"ftol": 1e-12},
                          constraints={"type": "eq", "fun": lambda x: x.sum() - 1})
  gw = res.x @ g
  return res.x, b @ g + kappa / (np.linalg.norm(gw) + 1e-8) * gw


def test_cagrad_two_tasks_against_its_numeric_optimum():
  _, grads, shared = _quadratic_grads()
  g = np.array([[1.0, 0.0], [-1.0, 1.0]])
  c = 0.5
  coefs, update = _surgery("cagrad", grads, shared, cagrad_c=c)
  w = np.asarray(bl.cagrad_weights(bl.gram(grads, shared), c))
  # The dual on a fine grid of the simplex edge.
  k, b = g @ g.T, np.full(2, 0.5)
  ys = np.linspace(0.0, 1.0, 200_001)
  ws = np.stack([ys, 1 - ys], 1)
  objective = ws @ k @ b + c * math.sqrt(b @ k @ b + 1e-8) * np.sqrt(
      np.einsum("ni,ij,nj->n", ws, k, ws) + 1e-8)
  np.testing.assert_allclose(w, ws[np.argmin(objective)], atol=2e-5)
  ref_w, ref_d = _cagrad_reference(g, c)
  np.testing.assert_allclose(w, ref_w, atol=1e-4)
  np.testing.assert_allclose(update["shared"] * (1 + c * c), ref_d, atol=1e-4)
  # The primal: d maximises min_t <g_t, d> over the ball |d - g0| <= c |g0| (on its boundary).
  g0 = g.mean(0)
  angles = np.linspace(0, 2 * np.pi, 400_001)
  ds = g0 + c * np.linalg.norm(g0) * np.stack([np.cos(angles), np.sin(angles)], 1)
  best = np.max(np.min(ds @ g.T, axis=1))
  d = np.asarray(update["shared"]) * (1 + c * c)
  assert abs(np.linalg.norm(d - g0) - c * np.linalg.norm(g0)) < 1e-5
  np.testing.assert_allclose(np.min(g @ d), best, atol=1e-6)
  # c = 0 is the mean gradient.
  coefs0, _ = _surgery("cagrad", grads, shared, cagrad_c=0.0)
  np.testing.assert_allclose(coefs0, [0.5, 0.5], atol=1e-6)


def test_cagrad_three_tasks_against_slsqp():
  rng = np.random.default_rng(7)
  g = rng.normal(size=(3, 6))
  g[1] -= 1.2 * g[0]  # conflict
  c = 0.5
  k = jnp.asarray(g @ g.T, jnp.float32)
  w = np.asarray(bl.cagrad_weights(k, c), np.float64)
  coefs = np.asarray(bl.cagrad_coefficients(k, c), np.float64)
  ref_w, ref_d = _cagrad_reference(g, c)
  kk, b = g @ g.T, np.full(3, 1 / 3)
  objective = lambda x: x @ kk @ b + c * math.sqrt(b @ kk @ b + 1e-8) * math.sqrt(x @ kk @ x + 1e-8)
  assert objective(w) <= objective(ref_w) + 1e-4 * abs(objective(ref_w))
  np.testing.assert_allclose(coefs @ g * (1 + c * c), ref_d, rtol=2e-3, atol=2e-3)


def test_cagrad_three_to_six_tasks_is_exact_on_random_problems():
  """Against SLSQP from every vertex and the centre (float64): CAGrad's objective within 1e-6 of
  max|K| (float32 Gram matrices), and d never conflicts with a task where the optimum's does
  not. Frank-Wolfe's 100 steps, the solver before, failed both on some of these problems."""
  rng = np.random.default_rng(1)
  c = 0.5
  weights = jax.jit(lambda k: bl.cagrad_weights(k, c))  # compiled once per number of tasks
  coefficients = jax.jit(lambda k: bl.cagrad_coefficients(k, c))
  for trial in range(40):
    num_tasks, dim = int(rng.integers(3, 7)), int(rng.integers(2, 12))
    g = rng.normal(size=(num_tasks, dim)) * rng.uniform(0.1, 3, size=(num_tasks, 1))
    if trial % 3 == 0:  # a task that conflicts with another
      g[1] = -g[0] * rng.uniform(0.5, 2) + 0.1 * rng.normal(size=dim)
    k, b = g @ g.T, np.full(num_tasks, 1 / num_tasks)
    kappa = c * math.sqrt(b @ k @ b + 1e-8)
    objective = lambda x: x @ k @ b + kappa * math.sqrt(max(x @ k @ x, 0.0) + 1e-8)
    ref = min((optimize.minimize(objective, x0, method="SLSQP", bounds=[(0, 1)] * num_tasks,
                                 constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                                 options={"ftol": 1e-14})
               for x0 in [b] + list(np.eye(num_tasks))), key=lambda r: r.fun)
    w = np.asarray(weights(jnp.asarray(k, jnp.float32)), np.float64)
    assert objective(w) <= ref.fun + 1e-6 * np.abs(k).max(), (trial, objective(w), ref.fun)
    d = np.asarray(coefficients(jnp.asarray(k, jnp.float32)), np.float64) @ g
    gw = ref.x @ g
    d_ref = b @ g + kappa / (np.linalg.norm(gw) + 1e-8) * gw
    assert min(g @ d) >= 0 or min(g @ d_ref) < 0, trial


# --------------------------------------------------------------------------------------------
# Loss weighting
# --------------------------------------------------------------------------------------------

def test_uncertainty_weights_converge_to_one_over_twice_the_loss():
  balancing = bl.Balancing("uncertainty")
  tx = optax.sgd(0.05)
  is_binary = (True, False)  # a BCE task and a squared-error task
  state = balancing.init(2, tx)
  np.testing.assert_allclose(balancing.loss_weights(state, is_binary), [1.0, 0.5])  # s = 0
  task_losses = jnp.array([0.3, 0.8])

  def body(s, _):
    return balancing.update(s, task_losses, tx=tx, is_binary=is_binary), None

  state, _ = jax.lax.scan(body, state, None, length=4000)
  # d/ds [lambda(s) l + s/2] = 0  <=>  lambda = 1 / (2 l), for both kinds of task.
  np.testing.assert_allclose(balancing.loss_weights(state, is_binary), 1 / (2 * task_losses),
                             rtol=1e-4)
  # s = log sigma^2: exp(-s) = 1/(2l) for BCE, exp(-s)/2 = 1/(2l) for squared error.
  np.testing.assert_allclose(state["log_var"], [math.log(0.6), math.log(0.8)], atol=1e-4)


def test_dwa_weights_from_loss_history():
  # By hand: r = (0.5/1.0, 0.9/1.0); exp(r/2) = (1.284025, 1.568312); 2 exp / sum.
  np.testing.assert_allclose(bl.dwa_weights(jnp.array([0.5, 0.9]), jnp.array([1.0, 1.0]), 2.0),
                             [0.900332, 1.099668], atol=1e-6)
  # A loss that fell by half counts as a ratio of 0.5, whatever its scale.
  np.testing.assert_allclose(bl.dwa_weights(jnp.array([5.0, 0.09]), jnp.array([10.0, 0.1]), 2.0),
                             [0.900332, 1.099668], atol=1e-6)
  # Windows of 2 steps: ones until two windows are complete, then the ratio of their means.
  balancing = bl.Balancing("dwa", window=2, temperature=2.0)
  state = balancing.init(2, optax.sgd(1.0))
  steps = [[1.2, 0.8], [0.8, 1.2], [0.4, 0.8], [0.6, 1.0], [9.0, 9.0]]
  seen = []
  for task_losses in steps:
    seen.append(np.asarray(balancing.loss_weights(state, (True, True))))
    state = balancing.update(state, jnp.array(task_losses), tx=None, is_binary=(True, True))
  for w in seen[:4]:
    np.testing.assert_allclose(w, [1.0, 1.0])
  np.testing.assert_allclose(seen[4], [0.900332, 1.099668], atol=1e-6)  # means (0.5, 0.9) / (1, 1)
  np.testing.assert_allclose(state["window_sum"], [9.0, 9.0])  # a window in progress


def test_gradnorm_moves_weights_toward_equal_gradient_norms():
  balancing = bl.Balancing("gradnorm", alpha=1.5)
  tx = optax.sgd(0.05)
  state = balancing.init(2, tx)
  norms = jnp.array([2.0, 1.0])  # ||g_1|| = 2 ||g_2||, same loss ratios: equalise w_t n_t
  k = jnp.diag(norms ** 2)
  losses_now = jnp.array([0.7, 0.4])
  gaps = []
  for _ in range(20):
    w = balancing.loss_weights(state, (True, True))
    gaps.append(float(abs(w[0] * norms[0] - w[1] * norms[1])))
    state = balancing.update(state, losses_now, tx=tx, is_binary=(True, True), gram_matrix=k)
  w = np.asarray(balancing.loss_weights(state, (True, True)))
  assert w[0] < 1.0 < w[1] and abs(w.sum() - 2.0) < 1e-6
  # The gap shrinks step by step, then stays small (|.|'s gradient has a constant size, so plain
  # SGD steps back and forth across the balanced point).
  assert gaps[0] == pytest.approx(1.0)
  assert all(b < a for a, b in zip(gaps[:5], gaps[1:5])), gaps
  assert max(gaps[5:]) < 0.2 * gaps[0], gaps
  np.testing.assert_allclose(state["initial_loss"], losses_now)  # l(0): the first step's

  # Equal norms: the task whose loss fell less (relative to l(0)) gets more weight.
  state = balancing.init(2, tx)
  state = balancing.update(state, jnp.array([1.0, 1.0]), tx=tx, is_binary=(True, True),
                           gram_matrix=jnp.eye(2))
  before = np.asarray(balancing.loss_weights(state, (True, True)))
  np.testing.assert_allclose(before, [1.0, 1.0], atol=1e-6)  # equal norms, equal ratios
  state = balancing.update(state, jnp.array([0.9, 0.5]), tx=tx, is_binary=(True, True),
                           gram_matrix=jnp.eye(2))
  after = np.asarray(balancing.loss_weights(state, (True, True)))
  assert after[0] > 1.0 > after[1]


def test_a_task_of_weight_zero_is_left_out_of_the_loss_weights():
  """Task 2's weight c_2 is 0, so its loss l_2 and gradient are 0. Uncertainty weighting keeps
  its s_2 at 0 (dJ/ds_2 = 1/2 would drive it down without bound: exp(-s_2) overflows float32
  after 89 units and the step turns NaN); GradNorm gives it weight 0 and balances the two active
  tasks as it would without it (counted in its means, it took the active tasks' weight)."""
  active, is_binary = (True, True, False), (True, True, True)
  task_losses = jnp.array([0.3, 0.8, 0.0])
  uncertainty = bl.Balancing("uncertainty")
  tx = optax.sgd(0.05)
  state = uncertainty.init(3, tx)
  for _ in range(200):
    state = uncertainty.update(state, task_losses, tx=tx, is_binary=is_binary, active=active)
  assert float(state["log_var"][2]) == 0.0 and float(state["log_var"][0]) < 0.0

  gradnorm = bl.Balancing("gradnorm", alpha=1.5)
  norms = jnp.array([2.0, 1.0, 0.0])
  with_zero, without = gradnorm.init(3, tx), gradnorm.init(2, tx)
  for _ in range(50):
    with_zero = gradnorm.update(with_zero, task_losses, tx=tx, is_binary=is_binary,
                                gram_matrix=jnp.diag(norms ** 2), active=active)
    without = gradnorm.update(without, task_losses[:2], tx=tx, is_binary=is_binary[:2],
                              gram_matrix=jnp.diag(norms[:2] ** 2))
  # DWA: the softmax over the two active tasks, as if the third were not there.
  np.testing.assert_allclose(
      bl.dwa_weights(jnp.array([0.5, 0.9, 0.0]), jnp.array([1.0, 1.0, 0.0]), 2.0, active),
      [0.900332, 1.099668, 0.0], atol=1e-6)
  w = np.asarray(gradnorm.loss_weights(with_zero, is_binary, active))
  assert w[2] == 0.0 and w.sum() == pytest.approx(2.0)
  np.testing.assert_allclose(w[:2], gradnorm.loss_weights(without, is_binary[:2]), rtol=1e-6)
  assert w[0] < 1.0 < w[1]  # it equalised w_t ||g_t|| of the active tasks


def test_a_step_without_a_tasks_labels_leaves_it_out():
  """Task b is labelled in one step of four (its loss l_b is 0 in the others, for want of labels).
  Uncertainty weighting settled at lambda_b = 1/(2 p l_b) (4.0 here, not 1/(2 l_b) = 1); DWA
  divided b's window sum by every step of the window; GradNorm took a first unlabelled step's 0
  for b's l(0) and counted b in its means at steps without its labels."""
  is_binary, tx = (True, True), optax.adam(1e-2)
  losses, labelled = jnp.array([0.5, 0.5]), jnp.array([True, True])
  alone = jnp.array([0.5, 0.0]), jnp.array([True, False])  # b has no labels

  uncertainty = bl.Balancing("uncertainty")
  state = uncertainty.init(2, tx)
  for k in range(4000):
    task_losses, present = (losses, labelled) if k % 4 == 0 else alone
    state = uncertainty.update(state, task_losses, tx=tx, is_binary=is_binary, labelled=present)
  np.testing.assert_allclose(uncertainty.loss_weights(state, is_binary), [1.0, 1.0], rtol=2e-2)

  # DWA, windows of 2: b's window means are its labelled steps' means.
  dwa = bl.Balancing("dwa", window=2)
  state = dwa.init(2, tx)
  for task_losses, present in [((1.0, 1.0), (True, True)), ((1.0, 0.0), (True, False)),
                               ((0.5, 0.5), (True, True)), ((0.5, 0.5), (True, True))]:
    state = dwa.update(state, jnp.array(task_losses), tx=tx, is_binary=is_binary,
                       labelled=jnp.array(present))
  np.testing.assert_allclose(state["history"], [[0.5, 0.5], [1.0, 1.0]])

  # GradNorm: b's l(0) is its first labelled loss; a step without b's labels is the step
  # GradNorm takes on task a alone, b's weight moving only through the softmax.
  gradnorm = bl.Balancing("gradnorm")
  state = gradnorm.init(2, tx)
  k = jnp.diag(jnp.array([4.0, 1.0]))
  state = gradnorm.update(state, alone[0], tx=tx, is_binary=is_binary, gram_matrix=k,
                          labelled=alone[1])
  np.testing.assert_allclose(state["initial_loss"], [0.5, 0.0])
  state = gradnorm.update(state, jnp.array([0.4, 0.8]), tx=tx, is_binary=is_binary,
                          gram_matrix=k, labelled=labelled)
  np.testing.assert_allclose(state["initial_loss"], [0.5, 0.8])
  # Three tasks, c without labels: its loss and norm (0 here for want of labels) do not enter
  # the step's L_grad.
  logits, initial = jnp.array([0.3, -0.3, 0.1]), jnp.array([0.5, 0.8, 0.6])
  grad = lambda c_loss, c_norm: bl.gradnorm_logits_grad(
      logits, jnp.array([2.0, 1.0, c_norm]), jnp.array([0.4, 0.7, c_loss]), initial, 1.5,
      labelled=jnp.array([True, True, False]))
  np.testing.assert_allclose(grad(0.0, 0.0), grad(0.9, 3.0), rtol=1e-6)
  assert np.abs(np.asarray(grad(0.0, 0.0))).max() > 0.1


def test_cagrad_reads_the_norm_of_the_combined_gradient_from_the_gradients():
  """Three unit gradients at 120 degrees plus a small common part e: g_w for the uniform w is
  e alone, ||e|| = 1e-4, while the Gram matrix's entries are about 1, so sqrt(w^T K w) loses
  every digit of it in float32. With the norm taken from the gradients, d is the exact one."""
  angles = np.deg2rad([90.0, 210.0, 330.0])
  common = np.array([0.0, 0.0, 1e-4])
  g = np.stack([[np.cos(a), np.sin(a), 0.0] for a in angles]) + common  # [3, 3]
  grads = {"shared": jnp.asarray(g, jnp.float32)}
  shared = {"shared": True}
  k = bl.gram(grads, shared)
  balancing = bl.Balancing("cagrad", cagrad_c=0.5)
  coefs = balancing.shared_coefficients(
      k, (True,) * 3, jax.random.key(0), norm_of=lambda w: bl.shared_norm(grads, shared, w))
  ref_w, ref_d = _cagrad_reference(g, 0.5)
  d = np.asarray(coefs, np.float64) @ g * (1 + 0.25)
  np.testing.assert_allclose(d, ref_d, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(ref_d), rtol=1e-3)
  np.testing.assert_allclose(bl.shared_norm(grads, shared, jnp.full((3,), 1 / 3)), 1e-4,
                             rtol=1e-3)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def test_config_keys_and_validation():
  config = common.base_config()
  assert bl.balancing_from_config(config.train) == bl.Balancing("fixed")
  assert bl.balancing_from_config({}) == bl.Balancing("fixed")  # configs saved before balancing
  config.train.update(balancing="cagrad", cagrad_c=0.3)
  assert bl.balancing_from_config(config.train) == bl.Balancing("cagrad", cagrad_c=0.3)
  for key, value, match in [("balancing", "nash", r"train.balancing='nash'; expected one of"),
                            ("balancing_alpha", -1.0, r"train.balancing_alpha=-1.0 must be"),
                            ("balancing_temperature", 0.0, r"train.balancing_temperature=0.0"),
                            ("balancing_window", 0, r"train.balancing_window=0 must be"),
                            ("cagrad_c", -0.5, r"train.cagrad_c=-0.5 must be")]:
    config = common.base_config()
    config.data = ml_collections.ConfigDict(dict(name="synthetic_mmoe"))
    config.model = default_model_config("mmoe")
    config_validation.validate(config)  # the defaults pass
    config.train[key] = value
    with pytest.raises(ValueError, match=match):
      config_validation.validate(config)


# --------------------------------------------------------------------------------------------
# Shared parameters: the name rule against per-element gradients of real models
# --------------------------------------------------------------------------------------------

SCHEMA = make_schema((10, 7, 5), 3, ["a", "b"])
SCHEMA3 = make_schema((10, 7, 5), 3, ["a", "b", "c"])


def _random_batch(schema, batch_size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  vocab = np.asarray(schema.vocab_sizes)
  tasks = schema.num_tasks
  return {"categorical": (rng.integers(0, 1 << 20, (batch_size, len(vocab))) % vocab
                          ).astype(np.int32),
          "numeric": rng.normal(size=(batch_size, len(schema.numeric))).astype(np.float32),
          "labels": (rng.random((batch_size, tasks)) < 0.4).astype(np.float32),
          "label_mask": (rng.random((batch_size, tasks)) < 0.8).astype(np.float32),
          "weight": np.ones((batch_size,), np.float32)}


def _tiny(name: str, **overrides) -> ml_collections.ConfigDict:
  cfg = default_model_config(name)
  cfg.embed_dim = 8
  small = {"apem": dict(num_blocks=1, num_groups=4, tower_hidden=(8,), indicator_hidden=8),
           "mmoe": dict(num_experts=2, expert_hidden=(16,), tower_hidden=(8,)),
           "ple": dict(num_levels=3, expert_hidden=(8,), tower_hidden=(8,)),
           "shared_bottom": dict(bottom_hidden=(16,), tower_hidden=(8,)),
           "single_task": dict(bottom_hidden=(8,), tower_hidden=(8,)),
           "aitm": dict(tower_hidden=(8,), transfer_hidden=(8,))}[name]
  cfg.update(small, **overrides)
  return cfg


@pytest.mark.parametrize("name,schema", [("apem", SCHEMA), ("mmoe", SCHEMA), ("ple", SCHEMA),
                                         ("shared_bottom", SCHEMA), ("single_task", SCHEMA),
                                         ("aitm", SCHEMA3)])
def test_shared_rule_matches_per_element_gradients(name, schema):
  """A leaf called task-specific gets a nonzero gradient from at most one task at each element;
  a leaf called shared has an element that two tasks move."""
  model = build_model(_tiny(name), schema)
  batch = _random_batch(schema)
  params = model.init(jax.random.key(1), step_lib.model_inputs(batch))["params"]
  head = losses.make_head(schema, getattr(model, "output_space", None))

  def task_losses(p):
    logits = model.apply({"params": p}, step_lib.model_inputs(batch))["logits"]
    _, sums = losses.multitask_loss(logits, batch, schema, (1.0,) * schema.num_tasks, head)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), None

  _, grads, _ = jax.jit(lambda p: bl.task_gradients(task_losses, p))(params)
  shared = bl.shared_mask(params, chained=head.chained)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  labels = jax.tree.leaves(shared)
  assert len(flat) == len(labels)
  for (path, g), is_shared in zip(flat, labels):
    tasks_per_element = np.sum(np.asarray(g).reshape(schema.num_tasks, -1) != 0, axis=0)
    where = jax.tree_util.keystr(path)
    if is_shared:
      assert tasks_per_element.max() >= 2, f"{name}{where} is called shared but is not"
    else:
      assert tasks_per_element.max() <= 1, f"{name}{where} is called task-specific but is not"
  assert any(labels) == (name != "single_task") and not all(labels)


def test_shared_rule_chained_funnel_shares_everything():
  params = {"towers": {"kernel_0": jnp.zeros((2, 3, 1))}, "embedding": {"t": jnp.zeros((4, 2))}}
  assert jax.tree.leaves(bl.shared_mask(params, chained=True)) == [True, True]
  assert jax.tree.leaves(bl.shared_mask(params)) == [True, False]  # embedding, towers


# --------------------------------------------------------------------------------------------
# The train step: fixed is today's step; balanced steps under jit on a mesh and pmap
# --------------------------------------------------------------------------------------------

def _reference_init_state(model, tx, rng, example_batch):
  """``step.init_state`` as it was before balancing (commit 3214456)."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init(params_rng, step_lib.model_inputs(example_batch), train=False)["params"]
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
              rng=dropout_rng)


def _reference_train_step(state, batch, *, model, tx, schema, task_weights, head):
  """``step.train_step`` as it was before balancing (commit 3214456; no axis_name)."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    out = model.apply({"params": params}, step_lib.model_inputs(batch), train=True,
                      rngs={"dropout": dropout_rng})
    loss, sums = losses.multitask_loss(out["logits"], batch, schema, task_weights, head)
    return loss, sums

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **sums}


def _bits(tree):
  """PRNG keys as their key data, so that trees compare element by element."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x, tree)


def test_fixed_is_todays_train_step_bit_for_bit():
  model = build_model(_tiny("mmoe", dropout=0.2), SCHEMA)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-3))
  weights = (1.0, 0.7)
  head = step_lib.default_head(model, SCHEMA)
  batches = [_random_batch(SCHEMA, seed=s) for s in range(3)]
  ref_fields = _reference_init_state(model, tx, jax.random.key(0), batches[0])
  reference = jax.jit(functools.partial(_reference_train_step, model=model, tx=tx, schema=SCHEMA,
                                        task_weights=weights, head=head))
  for balancing in (None, bl.Balancing("fixed")):
    state = step_lib.init_state(model, tx, jax.random.key(0), batches[0], balancing=balancing)
    assert state.balance == {}
    chex.assert_trees_all_equal(_bits({k: getattr(state, k) for k in ref_fields}),
                                _bits(ref_fields))
    ref = state
    step, _ = step_lib.bind_steps(model, tx, SCHEMA, weights, balancing=balancing)
    step = jax.jit(step)
    for batch in batches:
      state, metrics = step(state, batch)
      ref, ref_metrics = reference(ref, batch)
      chex.assert_trees_all_equal(metrics, ref_metrics)  # the same keys, the same bits
    chex.assert_trees_all_equal(_bits(state), _bits(ref))


def test_uncertainty_step_is_the_gradient_of_its_objective():
  """One SGD step of the real train step = minus the gradient of
  ``J = sum_t exp(-s_t) l_t + s_t / 2`` (binary tasks), written out here independently."""
  model = build_model(_tiny("shared_bottom"), SCHEMA)
  lr = 0.5
  tx = optax.sgd(lr)
  balancing = bl.Balancing("uncertainty")
  batch = _random_batch(SCHEMA, seed=4)
  weights = (1.0, 2.0)
  state = step_lib.init_state(model, tx, jax.random.key(0), batch, balancing=balancing)
  s = jnp.array([0.4, -0.3])
  state = state.replace(balance=dict(state.balance, log_var=s))
  head = step_lib.default_head(model, SCHEMA)

  def objective(params, log_var):
    logits = model.apply({"params": params}, step_lib.model_inputs(batch))["logits"]
    _, sums = losses.multitask_loss(logits, batch, SCHEMA, weights, head)
    task = jnp.asarray(weights) * sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
    return jnp.sum(jnp.exp(-log_var) * task + log_var / 2)

  g_params, g_s = jax.grad(objective, argnums=(0, 1))(state.params, s)
  step, _ = step_lib.bind_steps(model, tx, SCHEMA, weights, balancing=balancing)
  new, metrics = jax.jit(step)(state, batch)
  chex.assert_trees_all_close(new.params, jax.tree.map(lambda p, g: p - lr * g, state.params,
                                                       g_params), atol=1e-6)
  np.testing.assert_allclose(new.balance["log_var"], s - lr * g_s, atol=1e-6)
  np.testing.assert_allclose(metrics["balance_weights"], np.exp(-s), rtol=1e-6)


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm", "dwa"])
def test_the_train_step_leaves_a_task_of_weight_zero_out(method):
  model = build_model(_tiny("shared_bottom"), SCHEMA)
  tx = optax.sgd(0.5)
  balancing = bl.Balancing(method, window=1)
  batch = _random_batch(SCHEMA, seed=4)
  state = step_lib.init_state(model, tx, jax.random.key(0), batch, balancing=balancing)
  step = jax.jit(step_lib.bind_steps(model, tx, SCHEMA, (1.0, 0.0), balancing=balancing)[0])
  for _ in range(3):
    state, metrics = step(state, batch)
  assert float(metrics["balance_weights"][1]) == (1.0 if method == "uncertainty" else 0.0)
  if method == "uncertainty":
    assert float(state.balance["log_var"][1]) == 0.0 and float(state.balance["log_var"][0]) != 0
  if method == "gradnorm":
    assert float(metrics["balance_weights"][0]) == 1.0


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm"])
def test_the_train_step_tells_the_method_which_tasks_had_labels(method):
  """A batch without task b's labels: b's s_b stays at 0 (uncertainty) and its l(0) unset
  (GradNorm): the step passes its label counts to the method."""
  model = build_model(_tiny("shared_bottom"), SCHEMA)
  tx = optax.sgd(0.5)
  balancing = bl.Balancing(method)
  batch = _random_batch(SCHEMA, seed=5)
  batch["label_mask"][:, 1] = 0.0
  state = step_lib.init_state(model, tx, jax.random.key(0), batch, balancing=balancing)
  step = jax.jit(step_lib.bind_steps(model, tx, SCHEMA, (1.0, 1.0), balancing=balancing)[0])
  new, metrics = step(state, batch)
  np.testing.assert_array_equal(metrics["count"] > 0, [True, False])
  if method == "uncertainty":
    assert float(new.balance["log_var"][1]) == 0.0 and float(new.balance["log_var"][0]) != 0.0
  else:
    assert float(new.balance["initial_loss"][1]) == 0.0
    assert float(new.balance["initial_loss"][0]) > 0.0


def test_at_their_start_uncertainty_and_gradnorm_take_fixeds_step_on_a_funnel():
  """Uncertainty (s = 0, binary tasks: lambda = 1) and GradNorm (w = 1) start as ``fixed``: the
  same update, through the weighted-loss path and through the per-task-gradient path, with a
  funnel head (AITM's: direct, with the calibration penalty, added unbalanced)."""
  name = "aitm"
  schema = Schema(categorical=(CategoricalField("item", 10),),
                  numeric=(NumericField("x0"), NumericField("x1")),
                  tasks=(Task("click"), Task("buy", depends_on="click")))
  cfg = default_model_config(name)
  cfg.update(embed_dim=4, tower_hidden=(8,))
  model = build_model(cfg, schema)
  head = step_lib.default_head(model, schema)
  assert head.calibration_weight > 0 and head.dependent
  batch = _random_batch(schema, seed=5)
  tx = optax.sgd(0.1)
  results = {}
  for method in ("fixed", "uncertainty", "gradnorm"):
    balancing = bl.Balancing(method)
    state = step_lib.init_state(model, tx, jax.random.key(0), batch, balancing=balancing)
    step, _ = step_lib.bind_steps(model, tx, schema, (1.0, 0.5), balancing=balancing)
    results[method] = jax.jit(step)(state, batch)
  for method in ("uncertainty", "gradnorm"):
    chex.assert_trees_all_close(results[method][0].params, results["fixed"][0].params, atol=1e-6)
    np.testing.assert_allclose(results[method][1]["loss"], results["fixed"][1]["loss"], rtol=1e-6)


def _parallel_runs(model, schema, tx, balancing, batches):
  """Trains with jit over the (8, 1) mesh and with pmap over 8 devices from the same state;
  returns both final states (jit form) and the per-step ``balance_weights``."""
  mesh = parallel.make_mesh()
  weights = (1.0,) * schema.num_tasks
  init = lambda key: step_lib.init_state(model, tx, key, batches[0], balancing=balancing)
  abstract = jax.eval_shape(init, jax.random.key(0))
  sharding = parallel.state_shardings(abstract, mesh, 0)
  make = lambda: jax.jit(init, out_shardings=sharding)(jax.random.key(0))
  jit_step = parallel.jit_train_step(
      step_lib.bind_steps(model, tx, schema, weights, balancing=balancing)[0], mesh, sharding)
  pmap_step = parallel.pmap_train_step(
      step_lib.bind_steps(model, tx, schema, weights, parallel.PMAP_AXIS, balancing=balancing)[0])
  jit_state, pmap_state = make(), parallel.replicate(make())
  jit_weights, pmap_weights = [], []
  for batch in batches:
    jit_state, m_jit = jit_step(jit_state, parallel.global_batch(batch, mesh))
    pmap_state, m_pmap = pmap_step(pmap_state, parallel.pmap_batch(batch))
    jit_weights.append(np.asarray(m_jit["balance_weights"]))
    pmap_weights.append(np.asarray(m_pmap["balance_weights"]))
    np.testing.assert_allclose(float(m_pmap["loss"]), float(m_jit["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_pmap["grad_norm"]), float(m_jit["grad_norm"]), rtol=1e-5)
  return jit_state, parallel.unreplicate(pmap_state, sharding), jit_weights, pmap_weights


@pytest.mark.parametrize("method", ["pcgrad", "cagrad", "uncertainty", "gradnorm"])
def test_jit_on_a_mesh_and_pmap_take_the_same_balanced_step(method):
  model = build_model(_tiny("mmoe"), SCHEMA)
  tx = optax.sgd(0.5)  # an update proportional to the gradient (see tests/test_parallel.py)
  batches = [_random_batch(SCHEMA, seed=10 + s) for s in range(3)]
  counts = {float(batches[0]["label_mask"][i * 8:(i + 1) * 8, 0].sum()) for i in range(8)}
  assert len(counts) > 1, "devices should hold different label counts"
  jit_state, pmap_state, jit_w, pmap_w = _parallel_runs(model, SCHEMA, tx, bl.Balancing(method),
                                                        batches)
  assert int(jit_state.step) == int(pmap_state.step) == 3
  chex.assert_trees_all_close(pmap_state.params, jit_state.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(pmap_state.balance, jit_state.balance, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(pmap_w, jit_w, atol=1e-5, rtol=1e-5)
  # The method did something: its weights or coefficients are not all ones after a step.
  assert not np.allclose(jit_w[-1], 1.0)


def test_the_surgery_key_is_the_same_on_every_device_and_no_dropout_key():
  state = step_lib.TrainState(step=jnp.asarray(3), params={}, opt_state=(),
                              rng=jax.random.key(0))
  keys = jax.pmap(lambda s: (jax.random.key_data(step_lib._dropout_rng(s, "d")),
                             jax.random.key_data(step_lib._surgery_rng(s))), axis_name="d")(
                                 parallel.replicate(state))
  dropout, surgery = (np.asarray(k) for k in keys)
  assert len({tuple(k) for k in dropout}) == 8  # a dropout key per device
  assert len({tuple(k) for k in surgery}) == 1  # one surgery key
  assert tuple(surgery[0]) not in {tuple(k) for k in dropout}
  assert tuple(surgery[0]) != tuple(np.asarray(jax.random.key_data(
      step_lib._dropout_rng(state, None))))
