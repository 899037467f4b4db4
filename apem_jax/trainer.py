"""The training loop, written once for every model: train, evaluate, checkpoint, stop early.

Sections: (1) data, model and mesh; (2) the state, created where it belongs or restored from the
newest checkpoint of the workdir that restores; (3) compiled train steps, with an exact
evaluation on the validation split every ``train.eval_every_steps``, checkpoints (each holding
the input pipeline's position, so a resume continues with the next batch), the early-stopping
decision, and a clean stop on SIGTERM / SIGINT / preemption.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from apem_jax import balancing, checkpointing, config_validation, losses, metrics as metrics_lib, parallel, reporting, step as step_lib
from apem_jax.configs import common
from apem_jax.data import DatasetSplits, load_dataset
from apem_jax.data.pipeline import EVAL_ONLY_KEYS
from apem_jax.models import build_model
from apem_jax.schema import Schema


def load_dataset_prepared_once(data_config: Any):
  """The dataset, prepared (downloaded, built, encoded and cached) by process 0 alone: the other
  processes wait at a barrier, then read what it wrote (the data directory must be on storage
  every process sees, as the workdir is). With one process: ``load_dataset``."""
  if jax.process_count() == 1:
    return load_dataset(data_config)
  data = load_dataset(data_config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("apem_jax: dataset prepared by process 0")
  return load_dataset(data_config) if data is None else data


def example_batch(schema: Schema) -> dict[str, jax.Array]:
  """Model inputs of one all-zero row: what ``init`` and ``eval_shape`` take."""
  return {"categorical": jnp.zeros((1, len(schema.categorical)), jnp.int32),
          "numeric": jnp.zeros((1, len(schema.numeric)), jnp.float32)}


# A few validation rows' model inputs, stored in the workdir at training time: export checks its
# artifacts on them without reading the dataset.
VALIDATION_SAMPLE_FILE = "validation_sample.npz"
VALIDATION_SAMPLE_ROWS = 1024


# ``data.name`` of a run whose dataset was given in Python (``data=``) rather than by the config.
GIVEN_DATA = "given"


def with_given_data(config: ml_collections.ConfigDict, data: Any) -> ml_collections.ConfigDict:
  """``config`` as a run on ``data`` records it: a copy whose ``data`` section says the dataset
  was given in Python (a config may leave ``data`` out then; a resume still checks the data's
  fingerprint)."""
  if data is None:
    return config
  if not all(hasattr(data, a) for a in ("schema", "train_batches", "eval_batches", "fingerprint")):
    raise TypeError(f"data= must be a dataset (a DatasetSplits, from "
                    f"apem_jax.data.dataset_from_columns, or a StreamedSplits), got "
                    f"{type(data).__name__}")
  config = ml_collections.ConfigDict(config.to_dict())
  if "data" not in config:
    config.data = ml_collections.ConfigDict({"name": GIVEN_DATA})
  return config


class Experiment:
  """Data, model, mesh and compiled steps of one config: what training and evaluation share.

  ``data``: a dataset given in Python (:func:`apem_jax.data.dataset_from_columns`) instead of the
  one ``config.data`` names. ``training=False`` (evaluation, export): ``train.batch_size`` only
  sizes the optimizer's schedule, so it need not divide this mesh's data axis."""

  def __init__(self, config: ml_collections.ConfigDict, data: DatasetSplits | None = None,
               training: bool = True):
    config = with_given_data(config, data)
    config_validation.validate(config)
    self.config = config
    self.data = data if data is not None else load_dataset_prepared_once(config.data)
    self.schema: Schema = self.data.schema
    config_validation.validate_for_schema(config, self.schema)
    self.mesh = parallel.make_mesh(config.parallel.model_parallelism)
    # Large tables are stored with their rows padded to a multiple of the model axis (parallel.py).
    self.model = parallel.pad_tables(build_model(config.model, self.schema),
                                     example_batch(self.schema),
                                     self.mesh.shape[parallel.MODEL_AXIS],
                                     config.parallel.shard_embeddings_min_rows)
    self.pmap = config.parallel.mode == "pmap"
    if training:
      parallel.check_batch_size(config.train.batch_size, self.mesh, "train.batch_size")
      self.data.check_batch_size(config.train.batch_size)  # (the streamed input's row groups)
    parallel.check_batch_size(config.train.eval_batch_size, self.mesh, "train.eval_batch_size")
    self.data_fingerprint = self.data.fingerprint()
    self.steps_per_epoch = self.data.num_examples("train") // config.train.batch_size
    # What the training order depends on besides the seed: the streamed input's row groups, or
    # (in memory) the processes, each of which reads its own rows.
    self.input_groups = getattr(self.data, "groups", 0) or jax.process_count()
    if self.steps_per_epoch < 1:
      raise ValueError(f"train.batch_size={config.train.batch_size} exceeds the "
                       f"{self.data.num_examples('train')} training examples")
    self.total_steps = self.steps_per_epoch * config.train.num_epochs
    self.tx = step_lib.make_optimizer(config, self.total_steps)
    self.head = task_head(config, self.schema, self.model)
    self.balancing = balancing.balancing_from_config(config.train)
    train_step, eval_step = step_lib.bind_steps(self.model, self.tx, self.schema,
                                                task_weights(config, self.schema),
                                                parallel.PMAP_AXIS if self.pmap else None,
                                                head=self.head, balancing=self.balancing)
    self.traces = {"train_step": 0, "eval_step": 0}
    train_step = _count_traces(train_step, self.traces, "train_step")
    eval_step = _count_traces(eval_step, self.traces, "eval_step")
    abstract = jax.eval_shape(self._init, jax.random.key(0))
    self.state_sharding = parallel.state_shardings(abstract, self.mesh,
                                                   config.parallel.shard_embeddings_min_rows)
    self.abstract_state = parallel.with_shardings(abstract, self.state_sharding)
    self.train_step = (parallel.pmap_train_step(train_step) if self.pmap else
                       parallel.jit_train_step(train_step, self.mesh, self.state_sharding))
    self.eval_step = parallel.jit_eval_step(eval_step, self.mesh, self.state_sharding)

  def _init(self, rng: jax.Array) -> step_lib.TrainState:
    return step_lib.init_state(self.model, self.tx, rng, example_batch(self.schema),
                               self.balancing)

  def init_state(self) -> step_lib.TrainState:
    """Fresh state, created directly with its shardings."""
    init = jax.jit(self._init, out_shardings=self.state_sharding)
    return init(jax.random.key(self.config.seed))

  # The state as train_step takes it: as is for 'jit'; one copy per local device for 'pmap'.
  # Checkpoints and evaluation always take the state as init_state returns it.
  def device_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return parallel.pmap_batch(local) if self.pmap else parallel.global_batch(local, self.mesh)

  def to_train(self, state: step_lib.TrainState) -> step_lib.TrainState:
    return parallel.replicate(state) if self.pmap else state

  def from_train(self, state: step_lib.TrainState) -> step_lib.TrainState:
    return parallel.unreplicate(state, self.state_sharding) if self.pmap else state

  def step_of(self, state: step_lib.TrainState) -> int:
    return int(state.step[0] if self.pmap else state.step)

  def predict(self, state: step_lib.TrainState, split: str) -> dict[str, np.ndarray]:
    """Every real example of a split, on the host: ``predictions`` [N, T] (entire-space ``p_t``),
    ``conditional`` [N, T] (``q_t``, step t given the step it depends on; ``= p_t`` outside
    funnels), ``labels``, ``label_mask`` (bool) and, where the data has them, the evaluation-only
    arrays (``true_q`` of synthetic funnels)."""
    # Filled in place (one array per output, of the split's rows): a split of millions of rows
    # is held once, not once in batches and again concatenated.
    n, filled, out = self.data.num_examples(split), 0, {}
    for local in self.data.eval_batches(split, self.config.train.eval_batch_size):
      batch = parallel.global_batch(local, self.mesh)
      keep = parallel.to_host(batch["weight"]) > 0
      rows = dict(self.eval_step(state, batch), labels=batch["labels"],
                  label_mask=batch["label_mask"],
                  **{k: batch[k] for k in EVAL_ONLY_KEYS if k in batch})
      count = int(keep.sum())
      for k, v in rows.items():
        v = parallel.to_host(v)[keep]
        if k == "label_mask":
          v = v > 0  # 1 byte a label, not 4
        if k not in out:
          out[k] = np.empty((n,) + v.shape[1:], v.dtype)
        out[k][filled:filled + count] = v
      filled += count
    if filled != n:
      raise RuntimeError(f"split {split!r}: evaluation read {filled} rows, the data has {n}")
    return out

  def evaluate(self, state: step_lib.TrainState, split: str) -> dict[str, dict[str, float]]:
    """Exact per-task metrics over the whole split; for a funnel schema also the per-step funnel
    metrics (``metrics.funnel_metrics``: conditional AUC, calibration, oracle AUC and gap)."""
    out = self.predict(state, split)
    result = metrics_lib.task_metrics(self.schema, out["labels"], out["label_mask"],
                                      out["predictions"])
    if self.schema.has_funnel:
      funnel = metrics_lib.funnel_metrics(self.schema, out["labels"], out["label_mask"],
                                          out["predictions"], out["conditional"], out.get("true_q"),
                                          entire_space=result)
      for task, m in funnel.items():
        result[task].update(m)
    return result


def _check_config(meta: Mapping, config: ml_collections.ConfigDict, workdir: str) -> None:
  """The model and data keys of ``config`` must be those the checkpoint was trained with."""
  mismatched = config_validation.model_data_diff(meta["config"], config.to_dict())
  if mismatched:
    raise ValueError(f"{workdir}: its checkpoint was trained with a different config; "
                     f"differing keys: {mismatched}")


def abstract_params(model: Any, schema: Schema) -> Any:
  """Shapes and dtypes of ``model``'s parameters, each placed whole on one local device (what a
  checkpoint's parameters restore into on any devices)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example_batch(schema),
                                             train=False))["params"]
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def stored_model(saved_config: Mapping, schema: Schema) -> Any:
  """The model as a run with ``saved_config`` stored it: its large tables padded for the run's
  model axis (``parallel.model_parallelism``, parallel.pad_tables)."""
  run_parallel = saved_config.get("parallel", {})
  return parallel.pad_tables(build_model(saved_config["model"], schema), example_batch(schema),
                             run_parallel.get("model_parallelism", 1),
                             run_parallel.get("shard_embeddings_min_rows", 0))


