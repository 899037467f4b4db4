"""torch-rechub's MMoE training throughput on our encoded Census arrays (run by throughput.py).

Runs in a separate venv with torch + torch-rechub (never a dependency of apem_jax):
  python3 -m venv /tmp/rechub-venv
  /tmp/rechub-venv/bin/pip install torch==2.13.0+cpu torch-rechub==0.9.0
  /tmp/rechub-venv/bin/python benchmarks/rechub_mmoe.py --data census.npz --batch_size 1024

``--data`` is an npz with ``categorical`` int32 [N, Fc], ``numeric`` float32 [N, Fn], ``labels``
float32 [N, T] and ``vocab_sizes`` [Fc] (throughput.py writes it from ``load_dataset``). Features:
one rechub ``SparseFeature`` per categorical field (vocab_size + 1 rows, ``embed_dim``), one
``DenseFeature`` per numeric field (rechub feeds dense values raw, width 1). Model:
``torch_rechub.models.multi_task.MMOE`` with ``num_experts`` experts of ``expert_hidden`` and towers
of ``tower_hidden`` (our MMoE config's sizes), or with ``--rechub_example_sizes`` rechub's own
census example (embed_dim 4, experts [16], towers [8]).

Timed, per repetition (median printed): (1) ``MTLTrainer.train_one_epoch`` over rechub's
DataLoader (``TorchDataset`` + ``DataLoader(shuffle=True, num_workers=0)``, as
``DataGenerator.generate_dataloader`` builds it) on the first ``steps * batch_size`` rows: the
end-to-end loop (collation + forward + BCE + backward + Adam + ``loss.item()``); (2) the same
forward/backward/Adam on batches already collated into tensors (the step alone).
Prints one JSON line: examples per second.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import contextlib

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.models.multi_task import MMOE
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import TorchDataset


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data", required=True)
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--embed_dim", type=int, default=16)
  p.add_argument("--num_experts", type=int, default=8)
  p.add_argument("--expert_hidden", default="128,64")
  p.add_argument("--tower_hidden", default="64,32")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--rechub_example_sizes", action="store_true")
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  if args.rechub_example_sizes:
    args.embed_dim, args.expert_hidden, args.tower_hidden = 4, "16", "8"
  d = np.load(args.data)
  n = args.steps * args.batch_size
  cat, num, labels = d["categorical"][:n], d["numeric"][:n], d["labels"][:n]
  vocab = d["vocab_sizes"]
  features = ([SparseFeature(f"c{i}", int(v) + 1, embed_dim=args.embed_dim) for i, v in enumerate(vocab)]
              + [DenseFeature(f"n{i}") for i in range(num.shape[1])])
  x = {f"c{i}": cat[:, i].astype(np.int64) for i in range(cat.shape[1])}
  x.update({f"n{i}": num[:, i] for i in range(num.shape[1])})
  task_types = ["classification"] * labels.shape[1]
  widths = lambda s: [int(w) for w in s.split(",") if w]
  model = MMOE(features, task_types, args.num_experts, expert_params={"dims": widths(args.expert_hidden)},
               tower_params_list=[{"dims": widths(args.tower_hidden)}] * labels.shape[1])
  trainer = MTLTrainer(model, task_types, optimizer_params={"lr": 1e-3, "weight_decay": 1e-5},
                       n_epoch=1, device="cpu")
  loader = DataLoader(TorchDataset(x, labels), batch_size=args.batch_size, shuffle=True,
                      num_workers=0)

  def epoch():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      trainer.train_one_epoch(loader)

  epoch()  # warm-up
  loop = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    epoch()
    loop.append(n / (time.perf_counter() - t0))

  batches = [({k: torch.as_tensor(v[i:i + args.batch_size]) for k, v in x.items()},
              torch.as_tensor(labels[i:i + args.batch_size])) for i in range(0, n, args.batch_size)]
  model.train()

  def steps():
    for xb, yb in batches:
      y_pred = model(xb)
      loss = sum(trainer.loss_fns[t](y_pred[:, t], yb[:, t]) for t in range(len(task_types))) / len(task_types)
      model.zero_grad()
      loss.backward()
      trainer.optimizer.step()
    return float(loss)

  steps()
  step = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    steps()
    step.append(n / (time.perf_counter() - t0))
  params = sum(p.numel() for p in model.parameters())
  print(json.dumps({"batch_size": args.batch_size, "steps": args.steps, "embed_dim": args.embed_dim,
                    "num_experts": args.num_experts, "expert_hidden": args.expert_hidden,
                    "tower_hidden": args.tower_hidden, "params": params,
                    "threads": torch.get_num_threads(),
                    "train_one_epoch_examples_per_s": statistics.median(loop),
                    "step_only_examples_per_s": statistics.median(step),
                    "torch": torch.__version__}))


if __name__ == "__main__":
  sys.exit(main())
