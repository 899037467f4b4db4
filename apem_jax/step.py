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

from apem_jax import losses
from apem_jax.schema import Schema

MODEL_INPUTS = ("categorical", "numeric")


class TrainState(struct.PyTreeNode):
  """Everything a step changes: ``step``, ``params``, ``opt_state``, and the dropout key."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Adam(W) with optional warmup + cosine decay and global-norm clipping, from ``config.optimizer``."""
  opt = config.optimizer
  if opt.schedule == "constant":
    lr = opt.learning_rate
  elif opt.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(total_steps, opt.warmup_steps + 1), end_value=opt.learning_rate * opt.final_lr_ratio)
  else:
    raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {opt.schedule!r}")
  chain = []
  if opt.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  chain.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay))
  return optax.chain(*chain)


def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in MODEL_INPUTS}


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
               example_batch: Mapping[str, jax.Array]) -> TrainState:
  """Fresh parameters and optimizer state. Pure: ``jax.eval_shape`` and ``jax.jit`` apply to it."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init(params_rng, model_inputs(example_batch), train=False)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=dropout_rng)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schema: Schema, task_weights: Sequence[float],
               axis_name: str | None = None,
               head: losses.TaskHead | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a batch.

  With ``axis_name`` (under ``jax.pmap``), ``batch`` is this device's share of the global batch.
  Each task's loss is then normalised by its global label count (a ``psum``), so the ``psum`` of
  the devices' gradients is exactly the gradient of the global batch's loss (a mean of per-device
  means would not be, when devices hold different numbers of labels), and the metrics are summed
  over the devices: every device returns the global batch's values, as ``jax.jit`` on the whole
  batch would. Each device also draws its own dropout masks.

  ``head`` (default: the model's, ``losses.make_head``) says how logits become probabilities and
  losses (funnels: chained product or direct, entire-space or conditional loss, calibration).

  Returns the new state and ``{"loss": scalar, "loss_sum": [T], "count": [T],
  "penalty_sum": scalar, "examples": scalar, "grad_norm": scalar}``.
  """
  head = default_head(model, schema) if head is None else head
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

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
               head: losses.TaskHead | None = None) -> tuple[Callable, Callable]:
  """The two step functions with their static arguments bound (``axis_name``: the train step's,
  for ``jax.pmap``; ``head``: default :func:`default_head`)."""
  head = default_head(model, schema) if head is None else head
  return (functools.partial(train_step, model=model, tx=tx, schema=schema,
                            task_weights=tuple(task_weights), axis_name=axis_name, head=head),
          functools.partial(eval_step, model=model, schema=schema, head=head))