def _check_resume(meta: Mapping, exp: Experiment, workdir: str) -> dict:
  """Refuses a resume whose config changes the run's trajectory, or shortens it, or whose data
  gives another number of steps per epoch; returns the accepted changes as
  ``{key: [saved, now]}`` (recorded in the run's history)."""
  config = exp.config
  refused, accepted = config_validation.resume_diff(meta["config"], config.to_dict())
  if refused:
    raise ValueError(f"{workdir}: its checkpoint was trained with a different config, and these "
                     f"keys change the run's trajectory: {refused}; resume with the config in "
                     f"{workdir}/config.json (a resume may change only "
                     f"{list(config_validation.RESUMABLE_KEYS)}) or train in a new --workdir")
  if meta["data_fingerprint"] != exp.data_fingerprint:
    raise ValueError(f"{workdir}: the data changed since the checkpoint was trained (its "
                     f"encoded arrays' fingerprint is {exp.data_fingerprint[:12]}, the run's "
                     f"{meta['data_fingerprint'][:12]}); restore the data the run used, or train "
                     f"in a new --workdir")
  saved_spe = meta["data_position"]["steps_per_epoch"]
  if saved_spe != exp.steps_per_epoch:
    raise ValueError(f"{workdir}: the training split now gives {exp.steps_per_epoch} steps per "
                     f"epoch, the run was trained with {saved_spe}: the data changed; restore "
                     f"the data the run used, or train in a new --workdir")
  check_input_groups(meta["data_position"], exp.input_groups, workdir)
  saved_parallel = meta["config"].get("parallel", {})
  if (parallel.table_padding(stored_model(meta["config"], exp.schema))
      != parallel.table_padding(exp.model)):
    raise ValueError(f"{workdir}: the run stores its large tables padded for "
                     f"parallel.model_parallelism={saved_parallel.get('model_parallelism')}; "
                     f"resume with that value (eval.py and apem-export read the run on any "
                     f"devices)")
  if (saved_parallel.get("mode", "jit") != config.parallel.mode
      and config.model.get("dropout", 0.0) > 0):
    raise ValueError(f"{workdir}: the run was trained with parallel.mode="
                     f"{saved_parallel.get('mode', 'jit')!r} and model.dropout="
                     f"{config.model.dropout}: under the other mode the dropout masks differ "
                     f"(pmap draws them per device), which changes the run's trajectory; resume "
                     f"with parallel.mode={saved_parallel.get('mode', 'jit')!r}")
  if config.train.num_epochs * exp.steps_per_epoch < meta["step"]:
    raise ValueError(f"{workdir}: train.num_epochs={config.train.num_epochs} is below the "
                     f"{meta['step'] / saved_spe:g} epochs the run has done; a resume may change it, "
                     f"not below them")
  return accepted


