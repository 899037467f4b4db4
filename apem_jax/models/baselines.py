"""Multi-task baselines on the same field embedding (DESIGN.md section 3).

Every model reads the flattened field embedding ``x = FieldEmbedding(batch)`` [B, F*d] and returns
``{'logits': float32 [B, T]}``. Experts and towers are :class:`BatchedMLP` members: each has its own
parameters, initialised independently (so experts differ at initialisation).

``output_space`` (class attribute) tells the losses module how to read the logits:
``'conditional'`` (ESMM: logit t is the conditional step probability, chained by product outside),
``'entire'`` (AITM: every logit is already an entire-space probability), or ``None`` (decided by
the task-head config).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from apem_jax.models import layers
from apem_jax.models.embedding import FieldEmbedding
from apem_jax.models.layers import MLP, PARAM_DTYPE, BatchedMLP, get_dtype
from apem_jax.schema import Schema


def _flat_embedding(schema: Schema, embed_dim: int, dtype: Any, batch, name: str = "embedding"):
  """[B, F*d] flattened field embedding."""
  tokens = FieldEmbedding(schema, embed_dim, dtype, name=name)(batch)
  return tokens.reshape(tokens.shape[0], -1)


def _towers(num_tasks: int, hidden: Sequence[int], dropout: float, dtype, x, train: bool):
  """Per-task towers: x [B, in] or [B, T, in] -> float32 logits [B, T]."""
  out = BatchedMLP(num_tasks, tuple(hidden) + (1,), dropout=dropout, activate_final=False,
                   dtype=dtype, float32_output=True, name="towers")(x, train)
  return out[..., 0].astype(jnp.float32)


def _check_fields(schema: Schema) -> None:
  if schema.num_fields == 0:
    raise ValueError("the schema has no feature fields")


class SingleTask(nn.Module):
  """One fully separate DNN per task (own embedding, bottom and tower): T single-task models."""

  output_space: ClassVar[str | None] = None

  schema: Schema
  embed_dim: int = 16
  bottom_hidden: Sequence[int] = (128, 64)
  tower_hidden: Sequence[int] = (64, 32)
  dropout: float = 0.0
  dtype: Any = "float32"

  @classmethod
  def from_config(cls, cfg, schema: Schema) -> "SingleTask":
    _check_fields(schema)
    return cls(schema=schema, bottom_hidden=layers.require_widths(cfg, "bottom_hidden"),
               tower_hidden=layers.require_widths(cfg, "tower_hidden", allow_empty=True),
               **layers.common_kwargs(cfg))

  @nn.compact
  def __call__(self, batch, train: bool = False):
    dtype = get_dtype(self.dtype)
    logits = []
    for t in range(self.schema.num_tasks):
      x = _flat_embedding(self.schema, self.embed_dim, self.dtype, batch, name=f"embedding_{t}")
      net = MLP(tuple(self.bottom_hidden) + tuple(self.tower_hidden) + (1,), dropout=self.dropout,
                activate_final=False, dtype=dtype, float32_output=True, name=f"dnn_{t}")
      logits.append(net(x, train)[:, 0])
    return {"logits": jnp.stack(logits, axis=1).astype(jnp.float32)}


class SharedBottom(nn.Module):
  """Shared bottom MLP, one tower per task (Caruana 1997)."""

  output_space: ClassVar[str | None] = None

  schema: Schema
  embed_dim: int = 16
  bottom_hidden: Sequence[int] = (128, 64)
  tower_hidden: Sequence[int] = (64, 32)
  dropout: float = 0.0
  dtype: Any = "float32"

  @classmethod
  def from_config(cls, cfg, schema: Schema) -> "SharedBottom":
    _check_fields(schema)
    return cls(schema=schema, bottom_hidden=layers.require_widths(cfg, "bottom_hidden"),
               tower_hidden=layers.require_widths(cfg, "tower_hidden", allow_empty=True),
               **layers.common_kwargs(cfg))

  @nn.compact
  def __call__(self, batch, train: bool = False):
    dtype = get_dtype(self.dtype)
    x = _flat_embedding(self.schema, self.embed_dim, self.dtype, batch)
    x = MLP(self.bottom_hidden, dropout=self.dropout, dtype=dtype, name="bottom")(x, train)
    return {"logits": _towers(self.schema.num_tasks, self.tower_hidden, self.dropout, dtype, x,
                              train)}


class MMoE(nn.Module):
  """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018).

  ``num_experts`` expert MLPs on x; task t mixes them with ``softmax(W_t x)``; towers per task.
  Returns also ``gate_weights`` float32 [B, T, E].
  """

  output_space: ClassVar[str | None] = None

  schema: Schema
  embed_dim: int = 16
  num_experts: int = 8
  expert_hidden: Sequence[int] = (128, 64)
  tower_hidden: Sequence[int] = (64, 32)
  dropout: float = 0.0
  dtype: Any = "float32"

  @classmethod
  def from_config(cls, cfg, schema: Schema) -> "MMoE":
    _check_fields(schema)
    return cls(schema=schema, num_experts=layers.require_int(cfg, "num_experts", 2),
               expert_hidden=layers.require_widths(cfg, "expert_hidden"),
               tower_hidden=layers.require_widths(cfg, "tower_hidden", allow_empty=True),
               **layers.common_kwargs(cfg))

  @nn.compact
  def __call__(self, batch, train: bool = False):
    dtype = get_dtype(self.dtype)
    num_tasks, num_experts = self.schema.num_tasks, self.num_experts
    x = _flat_embedding(self.schema, self.embed_dim, self.dtype, batch)
    experts = BatchedMLP(num_experts, self.expert_hidden, dropout=self.dropout, dtype=dtype,
                         name="experts")(x, train)  # [B, E, D]
    gate_logits = nn.Dense(num_tasks * num_experts, dtype=dtype, param_dtype=PARAM_DTYPE,
                           name="gates")(x).reshape(x.shape[0], num_tasks, num_experts)
    gates = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1)  # [B, T, E]
    mixed = jnp.einsum("bte,bed->btd", gates.astype(dtype), experts)
    return {"logits": _towers(num_tasks, self.tower_hidden, self.dropout, dtype, mixed, train),
            "gate_weights": gates}


class PLE(nn.Module):
  """Progressive Layered Extraction (Tang et al., RecSys 2020): ``num_levels`` CGC levels.

  Each level has ``num_task_experts`` experts per task and ``num_shared_experts`` shared experts.
  Task t's gate mixes its own and the shared experts; the shared gate (all levels but the last)
  mixes every expert and feeds the next level's shared experts. Towers read the last level's
  task outputs.
  """

  output_space: ClassVar[str | None] = None

  schema: Schema
  embed_dim: int = 16
  num_levels: int = 2
  num_shared_experts: int = 2
  num_task_experts: int = 2
  expert_hidden: Sequence[int] = (128, 64)
  tower_hidden: Sequence[int] = (64, 32)
  dropout: float = 0.0
  dtype: Any = "float32"

  @classmethod
  def from_config(cls, cfg, schema: Schema) -> "PLE":
    _check_fields(schema)
    return cls(schema=schema, num_levels=layers.require_int(cfg, "num_levels", 1),
               num_shared_experts=layers.require_int(cfg, "num_shared_experts", 0),
               num_task_experts=layers.require_int(cfg, "num_task_experts", 1),
               expert_hidden=layers.require_widths(cfg, "expert_hidden"),
               tower_hidden=layers.require_widths(cfg, "tower_hidden", allow_empty=True),
               **layers.common_kwargs(cfg))

  @nn.compact
  def __call__(self, batch, train: bool = False):
    dtype = get_dtype(self.dtype)
    num_tasks, et, es = self.schema.num_tasks, self.num_task_experts, self.num_shared_experts
    x = _flat_embedding(self.schema, self.embed_dim, self.dtype, batch)
    task_in = [x] * num_tasks
    shared_in = x
    for level in range(self.num_levels):
      last = level == self.num_levels - 1
      task_experts = [
          BatchedMLP(et, self.expert_hidden, dropout=self.dropout, dtype=dtype,
                     name=f"level_{level}_task_{t}_experts")(task_in[t], train)  # [B, Et, D]
          for t in range(num_tasks)]
      shared_experts = (
          BatchedMLP(es, self.expert_hidden, dropout=self.dropout, dtype=dtype,
                     name=f"level_{level}_shared_experts")(shared_in, train) if es else None)
      new_task_in = []
      for t in range(num_tasks):
        pool = task_experts[t] if es == 0 else jnp.concatenate(
            [task_experts[t], shared_experts], axis=1)  # [B, Et+Es, D]
        gate = nn.Dense(pool.shape[1], dtype=dtype, param_dtype=PARAM_DTYPE,
                        name=f"level_{level}_task_{t}_gate")(task_in[t])
        gate = jax.nn.softmax(gate.astype(jnp.float32), axis=-1).astype(dtype)
        new_task_in.append(jnp.einsum("be,bed->bd", gate, pool))
      if not last and es:  # the shared experts' input to the next level (none without them)
        pool = jnp.concatenate(task_experts + [shared_experts], axis=1)
        gate = nn.Dense(pool.shape[1], dtype=dtype, param_dtype=PARAM_DTYPE,
                        name=f"level_{level}_shared_gate")(shared_in)
        gate = jax.nn.softmax(gate.astype(jnp.float32), axis=-1).astype(dtype)
        shared_in = jnp.einsum("be,bed->bd", gate, pool)
      task_in = new_task_in
    towers_in = jnp.stack(task_in, axis=1)  # [B, T, D]
    return {"logits": _towers(num_tasks, self.tower_hidden, self.dropout, dtype, towers_in, train)}


class ESMM(nn.Module):
  """Entire Space Multi-task Model (Ma et al., SIGIR 2018), generalised to T funnel steps.

  One tower per task on the shared embedding; logit t is the *conditional* logit of step t given
  step t-1 (CTR, CVR, ...). The product p_t = q_1 ... q_t and the entire-space losses are applied
  outside the model (losses module), as ``output_space = 'conditional'`` says.
  """

  output_space: ClassVar[str | None] = "conditional"

  schema: Schema
  embed_dim: int = 16
  tower_hidden: Sequence[int] = (128, 64, 32)
  dropout: float = 0.0
  dtype: Any = "float32"

  @classmethod
  def from_config(cls, cfg, schema: Schema) -> "ESMM":
    _check_fields(schema)
    return cls(schema=schema, tower_hidden=layers.require_widths(cfg, "tower_hidden"),
               **layers.common_kwargs(cfg))

  @nn.compact
  def __call__(self, batch, train: bool = False):
    dtype = get_dtype(self.dtype)
    x = _flat_embedding(self.schema, self.embed_dim, self.dtype, batch)
    return {"logits": _towers(self.schema.num_tasks, self.tower_hidden, self.dropout, dtype, x,
                              train)}


class AITM(nn.Module):
  """Adaptive Information Transfer Multi-task (Xi et al., KDD 2021).

  Shared embedding; per-task towers give q_t [B, D] (D = tower_hidden[-1]). Task t transfers from
  its source s: its funnel parent (``depends_on``) in a funnel schema, else task t-1 (the paper's
  sequence of tasks); the transfer p_s = MLP_t(z_s) (``transfer_hidden`` + a layer of width D) and
  the AIT module attends over u in {p_s, q_t}: ``w_u = softmax_u(<h2(u), h1(u)> / sqrt(D))``,
  ``z_t = sum_u w_u h3(u)`` (h1, h2, h3 linear); a task without a source (the first; a funnel's
  roots) has z_t = q_t. A per-task linear head maps z_t to the logit. Logits are in the
  entire space (``output_space = 'entire'``); the behavioural calibrator is a losses-side term.
  Returns also ``transfer_weights`` float32 [B, T, 2] (weight on [transfer, own]; task 1: [0, 1]).
  """

  output_space: ClassVar[str | None] = "entire"

  schema: Schema
  embed_dim: int = 16
  tower_hidden: Sequence[int] = (128, 64, 32)
  transfer_hidden: Sequence[int] = (32,)
  dropout: float = 0.0
  dtype: Any = "float32"

  @classmethod
  def from_config(cls, cfg, schema: Schema) -> "AITM":
    _check_fields(schema)
    return cls(schema=schema, tower_hidden=layers.require_widths(cfg, "tower_hidden"),
               transfer_hidden=layers.require_widths(cfg, "transfer_hidden", allow_empty=True),
               **layers.common_kwargs(cfg))

  @nn.compact
  def __call__(self, batch, train: bool = False):
    dtype = get_dtype(self.dtype)
    num_tasks, width = self.schema.num_tasks, self.tower_hidden[-1]
    x = _flat_embedding(self.schema, self.embed_dim, self.dtype, batch)
    q = BatchedMLP(num_tasks, self.tower_hidden, dropout=self.dropout, dtype=dtype,
                   name="towers")(x, train)  # [B, T, D]
    own = jnp.broadcast_to(jnp.array([0.0, 1.0], jnp.float32), (x.shape[0], 2))
    z, weights = [], []
    for t in range(num_tasks):
      source = self.schema.parents[t] if self.schema.has_funnel else t - 1
      if source < 0:
        z.append(q[:, t])
        weights.append(own)
        continue
      p = MLP(tuple(self.transfer_hidden) + (width,), dropout=self.dropout, dtype=dtype,
              name=f"transfer_{t}")(z[source], train)  # [B, D]
      u = jnp.stack([p, q[:, t]], axis=1)  # [B, 2, D]
      dense = lambda n: nn.Dense(width, dtype=dtype, param_dtype=PARAM_DTYPE,
                                 name=f"ait_{t}_{n}")
      h1, h2, h3 = dense("query")(u), dense("key")(u), dense("value")(u)
      score = jnp.sum(h1 * h2, axis=-1).astype(jnp.float32) / jnp.sqrt(float(width))  # [B, 2]
      w = jax.nn.softmax(score, axis=-1)
      weights.append(w)
      z.append(jnp.einsum("bu,bud->bd", w.astype(dtype), h3))
    z = jnp.stack(z, axis=1)  # [B, T, D]
    logits = BatchedMLP(num_tasks, (1,), activate_final=False, dtype=dtype, float32_output=True,
                        name="heads")(z)
    return {"logits": logits[..., 0].astype(jnp.float32),
            "transfer_weights": jnp.stack(weights, axis=1)}
