"""Throughput benchmark: train step, input pipeline and end-to-end training, vs torch-rechub.

  python benchmarks/throughput.py                          # writes docs/performance.md
  python benchmarks/throughput.py --models mmoe --batch_sizes 1024 --reps 2 --out /tmp/perf.md

Measures, for APEM (configs/census_apem.py) and MMoE (configs/census.py:mmoe) on Census-Income:

(a) step: ``Experiment.train_step`` (jit, state donated) on one device-resident batch, no input
    pipeline; each repetition runs steps until ``--target_s`` seconds have passed
    (``block_until_ready`` before the clock is read); median over repetitions after warm-up
    (compile + 2 steps). "first call s": the step's first call (tracing, compiling, one step).
(b) pipeline: ``DatasetSplits.train_batches`` (tf.data) iterated alone, batches discarded.
(c) end-to-end: pipeline + ``Experiment.device_batch`` + step + the trainer's on-device loss sum,
    as ``trainer.train_and_evaluate`` does; then one exact evaluation of the validation split
    (padded last batch) and ``Experiment.traces`` (the step must have been traced once).

(d) side by side: at ``--side_by_side_batch``, the train steps of all ``--models`` timed in
    turn within each repetition (``--target_s`` of one, then of the next), so that a machine whose
    load drifts during the run still compares them under the same load; medians and ratios.

Also: the step's FLOPs per example (XLA's ``cost_analysis`` of the compiled step), the FLOP/s that
achieves, a 2048x2048 f32 matmul's FLOP/s measured in the same run (the practical ceiling), an
APEM profile at one batch size (forward vs forward+backward vs full step, and config ablations),
and torch-rechub's MMoE (``benchmarks/rechub_mmoe.py``, run in a separate venv given by
``--rechub_python``; skipped if that interpreter does not exist) on the same encoded arrays.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apem_jax import losses, step as step_lib  # noqa: E402
from apem_jax.trainer import Experiment  # noqa: E402
from apem_jax.configs import census, census_apem  # noqa: E402
from apem_jax.models import MODELS, build_model  # noqa: E402
from apem_jax.schema import Schema  # noqa: E402
import arguments  # noqa: E402  (benchmarks/arguments.py)
import machine  # noqa: E402  (benchmarks/machine.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Benchmark-only model variants: name -> (registered model, model overrides).
VARIANTS = {
    # torch-rechub's own Census example sizes (embed 4, 8 experts [16], towers [8]).
    "mmoe_rechub_sizes": ("mmoe", dict(embed_dim=4, expert_hidden=(16,), tower_hidden=(8,))),
}


def model_config(name: str, batch_size: int, overrides: dict | None = None):
  name, variant = VARIANTS.get(name, (name, {}))
  overrides = {**variant, **(overrides or {})}
  config = census_apem.get_config() if name == "apem" else census.get_config(name)
  config.data.data_dir = os.path.join(ROOT, "data")
  config.train.batch_size = batch_size
  config.train.progress_bar = False
  for k, v in (overrides or {}).items():
    setattr(config.model, k, v)
  return config


def _block(tree):
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def one_rep(run_k, step_s: float, target_s: float) -> tuple[float, int]:
  """One timed repetition of at least ``target_s`` seconds: ``run_k(k)`` with k from ``step_s``
  (seconds per step known so far), again with the steps left while ``target_s`` has not passed.
  Returns (seconds per step, steps run)."""
  steps, elapsed, t0 = 0, 0.0, time.perf_counter()
  while not steps or elapsed < target_s:
    k = max(1, math.ceil((target_s - elapsed) / max(step_s, 1e-6)))
    run_k(k)
    steps += k
    elapsed = time.perf_counter() - t0
    step_s = elapsed / steps
  return step_s, steps


def timed_reps(run_k, first_step_s: float, reps: int, target_s: float) -> tuple[float, int]:
  """Median seconds per step over ``reps`` repetitions of at least ``target_s`` seconds each (k
  steps first from the warm-up time), and the median number of steps of a repetition."""
  times, steps = [], []
  for _ in range(reps):
    sec, k = one_rep(run_k, times[-1] if times else first_step_s, target_s)
    times.append(sec)
    steps.append(k)
  return statistics.median(times), int(statistics.median(steps))


def fixed_batch(exp: Experiment, batch_size: int) -> dict:
  arrays = exp.data.arrays["train"]
  local = {k: v[:batch_size] for k, v in arrays.items() if k in ("categorical", "numeric", "labels",
                                                                   "label_mask")}
  local["weight"] = np.ones((batch_size,), np.float32)
  return local


def flops_of(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def bench_step(exp: Experiment, batch_size: int, reps: int, target_s: float) -> dict:
  """(a) + FLOPs. Returns seconds per step and flops per step."""
  state = exp.to_train(exp.init_state())
  batch = exp.device_batch(fixed_batch(exp, batch_size))
  holder = {"state": state}

  def run_k(k):
    s = holder["state"]
    for _ in range(k):
      s, m = exp.train_step(s, batch)
    _block((s, m))
    holder["state"] = s

  t0 = time.perf_counter()
  run_k(1)
  first_call_s = time.perf_counter() - t0  # tracing, compiling and one step
  t0 = time.perf_counter()
  run_k(1)
  first = time.perf_counter() - t0
  run_k(1)
  sec, k = timed_reps(run_k, first, reps, target_s)
  traces = exp.traces["train_step"]
  flops = flops_of(exp.train_step, holder["state"], batch) if not exp.pmap else float("nan")
  exp.traces["train_step"] = traces  # lowering for the cost analysis is not a training trace
  return {"step_s": sec, "k": k, "first_call_s": first_call_s, "flops_per_step": flops,
          "state": holder["state"]}


def bench_pipeline(exp: Experiment, batch_size: int, reps: int, target_s: float) -> float:
  """(b) seconds per batch of ``train_batches``."""
  it = exp.data.train_batches(batch_size, seed=0)
  for _ in range(3):
    next(it)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0

  def run_k(k):
    for _ in range(k):
      next(it)
  sec, _ = timed_reps(run_k, first, reps, target_s)
  return sec


def bench_e2e(exp: Experiment, state, batch_size: int, reps: int, target_s: float,
              evaluate: bool) -> dict:
  """(c) seconds per step of pipeline + device_batch + step, as the trainer's loop."""
  it = exp.data.train_batches(batch_size, seed=1)
  holder = {"state": state}

  def run_k(k):
    s, loss_sum = holder["state"], None
    for _ in range(k):
      s, m = exp.train_step(s, exp.device_batch(next(it)))
      loss_sum = m["loss"] if loss_sum is None else loss_sum + m["loss"]
    float(loss_sum)  # the trainer reads the summed loss every log_every steps
    _block(s)
    holder["state"] = s

  run_k(2)
  t0 = time.perf_counter()
  run_k(1)
  first = time.perf_counter() - t0
  sec, _ = timed_reps(run_k, first, reps, target_s)
  out = {"e2e_s": sec, "state": holder["state"]}
  if evaluate:
    t0 = time.perf_counter()
    exp.evaluate(exp.from_train(holder["state"]), "validation")
    out["eval_s"] = time.perf_counter() - t0
  out["traces"] = dict(exp.traces)
  return out