def _schedule_change(config: ml_collections.ConfigDict, steps_per_epoch: int, step: int,
                     saved_epochs: int, epochs: int) -> str:
  """What a new ``train.num_epochs`` does to the learning rate from ``step`` on (the schedule
  spans the run's steps, so a longer run decays more slowly)."""
  saved, now = (step_lib.learning_rate_at(config, steps_per_epoch * e, step)
                for e in (saved_epochs, epochs))
  if saved == now:
    return f"The learning rate at step {step} stays {now:.4g}."
  return (f"The learning-rate schedule now spans {epochs} epochs, not {saved_epochs}: the rate "
          f"at step {step} is {now:.4g}, not {saved:.4g}.")


def _check_schema(meta: Mapping, schema: Schema, workdir: str) -> None:
  if Schema.from_dict(meta["schema"]) != schema:
    raise ValueError(f"{workdir}: the data now gives a different schema (fields, vocabularies, "
                     f"bucket boundaries or tasks) than the checkpoint was trained on; train in a "
                     f"new workdir, or restore the data the run used")


def _count_traces(fn, counter: dict, name: str):
  """``fn`` that counts, in ``counter[name]``, how often JAX traces (so compiles) it."""
  def traced(*args):
    counter[name] += 1
    return fn(*args)
  return traced


