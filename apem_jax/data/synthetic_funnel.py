"""Synthetic multi-step conversion funnels from a known model (DESIGN.md section 6).

Impression -> click -> cart -> purchase (-> repurchase): ``num_steps`` funnel steps whose TRUE
conditional probabilities ``q_t = P(step t | step t-1, x)`` are stored with every example
(``true_q`` [N, T]), so the best achievable (oracle) AUC of each step is computable and a model's
distance to it is a real measure. Labels are drawn sequentially: ``y_1 ~ Bernoulli(q_1)`` and
``y_t ~ Bernoulli(q_t)`` where ``y_{t-1} = 1``, else 0; ``p_t = q_1 ... q_t``.

**Fields** (all generated; numbers are the defaults, every size is config):

* categorical: ``user_id`` (1,000,000 ids) and ``item_id`` (100,000 ids), each drawn with Zipf
  (power-law) frequency ``P(rank r) ~ r^-zipf_exponent`` over a random permutation of the ids;
  ``item_category`` (500, a fixed function of the item), ``hour`` (24, uniform), ``device`` (3,
  probabilities 0.6/0.3/0.1), ``position`` (8 ad slots, uniform).
* numeric (roughly standard normal): ``price`` (the item's log price plus noise), ``discount``,
  ``relevance`` (a query-item relevance score) and ``user_activity`` (the user's plus noise).

**True logits**, for step t (weights per step in ``_STEP_WEIGHTS``, below):

``z_t = b_t + user_bias_t[u] + item_bias_t[i] + category_t[c] + hour_t[h] + device_t[d]
+ position_weight_t * (-0.25 * position) + affinity_t * <U[u], D_t V[i]>
+ relevance_weight_t * relevance + price_t * price + price_x_discount_t * price * discount
+ activity_x_affinity_t * user_activity * <U[u], V[i]>``

The interactions are not linear in the fields: a user-item dot product of random latent vectors
(``latent_dim``; shared by all steps, re-weighted per step by ``D_t``), price x discount, and user
activity x affinity. The per-id biases are a part shared by all steps plus a step-specific part,
so the steps are correlated, as real funnels are. Position bias acts on clicks only. The shared
``relevance`` feature drives every step (``relevance_weights``, config): it is what makes the
clicked population differ from the impressions (sample selection bias). The intercepts ``b_t`` are
solved (bisection) so that the mean true ``q_t`` over impressions is ``step_rates[t]``.

**Default size.** 1,000,000 impressions (80/10/10 train/validation/test in generation order), 3
steps with mean true rates 0.1 / 0.3 / 0.5 over impressions. Because the steps are correlated,
those who click go on far more often than the average impression: about 100k clicks, 55k carts and
44k purchases, so the 100k test rows hold ~10k / 5.6k / 4.5k positives and a step's test AUC has
a sampling standard error of ~0.002-0.003 (Hanley-McNeil). Whether model differences exceed the
seed spread is for the benchmark (benchmarks/quality.py --dataset funnel) to show. Generation
takes 2-4 s on one CPU core (measured; ~60 MB of arrays); oracle AUCs are ~0.86 / 0.92 / 0.93.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

STEP_NAMES = ("click", "cart", "purchase", "repurchase")
CATEGORICAL_FIELDS = ("user_id", "item_id", "item_category", "hour", "device", "position")
NUMERIC_FIELDS = ("price", "discount", "relevance", "user_activity")
NUM_HOURS, NUM_POSITIONS = 24, 8
DEVICE_PROBS = (0.6, 0.3, 0.1)

DEFAULTS: dict[str, Any] = dict(
    num_examples=1_000_000, num_steps=3, seed=0,
    num_users=1_000_000, num_items=100_000, num_categories=500,
    zipf_exponent=1.0,          # P(rank r) ~ r^-a for user_id and item_id
    latent_dim=8,               # user/item latent vectors of the affinity term
    step_rates=(0.1, 0.3, 0.5, 0.5),        # mean true q_t over impressions, per step
    relevance_weights=(1.0, 0.6, 0.4, 0.2),  # weight of the shared feature in each step's logit
)

# Per-step weights of the true logit (index t = step); relevance weights are config.
_STEP_WEIGHTS = dict(
    position=(1.0, 0.0, 0.0, 0.0),       # position bias: clicks only
    affinity=(0.8, 1.0, 0.8, 0.5),
    price=(-0.2, -0.5, -0.7, -0.3),
    price_x_discount=(0.0, 0.4, 0.6, 0.2),
    activity_x_affinity=(0.3, 0.3, 0.2, 0.1),
)


def zipf_ids(rng: np.random.Generator, vocab_size: int, size: int, exponent: float) -> np.ndarray:
  """``size`` ids in ``[0, vocab_size)`` with ``P(rank r) ~ r^-exponent``; the rank -> id map is a
  random permutation (so frequent ids are not the small ones)."""
  ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
  probs = ranks ** -float(exponent)
  cdf = np.cumsum(probs)
  cdf /= cdf[-1]
  drawn = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), vocab_size - 1)
  return rng.permutation(vocab_size)[drawn].astype(np.int32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def solve_intercept(z: np.ndarray, rate: float, iterations: int = 50) -> float:
  """``b`` with ``mean(sigmoid(z + b)) = rate`` (bisection; the mean is increasing in b)."""
  lo, hi = -30.0, 30.0
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    if np.mean(_sigmoid(z + mid)) < rate:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def _check(num_examples, num_steps, num_users, num_items, num_categories, zipf_exponent,
           latent_dim, step_rates, relevance_weights) -> None:
  def fail(key, msg):
    raise ValueError(f"data.funnel.{key}: {msg}")
  if not 2 <= num_steps <= len(STEP_NAMES):
    fail("num_steps", f"must be in [2, {len(STEP_NAMES)}], got {num_steps}")
  for key, value in dict(num_examples=num_examples, num_users=num_users, num_items=num_items,
                         num_categories=num_categories, latent_dim=latent_dim).items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      fail(key, f"must be an int >= 1, got {value!r}")
  for key, values in (("step_rates", step_rates), ("relevance_weights", relevance_weights)):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
      fail(key, f"must be a list of numbers, got {values!r}")
  if zipf_exponent <= 0:
    fail("zipf_exponent", f"must be > 0, got {zipf_exponent}")
  if len(step_rates) < num_steps or not all(0 < r < 1 for r in step_rates[:num_steps]):
    fail("step_rates", f"needs num_steps={num_steps} rates in (0, 1), got {tuple(step_rates)}")
  if len(relevance_weights) < num_steps:
    fail("relevance_weights", f"needs num_steps={num_steps} values, got {tuple(relevance_weights)}")


def generate(*, num_examples: int = 1_000_000, num_steps: int = 3, seed: int = 0,
             num_users: int = 1_000_000, num_items: int = 100_000, num_categories: int = 500,
             zipf_exponent: float = 1.0, latent_dim: int = 8,
             step_rates: Sequence[float] = (0.1, 0.3, 0.5, 0.5),
             relevance_weights: Sequence[float] = (1.0, 0.6, 0.4, 0.2)) -> dict[str, np.ndarray]:
  """Generates the data set (see module doc).

  Returns:
    ``{'categorical': int32 [N, 6], 'numeric': float32 [N, 4], 'labels': float32 [N, T],
    'true_q': float32 [N, T]}`` (columns in ``CATEGORICAL_FIELDS``, ``NUMERIC_FIELDS`` and
    ``STEP_NAMES[:T]`` order).
  """
  _check(num_examples, num_steps, num_users, num_items, num_categories, zipf_exponent, latent_dim,
         step_rates, relevance_weights)
  n, steps = num_examples, num_steps
  rng = np.random.Generator(np.random.PCG64(seed))
  f32 = np.float32

  # The generating model: per-id effects and latent vectors, drawn once.
  def effects(rows, shared_std, step_std):
    shared = rng.normal(0.0, shared_std, (rows, 1)).astype(f32)
    return shared + rng.normal(0.0, step_std, (rows, steps)).astype(f32)  # [rows, T]
  user_bias = effects(num_users, 0.5, 0.3)
  item_bias = effects(num_items, 0.5, 0.3)
  category_effect = effects(num_categories, 0.3, 0.2)
  scale = latent_dim ** -0.25  # <u, v> has variance ~1
  user_vec = rng.normal(0.0, scale, (num_users, latent_dim)).astype(f32)
  item_vec = rng.normal(0.0, scale, (num_items, latent_dim)).astype(f32)
  step_dims = np.concatenate([np.ones((1, latent_dim)), 1.0 + 0.5 * rng.standard_normal(
      (steps - 1, latent_dim))]).astype(f32)  # D_t; D_1 = 1
  item_category = rng.integers(0, num_categories, num_items).astype(np.int32)
  item_price = rng.standard_normal(num_items).astype(f32)
  user_activity = rng.standard_normal(num_users).astype(f32)
  hour_phase = rng.uniform(0.0, 2 * np.pi, steps)
  device_effect = rng.normal(0.0, 0.2, (len(DEVICE_PROBS), steps)).astype(f32)

  # Impressions.
  users = zipf_ids(rng, num_users, n, zipf_exponent)
  items = zipf_ids(rng, num_items, n, zipf_exponent)
  categories = item_category[items]
  hours = rng.integers(0, NUM_HOURS, n).astype(np.int32)
  devices = rng.choice(len(DEVICE_PROBS), size=n, p=DEVICE_PROBS).astype(np.int32)
  positions = rng.integers(0, NUM_POSITIONS, n).astype(np.int32)
  price = item_price[items] + 0.1 * rng.standard_normal(n).astype(f32)
  discount = rng.standard_normal(n).astype(f32)
  relevance = rng.standard_normal(n).astype(f32)
  activity = user_activity[users] + 0.3 * rng.standard_normal(n).astype(f32)

  u, v = user_vec[users], item_vec[items]  # [N, k]
  base_affinity = np.einsum("nk,nk->n", u, v)
  w = {k: np.asarray(val[:steps], f32) for k, val in _STEP_WEIGHTS.items()}
  z = (user_bias[users] + item_bias[items] + category_effect[categories]
       + 0.3 * np.sin(2 * np.pi * hours[:, None] / NUM_HOURS + hour_phase).astype(f32)
       + device_effect[devices]
       - 0.25 * positions[:, None] * w["position"]
       + w["affinity"] * np.einsum("nk,tk,nk->nt", u, step_dims, v)
       + np.asarray(relevance_weights[:steps], f32) * relevance[:, None]
       + w["price"] * price[:, None]
       + w["price_x_discount"] * (price * discount)[:, None]
       + w["activity_x_affinity"] * (activity * base_affinity)[:, None])  # [N, T]
  intercepts = [solve_intercept(z[:, t], float(step_rates[t])) for t in range(steps)]
  true_q = _sigmoid(z + np.asarray(intercepts, f32)).astype(f32)
  labels = np.cumprod(rng.random((n, steps), dtype=f32) < true_q, axis=1).astype(f32)

  return {"categorical": np.stack([users, items, categories, hours, devices, positions], axis=1),
          "numeric": np.stack([price, discount, relevance, activity], axis=1).astype(f32),
          "labels": labels, "true_q": true_q}


def vocab_sizes(num_users: int, num_items: int, num_categories: int) -> tuple[int, ...]:
  """Vocabulary sizes of ``CATEGORICAL_FIELDS``."""
  return (num_users, num_items, num_categories, NUM_HOURS, len(DEVICE_PROBS), NUM_POSITIONS)
