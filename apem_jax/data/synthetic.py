"""The MMoE paper's synthetic two-task regression data with controlled task correlation.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts" (KDD 2018), section 3.2:

1. two orthogonal unit vectors ``u1, u2`` in R^d (here: QR of a Gaussian ``[d, 2]`` matrix);
2. ``w1 = c * u1``, ``w2 = c * (p * u1 + sqrt(1 - p^2) * u2)``;
3. ``x ~ N(0, I_d)``;
4. ``y_k = w_k . x + sum_{i=1..m} sin(alpha_i * w_k . x + beta_i) + eps``,
   ``eps ~ N(0, noise_std^2)``.

The paper publishes no alpha/beta. **Our default**: ``alpha_i ~ N(0, 1)`` and ``beta_i ~ N(0, 1)``,
drawn once from ``seed`` (before ``u``, ``x`` and the noise); explicit lists may be given in the
config. The paper's noise variance 0.01 is ``noise_std = 0.1``. The features are already
standard normal, so they are used as they are (``numeric``; no categorical fields, ``Fc = 0``).
Examples are split 80/10/10 (in generation order) into train / validation / test.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

DEFAULTS: dict[str, Any] = dict(
    input_dim=100, scale=1.0, correlation=0.5, num_sines=10, alpha=None, beta=None,
    noise_std=0.1, num_examples=100_000, seed=0, task_kind="regression")
TASK_KINDS = ("regression", "binary")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
TASK_NAMES = ("y1", "y2")


def generate(*, input_dim: int = 100, scale: float = 1.0, correlation: float = 0.5,
             num_sines: int = 10, alpha: Sequence[float] | None = None,
             beta: Sequence[float] | None = None, noise_std: float = 0.1,
             num_examples: int = 100_000, seed: int = 0) -> dict[str, np.ndarray]:
  """Generates the data set (see module doc).

  Returns:
    ``{'numeric': float32 [N, d], 'labels': float32 [N, 2]}``.
  """
  if not -1.0 <= correlation <= 1.0:
    raise ValueError(f"data.synthetic.correlation must be in [-1, 1], got {correlation}")
  for key, value, low in (("input_dim", input_dim, 2), ("num_sines", num_sines, 1),
                          ("num_examples", num_examples, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"data.synthetic.{key} must be an int >= {low}, got {value!r}")
  rng = np.random.Generator(np.random.PCG64(seed))
  alpha_default = rng.standard_normal(num_sines)
  beta_default = rng.standard_normal(num_sines)
  alpha = alpha_default if alpha is None else np.asarray(alpha, dtype=np.float64)
  beta = beta_default if beta is None else np.asarray(beta, dtype=np.float64)
  if alpha.shape != (num_sines,) or beta.shape != (num_sines,):
    raise ValueError(f"data.synthetic.alpha/beta must be lists of num_sines={num_sines} values, "
                     f"got shapes {alpha.shape} and {beta.shape}")
  u, _ = np.linalg.qr(rng.standard_normal((input_dim, 2)))
  u1, u2 = u[:, 0], u[:, 1]
  w = scale * np.stack([u1, correlation * u1 + np.sqrt(1.0 - correlation**2) * u2])  # [2, d]
  x = rng.standard_normal((num_examples, input_dim))
  z = x @ w.T  # [N, 2]
  y = z + np.sin(alpha[None, None, :] * z[..., None] + beta).sum(-1)
  y = y + noise_std * rng.standard_normal(y.shape)
  return {"numeric": x.astype(np.float32), "labels": y.astype(np.float32)}


def binarize(labels: np.ndarray) -> np.ndarray:
  """Regression targets [N, T] -> 0/1 labels: above each task's median over the data set."""
  return (labels > np.median(labels, axis=0, keepdims=True)).astype(np.float32)


def split(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """80/10/10 split (in order) into train / validation / test."""
  n = len(next(iter(arrays.values())))
  n_train = int(round(n * SPLIT_FRACTIONS["train"]))
  n_val = int(round(n * SPLIT_FRACTIONS["validation"]))
  bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val),
            "test": (n_train + n_val, n)}
  return {s: {k: v[a:b] for k, v in arrays.items()} for s, (a, b) in bounds.items()}
