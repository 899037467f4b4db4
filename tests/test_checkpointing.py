"""apem_jax.checkpointing: checksums catch a checkpoint that restores but holds other values."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apem_jax import checkpointing


def _state(seed: int) -> dict:
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"w": jax.random.normal(keys[0], (64, 8)), "step": jnp.asarray(seed, jnp.int32),
          "rng": keys[1]}


def test_checksums_are_exact_and_see_one_changed_word():
  state = _state(0)
  sums = checkpointing.state_checksums(state)
  assert sums == checkpointing.state_checksums(jax.tree.map(jnp.copy, state))
  w = np.asarray(state["w"]).copy()
  w[3, 4] = np.nextafter(w[3, 4], np.inf)  # one ulp of one value
  changed = checkpointing.state_checksums(dict(state, w=jnp.asarray(w)))
  assert changed[:2] == sums[:2] and changed[2] != sums[2]  # leaves in key order: rng, step, w
  # Two swapped values keep the plain sum; the position-weighted one sees them.
  swapped = np.asarray(state["w"]).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  a, b = checkpointing.state_checksums(dict(state, w=jnp.asarray(swapped)))[2], sums[2]
  assert a[0] == b[0] and a[1] != b[1]


def test_a_checkpoint_holding_other_values_is_refused_by_path(tmp_path):
  for name, seed in (("a", 0), ("b", 1)):
    ckpt = checkpointing.Checkpoints(str(tmp_path / name))
    ckpt.save(checkpointing.LATEST, 7, _state(seed), {"step": 7})
    ckpt.close()
  # Files that Orbax reads without complaint, but not those the checksums were taken of.
  step_a = tmp_path / "a" / "checkpoints" / "latest" / "7"
  shutil.rmtree(step_a / "state")
  shutil.copytree(tmp_path / "b" / "checkpoints" / "latest" / "7" / "state", step_a / "state")
  ckpt = checkpointing.Checkpoints(str(tmp_path / "a"))
  abstract = jax.eval_shape(lambda: _state(0))
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=rf"checkpoint {step_a} does not hold what was saved"):
    ckpt.restore(checkpointing.LATEST, abstract)
  ckpt.close()
