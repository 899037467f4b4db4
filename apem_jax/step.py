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
               tx: optax.GradientTransformation, schema: Schema,
               task_weights: Sequence[float]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a batch.

  Returns the new state and ``{"loss": scalar, "loss_sum": [T], "count": [T], "grad_norm": scalar}``.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    out = model.apply({"params": params}, model_inputs(batch), train=True,
                      rngs={"dropout": dropout_rng})
    return losses.multitask_loss(out["logits"], batch, schema, task_weights)

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **sums}


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
              schema: Schema) -> jax.Array:
  """Predictions [B, T] (probabilities for binary tasks) for a batch."""
  out = model.apply({"params": state.params}, model_inputs(batch), train=False)
  return losses.task_predictions(out["logits"], schema)


def bind_steps(model: nn.Module, tx: optax.GradientTransformation, schema: Schema,
               task_weights: Sequence[float]) -> tuple[Callable, Callable]:
  """The two step functions with their static arguments bound."""
  return (functools.partial(train_step, model=model, tx=tx, schema=schema,
                            task_weights=tuple(task_weights)),
          functools.partial(eval_step, model=model, schema=schema))
