"""Every registered model learns the MMoE paper's synthetic data at task correlation p = 1."""

import jax
import ml_collections
import numpy as np
import pytest

from apem_jax import losses, step as step_lib
from apem_jax.data import load_dataset
from apem_jax.models import MODELS, build_model
from apem_jax.models.defaults import default_model_config


@pytest.fixture(scope="module")
def synthetic_data():
  return load_dataset(ml_collections.ConfigDict(dict(
      name="synthetic_mmoe",
      synthetic=dict(input_dim=6, num_examples=3000, correlation=1.0, num_sines=3, seed=1))))


def _validation_loss(model, params, data, schema):
  """Jitted: an eager APEM forward dispatches hundreds of ops one by one (seconds each time)."""
  arrays = data.arrays["validation"]
  batch = dict(arrays, weight=np.ones(len(arrays["labels"]), np.float32))

  @jax.jit
  def loss(params, batch):
    logits = model.apply({"params": params}, step_lib.model_inputs(batch))["logits"]
    return losses.multitask_loss(logits, batch, schema, (1.0, 1.0))[0]

  return float(loss(params, batch))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_learns_synthetic_p1(synthetic_data, name):
  data, schema = synthetic_data, synthetic_data.schema
  model_config = default_model_config(name)
  model_config.embed_dim = 8
  model = build_model(model_config, schema)
  config = ml_collections.ConfigDict(dict(optimizer=dict(
      learning_rate=3e-3, schedule="constant", warmup_steps=0, final_lr_ratio=1.0, b1=0.9,
      b2=0.999, weight_decay=0.0, grad_clip_norm=1.0)))
  tx = step_lib.make_optimizer(config, 200)
  batches = data.train_batches(128, seed=0)
  state = jax.jit(lambda key, batch: step_lib.init_state(model, tx, key, batch))(
      jax.random.key(0), next(batches))
  initial = _validation_loss(model, state.params, data, schema)
  train_step, _ = step_lib.bind_steps(model, tx, schema, (1.0, 1.0))
  train_step = jax.jit(train_step)
  for _ in range(200):
    state, _ = train_step(state, next(batches))
  final = _validation_loss(model, state.params, data, schema)
  assert np.isfinite(final)
  assert final < 0.3 * initial, (name, initial, final)