def task_head(config: ml_collections.ConfigDict, schema: Schema, model) -> losses.TaskHead:
  """The task head of ``config.train.funnel`` / ``calibration_weight`` for ``model`` on
  ``schema`` (see :mod:`apem_jax.losses`)."""
  return losses.make_head(schema, getattr(model, "output_space", None),
                          funnel=config.train.get("funnel", "entire_space"),
                          calibration_weight=config.train.get("calibration_weight", None))


def task_weights(config: ml_collections.ConfigDict, schema: Schema) -> tuple[float, ...]:
  weights = tuple(config.train.task_weights) or (1.0,) * schema.num_tasks
  return tuple(float(w) for w in weights)


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def data_position(step: int, steps_per_epoch: int, groups: int = 1) -> dict[str, int]:
  """Where the input pipeline stands after ``step`` steps: the epoch, the batches of it already
  consumed, and the ``groups`` (``Experiment.input_groups``) that ordered them (stored in every
  checkpoint, so a resume continues with the next batch)."""
  epoch, batch = divmod(step, steps_per_epoch)
  return {"epoch": epoch, "batch": batch, "steps_per_epoch": steps_per_epoch, "groups": groups}


def check_input_groups(position: Mapping[str, int], groups: int, workdir: str) -> None:
  """Refuses to resume in the middle of an epoch with the input read in another number of
  groups than the run's (the rest of the epoch would be another order: rows read twice, others
  not at all). A position saved before it recorded its groups is taken as it is."""
  saved = position.get("groups")
  if saved is not None and saved != groups and position["batch"]:
    raise ValueError(
        f"{workdir}: the run stopped after batch {position['batch']} of epoch "
        f"{position['epoch']} with its training input read in {saved} groups (its processes, or "
        f"data.stream_groups), and would now be read in {groups}, which orders the rest of the "
        f"epoch differently; resume on {saved} processes, or set data.stream_groups={saved} "
        f"(streamed input)")


def train_batches_from(exp: Experiment,
                       position: Mapping[str, int]) -> Iterator[Mapping[str, np.ndarray]]:
  """The training batches from ``position`` on, epoch after epoch. Epoch ``e``'s order depends
  only on (seed, e), so a run resumed at any step sees exactly the batches an uninterrupted run
  would have seen."""
  epoch, skip = position["epoch"], position["batch"]
  while True:
    batches = exp.data.train_batches(exp.config.train.batch_size,
                                     seed=_epoch_seed(exp.config.seed, epoch), skip=skip)
    for _ in range(exp.steps_per_epoch - skip):
      yield next(batches)
    epoch, skip = epoch + 1, 0


def write_preprocessing(data: Any, path: str) -> None:
  """The dataset's preprocessing (what export encodes raw features with) at ``path``: the
  prepared file's bytes where the data has one (``preprocessing_file``: a vocabulary of millions
  of ids is then never parsed in the training process), else its JSON; nothing without one."""
  source = getattr(data, "preprocessing_file", None)
  if source is not None:
    with open(source, "rb") as f:
      reporting.write_bytes_atomic(path, f.read())
  elif data.preprocessing is not None:
    reporting.write_json_atomic(path, data.preprocessing.to_dict())


