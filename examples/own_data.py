"""Your own funnel data, from a CSV, trained, evaluated and exported: the whole task.

python examples/own_data.py events.csv runs/own_data
(events.csv: columns split, user, item, category, price, click, purchase; a purchase follows a
click, an empty label is a missing one)
"""
import csv, sys
import apem_jax
from apem_jax.configs import common

path, workdir = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(path)))
splits = {s: {c: [r[c] for r in rows if r["split"] == s] for c in rows[0] if c != "split"}
          for s in ("train", "validation", "test")}
data = apem_jax.dataset_from_columns(splits, categorical=["user", "item", "category"], numeric=["price"],
                                     tasks=[apem_jax.Task("click"), apem_jax.Task("purchase", depends_on="click")])
config = common.base_config("apem")
config.train.update(batch_size=128, num_epochs=5)
config.optimizer.warmup_steps = 20
apem_jax.train_and_evaluate(config, workdir, data=data)
print(apem_jax.evaluate_checkpoint(config, workdir, "test", data=data)["metrics"])

from apem_jax import export  # noqa: E402  (TensorFlow, for the SavedModel)
export.export(workdir, workdir + "_export", overwrite=True)
