"""DeepAuto Group Transformer (DAGT) with Squeeze-and-Excitation (DESIGN.md section 2).

The paper (arXiv 2301.02494) names only "a modified set attention" and "Squeeze-and-Excitation";
the block below is **our reconstruction** of those words, specified in DESIGN.md:

1. Automatic grouping (set attention, Set Transformer PMA style). G learned seeds S [G, d] are
   queries, field tokens E [B, F, d] keys/values, H heads of width d/H. Logits
   ``A[b,h,g,f] = <S_g W_q, E_f W_k>_h / sqrt(d/H)``.
   * ``grouping='competitive'`` (the modification): ``a = softmax_G(A)`` (each field distributes
     itself among the groups), then ``w = a / sum_F a`` (renormalised over fields) and each group
     takes ``sum_f w[..., g, f] * (E_f W_v)``.
   * ``grouping='standard'``: plain pooling, ``w = softmax_F(A)``.
   * ``grouping='none'``: no grouping at all; field tokens go straight to SE, no group tokens.
   * ``grouping_temperature`` T divides the grouping logits (1 by default; T < 1 makes each field
     commit to fewer groups, or each group to fewer fields, from initialisation on).
   Heads are projected back to d: ``Z = LN(S + W_o pool)``, then ``Z = LN(Z + FFN(Z))``.
2. Broadcast back: field tokens attend to the group tokens (softmax over G), residual + LN, then a
   position-wise FFN, residual + LN. Cost O(B F G d) per block.
3. SE over fields: a squeeze ``z`` of every field token, ``s = sigmoid(W2 relu(W1 z))`` with
   hidden width ``max(1, F // r)``; ``E <- E * s``. The squeeze (``se_squeeze``):
   * ``'grouped'`` (default): each token's d channels are cut into K contiguous groups and each
     group gives its mean and its max, ``z`` [B, F * 2K] (the squeeze of FiBiNet++'s SENet+,
     Zhang et al. 2022, arXiv 2209.05016).
   * ``'mean'``: ``z = mean_d E`` [B, F] (FiBiNet's SENET, Huang et al. 2019). Kept for the
     ablation table only: the tokens SE reads have just left a LayerNorm, whose output has mean
     zero over d by construction (exactly so at initialisation, where its scale is 1 and its bias
     0). So ``z`` is float round-off (~1e-9), ``relu(W1 z + b1)`` keeps or drops each unit by the
     sign of that round-off, and the gradient of ``W1``, ``b1`` and of the LayerNorm before SE
     depends on the order of float sums (one device against eight, AVX-512 against AVX2).
     Group means and maxima of a normalised token are O(1) and carry what the token holds.

GEMM shape. The block computes the function above, but contracts parameters with each other
before it touches the data, so that the work on the B*F field tokens is a few wide products
instead of per-head projections of every token followed by tiny batched einsums:

* grouping logits: the seed side is parameters only, ``M = W_k (S W_q)^T / sqrt(dh)`` [d, H*G],
  so the logits of a whole batch are one ``[B*F, d] x [d, H*G]`` GEMM, with the softmax over
  groups on the contiguous axis;
* pooling: each group pools the raw tokens first, ``[B, H*G, F] x [B, F, d]``, and the value and
  output projections are applied once per group as one ``[H*d, d]`` matrix ``W_v W_o`` (the
  value bias is scaled by the pooling weights' sum, which is 1 up to the 1e-9 of the
  renormalisation);
* broadcast back: the group side is folded into the query projection,
  ``K_b = W_q2 (Z_b W_k2)^T`` [d, H*G] per example, and the value and output projections into
  ``Z_b W_v2 W_o2`` [H*G, d], so attention is two ``[F, d] x [d, H*G]``-shaped products.

Memory passes. At B = 4096 the step is bound by passes over [B*F, d] = [159744, 16] tensors
(10 MB each), not by FLOPs, so the token-wise operations are written for XLA:CPU:

* LayerNorm and the softmaxes over G have hand-written backward passes (``layers.LayerNorm``,
  ``layers.softmax_last``), and their sums over the last axis of 16 or 8 are products with a
  matrix of ones, computed once (a reduction over a short trailing axis is fused into every
  consumer and recomputed for each element it writes);
* the FFNs run on [B*F, d] (on [B, F, d], XLA transposes the activations for the kernels'
  gradients);
* competitive pooling divides the [B, H*G, d] pooled tokens by the renormaliser ``S`` instead of
  writing the normalised weights ``a / S`` [B, F, H, G];
* SE's 'squeeze' Dense multiplies the means and the maxima separately instead of concatenating
  them.

``tests/test_models.py`` checks the block against the einsum formulation on random parameters
(1e-5) and these pieces against their plain forms (values and gradients).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from apem_jax.models.layers import (PARAM_DTYPE, MLP, LayerNorm, ProjectionParams, get_dtype,
                                    softmax_last)

GROUPINGS = ("competitive", "standard", "none")
SE_SQUEEZES = ("grouped", "mean")
SE_GATES = ("sigmoid", "identity_init")


class DAGTOutput(NamedTuple):
  """fields [B, F, d]; groups [B, G, d]; group_weights [B, H, G, F] (pooling weights, sum to 1
  over F); group_assignment [B, H, G, F] (competitive only: softmax over G, sums to 1 over G;
  None otherwise)."""

  fields: jax.Array
  groups: jax.Array
  group_weights: jax.Array
  group_assignment: jax.Array | None


def group_statistics(tokens: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
  """Mean and max of each of the K contiguous channel groups of every token.
  tokens: [B, F, d] -> (mean [B, F, K], max [B, F, K])."""
  batch, num_fields, width = tokens.shape
  if width % groups:
    raise ValueError(f"se_squeeze_groups={groups} must divide the embedding width {width}")
  parts = tokens.reshape(batch, num_fields, groups, width // groups)
  # Mean and max over each group's few channels as elementwise ops over its channel slices:
  # XLA:CPU reduces a trailing axis of 4 about 20x slower than it combines 4 slices.
  channels = [parts[..., i] for i in range(width // groups)]  # each [B, F, K]
  return (functools.reduce(jnp.add, channels) / len(channels),
          functools.reduce(jnp.maximum, channels))


def squeeze_fields(tokens: jax.Array, squeeze: str, groups: int) -> jax.Array:
  """The SE squeeze of every field token. tokens: [B, F, d] -> [B, F * 2K] ('grouped', K groups
  of d/K channels: mean and max of each) or [B, F] ('mean')."""
  if squeeze == "mean":
    return jnp.mean(tokens, axis=-1)
  if squeeze != "grouped":
    raise ValueError(f"se_squeeze must be one of {SE_SQUEEZES}, got {squeeze!r}")
  batch, num_fields, _ = tokens.shape
  stats = jnp.concatenate(group_statistics(tokens, groups), axis=-1)  # [B, F, 2K]
  return stats.reshape(batch, num_fields * 2 * groups)


class SqueezeExcitation(nn.Module):
  """Rescales each field token by a learned gate computed from a squeeze of all field tokens."""

  reduction: int = 4
  squeeze: str = "grouped"
  squeeze_groups: int = 4
  dtype: Any = "float32"
  gate: str = "sigmoid"  # 'sigmoid' | 'identity_init' (2 * sigmoid: centred on 1, not 1/2)

  def _grouped_squeeze(self, tokens: jax.Array, hidden: int) -> jax.Array:
    """``nn.Dense(hidden, name='squeeze')`` (same parameters) of :func:`squeeze_fields`'
    [B, F * 2K] statistics, without concatenating them: the kernel's rows of the means and those
    of the maxima multiply each statistic. tokens: [B, F, d] -> [B, hidden]."""
    batch, num_fields, _ = tokens.shape
    k = self.squeeze_groups
    dtype = get_dtype(self.dtype)
    kernel, bias = ProjectionParams((num_fields * 2 * k,), (hidden,), name="squeeze")()
    kernel = kernel.astype(dtype).reshape(num_fields, 2, k, hidden)  # rows f * 2K + [mean | max]
    mean, top = group_statistics(tokens, k)  # each [B, F, K]
    flat = lambda x: x.astype(dtype).reshape(batch, num_fields * k)
    return (flat(mean) @ kernel[:, 0].reshape(-1, hidden)
            + flat(top) @ kernel[:, 1].reshape(-1, hidden) + bias.astype(dtype))

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: [B, F, d] -> [B, F, d]."""
    dtype = get_dtype(self.dtype)
    num_fields = tokens.shape[-2]
    hidden = max(1, num_fields // self.reduction)
    if self.squeeze == "grouped":
      z = self._grouped_squeeze(tokens, hidden)
    else:
      z = nn.Dense(hidden, dtype=dtype, param_dtype=PARAM_DTYPE, name="squeeze")(
          squeeze_fields(tokens, self.squeeze, self.squeeze_groups))  # from [B, F]
    s = nn.sigmoid(nn.Dense(num_fields, dtype=dtype, param_dtype=PARAM_DTYPE, name="excite")(
        nn.relu(z)))
    if self.gate == "identity_init":  # FiBiNet++'s SENet+ scale: centred on 1, not 1/2
      s = 2.0 * s
    return tokens * s[..., None].astype(tokens.dtype)


class GroupTransformerBlock(nn.Module):
  """One DAGT block: grouping by set attention, broadcast back, SE.

  Attributes:
    num_groups: G (ignored for grouping='none').
    num_heads: H; must divide the token width d.
    ffn_mult: FFN hidden width = ffn_mult * d.
    grouping: 'competitive' | 'standard' | 'none'.
    grouping_temperature: T, the grouping logits are divided by it.
    se: apply Squeeze-and-Excitation over fields.
    se_reduction: SE reduction ratio r.
    se_squeeze: 'grouped' | 'mean' (module docstring).
    se_squeeze_groups: K, the channel groups of the 'grouped' squeeze; must divide d.
    se_gate: 'sigmoid' (gates in (0, 1), 1/2 where the excite logit is 0) | 'identity_init'
      (2 * sigmoid: gates in (0, 2), 1 where the logit is 0). The excite layer's kernel starts
      random (its bias at 0), so at initialisation the gates spread around 1/2 or 1 (about 0.15
      to 1.8 for 'identity_init' on LayerNorm-scale tokens): 'identity_init' stops SE from
      halving the tokens on average, it does not start the block as the identity (the name is
      kept for the configs that use it).
    field_ffn: the field tokens' FFN sub-layer after the broadcast back (FFN, residual, LN).
      False (``model.field_ffn``, a cheaper variant, not our reading of the paper) drops it and
      its parameters ``field_ffn``, ``field_ln2``.
    dropout: rate on attention and FFN outputs before each residual.
    dtype: compute dtype name.
  """

  num_groups: int = 8
  num_heads: int = 2
  ffn_mult: int = 2
  grouping: str = "competitive"
  grouping_temperature: float = 1.0
  se: bool = True
  se_reduction: int = 4
  se_squeeze: str = "grouped"
  se_squeeze_groups: int = 4
  se_gate: str = "sigmoid"
  field_ffn: bool = True
  dropout: float = 0.0
  dtype: Any = "float32"

  def _projection(self, in_shape, out_shape, name: str, use_bias: bool = True):
    """(kernel, bias or None) of the projection ``name``, in the compute dtype."""
    kernel, bias = ProjectionParams(in_shape, out_shape, use_bias, name=name)()
    dtype = get_dtype(self.dtype)
    return kernel.astype(dtype), None if bias is None else bias.astype(dtype)

  def _ln(self, name: str) -> LayerNorm:
    """``nn.LayerNorm``'s function and parameters (layers.LayerNorm)."""
    return LayerNorm(dtype=get_dtype(self.dtype), name=name)

  def _ffn(self, x: jax.Array, name: str) -> jax.Array:
    """The position-wise FFN of tokens x [..., d] -> [..., d], applied to x as one [rows, d]
    matrix (on [B, F, d] XLA:CPU transposes the activations for the kernels' gradients)."""
    width = x.shape[-1]
    mlp = MLP((self.ffn_mult * width, width), activate_final=False, dtype=get_dtype(self.dtype),
              name=name)
    return mlp(x.reshape(-1, width)).reshape(x.shape)

  def _drop(self, x: jax.Array, train: bool) -> jax.Array:
    if self.dropout > 0:
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return x

  @nn.compact
  def __call__(self, fields: jax.Array, train: bool = False) -> DAGTOutput:
    """fields: [B, F, d] -> DAGTOutput."""
    if self.grouping not in GROUPINGS:
      raise ValueError(f"grouping must be one of {GROUPINGS}, got {self.grouping!r}")
    dtype = get_dtype(self.dtype)
    batch, num_fields, width = fields.shape
    heads = self.num_heads
    if width % heads:
      raise ValueError(f"num_heads={heads} must divide the embedding width {width}")
    fields = fields.astype(dtype)
    scale = 1.0 / math.sqrt(width // heads)

    if self.grouping == "none":
      groups = jnp.zeros((batch, 0, width), dtype)
      weights = jnp.zeros((batch, heads, 0, num_fields), jnp.float32)
      assignment = None
    else:
      # 1. Automatic grouping: learned seeds query the field tokens.
      seeds = self.param("group_seeds", nn.initializers.normal(stddev=1.0 / math.sqrt(width)),
                         (self.num_groups, width), PARAM_DTYPE).astype(dtype)  # [G, d]
      # A query bias shifts the logits of a field equally for every group (dead under the
      # competitive softmax over G); a key bias shifts those of a group equally for every field
      # (dead under the standard softmax over F).
      competitive = self.grouping == "competitive"
      head_shape = (heads, width // heads)
      w_q, b_q = self._projection((width,), head_shape, "group_query", not competitive)
      w_k, b_k = self._projection((width,), head_shape, "group_key", competitive)
      w_v, b_v = self._projection((width,), head_shape, "group_value")
      w_o, b_o = self._projection(head_shape, (width,), "group_out")
      q = jnp.einsum("gd,dhc->ghc", seeds, w_q) + (0 if b_q is None else b_q)  # [G, H, dh]
      grouping_scale = scale / self.grouping_temperature
      seed_keys = jnp.einsum("dhc,ghc->dhg", w_k, q) * grouping_scale  # [d, H, G]
      logits = jnp.einsum("bfd,dx->bfx", fields, seed_keys.reshape(width, -1))  # [B, F, H*G]
      logits = logits.reshape(batch, num_fields, heads, -1)
      if b_k is not None:
        logits = logits + jnp.einsum("hc,ghc->hg", b_k, q) * grouping_scale
      logits = logits.astype(jnp.float32)  # [B, F, H, G]
      if competitive:
        # Each field over groups, then renormalised over fields after pooling:
        # sum_f (a_f / S) E_f = (sum_f a_f E_f) / S, S = sum_f a_f + 1e-9 (the weights w = a / S
        # are only an output, never a [B, F, H, G] pass of the step).
        assignment = softmax_last(logits)  # [B, F, H, G]
        sums = jnp.sum(assignment, axis=1)  # [B, H, G]
        totals = sums + 1e-9
        weights = assignment / totals[:, None]
        pooled_tokens = jnp.einsum("bfx,bfd->bxd",
                                   assignment.astype(dtype).reshape(batch, num_fields, -1),
                                   fields).reshape(batch, heads, -1, width)  # [B, H, G, d]
        pooled_tokens = pooled_tokens / totals[..., None].astype(dtype)
        weight_sums = (sums / totals).astype(dtype)  # [B, H, G], sum_F of the weights
      else:
        assignment = None
        weights = jax.nn.softmax(logits, axis=1)  # each group over fields
        flat_weights = weights.astype(dtype).reshape(batch, num_fields, -1)  # [B, F, H*G]
        pooled_tokens = jnp.einsum("bfx,bfd->bxd", flat_weights, fields)  # [B, H*G, d]
        pooled_tokens = pooled_tokens.reshape(batch, heads, -1, width)  # [B, H, G, d]
        weight_sums = jnp.sum(flat_weights, axis=1).reshape(batch, heads, -1)  # [B, H, G]
      value_out = jnp.einsum("dhc,hce->hde", w_v, w_o)  # [H, d, d]
      pooled = (jnp.einsum("bhgd,hde->bge", pooled_tokens, value_out)
                + jnp.einsum("bhg,he->bge", weight_sums, jnp.einsum("hc,hce->he", b_v, w_o))
                + b_o)  # [B, G, d]
      groups = self._ln("group_ln1")(seeds[None] + self._drop(pooled, train))
      ffn = self._ffn(groups, "group_ffn")
      groups = self._ln("group_ln2")(groups + self._drop(ffn, train))

      # 2. Broadcast back: fields attend to the group tokens (softmax over G).
      w_q2, b_q2 = self._projection((width,), head_shape, "field_query")
      w_k2, _ = self._projection((width,), head_shape, "field_key", False)
      w_v2, b_v2 = self._projection((width,), head_shape, "field_value")
      w_o2, b_o2 = self._projection(head_shape, (width,), "field_out")
      k2 = jnp.einsum("bgd,dhc->bghc", groups, w_k2)  # [B, G, H, dh]
      group_keys = jnp.einsum("dhc,bghc->bdhg", w_q2, k2) * scale  # [B, d, H, G]
      logits2 = (jnp.einsum("bfd,bdx->bfx", fields, group_keys.reshape(batch, width, -1))
                 .reshape(batch, num_fields, heads, -1)
                 + jnp.einsum("hc,bghc->bhg", b_q2, k2)[:, None] * scale)  # [B, F, H, G]
      attn = softmax_last(logits2.astype(jnp.float32)).astype(dtype)
      group_values = (jnp.einsum("bgd,dhe->bhge", groups, jnp.einsum("dhc,hce->dhe", w_v2, w_o2))
                      + jnp.einsum("hc,hce->he", b_v2, w_o2)[:, None])  # [B, H, G, d]
      back = jnp.einsum("bfx,bxe->bfe", attn.reshape(batch, num_fields, -1),
                        group_values.reshape(batch, -1, width)) + b_o2  # [B, F, d]
      weights = weights.transpose(0, 2, 3, 1)  # [B, H, G, F]
      if assignment is not None:
        assignment = assignment.transpose(0, 2, 3, 1)
      fields = self._ln("field_ln1")(fields + self._drop(back, train))
      if self.field_ffn:
        ffn = self._ffn(fields, "field_ffn")
        fields = self._ln("field_ln2")(fields + self._drop(ffn, train))

    # 3. Squeeze-and-Excitation over fields.
    if self.se:
      fields = SqueezeExcitation(self.se_reduction, self.se_squeeze, self.se_squeeze_groups,
                                 self.dtype, self.se_gate, name="se")(fields)
    return DAGTOutput(fields, groups, weights, assignment)


class DeepAutoGroupTransformer(nn.Module):
  """``num_blocks`` stacked :class:`GroupTransformerBlock` (each with its own seeds).

  Returns the last block's :class:`DAGTOutput` (field tokens [B, F, d], group tokens [B, G, d],
  grouping weights [B, H, G, F]).
  """

  num_blocks: int = 2
  num_groups: int = 8
  num_heads: int = 2
  ffn_mult: int = 2
  grouping: str = "competitive"
  grouping_temperature: float = 1.0
  se: bool = True
  se_reduction: int = 4
  se_squeeze: str = "grouped"
  se_squeeze_groups: int = 4
  se_gate: str = "sigmoid"
  field_ffn: bool = True
  dropout: float = 0.0
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, fields: jax.Array, train: bool = False) -> DAGTOutput:
    out = None
    for i in range(self.num_blocks):
      out = GroupTransformerBlock(
          num_groups=self.num_groups, num_heads=self.num_heads, ffn_mult=self.ffn_mult,
          grouping=self.grouping, grouping_temperature=self.grouping_temperature, se=self.se,
          se_reduction=self.se_reduction,
          se_squeeze=self.se_squeeze, se_squeeze_groups=self.se_squeeze_groups,
          se_gate=self.se_gate, field_ffn=self.field_ffn, dropout=self.dropout, dtype=self.dtype,
          name=f"block_{i}")(fields, train)
      fields = out.fields
    if out is None:
      raise ValueError("DeepAutoGroupTransformer: num_blocks must be >= 1")
    return out