def side_by_side(runs: dict, batch_size: int, reps: int, target_s: float) -> dict[str, float]:
  """(d) ``runs``: model -> (Experiment, train state). Each repetition runs every model in turn
  for at least ``target_s`` seconds (``one_rep``, from one timed step). Returns median ex/s."""
  holders, step_s, times = {}, {}, {name: [] for name in runs}
  for name, (exp, state) in runs.items():
    holders[name] = {"state": state, "batch": exp.device_batch(fixed_batch(exp, batch_size))}

  def run_k(name, k):
    exp, h = runs[name][0], holders[name]
    s = h["state"]
    for _ in range(k):
      s, m = exp.train_step(s, h["batch"])
    _block((s, m))
    h["state"] = s

  for name in runs:
    run_k(name, 1)
    t0 = time.perf_counter()
    run_k(name, 1)
    step_s[name] = time.perf_counter() - t0
  for _ in range(reps):
    for name in runs:
      step_s[name], _ = one_rep(lambda k, name=name: run_k(name, k), step_s[name], target_s)
      times[name].append(step_s[name])
  return {name: batch_size / statistics.median(t) for name, t in times.items()}


def matmul_ceiling(n: int = 2048, reps: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(3):
      c = f(a, b)
    c.block_until_ready()
    times.append((time.perf_counter() - t0) / 3)
  return 2 * n ** 3 / statistics.median(times)


def ablation_overrides(spec: str) -> dict:
  """``key=value[;key=value...]`` of APEM's model config -> its overrides (a value that is not
  JSON is taken as a string), checked as ``build_model`` checks them on Census's schema.

  Raises:
    ValueError: naming the part that is not ``key=value`` of a key of APEM's model config, or the
      value of the wrong type or that the model does not take.
  """
  keys = sorted(census_apem.get_config().model)
  overrides = {}
  for part in spec.split(";"):
    key, sep, text = part.partition("=")
    if not sep or key not in keys:
      raise ValueError(f"{part!r}: expected key=value with a key of APEM's model config "
                       f"({', '.join(keys)})")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = text
    overrides[key] = tuple(value) if isinstance(value, list) else value
  try:
    config = model_config("apem", 8, overrides)
  except TypeError as e:  # ml_collections: a value of another type than the key's
    raise ValueError(str(e)) from None
  with open(os.path.join(ROOT, "benchmarks", "census_schema.json")) as f:
    build_model(config.model, Schema.from_dict(json.load(f)))
  return overrides


def profile_apem(batch_size: int, reps: int, target_s: float,
                 ablations: dict[str, dict]) -> list[dict]:
  """Forward / forward+backward / full step of APEM, then full-step ablations (spec ->
  overrides, as ``ablation_overrides`` returns them)."""
  rows = _profile_parts(batch_size, reps, target_s)
  for spec, overrides in {"full step (census_apem config)": {}, **ablations}.items():
    exp = Experiment(model_config("apem", batch_size, overrides))
    r = bench_step(exp, batch_size, reps, target_s)
    rows.append({"what": spec, "step_s": r["step_s"], "flops_per_step": r["flops_per_step"]})
    del exp, r
  return rows


def _profile_parts(batch_size: int, reps: int, target_s: float) -> list[dict]:
  """Forward / forward + loss / forward + backward of APEM's default config."""
  rows = []
  exp = Experiment(model_config("apem", batch_size))
  state = exp.init_state()
  batch = exp.device_batch(fixed_batch(exp, batch_size))
  task_w = tuple(float(w) for w in (exp.config.train.task_weights or (1.0,) * exp.schema.num_tasks))

  def loss_fn(params, b):
    out = exp.model.apply({"params": params}, step_lib.model_inputs(b), train=True,
                          rngs={"dropout": jax.random.key(0)})
    return losses.multitask_loss(out["logits"], b, exp.schema, task_w, exp.head)[0]

  def infer(params, b):
    return exp.model.apply({"params": params}, step_lib.model_inputs(b), train=False)["logits"]

  for label, fn in (("forward (inference, train=False)", jax.jit(infer)),
                    ("forward + loss (train=True)", jax.jit(loss_fn)),
                    ("forward + backward (value_and_grad)", jax.jit(jax.value_and_grad(loss_fn)))):
    _block(fn(state.params, batch))
    t0 = time.perf_counter()
    _block(fn(state.params, batch))
    first = time.perf_counter() - t0

    def run_k(k, fn=fn):
      for _ in range(k):
        r = fn(state.params, batch)
      _block(r)
    sec, _ = timed_reps(run_k, first, reps, target_s)
    rows.append({"what": label, "step_s": sec, "flops_per_step": flops_of(fn, state.params, batch)})
  return rows


def run_rechub(python: str, batch_size: int, steps: int, reps: int, mmoe_cfg) -> dict | None:
  if not os.path.exists(python):
    print(f"torch-rechub: {python} not found; skipped", flush=True)
    return None
  from apem_jax.data import load_dataset
  data = load_dataset(model_config("mmoe", batch_size).data)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "census.npz")
    tr = data.arrays["train"]
    np.savez(path, categorical=tr["categorical"], numeric=tr["numeric"], labels=tr["labels"],
             vocab_sizes=np.asarray(data.schema.vocab_sizes))
    cmd = [python, os.path.join(ROOT, "benchmarks", "rechub_mmoe.py"), "--data", path,
           "--batch_size", str(batch_size), "--steps", str(steps), "--reps", str(reps),
           "--embed_dim", str(mmoe_cfg.embed_dim), "--num_experts", str(mmoe_cfg.num_experts),
           "--expert_hidden", ",".join(map(str, mmoe_cfg.expert_hidden)),
           "--tower_hidden", ",".join(map(str, mmoe_cfg.tower_hidden)), "--threads", str(os.cpu_count())]
    results = {}
    for label, extra in (("ours", []), ("rechub_example", ["--rechub_example_sizes"])):
      print("+", " ".join(shlex.quote(c) for c in cmd + extra), flush=True)
      p = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=900)
      if p.returncode:
        print(p.stdout[-2000:], p.stderr[-4000:])
        continue
      results[label] = json.loads(p.stdout.strip().splitlines()[-1])
  return results


