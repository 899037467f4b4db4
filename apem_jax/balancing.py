"""Task balancing: how the per-task losses, or their gradients, become one update.

Selected by ``train.balancing`` (:func:`balancing_from_config`); the train step
(:mod:`apem_jax.step`) calls the pieces here. Notation: ``L_t`` is task t's masked mean loss of the
batch (:func:`apem_jax.losses.multitask_loss`), ``c_t`` its fixed ``train.task_weights`` entry and
``l_t = c_t L_t`` what every method below sees as "the loss of task t" (the default all-ones
weights leave it alone; a weight scales a task under ``fixed``, ``dwa``, PCGrad, CAGrad and MGDA,
but uncertainty weighting and GradNorm learn weights that cancel a constant factor at their
equilibrium: ``lambda_t l_t`` tends to 1/2, ``w_t ||g_t||`` to the common target). A task whose
``c_t`` is 0 is *inactive*: every method leaves it out (its loss and gradient are 0; uncertainty
weighting would otherwise drive its ``s_t`` down without bound, GradNorm would count it in its
means and hand it the other tasks' weight, MGDA would always return 0). ``g_t = grad l_t`` is the
gradient of one task's loss; ``K = [<g_s, g_t>]`` the ``[T, T]`` Gram matrix of those gradients
restricted to the shared parameters (see *Shared parameters*). The AITM/funnel calibration penalty
(``losses.total_loss``) is never balanced: its gradient is added to every method's update as is.

Loss weighting (one backward pass of ``sum_t lambda_t l_t``, ``lambda`` held constant in it):

* ``fixed`` (default): ``lambda_t = 1``, the step as it always was (bit for bit: the same code).
* ``uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018): learnable log-variances
  ``s_t = log sigma_t^2``, initialised to 0, and the objective
  ``J = sum_t lambda_t(s) l_t + s_t / 2`` with ``lambda_t = exp(-s_t)`` for a binary
  (cross-entropy) task (``1/sigma^2 l + log sigma``) and ``lambda_t = exp(-s_t) / 2`` for a
  regression (squared-error) task (``1/(2 sigma^2) l + log sigma``). The parameters get
  ``sum_t lambda_t g_t``; ``s`` gets ``dJ/ds_t = 1/2 - lambda_t l_t`` and is updated by its own
  instance of the run's optimizer (``tx``: the same schedule, clipping applied to ``s``'s gradient
  alone), kept in the state. For constant losses ``s`` converges to ``lambda_t = 1 / (2 l_t)``
  (both kinds; with ``optimizer.weight_decay`` 0, the default: AdamW's decay also pulls ``s``, and
  GradNorm's ``omega``, towards 0).
* ``dwa`` (Dynamic Weight Average; Liu, Johns & Davison, CVPR 2019):
  ``lambda_t = T exp(r_t / temperature) / sum_s exp(r_s / temperature)`` with
  ``r_t = lbar_t(k-1) / lbar_t(k-2)``, the ratio of task t's mean loss over the last two complete
  windows of ``train.balancing_window`` steps (the paper: epochs; here a fixed number of steps,
  because the step does not know the epoch; the softmax over the active tasks, T of them).
  ``lambda_t = 1`` until two windows are complete;
  temperature ``train.balancing_temperature`` (paper: 2). A task whose previous window's loss is
  0 gets ``r_t = 1``.

Per-task gradients (computed from ONE forward pass and one ``jax.vjp``, whose backward pass is
vmapped over the T one-hot cotangents: :func:`task_gradients`; never T separate backward passes):

* ``gradnorm`` (Chen et al., ICML 2018): weights ``w = T softmax(omega)`` over the T active tasks
  (positive, summing to T as the paper renormalises them; ``omega = 0`` at the start, so
  ``w = 1``). The parameters get
  ``sum_t w_t g_t``. Then ``omega`` takes one step of the run's optimizer on
  ``L_grad = sum_t |w_t n_t - stop_grad(mean_s(w_s n_s) * r_t^alpha)|`` with
  ``n_t = ||g_t||`` over **all shared parameters** (the simpler variant the paper allows in place of
  the last shared layer), ``r_t = lt_t / mean_s lt_s``, ``lt_t = l_t / l_t(0)`` (``l_t(0)``: the
  task's loss at its first step with labels, kept in the state) and
  ``alpha = train.balancing_alpha`` (the paper tunes it per set of tasks; default 1.5).

Gradient surgery on the shared parameters (the task-specific ones always get ``sum_t g_t``); each
method reduces to coefficients ``a`` over the tasks, computed from ``K`` only, and the shared
parameters get ``sum_t a_t g_t``:

* ``pcgrad`` (Yu et al., NeurIPS 2020, Algorithm 1): for each task i, ``g_i^PC = g_i`` and, for
  every other task j in a random order (drawn per step from the state's key, the same on every
  device), if ``<g_i^PC, g_j> < 0``: ``g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j``; the update is
  ``sum_i g_i^PC``. Every ``g_i^PC`` is a combination of the ``g``'s, so the dot products come
  from ``K``.
* ``cagrad`` (Liu et al., NeurIPS 2021, Algorithm 1 and the authors' code): ``g0 = mean_t g_t``,
  ``w = argmin_{w in simplex} <g_w, g0> + c ||g0|| ||g_w||`` (``g_w = sum_t w_t g_t``,
  ``c = train.cagrad_c``, paper 0.5), and ``d = (g0 + c ||g0|| / ||g_w|| g_w) / (1 + c^2)``
  (the code's ``rescale=1``). The objective is convex on the simplex: for two tasks it is
  minimised exactly along the simplex's one edge (the minimum of ``a + b y + k sqrt(q(y))`` over
  ``y in [0, 1]``, in closed form); up to 8 tasks exactly too, as a one-dimensional convex search
  over ``||g_w||`` around quadratic programs solved over every support (:func:`cagrad_weights`);
  beyond, by Frank-Wolfe with the exact line search (``SOLVER_ITERATIONS`` iterations:
  approximate, at times far from the optimum). ``||g0||`` and ``||g_w||`` are norms of the
  combined gradients themselves, not ``sqrt(w^T K w)``, which cancels in float32 when they are
  small beside the ``g_t`` (the case CAGrad is for). ``d`` maximises ``min_t <g_t, d>`` over the
  ball ``||d - g0|| <= c ||g0||`` (before the rescale).
* ``mgda`` (Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of the shared
  gradients, ``a = argmin_{a in simplex} ||sum_t a_t g_t||^2``: in closed form for two tasks
  (``a_1 = clip(<g_2 - g_1, g_2> / ||g_1 - g_2||^2, 0, 1)``), exactly up to 8 tasks (the KKT
  system of every support, solved as one batch; the feasible one of least norm), by Frank-Wolfe
  with the exact two-point line search beyond (their solver's iteration, started from the
  uniform point rather than their best pair). It is the problem that MGDA-UB
  upper-bounds, solved directly on the shared-parameter gradients that are computed anyway, not
  the UB approximation on the shared representation's gradients; no gradient normalisation.
  Known property of MGDA: a task whose gradient is 0 in a batch (no labels there) makes the
  min-norm point 0, and the shared parameters do not move in that step.

A task without labels in a step's (global) batch has ``l_t = 0`` and ``g_t = 0`` for want of
data: uncertainty weighting, DWA and GradNorm leave it out of that step's update of their state
(``Balancing.update``'s ``labelled``); the surgeries see its zero gradient (MGDA: see above).

The scale of the update follows each paper (PCGrad: a sum, like ``fixed``; CAGrad and MGDA: a mean,
convex combination); Adam is insensitive to it, global-norm clipping is not.

Shared parameters (:func:`shared_mask`): a parameter whose gradient depends on more than one task.
The rule reads the parameter's path (the models' names, apem_jax/models): task-specific are the
per-task towers (``towers``, except AITM's, whose tower t feeds step t+1 through ``transfer_*``)
and logit layers (``heads``); APEM's task indicators (``pattern_selector/task_indicators`` and
``indicator_*``); MMoE's ``gates`` (task t's softmax reads only its own columns); the single-task
DNN's ``dnn_t``/``embedding_t``; PLE's last-level task experts and gates and the task gates of the
level before it (``level_<l>_task_<t>_*``: those reach only task t's modules); AITM's last
``transfer_<t>``/``ait_<t>_*`` (only the last step reads them). Everything else is shared. With a
chained funnel head (``TaskHead.chained``: ``p_t = q_t p_parent``) a step's logit reaches its
descendants' losses, so every parameter is treated as shared. tests/test_balancing.py checks the
rule against per-element gradients of APEM, MMoE, PLE, Shared-Bottom, the single-task DNN and
AITM (ESMM outside a funnel has Shared-Bottom's names). A task-specific parameter wrongly called
shared would get ``a_t g_t`` (still task t's own gradient, scaled) and would add to ``K_tt``; a
shared one wrongly called task-specific would get the plain ``sum_t g_t``.

All of it is pure and works the same under ``jax.jit`` over a mesh and under ``jax.pmap``: the
step ``psum``s the per-task losses and per-task gradients first, and every nonlinear function here
runs on the reduced values.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

METHODS = ("fixed", "uncertainty", "dwa", "gradnorm", "pcgrad", "cagrad", "mgda")
LOSS_WEIGHTING = ("fixed", "uncertainty", "dwa")  # one backward pass of a weighted loss
TASK_GRADIENTS = ("gradnorm", "pcgrad", "cagrad", "mgda")  # per-task gradients (vjp + vmap)
SURGERY = ("pcgrad", "cagrad", "mgda")  # shared parameters get sum_t a_t g_t
# Frank-Wolfe iterations: CAGrad and MGDA beyond ENUMERATE_MAX_TASKS tasks (up to it, both are
# solved exactly: every one of the 2^T - 1 supports at once, CAGrad inside a golden-section
# search of GOLDEN_SECTION_ITERATIONS steps).
SOLVER_ITERATIONS = 100
ENUMERATE_MAX_TASKS = 8
GOLDEN_SECTION_ITERATIONS = 48
_EPS = 1e-8  # as in the CAGrad authors' code
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Balancing:
  """A balancing method and its settings (static and hashable: the train step binds it).

  Attributes:
    method: one of :data:`METHODS` (``train.balancing``).
    alpha: GradNorm's asymmetry ``alpha`` (``train.balancing_alpha``).
    temperature: DWA's temperature (``train.balancing_temperature``).
    window: DWA's window in steps (``train.balancing_window``).
    cagrad_c: CAGrad's ``c`` (``train.cagrad_c``).
  """

  method: str = "fixed"
  alpha: float = 1.5
  temperature: float = 2.0
  window: int = 100
  cagrad_c: float = 0.5

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"config: train.balancing={self.method!r}; expected one of {METHODS}")
    for key, value, ok, what in (
        ("balancing_alpha", self.alpha, lambda v: v >= 0, ">= 0"),
        ("balancing_temperature", self.temperature, lambda v: v > 0, "> 0"),
        ("cagrad_c", self.cagrad_c, lambda v: v >= 0, ">= 0")):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"config: train.{key}={value!r} must be a number {what}")
    if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
      raise ValueError(f"config: train.balancing_window={self.window!r} must be an int >= 1")

  @property
  def uses_task_gradients(self) -> bool:
    """Whether the step needs the per-task gradients (else one weighted backward pass)."""
    return self.method in TASK_GRADIENTS

  # ------------------------------------------------------------------------------------------
  # State

  def init(self, num_tasks: int, tx: optax.GradientTransformation) -> dict[str, Any]:
    """The method's state (a small pytree; ``{}`` for stateless methods)."""
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    if self.method == "uncertainty":
      return {"log_var": zeros, "opt_state": tx.init(zeros)}
    if self.method == "dwa":
      return {"window_sum": zeros, "window_labelled": jnp.zeros((num_tasks,), jnp.int32),
              "window_steps": jnp.zeros((), jnp.int32),
              "history": jnp.zeros((2, num_tasks), jnp.float32),
              "windows": jnp.zeros((), jnp.int32)}
    if self.method == "gradnorm":
      return {"logits": zeros, "opt_state": tx.init(zeros), "initial_loss": zeros}
    return {}

  def loss_weights(self, state: Mapping[str, Any], is_binary: Sequence[bool],
                   active: Sequence[bool] | None = None) -> jax.Array:
    """``lambda`` [T] of this step, from the state before it (constants of the backward pass);
    ``active``: per task, whether its weight ``c_t`` is not 0 (default: all)."""
    num_tasks = len(is_binary)
    if self.method == "uncertainty":
      return uncertainty_weights(state["log_var"], is_binary)
    if self.method == "dwa":
      return jnp.where(state["windows"] >= 2,
                       dwa_weights(state["history"][0], state["history"][1], self.temperature,
                                   active),
                       jnp.ones((num_tasks,), jnp.float32))
    if self.method == "gradnorm":
      return gradnorm_weights(state["logits"], active)
    return jnp.ones((num_tasks,), jnp.float32)

  def update(self, state: Mapping[str, Any], task_losses: jax.Array, *,
             tx: optax.GradientTransformation, is_binary: Sequence[bool],
             gram_matrix: jax.Array | None = None,
             active: Sequence[bool] | None = None,
             labelled: jax.Array | None = None) -> dict[str, Any]:
    """The state after a step whose (globally reduced) task losses ``l`` [T] were
    ``task_losses`` (and shared-gradient Gram matrix ``gram_matrix``, for GradNorm); inactive
    tasks (``active``, default all active) keep their ``s_t`` / ``omega_t``. ``labelled`` [T]
    bool (default all): whether the step's (global) batch held labels of the task; a task
    without is left out of the step's update (its ``l_t`` is 0 for want of labels, not because
    it is learnt: uncertainty weighting would lower its ``s_t``, DWA count it in its window's
    mean, GradNorm take it for its initial loss or for a task that trained fastest)."""
    labelled = (jnp.ones((len(is_binary),), bool) if labelled is None
                else jnp.asarray(labelled, bool))
    if self.method == "uncertainty":
      on = jnp.asarray(_active(active, len(is_binary))) & labelled
      grad = jnp.where(on, uncertainty_log_var_grad(state["log_var"], task_losses, is_binary), 0.0)
      updates, opt_state = tx.update(grad, state["opt_state"], state["log_var"])
      return {"log_var": optax.apply_updates(state["log_var"], updates), "opt_state": opt_state}
    if self.method == "dwa":
      return dwa_update(state, task_losses, self.window, labelled)
    if self.method == "gradnorm":
      # l_t(0): the task's first labelled loss (0 until then).
      initial = jnp.where((state["initial_loss"] > 0) | ~labelled, state["initial_loss"],
                          task_losses)
      norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))
      grad = gradnorm_logits_grad(state["logits"], norms, task_losses, initial, self.alpha,
                                  active, labelled)
      updates, opt_state = tx.update(grad, state["opt_state"], state["logits"])
      return {"logits": optax.apply_updates(state["logits"], updates), "opt_state": opt_state,
              "initial_loss": initial}
    return dict(state)

  def shared_coefficients(self, gram_matrix: jax.Array, active: Sequence[bool],
                          rng: jax.Array,
                          norm_of: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Surgery coefficients ``a`` [T] (``sum_t a_t g_t`` on the shared parameters); tasks not
    ``active`` (task weight 0) get 0 and are left out of the problem. ``norm_of(w)``:
    ``||sum_t w_t g_t||`` on the shared parameters for ``w`` [T] (CAGrad's ``||g_w||``; default
    from the Gram matrix)."""
    index = _active_index(active, len(active))
    out = jnp.zeros((len(active),), jnp.float32)
    if not index.size:
      return out
    k = gram_matrix[np.ix_(index, index)]
    # The solvers' small products in full float32 (a platform's default may be TF32 or bfloat16
    # passes, which would flip PCGrad's sign tests and cancel in CAGrad's quadratic forms).
    with jax.default_matmul_precision("highest"):
      if self.method == "pcgrad":
        a = pcgrad_coefficients(k, rng)
      elif self.method == "cagrad":
        sub_norm = None if norm_of is None else (lambda w: norm_of(out.at[index].set(w)))
        a = cagrad_coefficients(k, self.cagrad_c, norm_of=sub_norm)
      elif self.method == "mgda":
        a = min_norm_weights(k)
      else:
        raise ValueError(f"train.balancing={self.method!r} is not a gradient surgery")
    return out.at[index].set(a)


def balancing_from_config(train_config: Mapping[str, Any]) -> Balancing:
  """The :class:`Balancing` of a config's ``train`` section; missing keys take their defaults
  (configs saved before balancing existed). Raises ``ValueError`` naming a bad key."""
  get = train_config.get
  defaults = Balancing()
  return Balancing(method=get("balancing", defaults.method),
                   alpha=get("balancing_alpha", defaults.alpha),
                   temperature=get("balancing_temperature", defaults.temperature),
                   window=get("balancing_window", defaults.window),
                   cagrad_c=get("cagrad_c", defaults.cagrad_c))


# --------------------------------------------------------------------------------------------
# Loss weighting
# --------------------------------------------------------------------------------------------

def uncertainty_weights(log_var: jax.Array, is_binary: Sequence[bool]) -> jax.Array:
  """``lambda_t = exp(-s_t)`` (binary) or ``exp(-s_t) / 2`` (regression)."""
  return jnp.exp(-log_var) * jnp.where(jnp.array(is_binary), 1.0, 0.5)


def uncertainty_log_var_grad(log_var: jax.Array, task_losses: jax.Array,
                             is_binary: Sequence[bool]) -> jax.Array:
  """``dJ/ds_t = 1/2 - lambda_t l_t`` of ``J = sum_t lambda_t(s) l_t + s_t / 2``."""
  return 0.5 - uncertainty_weights(log_var, is_binary) * task_losses


def dwa_weights(previous: jax.Array, before: jax.Array, temperature: float,
                active: Sequence[bool] | None = None) -> jax.Array:
  """``T_a softmax(r / temperature)`` over the ``T_a`` active tasks (default all; 0 for the
  others), ``r = previous / before`` (1 where ``before`` is 0)."""
  ratio = jnp.where(before > 0, previous / jnp.where(before > 0, before, 1.0), 1.0)
  return _active_softmax(ratio / temperature, active)


def dwa_update(state: Mapping[str, Any], task_losses: jax.Array, window: int,
               labelled: jax.Array | None = None) -> dict[str, Any]:
  """Adds a step's losses to the current window; a full window becomes ``history[0]`` (per task,
  its mean over the window's steps whose batch held the task's labels, ``labelled`` [T], default
  all; a task without any keeps its previous mean) and the previous one ``history[1]``."""
  labelled = jnp.ones(task_losses.shape, bool) if labelled is None else labelled
  total = state["window_sum"] + jnp.where(labelled, task_losses, 0.0)
  count = state["window_labelled"] + labelled.astype(jnp.int32)
  steps = state["window_steps"] + 1
  full = steps >= window
  mean = jnp.where(count > 0, total / jnp.maximum(count, 1), state["history"][0])
  history = jnp.where(full, jnp.stack([mean, state["history"][0]]), state["history"])
  return {"window_sum": jnp.where(full, 0.0, total),
          "window_labelled": jnp.where(full, 0, count), "window_steps": jnp.where(full, 0, steps),
          "history": history, "windows": jnp.minimum(state["windows"] + full, 2)}


def _active(active: Sequence[bool] | None, num_tasks: int) -> tuple[bool, ...]:
  return (True,) * num_tasks if active is None else tuple(bool(a) for a in active)


def _active_index(active: Sequence[bool] | None, num_tasks: int) -> np.ndarray:
  """The indices of the active tasks (default all), static."""
  return np.flatnonzero(_active(active, num_tasks))


def _active_softmax(x: jax.Array, active: Sequence[bool] | None) -> jax.Array:
  """``T_a softmax(x)`` over the ``T_a`` active entries of x [T] (default all); 0 elsewhere."""
  index = _active_index(active, x.shape[0])
  return jnp.zeros_like(x).at[index].set(len(index) * jax.nn.softmax(x[index]))


def gradnorm_weights(logits: jax.Array, active: Sequence[bool] | None = None) -> jax.Array:
  """``w = T_a softmax(omega)`` over the ``T_a`` active tasks (default all); 0 for the others."""
  return _active_softmax(logits, active)


def gradnorm_logits_grad(logits: jax.Array, norms: jax.Array, task_losses: jax.Array,
                         initial_losses: jax.Array, alpha: float,
                         active: Sequence[bool] | None = None,
                         labelled: jax.Array | None = None) -> jax.Array:
  """The gradient w.r.t. ``omega`` of ``L_grad = sum_t |w_t n_t - target_t|`` (module doc), its
  sum and means over the active tasks with labels in the step only (the weights ``w`` stay
  a softmax over every active task).

  Args:
    logits: ``omega`` [T]; norms: ``n_t = ||g_t||`` on the shared parameters [T];
    task_losses: ``l_t`` [T]; initial_losses: ``l_t(0)`` [T]; alpha: the asymmetry;
    active: per task, whether its weight ``c_t`` is not 0 (default: all);
    labelled: [T] bool, whether the step's batch held the task's labels (default: all).
  """
  index = _active_index(active, logits.shape[0])
  norms, task_losses, initial_losses = norms[index], task_losses[index], initial_losses[index]
  on = (jnp.ones(index.shape, bool) if labelled is None else jnp.asarray(labelled)[index])
  present = jnp.maximum(jnp.sum(on), 1)
  mean = lambda x: jnp.sum(jnp.where(on, x, 0.0)) / present
  ratio = jnp.where(initial_losses > 0, task_losses / jnp.where(initial_losses > 0,
                                                                initial_losses, 1.0), 1.0)
  relative = ratio / jnp.maximum(mean(ratio), 1e-12)
  weights = lambda w: gradnorm_weights(w, active)[index]
  target = jax.lax.stop_gradient(mean(weights(logits) * norms) * relative ** alpha)
  return jax.grad(lambda w: jnp.sum(jnp.where(on, jnp.abs(weights(w) * norms - target), 0.0)))(
      logits)


# --------------------------------------------------------------------------------------------
# Per-task gradients and shared parameters
# --------------------------------------------------------------------------------------------

def task_gradients(fn: Callable, params: Any) -> tuple[jax.Array, Any, Any]:
  """``fn(params) -> (values [n], aux)``: returns ``(values, grads, aux)`` where ``grads`` is
  ``params``' pytree with a leading axis [n]: the gradient of each value. One forward pass and
  one ``jax.vjp``, its backward pass vmapped over the n one-hot cotangents."""
  values, vjp_fn, aux = jax.vjp(fn, params, has_aux=True)
  (grads,) = jax.vmap(vjp_fn)(jnp.eye(values.shape[0], dtype=values.dtype))
  return values, grads, aux


def _names(path: tuple) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shared_mask(params: Any, chained: bool = False) -> Any:
  """``params``' pytree of Python bools: True for a shared parameter (the rule in the module
  doc). Static: it reads names only."""
  top = set(params) if isinstance(params, Mapping) else set()
  levels = [int(m.group(1)) for k in top if (m := re.fullmatch(r"level_(\d+)_.*", k))]
  last_level = max(levels) if levels else None
  transfers = [int(m.group(1)) for k in top if (m := re.fullmatch(r"transfer_(\d+)", k))]
  last_transfer = max(transfers) if transfers else None

  def task_specific(names: tuple[str, ...]) -> bool:
    if chained:
      return False
    first = names[0]
    if "heads" in names:
      return True
    if "towers" in names:
      return last_transfer is None
    if first == "pattern_selector" and len(names) > 1 and (
        names[1] == "task_indicators" or names[1].startswith("indicator_")):
      return True
    if first == "gates" or re.fullmatch(r"(dnn|embedding)_\d+", first):
      return True
    m = re.fullmatch(r"level_(\d+)_task_\d+_(experts|gate)", first)
    if m and last_level is not None:
      level = int(m.group(1))
      return level == last_level or (level == last_level - 1 and m.group(2) == "gate")
    if last_transfer is not None and re.fullmatch(
        rf"transfer_{last_transfer}|ait_{last_transfer}_\w+", first):
      return True
    return False

  return jax.tree_util.tree_map_with_path(lambda p, _: not task_specific(_names(p)), params)


def gram(task_grads: Any, shared: Any) -> jax.Array:
  """``K = [<g_s, g_t>]`` [T, T] over the shared leaves of per-task gradients [T, ...]."""
  leaves = [g for g, s in zip(jax.tree.leaves(task_grads), jax.tree.leaves(shared)) if s]
  num_tasks = jax.tree.leaves(task_grads)[0].shape[0]
  k = jnp.zeros((num_tasks, num_tasks), jnp.float32)
  for g in leaves:
    flat = g.reshape(num_tasks, -1).astype(jnp.float32)
    k = k + jnp.matmul(flat, flat.T, precision=_HIGHEST)
  return k


def combine(task_grads: Any, shared: Any, shared_coefs: jax.Array,
            specific_coefs: jax.Array) -> Any:
  """``sum_t a_t g_t`` on the shared leaves, ``sum_t b_t g_t`` on the others."""
  def one(g, is_shared):
    coefs = (shared_coefs if is_shared else specific_coefs).astype(g.dtype)
    return jnp.tensordot(coefs, g, axes=1, precision=_HIGHEST)
  return jax.tree.map(one, task_grads, shared)


def shared_norm(task_grads: Any, shared: Any, w: jax.Array) -> jax.Array:
  """``||sum_t w_t g_t||`` over the shared leaves of per-task gradients [T, ...]."""
  squares = [jnp.sum(jnp.square(jnp.tensordot(w.astype(g.dtype), g, axes=1, precision=_HIGHEST)
                                .astype(jnp.float32)))
             for g, s in zip(jax.tree.leaves(task_grads), jax.tree.leaves(shared)) if s]
  return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


# --------------------------------------------------------------------------------------------
# Gradient surgery, on the Gram matrix
# --------------------------------------------------------------------------------------------

def pcgrad_coefficients(k: jax.Array, rng: jax.Array) -> jax.Array:
  """``a`` [T] with ``sum_i g_i^PC = sum_t a_t g_t`` (PCGrad, module doc); task i meets the
  others in the order of ``jax.random.permutation(fold_in(rng, i), T)``."""
  num_tasks = k.shape[0]
  rows = []
  for i in range(num_tasks):
    order = jax.random.permutation(jax.random.fold_in(rng, i), num_tasks)
    a = jnp.zeros((num_tasks,), k.dtype).at[i].set(1.0)
    for pos in range(num_tasks):
      j = order[pos]
      dot = a @ k[:, j]  # <g_i^PC, g_j>
      norm2 = k[j, j]
      step = jnp.where((j != i) & (dot < 0) & (norm2 > 0), dot / jnp.where(norm2 > 0, norm2, 1.0),
                       0.0)
      a = a - step * jax.nn.one_hot(j, num_tasks, dtype=k.dtype)
    rows.append(a)
  return jnp.sum(jnp.stack(rows), axis=0)


def _mgda_segment(k: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
  """The ``y in [0, 1]`` minimising ``||(1-y) g_w + y g_s||^2``."""
  uu, uv, vv = w @ k @ w, w @ k @ s, s @ k @ s
  denom = uu + vv - 2.0 * uv
  return jnp.where(denom > 0, jnp.clip((uu - uv) / jnp.where(denom > 0, denom, 1.0), 0.0, 1.0),
                   0.0)


def _simplex_qp_by_support(quad: jax.Array, lin: jax.Array) -> jax.Array:
  """The exact ``argmin_{a in simplex} lin^T a + a^T quad a / 2`` (``quad`` [T, T] positive
  semi-definite) for a few tasks: for every support S (``2^T - 1`` of them, solved as one batch)
  the KKT system ``quad_S a_S + lin_S + mu 1 = 0, 1^T a_S = 1``; the feasible solution
  (``a >= 0``) of smallest objective wins. With ``quad = 2K`` and ``lin = 0`` (MGDA's min-norm
  point; CAGrad's inner problem adds ``lin``), the objective reads the gradients only through
  ``g_a = sum_t a_t g_t``, so an optimal support whose gradients are affinely independent exists
  (Caratheodory), and its system is nonsingular."""
  num_tasks = quad.shape[0]
  masks = jnp.asarray([[(s >> t) & 1 for t in range(num_tasks)]
                       for s in range(1, 2 ** num_tasks)], quad.dtype)  # [S, T]
  top = (quad[None] * masks[:, :, None] * masks[:, None, :]
         + jnp.eye(num_tasks, dtype=quad.dtype)[None] * (1.0 - masks)[:, :, None])
  mat = jnp.concatenate([jnp.concatenate([top, masks[:, :, None]], axis=2),
                         jnp.concatenate([masks[:, None, :],
                                          jnp.zeros((masks.shape[0], 1, 1), quad.dtype)],
                                         axis=2)],
                        axis=1)  # [S, T+1, T+1]
  rhs = jnp.concatenate([-lin[None] * masks, jnp.ones((masks.shape[0], 1), quad.dtype)],
                        axis=1)[:, :, None]
  a = jnp.linalg.solve(mat, rhs)[:, :num_tasks, 0]
  ok = jnp.all(jnp.isfinite(a), axis=1) & jnp.all(a >= -1e-6, axis=1)
  a = jnp.clip(jnp.where(jnp.isfinite(a), a, 0.0), 0.0)
  total = jnp.sum(a, axis=1, keepdims=True)
  ok = ok & (total[:, 0] > 0)
  a = a / jnp.where(total > 0, total, 1.0)
  values = a @ lin + 0.5 * jnp.einsum("si,ij,sj->s", a, quad, a, precision=_HIGHEST)
  return a[jnp.argmin(jnp.where(ok, values, jnp.inf))]


def _min_norm_by_support(k: jax.Array) -> jax.Array:
  """The exact min-norm point ``argmin a^T K a`` for a few tasks (:func:`_simplex_qp_by_support`,
  ``K`` scaled to a unit diagonal maximum: the argmin does not change)."""
  scaled = k / jnp.maximum(jnp.max(jnp.diagonal(k)), 1e-30)
  return _simplex_qp_by_support(2.0 * scaled, jnp.zeros((k.shape[0],), k.dtype))


def min_norm_weights(k: jax.Array, iterations: int = SOLVER_ITERATIONS) -> jax.Array:
  """``argmin_{a in simplex} a^T K a`` (MGDA's min-norm point): closed form for 2 tasks, exact by
  enumerating the supports up to :data:`ENUMERATE_MAX_TASKS` tasks, Frank-Wolfe (Sener & Koltun's
  solver: start uniform, vertex of the smallest ``(K a)_t``, exact line search) beyond."""
  num_tasks = k.shape[0]
  if num_tasks == 1:
    return jnp.ones((1,), k.dtype)
  if num_tasks == 2:
    y = _mgda_segment(k, jnp.array([0.0, 1.0], k.dtype), jnp.array([1.0, 0.0], k.dtype))
    return jnp.stack([y, 1.0 - y])
  if num_tasks <= ENUMERATE_MAX_TASKS:
    return _min_norm_by_support(k)
  return min_norm_frank_wolfe(k, iterations)


def min_norm_frank_wolfe(k: jax.Array, iterations: int = SOLVER_ITERATIONS) -> jax.Array:
  """Frank-Wolfe for the min-norm point (approximate: O(1/iterations) in the objective)."""
  num_tasks = k.shape[0]

  def body(_, a):
    s = jax.nn.one_hot(jnp.argmin(k @ a), num_tasks, dtype=k.dtype)
    y = _mgda_segment(k, a, s)
    return (1.0 - y) * a + y * s

  return jax.lax.fori_loop(0, iterations, body, jnp.full((num_tasks,), 1.0 / num_tasks, k.dtype))


def _cagrad_objective(k: jax.Array, b: jax.Array, kappa: jax.Array, w: jax.Array) -> jax.Array:
  return w @ k @ b + kappa * jnp.sqrt(jnp.maximum(w @ k @ w, 0.0) + _EPS)


def _cagrad_segment(k: jax.Array, b: jax.Array, kappa: jax.Array, w: jax.Array,
                    s: jax.Array) -> jax.Array:
  """The ``y in [0, 1]`` minimising the CAGrad objective at ``w + y (s - w)``: it is
  ``p y + kappa sqrt(A y^2 + B y + C)`` plus a constant, convex, so its minimum is at 0, 1 or a
  root of ``2 p sqrt(q) = -kappa q'``, i.e. of ``A y^2 + B y + (p^2 C - kappa^2 B^2/4) / D = 0``
  with ``D = p^2 - kappa^2 A``: the candidate with the smallest objective wins."""
  d = s - w
  p = d @ k @ b
  a2, b1, c0 = d @ k @ d, 2.0 * (w @ k @ d), w @ k @ w + _EPS
  dd = p * p - kappa * kappa * a2
  ok = (a2 > 0) & (dd != 0)
  const = (p * p * c0 - kappa * kappa * b1 * b1 / 4.0) / jnp.where(ok, dd, 1.0)
  disc = b1 * b1 - 4.0 * a2 * const
  root = jnp.sqrt(jnp.maximum(disc, 0.0))
  denom = jnp.where(ok, 2.0 * a2, 1.0)
  roots = jnp.stack([(-b1 - root) / denom, (-b1 + root) / denom])
  roots = jnp.where(ok & (disc >= 0), jnp.clip(roots, 0.0, 1.0), 0.0)
  candidates = jnp.concatenate([jnp.array([0.0, 1.0], k.dtype), roots])
  values = jax.vmap(lambda y: _cagrad_objective(k, b, kappa, w + y * d))(candidates)
  return candidates[jnp.argmin(values)]


def _cagrad_by_support(k: jax.Array, b: jax.Array, kappa: jax.Array) -> jax.Array:
  """CAGrad's ``w`` for a few tasks, through ``sqrt(x) = min_{r > 0} x / (2r) + r / 2``: the
  objective is ``min_r h(r)``, ``h(r) = min_w <g_w, g0> + kappa (||g_w||^2 / (2r) + r / 2)``,
  jointly convex in (w, r), so ``h`` is convex in ``r`` (the optimum is at ``r = ||g_w||``,
  between 0 and ``max_t ||g_t||``). The inner problem is a quadratic program on the simplex,
  solved exactly (:func:`_simplex_qp_by_support`, scaled by ``r / kappa``); the outer by
  golden-section search over ``r`` (:data:`GOLDEN_SECTION_ITERATIONS` steps: to about 1e-10 of
  ``max_t ||g_t||``)."""
  q = k @ b
  scale = jnp.maximum(jnp.max(jnp.diagonal(k)), 1e-30)
  top = jnp.sqrt(scale)
  kappa = jnp.maximum(kappa, 1e-30)

  def inner(r):
    w = _simplex_qp_by_support(k / scale, (r / kappa) * q / scale)
    value = w @ q + kappa * ((w @ k @ w) / (2.0 * jnp.maximum(r, 1e-30)) + r / 2.0)
    return w, value

  ratio = (math.sqrt(5.0) - 1.0) / 2.0

  lo, hi = jnp.zeros((), k.dtype), top.astype(k.dtype)
  left, right = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  carry = (lo, hi, left, inner(left)[1], right, inner(right)[1])

  def step(_, carry):
    lo, hi, left, f_left, right, f_right = carry
    keep_left = f_left <= f_right  # the minimum is in [lo, right]: left becomes the new right
    new_lo, new_hi = jnp.where(keep_left, lo, left), jnp.where(keep_left, right, hi)
    new = jnp.where(keep_left, new_hi - ratio * (new_hi - new_lo),
                    new_lo + ratio * (new_hi - new_lo))
    f_new = inner(new)[1]
    return (new_lo, new_hi,
            jnp.where(keep_left, new, right), jnp.where(keep_left, f_new, f_right),
            jnp.where(keep_left, left, new), jnp.where(keep_left, f_left, f_new))

  lo, hi, *_ = jax.lax.fori_loop(0, GOLDEN_SECTION_ITERATIONS, step, carry)
  return inner((lo + hi) / 2.0)[0]


def cagrad_weights(k: jax.Array, c: float, iterations: int = SOLVER_ITERATIONS,
                   g0_norm: jax.Array | None = None) -> jax.Array:
  """``w = argmin_{w in simplex} w^T K b + c ||g0|| sqrt(w^T K w)`` (``b = 1/T``): exact line
  search along the simplex edge for 2 tasks, exact (:func:`_cagrad_by_support`) up to
  :data:`ENUMERATE_MAX_TASKS` tasks, Frank-Wolfe from the uniform point beyond.
  ``g0_norm``: ``sqrt(||g0||^2 + eps)`` (default from ``K``)."""
  num_tasks = k.shape[0]
  b = jnp.full((num_tasks,), 1.0 / num_tasks, k.dtype)
  if g0_norm is None:
    g0_norm = jnp.sqrt(jnp.maximum(b @ k @ b, 0.0) + _EPS)
  kappa = c * g0_norm
  if num_tasks == 1:
    return jnp.ones((1,), k.dtype)
  if num_tasks == 2:
    w, s = jnp.array([0.0, 1.0], k.dtype), jnp.array([1.0, 0.0], k.dtype)
    return w + _cagrad_segment(k, b, kappa, w, s) * (s - w)
  if num_tasks <= ENUMERATE_MAX_TASKS:
    return _cagrad_by_support(k, b, kappa)
  return cagrad_frank_wolfe(k, kappa, iterations)


def cagrad_frank_wolfe(k: jax.Array, kappa: jax.Array,
                       iterations: int = SOLVER_ITERATIONS) -> jax.Array:
  """CAGrad's ``w`` (``kappa = c ||g0||``) by Frank-Wolfe from the uniform point, with the exact
  line search (approximate; the solver beyond :data:`ENUMERATE_MAX_TASKS` tasks)."""
  num_tasks = k.shape[0]
  b = jnp.full((num_tasks,), 1.0 / num_tasks, k.dtype)

  def body(_, w):
    grad = k @ b + kappa * (k @ w) / jnp.sqrt(jnp.maximum(w @ k @ w, 0.0) + _EPS)
    s = jax.nn.one_hot(jnp.argmin(grad), num_tasks, dtype=k.dtype)
    return w + _cagrad_segment(k, b, kappa, w, s) * (s - w)

  return jax.lax.fori_loop(0, iterations, body, b)


def cagrad_coefficients(k: jax.Array, c: float, iterations: int = SOLVER_ITERATIONS,
                        norm_of: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """``a`` [T] with ``d = sum_t a_t g_t = (g0 + c ||g0|| / ||g_w|| g_w) / (1 + c^2)``;
  ``norm_of(w)`` gives ``||g_w||`` (and ``||g0||``) from the gradients (default
  ``sqrt(w^T K w)``, which loses its digits when ``g_w`` is small beside the ``g_t``)."""
  num_tasks = k.shape[0]
  b = jnp.full((num_tasks,), 1.0 / num_tasks, k.dtype)
  if norm_of is None:
    norm_of = lambda v: jnp.sqrt(jnp.maximum(v @ k @ v, 0.0))
  g0_norm = jnp.sqrt(jnp.square(norm_of(b).astype(k.dtype)) + _EPS)
  w = cagrad_weights(k, c, iterations, g0_norm)
  gw_norm = norm_of(w).astype(k.dtype)
  return (b + c * g0_norm / (gw_norm + _EPS) * w) / (1.0 + c * c)
