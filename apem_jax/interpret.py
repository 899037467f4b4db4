"""What an APEM run learned: its Pattern Selector's weights and its field-to-group assignments.

``explain(exp, state, split)`` runs the model over a whole split and averages, over its real
examples:

* ``pattern_weights`` [T, F+G]: per task, the Pattern Selector's weight ``alpha_t`` on each
  pattern: the F field tokens (schema order: categorical, then numeric) and the G group tokens of
  the last DAGT block;
* ``group_weights`` [H, G, F]: per head and group, the last block's pooling weight of each field
  (sums to 1 over the fields): which fields form the group;
* ``group_assignment`` [H, G, F] (competitive grouping only): per field, how it divides itself
  among the groups (sums to 1 over the groups);

and keeps ``examples`` [n, T, F+G], the pattern weights of the split's first ``n`` rows (with ``k``
processes: process 0's first rows, the split's rows 0, k, 2k, ...). ``plot(explanation, directory)``
draws them (matplotlib) as ``patterns.png``, ``groups.png`` (the pooling weights; where the model
has groups), ``assignment.png`` (where it has the assignment) and ``examples.png``, and writes the
numbers to ``explanation.json``. Command line: ``python eval.py --config ... --workdir ... --split
validation --explain``; ``python -m apem_jax.interpret DIR/explanation.json`` draws the figures
again from the numbers, beside them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from typing import Any

import jax
import numpy as np

from apem_jax import parallel, reporting, step as step_lib

OUTPUTS = ("pattern_weights", "group_weights", "group_assignment")
# The keys plot() reads (group_assignment only where the grouping is competitive).
REQUIRED_KEYS = ("split", "examples_averaged", "tasks", "fields", "patterns", "pattern_weights",
                 "group_weights", "examples")


def check_explainable(exp: Any) -> None:
  """Raises ValueError unless ``exp``'s model has a Pattern Selector to explain (checked on
  shapes alone, before a split is read)."""
  name = exp.config.model.name
  if exp.config.model.get("pattern_selector", True) is False:
    raise ValueError(f"model {name!r} has model.pattern_selector=false: no Pattern Selector to "
                     f"explain (its tasks read the patterns' mean)")
  inputs = {"categorical": jax.ShapeDtypeStruct((1, len(exp.schema.categorical)), np.int32),
            "numeric": jax.ShapeDtypeStruct((1, len(exp.schema.numeric)), np.float32)}
  out = jax.eval_shape(lambda p, x: exp.model.apply({"params": p}, x, train=False),
                       exp.abstract_state.params, inputs)
  if not isinstance(out, dict) or "pattern_weights" not in out:
    raise ValueError(f"model {name!r} has no Pattern Selector to explain (APEM and models "
                     f"registered from it have one)")


def explain(exp: Any, state: step_lib.TrainState, split: str, num_examples: int = 4) -> dict:
  """Averages of the selector's and the grouping's weights over ``split`` (module docstring).

  Raises:
    ValueError: the model has no Pattern Selector (not APEM, or APEM without one).
  """
  check_explainable(exp)
  model = exp.model

  @jax.jit
  def outputs(params, batch):
    out = model.apply({"params": params}, step_lib.model_inputs(batch), train=False)
    return {k: out[k] for k in OUTPUTS if k in out}

  sums, count, examples = {}, 0.0, []
  for local in exp.data.eval_batches(split, exp.config.train.eval_batch_size):
    batch = parallel.global_batch(local, exp.mesh)
    out = outputs(state.params, batch)
    out = {k: parallel.to_host(v) for k, v in out.items()}
    weight = parallel.to_host(batch["weight"])
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + np.tensordot(weight, v, axes=1)
    count += float(weight.sum())
    if len(examples) < num_examples:
      examples += list(out["pattern_weights"][weight > 0][:num_examples - len(examples)])
  schema = exp.schema
  fields = [f.name for f in schema.categorical] + [f.name for f in schema.numeric]
  groups = [f"group {g}" for g in range(sums["group_weights"].shape[-2])]
  if exp.config.model.get("pair_patterns"):
    groups += [f"group {i} x {j}" for i, j in zip(*np.triu_indices(len(groups), k=1))]
  return {"split": split, "examples_averaged": int(count), "tasks": list(schema.task_names),
          "selection": exp.config.model.get("selection", "softmax"),
          "fields": fields, "patterns": fields + groups,
          **{k: v / count for k, v in sums.items()}, "examples": np.stack(examples)}


def plot(explanation: dict, directory: str) -> list[str]:
  """Writes the figures and ``explanation.json`` under ``directory`` (a local path or ``gs://``;
  each file whole or not at all, by process 0); returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  tasks, fields, patterns = explanation["tasks"], explanation["fields"], explanation["patterns"]
  arrays = {k: np.asarray(explanation[k]) for k in (*OUTPUTS, "examples")
            if explanation.get(k) is not None}
  paths = []

  def save(fig, name):
    path = os.path.join(directory, name)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    reporting.write_bytes_atomic(path, png.getvalue())
    paths.append(path)

  def heatmap(ax, values, rows, columns, title, **scale):
    image = ax.imshow(values, aspect="auto", cmap="viridis", **scale)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_title(title, fontsize=9)
    return image

  weights = arrays["pattern_weights"]
  reference = (f"uniform = {1 / len(patterns):.3f}"
               if explanation.get("selection", "softmax") == "softmax" else
               "gates / 2, each in [0, 1]: a neutral gate is 0.5")
  fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(patterns)), 1.2 + 0.5 * len(tasks)))
  fig.colorbar(heatmap(ax, weights, tasks, patterns,
                       f"Pattern Selector: mean weight per task and pattern "
                       f"({explanation['split']}, {explanation['examples_averaged']} examples; "
                       f"{reference})"), ax=ax)
  save(fig, "patterns.png")

  grouping = arrays["group_weights"]
  heads, groups = grouping.shape[0], grouping.shape[1]
  figures = [("groups.png", grouping, "pooling weight of each field in each group (rows sum to "
              "1)")]
  if "group_assignment" in arrays:
    figures.append(("assignment.png", arrays["group_assignment"],
                    "share of each field assigned to each group (columns sum to 1)"))
  for name, values, title in figures if groups else ():  # (grouping='none': no groups)
    fig, axes = plt.subplots(heads, 1, squeeze=False,
                             figsize=(max(8, 0.22 * len(fields)), (2.8 + 0.25 * groups) * heads))
    for h in range(heads):
      fig.colorbar(heatmap(axes[h, 0], values[h], [f"group {g}" for g in range(groups)], fields,
                           f"head {h}: {title}"), ax=axes[h, 0])
    fig.tight_layout()
    save(fig, name)

  examples = arrays["examples"]
  scale = dict(vmin=0.0, vmax=float(examples.max(initial=0.0)))  # one scale: comparable examples
  fig, axes = plt.subplots(len(examples), 1, squeeze=False, layout="constrained", figsize=(
      max(8, 0.22 * len(patterns)), 2.0 + (0.8 + 0.3 * len(tasks)) * len(examples)))
  for i, example in enumerate(examples):
    image = heatmap(axes[i, 0], example, tasks,
                    patterns if i == len(examples) - 1 else [""] * len(patterns),
                    f"example {i} of the split", **scale)
  fig.colorbar(image, ax=axes[:, 0].tolist())
  save(fig, "examples.png")

  path = os.path.join(directory, "explanation.json")
  reporting.write_json_atomic(path, {k: v.tolist() if isinstance(v, np.ndarray) else v
                                     for k, v in explanation.items()})
  return paths + [path]


def main() -> None:
  """``python -m apem_jax.interpret DIR/explanation.json``: the figures drawn again in DIR."""
  parser = argparse.ArgumentParser(prog="python -m apem_jax.interpret",
                                   description="Draws the figures of eval.py --explain again "
                                   "from their numbers, beside them.")
  parser.add_argument("explanation", help="DIR/explanation.json, as eval.py --explain writes it")
  path = parser.parse_args().explanation
  if not os.path.isfile(path):
    parser.error(f"{path}: no such file; expected the explanation.json eval.py --explain writes")
  try:
    with open(path) as f:
      explanation = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    parser.error(f"{path}: not valid JSON ({e}); expected the explanation.json eval.py --explain "
                 f"writes")
  lacking = [k for k in REQUIRED_KEYS if not isinstance(explanation, dict) or k not in explanation]
  if lacking:
    parser.error(f"{path}: no {lacking} in it; expected the explanation.json eval.py --explain "
                 f"writes")
  for written in plot(explanation, os.path.dirname(os.path.abspath(path))):
    print(written)


if __name__ == "__main__":
  main()