def fmt(x: float, nd: int = 0) -> str:
  if x is None or x != x:
    return "n/a"
  return f"{x:,.{nd}f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", type=arguments.names([*MODELS, *VARIANTS]), default="apem,mmoe")
  p.add_argument("--batch_sizes", type=arguments.positive_ints, default="512,1024,4096,16384")
  p.add_argument("--apem_batch_sizes", default="", help="overrides --batch_sizes for APEM",
                 type=lambda text: arguments.positive_ints(text) if text else [])
  p.add_argument("--reps", type=arguments.at_least(1), default=3)
  p.add_argument("--target_s", type=arguments.at_least(0, float), default=1.0,
                 help="seconds per timed repetition (at least; 0: one step)")
  p.add_argument("--profile_batch", type=arguments.at_least(0), default=4096,
                 help="APEM profile batch size (0: none)")
  p.add_argument("--side_by_side_batch", type=arguments.at_least(0), default=4096,
                 help="(d): time every model's step in turn at this batch size (0: none)")
  p.add_argument("--ablations", default="grouping=none|se=false|pattern_selector=false|"
                                        "tower_input=pooled|adaptive_indicators=false",
                 help="APEM profile rows, '|'-separated, each key=value[;key=value...] of APEM's "
                      "model config (a value that is not JSON is a string)")
  p.add_argument("--rechub_python", default="/tmp/rechub-venv/bin/python")
  p.add_argument("--rechub_batch", type=arguments.at_least(1), default=1024,
                 help="torch-rechub's batch size: one of MMoE's batch sizes")
  p.add_argument("--rechub_steps", type=arguments.at_least(1), default=40)
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
  p.add_argument("--render", default="", help="only rewrite --out from this raw JSON (no runs)")
  args = p.parse_args(argv)
  if args.render:
    with open(args.render) as f:
      render(json.load(f), args.out)
    return
  models = args.models
  sizes_of = {name: args.apem_batch_sizes if name == "apem" and args.apem_batch_sizes
              else args.batch_sizes for name in models}
  lacking = [name for name in models if args.side_by_side_batch not in sizes_of[name]]
  if args.side_by_side_batch and len(models) > 1 and lacking:  # (d) would silently be missing
    p.error(f"--side_by_side_batch={args.side_by_side_batch} is not among the batch sizes of "
            f"{lacking}; add it, or choose one of every model's sizes")
  rechub_models = [name for name in models if name.startswith("mmoe")]
  short = [name for name in rechub_models if args.rechub_batch not in sizes_of[name]]
  if short and args.rechub_python and os.path.exists(args.rechub_python):  # no target line
    p.error(f"--rechub_batch={args.rechub_batch} is not among the batch sizes of {short}, whose "
            f"rows torch-rechub is compared with; choose one of them, or --rechub_python ''")
  ablations = {}
  for spec in filter(None, args.ablations.split("|")):
    try:
      ablations[spec] = ablation_overrides(spec)
    except (ValueError, TypeError) as e:
      p.error(f"--ablations: {e}")
  command = "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
  started = time.time()

  ceiling = matmul_ceiling()
  print(f"matmul 2048x2048 f32: {ceiling / 1e9:.1f} GFLOP/s", flush=True)
  rows, kept = [], {}
  for name in models:
    sizes = sizes_of[name]
    for bs in sizes:
      t0 = time.time()
      exp = Experiment(model_config(name, bs))
      a = bench_step(exp, bs, args.reps, args.target_s)
      b = bench_pipeline(exp, bs, args.reps, args.target_s)
      c = bench_e2e(exp, a.pop("state"), bs, args.reps, args.target_s,
                    evaluate=(bs == sizes[0]))
      state = c.pop("state")
      if bs == args.side_by_side_batch:
        kept[name] = (exp, state)
      row = {"model": name, "batch": bs, **a, "pipe_s": b, **c}
      row["step_eps"] = bs / row["step_s"]
      row["pipe_eps"] = bs / row["pipe_s"]
      row["e2e_eps"] = bs / row["e2e_s"]
      row["flops_per_ex"] = row["flops_per_step"] / bs
      row["achieved"] = row["flops_per_step"] / row["step_s"]
      rows.append(row)
      print(f"{name:5s} B={bs:6d} step {row['step_eps']:10.0f} ex/s  pipeline {row['pipe_eps']:10.0f} "
            f"ex/s  e2e {row['e2e_eps']:10.0f} ex/s  {row['flops_per_ex'] / 1e6:.2f} MFLOP/ex  "
            f"{row['achieved'] / 1e9:.2f} GFLOP/s ({100 * row['achieved'] / ceiling:.1f}% of matmul)  "
            f"first call {row['first_call_s']:.1f}s  traces {row['traces']}  "
            f"[{time.time() - t0:.0f}s]",
            flush=True)
      del exp, state

  paired = {}
  if len(kept) > 1:
    paired = side_by_side(kept, args.side_by_side_batch, args.reps, args.target_s)
    for name, eps in paired.items():
      print(f"side by side B={args.side_by_side_batch} {name:5s} step {eps:10.0f} ex/s", flush=True)
  kept.clear()

  profile = []
  if args.profile_batch and "apem" in models:
    profile = profile_apem(args.profile_batch, args.reps, args.target_s, ablations)
    for r in profile:
      print(f"profile B={args.profile_batch} {r['what']:40s} {r['step_s'] * 1e3:9.1f} ms  "
            f"{r['flops_per_step'] / args.profile_batch / 1e6:.2f} MFLOP/ex", flush=True)

  rechub = None
  if rechub_models and args.rechub_python:
    rechub = run_rechub(args.rechub_python, args.rechub_batch, args.rechub_steps, args.reps,
                        model_config("mmoe", args.rechub_batch).model)
    print("torch-rechub:", json.dumps(rechub), flush=True)

  write_markdown(args, command, ceiling, rows, profile, rechub, time.time() - started, paired)


