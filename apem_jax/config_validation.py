"""Checks of a run's config that fail before anything is compiled, naming the key at fault."""

from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections
from ml_collections.config_flags import config_path

from apem_jax import balancing, optimizers
from apem_jax.schema import Schema

# Section -> key -> accepted types. Model keys are checked by the model registry.
_REQUIRED = {
    "": {"seed": (int,)},
    "train": {"batch_size": (int,), "eval_batch_size": (int,), "num_epochs": (int,),
              "patience": (int,), "log_every": (int,), "task_weights": (tuple, list),
              "progress_bar": (bool,), "eval_every_steps": (int,),
              "checkpoint_every_steps": (int,)},
    "optimizer": {"learning_rate": (float, int), "schedule": (str,), "warmup_steps": (int,),
                  "final_lr_ratio": (float, int), "b1": (float,), "b2": (float,),
                  "weight_decay": (float, int), "grad_clip_norm": (float, int)},
    "parallel": {"mode": (str,), "model_parallelism": (int,), "shard_embeddings_min_rows": (int,)},
    "checkpoint": {"keep_latest": (int,), "async_save": (bool,)},
    "data": {"name": (str,)},
    "model": {"name": (str,)},
}
_POSITIVE = ("train.batch_size", "train.eval_batch_size", "train.num_epochs", "train.patience",
             "train.log_every", "optimizer.learning_rate", "checkpoint.keep_latest",
             "parallel.model_parallelism")


# (key, low, high, what is expected): low <= value < high.
_RANGES = (("seed", 0, 2**63, "an int in [0, 2**63) (numpy and JAX seeds)"),
           ("optimizer.b1", 0.0, 1.0, "a number in [0, 1)"),
           ("optimizer.b2", 0.0, 1.0, "a number in [0, 1)"),
           ("optimizer.final_lr_ratio", 0.0, math.inf,
            "a number >= 0 (the final learning rate over the peak)"),
           ("optimizer.weight_decay", 0.0, math.inf, "a number >= 0"),
           ("optimizer.grad_clip_norm", 0.0, math.inf, "a number >= 0 (0 disables clipping)"),
           ("optimizer.warmup_steps", 0, math.inf, "an int >= 0"),
           ("optimizer.learning_rate", 0.0, math.inf, "a finite number > 0"))


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
      raise ValueError(f"config: missing required key {path!r}")
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first missing, mistyped or out-of-range key."""
  for section, keys in _REQUIRED.items():
    for key, types in keys.items():
      path = f"{section}.{key}" if section else key
      value = _get(config, path)
      if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ValueError(f"config: {path}={value!r} has type {type(value).__name__}, expected "
                         f"{' or '.join(t.__name__ for t in types)}")
  for path in _POSITIVE:
    if not _get(config, path) > 0:  # (NaN too)
      raise ValueError(f"config: {path}={_get(config, path)!r} must be positive")
  for path, low, high, what in _RANGES:
    value = _get(config, path)
    if not low <= value < high:  # (NaN too)
      raise ValueError(f"config: {path}={value!r}; expected {what}")
  for path in ("train.eval_every_steps", "train.checkpoint_every_steps"):
    if _get(config, path) < 0:
      raise ValueError(f"config: {path}={_get(config, path)} must be >= 0 (0: "
                       f"{'once per epoch' if 'eval' in path else 'at every evaluation only'})")
  if config.checkpoint.keep_latest < 2:
    raise ValueError(f"config: checkpoint.keep_latest={config.checkpoint.keep_latest} must be >= "
                     f"2, so that a resume can fall back to an older checkpoint if the newest "
                     f"one is damaged")
  # train.balancing and its settings (apem_jax/balancing.py); absent keys take their defaults.
  balancing.balancing_from_config(config.train)
  opt = config.optimizer
  if opt.get("embedding_optimizer", "same") not in optimizers.EMBEDDING_OPTIMIZERS:
    raise ValueError(f"config: optimizer.embedding_optimizer={opt.embedding_optimizer!r}; "
                     f"expected one of {optimizers.EMBEDDING_OPTIMIZERS}")
  for key in ("embedding_learning_rate", "embedding_l2"):
    value = opt.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ValueError(f"config: optimizer.{key}={value!r}; expected a number >= 0")
    if value and opt.get("embedding_optimizer", "same") == "same":
      raise ValueError(f"config: optimizer.{key}={value!r} applies only to the tables' own "
                       f"optimizer; set optimizer.embedding_optimizer to one of "
                       f"{optimizers.EMBEDDING_OPTIMIZERS[1:]} (it is 'same')")
  if config.parallel.mode not in ("jit", "pmap"):
    raise ValueError(f"config: parallel.mode={config.parallel.mode!r}; supported: 'jit', 'pmap'")
  if config.parallel.shard_embeddings_min_rows < 0:
    raise ValueError(f"config: parallel.shard_embeddings_min_rows="
                     f"{config.parallel.shard_embeddings_min_rows} must be >= 0 (0 disables)")
  if config.parallel.mode == "pmap" and config.parallel.model_parallelism != 1:
    raise ValueError(f"config: parallel.mode='pmap' is data parallel only; "
                     f"parallel.model_parallelism={config.parallel.model_parallelism} needs "
                     f"parallel.mode='jit'")


def validate_for_schema(config: ml_collections.ConfigDict, schema: Schema) -> None:
  """Checks that depend on the dataset's tasks."""
  weights = tuple(config.train.task_weights)
  expected = (f"expected one number >= 0 per task {list(schema.task_names)}, not all 0 (or an "
              f"empty tuple for all ones)")
  if any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights):
    raise ValueError(f"config: train.task_weights={weights!r}; {expected}")
  if weights and len(weights) != schema.num_tasks:
    raise ValueError(f"config: train.task_weights has {len(weights)} entries; {expected}")
  if weights and not (all(w >= 0 and math.isfinite(w) for w in weights) and any(weights)):
    raise ValueError(f"config: train.task_weights={weights}; {expected}")


