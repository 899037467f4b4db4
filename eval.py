"""Evaluate a trained workdir's best checkpoint on a split.

python eval.py --config configs/census_apem.py --workdir runs/census_apem --split test
Prints a per-task table and writes <workdir>/eval/<split>.json (the best checkpoint's; another
checkpoint's goes to <split>_latest.json or <split>_step<N>.json). With --explain (APEM), also
plots what the model learned on that split, under <workdir>/explain/<split>/ (or
<split>_latest/, <split>_step<N>/) (apem_jax/interpret.py).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from apem_jax import cli, interpret, reporting, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to evaluate.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "A specific checkpoint step (default: the one --checkpoint names).")
_EXPLAIN = flags.DEFINE_bool(
    "explain", False, "Also plot the Pattern Selector's weights and the field groups (APEM), "
    "averaged over the split and for its first examples, under <workdir>/explain/<split>/ "
    "(<split>_latest/ or <split>_step<N>/ for another checkpoint than the best).")
_DEBUG = flags.DEFINE_bool("debug", False,
                           "Show the traceback of a user error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  with cli.user_errors_in_one_line("eval.py", _DEBUG.value):
    exp, state, meta = trainer.restore_checkpoint(_CONFIG.value, _WORKDIR.value,
                                                  _CHECKPOINT.value, _STEP.value)
    if _EXPLAIN.value:
      interpret.check_explainable(exp)  # before the split is evaluated
    result = {"step": meta["step"], "metrics": exp.evaluate(state, _SPLIT.value)}
    if _EXPLAIN.value:
      explanation = interpret.explain(exp, state, _SPLIT.value)
  name = reporting.evaluation_name(_SPLIT.value, _CHECKPOINT.value,
                                   None if _STEP.value is None else result["step"])
  which = (f"the checkpoint of step {result['step']}" if _STEP.value is not None else
           f"{_CHECKPOINT.value} checkpoint (step {result['step']})")
  path = os.path.join(_WORKDIR.value, "eval", f"{name}.json")
  reporting.write_json_atomic(path, result["metrics"])
  print(reporting.format_table(result["metrics"], f"{_SPLIT.value} split, {which}"))
  print(f"Written to {path}")
  if _EXPLAIN.value:
    paths = interpret.plot(explanation, os.path.join(_WORKDIR.value, "explain", name))
    print("Explained in " + ", ".join(paths))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("eval.py"))
