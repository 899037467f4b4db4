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
  assert {k: v for k, v in changed.items() if v != sums[k]}.keys() == {"w"}
  # Two swapped values keep the plain sum; the position-weighted one sees them.
  swapped = np.asarray(state["w"]).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  a, b = checkpointing.state_checksums(dict(state, w=jnp.asarray(swapped)))["w"], sums["w"]
  assert a[0] == b[0] and a[1] != b[1]


def test_a_checkpoint_holding_other_values_is_refused_by_path(tmp_path):
  for name, seed in (("a", 0), ("b", 1)):
    ckpt = checkpointing.Checkpoints(str(tmp_path / name))
    ckpt.save(7, _state(seed), {"step": 7})
    ckpt.close()
  # Files that Orbax reads without complaint, but not those the checksums were taken of.
  step_a = tmp_path / "a" / "checkpoints" / "7"
  shutil.rmtree(step_a / "state")
  shutil.copytree(tmp_path / "b" / "checkpoints" / "7" / "state", step_a / "state")
  ckpt = checkpointing.Checkpoints(str(tmp_path / "a"), read_only=True)
  abstract = jax.eval_shape(lambda: _state(0))
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=rf"checkpoint {step_a} does not hold what was saved"):
    ckpt.restore(abstract)
  ckpt.close()


def test_one_manager_keeps_the_newest_and_the_best_evaluated_checkpoint(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep_latest=2, async_save=True)
  scores = {10: 0.5, 20: 0.7, 25: None, 30: 0.6, 40: 0.7, 45: None}  # None: between evaluations
  for step, score in scores.items():
    ckpt.save(step, _state(step), {"step": step}, score=score)
  ckpt.wait()
  # 20 is the best (40 only ties it: the earlier step wins, as in the trainer); 40, 45 newest.
  assert ckpt.steps() == [20, 40, 45]
  assert ckpt.step_of(checkpointing.BEST) == 20 and ckpt.step_of(checkpointing.LATEST) == 45
  ckpt.close()
  reopened = checkpointing.Checkpoints(str(tmp_path), read_only=True)
  assert reopened.step_of(checkpointing.BEST) == 20  # the metric is stored with the checkpoint
  state, meta = reopened.restore(jax.eval_shape(lambda: _state(0)), checkpointing.BEST)
  assert meta["step"] == int(state["step"]) == 20
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(20)["w"]))
  reopened.close()


def test_a_nan_score_is_never_the_best_and_never_costs_the_best(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep_latest=2)
  for step, score in {1: 0.8, 2: 0.7, 3: float("nan"), 4: 0.6, 5: 0.5}.items():
    ckpt.save(step, _state(step), {"step": step}, score=score)
  ckpt.wait()
  assert ckpt.steps() == [1, 4, 5] and ckpt.step_of(checkpointing.BEST) == 1
  ckpt.close()
  # Scores written as NaN by an earlier version rank below every number.
  assert checkpointing._rank({"score": float("nan"), "step": 3}) < \
      checkpointing._rank({"score": -1e30, "step": 9})


def test_a_damaged_metrics_file_is_named(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  for step in (10, 20):
    ckpt.save(step, _state(step), {"step": step}, score=0.5)
  ckpt.close()
  damaged = tmp_path / "checkpoints" / "20" / "metrics" / "metrics"
  damaged.write_text("{not json")
  (tmp_path / "checkpoints" / "0_notes.txt").write_text("a user's file, listed first")
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=rf"{damaged}: not valid JSON .*delete that checkpoint's step"):
    checkpointing.Checkpoints(str(tmp_path), read_only=True)


def test_an_async_save_holds_the_state_it_was_given_though_the_buffers_are_donated(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path), async_save=True)
  state = _state(0)
  expected = np.asarray(state["w"]).copy()
  ckpt.save(1, state, {})
  step = jax.jit(lambda s: dict(s, w=s["w"] * 2.0), donate_argnums=0)
  for _ in range(3):
    state = step(state)  # overwrites the saved arrays' device buffers where it can
  ckpt.close()
  restored, _ = checkpointing.Checkpoints(str(tmp_path), read_only=True).restore(
      jax.eval_shape(lambda: _state(0)))
  np.testing.assert_array_equal(np.asarray(restored["w"]), expected)


