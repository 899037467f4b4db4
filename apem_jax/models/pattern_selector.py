"""Pattern Selector with adaptive task indicators (DESIGN.md section 2).

The paper names "an explicit Pattern Selector" with "adaptive task-indicator vectors"; the
equations are **our reconstruction**:

* pattern bank ``P = concat(fields, groups)`` [B, N = F+G, d];
* indicator ``tau_t(x) = tau_t + g_t(mean_f E_L)`` with ``g_t`` a per-task MLP d -> hidden -> d
  (``adaptive=False``: ``tau_t(x) = tau_t``);
* ``alpha_t = softmax_p(<tau_t(x), W_k P_p> / sqrt(d))``; with ``top_k > 0`` every logit but the
  k largest is masked before the softmax (exactly k non-zero weights);
* ``h_t = sum_p alpha_{t,p} W_v P_p``.

Computed in GEMM shape (the same function): ``<tau, W_k P_p> = <W_k^T tau, P_p>`` and
``sum_p alpha_p (W_v P_p + b_v) = W_v sum_p alpha_p P_p + b_v``, so the projections act on T
vectors per example instead of all F+G patterns.

``enabled=False`` (ablation "no Pattern Selector"): ``h_t = mean_p P_p`` for every task and
alpha is uniform.

``parents`` (``model.funnel_indicators``, for funnels; a candidate design of the APEM issue,
ours): a step's indicator also reads what the step it depends on selected,
``tau_t(x) += U_t h_{parent(t)}`` with ``U_t`` [d, d] initialised at zero (so the model starts as
without it), the steps selected in funnel order: the pattern a step picks can depend on what the
previous step saw, as AITM's transfer of the previous tower's state does for its towers.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apem_jax.models.layers import PARAM_DTYPE, ProjectionParams, get_dtype


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """bool mask [..., N], True at exactly the k largest entries of the last axis (0 = all)."""
  n = logits.shape[-1]
  if k <= 0 or k >= n:
    return jnp.ones(logits.shape, bool)
  _, idx = jax.lax.top_k(logits, k)  # [..., k]
  return jnp.any(idx[..., :, None] == jnp.arange(n), axis=-2)


def task_indicators(module: nn.Module, fields: jax.Array, num_tasks: int, adaptive: bool,
                    hidden: int, dtype) -> jax.Array:
  """tau_t(x) [B, T, d]: the static indicators ``tau_t`` plus, with ``adaptive``,
  ``g_t(mean_f fields)`` (a per-task MLP d -> hidden -> d); their parameters are created in
  ``module`` (called from its compact ``__call__``). fields: [B, F, d] in ``dtype``."""
  batch, _, width = fields.shape
  tau = module.param("task_indicators", nn.initializers.normal(stddev=1.0),
                     (num_tasks, width), PARAM_DTYPE).astype(dtype)  # [T, d]
  tau = jnp.broadcast_to(tau[None], (batch, num_tasks, width))
  if not adaptive:
    return tau
  init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                          out_axis=-1, batch_axis=(0,))
  w1 = module.param("indicator_kernel_1", init, (num_tasks, width, hidden), PARAM_DTYPE)
  b1 = module.param("indicator_bias_1", nn.initializers.zeros, (num_tasks, hidden), PARAM_DTYPE)
  w2 = module.param("indicator_kernel_2", init, (num_tasks, hidden, width), PARAM_DTYPE)
  b2 = module.param("indicator_bias_2", nn.initializers.zeros, (num_tasks, width), PARAM_DTYPE)
  context = jnp.mean(fields, axis=1)  # [B, d]
  g = nn.relu(jnp.einsum("bd,tdh->bth", context, w1.astype(dtype)) + b1.astype(dtype))
  return tau + jnp.einsum("bth,thd->btd", g, w2.astype(dtype)) + b2.astype(dtype)


class PatternSelector(nn.Module):
  """Per-task soft selection over the pattern bank.

  Attributes:
    num_tasks: T.
    parents: per task the index of the task it depends on (-1: none), from the schema; empty:
      no task's indicator reads another's selection.
    top_k: 0 = dense selection; k > 0 keeps only the k largest logits per task.
    adaptive: add the per-sample term g_t(mean_f E_L) to each indicator.
    indicator_hidden: hidden width of g_t.
    enabled: False = mean pooling of the patterns for every task.
    dtype: compute dtype name.
  """

  num_tasks: int
  top_k: int = 0
  adaptive: bool = True
  indicator_hidden: int = 32
  enabled: bool = True
  dtype: Any = "float32"
  parents: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, fields: jax.Array, groups: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fields [B, F, d], groups [B, G, d] -> (h [B, T, d], alpha float32 [B, T, F+G])."""
    dtype = get_dtype(self.dtype)
    fields, groups = fields.astype(dtype), groups.astype(dtype)
    batch, num_fields, width = fields.shape
    num_patterns = num_fields + groups.shape[1]
    tasks = self.num_tasks
    if not self.enabled:
      h = (jnp.sum(fields, axis=1) + jnp.sum(groups, axis=1)) / num_patterns  # mean_p P_p
      h = jnp.broadcast_to(h[:, None], (batch, tasks, width))
      alpha = jnp.full((batch, tasks, num_patterns), 1.0 / num_patterns, jnp.float32)
      return h, alpha

    tau = task_indicators(self, fields, tasks, self.adaptive, self.indicator_hidden, dtype)

    # GEMM shape: <tau, W_k P_p> = <W_k^T tau, P_p>, and since alpha sums to 1 over patterns,
    # sum_p alpha_p (W_v P_p + b_v) = W_v (sum_p alpha_p P_p) + b_v: the projections act on the
    # T indicators and the T selected patterns, not on all F+G patterns of every example.
    # No key bias: it would shift every pattern's logit of a task equally (softmax over patterns).
    w_k, _ = ProjectionParams((width,), (width,), use_bias=False, name="pattern_key")()
    w_v, b_v = ProjectionParams((width,), (width,), name="pattern_value")()
    w_k, w_v, b_v = w_k.astype(dtype), w_v.astype(dtype), b_v.astype(dtype)

    def select(tau_of_tasks: jax.Array) -> tuple[jax.Array, jax.Array]:
      """tau [B, T', d] -> (h [B, T', d], alpha float32 [B, T', F+G])."""
      query = jnp.einsum("btd,ed->bte", tau_of_tasks, w_k) / math.sqrt(width)  # [B, T', d]
      logits = jnp.concatenate([jnp.einsum("btd,bfd->btf", query, fields),
                                jnp.einsum("btd,bgd->btg", query, groups)], axis=-1)
      logits = logits.astype(jnp.float32)  # [B, T', F+G]
      mask = top_k_mask(logits, self.top_k)
      alpha = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
      alpha = jnp.where(mask, alpha, 0.0)  # exact zeros outside the top k
      weights = alpha.astype(dtype)
      selected = (jnp.einsum("btf,bfd->btd", weights[..., :num_fields], fields)
                  + jnp.einsum("btg,bgd->btd", weights[..., num_fields:], groups))  # [B, T', d]
      return selected @ w_v + b_v, alpha

    if not any(p >= 0 for p in self.parents):
      return select(tau)
    if len(self.parents) != tasks or any(not -1 <= p < t for t, p in enumerate(self.parents)):
      raise ValueError(f"PatternSelector: parents {self.parents} must name an earlier task "
                       f"(or -1) for each of the {tasks} tasks")
    u = self.param("parent_kernel", nn.initializers.zeros, (tasks, width, width), PARAM_DTYPE)
    hs, alphas = [], []
    for t, parent in enumerate(self.parents):  # funnel order: a parent is selected first
      tau_t = tau[:, t:t + 1]
      if parent >= 0:
        tau_t = tau_t + (hs[parent] @ u[t].astype(dtype))
      h_t, alpha_t = select(tau_t)
      hs.append(h_t)
      alphas.append(alpha_t)
    return jnp.concatenate(hs, axis=1), jnp.concatenate(alphas, axis=1)

