"""MMoE on UCI Census-Income (KDD), tasks income and marital."""

from configs import common


def get_config():
  return common.census_config("mmoe")
