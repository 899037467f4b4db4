"""Shared building blocks: dtype handling, MLPs, batched (per-member) MLPs, config checks.

Parameters are always float32 (``param_dtype``); activations use the compute ``dtype``
('float32' or 'bfloat16').
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PARAM_DTYPE = jnp.float32


def get_dtype(name: str | Dtype) -> Dtype:
  """Maps a config dtype name ('float32' | 'bfloat16') to a jnp dtype."""
  if isinstance(name, str):
    if name not in DTYPES:
      raise ValueError(f"model config 'dtype' must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
  return name


def _layer_dtype(mlp, index: int) -> Dtype:
  """The compute dtype of layer ``index`` of an MLP or BatchedMLP (float32 for the last layer of
  one with ``float32_output``)."""
  if mlp.float32_output and index == len(mlp.features) - 1:
    return jnp.float32
  return mlp.dtype


class MLP(nn.Module):
  """Dense -> relu -> dropout, for each width in ``features``.

  Attributes:
    features: widths of the layers; the last is the output width.
    dropout: dropout rate after every activated layer (0 = none).
    activate_final: apply relu (and dropout) after the last layer too.
    dtype: compute dtype.
    float32_output: compute the last layer in float32 whatever ``dtype`` (a logit layer: under
      bfloat16 its outputs would carry 3 significant digits, and ties lower an exact AUC).
  """

  features: Sequence[int]
  dropout: float = 0.0
  activate_final: bool = True
  dtype: Dtype = jnp.float32
  float32_output: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [..., in] -> [..., features[-1]]."""
    x = x.astype(self.dtype)
    for i, width in enumerate(self.features):
      dtype = _layer_dtype(self, i)
      x = nn.Dense(width, dtype=dtype, param_dtype=PARAM_DTYPE, name=f"dense_{i}")(x.astype(dtype))
      if i < len(self.features) - 1 or self.activate_final:
        x = nn.relu(x)
        if self.dropout > 0:
          x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return x


class ProjectionParams(nn.Module):
  """The kernel [*in_shape, *out_shape] and bias [*out_shape] (or None) of an ``nn.DenseGeneral``,
  with its names, shapes and initial values, returned rather than applied, for modules that
  multiply projections with each other before they touch the data (the DAGT block, the Pattern
  Selector)."""

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  use_bias: bool = True

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array | None]:
    def kernel_init(rng, shape, dtype=PARAM_DTYPE):
      flat = (math.prod(self.in_shape), math.prod(self.out_shape))
      return nn.initializers.lecun_normal()(rng, flat, dtype).reshape(shape)

    kernel = self.param("kernel", kernel_init, self.in_shape + self.out_shape, PARAM_DTYPE)
    bias = (self.param("bias", nn.initializers.zeros, self.out_shape, PARAM_DTYPE)
            if self.use_bias else None)
    return kernel, bias


# ----------------------------------------------------------------------------------------------
# Sums over a short last axis, and the softmax and LayerNorm built on them (APEM's token-wise ops
# on [B*F, 16]). XLA:CPU fuses a reduction over a trailing axis of 8 or 16 (its reduce, or the
# axis' slices added) into every consumer, recomputing it for each element the consumer writes,
# and autodiff adds a broadcast of each reduced value back to full size. On CPU a product with a
# matrix of ones is computed once and is already broadcast. GPUs fuse reductions well and pay for
# the product with passes of its own (an H200 ran APEM's step at 18% fewer examples/s with it),
# so there the sum is a reduction. The hand-written backward passes keep only what they need (the
# softmax's output; the normalised input and the inverse deviation).


def _sum_by_product(x: jax.Array) -> jax.Array:
  n = x.shape[-1]
  return jnp.matmul(x, jnp.ones((n, n), x.dtype), precision=jax.lax.Precision.HIGHEST)


def _sum_by_reduction(x: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.sum(x, axis=-1, keepdims=True), x.shape)


def sum_last(x: jax.Array) -> jax.Array:
  """The sum over the (short) last axis, repeated along it: ``x @ ones(n, n)`` on CPU, a
  reduction elsewhere (chosen when the step is lowered). x: [..., n] -> [..., n]."""
  return jax.lax.platform_dependent(x, cpu=_sum_by_product, default=_sum_by_reduction)


def mean_last(x: jax.Array) -> jax.Array:
  """The mean over the (short) last axis, repeated along it. x: [..., n] -> [..., n]."""
  return sum_last(x) / x.shape[-1]


@jax.custom_vjp
def softmax_last(x: jax.Array) -> jax.Array:
  """``jax.nn.softmax(x, axis=-1)`` over a short last axis (e.g. the G = 8 groups).
  x: [..., n] -> [..., n]."""
  e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  return e / sum_last(e)


def _softmax_last_fwd(x):
  y = softmax_last(x)
  return y, y


def _softmax_last_bwd(y, g):
  return (y * (g - sum_last(g * y)),)


softmax_last.defvjp(_softmax_last_fwd, _softmax_last_bwd)


