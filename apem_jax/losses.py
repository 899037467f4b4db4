"""Task heads and masked multi-task losses (pure JAX).

Binary tasks use sigmoid cross-entropy on logits, regression tasks squared error. Every task's
loss is averaged over the examples whose label is present (``label_mask``) and that are real
(``weight``), then the tasks are combined with per-task weights.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from apem_jax.schema import Schema


def task_predictions(logits: jax.Array, schema: Schema) -> jax.Array:
  """Model outputs [B, T] -> predictions [B, T]: probabilities for binary tasks, values else."""
  is_binary = jnp.array([t.kind == "binary" for t in schema.tasks])
  return jnp.where(is_binary, jax.nn.sigmoid(logits), logits)


def per_example_losses(logits: jax.Array, labels: jax.Array, schema: Schema) -> jax.Array:
  """Unreduced losses [B, T] of logits [B, T] against labels [B, T]."""
  is_binary = jnp.array([t.kind == "binary" for t in schema.tasks])
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  return jnp.where(is_binary, bce, jnp.square(logits - labels))


def multitask_loss(logits: jax.Array, batch: Mapping[str, jax.Array], schema: Schema,
                   task_weights: Sequence[float]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum over tasks of each task's masked mean loss.

  Args:
    logits: [B, T] float32.
    batch: holds ``labels`` [B, T], ``label_mask`` [B, T] and ``weight`` [B].
    schema: the tasks.
    task_weights: T non-negative weights.

  Returns:
    (scalar loss, sums) where sums holds ``loss_sum`` [T] and ``count`` [T] so that callers can
    reduce across batches and devices before normalising.
  """
  mask = batch["label_mask"] * batch["weight"][:, None]
  losses = per_example_losses(logits.astype(jnp.float32), batch["labels"], schema)
  loss_sum = jnp.sum(losses * mask, axis=0)
  count = jnp.sum(mask, axis=0)
  task_loss = loss_sum / jnp.maximum(count, 1.0)
  total = jnp.sum(jnp.asarray(task_weights, jnp.float32) * task_loss)
  return total, {"loss_sum": loss_sum, "count": count}