# --out holds hand-written sections around the measured block: the text before MEASURED_MARKER
# and after ANALYSIS_MARKER is kept when the file is regenerated; the block between is rewritten.
MEASURED_MARKER = ("<!-- measured by benchmarks/throughput.py from here to the marker below: "
                   "rewritten when this file is regenerated -->")
ANALYSIS_MARKER = "<!-- hand-written analysis below: kept when this file is regenerated -->"


def write_markdown(args, command, ceiling, rows, profile, rechub, seconds, paired=None, now=None):
  now = now or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  raw = {"command": command, "now": now, "seconds": seconds, "reps": args.reps,
         "target_s": args.target_s, "profile_batch": args.profile_batch,
         "rechub_batch": args.rechub_batch, "cpu": machine.describe(), "cores": os.cpu_count(),
         "jax": jax.__version__, "backend": jax.default_backend(),
         "rows": [{k: v for k, v in r.items() if k != "state"} for r in rows],
         "profile": profile, "rechub": rechub, "ceiling": ceiling,
         "side_by_side_batch": args.side_by_side_batch, "side_by_side": paired or {}}
  with open(os.path.join(tempfile.gettempdir(), "performance_raw.json"), "w") as f:
    json.dump(raw, f, indent=1, default=str)
  render(raw, args.out)


