"""The train state and the pure step functions.

``train_step(state, batch) -> (state, metrics)`` is one pure function; ``apem_jax.parallel`` wraps
it for devices. Metrics are sums with their denominators, so that they reduce exactly across
devices and batches and are normalised on the host.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from apem_jax import balancing as balancing_lib
from apem_jax import losses, optimizers
from apem_jax.schema import Schema

MODEL_INPUTS = ("categorical", "numeric")


class TrainState(struct.PyTreeNode):
  """Everything a step changes: ``step``, ``params``, ``opt_state``, the dropout key, and the task
  balancing method's state (``balance``: ``{}`` for ``train.balancing='fixed'``; see
  :mod:`apem_jax.balancing`)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  balance: Any = struct.field(default_factory=dict)


def _learning_rate(opt: ml_collections.ConfigDict, peak: float, total_steps: int):
  """``peak``, or ``opt.schedule``'s warmup + cosine decay to it and down to
  ``peak * final_lr_ratio``."""
  if opt.schedule == "constant":
    return peak
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=opt.warmup_steps,
        decay_steps=max(total_steps, opt.warmup_steps + 1), end_value=peak * opt.final_lr_ratio)
  raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {opt.schedule!r}")


def learning_rate_at(config: ml_collections.ConfigDict, total_steps: int, step: int) -> float:
  """The dense layers' learning rate at ``step`` of a run of ``total_steps`` steps."""
  rate = _learning_rate(config.optimizer, config.optimizer.learning_rate, total_steps)
  return float(rate(step)) if callable(rate) else float(rate)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam(W) with optional warmup + cosine decay, from
  ``config.optimizer``; with ``embedding_optimizer`` other than ``'same'``, the embedding tables
  get their own optimizer (:mod:`apem_jax.optimizers`, ``optax.multi_transform``)."""
  opt = config.optimizer
  dense = optax.adamw(_learning_rate(opt, opt.learning_rate, total_steps), b1=opt.b1, b2=opt.b2,
                      weight_decay=opt.weight_decay)
  chain = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  name = opt.get("embedding_optimizer", "same")
  if name == "same":
    chain.append(dense)
  else:
    table_lr = _learning_rate(opt, opt.get("embedding_learning_rate", 0.0) or opt.learning_rate,
                              total_steps)
    chain.append(optimizers.per_group(dense, optimizers.embedding_transform(
        name, table_lr, opt.get("embedding_l2", 0.0), opt.b1, opt.b2)))
  return optax.chain(*chain)


def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in MODEL_INPUTS}


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               example_batch: Mapping[str, jax.Array],
               balancing: balancing_lib.Balancing | None = None) -> TrainState:
  """Fresh parameters, optimizer state and balancing state (``balancing``: default ``fixed``,
  whose state is ``{}``). Pure: ``jax.eval_shape`` and ``jax.jit`` apply to it."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init(params_rng, model_inputs(example_batch), train=False)["params"]
  balance = ({} if balancing is None or balancing.method == "fixed" else
             balancing.init(model.schema.num_tasks, tx))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_rng, balance=balance)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schema: Schema, task_weights: Sequence[float],
               axis_name: str | None = None,
               head: losses.TaskHead | None = None,
               balancing: balancing_lib.Balancing | None = None,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a batch.

  With ``axis_name`` (under ``jax.pmap``), ``batch`` is this device's share of the global batch.
  Each task's loss is then normalised by its global label count (a ``psum``), so the ``psum`` of
  the devices' gradients is exactly the gradient of the global batch's loss (a mean of per-device
  means would not be, when devices hold different numbers of labels), and the metrics are summed
  over the devices: every device returns the global batch's values, as ``jax.jit`` on the whole
  batch would. Each device also draws its own dropout masks: with dropout, the step under pmap
  differs from jit's (and with the number of devices), so a resume keeps the run's mode.

  ``head`` (default: the model's, ``losses.make_head``) says how logits become probabilities and
  losses (funnels: chained product or direct, entire-space or conditional loss, calibration).

  ``balancing`` (default ``fixed``: the fixed ``task_weights``) says how the task losses become one
  update (:mod:`apem_jax.balancing`); any other method is :func:`balanced_train_step`.

  Returns the new state and ``{"loss": scalar, "loss_sum": [T], "count": [T],
  "penalty_sum": scalar, "examples": scalar, "grad_norm": scalar}``.
  """
  if balancing is not None and balancing.method != "fixed":
    return balanced_train_step(state, batch, model=model, tx=tx, schema=schema,
                               task_weights=task_weights, axis_name=axis_name, head=head,
                               balancing=balancing)
  head = default_head(model, schema) if head is None else head
  dropout_rng = _dropout_rng(state, axis_name)

  def loss_fn(params):
    out = model.apply({"params": params}, model_inputs(batch), train=True,
                      rngs={"dropout": dropout_rng})
    loss, sums = losses.multitask_loss(out["logits"], batch, schema, task_weights, head)
    if axis_name is not None:  # this device's share of the global loss (multitask_loss's formula)
      totals = jax.lax.psum({"count": sums["count"], "examples": sums["examples"]}, axis_name)
      loss = losses.total_loss({**sums, **totals}, task_weights, head)
    return loss, sums

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    grads, loss, sums = jax.lax.psum((grads, loss, sums), axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **sums}


# Folded into a step's key for the gradient surgery's key: above any device index, which the
# dropout keys under ``jax.pmap`` fold in.
_SURGERY_KEY = 0xFFFFFFFF


def _dropout_rng(state: TrainState, axis_name: str | None) -> jax.Array:
  """This step's dropout key: the state's key folded with the step (and, under ``jax.pmap``,
  with the device, so each device draws its own masks)."""
  rng = jax.random.fold_in(state.rng, state.step)
  return rng if axis_name is None else jax.random.fold_in(rng, jax.lax.axis_index(axis_name))


def _surgery_rng(state: TrainState) -> jax.Array:
  """This step's key for a gradient surgery's random choices: the same on every device, and
  none of the dropout keys."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _SURGERY_KEY)


def balanced_train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
                        tx: optax.GradientTransformation, schema: Schema,
                        task_weights: Sequence[float], balancing: balancing_lib.Balancing,
                        axis_name: str | None = None, head: losses.TaskHead | None = None,
                        ) -> tuple[TrainState, dict[str, jax.Array]]:
  """:func:`train_step` under a balancing method other than ``fixed``.

  The task losses ``l_t = c_t L_t`` (``c = task_weights``) are formed as in :func:`train_step`
  (under ``axis_name``, each device's share of the global batch's losses). A loss-weighting
  method takes one backward pass of ``sum_t lambda_t l_t`` (``lambda`` from the state); a
  per-task-gradient method takes one forward pass and a vmapped backward pass
  (:func:`apem_jax.balancing.task_gradients`). Under ``axis_name`` the per-task losses and
  gradients are ``psum``-ed before any nonlinear function of them, so ``jax.jit`` and
  ``jax.pmap`` take the same step (without dropout: see :func:`train_step`). The calibration
  penalty's gradient is added unbalanced.

  Metrics: those of :func:`train_step` (``loss`` is ``sum_t l_t`` + penalty, the same number
  ``fixed`` reports) and ``balance_weights`` [T]: the loss weights of this step (``lambda`` or
  GradNorm's ``w``) or, for a surgery, the shared-parameter coefficients ``a``.
  """
  head = default_head(model, schema) if head is None else head
  num_tasks = len(task_weights)
  weights = jnp.asarray(task_weights, jnp.float32)
  active = tuple(w > 0 for w in task_weights)  # a task of weight 0 is left out of balancing
  with_penalty = head.calibration_weight > 0 and bool(head.dependent)
  dropout_rng = _dropout_rng(state, axis_name)

  def task_losses_fn(params):
    """(this device's share of [l_1 .. l_T] (+ the penalty term), the sums)."""
    out = model.apply({"params": params}, model_inputs(batch), train=True,
                      rngs={"dropout": dropout_rng})
    _, sums = losses.multitask_loss(out["logits"], batch, schema, task_weights, head)
    totals = {"count": sums["count"], "examples": sums["examples"]}
    if axis_name is not None:
      totals = jax.lax.psum(totals, axis_name)
    values = weights * sums["loss_sum"] / jnp.maximum(totals["count"], 1.0)
    if with_penalty:
      penalty = head.calibration_weight * sums["penalty_sum"] / jnp.maximum(totals["examples"], 1.0)
      values = jnp.concatenate([values, penalty[None]])
    return values, sums

  if balancing.uses_task_gradients:
    values, task_grads, sums = balancing_lib.task_gradients(task_losses_fn, state.params)
    if axis_name is not None:
      values, task_grads, sums = jax.lax.psum((values, task_grads, sums), axis_name)
    task_values = values[:num_tasks]
    penalty_grads = jax.tree.map(lambda g: g[num_tasks], task_grads) if with_penalty else None
    task_grads = jax.tree.map(lambda g: g[:num_tasks], task_grads)
    shared = balancing_lib.shared_mask(state.params, chained=head.chained)
    k = balancing_lib.gram(task_grads, shared)
    if balancing.method == "gradnorm":
      used = balancing.loss_weights(state.balance, head.is_binary, active)
      grads = balancing_lib.combine(task_grads, shared, used, used)
    else:
      used = balancing.shared_coefficients(
          k, active, _surgery_rng(state),
          norm_of=lambda w: balancing_lib.shared_norm(task_grads, shared, w))
      grads = balancing_lib.combine(task_grads, shared, used, jnp.ones((num_tasks,), jnp.float32))
    if with_penalty:
      grads = jax.tree.map(jnp.add, grads, penalty_grads)
    balance = balancing.update(state.balance, task_values, tx=tx, is_binary=head.is_binary,
                               gram_matrix=k, active=active, labelled=sums["count"] > 0)
  else:
    used = balancing.loss_weights(state.balance, head.is_binary, active)

    def objective(params):
      values, sums = task_losses_fn(params)
      total = jnp.sum(used * values[:num_tasks]) + (values[num_tasks] if with_penalty else 0.0)
      return total, (values, sums)

    (_, (values, sums)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    if axis_name is not None:
      grads, values, sums = jax.lax.psum((grads, values, sums), axis_name)
    task_values = values[:num_tasks]
    balance = balancing.update(state.balance, task_values, tx=tx, is_binary=head.is_binary,
                               active=active, labelled=sums["count"] > 0)

  loss = jnp.sum(values)  # sum_t l_t (+ penalty): what `fixed` reports
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            balance=balance)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), "balance_weights": used,
                     **sums}


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
              schema: Schema, head: losses.TaskHead | None = None) -> dict[str, jax.Array]:
  """Predictions of a batch: ``{'predictions': [B, T], 'conditional': [B, T]}``.

  ``predictions`` are entire-space probabilities ``p_t`` for binary tasks (values for regression
  tasks); ``conditional`` are ``q_t``, the probability of a funnel step given the step it depends
  on (``= p_t`` for a task that depends on none). See :mod:`apem_jax.losses`.
  """
  head = default_head(model, schema) if head is None else head
  out = model.apply({"params": state.params}, model_inputs(batch), train=False)
  return losses.funnel_predictions(out["logits"], head)


def default_head(model: nn.Module, schema: Schema) -> losses.TaskHead:
  """The head a model gets when the config says nothing (``train.funnel='entire_space'``)."""
  return losses.make_head(schema, getattr(model, "output_space", None))


def bind_steps(model: nn.Module, tx: optax.GradientTransformation, schema: Schema,
               task_weights: Sequence[float], axis_name: str | None = None,
               head: losses.TaskHead | None = None,
               balancing: balancing_lib.Balancing | None = None) -> tuple[Callable, Callable]:
  """The two step functions with their static arguments bound (``axis_name``: the train step's,
  for ``jax.pmap``; ``head``: default :func:`default_head`; ``balancing``: default ``fixed``, else
  :func:`apem_jax.balancing.balancing_from_config` of ``config.train``, the same one given to
  :func:`init_state`)."""
  head = default_head(model, schema) if head is None else head
  extra = {} if balancing is None or balancing.method == "fixed" else {"balancing": balancing}
  return (functools.partial(train_step, model=model, tx=tx, schema=schema,
                            task_weights=tuple(task_weights), axis_name=axis_name, head=head,
                            **extra),
          functools.partial(eval_step, model=model, schema=schema, head=head))