def _write_run_files(exp: Experiment, workdir: str) -> None:
  """The config, the preprocessing and a validation sample (what export checks itself on)."""
  reporting.write_json_atomic(os.path.join(workdir, "config.json"), exp.config.to_dict())
  write_preprocessing(exp.data, os.path.join(workdir, "preprocessing.json"))
  reporting.write_npz_atomic(os.path.join(workdir, VALIDATION_SAMPLE_FILE),
                             exp.data.head("validation", VALIDATION_SAMPLE_ROWS))


def train_scalars(mean_loss: float, step_metrics: Mapping[str, jax.Array],
                  task_names: tuple[str, ...]) -> dict[str, float]:
  """The training curves' scalars: the loss, the gradient norm and, under a balancing method,
  each task's loss weight of the last step."""
  scalars = {"train/loss": mean_loss, "train/grad_norm": float(step_metrics["grad_norm"])}
  if "balance_weights" in step_metrics:  # [T], replicated (pmap: one copy)
    weights = np.asarray(step_metrics["balance_weights"])
    scalars.update({f"train/loss_weight/{t}": float(w) for t, w in zip(task_names, weights)})
  return scalars


class _TrainLoss:
  """The training loss since the last report, summed on the device (no read-back per step), and
  the step after which each task's loss first stopped being finite."""

  def __init__(self, task_names: tuple[str, ...]):
    self.task_names = task_names
    self.first_non_finite = jnp.full((len(task_names),), -1, jnp.int32)
    self.sum, self.count = jnp.zeros((), jnp.float32), 0

  def add(self, step_metrics: Mapping[str, jax.Array], state_step: jax.Array) -> None:
    self.sum, self.first_non_finite = _add_step_loss(
        self.sum, self.first_non_finite, step_metrics["loss"], step_metrics["loss_sum"],
        state_step)
    self.count += 1

  def mean(self, step: int) -> float:
    """The mean since the last call; raises ``FloatingPointError`` naming the tasks if not
    finite."""
    mean = float(self.sum) / self.count
    check_finite_loss(mean, step, np.asarray(self.first_non_finite), self.task_names)
    self.sum, self.count = jnp.zeros((), jnp.float32), 0
    return mean


