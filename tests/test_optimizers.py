"""Per-group optimizers: row-wise Adagrad and lazy Adam move only the rows a batch holds."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from apem_jax import optimizers, step as step_lib
from apem_jax.configs import common
from apem_jax.models import build_model
from apem_jax.schema import make_schema


def _table_grads():
  params = {"embedding": {"categorical_table": jnp.arange(12.0).reshape(4, 3)},
            "dense": {"kernel": jnp.ones((3, 2))}}
  grads = {"embedding": {"categorical_table": jnp.array(
      [[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])},
           "dense": {"kernel": jnp.full((3, 2), 0.5)}}
  return params, grads


def test_tables_are_their_own_group():
  params, _ = _table_grads()
  assert optimizers.parameter_groups(params) == {"embedding": {"categorical_table": "embedding"},
                                                 "dense": {"kernel": "dense"}}


def test_rowwise_adagrad_by_hand():
  params, grads = _table_grads()
  table, g = params["embedding"]["categorical_table"], grads["embedding"]["categorical_table"]
  tx = optimizers.rowwise_adagrad(0.1)
  state = tx.init(table)
  update, state = tx.update(g, state)
  # accumulators: mean of the squared gradient per row: 3, 0, 25/3, 0
  np.testing.assert_allclose(state[0].accumulator, [3.0, 0.0, 25.0 / 3.0, 0.0], rtol=1e-6)
  expected = -0.1 * np.asarray(g) / (np.sqrt([3.0, 0.0, 25.0 / 3.0, 0.0])[:, None] + 1e-8)
  np.testing.assert_allclose(update, expected, rtol=1e-6)
  assert np.all(np.asarray(update)[[1, 3]] == 0.0)  # absent rows stay where they are
  update, state = tx.update(g, state)
  np.testing.assert_allclose(state[0].accumulator, [6.0, 0.0, 50.0 / 3.0, 0.0], rtol=1e-6)


def test_lazy_adam_is_adam_on_present_rows_and_leaves_absent_rows_alone():
  params, grads = _table_grads()
  g = grads["embedding"]["categorical_table"]
  lazy, adam = optimizers.lazy_adam(0.01), optax.adam(0.01)
  lazy_state, adam_state = lazy.init(g), adam.init(g)
  full = jnp.ones_like(g)
  lazy_updates = []
  for step_grad in (g, full, g):  # rows 1 and 3 present at the second step only
    lazy_update, lazy_state = lazy.update(step_grad, lazy_state)
    adam_update, adam_state = adam.update(step_grad, adam_state)
    lazy_updates.append(np.asarray(lazy_update))
  # Rows 1 and 3 first seen at step 2 (gradient 1): their one-step moments m = 0.1, v = 0.001,
  # bias-corrected with the global step t = 2 (TensorFlow Addons' LazyAdam; a per-row count
  # t = 1 would give -0.01 instead), epsilon as in optax.adam:
  # -0.01 * (0.1 / (1 - 0.9**2)) / sqrt(0.001 / (1 - 0.999**2)) = -0.0074413.
  np.testing.assert_allclose(lazy_updates[1][[1, 3]], -0.0074413 * np.ones((2, 3)), rtol=1e-4)
  # Rows always present: Adam's update; rows 1 and 3 at the third step: no update, and their
  # moments are those of their one step (Adam's decayed them, and moves them).
  np.testing.assert_allclose(np.asarray(lazy_update)[[0, 2]], np.asarray(adam_update)[[0, 2]],
                             rtol=1e-5)
  assert np.all(np.asarray(lazy_update)[[1, 3]] == 0.0)
  assert np.all(np.asarray(adam_update)[[1, 3]] != 0.0)
  np.testing.assert_allclose(np.asarray(lazy_state.mu)[1], 0.1 * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lazy_state.nu)[1], 1e-3 * np.ones(3), rtol=1e-6)


def test_l2_on_present_rows_only():
  params, grads = _table_grads()
  tx = optimizers.rows_present_l2(0.5)
  out, _ = tx.update(grads, tx.init(params), params)
  table, g = params["embedding"]["categorical_table"], grads["embedding"]["categorical_table"]
  expected = np.asarray(g) + 0.5 * np.asarray(table) * np.array([1, 0, 1, 0])[:, None]
  np.testing.assert_allclose(out["embedding"]["categorical_table"], expected)


@pytest.mark.parametrize("name", ["adagrad", "lazy_adam"])
def test_in_a_train_step_rows_not_in_the_batch_do_not_move(name):
  schema = make_schema(vocab_sizes=(6,), num_numeric=1, task_names=("a",))
  config = common.base_config("shared_bottom")
  config.optimizer.update(schedule="constant", embedding_optimizer=name, embedding_l2=1e-3)
  model = build_model(config.model, schema)
  tx = step_lib.make_optimizer(config, total_steps=10)

  def batch(ids):
    ids = np.asarray(ids, np.int32)[:, None]
    return {"categorical": ids, "numeric": np.zeros((len(ids), 1), np.float32),
            "labels": (ids % 2).astype(np.float32), "label_mask": np.ones((len(ids), 1), np.float32),
            "weight": np.ones(len(ids), np.float32)}

  state = step_lib.init_state(model, tx, jax.random.key(0), batch([0]))
  # The state donated, as the trainer's step does (each state leaf must be a buffer of its own).
  train_step = jax.jit(step_lib.bind_steps(model, tx, schema, (1.0,))[0], donate_argnums=0)
  state, _ = train_step(state, batch([0, 1, 0, 1]))
  before = np.asarray(state.params["embedding"]["categorical_table"])
  state, _ = train_step(state, batch([2, 3, 2, 3]))
  after = np.asarray(state.params["embedding"]["categorical_table"])
  assert np.all(after[[0, 1, 4, 5, 6]] == before[[0, 1, 4, 5, 6]])  # not in the second batch
  assert np.all(np.any(after[[2, 3]] != before[[2, 3]], axis=1))


@pytest.mark.parametrize("method", ["uncertainty", "gradnorm"])
def test_a_balancing_method_with_its_own_weights_trains_with_a_table_optimizer(method):
  """The weights of uncertainty weighting and GradNorm, a bare [T] array, get their optimizer
  state from the same transformation as the model (a bare array has no leaf name)."""
  from apem_jax import balancing as balancing_lib
  schema = make_schema(vocab_sizes=(6,), num_numeric=1, task_names=("a", "b"))
  config = common.base_config("shared_bottom")
  config.optimizer.embedding_optimizer = "adagrad"
  config.train.balancing = method
  model = build_model(config.model, schema)
  tx = step_lib.make_optimizer(config, total_steps=10)
  balancing = balancing_lib.balancing_from_config(config.train)
  ids = np.array([[0], [1], [2], [3]], np.int32)
  batch = {"categorical": ids, "numeric": np.zeros((4, 1), np.float32),
           "labels": np.concatenate([ids % 2, ids // 2], axis=1).astype(np.float32),
           "label_mask": np.ones((4, 2), np.float32), "weight": np.ones(4, np.float32)}
  state = step_lib.init_state(model, tx, jax.random.key(0), batch, balancing)
  train_step = jax.jit(step_lib.bind_steps(model, tx, schema, (1.0, 1.0),
                                           balancing=balancing)[0])
  state, metrics = train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 1


def test_an_unknown_embedding_optimizer_is_named():
  from apem_jax import config_validation
  config = common.base_config("mmoe")
  config.data = ml_collections.ConfigDict({"name": "synthetic_mmoe"})
  config.optimizer.embedding_optimizer = "sgd"
  with pytest.raises(ValueError, match=r"optimizer.embedding_optimizer='sgd'; expected one of"):
    config_validation.validate(config)


@pytest.mark.parametrize("key", ["embedding_l2", "embedding_learning_rate"])
def test_a_table_optimizer_setting_without_a_table_optimizer_is_named(key):
  from apem_jax import config_validation
  config = common.base_config("mmoe")
  config.data = ml_collections.ConfigDict({"name": "synthetic_mmoe"})
  config.optimizer[key] = 0.1
  with pytest.raises(ValueError, match=rf"optimizer.{key}=0.1 applies only to the tables' own "
                                       rf"optimizer; set optimizer.embedding_optimizer"):
    config_validation.validate(config)
  config.optimizer.embedding_optimizer = "lazy_adam"
  config_validation.validate(config)
