"""A schema, a model from its config, and the pure train step in a loop of your own.

python examples/train_step_by_hand.py
"""

import jax
import numpy as np

import apem_jax
from apem_jax.configs import common

# Two categorical fields (10 and 20 values), three numeric ones, two binary tasks.
schema = apem_jax.make_schema(vocab_sizes=(10, 20), num_numeric=3, task_names=("click", "buy"))
config = common.base_config("apem")
config.model.update(embed_dim=8, num_blocks=1, num_groups=4, tower_hidden=(16,))
model = apem_jax.build_model(config.model, schema)
tx = apem_jax.make_optimizer(config, total_steps=200)

rng = np.random.default_rng(0)


def batch(size: int = 256) -> dict[str, np.ndarray]:
  """A random batch whose click label depends on field c0 and whose buy follows the click."""
  categorical = np.stack([rng.integers(0, 10, size), rng.integers(0, 20, size)], -1)
  click = (categorical[:, 0] < 5).astype(np.float32)
  buy = click * (categorical[:, 1] < 10)
  labels = np.stack([click, buy], -1).astype(np.float32)
  return {"categorical": categorical.astype(np.int32),
          "numeric": rng.normal(size=(size, 3)).astype(np.float32),
          "labels": labels, "label_mask": np.ones_like(labels),
          "weight": np.ones(size, np.float32)}


state = apem_jax.init_state(model, tx, jax.random.key(0), batch(1))
train_step, eval_step = apem_jax.bind_steps(model, tx, schema, task_weights=(1.0, 1.0))
train_step = jax.jit(train_step)
for step in range(200):
  state, metrics = train_step(state, batch())
  if step % 50 == 0 or step == 199:
    print(f"step {step}: loss {float(metrics['loss']):.4f}")
predictions = jax.jit(eval_step)(state, batch(4))["predictions"]
print("predictions [4, 2]:", np.round(np.asarray(predictions), 3).tolist())