@jax.jit
def _add_step_loss(total: jax.Array, first: jax.Array, loss: jax.Array,
                   task_loss_sums: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(total + loss, update_first_non_finite(first, task_loss_sums, step)): one dispatch a step
  (an eager add on an array replicated over 8 CPU devices took about 12 ms)."""
  return total + loss, update_first_non_finite(first, task_loss_sums, step)


@jax.jit
def update_first_non_finite(first: jax.Array, task_loss_sums: jax.Array,
                            step: jax.Array) -> jax.Array:
  """first [T] int32: the step after which each task's loss was first not finite (-1: never),
  updated on the device every step so the trainer need not read the losses back each step."""
  num_tasks = first.shape[0]
  task_loss_sums = jnp.reshape(task_loss_sums, (-1, num_tasks))[0]  # (pmap: every device's copy)
  return jnp.where((first < 0) & ~jnp.isfinite(task_loss_sums), jnp.ravel(step)[0], first)


def check_finite_loss(loss: float, step: int, first_non_finite: np.ndarray,
                  task_names: tuple[str, ...]) -> None:
  if not math.isfinite(loss):
    culprits = sorted((int(s), t) for s, t in zip(first_non_finite, task_names) if s >= 0)
    where = ", ".join(f"task {t!r} from step {s}" for s, t in culprits) or "no task's own loss"
    raise FloatingPointError(
        f"training loss is {loss} at step {step} (not finite: {where}); the run stopped. Lower "
        f"optimizer.learning_rate or set optimizer.grad_clip_norm, or check the data for NaN "
        f"labels, then train in a new --workdir (this one refuses another optimizer or other "
        f"data; its checkpoints are kept).")


def fresh_meta(exp: Experiment) -> dict:
  """The bookkeeping a checkpoint stores beside the state, at step 0."""
  return {"step": 0, "epoch": 0,
          "data_position": data_position(0, exp.steps_per_epoch, exp.input_groups),
          "data_fingerprint": exp.data_fingerprint,
          "validation": None, "score": None, "best_score": -math.inf, "best_step": None,
          "evals_without_improvement": 0, "history": [], "stopped": False, "resumes": [],
          "config": exp.config.to_dict(), "schema": exp.schema.to_dict()}


def early_stopped(meta: Mapping, config: ml_collections.ConfigDict) -> bool:
  """Early stopping's decision for a run at ``meta``, with the config's patience now."""
  return meta["evals_without_improvement"] >= config.train.patience


def resume_point(ckpt: checkpointing.Checkpoints, exp: "Experiment", workdir: str,
                 max_step: int | None = None):
  """``(state, meta, accepted config changes)`` of the checkpoint a run in ``workdir`` continues
  from, or None for a new run: the newest checkpoint (at most ``max_step``) that restores, saying
  which were skipped and why. A workdir with checkpoints is never restarted from scratch (its
  first saves would replace them). Nothing is written here. ``exp``: what is read of the
  experiment (its config, data fingerprint, steps per epoch, input groups, model, schema and
  abstract state)."""
  steps = [s for s in ckpt.steps() if max_step is None or s <= max_step]
  if not steps:
    return None
  failures = []
  for step in reversed(steps):
    try:
      meta = ckpt.restore_meta(step=step)
      changes = _check_resume(meta, exp, workdir)  # user errors: raised, not skipped
      _check_schema(meta, exp.schema, workdir)
      state, meta = ckpt.restore(exp.abstract_state, step=step)
    except checkpointing.CorruptCheckpointError as e:
      failures.append(str(e))
      print(f"{e}; trying the checkpoint before it" if step != steps[0] else str(e))
      continue
    return state, meta, changes
  raise checkpointing.CorruptCheckpointError(
      f"{workdir}: no checkpoint restores ({'; '.join(failures)}); restore the files from a "
      f"copy, or train in a new --workdir")


class StopRequests:
  """SIGTERM and SIGINT turned into a request that the training loop reads after each step: it
  then saves a checkpoint and returns (``summary['stopped_by']``). A second SIGINT interrupts at
  once. Installed only in the main thread of a one-process run: with several processes, JAX's
  preemption service owns SIGTERM and every process saves at the step they agree on
  (``Checkpoints.reached_preemption``)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._request)
    return self

  def _request(self, signum: int, frame) -> None:
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    # os.write, not print: a print here, while the main thread is inside one, raises
    # "reentrant call" from the buffered stdout.
    os.write(1, f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then "
                f"stopping (rerun the same command to resume)\n".encode())

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def exit_if_stopped(summary: dict[str, Any]) -> None:
  """Exits this process (``SystemExit``, status 128 + the signal's number) when ``summary`` is
  that of a run stopped by a signal (``summary['stopped_by']``). A caller that uses the run next
  (evaluates it, scores a tuning trial) calls this first, or it would take a half-trained run for
  a finished one; rerunning the command resumes the run from its checkpoint."""
  if summary.get("stopped_by"):
    raise SystemExit(128 + signal.Signals[summary["stopped_by"]["signal"]].value)


