"""Optimizers per parameter group: embedding tables apart from the dense layers.

Industrial recommenders do not train their id tables with the dense layers' Adam: a table row is
seen only in the batches that hold its id, and a dense Adam update moves every row every step
(its moments decay, and the update ``m / sqrt(v)`` of a row last seen long ago keeps moving it).
``optimizer.embedding_optimizer`` picks what the id tables (2-D parameters named ``*_table``)
get, through ``optax.multi_transform``; the dense layers keep the run's Adam(W), and so does the
small ``numeric_bucket_table`` ``[Fn, K, d]`` of the numeric fields' buckets, whose rows are not
ids:

* ``same`` (default): the tables get the dense layers' Adam(W), as every model always had;
* ``adagrad``: row-wise Adagrad (DLRM, TorchRec's ``ROWWISE_ADAGRAD``): one accumulator per row,
  ``a_r += mean_j g_rj^2``, update ``-lr g_r / (sqrt(a_r) + eps)``; a row absent from the batch
  (zero gradient) keeps its value and accumulator;
* ``lazy_adam``: Adam whose moments and update skip the rows absent from the batch (TensorFlow
  Addons' LazyAdam): ``m_r, v_r`` change only where row r's gradient is not all zero, with the
  bias correction of the global step. Epsilon is placed as in ``optax.adam`` (and the dense
  layers' Adam): ``m_hat / (sqrt(v_hat) + eps)``; TensorFlow's puts it outside the bias
  correction, ``sqrt(1 - b2^t) m / (1 - b1^t) / (sqrt(v) + eps)``: the two differ only where
  eps is not negligible beside ``sqrt(v)``, rows whose gradients are below about ``100 eps``.

``optimizer.embedding_l2`` adds ``l2 * row`` to the gradient of the rows present in the batch
only (the regularisation of the rows a batch touches, not a decay of the whole table), and
``optimizer.embedding_learning_rate`` (0: the dense learning rate) scales the tables' schedule.

"Absent" is read from the gradient: JAX's gradient of a table lookup is dense, zero on the rows
no example of the batch holds, so these are exact lazy updates in value; the arithmetic still
spans the whole table (no sparse gradient), which row-wise Adagrad keeps smallest (one
accumulator per row instead of two moments per value).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

EMBEDDING_OPTIMIZERS = ("same", "adagrad", "lazy_adam")
EMBEDDING = "embedding"
DENSE = "dense"


def _leaf_name(path: tuple) -> str:
  """The leaf's own key; ``""`` for a bare array (the balancing methods' task-weight parameters,
  whose optimizer state comes from the same transformation)."""
  if not path:
    return ""
  key = path[-1]
  return str(getattr(key, "key", getattr(key, "name", key)))


def parameter_groups(params: Any) -> Any:
  """Per leaf: ``'embedding'`` for an embedding table (a 2-D leaf named ``*_table``), else
  ``'dense'``."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: EMBEDDING if _leaf_name(p).endswith("_table") and x.ndim == 2 else DENSE,
      params)


def _rows_present(g: jax.Array) -> jax.Array:
  """bool [rows]: rows whose gradient is not all zero (held by some example of the batch)."""
  return jnp.any(g != 0, axis=tuple(range(1, g.ndim)))


def _per_row(x: jax.Array, like: jax.Array) -> jax.Array:
  return x.reshape(x.shape + (1,) * (like.ndim - 1))


def rows_present_l2(l2: float) -> optax.GradientTransformation:
  """Adds ``l2 * param`` to the gradient of the rows present in the batch."""
  def update(updates, state, params=None):
    if params is None:
      raise ValueError("rows_present_l2 needs the parameters")
    updates = jax.tree.map(
        lambda g, p: g + l2 * p * _per_row(_rows_present(g), g).astype(g.dtype), updates, params)
    return updates, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class RowwiseAdagradState(NamedTuple):
  accumulator: Any  # per table: float32 [rows]


def rowwise_adagrad(learning_rate: float | Callable, initial_accumulator: float = 0.0,
                    eps: float = 1e-8) -> optax.GradientTransformation:
  """Row-wise Adagrad (see the module docstring); ``learning_rate`` a value or a schedule of
  the step count, which it keeps."""
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

  def init(params):
    return (RowwiseAdagradState(jax.tree.map(
        lambda p: jnp.full(p.shape[:1], initial_accumulator, jnp.float32), params)),
            optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)))

  def update(updates, state, params=None):
    del params
    adagrad, count = state
    accumulator = jax.tree.map(
        lambda a, g: a + jnp.mean(jnp.square(g.astype(jnp.float32)),
                                  axis=tuple(range(1, g.ndim))),
        adagrad.accumulator, updates)
    lr = schedule(count.count)
    updates = jax.tree.map(
        lambda g, a: (-lr * g / (_per_row(jnp.sqrt(a), g) + eps)).astype(g.dtype),
        updates, accumulator)
    return updates, (RowwiseAdagradState(accumulator),
                     optax.ScaleByScheduleState(count=optax.safe_increment(count.count)))

  return optax.GradientTransformation(init, update)


class LazyAdamState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any


def lazy_adam(learning_rate: float | Callable, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam over the rows present in the batch only (see the module docstring)."""
  schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

  def init(params):
    def zeros():  # two distinct trees of buffers: the train step donates the state
      return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return LazyAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    present = jax.tree.map(lambda g: _per_row(_rows_present(g), g), updates)
    mu = jax.tree.map(lambda m, g, r: jnp.where(r, b1 * m + (1 - b1) * g, m),
                      state.mu, updates, present)
    nu = jax.tree.map(lambda v, g, r: jnp.where(r, b2 * v + (1 - b2) * jnp.square(g), v),
                      state.nu, updates, present)
    lr = schedule(state.count)
    c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
    new = jax.tree.map(
        lambda m, v, r, g: jnp.where(r, -lr * (m / c1) / (jnp.sqrt(v / c2) + eps), 0.0
                                     ).astype(g.dtype), mu, nu, present, updates)
    return new, LazyAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def embedding_transform(name: str, learning_rate: float | Callable, l2: float, b1: float,
                        b2: float) -> optax.GradientTransformation:
  """The tables' optimizer ``name`` (``adagrad`` or ``lazy_adam``), after the rows' L2."""
  if name == "adagrad":
    inner = rowwise_adagrad(learning_rate)
  elif name == "lazy_adam":
    inner = lazy_adam(learning_rate, b1=b1, b2=b2)
  else:
    raise ValueError(f"optimizer.embedding_optimizer={name!r}; expected one of "
                     f"{EMBEDDING_OPTIMIZERS}")
  return optax.chain(rows_present_l2(l2), inner) if l2 else inner


def per_group(dense: optax.GradientTransformation,
              embedding: optax.GradientTransformation) -> optax.GradientTransformation:
  """``dense`` for the dense layers, ``embedding`` for the tables (``optax.multi_transform``)."""
  return optax.multi_transform({DENSE: dense, EMBEDDING: embedding}, parameter_groups)