def diff_keys(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two nested mappings."""
  out = []
  for key in sorted(set(a) | set(b)):
    path = f"{prefix}{key}"
    va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
    if isinstance(va, Mapping) and isinstance(vb, Mapping):
      out += diff_keys(va, vb, path + ".")
    elif (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
      out.append(path)
  return out


# Keys that say where things are, or how the data is read, not what was trained: they may
# differ between the run that trained a model and one that evaluates or exports it (a resume
# still refuses the ones that change the order of the training batches).
LOCATION_KEYS = ("data.data_dir", "data.stream", "data.shuffle_buffer", "data.stream_groups",
                 "data.interleave_cycle", "data.shard_rows")
_MISSING = "<missing>"


def _default_of(key: str, current: Mapping) -> Any:
  """The library's default value of a dotted config key (model keys: the current model's)."""
  from apem_jax.configs import common  # pylint: disable=g-import-not-at-top
  from apem_jax.models.defaults import default_model_config  # pylint: disable=g-import-not-at-top
  if key.startswith("model."):
    try:
      defaults = {"model": default_model_config(_value_at(current, "model.name")).to_dict()}
    except ValueError:
      return _MISSING
  else:
    defaults = common.base_config().to_dict()
  return _value_at(defaults, key)


def saved_config_differences(saved: Mapping, current: Mapping) -> list[str]:
  """:func:`diff_keys`, less keys one config lacks (a checkpoint's, written before the library
  added them; a config built without its unset keys) and the other holds at their default (the
  behaviour without the key; None, an unset key, is its loader's default)."""
  def same(a, b):
    return (list(a) if isinstance(a, (list, tuple)) else a) == (
        list(b) if isinstance(b, (list, tuple)) else b)

  def at_default(key, config):
    return _value_at(config, key) is None or same(_value_at(config, key), _default_of(key, current))

  return [k for k in diff_keys(saved, current)
          if not (_value_at(saved, k) == _MISSING and at_default(k, current)
                  or _value_at(current, k) == _MISSING and at_default(k, saved))]


def result_config_differences(saved: Mapping, current: Mapping) -> list[str]:
  """:func:`saved_config_differences` less where the data lives (:data:`LOCATION_KEYS`): the keys
  that make a finished result (a run's, a tuning trial's) not one of ``current``."""
  return [k for k in saved_config_differences(saved, current) if k not in LOCATION_KEYS]


def model_data_diff(saved: Mapping, current: Mapping) -> list[str]:
  """Keys that define a trained model and differ between a checkpoint's config and another:
  every ``model.*`` and ``data.*`` key but locations, and ``train.funnel`` (it changes what the
  logits mean) where the checkpoint records it."""
  return [k for k in saved_config_differences(saved, current)
          if k.startswith(("model.", "data.")) and k not in LOCATION_KEYS
          or k == "train.funnel" and "funnel" in saved.get("train", {})]


# Keys a resumed run may change: where the data is, how the run reports and checkpoints, how it
# is spread over devices (the same math; the streamed input's row groups, like the processes,
# only where the run stopped at an epoch's end or they stay the groups it stopped with:
# trainer.check_input_groups), and how long it goes on. Every other key changes the trajectory
# (model, data, optimizer, batch size, seed, schedule, losses).
RESUMABLE_KEYS = ("data.data_dir", "data.stream_groups", "train.num_epochs", "train.patience",
                  "train.log_every", "train.progress_bar", "train.eval_batch_size",
                  "train.checkpoint_every_steps", "parallel.", "checkpoint.")


def _value_at(tree: Mapping, key: str) -> Any:
  for part in key.split("."):
    tree = tree.get(part, _MISSING) if isinstance(tree, Mapping) else _MISSING
  return tree


def resume_diff(saved: Mapping, current: Mapping) -> tuple[list[str], dict[str, list]]:
  """(refused, accepted): the differing keys that would change a resumed run's trajectory, and
  the changes a resume may make (:data:`RESUMABLE_KEYS`) as ``{key: [saved, current]}``."""
  refused, accepted = [], {}
  for key in saved_config_differences(saved, current):
    if any(key == k or k.endswith(".") and key.startswith(k) for k in RESUMABLE_KEYS):
      accepted[key] = [_value_at(saved, key), _value_at(current, key)]
    else:
      refused.append(key)
  return refused, accepted


def apply_override(config, override: str, flag: str = "--set") -> None:
  """``key.path=value`` -> sets that config key; the value is parsed as the key's current type.
  Errors name ``flag`` and the override."""
  key, sep, text = override.partition("=")
  if not sep:
    raise ValueError(f"{flag} {override!r}: expected key=value")
  try:
    kind = config_path.get_type(key, config)  # an unset placeholder's too (its value is None)
  except (AttributeError, KeyError, ValueError):
    raise ValueError(f"{flag} {override!r}: no config key {key!r}") from None
  if kind is bool:
    if text not in ("true", "false", "True", "False"):
      raise ValueError(f"{flag} {override!r}: {key} is a bool; expected true or false")
    value = text.lower() == "true"
  elif kind in (int, float, str):
    try:
      value = kind(text)
    except ValueError as e:
      raise ValueError(f"{flag} {override!r}: {key} has type {kind.__name__}: {e}") from None
  else:
    raise ValueError(f"{flag} {override!r}: {key} holds a {getattr(kind, '__name__', kind)}; "
                     f"only bool, int, float and string keys can be set here")
  config_path.set_value(key, config, value)
