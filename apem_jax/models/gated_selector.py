"""Pattern Selector as per-task, per-pattern gates (``model.selection='gates'``).

A candidate design of the APEM issue, ours, after the gating of PEPNet (Chang et al., "PEPNet:
Parameter and Embedding Personalized Network for Infusing with Personalized Prior Information",
KDD 2023: EPNet scales the embedding and PPNet the towers' hidden units by ``2 * sigmoid`` gates
computed from a domain or user prior) and of the gated feature selection of FiBiNet++ (Zhang et
al. 2022). The default selector (``pattern_selector.PatternSelector``) averages the pattern bank
into one d-wide vector per task with a softmax; here each task keeps every pattern and scales it:

* task indicators ``tau_t(x)`` as the default selector's (static ``tau_t`` plus, with
  ``adaptive``, ``g_t(mean_f E_L)``);
* gates ``gamma_{t,p} = 2 * sigmoid(<W_k^T tau_t(x), P_p> / sqrt(d))`` in (0, 2), 1 where the
  logit is 0: no pattern is halved on average, and training learns which to damp or amplify
  per task (at initialisation the logits are of order 1, from a random ``W_k`` and ``tau``, so
  the gates spread around 1: about 0.1 to 1.9); with ``top_k > 0`` only the k largest gates of
  a task stay open;
* ``h_t = [gamma_{t,1} P_1 ; ... ; gamma_{t,N} P_N]`` [B, T, N*d]: each tower reads the gated
  patterns (and, as with the default selector, the shared field tokens).

``alpha`` (what ``eval.py --explain`` plots) is ``gamma / 2`` in [0, 1]: a gate per pattern, not a
distribution over patterns. ``enabled=False`` gives every task the ungated bank.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apem_jax.models.layers import ProjectionParams, get_dtype
from apem_jax.models.pattern_selector import task_indicators, top_k_mask


class GatedPatternSelector(nn.Module):
  """Per-task gates over the pattern bank (keyword arguments as ``PatternSelector``'s).

  Attributes:
    num_tasks: T.
    top_k: 0 = every gate open; k > 0 = only each task's k largest gates.
    adaptive: add the per-sample term g_t(mean_f E_L) to each indicator.
    indicator_hidden: hidden width of g_t.
    enabled: False = the ungated bank for every task.
    dtype: compute dtype name.
  """

  num_tasks: int
  top_k: int = 0
  adaptive: bool = True
  indicator_hidden: int = 32
  enabled: bool = True
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, fields: jax.Array, groups: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fields [B, F, d], groups [B, G, d] -> (h [B, T, (F+G)*d], alpha float32 [B, T, F+G])."""
    dtype = get_dtype(self.dtype)
    patterns = jnp.concatenate([fields, groups], axis=1).astype(dtype)  # [B, N, d]
    batch, num_patterns, width = patterns.shape
    tasks = self.num_tasks
    if not self.enabled:
      h = jnp.broadcast_to(patterns.reshape(batch, 1, -1), (batch, tasks, num_patterns * width))
      return h, jnp.full((batch, tasks, num_patterns), 0.5, jnp.float32)

    tau = task_indicators(self, fields.astype(dtype), tasks, self.adaptive,
                          self.indicator_hidden, dtype)  # [B, T, d]

    w_k, _ = ProjectionParams((width,), (width,), use_bias=False, name="pattern_key")()
    query = jnp.einsum("btd,ed->bte", tau, w_k.astype(dtype)) / math.sqrt(width)  # [B, T, d]
    logits = jnp.einsum("btd,bnd->btn", query, patterns).astype(jnp.float32)  # [B, T, N]
    gates = 2.0 * jax.nn.sigmoid(logits)
    gates = jnp.where(top_k_mask(logits, self.top_k), gates, 0.0)
    h = gates.astype(dtype)[..., None] * patterns[:, None]  # [B, T, N, d]
    return h.reshape(batch, tasks, num_patterns * width), gates / 2.0
