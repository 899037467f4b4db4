"""The training loop, written once for every model: train, evaluate, checkpoint, stop early.

Sections: (1) data, model and mesh; (2) the state, created where it belongs and restored from the
latest checkpoint if the workdir has one; (3) epochs of compiled train steps, each followed by an
exact evaluation on the validation split, a checkpoint, and the early-stopping decision.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from apem_jax import checkpointing, config_validation, losses, metrics as metrics_lib, parallel, reporting, step as step_lib
from apem_jax.data import load_dataset
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


class Experiment:
  """Data, model, mesh and compiled steps of one config: what training and evaluation share."""

  def __init__(self, config: ml_collections.ConfigDict):
    config_validation.validate(config)
    self.config = config
    self.data = load_dataset_prepared_once(config.data)
    self.schema: Schema = self.data.schema
    config_validation.validate_for_schema(config, self.schema)
    self.mesh = parallel.make_mesh(config.parallel.model_parallelism)
    # Large tables are stored with their rows padded to a multiple of the model axis (parallel.py).
    self.model = parallel.pad_tables(build_model(config.model, self.schema), self._example_batch(),
                                     self.mesh, config.parallel.shard_embeddings_min_rows)
    self.pmap = config.parallel.mode == "pmap"
    parallel.check_batch_size(config.train.batch_size, self.mesh, "train.batch_size")
    parallel.check_batch_size(config.train.eval_batch_size, self.mesh, "train.eval_batch_size")
    self.steps_per_epoch = self.data.num_examples("train") // config.train.batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f"train.batch_size={config.train.batch_size} exceeds the "
                       f"{self.data.num_examples('train')} training examples")
    self.total_steps = self.steps_per_epoch * config.train.num_epochs
    self.tx = step_lib.make_optimizer(config, self.total_steps)
    self.head = task_head(config, self.schema, self.model)
    train_step, eval_step = step_lib.bind_steps(self.model, self.tx, self.schema,
                                                task_weights(config, self.schema),
                                                parallel.PMAP_AXIS if self.pmap else None,
                                                head=self.head)
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

  def _example_batch(self) -> dict[str, jax.Array]:
    s = self.schema
    return {"categorical": jnp.zeros((1, len(s.categorical)), jnp.int32),
            "numeric": jnp.zeros((1, len(s.numeric)), jnp.float32)}

  def _init(self, rng: jax.Array) -> step_lib.TrainState:
    return step_lib.init_state(self.model, self.tx, rng, self._example_batch())

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
    funnels), ``labels``, ``label_mask`` and, where the data has them, the evaluation-only arrays
    (``true_q`` of synthetic funnels)."""
    out = {}
    for local in self.data.eval_batches(split, self.config.train.eval_batch_size):
      batch = parallel.global_batch(local, self.mesh)
      keep = parallel.to_host(batch["weight"]) > 0
      rows = dict(self.eval_step(state, batch), labels=batch["labels"],
                  label_mask=batch["label_mask"],
                  **{k: batch[k] for k in EVAL_ONLY_KEYS if k in batch})
      for k, v in rows.items():
        out.setdefault(k, []).append(parallel.to_host(v)[keep])
    return {k: np.concatenate(v) for k, v in out.items()}

  def evaluate(self, state: step_lib.TrainState, split: str) -> dict[str, dict[str, float]]:
    """Exact per-task metrics over the whole split; for a funnel schema also the per-step funnel
    metrics (``metrics.funnel_metrics``: conditional AUC, calibration, oracle AUC and gap)."""
    out = self.predict(state, split)
    result = metrics_lib.task_metrics(self.schema, out["labels"], out["label_mask"],
                                      out["predictions"])
    if self.schema.has_funnel:
      funnel = metrics_lib.funnel_metrics(self.schema, out["labels"], out["label_mask"],
                                          out["predictions"], out["conditional"], out.get("true_q"))
      for task, m in funnel.items():
        result[task].update(m)
    return result


def _check_config(meta: Mapping, config: ml_collections.ConfigDict, workdir: str) -> None:
  """The model and data keys of ``config`` must be those the checkpoint was trained with."""
  mismatched = config_validation.model_data_diff(meta["config"], config.to_dict())
  if mismatched:
    raise ValueError(f"{workdir}: its checkpoint was trained with a different config; "
                     f"differing keys: {mismatched}")


