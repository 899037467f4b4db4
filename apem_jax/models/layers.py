"""Shared building blocks: dtype handling, MLPs, batched (per-member) MLPs, config checks.

Parameters are always float32 (``param_dtype``); activations use the compute ``dtype``
('float32' or 'bfloat16').
"""

from __future__ import annotations

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


class BatchedMLP(nn.Module):
  """``num_members`` independent MLPs evaluated as one batched einsum per layer.

  Used for experts (MMoE, PLE) and per-task towers. Every member owns its own kernel slice
  ``[num_members, in, out]``, initialised independently (lecun normal with a batch axis), so
  members differ at initialisation.

  Input either ``[B, in]`` (the same input for every member) or ``[B, M, in]`` (member m reads
  ``x[:, m]``), optionally with ``shared`` ``[B, in_s]`` that every member reads after its own
  input: the same function as ``concat([x, broadcast(shared)], -1)``, without materialising the
  broadcast (the shared part of the first layer is one ``[B, in_s] x [in_s, M * out]`` GEMM).
  Output ``[B, M, features[-1]]``.
  """

  num_members: int
  features: Sequence[int]
  dropout: float = 0.0
  activate_final: bool = True
  dtype: Dtype = jnp.float32
  float32_output: bool = False  # as MLP's

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               shared: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    kernel_init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    for i, width in enumerate(self.features):
      in_dim = x.shape[-1]
      shared_dim = shared.shape[-1] if shared is not None and i == 0 else 0
      kernel = self.param(f"kernel_{i}", kernel_init,
                          (self.num_members, in_dim + shared_dim, width), PARAM_DTYPE)
      bias = self.param(f"bias_{i}", nn.initializers.zeros, (self.num_members, width),
                        PARAM_DTYPE)
      dtype = _layer_dtype(self, i)
      kernel, bias = kernel.astype(dtype), bias.astype(dtype)
      own = "bi,mio->bmo" if x.ndim == 2 else "bmi,mio->bmo"
      out = jnp.einsum(own, x.astype(dtype), kernel[:, :in_dim]) + bias
      if shared_dim:
        out = out + jnp.einsum("bi,mio->bmo", shared.astype(dtype), kernel[:, in_dim:])
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
