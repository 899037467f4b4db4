"""Task heads and masked multi-task losses (pure JAX).

Binary tasks use cross-entropy on probabilities computed from the logits, regression tasks squared
error. Every task's loss is averaged over the examples whose label is present (``label_mask``)
and that are real (``weight``), then the tasks are combined with per-task weights.

**Conversion funnels** (DESIGN.md section 2, "Task heads"). A task that ``depends_on`` an earlier
one is a later step of a funnel (impression -> click -> conversion): it can only happen where its
parent step did. A :class:`TaskHead` says how the logits are read:

* *chained* (``train.funnel='entire_space'`` or ``'conditional'``, and always for ESMM, whose
  ``output_space`` is ``'conditional'``): ``logit_t`` is the conditional logit of step t given its
  parent, ``q_t = sigmoid(logit_t)``, and the entire-space probability is the product along the
  chain, ``p_t = q_t * p_parent(t)`` (``p_t = q_1 ... q_t`` for a chain). ``log p_t`` is a sum of
  log-sigmoids, and ``1 - p_t = (1 - p_parent) + p_parent (1 - q_t)`` makes ``log(1 - p_t)`` a
  ``logaddexp`` of them: the loss and its gradient are exact and finite for any logits (nothing
  is clipped, so no gradient is cut off where the model is confidently wrong);
* *direct* (``train.funnel='off'``, and always for AITM, whose ``output_space`` is ``'entire'``):
  ``logit_t`` is already the entire-space logit, ``p_t = sigmoid(logit_t)``, and the conditional
  probability is reported as ``q_t = min(p_t / p_parent(t), 1)``. Nothing makes ``p_t <= p_parent``
  hold; the calibration penalty below pushes towards it.

The loss of every binary task is ``BCE(p_t, y_t)`` over all impressions (the *entire space*), where
``y_t`` is 1 only if the example went through step t. ``train.funnel='conditional'`` is the classic
baseline instead: a dependent step's ``q_t`` is trained only on examples whose parent step
happened (``BCE(q_t, y_t)`` masked by the parent's label), which fits the conversion rate on the
clicked population only (sample selection bias on the rest). The optional calibration penalty
(AITM's behavioural expectation calibrator, generic here) adds
``calibration_weight * sum_t mean_examples(max(p_t - p_parent(t), 0))`` over dependent tasks.

Predictions are ``{'predictions': p [B, T], 'conditional': q [B, T]}``: entire-space
probabilities (e.g. pCTR, pCTCVR) and conditional ones (e.g. pCTR, pCVR); a root task has
``q = p``; regression tasks give their value in both.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from apem_jax.schema import Schema

FUNNEL_MODES = ("entire_space", "conditional", "off")
OUTPUT_SPACES = (None, "conditional", "entire")
# AITM's published calibrator weight (Xi et al. 2021): the default for models that emit
# entire-space probabilities directly.
AITM_CALIBRATION_WEIGHT = 0.6
_LOG_Q_MAX = -1e-7  # the direct head's log q is clipped to this before log(1 - q): q <= 1 - 1e-7


@dataclasses.dataclass(frozen=True)
class TaskHead:
  """How logits become predictions and losses. Static and hashable: the steps bind it.

  Attributes:
    is_binary: per task, whether it is binary (else regression).
    parents: per task, the index of the task it depends on, -1 for none (``Schema.parents``).
    chained: logits are conditional and ``p_t = q_t * p_parent``; else they are entire-space.
    conditional_loss: train a dependent step's ``q_t`` only where its parent step happened.
    calibration_weight: weight of the penalty ``sum_t mean(max(p_t - p_parent, 0))``.
  """

  is_binary: tuple[bool, ...]
  parents: tuple[int, ...]
  chained: bool = False
  conditional_loss: bool = False
  calibration_weight: float = 0.0

  @property
  def num_tasks(self) -> int:
    return len(self.parents)

  @property
  def dependent(self) -> tuple[int, ...]:
    """Indices of the tasks that depend on another."""
    return tuple(t for t, parent in enumerate(self.parents) if parent >= 0)


def make_head(schema: Schema, output_space: str | None = None, funnel: str = "entire_space",
              calibration_weight: float | None = None) -> TaskHead:
  """The head of a model (its ``output_space`` class attribute) on ``schema``'s tasks.

  Args:
    schema: the tasks; ``depends_on`` makes funnel steps.
    output_space: the model's: ``None`` (the funnel mode decides), ``'conditional'`` (ESMM: always
      chained) or ``'entire'`` (AITM: always direct).
    funnel: ``train.funnel``: ``'entire_space'`` (chained, entire-space loss), ``'conditional'``
      (chained, a step's loss only where its parent happened) or ``'off'`` (direct).
    calibration_weight: ``train.calibration_weight``; None: 0.6 for ``output_space='entire'``
      (AITM), 0 otherwise.

  Raises:
    ValueError naming the config key, for an unknown mode, a mode the model cannot run in, or a
    negative weight.
  """
  if funnel not in FUNNEL_MODES:
    raise ValueError(f"config: train.funnel={funnel!r}; expected one of {FUNNEL_MODES}")
  if output_space not in OUTPUT_SPACES:
    raise ValueError(f"model output_space={output_space!r}; expected one of {OUTPUT_SPACES}")
  if output_space == "conditional" and funnel == "off":
    raise ValueError("config: train.funnel='off' reads logits as independent entire-space "
                     "logits, but this model (ESMM) emits conditional logits chained by product; "
                     "use 'entire_space' or 'conditional'")
  if output_space == "entire" and funnel == "conditional":
    raise ValueError("config: train.funnel='conditional' trains conditional probabilities, but "
                     "this model (AITM) emits entire-space logits; use 'entire_space' (or 'off')")
  if calibration_weight is None:
    calibration_weight = AITM_CALIBRATION_WEIGHT if output_space == "entire" else 0.0
  if calibration_weight < 0:
    raise ValueError(f"config: train.calibration_weight={calibration_weight} must be >= 0")
  chained = schema.has_funnel and (output_space == "conditional" or
                                   (output_space is None and funnel != "off"))
  return TaskHead(is_binary=tuple(t.kind == "binary" for t in schema.tasks),
                  parents=schema.parents, chained=chained,
                  conditional_loss=chained and funnel == "conditional",
                  calibration_weight=float(calibration_weight) if schema.has_funnel else 0.0)


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x <= 0``, stable on both ends (x clipped to <= -1e-7)."""
  x = jnp.minimum(x, _LOG_Q_MAX)
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_probabilities(logits: jax.Array, head: TaskHead) -> dict[str, jax.Array]:
  """Log-probabilities [B, T] of the binary tasks (regression columns are meaningless).

  Returns ``log_p``, ``log_1mp`` (``log(1 - p)``), ``log_q``, ``log_1mq``: entire-space and
  conditional.
  """
  logits = logits.astype(jnp.float32)
  own, own_not = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  log_p, log_1mp, log_q, log_1mq = [], [], [], []
  for t, parent in enumerate(head.parents):
    if parent < 0:  # a root step: q = p = sigmoid(logit), both exact
      log_p.append(own[:, t]), log_1mp.append(own_not[:, t])
      log_q.append(own[:, t]), log_1mq.append(own_not[:, t])
    elif head.chained:  # conditional logit; p_t = q_t * p_parent, a sum of log-sigmoids
      log_p.append(own[:, t] + log_p[parent])
      log_1mp.append(jnp.logaddexp(log_1mp[parent], log_p[parent] + own_not[:, t]))
      log_q.append(own[:, t]), log_1mq.append(own_not[:, t])
    else:  # entire-space logit; q_t = min(p_t / p_parent, 1)
      log_p.append(own[:, t]), log_1mp.append(own_not[:, t])
      log_q.append(jnp.minimum(own[:, t] - log_p[parent], 0.0))
      log_1mq.append(_log1mexp(log_q[-1]))
  stack = lambda xs: jnp.stack(xs, axis=1)
  return {"log_p": stack(log_p), "log_1mp": stack(log_1mp), "log_q": stack(log_q),
          "log_1mq": stack(log_1mq)}


def funnel_predictions(logits: jax.Array, head: TaskHead) -> dict[str, jax.Array]:
  """``{'predictions': p [B, T], 'conditional': q [B, T]}``: entire-space and conditional
  probabilities for binary tasks, the value for regression tasks."""
  logs = log_probabilities(logits, head)
  is_binary = jnp.array(head.is_binary)
  logits = logits.astype(jnp.float32)
  return {"predictions": jnp.where(is_binary, jnp.exp(logs["log_p"]), logits),
          "conditional": jnp.where(is_binary, jnp.exp(logs["log_q"]), logits)}


def task_predictions(logits: jax.Array, schema: Schema, head: TaskHead | None = None) -> jax.Array:
  """Model outputs [B, T] -> predictions [B, T]: entire-space probabilities for binary tasks
  (``p_t``; see the module doc), values for regression tasks. ``head`` defaults to
  ``make_head(schema)``."""
  head = make_head(schema) if head is None else head
  return funnel_predictions(logits, head)["predictions"]


def per_example_losses(logits: jax.Array, labels: jax.Array, schema: Schema,
                       head: TaskHead | None = None) -> jax.Array:
  """Unreduced losses [B, T] of logits [B, T] against labels [B, T] (the head's probabilities:
  ``BCE(q_t, y_t)`` for a dependent step under ``conditional_loss``, ``BCE(p_t, y_t)`` else)."""
  head = make_head(schema) if head is None else head
  logits = logits.astype(jnp.float32)
  logs = log_probabilities(logits, head)
  columns = []
  for t, (binary, parent) in enumerate(zip(head.is_binary, head.parents)):
    y = labels[:, t]
    if not binary:
      columns.append(jnp.square(logits[:, t] - y))
      continue
    space = "q" if head.conditional_loss and parent >= 0 else "p"
    columns.append(-(y * logs[f"log_{space}"][:, t] + (1.0 - y) * logs[f"log_1m{space}"][:, t]))
  return jnp.stack(columns, axis=1)


def total_loss(sums: Mapping[str, jax.Array], task_weights: Sequence[float],
               head: TaskHead) -> jax.Array:
  """The scalar loss from :func:`multitask_loss`'s sums (which may be reduced across devices):
  ``sum_t w_t loss_sum_t / max(count_t, 1) + calibration_weight * penalty_sum / max(examples,
  1)``. Example weights are counts (1 by default): where a batch's labelled weights of a task sum
  below 1 (weights normalised over a dataset), that task's loss is scaled down by the sum.
  (``max(count, 1)`` stays: another form changes how XLA rounds the vmapped runs' program, and
  they no longer equal the runs trained alone.)"""
  task_loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
  total = jnp.sum(jnp.asarray(task_weights, jnp.float32) * task_loss)
  if head.calibration_weight > 0 and head.dependent:
    penalty = sums["penalty_sum"] / jnp.maximum(sums["examples"], 1.0)
    total = total + head.calibration_weight * penalty
  return total


def multitask_loss(logits: jax.Array, batch: Mapping[str, jax.Array], schema: Schema,
                   task_weights: Sequence[float],
                   head: TaskHead | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum over tasks of each task's masked mean loss, plus the calibration penalty.

  Args:
    logits: [B, T] float32.
    batch: holds ``labels`` [B, T], ``label_mask`` [B, T] and ``weight`` [B].
    schema: the tasks.
    task_weights: T non-negative weights.
    head: how to read the logits; default ``make_head(schema)``.

  Returns:
    (scalar loss, sums) where sums holds ``loss_sum`` [T], ``count`` [T], ``penalty_sum`` [] and
    ``examples`` [] so that callers can reduce across batches and devices before normalising
    (:func:`total_loss`). Under ``conditional_loss`` a dependent step counts only the examples
    whose parent label is present and positive.
  """
  head = make_head(schema) if head is None else head
  weight = batch["weight"]
  mask = batch["label_mask"] * weight[:, None]
  # A label whose mask is 0 may hold anything (NaN for a missing one): it is read as 0, so that
  # neither the loss nor its gradient sees it (a masked NaN would still be NaN * 0 = NaN).
  labels = jnp.where(batch["label_mask"] > 0, batch["labels"], 0.0)
  if head.conditional_loss:
    mask = jnp.stack([mask[:, t] if parent < 0 else
                      mask[:, t] * labels[:, parent] * batch["label_mask"][:, parent]
                      for t, parent in enumerate(head.parents)], axis=1)
  losses = per_example_losses(logits, labels, schema, head)
  sums = {"loss_sum": jnp.sum(losses * mask, axis=0), "count": jnp.sum(mask, axis=0),
          "penalty_sum": jnp.zeros((), jnp.float32), "examples": jnp.sum(weight)}
  if head.calibration_weight > 0 and head.dependent:
    p = jnp.exp(log_probabilities(logits, head)["log_p"])
    excess = [jax.nn.relu(p[:, t] - p[:, head.parents[t]]) for t in head.dependent]
    sums["penalty_sum"] = jnp.sum(sum(excess) * weight)
  return total_loss(sums, task_weights, head), sums