def _normalise(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """x [..., n] -> ((x - mean) / std, 1 / std), both [..., n]; statistics over the last axis
  (two-pass variance)."""
  centred = x - mean_last(x)
  inv_std = jax.lax.rsqrt(mean_last(centred * centred) + epsilon)
  return centred * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """LayerNorm over the last axis: ``(x - mean) / sqrt(var + epsilon) * scale + bias``.
  x: [..., n]; scale, bias: [n]."""
  return _normalise(x, epsilon)[0] * scale + bias


def _layer_norm_fwd(x, scale, bias, epsilon):
  normed, inv_std = _normalise(x, epsilon)
  return normed * scale + bias, (normed, inv_std, scale)


def _layer_norm_bwd(epsilon, residuals, g):
  """dx = (g s - mean(g s) - x^ mean(g s x^)) / std, with x^ the normalised input;
  d scale = sum_rows g x^; d bias = sum_rows g."""
  normed, inv_std, scale = residuals
  g_normed = g * scale
  dx = inv_std * (g_normed - mean_last(g_normed) - normed * mean_last(g_normed * normed))
  rows = tuple(range(g.ndim - 1))
  return dx, jnp.sum(g * normed, axis=rows), jnp.sum(g, axis=rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """``nn.LayerNorm()``'s function and parameters (``scale`` [n] = 1, ``bias`` [n] = 0 at
  initialisation, epsilon 1e-6, statistics in float32) over a short last axis, computed by
  :func:`layer_norm` (its variance in two passes, where flax takes ``E[x^2] - E[x]^2``: equal up
  to float round-off). x: [..., n] -> [..., n] in ``dtype``."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), PARAM_DTYPE)
    bias = self.param("bias", nn.initializers.zeros, (width,), PARAM_DTYPE)
    return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon).astype(self.dtype)


class BatchedMLP(nn.Module):
  """``num_members`` independent MLPs evaluated as one batched einsum per layer.

  Used for experts (MMoE, PLE) and per-task towers. Every member owns its own kernel slice
  ``[num_members, in, out]``, initialised independently (lecun normal with a batch axis), so
  members differ at initialisation.

  Input either ``[B, in]`` (the same input for every member) or ``[B, M, in]`` (member m reads
  ``x[:, m]``), optionally with ``shared`` ``[B, in_s]`` that every member reads after its own
  input: the same function as ``concat([x, broadcast(shared)], -1)``, without materialising the
  broadcast (the shared part of the first layer is one ``[B, in_s] x [in_s, M * out]`` GEMM).
  ``shared`` may also be a sequence of ``[B, in_k]`` arrays, read as their concatenation (one
  GEMM each with its rows of the kernel: XLA:CPU copies a ``[4096, 1248]`` concatenation slower
  than it multiplies it). Output ``[B, M, features[-1]]``.
  """

  num_members: int
  features: Sequence[int]
  dropout: float = 0.0
  activate_final: bool = True
  dtype: Dtype = jnp.float32
  float32_output: bool = False  # as MLP's

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               shared: jax.Array | Sequence[jax.Array] | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    kernel_init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    parts = [] if shared is None else [shared] if hasattr(shared, "shape") else list(shared)
    for i, width in enumerate(self.features):
      in_dim = x.shape[-1]
      shared_dim = sum(part.shape[-1] for part in parts) if i == 0 else 0
      kernel = self.param(f"kernel_{i}", kernel_init,
                          (self.num_members, in_dim + shared_dim, width), PARAM_DTYPE)
      bias = self.param(f"bias_{i}", nn.initializers.zeros, (self.num_members, width),
                        PARAM_DTYPE)
      dtype = _layer_dtype(self, i)
      kernel, bias = kernel.astype(dtype), bias.astype(dtype)
      own = "bi,mio->bmo" if x.ndim == 2 else "bmi,mio->bmo"
      out = jnp.einsum(own, x.astype(dtype), kernel[:, :in_dim]) + bias
      start = in_dim
      for part in parts if i == 0 else ():
        rows = kernel[:, start:start + part.shape[-1]]
        out = out + jnp.einsum("bi,mio->bmo", part.astype(dtype), rows)
        start += part.shape[-1]
      x = out
      if i < len(self.features) - 1 or self.activate_final:
        x = nn.relu(x)
        if self.dropout > 0:
          x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return x


# ----------------------------------------------------------------------------------------------
# Config validation helpers: every error names the offending config key.


def require_int(cfg, key: str, minimum: int) -> int:
  value = cfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"model config {key!r} must be an int >= {minimum}, got {value!r}")
  return value


def require_widths(cfg, key: str, allow_empty: bool = False) -> tuple[int, ...]:
  value = cfg[key]
  try:
    widths = tuple(value)
  except TypeError:
    widths = None
  if (widths is None or (not widths and not allow_empty)
      or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
    raise ValueError(
        f"model config {key!r} must be a {'possibly empty ' if allow_empty else 'non-empty '}"
        f"sequence of positive ints, got {value!r}")
  return widths


def require_rate(cfg, key: str) -> float:
  value = cfg[key]
  if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
    raise ValueError(f"model config {key!r} must be a rate in [0, 1), got {value!r}")
  return float(value)


def require_positive(cfg, key: str) -> float:
  value = cfg[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0.0:
    raise ValueError(f"model config {key!r} must be a number > 0, got {value!r}")
  return float(value)


def require_choice(cfg, key: str, choices: Sequence[str]) -> str:
  value = cfg[key]
  if value not in choices:
    raise ValueError(f"model config {key!r} must be one of {list(choices)}, got {value!r}")
  return value


def require_bool(cfg, key: str) -> bool:
  value = cfg[key]
  if not isinstance(value, bool):
    raise ValueError(f"model config {key!r} must be a bool, got {value!r}")
  return value


def common_kwargs(cfg) -> dict:
  """Checks and returns the keys every model has: embed_dim, dropout, dtype."""
  get_dtype(cfg["dtype"])  # raises naming 'dtype'
  return dict(embed_dim=require_int(cfg, "embed_dim", 1), dropout=require_rate(cfg, "dropout"),
              dtype=cfg["dtype"])
