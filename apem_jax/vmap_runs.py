"""N training runs in one compiled program: ``jax.vmap`` over the train state.

``train_runs(configs, workdir)`` trains N configs that differ only in ``seed``, in optimizer keys
that leave the optimizer state's shapes as they are (learning rate, weight decay, schedule...),
and in ``train.patience`` (:data:`VARYING_KEYS`), as ONE compiled step: ``step.train_step``
vmapped over a leading run axis of the state and of the batch. Every run sees what it would see
alone in ``trainer.train_and_evaluate``:

* its own initial state, made as the trainer makes it (``step.init_state`` with
  ``jax.random.key(seed)``), so its own parameters and dropout key (``state.rng``);
* its own batches: the trainer's input pipeline with its own seed (``trainer.train_batches_from``);
  the N batches of a step are stacked on the run axis. The batch axis is split over the mesh's
  ``data`` axis, the run axis is replicated (state: ``P(None, *the trainer's spec)``);
* its own optimizer: ``step.make_optimizer`` of its own config. The update is computed run by run
  inside the program (:func:`_run_by_run`), each with its Python constants, so the schedules are
  the trainer's, not a re-implementation;
* its own evaluations (the eval step vmapped over runs, then ``trainer.Experiment.evaluate``'s
  metrics per run), its own early stopping (``trainer.evaluate_and_decide`` with its own
  ``train.patience``): a run that stopped keeps its whole state frozen (its update is masked)
  while the others go on; the loop ends when every run has stopped or reached
  ``train.num_epochs``;
* its own workdir ``<workdir>/run_<i>`` (or ``run_dirs[i]``) in the trainer's layout:
  ``metrics.json`` (the trainer's summary, plus ``vmapped``: the run's index, varied values and
  the shared timings), ``config.json``, ``preprocessing.json``, ``validation_sample.npz``,
  TensorBoard scalars, and checkpoints saved at every evaluation with their validation score and
  the trainer's meta (``checkpointing.Checkpoints``), so ``trainer.evaluate_checkpoint``,
  ``eval.py`` and ``apem-export`` work on each run's directory.

Equality with the sequential runs. The vmapped forward and backward pass use batched kernels,
which XLA may round otherwise than the trainer's (one ulp here and there in a gradient; Adam then
amplifies it over the steps). Measured on the CPU with 8 simulated devices (the tests' setup):
MMoE, Shared-Bottom and the single-task DNN train bit for bit as the trainer does
(tests/test_vmap_runs.py checks MMoE); APEM, PLE, ESMM and AITM differ from the first step by
float rounding. On one CPU device, MMoE differs too (Census, 1 epoch: validation metrics within
about 3e-5). ``unroll=True`` gives each run its own copy of the trainer's whole step inside the
one program (bit for bit the trainer's arithmetic, APEM included, at the price of N copies to
compile and no batched kernels).

``train_seconds`` in a run's history is its share of the shared training time (the window's wall
time divided by the number of runs that trained in it); ``vmapped.train_seconds`` is the whole.

Stopped and resumed as the trainer is: SIGTERM or SIGINT (or a preemption notice on several
processes) saves every run still training at the step it is at and returns (``stopped_by``, the
program's signal and step, in every run's summary; no :class:`FloatingPointError` then); the same
call again (``train.py --vmap`` rerun) resumes the runs (:func:`resume_points`, with the
trainer's checks): those still training together from the newest step they all have a
checkpoint of (after a kill, the last evaluation all of them saved; step 0 if one has none and
none is past its first evaluation, else refused); a run that stopped stays as it was (one that
failed is recorded in its ``metrics.json`` at once). Each run's directory also resumes alone, by
the trainer.

Not supported: ``parallel.mode='pmap'`` (refused); ``train.checkpoint_every_steps`` (checkpoints
are saved at evaluations and stops only); several processes (written for them, untested). A run
whose training loss becomes non-finite is stopped (nothing of it is saved after that) while the
others go on; once all are written, :class:`FloatingPointError` names it (a resume leaves it
stopped, its error in its ``metrics.json``).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import time
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from apem_jax import checkpointing, config_validation, parallel, reporting, trainer
from apem_jax import step as step_lib
from apem_jax.data.pipeline import EVAL_ONLY_KEYS

# Config keys in which the runs of one program may differ: the seed (each run's initial state,
# dropout key and data order), any optimizer key that leaves the optimizer state's structure and
# shapes as they are (learning rate, weight decay, schedule, betas...: each run's update is its
# own ``step.make_optimizer``, constants and all), and the early-stopping patience (host side).
VARYING_KEYS = ("seed", "optimizer.", "train.patience")
RECORD_FILE = "vmap_runs.json"


def _may_vary(key: str) -> bool:
  return any(key == k or k.endswith(".") and key.startswith(k) for k in VARYING_KEYS)


def varied_keys(configs: Sequence[ml_collections.ConfigDict]) -> list[str]:
  """The keys in which ``configs`` differ from ``configs[0]`` (all within :data:`VARYING_KEYS`).

  Raises:
    ValueError (one line) naming the first other key that differs, or for no configs.
  """
  if not configs:
    raise ValueError("vmap_runs: no configs to train")
  first = configs[0].to_dict()
  varied = []
  for i, config in enumerate(configs[1:], 1):
    for key in config_validation.diff_keys(first, config.to_dict()):
      if not _may_vary(key):
        raise ValueError(f"vmap_runs: configs[{i}] differs from configs[0] in {key!r}; runs "
                         f"trained in one program may differ only in seed, optimizer.* and "
                         f"train.patience")
      if key not in varied:
        varied.append(key)
  return sorted(varied)


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config.to_dict()
  for part in key.split("."):
    node = node.get(part, "<missing>") if isinstance(node, dict) else "<missing>"
  return node


def _run_by_run(fn: Callable, n: int) -> Callable:
  """``g(*args)`` that, under ``jax.vmap`` over the N runs, calls ``fn(i, *run i's slices)`` for
  each run ``i`` (an unrolled loop in the compiled program) instead of batching ``fn``; outside
  vmap (tracing for shapes), ``fn(0, *args)``.

  Used for the optimizer update (each run's own ``step.make_optimizer``, so its own learning
  rate, schedule and weight decay as Python constants): XLA's algebraic simplifier also rewrites
  a division by a broadcast scalar (Adam's bias corrections) otherwise than a division by a
  broadcast vector of per-run values, so a batched update would round differently from the
  trainer's, and Adam amplifies that. The update is elementwise: the loop costs what a batched
  update costs."""
  g = jax.custom_batching.custom_vmap(functools.partial(fn, 0))

  @g.def_vmap
  def rule(axis_size, in_batched, *args):
    if axis_size != n:
      raise ValueError(f"vmap_runs: a per-run function vmapped over {axis_size}, not {n} runs")
    outs = [fn(i, *[jax.tree.map(lambda batched, x, i=i: x[i] if batched else x, b, a)
                    for b, a in zip(in_batched, args)]) for i in range(n)]
    out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return out, jax.tree.map(lambda _: True, out)

  return g


def per_run_optimizer(configs: Sequence[ml_collections.ConfigDict],
                      total_steps: int) -> optax.GradientTransformation:
  """The optimizer of a step vmapped over runs: under the vmap, run ``i``'s update is
  ``step.make_optimizer(configs[i], total_steps).update`` (:func:`_run_by_run`)."""
  txs = [step_lib.make_optimizer(c, total_steps) for c in configs]
  update = _run_by_run(lambda i, updates, state, params: txs[i].update(updates, state, params),
                       len(txs))
  return optax.GradientTransformation(txs[0].init,
                                      lambda updates, state, params=None: update(updates, state,
                                                                                 params))


def _stacked(sharding: NamedSharding) -> NamedSharding:
  """A state leaf's sharding with a leading, replicated run axis."""
  return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def _keep_stopped(new: Any, old: Any, active: jax.Array) -> Any:
  """Per run: ``new`` where ``active``, else ``old`` (a stopped run's state stays frozen)."""
  def pick(n, o):
    if jnp.issubdtype(n.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(pick(jax.random.key_data(n), jax.random.key_data(o)),
                                      impl=jax.random.key_impl(n))
    return jnp.where(jnp.reshape(active, (-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(pick, new, old)


class _Predicted:
  """What ``trainer.Experiment.evaluate`` reads of its experiment (``schema``, ``predict``),
  holding one run's predictions: its metrics are then computed by the trainer's own code."""

  def __init__(self, schema, out: dict[str, np.ndarray]):
    self.schema = schema
    self._out = out

  def predict(self, state, split: str) -> dict[str, np.ndarray]:
    del state, split
    return self._out


class Runs:
  """One experiment (data, model, mesh) and the compiled steps of N runs over it.

  ``unroll=False``: the forward and backward pass are ``jax.vmap``-ed over the runs (batched
  kernels; XLA may round them otherwise than the trainer's, see the module doc). ``unroll=True``:
  each run's whole train step is its own copy of the trainer's step inside the one program (the
  trainer's arithmetic; compile time grows with N). ``data``: a dataset given in Python, as the
  trainer's."""

  def __init__(self, configs: Sequence[ml_collections.ConfigDict], unroll: bool = False,
               data: Any = None):
    configs = [trainer.with_given_data(c, data) for c in configs]
    self.varied = varied_keys(configs)
    for config in configs[1:]:
      config_validation.validate(config)
    if configs[0].parallel.mode != "jit":
      raise ValueError(f"vmap_runs: parallel.mode={configs[0].parallel.mode!r} is not supported; "
                       f"runs trained in one program need parallel.mode='jit'")
    self.configs = list(configs)
    self.n = n = len(configs)
    self.unroll = unroll
    self.exp = exp = trainer.Experiment(configs[0], data)
    self.txs = [step_lib.make_optimizer(c, exp.total_steps) for c in configs]
    abstract_params = exp.abstract_state.params
    opt_shapes = [jax.eval_shape(tx.init, abstract_params) for tx in self.txs]
    for i, shapes in enumerate(opt_shapes[1:], 1):
      if (jax.tree.structure(shapes) != jax.tree.structure(opt_shapes[0])
          or jax.tree.leaves(shapes) != jax.tree.leaves(opt_shapes[0])):
        keys = [k for k in self.varied if k.startswith("optimizer.")
                and _value(configs[i], k) != _value(configs[0], k)]
        raise ValueError(f"vmap_runs: configs[{i}]'s optimizer state has another structure than "
                         f"configs[0]'s (differing keys {keys}); runs trained in one program "
                         f"need optimizer states of one shape")
    mesh = exp.mesh
    self.state_sharding = jax.tree.map(_stacked, exp.state_sharding)
    self.batch_sharding = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    replicated = parallel.replicated(mesh)
    self.traces = {"train_step": 0, "eval_step": 0}
    weights = trainer.task_weights(configs[0], exp.schema)

    def bound_train_step(tx):
      return step_lib.bind_steps(exp.model, tx, exp.schema, weights, None, head=exp.head,
                                 balancing=exp.balancing)[0]

    if unroll:
      steps = [bound_train_step(tx) for tx in self.txs]
      one_train_step = _run_by_run(lambda i, state, batch: steps[i](state, batch), n)
    else:
      one_train_step = bound_train_step(per_run_optimizer(configs, exp.total_steps))

    def train_step(state, batch, active):
      self.traces["train_step"] += 1
      new_state, metrics = jax.vmap(one_train_step)(state, batch)
      return _keep_stopped(new_state, state, active), metrics

    _, one_eval_step = step_lib.bind_steps(exp.model, exp.tx, exp.schema, weights, head=exp.head)
    if unroll:
      one_eval_step = _run_by_run(lambda i, state, batch, f=one_eval_step: f(state, batch), n)

    def eval_step(state, batch):
      self.traces["eval_step"] += 1
      return jax.vmap(one_eval_step, in_axes=(0, None))(state, batch)

    self.train_step = jax.jit(train_step,
                              in_shardings=(self.state_sharding, self.batch_sharding, replicated),
                              out_shardings=(self.state_sharding, replicated), donate_argnums=0)
    self.eval_step = jax.jit(eval_step, in_shardings=(self.state_sharding,
                                                      parallel.batch_sharding(mesh)),
                             out_shardings=self.batch_sharding)
    self.take = jax.jit(lambda state, i: jax.tree.map(lambda x: x[i], state),
                        in_shardings=(self.state_sharding, replicated),
                        out_shardings=exp.state_sharding)
    self.first_non_finite = jax.jit(jax.vmap(trainer.update_first_non_finite))

  def init_state(self) -> step_lib.TrainState:
    """Every run's fresh state, made as the trainer makes it (``step.init_state`` with the run's
    seed and optimizer), stacked on the run axis."""
    exp = self.exp
    inits = {}
    states = []
    for config, tx in zip(self.configs, self.txs):
      key = repr(sorted(config.optimizer.to_dict().items()))  # one compiled init per optimizer
      if key not in inits:
        inits[key] = jax.jit(functools.partial(
            step_lib.init_state, exp.model, tx, example_batch=trainer.example_batch(exp.schema),
            balancing=exp.balancing), out_shardings=exp.state_sharding)
      states.append(inits[key](jax.random.key(config.seed)))
    return self.stack(states)

  def stack(self, states: Sequence[step_lib.TrainState]) -> step_lib.TrainState:
    """N runs' states (each with the trainer's sharding) stacked on the run axis."""
    stack = jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                    out_shardings=self.state_sharding)
    return stack(*states)

  def global_batch(self, locals_: Sequence[Mapping[str, np.ndarray]]) -> dict[str, jax.Array]:
    """N runs' batches (this process's rows) -> [N, B, ...] split over ``data`` on axis 1."""
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, np.stack([b[k] for b in locals_])) for k in locals_[0]}

  def evaluate(self, state: step_lib.TrainState, split: str,
               runs: Sequence[int]) -> dict[int, dict[str, dict[str, float]]]:
    """Per run in ``runs``: the metrics ``trainer.Experiment.evaluate`` gives for its state."""
    exp = self.exp
    outs = {i: {} for i in runs}
    for local in exp.data.eval_batches(split, self.configs[0].train.eval_batch_size):
      batch = parallel.global_batch(local, exp.mesh)
      keep = parallel.to_host(batch["weight"]) > 0
      predicted = {k: parallel.to_host(v) for k, v in self.eval_step(state, batch).items()}
      shared = {"labels": batch["labels"], "label_mask": batch["label_mask"],
                **{k: batch[k] for k in EVAL_ONLY_KEYS if k in batch}}
      shared = {k: parallel.to_host(v)[keep] for k, v in shared.items()}
      for i in runs:
        for k, v in list(shared.items()) + [(k, v[i][keep]) for k, v in predicted.items()]:
          outs[i].setdefault(k, []).append(v)
    return {i: trainer.Experiment.evaluate(
        _Predicted(exp.schema, {k: np.concatenate(v) for k, v in out.items()}), None, split)
            for i, out in outs.items()}


def held_run(run_dir: str) -> list[str]:
  """What of a run ``run_dir`` holds: ``metrics.json``, ``checkpoints`` (an empty
  ``checkpoints/``, which a program stopped before its first save leaves, holds nothing)."""
  ckpt = os.path.join(run_dir, "checkpoints")
  return [name for name, there in (
      ("metrics.json", os.path.exists(os.path.join(run_dir, "metrics.json"))),
      ("checkpoints", os.path.exists(ckpt) and not (os.path.isdir(ckpt) and
                                                    not os.listdir(ckpt)))) if there]


def _run_view(exp: trainer.Experiment,
              config: ml_collections.ConfigDict) -> types.SimpleNamespace:
  """What ``trainer.resume_point`` reads of an experiment, with one run's own config."""
  return types.SimpleNamespace(
      config=config, data_fingerprint=exp.data_fingerprint, steps_per_epoch=exp.steps_per_epoch,
      input_groups=exp.input_groups, model=exp.model, schema=exp.schema,
      abstract_state=exp.abstract_state)


def _failed_before(run_dir: str, newest_step: int) -> dict | None:
  """The summary (``metrics.json``: its ``error``, its ``steps``) of a run that an earlier
  program stopped on a non-finite loss, or None. A run is never saved after it fails: an error
  not later than the run's ``newest_step`` checkpoint is that of a run trained again since."""
  path = os.path.join(run_dir, "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  return summary if "error" in summary and summary["steps"] > newest_step else None


class NotResumableTogether(ValueError):
  """Run directories whose runs still training hold no checkpoint at one common step."""


def resume_points(exp: trainer.Experiment, configs: Sequence[ml_collections.ConfigDict],
                  run_dirs: Sequence[str], ckpts: Sequence[checkpointing.Checkpoints]
                  ) -> tuple[list[tuple[Any, dict, dict] | None], dict[int, dict]]:
  """``(points, failed)``. ``points``: per run, ``(state, meta, accepted config changes)`` of the
  checkpoint it continues from (``trainer.resume_point``, with the trainer's checks), or None
  where it starts afresh (every run, in a new program). ``failed``: ``{run: its summary}`` of
  the runs an earlier program stopped on a non-finite loss (they stay as they were).

  The runs still training continue together, from the newest step they all have a checkpoint
  of: an older one for a run whose newest is later (a kill between two runs' saves), and step 0
  (a fresh start) if a run still training has none while the others have at most their first
  evaluation's. A run that had stopped (early stopping, its last epoch, a non-finite loss) stays
  as it was.

  Raises:
    NotResumableTogether (one line): the runs still training have no checkpoint at one step.
  """
  points = [trainer.resume_point(ckpt, _run_view(exp, c), d)
            for c, d, ckpt in zip(configs, run_dirs, ckpts)]
  total_steps = exp.steps_per_epoch * configs[0].train.num_epochs
  step = [0 if p is None else p[1]["step"] for p in points]
  failed = {i: summary for i, summary in enumerate(_failed_before(d, s)
                                                   for d, s in zip(run_dirs, step)) if summary}
  training = [i for i, (c, p) in enumerate(zip(configs, points))
              if (p is None or not trainer.early_stopped(p[1], c)) and step[i] < total_steps
              and i not in failed]
  common = min((step[i] for i in training), default=0)
  first_evaluation = configs[0].train.eval_every_steps or exp.steps_per_epoch
  fresh = [run_dirs[i] for i in training if step[i] == 0]
  for i in training:
    if step[i] == common:
      continue
    if common == 0 and step[i] <= first_evaluation:
      points[i] = None  # one evaluation's window to train again, as the fresh runs do
      continue
    if common == 0:
      raise NotResumableTogether(
          f"vmap_runs: {', '.join(fresh)} hold no checkpoint while {run_dirs[i]} is past its "
          f"first evaluation (step {step[i]}); resume the runs alone (train.py without --vmap), "
          f"or train them in a new workdir")
    point = trainer.resume_point(ckpts[i], _run_view(exp, configs[i]), run_dirs[i],
                                 max_step=common)
    if point is None or point[1]["step"] != common:
      behind = [run_dirs[j] for j in training if step[j] == common]
      raise NotResumableTogether(
          f"vmap_runs: {run_dirs[i]} has no checkpoint at step {common}, where "
          f"{', '.join(behind)} continue from (its steps: {ckpts[i].steps()}); resume the runs "
          f"alone (train.py without --vmap), or train them in a new workdir")
    points[i] = point
  return points, failed


def configs_over(config: ml_collections.ConfigDict, values: str, flag: str = "--vmap"
                 ) -> tuple[list[ml_collections.ConfigDict], list[str]]:
  """``KEY=V1,V2,...`` -> (a copy of ``config`` per value, each value parsed as the key's type;
  the names ``KEY=V`` of their run directories). Errors name ``flag``."""
  key, sep, listed = values.partition("=")
  names = [f"{key}={v}" for v in listed.split(",")] if sep and listed else []
  if len(names) < 2:
    raise ValueError(f"{flag} {values!r}: expected KEY=V1,V2,... with at least two values")
  configs = []
  for name in names:
    config_copy = copy.deepcopy(config)
    config_validation.apply_override(config_copy, name, flag)
    configs.append(config_copy)
  return configs, names


def append_record(workdir: str, program: dict) -> None:
  """Adds a program's record to ``<workdir>/vmap_runs.json`` (``{"programs": [...]}``, one per
  program run in the workdir, oldest first; a file of one program's record, as written before,
  is kept as the first)."""
  path = os.path.join(workdir, RECORD_FILE)
  programs = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    programs = old["programs"] if "programs" in old else [old]
  reporting.write_json_atomic(path, {"programs": programs + [program]})


def train_runs(configs: Sequence[ml_collections.ConfigDict], workdir: str,
               run_dirs: Sequence[str] | None = None, unroll: bool = False,
               data: Any = None) -> list[dict]:
  """Trains ``configs`` as one vmapped program (see the module doc); returns each run's summary,
  also written to its ``metrics.json``. ``run_dirs``: each run's workdir (default
  ``<workdir>/run_<i>``); ``<workdir>/vmap_runs.json`` records the runs and the shared timings
  of each program run in ``workdir`` (:func:`append_record`). ``data``: a dataset given in
  Python (``apem_jax.dataset_from_columns``), as ``trainer.train_and_evaluate``'s.

  Run directories that hold checkpoints of an earlier call resume (:func:`resume_points`).

  Raises:
    NotResumableTogether: run directories that do not resume together (:func:`resume_points`).
    ValueError: configs that differ in another key than :data:`VARYING_KEYS`,
      ``parallel.mode='pmap'``, or any config error or refused resume the trainer raises.
    FloatingPointError: after every run is written, if a run's training loss became non-finite.
  """
  t_start = time.time()
  run_dirs = list(run_dirs) if run_dirs is not None else [
      os.path.join(workdir, f"run_{i}") for i in range(len(configs))]
  if len(run_dirs) != len(configs):
    raise ValueError(f"vmap_runs: {len(run_dirs)} run_dirs for {len(configs)} configs")
  if len(set(map(os.path.abspath, run_dirs))) != len(run_dirs):
    raise ValueError("vmap_runs: run_dirs must be distinct")
  varied_keys(configs)  # before the (slow) experiment is built
  runs = Runs(configs, unroll=unroll, data=data)
  exp, n, configs = runs.exp, runs.n, runs.configs
  phases = {"experiment": time.time() - t_start}  # seconds of the parts outside the train loop
  config = configs[0]
  varied = [{k: _value(c, k) for k in runs.varied} for c in configs]
  spe = exp.steps_per_epoch
  total_steps = spe * config.train.num_epochs
  eval_every = config.train.eval_every_steps or spe

  readers = [checkpointing.Checkpoints(d, read_only=True) for d in run_dirs]
  try:
    points, failed_before = resume_points(exp, configs, run_dirs, readers)  # before any write
  finally:
    for reader in readers:
      reader.close()
  ckpts = [checkpointing.Checkpoints(d, keep_latest=c.checkpoint.keep_latest,
                                     async_save=c.checkpoint.async_save)
           for c, d in zip(configs, run_dirs)]
  sample = exp.data.head("validation", trainer.VALIDATION_SAMPLE_ROWS)
  for c, d in zip(configs, run_dirs):
    reporting.write_json_atomic(os.path.join(d, "config.json"), c.to_dict())
    trainer.write_preprocessing(exp.data, os.path.join(d, "preprocessing.json"))
    reporting.write_npz_atomic(os.path.join(d, trainer.VALIDATION_SAMPLE_FILE), sample)
  writers = [reporting.ScalarWriter(d) for d in run_dirs]
  failed = {i: summary["error"] for i, summary in failed_before.items()}
  failed_at = {i: summary["steps"] for i, summary in failed_before.items()}  # frozen steps
  metas = []
  for c, point in zip(configs, points):
    if point is None:
      meta = trainer.fresh_meta(exp)
      meta["config"] = c.to_dict()
    else:
      _, meta, changes = point
      if changes:  # recorded once, as the trainer does
        meta["resumes"].append({"step": meta["step"], "changed": changes})
        meta["config"] = c.to_dict()
      meta["stopped"] = trainer.early_stopped(meta, c)
    metas.append(meta)
  history_before = [len(m["history"]) for m in metas]  # the evaluations of earlier programs
  # What trainer.evaluate_and_decide reads of its experiment, per run (its own patience).
  deciders = [types.SimpleNamespace(config=c, schema=exp.schema,
                                    steps_per_epoch=exp.steps_per_epoch, evaluate=None)
              for c in configs]

  names = [", ".join(f"{k}={v}" for k, v in v_.items()) for v_ in varied]
  print(f"Training {n} runs in one program ({exp.total_steps} steps each at most)"
        + (f", varying {', '.join(runs.varied)}" if runs.varied else "") + ".", flush=True)

  phases["setup"] = time.time() - t_start - phases["experiment"]
  t = time.time()
  state = runs.init_state() if not all(points) else None
  if any(points):  # a resume: each run's state from its checkpoint, or fresh
    state = runs.stack([runs.take(state, jnp.int32(i)) if p is None else exp.to_train(p[0])
                        for i, p in enumerate(points)])
  state = jax.block_until_ready(state)
  phases["init"] = time.time() - t
  phases.update(evaluate=0.0, save=0.0)
  active = np.array([i not in failed and not meta["stopped"] and meta["step"] < total_steps
                     for i, meta in enumerate(metas)])
  # Each run's own step (frozen once it stops).
  run_steps = [failed_at.get(i, meta["step"]) for i, meta in enumerate(metas)]
  step = min(s for s, a in zip(run_steps, active) if a) if active.any() else max(run_steps)
  if any(points):
    print(f"Resuming the runs at step {step} (epoch {step / spe:.2f}): {int(active.sum())} of "
          f"{n} runs still training.", flush=True)
  iterators = [trainer.train_batches_from(
      types.SimpleNamespace(data=exp.data, config=c, steps_per_epoch=spe),
      trainer.data_position(step, spe, exp.input_groups)) for c in configs]
  last: list[Any] = [None] * n
  first_non_finite = jnp.full((n, exp.schema.num_tasks), -1, jnp.int32)
  loss_sum, loss_count, window_steps = None, 0, 0
  train_seconds, t_window = 0.0, time.time()
  t_loop = t_window
  stopped_by = None  # the signal that stopped the program, and its step (every run's summary)
  import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=total_steps, initial=step, unit="step", desc=f"train x{n}",
                  dynamic_ncols=True, mininterval=1.0,
                  disable=jax.process_index() != 0 or not config.train.progress_bar)
  with trainer.StopRequests() as stop_requests:
    try:
      while step < total_steps and active.any():
        for i in range(n):  # a stopped run is fed its last batch (its update is masked anyway)
          if active[i] or last[i] is None:
            last[i] = next(iterators[i])
        trained = active.copy()
        state, metrics = runs.train_step(state, runs.global_batch(last), jnp.asarray(active))
        step += 1
        window_steps += 1
        bar.update(1)
        trainer.kill_point("step", step)
        for i in np.flatnonzero(active):
          run_steps[i] = step
        loss_sum = metrics["loss"] if loss_sum is None else loss_sum + metrics["loss"]
        first_non_finite = runs.first_non_finite(first_non_finite, metrics["loss_sum"],
                                                 state.step)
        loss_count += 1
        evaluate = step % eval_every == 0 or step == total_steps
        if stop_requests.signum is None and ckpts[0].reached_preemption(step):
          stop_requests.signum = signal.SIGTERM
        stop = stop_requests.signum is not None  # read once: a signal from here on is next step's
        # A stop is checked too: a run saved at it must not have failed since the last check.
        if step % config.train.log_every == 0 or evaluate or stop:
          mean_loss = np.asarray(loss_sum) / loss_count
          run_metrics = {k: np.asarray(metrics[k]) for k in ("grad_norm", "balance_weights")
                         if k in metrics}  # [N] and [N, T]
          first = np.asarray(first_non_finite)
          for i in np.flatnonzero(active):
            try:
              trainer.check_finite_loss(float(mean_loss[i]), step, first[i],
                                        exp.schema.task_names)
            except FloatingPointError as e:
              failed[i] = str(e)
              active[i] = False
              print(f"run {i} ({names[i]}): {e}", flush=True)
              # Recorded at once: a kill before the program's end must not resume it.
              reporting.write_json_atomic(os.path.join(run_dirs[i], "metrics.json"), {
                  "error": failed[i], "steps": step, "stopped_by": None,
                  "vmapped": {"runs": n, "index": int(i)}})
              continue
            writers[i].write(step, trainer.train_scalars(
                float(mean_loss[i]), {k: v[i] for k, v in run_metrics.items()},
                exp.schema.task_names))
          bar.set_postfix(loss=f"{float(np.nanmean(mean_loss[trained])):.4f}",
                          epoch=f"{step / spe:.2f}", running=int(active.sum()))
          loss_sum, loss_count = None, 0
        if evaluate:
          seconds = time.time() - t_window
          train_seconds += seconds
          evaluated = [int(i) for i in np.flatnonzero(active)]
          share = seconds / max(int(trained.sum()), 1)
          t = time.time()
          results = runs.evaluate(state, "validation", evaluated) if evaluated else {}
          phases["evaluate"] += time.time() - t
          for i in evaluated:
            meta = metas[i]
            meta.update(step=step, epoch=step // spe,
                        data_position=trainer.data_position(step, spe, exp.input_groups))
            deciders[i].evaluate = lambda _state, _split, m=results[i]: m
            if jax.process_index() == 0 and n > 1:
              tqdm.tqdm.write(f"run {i}" + (f" ({names[i]})" if names[i] else "") + ":")
            score = trainer.evaluate_and_decide(deciders[i], None, meta, step, share,
                                                 window_steps, writers[i])
            t = time.time()
            ckpts[i].save(step, runs.take(state, jnp.int32(i)), meta, score=score)
            phases["save"] += time.time() - t
            if meta["stopped"]:
              active[i] = False
          t_window, window_steps = time.time(), 0
        if stop:
          if not evaluate:  # the runs still training, saved where they stand
            for i in np.flatnonzero(active):
              metas[i].update(step=step, epoch=step // spe,
                              data_position=trainer.data_position(step, spe, exp.input_groups))
              ckpts[i].save(step, runs.take(state, jnp.int32(i)), metas[i])
          break
    finally:
      bar.close()
      t = time.time()
      for c in ckpts:
        c.close()
      phases["save"] += time.time() - t
    if stop_requests.signum is not None:  # also one that came after the last step
      stopped_by = {"signal": signal.Signals(stop_requests.signum).name, "step": step}
    if stopped_by:
      print(f"Stopped at step {step} ({stopped_by['signal']}); checkpoints saved. Rerun the same "
            f"command to resume.", flush=True)

  num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params)))
  wall = time.time() - t_start
  phases["loop"] = time.time() - t_loop
  summaries = []
  for i, (meta, d) in enumerate(zip(metas, run_dirs)):
    best_step, history = meta["best_step"], meta["history"]
    summary = {
        "best_step": best_step, "best_validation_score": meta["best_score"],
        "best_validation": next((h["validation"] for h in history if h["step"] == best_step),
                                None),
        "steps": run_steps[i], "epochs": run_steps[i] / spe, "stopped_early": meta["stopped"],
        "stopped_by": stopped_by, "history": history, "resumes": meta["resumes"],
        "train_seconds_this_run": sum(h["train_seconds"] for h in history[history_before[i]:]),
        "wall_seconds_this_run": wall,
        "train_step_traces": runs.traces["train_step"],
        "eval_step_traces": runs.traces["eval_step"], "num_params": num_params,
        "vmapped": {"runs": n, "index": i, "varied": varied[i], "train_seconds": train_seconds,
                    "wall_seconds": wall, "phase_seconds": phases, "run_dirs": run_dirs}}
    if i in failed:
      summary["error"] = failed[i]
    reporting.write_json_atomic(os.path.join(d, "metrics.json"), summary)
    writers[i].close()
    summaries.append(summary)
  append_record(workdir, {
      "runs": n, "varied_keys": runs.varied, "varied": varied, "run_dirs": run_dirs,
      "train_seconds": train_seconds, "wall_seconds": wall, "phase_seconds": phases,
      "steps": step, "train_step_traces": runs.traces["train_step"],
      "failed": {str(i): e for i, e in failed.items()}})
  if failed and not stopped_by:
    raise FloatingPointError(
        f"vmap_runs: {len(failed)} of {n} runs stopped on a non-finite training loss "
        f"({'; '.join(f'run {i} ({names[i]})' for i in failed)}); the others finished, see "
        f"{os.path.join(workdir, RECORD_FILE)}")
  return summaries