def kill_point(point: str, step: int) -> None:
  """Test instrumentation: ``APEM_JAX_KILL_AT=<point>:<step>`` kills this process with SIGKILL,
  as a crash or an out-of-memory killer would, at ``step`` (after the train step; also in
  ``vmap_runs``' loop), ``evaluate`` (after the validation pass, before its checkpoint) or
  ``save`` (while a checkpoint is being written in the background) of that step."""
  if os.environ.get("APEM_JAX_KILL_AT") == f"{point}:{step}":
    os.kill(os.getpid(), signal.SIGKILL)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: DatasetSplits | None = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns the summary
  that is also written to ``<workdir>/metrics.json``. ``data``: a dataset given in Python
  instead of the one ``config.data`` names (:class:`Experiment`).

  The loop counts steps: it evaluates every ``train.eval_every_steps`` (default: every epoch) and
  at the end, saves a checkpoint at every evaluation, every ``train.checkpoint_every_steps`` and
  when asked to stop (SIGTERM, SIGINT, a preemption), and stops early after ``train.patience``
  evaluations without a better validation score.
  """
  t_start = time.time()
  exp = Experiment(config, data)
  config = exp.config
  ckpt = checkpointing.Checkpoints(workdir, keep_latest=config.checkpoint.keep_latest,
                                   async_save=config.checkpoint.async_save)
  try:
    resumed = resume_point(ckpt, exp, workdir)  # every check before the workdir is written
  except BaseException:
    ckpt.close()
    raise
  _write_run_files(exp, workdir)
  writer = reporting.ScalarWriter(workdir)

  spe = exp.steps_per_epoch
  if resumed is not None:
    state, meta, changes = resumed
    if changes:  # recorded once; the next resume compares with the config now in force
      meta["resumes"].append({"step": meta["step"], "changed": changes})
      meta["config"] = config.to_dict()
    print(f"Resuming from {workdir} at step {meta['step']} (epoch {meta['step'] / spe:.2f})"
          + (f"; changed: {changes}" if changes else "") + ".")
    if "train.num_epochs" in changes:
      print(_schedule_change(config, spe, meta["step"], *changes["train.num_epochs"]))
  else:
    state = exp.init_state()
    meta = fresh_meta(exp)
  state = exp.to_train(state)
  step, history = meta["step"], meta["history"]
  total_steps = spe * config.train.num_epochs
  eval_every = config.train.eval_every_steps or spe
  save_every = config.train.checkpoint_every_steps or eval_every
  meta["stopped"] = early_stopped(meta, config)  # the patience may have changed

  train_seconds, t_window, window_steps, stopped_by = 0.0, time.time(), 0, None
  train_loss = _TrainLoss(exp.schema.task_names)
  bar = tqdm.tqdm(total=total_steps, initial=step, unit="step", desc="train", dynamic_ncols=True,
                  disable=jax.process_index() != 0 or not config.train.progress_bar,
                  mininterval=1.0)
  with StopRequests() as stop_requests:
    try:
      batches = train_batches_from(exp, data_position(step, spe, exp.input_groups))
      while step < total_steps and not meta["stopped"]:
        state, step_metrics = exp.train_step(state, exp.device_batch(next(batches)))
        step += 1
        window_steps += 1
        bar.update(1)
        kill_point("step", step)
        train_loss.add(step_metrics, state.step)
        evaluate = step % eval_every == 0 or step == total_steps
        if stop_requests.signum is None and ckpt.reached_preemption(step):
          stop_requests.signum = signal.SIGTERM
        save = evaluate or step % save_every == 0 or stop_requests.signum is not None
        # A save checks the loss too: a checkpoint must not hold a run that failed since the
        # last log step.
        if step % config.train.log_every == 0 or save:
          mean_loss = train_loss.mean(step)
          bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=f"{step / spe:.2f}")
          writer.write(step, train_scalars(mean_loss, step_metrics, exp.schema.task_names))
        if not save:
          continue

        saved = exp.from_train(state)
        meta.update(step=step, epoch=step // spe,
                    data_position=data_position(step, spe, exp.input_groups))
        score = None
        if evaluate:
          seconds = time.time() - t_window
          train_seconds += seconds
          score = evaluate_and_decide(exp, saved, meta, step, seconds, window_steps, writer)
          kill_point("evaluate", step)
        ckpt.save(step, saved, meta, score=score)
        kill_point("save", step)
        if evaluate:
          t_window, window_steps = time.time(), 0
        if stop_requests.signum is not None:
          break
    finally:  # an error or a second Ctrl-C still lets the saves in flight finish; the handlers
      bar.close()  # stay until they have, so a SIGTERM meanwhile is a stop request too
      ckpt.close()
    if stop_requests.signum is not None:  # also one that came after the last step
      stopped_by = {"signal": signal.Signals(stop_requests.signum).name, "step": step}
      print(f"Stopped at step {step} ({stopped_by['signal']}); checkpoint saved. Rerun the same "
            f"command to resume.", flush=True)

  best_step = meta["best_step"]
  summary = {"best_step": best_step, "best_validation_score": meta["best_score"],
             "best_validation": next((h["validation"] for h in history if h["step"] == best_step), None),
             "steps": step, "epochs": step / spe, "stopped_early": meta["stopped"],
             "stopped_by": stopped_by, "history": history, "resumes": meta["resumes"],
             "train_seconds_this_run": train_seconds,
             "wall_seconds_this_run": time.time() - t_start,
             "train_step_traces": exp.traces["train_step"],
             "eval_step_traces": exp.traces["eval_step"],
             "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params)))}
  reporting.write_json_atomic(os.path.join(workdir, "metrics.json"), summary)
  writer.close()
  return summary


def evaluate_and_decide(exp: Experiment, state: step_lib.TrainState, meta: dict, step: int,
                         seconds: float, steps: int, writer: reporting.ScalarWriter) -> float:
  """Evaluates ``state`` on validation, updates the early-stopping bookkeeping in ``meta``,
  reports, and returns the selection score."""
  config = exp.config
  val_metrics = exp.evaluate(state, "validation")
  score = metrics_lib.selection_score(val_metrics, exp.schema.tasks)
  improved = score > meta["best_score"]
  if improved:
    meta.update(best_score=score, best_step=step, evals_without_improvement=0)
  else:
    meta["evals_without_improvement"] += 1
  meta.update(validation=val_metrics, score=score,
              stopped=meta["evals_without_improvement"] >= config.train.patience)
  meta["history"].append({"epoch": step / exp.steps_per_epoch, "step": step, "score": score,
                          "validation": val_metrics, "train_seconds": seconds})
  examples_per_second = steps * config.train.batch_size / max(seconds, 1e-9)
  writer.write(step, {**reporting.flatten_metrics(val_metrics, "validation"),
                      "validation/score": score, "train/examples_per_second": examples_per_second})
  if jax.process_index() == 0:
    tqdm.tqdm.write(
        f"step {step} (epoch {step / exp.steps_per_epoch:.2f}): {seconds:.1f}s, validation score "
        f"{score:.5f}{' (best)' if improved else ''}  " +
        "  ".join(f"{t}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))
                  for t, m in val_metrics.items()))
    if meta["stopped"]:
      tqdm.tqdm.write(f"Early stop: no improvement of the validation score in "
                      f"{meta['evals_without_improvement']} evaluations.")
  return score


# Training settings that shape the state a checkpoint holds (the optimizer's and the balancing
# method's) or the steps per epoch (the batch size): an evaluation takes the run's.
RUN_TRAINING_KEYS = ("batch_size", "balancing", "balancing_alpha", "balancing_temperature",
                     "balancing_window", "cagrad_c")


def with_run_training(config: ml_collections.ConfigDict, saved: Mapping
                      ) -> ml_collections.ConfigDict:
  """``config`` with the optimizer section and the ``RUN_TRAINING_KEYS`` of the run whose saved
  config is ``saved`` (a key a run saved before it existed keeps its default)."""
  config = ml_collections.ConfigDict(config.to_dict())
  defaults = common.base_config()
  for key in RUN_TRAINING_KEYS:
    config.train[key] = saved["train"].get(key, defaults.train[key])
  config.optimizer = ml_collections.ConfigDict({**defaults.optimizer.to_dict(),
                                                **saved["optimizer"]})
  return config


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str,
                        kind: str = checkpointing.BEST, step: int | None = None,
                        data: DatasetSplits | None = None) -> dict:
  """Restores a checkpoint of ``workdir`` and returns exact per-task metrics on ``split``
  (of ``data`` where the run was trained on a dataset given in Python)."""
  exp, state, meta = restore_checkpoint(config, workdir, kind, step, data)
  return {"step": meta["step"], "metrics": exp.evaluate(state, split)}


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       kind: str = checkpointing.BEST, step: int | None = None,
                       data: DatasetSplits | None = None
                       ) -> tuple[Experiment, step_lib.TrainState, dict]:
  """``(experiment, state, meta)`` of a checkpoint of ``workdir``, after checking that
  ``config`` (the model and data keys) and the data's schema are those it was trained with."""
  config = with_given_data(config, data)
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  try:
    if ckpt.step_of(kind, step) is None:
      raise FileNotFoundError(f"{workdir}: no {kind} checkpoint under {ckpt.directory}; train "
                              f"first (train.py --workdir {workdir})")
    saved = ckpt.restore_meta(kind, step)
    _check_config(saved, config, workdir)
    config = with_run_training(config, saved["config"])
    exp = Experiment(config, data, training=False)
    _check_schema(saved, exp.schema, workdir)
    stored = stored_model(saved["config"], exp.schema)
    if parallel.table_padding(stored) == parallel.table_padding(exp.model):
      state, meta = ckpt.restore(exp.abstract_state, kind, step)
    else:  # tables stored padded for another model axis: the parameters, padded for this one
      params, meta = ckpt.restore_params(abstract_params(stored, exp.schema), kind, step)
      params = jax.device_put(parallel.repad(params, stored, exp.model),
                              exp.state_sharding.params)
      state = exp.init_state().replace(params=params)
  finally:
    ckpt.close()
  return exp, state, meta