def render(raw: dict, out: str) -> None:
  """docs/performance.md from the measured values; the text before MEASURED_MARKER and after
  ANALYSIS_MARKER is kept (a new file gets a title)."""
  ceiling, rows, profile, rechub = raw["ceiling"], raw["rows"], raw["profile"], raw["rechub"]
  L = [f"Regenerate: `{raw['command']}`", "",
       f"Measured {raw['now']} on {raw['cores']} CPU cores ({raw['cpu']}), jax {raw['jax']} "
       f"({raw['backend']}); the machine was shared with other engineers' jobs, so every figure is "
       f"noisy (medians of {raw['reps']} repetitions of >= {raw['target_s']:g} s each, after "
       f"compile and warm-up steps). The run took {raw['seconds'] / 60:.1f} min.", "",
       "GPU figures: not measured in this session (no GPU); run `python benchmarks/gpu_step.py` "
       "on a GPU.", "",
       f"Matmul ceiling (2048x2048 f32 `x @ y` under `jax.jit`, same run): "
       f"**{ceiling / 1e9:.1f} GFLOP/s**.", "",
       "## Step, pipeline and end-to-end (examples / s)", "",
       "(a) step: compiled `Experiment.train_step` on one device-resident batch, no input pipeline. "
       "(b) pipeline: `DatasetSplits.train_batches` iterated alone. (c) end-to-end: pipeline + "
       "`Experiment.device_batch` + step + on-device loss sum, as the trainer's loop. FLOPs: "
       "XLA `cost_analysis()` of the compiled step (forward + backward + Adam). Traces: "
       "`Experiment.traces` after (a), (c) and (first batch size only) an exact evaluation of the "
       "validation split (8192-row eval batches, last one padded). First call: the step's first "
       "call (tracing, compiling and one step).", "",
       "| model | batch | (a) step | (b) pipeline | (c) end-to-end | pipeline / step | "
       "MFLOP / example | achieved GFLOP/s | % of matmul | first call s | traces train (eval) |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    first_call = r.get("first_call_s", r.get("compile_s"))  # compile_s: a raw file of before
    L.append(f"| {r['model']} | {r['batch']} | {fmt(r['step_eps'])} | {fmt(r['pipe_eps'])} | "
             f"{fmt(r['e2e_eps'])} | {r['pipe_eps'] / r['step_eps']:.1f} | "
             f"{r['flops_per_ex'] / 1e6:.2f} | {r['achieved'] / 1e9:.1f} | "
             f"{100 * r['achieved'] / ceiling:.0f} | {first_call:.1f} | "
             f"{r['traces']['train_step']} ({r['traces']['eval_step']}) |")
  L.append("")
  paired = raw.get("side_by_side") or {}
  if paired:
    ref = "mmoe" if "mmoe" in paired else next(iter(paired))
    L += [f"## Train steps side by side (batch {raw['side_by_side_batch']})", "",
          f"(d): each repetition runs the steps of every model in turn, >= {raw['target_s']:g} s "
          f"of each (medians of {raw['reps']}), so a drift of the machine's load hits them "
          "alike.", "",
          f"| model | step examples / s | / {ref} |", "|---|---:|---:|"]
    for name, eps in paired.items():
      L.append(f"| {name} | {fmt(eps)} | {eps / paired[ref]:.2f} |")
    L.append("")
  if profile:
    pb = raw["profile_batch"]
    full = next(r for r in profile if r["what"].startswith("full step"))
    L += [f"## APEM profile (batch {pb})", "",
          "Forward / forward+backward are `jax.jit` of `model.apply` (+ loss) and its "
          "`value_and_grad`, without the optimizer; ablations are full train steps of the "
          "census_apem config with one `model.*` switch changed.", "",
          "| what | ms / step | examples / s | MFLOP / example | GFLOP/s | time vs full step |",
          "|---|---:|---:|---:|---:|---:|"]
    for r in profile:
      L.append(f"| {r['what']} | {r['step_s'] * 1e3:.0f} | {fmt(pb / r['step_s'])} | "
               f"{r['flops_per_step'] / pb / 1e6:.2f} | "
               f"{r['flops_per_step'] / r['step_s'] / 1e9:.1f} | {r['step_s'] / full['step_s']:.2f} |")
    L.append("")
  if rechub:
    L += [f"## torch-rechub 0.9.0 MMoE (batch {raw['rechub_batch']}, torch CPU, "
          f"{next(iter(rechub.values()))['threads']} threads)", "",
          "`benchmarks/rechub_mmoe.py` in a separate venv, same encoded Census arrays. "
          "`train_one_epoch`: rechub's `MTLTrainer.train_one_epoch` over rechub's DataLoader "
          "(`TorchDataset`, per-row `__getitem__` + default collate, shuffle, 0 workers) on the "
          "first steps x batch training rows: its end-to-end loop. `step only`: the same "
          "forward / BCE / backward / Adam on pre-collated tensors (no DataLoader).", "",
          "| rechub model sizes | params | steps | train_one_epoch ex/s | step only ex/s |",
          "|---|---:|---:|---:|---:|"]
    names = {"ours": "ours (embed 16, 8 experts [128, 64], towers [64, 32])",
             "rechub_example": "rechub census example (embed 4, 8 experts [16], towers [8])"}
    for label, r in rechub.items():
      L.append(f"| {names.get(label, label)} | {r['params']:,} | {r['steps']} | "
               f"{fmt(r['train_one_epoch_examples_per_s'])} | {fmt(r['step_only_examples_per_s'])} |")
    L.append("")
  L += ["## Targets", ""] + targets(raw) + [""]
  before, kept = "# Performance\n\n", "\n"
  if os.path.exists(out):
    with open(out) as f:
      text = f.read()
    if MEASURED_MARKER in text:
      before = text[:text.index(MEASURED_MARKER)]
    if ANALYSIS_MARKER in text:
      kept = text[text.index(ANALYSIS_MARKER) + len(ANALYSIS_MARKER):]
  with open(out, "w") as f:
    f.write(before + MEASURED_MARKER + "\n" + "\n".join(L) + "\n" + ANALYSIS_MARKER + kept)
  print(f"wrote {out}")


def targets(raw: dict) -> list[str]:
  rows, rechub, ceiling = raw["rows"], raw["rechub"], raw["ceiling"]
  out = []
  ok = lambda b: "**met**" if b else "**not met**"
  mm = next((r for r in rows if r["model"] == "mmoe" and r["batch"] == raw["rechub_batch"]), None)
  if mm and rechub and "ours" in rechub:
    peer = rechub["ours"]["train_one_epoch_examples_per_s"]
    ratio = mm["e2e_eps"] / peer
    step_ratio = mm["step_eps"] / rechub["ours"]["step_only_examples_per_s"]
    out.append(f"- MMoE end-to-end >= 4x torch-rechub's MMoE (batch {raw['rechub_batch']}, same "
               f"sizes): ours {fmt(mm['e2e_eps'])} / rechub {fmt(peer)} ex/s = **{ratio:.1f}x**: "
               f"{ok(ratio >= 4)}. Step alone vs rechub's model step on pre-collated tensors: "
               f"{step_ratio:.2f}x.")
  small = next((r for r in rows if r["model"] == "mmoe_rechub_sizes"
                and r["batch"] == raw["rechub_batch"]), None)
  if small and rechub and "rechub_example" in rechub:
    peer = rechub["rechub_example"]["train_one_epoch_examples_per_s"]
    ratio = small["e2e_eps"] / peer
    out.append(f"- The same at torch-rechub's Census example sizes (embed 4, 8 experts [16], "
               f"towers [8]): ours {fmt(small['e2e_eps'])} / rechub {fmt(peer)} ex/s = "
               f"**{ratio:.1f}x**: {ok(ratio >= 4)}.")
  if rows:
    worst = min(rows, key=lambda r: r["pipe_eps"] / r["step_eps"])
    out.append(f"- Input pipeline >= 2x the step's consumption: lowest ratio "
               f"{worst['pipe_eps'] / worst['step_eps']:.1f}x ({worst['model']}, batch "
               f"{worst['batch']}): {ok(worst['pipe_eps'] / worst['step_eps'] >= 2)}.")
  ap = next((r for r in rows if r["model"] == "apem" and r["batch"] == raw["profile_batch"]), None)
  if ap:
    frac = ap["achieved"] / ceiling
    out.append(f"- APEM achieved FLOP/s >= 30% of the matmul ceiling at batch {ap['batch']}: "
               f"{ap['achieved'] / 1e9:.1f} / {ceiling / 1e9:.1f} GFLOP/s = **{100 * frac:.0f}%**: "
               f"{ok(frac >= 0.3)} (see the analysis below).")
  paired = raw.get("side_by_side") or {}
  if "apem" in paired and "mmoe" in paired:
    ratio = paired["apem"] / paired["mmoe"]
    out.append(f"- APEM's train step at least MMoE's examples/s (batch "
               f"{raw['side_by_side_batch']}, side by side): {fmt(paired['apem'])} / "
               f"{fmt(paired['mmoe'])} = **{ratio:.2f}x**: {ok(ratio >= 1)}.")
  if rows:
    traces = [r["traces"]["train_step"] for r in rows]
    out.append(f"- The train step compiles exactly once per run (traces after step, end-to-end "
               f"and evaluation): {traces}: {ok(all(t == 1 for t in traces))}.")
  return out


if __name__ == "__main__":
  main()