def _check_resume(meta: Mapping, config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Refuses a resume whose config changes the run's trajectory, or shortens it; returns the
  accepted changes as ``{key: [saved, now]}`` (recorded in the run's history)."""
  refused, accepted = config_validation.resume_diff(meta["config"], config.to_dict())
  if refused:
    raise ValueError(f"{workdir}: its checkpoint was trained with a different config, and these "
                     f"keys change the run's trajectory: {refused}; resume with the config in "
                     f"{workdir}/config.json (a resume may change only "
                     f"{list(config_validation.RESUMABLE_KEYS)}) or train in a new --workdir")
  if config.train.num_epochs < meta["epoch"]:
    raise ValueError(f"{workdir}: train.num_epochs={config.train.num_epochs} is below the "
                     f"{meta['epoch']} epochs the run has done; it may only grow on resume")
  return accepted


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


def _epoch_batches(exp: Experiment, epoch: int) -> Iterator[Mapping[str, np.ndarray]]:
  """The training batches of one epoch; the order depends only on (seed, epoch), so resuming at an
  epoch boundary replays exactly what an uninterrupted run would have seen."""
  seed = int(np.random.SeedSequence([exp.config.seed, epoch]).generate_state(1)[0])
  batches = exp.data.train_batches(exp.config.train.batch_size, seed=seed)
  for _ in range(exp.steps_per_epoch):
    yield next(batches)


@jax.jit
def _first_non_finite(first: jax.Array, task_loss_sums: jax.Array, step: jax.Array) -> jax.Array:
  """first [T] int32: the step after which each task's loss was first not finite (-1: never),
  updated on the device every step so the trainer need not read the losses back each step."""
  num_tasks = first.shape[0]
  task_loss_sums = jnp.reshape(task_loss_sums, (-1, num_tasks))[0]  # (pmap: every device's copy)
  return jnp.where((first < 0) & ~jnp.isfinite(task_loss_sums), jnp.ravel(step)[0], first)


def _check_finite(loss: float, step: int, first_non_finite: np.ndarray,
                  task_names: tuple[str, ...]) -> None:
  if not math.isfinite(loss):
    culprits = sorted((int(s), t) for s, t in zip(first_non_finite, task_names) if s >= 0)
    where = ", ".join(f"task {t!r} from step {s}" for s, t in culprits) or "no task's own loss"
    raise FloatingPointError(
        f"training loss is {loss} at step {step} (not finite: {where}); the run stopped. Lower "
        f"optimizer.learning_rate or set optimizer.grad_clip_norm, or check the data for NaN "
        f"labels, then restart (the workdir resumes from its last checkpoint, which is intact).")


def _meta(config, schema, epoch, step, val_metrics, score, best_score, best_step, bad_evals,
          history, stopped, resumes) -> dict:
  return {"epoch": epoch, "step": step, "validation": val_metrics, "score": score,
          "best_score": best_score, "best_step": best_step, "evals_without_improvement": bad_evals,
          "history": history, "stopped": stopped, "resumes": resumes, "config": config.to_dict(),
          "schema": schema.to_dict()}


def _resume(ckpt: checkpointing.Checkpoints, exp: "Experiment", workdir: str):
  """``(state, meta, accepted config changes)`` of the checkpoint a run in ``workdir`` continues
  from, or None for a new run. The latest checkpoint; if it is missing or does not restore, the
  best one, saying so: a workdir with checkpoints is never restarted from scratch (its first
  save would overwrite them). Nothing is written here."""
  kinds = [k for k in (checkpointing.LATEST, checkpointing.BEST) if ckpt.latest_step(k) is not None]
  if not kinds:
    return None
  if kinds[0] != checkpointing.LATEST:
    print(f"{workdir}: no checkpoint under checkpoints/{checkpointing.LATEST}; resuming from the "
          f"best checkpoint (step {ckpt.latest_step(checkpointing.BEST)}) instead.")
  failures = []
  for kind in kinds:
    try:
      meta = ckpt.restore_meta(kind)
      changes = _check_resume(meta, exp.config, workdir)  # user errors: raised, not skipped
      _check_schema(meta, exp.schema, workdir)
      state, meta = ckpt.restore(kind, exp.abstract_state)
    except checkpointing.CorruptCheckpointError as e:
      failures.append(str(e))
      print(f"{e}" + ("; trying the best checkpoint" if kind == checkpointing.LATEST and
                      len(kinds) > 1 else ""))
      continue
    return state, meta, changes
  raise checkpointing.CorruptCheckpointError(
      f"{workdir}: no checkpoint restores ({'; '.join(failures)}); restore the files from a "
      f"copy, or train in a new --workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns the summary
  that is also written to ``<workdir>/metrics.json``."""
  t_start = time.time()
  exp = Experiment(config)
  ckpt = checkpointing.Checkpoints(workdir, keep_latest=config.checkpoint.keep_latest)
  resumed = _resume(ckpt, exp, workdir)  # every check before anything in the workdir is written
  reporting.write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
  if exp.data.preprocessing is not None:
    reporting.write_json_atomic(os.path.join(workdir, "preprocessing.json"),
                                exp.data.preprocessing.to_dict())
  writer = reporting.ScalarWriter(workdir)

  if resumed is not None:
    state, meta, changes = resumed
    meta.setdefault("resumes", [])
    if changes:
      meta["resumes"].append({"step": meta["step"], "changed": changes})
    print(f"Resuming from {workdir} at step {meta['step']} (epoch {meta['epoch']})"
          + (f"; changed: {changes}" if changes else "") + ".")
  else:
    state = exp.init_state()
    meta = _meta(config, exp.schema, 0, 0, None, None, -math.inf, None, 0, [], False, [])
  state = exp.to_train(state)
  epoch, best_score, best_step = meta["epoch"], meta["best_score"], meta["best_step"]
  bad_evals, history, resumes = meta["evals_without_improvement"], meta["history"], meta["resumes"]
  stopped = bad_evals >= config.train.patience  # a resume may change the patience

  train_seconds = 0.0
  while epoch < config.train.num_epochs and not stopped:
    t0 = time.time()
    loss_sum, loss_count = None, 0
    first_non_finite = jnp.full((exp.schema.num_tasks,), -1, jnp.int32)
    bar = tqdm.tqdm(_epoch_batches(exp, epoch), total=exp.steps_per_epoch, unit="step",
                    desc=f"epoch {epoch + 1}/{config.train.num_epochs}", leave=False,
                    disable=jax.process_index() != 0 or not config.train.progress_bar,
                    mininterval=1.0)
    for i, local in enumerate(bar):
      state, step_metrics = exp.train_step(state, exp.device_batch(local))
      loss_sum = step_metrics["loss"] if loss_sum is None else loss_sum + step_metrics["loss"]
      first_non_finite = _first_non_finite(first_non_finite, step_metrics["loss_sum"], state.step)
      loss_count += 1
      if (i + 1) % config.train.log_every == 0 or i + 1 == exp.steps_per_epoch:
        step = exp.step_of(state)
        mean_loss = float(loss_sum) / loss_count
        _check_finite(mean_loss, step, np.asarray(first_non_finite), exp.schema.task_names)
        bar.set_postfix(loss=f"{mean_loss:.4f}",
                        ex_per_s=f"{(i + 1) * config.train.batch_size / (time.time() - t0):.0f}")
        writer.write(step, {"train/loss": mean_loss,
                            "train/grad_norm": float(step_metrics["grad_norm"])})
        loss_sum, loss_count = None, 0
    bar.close()
    epoch_seconds = time.time() - t0
    train_seconds += epoch_seconds
    epoch += 1
    step = exp.step_of(state)

    saved = exp.from_train(state)
    val_metrics = exp.evaluate(saved, "validation")
    score = metrics_lib.selection_score(val_metrics, exp.schema.tasks)
    improved = score > best_score
    if improved:
      best_score, best_step, bad_evals = score, step, 0
    else:
      bad_evals += 1
    stopped = bad_evals >= config.train.patience
    history.append({"epoch": epoch, "step": step, "score": score, "validation": val_metrics,
                    "epoch_seconds": epoch_seconds})
    writer.write(step, {**reporting.flatten_metrics(val_metrics, "validation"),
                        "validation/score": score,
                        "train/examples_per_second": exp.steps_per_epoch * config.train.batch_size / epoch_seconds})
    meta = _meta(config, exp.schema, epoch, step, val_metrics, score, best_score, best_step,
                 bad_evals, history, stopped, resumes)
    if improved:
      ckpt.save(checkpointing.BEST, step, saved, meta)
    ckpt.save(checkpointing.LATEST, step, saved, meta)
    if jax.process_index() == 0:
      print(f"epoch {epoch}: step {step}, {epoch_seconds:.1f}s, validation score {score:.5f}"
            f"{' (best)' if improved else ''}  " +
            "  ".join(f"{t}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))
                      for t, m in val_metrics.items()), flush=True)
    if stopped:
      print(f"Early stop: no improvement of the validation score in {bad_evals} evaluations.")

  summary = {"best_step": best_step, "best_validation_score": best_score,
             "best_validation": next((h["validation"] for h in history if h["step"] == best_step), None),
             "epochs": epoch, "stopped_early": stopped, "history": history, "resumes": resumes,
             "train_seconds_this_run": train_seconds,
             "wall_seconds_this_run": time.time() - t_start,
             "train_step_traces": exp.traces["train_step"],
             "eval_step_traces": exp.traces["eval_step"],
             "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params)))}
  reporting.write_json_atomic(os.path.join(workdir, "metrics.json"), summary)
  writer.close()
  ckpt.close()
  return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str,
                        kind: str = checkpointing.BEST, step: int | None = None) -> dict:
  """Restores a checkpoint of ``workdir`` and returns exact per-task metrics on ``split``."""
  ckpt = checkpointing.Checkpoints(workdir)
  if ckpt.latest_step(kind) is None:
    raise FileNotFoundError(f"{workdir}: no {kind} checkpoint under {workdir}/checkpoints/{kind}; "
                            f"train first (train.py --workdir {workdir})")
  saved = ckpt.restore_meta(kind, step)
  _check_config(saved, config, workdir)
  exp = Experiment(config)
  _check_schema(saved, exp.schema, workdir)
  state, meta = ckpt.restore(kind, exp.abstract_state, step)
  ckpt.close()
  return {"step": meta["step"], "metrics": exp.evaluate(state, split)}
