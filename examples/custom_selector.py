"""Replace APEM's Pattern Selector with a module of your own, register the model, train it with a
task-balancing method.

python examples/custom_selector.py runs/custom_selector

``APEM.selector`` is the module APEM builds its selector from; a subclass swaps it, and
``register_model`` makes the subclass a model every command and API knows by name (with APEM's
config keys). The selector below gives every task the same max-pooled pattern: a deliberately
simple stand-in for your idea.
"""

import sys

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

import apem_jax
from apem_jax.configs import common


class MaxPoolSelector(nn.Module):
  """fields [B, F, d], groups [B, G, d] -> (h [B, T, d], alpha [B, T, F+G]).

  APEM builds its selector with PatternSelector's keyword arguments, so every one of them is an
  attribute here, used or not."""

  num_tasks: int
  top_k: int = 0
  adaptive: bool = True
  indicator_hidden: int = 32
  enabled: bool = True
  dtype: str = "float32"

  @nn.compact
  def __call__(self, fields, groups):
    patterns = jnp.concatenate([fields, groups], axis=1)  # [B, P, d]
    h = nn.Dense(patterns.shape[-1], name="project")(jnp.max(patterns, axis=1))  # [B, d]
    batch, num_patterns = patterns.shape[0], patterns.shape[1]
    h = jnp.broadcast_to(h[:, None], (batch, self.num_tasks, h.shape[-1]))
    alpha = jnp.full((batch, self.num_tasks, num_patterns), 1.0 / num_patterns)
    return h, alpha


class APEMWithMaxPool(apem_jax.APEM):
  selector = MaxPoolSelector


apem_jax.register_model("apem_maxpool", APEMWithMaxPool, defaults_of="apem")

config = common.base_config("apem_maxpool")
config.model.update(embed_dim=8, num_blocks=1, num_groups=4, tower_hidden=(16,))
config.data = ml_collections.ConfigDict(dict(
    name="synthetic_mmoe",
    synthetic=dict(input_dim=6, num_examples=4000, correlation=0.5, task_kind="binary", seed=0)))
config.train.update(batch_size=128, num_epochs=2, balancing="pcgrad", progress_bar=False)
if len(sys.argv) != 2 or sys.argv[1].startswith("-"):  # (not a workdir named "--help")
  sys.exit("usage: python examples/custom_selector.py WORKDIR")
summary = apem_jax.train_and_evaluate(config, sys.argv[1])
print(f"apem_maxpool with PCGrad: best validation score {summary['best_validation_score']:.4f}")
