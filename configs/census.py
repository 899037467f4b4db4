"""Any registered model on UCI Census-Income (KDD).

The argument after the colon picks the model and, optionally, the task group:
  --config configs/census.py:mmoe                       (income, marital)
  --config configs/census.py:ple,education_marital      (education, marital)
"""

from configs import common


def get_config(arg: str = "apem"):
  model, _, task_group = arg.partition(",")
  return common.census_config(model, task_group or "income_marital")