def test_an_async_save_holds_the_meta_it_was_given_though_the_caller_changes_it(tmp_path):
  """The meta's JSON is written in the background: a list the caller appends to right after
  ``save`` (as the trainer appends to its history) is saved as it was at ``save``."""
  ckpt = checkpointing.Checkpoints(str(tmp_path), async_save=True)
  meta = {"step": 1, "history": [{"step": 1}]}
  ckpt.save(1, _state(0), meta)
  meta["history"].append({"step": 2})
  ckpt.close()
  _, restored = checkpointing.Checkpoints(str(tmp_path), read_only=True).restore(
      jax.eval_shape(lambda: _state(0)))
  assert restored["history"] == [{"step": 1}]


def test_params_restore_alone_onto_one_device_from_a_sharded_state(tmp_path):
  mesh = jax.make_mesh((8,), ("model",))
  row_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
  state = {"params": {"table": jax.device_put(jnp.arange(64.0).reshape(16, 4), row_sharded)},
           "opt_state": {"mu": jnp.ones((16, 4))}}
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  ckpt.save(3, state, {"step": 3})
  ckpt.close()
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"table": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=one_device)}
  params, meta = checkpointing.Checkpoints(str(tmp_path), read_only=True).restore_params(abstract)
  assert meta["step"] == 3 and params["table"].sharding == one_device
  np.testing.assert_array_equal(np.asarray(params["table"]), np.arange(64.0).reshape(16, 4))


def test_the_parameters_of_another_model_are_named_not_taken_for_damage(tmp_path):
  """A checkpoint of a model an earlier version built otherwise (a layer since dropped, or one
  since added): refused naming the parameters, not as unreadable files."""
  state = {"params": {"dense": {"kernel": jnp.ones((4, 2))}, "gate": {"kernel": jnp.ones(2)}},
           "opt_state": {"mu": jnp.ones((4, 2))}}
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  ckpt.save(3, state, {"step": 3})
  ckpt.close()
  ckpt = checkpointing.Checkpoints(str(tmp_path), read_only=True)
  now = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32)},
         "tower": {"bias": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  match = (r"checkpoints/3 holds the parameters of another model than this version builds from "
           r"its config \(not built now: \['gate/kernel'\]; not in the checkpoint: "
           r"\['tower/bias'\]\): it was trained by an earlier version")
  with pytest.raises(checkpointing.OtherModelError, match=match):
    ckpt.restore_params(now)
  with pytest.raises(checkpointing.OtherModelError, match=match):
    ckpt.restore({"params": now, "opt_state": {"mu": now["dense"]["kernel"]}})
  assert not issubclass(checkpointing.OtherModelError, checkpointing.CorruptCheckpointError)
  ckpt.close()
  # The same model is the same whatever holds its arrays: a flax Partitioned box (a model of
  # nn.with_partitioning) is {'value': ...} in the checkpoint's metadata.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  boxed = {"params": {"a": nn.Partitioned(jnp.arange(4.0), names=("x",))}}
  ckpt = checkpointing.Checkpoints(str(tmp_path / "boxed"))
  ckpt.save(1, boxed, {"step": 1})
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), boxed["params"])
  params, _ = checkpointing.Checkpoints(str(tmp_path / "boxed"), read_only=True).restore_params(
      abstract)
  np.testing.assert_array_equal(np.asarray(params["a"].value), np.arange(4.0))


def test_read_only_checkpoints_create_nothing_and_an_old_layout_is_named(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path / "none"), read_only=True)
  assert ckpt.steps() == [] and ckpt.step_of(checkpointing.BEST) is None
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    ckpt.restore_meta()
  assert not (tmp_path / "none").exists()
  os.makedirs(tmp_path / "old" / "checkpoints" / "latest" / "30")
  with pytest.raises(ValueError, match="layout of an earlier version"):
    checkpointing.Checkpoints(str(tmp_path / "old"))


def test_saving_a_replicated_state_on_cpu_devices_copies_each_array_once(tmp_path, caplog):
  """One process on the 8 CPU devices: a state replicated over all of them is saved from one
  replica, not cut into a slice a device (Orbax's replica-parallel default compiled a slice per
  leaf shape and copied every leaf eight times). It restores as saved."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put({"w": jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8),
                          "b": jnp.ones((24,), jnp.float32)}, replicated)
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  checkpointing.state_checksums(state)  # compiled before the save: what is left is the save's
  with jax.log_compiles(), caplog.at_level("WARNING"):
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()
  compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
  assert compiled == []
  restored, _ = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, restored, state)
